// Preference losses on per-sequence log-probs (host code, double precision).
//
// The per-pair arithmetic lives in kernels/pair_loss.h (pair_loss_eval, host and device code from one source);
// this file is its host front end: parsing and validating the config, the batch sums and the per-micro-batch
// normalisation, and the chunk interface of the LM head.
//
// Everything here acts on one scalar per sequence: the summed log-prob of a completion under the policy and under
// the reference. The gradient of a loss w.r.t. a sequence's log-prob is one scalar per sequence too; the model's
// backward turns it into per-token logit gradients (REFERENCE.md: scalar x (onehot(y_t) - softmax(logits_t))).
//
// Notation (per pair): c = policy_chosen - ref_chosen, r = policy_rejected - ref_rejected, D = c - r.
// With reference_free the ref terms are 0. eps = label_smoothing, z = beta*D.
//
//   sigmoid  -log s(z - D_r)                      D_r = odpo_alpha*log(score_chosen - score_rejected) if alpha > 0
//   cdpo     -(1-eps) log s(z) - eps log s(-z)    conservative DPO (DPO repo); TRL's "sigmoid" with label smoothing
//   robust   [-(1-eps) log s(z) + eps log s(-z)] / (1-2eps)   Chowdhury et al. 2024 (unbiased under flip rate eps;
//            unbounded below as z -> +inf when eps > 0, that is the estimator, not a bug)
//   ipo      (D - 1/(2 beta))^2                   ipo_length_normalize (the default, TRL's ipo): c, r divided by
//                                                 their completion lengths (per-token means); false: sums (the paper)
//   hinge    max(0, 1 - z)                        subgradient 0 at z == 1 exactly (the right derivative), -beta below
//   sft      -policy_chosen / len_chosen          mean per-token NLL of the chosen completion (RPO's extra term);
//                                                 no reference, no beta; gradient only w.r.t. policy_chosen
// and TRL 1.16's other per-pair losses under their TRL names (formulas in kernels/pair_loss.h, sources in
// docs/training.md): exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop (discopop_tau),
// sigmoid_norm, and simpo (CPOTrainer's, with simpo_gamma; reference-free). f_divergence_type (reverse_kl,
// forward_kl, js_divergence, alpha_divergence with f_alpha_divergence_coef) maps each log-ratio to its f-DPO score
// before the f-divergence losses compare them.
//
// Decisions:
//  * ODPO's offset applies to the sigmoid term only (as TRL applies offsets to sigmoid-type losses); validate()
//    rejects odpo_alpha > 0 without a sigmoid term rather than silently ignoring it.
//  * label_smoothing is used by robust, cdpo, exo_pair and simpo only; validate() rejects label_smoothing > 0
//    without one of them (a silent no-op would surprise TRL users). exo_pair needs label_smoothing > 0, as TRL
//    requires (log eps; the EXO paper recommends 1e-3).
//  * TRL's aot and aot_unpaired (AOT, Melnyk et al. 2024) sort the micro-batch's log-ratios, so a pair's loss
//    depends on the other pairs of its micro-batch: they are batch terms (is_batch_term, kernels/pair_loss.h),
//    evaluated by batch_loss over one whole micro-batch, exactly and deterministically (double, a stable sort with
//    ties in pair order), never by the per-pair function. Their value depends on the micro-batch as TRL's depends
//    on its per-device batch; the trainer's micro-batches never span ranks, so not on the rank count.
//  * f_divergence_type other than reverse_kl is refused when a loss outside TRL's f-divergence set is listed (TRL's
//    rule: nca_pair, bco_pair, sppo_hard, apo_zero, apo_down take the plain log-ratios); simpo is refused with
//    it too (reference-free: there is no log-ratio to transform), and a loss list of only simpo (and sft) is
//    refused without reference_free: true, since the reference would be computed for nothing but the reward
//    metrics.
//  * Per-pair data problems (ODPO without scores or with score_chosen <= score_rejected, a non-positive completion
//    length where a length is used) are refused where the data is read, with an InputError naming file:line
//    (train/data.h: DataOptions::require_score_gap, empty_completion; truncation keeps >= 1 completion token, so
//    make_batch's completion lengths are >= 1). The shared per-pair function assumes valid inputs (its
//    preconditions: kernels/pair_loss.h); the host functions here assert them (dpo::Error: a caller bug, not a
//    data error). Non-finite log-probs are not checked: they propagate to a non-finite loss for the trainer's NaN
//    check.
//  * Metrics follow TRL and do not depend on the loss type: rewards are beta*(policy - ref) of the summed log-probs
//    (never length-normalised, ref = 0 when reference_free), accuracy counts reward_chosen > reward_rejected
//    strictly, margin = reward_chosen - reward_rejected, logps are the policy's summed log-probs.
//  * log s(x) = -softplus(-x) with softplus(x) = max(x,0) + log1p(exp(-|x|)), s(x) evaluated on the side that
//    cannot overflow: the sigmoid-family losses and their gradients are finite for any finite z (tested at
//    |z| = 1e4, where the naive log(1/(1+exp(-z))) gives inf).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/pair_loss.h"

namespace dpo {

// LossType: kernels/pair_loss.h (the device code switches on it).

// "sigmoid" (alias "dpo"), "ipo", "hinge", "robust", "cdpo", "sft", "exo_pair", "nca_pair", "bco_pair",
// "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "aot", "aot_unpaired". Exact, lower
// case. Unknown -> InputError("loss_type: unknown value '<s>'; valid: sigmoid, ipo, ...").
LossType parse_loss_type(const std::string& name);
const char* loss_type_name(LossType type);  // the canonical name parse_loss_type accepts

// "reverse_kl", "forward_kl", "js_divergence", "alpha_divergence" (TRL's f_divergence_type values); unknown ->
// InputError naming f_divergence_type and the valid values.
FDivergence parse_f_divergence(const std::string& name);
const char* f_divergence_name(FDivergence f);

struct LossTerm {
  LossType type = LossType::Sigmoid;
  double weight = 1.0;
};

// TRL-style config lists `loss_type: [sigmoid, sft]`, `loss_weights: [1.0, 0.5]` -> terms. Empty weights means all
// 1.0; otherwise the sizes must match (InputError naming loss_weights). Does not validate() the result.
std::vector<LossTerm> make_loss_terms(const std::vector<std::string>& types, const std::vector<double>& weights);

struct LossConfig {
  std::vector<LossTerm> terms = {{LossType::Sigmoid, 1.0}};  // total loss = sum_i weight_i * loss_i
  double beta = 0.1;
  double label_smoothing = 0.0;       // eps for robust / cdpo, in [0, 0.5)
  // IPO on per-token mean log-ratios: TRL's "ipo" (v1.9 dpo_trainer.py divides each sequence's log-ratio by its
  // completion token count, a count that here is always >= 1). false: the IPO paper's summed log-ratios.
  bool ipo_length_normalize = true;
  double odpo_alpha = 0.0;            // ODPO offset scale (sigmoid term only); 0 = off
  bool reference_free = false;        // ref log-probs treated as 0
  double discopop_tau = 0.05;         // DiscoPOP's temperature (TRL's default)
  double simpo_gamma = 0.5;           // SimPO's target margin (TRL CPOConfig's default)
  FDivergence f_divergence = FDivergence::ReverseKl;  // TRL's f_divergence_type
  double f_alpha_divergence_coef = 0.5;               // alpha of alpha_divergence (TRL's default)
  // WPO (TRL's use_weighting): each pair's loss times exp(mean aligned log-prob of chosen + of rejected), the
  // weight detached (kernels/pair_loss.h PairWeighting::Wpo).
  bool use_weighting = false;

  // Throws InputError "<where>: <key> ..." (just "<key> ..." when where is empty) naming the key:
  //   beta            not finite or <= 0
  //   label_smoothing not finite, < 0 or >= 0.5, or > 0 without a robust/cdpo/exo_pair/simpo term, or 0 with
  //                   exo_pair
  //   loss_type       no terms, or the same type twice
  //   loss_weights    a weight not finite or < 0, or all weights 0
  //   odpo_alpha      not finite or < 0, or > 0 without a sigmoid term
  //   discopop_tau    not finite or <= 0
  //   simpo_gamma     not finite
  //   f_alpha_divergence_coef  not finite
  //   f_divergence_type        not reverse_kl with a loss outside the f-divergence set
  //   reference_free  false with only simpo (and sft) listed
//   use_weighting   true with aot or aot_unpaired (TRL refuses it: the sort would misalign the per-pair weights)
  void validate(const std::string& where = "") const;
};

// Whether cfg lists a batch term (aot, aot_unpaired): its loss is batch_loss over whole micro-batches on the host,
// not the per-pair function (on the device or per chunk).
bool has_batch_terms(const LossConfig& cfg);

struct PairInput {
  double policy_chosen = 0, policy_rejected = 0;  // summed completion log-probs
  double ref_chosen = 0, ref_rejected = 0;        // ignored when reference_free
  int64_t len_chosen = 1, len_rejected = 1;       // completion token counts (sft, normalised IPO, sigmoid_norm,
                                                  // simpo)
  bool has_scores = false;                        // ODPO scores present
  double score_chosen = 0, score_rejected = 0;
  double wpo_chosen = 0, wpo_rejected = 0;        // aligned log-prob sums (kSeqWpoLogp), for use_weighting
};

struct PairOutput {
  double loss = 0;  // sum_i weight_i * loss_i for this pair (not normalised)
  double d_policy_chosen = 0, d_policy_rejected = 0;  // dloss/d policy log-prob
  double reward_chosen = 0, reward_rejected = 0;      // beta*(policy - ref)
};

// Validates cfg, then evaluates one pair (pair_loss_eval of kernels/pair_loss.h).
PairOutput pair_loss(const LossConfig& cfg, const PairInput& in);

// The shared function's parameters for a config (validated here; InputError as validate()).
PairLossParams pair_loss_params(const LossConfig& cfg);
// The shared function's input for a pair: the ODPO offset odpo_offset(cfg.odpo_alpha, scores) when odpo_alpha > 0
// (0 otherwise), the lengths as doubles. Asserts the preconditions of kernels/pair_loss.h that depend on the pair
// (dpo::Error, not InputError: the loaders refuse such data, so reaching here with it is a caller bug): with
// odpo_alpha > 0, has_scores and score_chosen > score_rejected (finite); len_chosen > 0 with an sft, sigmoid_norm,
// simpo or length-normalised ipo term, len_rejected > 0 with sigmoid_norm, simpo or length-normalised ipo.
PairLossInput pair_loss_input(const LossConfig& cfg, const PairInput& in);

struct BatchLoss {
  double loss_sum = 0;                     // sum over pairs of the pair loss (divide by the normalizer to report)
  std::vector<double> term_loss_sum;       // per cfg.terms entry, unweighted, summed over pairs
  std::vector<double> d_policy_chosen;     // per pair, already divided by `normalizer`
  std::vector<double> d_policy_rejected;   // per pair, already divided by `normalizer`
  double reward_chosen_sum = 0, reward_rejected_sum = 0;
  double accuracy_sum = 0;  // count of reward_chosen > reward_rejected (strict)
  double margin_sum = 0;    // sum of reward_chosen - reward_rejected
  double logps_chosen_sum = 0, logps_rejected_sum = 0;  // policy summed log-probs
  int64_t pairs = 0;
};

// Gradient-accumulation rule: `normalizer` is the global pair count of the optimizer step (all micro-batches, all
// ranks), so micro-batches' gradients add up to the gradient of the mean loss over the step. The sums are left
// unnormalised so they can be reduced across micro-batches and ranks. normalizer must be finite and > 0 (Error).
//
// `pairs` is one micro-batch. The per-pair terms are pair_loss_eval's; the batch terms (TRL 1.16's forms, AOT of
// Melnyk et al. 2024, arXiv 2406.05882), with l(d) = -(1-eps) log s(beta d) - eps log s(-beta d), eps =
// label_smoothing, sort(v) the values of v in ascending order and k = 0..P-1 the rank:
//   aot           sum_k l(sort(x)_k - sort(y)_k),  x_q = policy_chosen_q - policy_rejected_q, y_q the same of the
//                 reference (0 with reference_free)
//   aot_unpaired  sum_k l(sort(c)_k - sort(r)_k),  c_q, r_q the pairs' chosen and rejected log-ratios
// (TRL averages the same terms over its per-device batch). The gradient flows through the sort permutation: rank
// k's dl/dd goes to the pair(s) sorted to rank k (aot: + to its chosen, - to its rejected log-prob; aot_unpaired:
// + to the chosen log-prob ranked k among the c, - to the rejected one ranked k among the r). Ties are ranked in
// pair order (a stable sort), NaN last; the sorted values, hence the loss, do not depend on the tie rule, and the
// gradient only where tied pairs differ in their other inputs (where the loss is not differentiable). The per-pair
// fields of these terms are not defined: only term_loss_sum and the derivatives are.
BatchLoss batch_loss(const LossConfig& cfg, const std::vector<PairInput>& pairs, double normalizer);

// The PairSum row (kernels/pair_loss.h, kPairSumsWidth doubles) of a batch_loss result over `pairs`: what the device
// loss (Backend::preference_loss) adds up for the same pairs. logit_sums: each sequence's kSeqLogitSum (metrics
// only), [chosen 0..P-1, rejected P..2P-1].
std::vector<double> pair_sums_row(const BatchLoss& bl, const std::vector<PairInput>& pairs,
                                  const std::vector<double>& logit_sums);

// The loss gradient of pairs [q0, q1) of a batch laid out as [chosen 0..P-1, rejected P..2P-1] (P = pairs.size()),
// for the chunked LM head (GPT2::LossHead; cfg without batch terms, which need all the batch's pairs at once):
// logp holds the policy's summed log-probs of those pairs' two rows (other entries are ignored), `pairs` the rest
// of each pair's inputs (its policy fields are ignored). Sets
// dseq[q] and dseq[P + q] to batch_loss's d_policy_chosen / d_policy_rejected (divided by `normalizer`), the same
// values one batch_loss call over all pairs gives.
void pair_chunk_grads(const LossConfig& cfg, const std::vector<PairInput>& pairs, int64_t q0, int64_t q1,
                      const std::vector<double>& logp, double normalizer, std::vector<double>& dseq);

// Numerically stable primitives (exposed for tests and other losses).
double softplus(double x);    // log(1 + e^x)
double log_sigmoid(double x); // -softplus(-x)
double sigmoid(double x);

}  // namespace dpo
