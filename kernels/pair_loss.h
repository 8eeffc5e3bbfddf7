// The preference loss of one pair, written once for the host and the device: train/loss.cpp (the trainer's CPU
// path), the CPU backend's preference_loss (runtime/cpu_backend.cpp) and the CUDA kernel (kernels/pair_loss.cu)
// all evaluate pair_loss_eval() below, so the CPU and GPU paths use the same formulas from one source. They agree
// to rounding, not bitwise: nvcc contracts a * b + c into an FMA where the host compiler does not, and the device's
// exp / log1p differ from glibc's by an ulp or so.
//
// Notation (train/loss.h and docs/training.md have the sources of the formulas): c = policy_chosen - ref_chosen,
// r = policy_rejected - ref_rejected (ref = 0 with RefMode::ReferenceFree) are the log-ratios; their f-divergence
// scores (TRL's f_divergence_type, f-DPO of Wang et al. 2023) are
//   ReverseKl  S(x) = x                  (standard DPO)
//   ForwardKl  S(x) = 1 - exp(-x)
//   Js         S(x) = log 2 + log s(x)
//   Alpha      S(x) = (exp(min((a-1) x, 80)) - 1) / (a-1)   a = f_alpha; |a-1| < 1e-6 falls back to S(x) = x; the
//                                        clamp at 80 is TRL's (the gradient is 0 above it)
// Sc = S(c), Sr = S(r), D = Sc - Sr, z = beta * D, eps = label_smoothing, s = sigmoid, lc / lr the completion
// lengths, pc / pr the policy's summed log-probs.
//   Sigmoid     -log s(z - offset)       offset: the ODPO offset of the pair (odpo_offset below; 0 when off)
//   Cdpo        -(1-eps) log s(z) - eps log s(-z)
//   Robust      [-(1-eps) log s(z) + eps log s(-z)] / (1-2eps)
//   Ipo         (Sc' - Sr' - 1/(2 beta))^2   Sc' = Sc / lc, Sr' = Sr / lr with IpoNorm::PerToken (TRL's ipo);
//                                        Sc' = Sc, Sr' = Sr with IpoNorm::Summed (the IPO paper)
//   Hinge       max(0, 1 - z)            subgradient 0 at z == 1
//   Sft         -pc / lc                 (RPO's NLL term; no reference, no beta)
//   ExoPair     s(z) (log s(z) - log(1-eps)) + s(-z) (log s(-z) - log eps)    (needs eps > 0)
//   SigmoidNorm -log s(beta (Sc / lc - Sr / lr))
//   Discopop    -log s(z) (1 - m) + exp(-z) m,  m = s(z / tau)             tau = discopop_tau
// The rest take the plain log-ratios (params valid: f_div is ReverseKl whenever one of them is present):
//   NcaPair     -log s(beta c) - log s(-beta c) / 2 - log s(-beta r) / 2
//   BcoPair     -log s(beta c) - log s(-beta r)
//   SppoHard    (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
//   ApoZero     (1 - s(beta c)) + s(beta r)
//   ApoDown     s(beta c) + (1 - s(beta (c - r)))
//   Simpo       -(1-eps) log s(u) - eps log s(-u),  u = beta (pc / lc - pr / lr) - gamma   (gamma = simpo_gamma;
//               reference-free by definition: the reference and f_div never enter it)
//   Aot, AotUnpaired  batch terms (TRL's aot, aot_unpaired): a pair's value depends on the other pairs of its
//               micro-batch (they sort the log-ratios), so pair_loss_eval gives them 0 (value and derivatives) and
//               train/loss.h's batch_loss evaluates them over the whole micro-batch on the host.
// WPO (PairWeighting::Wpo, TRL's use_weighting; Zhou et al. 2024, arXiv 2406.11827, eq. 2): every term is multiplied
// by the pair's weight w = exp(ac / lc) * exp(ar / lr), ac, ar the sequences' aligned log-prob sums (kSeqWpoLogp of
// kernels/seq_stats.h: sum over completion tokens of log p(y_t) - log sum_v p_v^2), treated as a constant (TRL
// computes it under no_grad): the derivatives are w times the term's.
// loss = sum_i weight_i * term_i over the params' terms, in their order; d_chosen / d_rejected are its derivatives
// w.r.t. policy_chosen / policy_rejected. Metrics (TRL's, independent of the loss type): reward = beta * (policy -
// ref) of the summed log-probs, accuracy = [reward_chosen > reward_rejected] (strict), margin = reward_chosen -
// reward_rejected, logps = the policy's summed log-probs.
//
// Scalar type: double only, on both sides. The per-pair work is a few dozen flops per pair, nothing next to the LM
// head that produces its inputs, so fp64 costs nothing measurable on a GPU, and one type means one set of rounding
// decisions: whatever the storage type of the inputs (fp32 seq_stats on the GPU, fp32 or fp64 on the CPU), the
// arithmetic is the same double arithmetic everywhere. Inputs are widened exactly; outputs are rounded once when
// stored (kernels/pair_loss.cuh).
//
// Preconditions (not checked here: device code cannot throw; the data pipeline guarantees them, train/data.h):
//   - params valid as LossConfig::validate() makes them: 1 <= n_terms <= kMaxLossTerms, distinct types, weights
//     finite and >= 0, beta finite and > 0, 0 <= label_smoothing < 0.5 (> 0 with ExoPair), discopop_tau finite
//     and > 0, simpo_gamma and f_alpha finite, f_div ReverseKl unless every term is one of the f-divergence ones
//     (Sigmoid, Cdpo, Robust, Ipo, Hinge, Sft, ExoPair, SigmoidNorm, Discopop);
//   - len_chosen, len_rejected > 0 where a term divides by them (Sft: len_chosen; PerToken Ipo, SigmoidNorm,
//     Simpo, and every term with PairWeighting::Wpo: both) (the loaders refuse empty completions and truncation
//     keeps >= 1 completion token, so every batch row has kSeqTokens >= 1);
//   - offset finite (odpo_offset of scores with score_chosen > score_rejected, which the loaders check with
//     DataOptions::require_score_gap, naming file:line).
// A violated precondition gives a non-finite loss or gradient (division by 0, log of a non-positive number),
// never an out-of-bounds access: the trainer's non-finite checks report it. Non-finite log-probs propagate the
// same way. Terms past kMaxLossTerms are never read.
//
// Stability: log s(x) = -softplus(-x) with softplus(x) = max(x, 0) + log1p(exp(-|x|)) and s evaluated on the side
// that cannot overflow, so the sigmoid-family losses and gradients are finite for every finite z. Discopop's
// exp(-z) m is evaluated as exp(-z - softplus(-z / tau)), finite wherever the product is (the naive product is
// inf * 0 = NaN below z ~ -709). The quadratic losses, ForwardKl and Alpha grow without bound by definition and
// overflow only where their value does.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kernels/seq_stats.h"

#if defined(__CUDACC__)
#define DPO_HD __host__ __device__
#else
#define DPO_HD
#endif

namespace dpo {

// New types go at the end: kNumLossTypes counts them (the backends check a term's type against it).
enum class LossType : int32_t {
  Sigmoid, Ipo, Hinge, Robust, Cdpo, Sft,
  ExoPair, NcaPair, BcoPair, SppoHard, ApoZero, ApoDown, Discopop, SigmoidNorm, Simpo,
  Aot, AotUnpaired,  // batch terms: 0 here, evaluated over a whole micro-batch on the host (is_batch_term)
};
constexpr int kNumLossTypes = static_cast<int>(LossType::AotUnpaired) + 1;
constexpr int kMaxLossTerms = kNumLossTypes;  // one per LossType: validate() refuses a type listed twice

// TRL's f_divergence_type: how a log-ratio becomes the score the f-divergence losses compare (formulas above).
enum class FDivergence : int32_t { ReverseKl, ForwardKl, Js, Alpha };

enum class IpoNorm : int32_t { PerToken, Summed };
// Per-pair weighting of the loss: none, or WPO's (formula above).
enum class PairWeighting : int32_t { None, Wpo };
enum class RefMode : int32_t { WithReference, ReferenceFree };
// Where pair q's two sequences sit in the per-sequence arrays (stats, ref_logp, dseq) of P pairs: Blocked, chosen q
// and rejected P + q (padded batches); Interleaved, chosen 2q and rejected 2q + 1 (batch layouts,
// kernels/batch_layout.h, where sequences are numbered in slot order).
enum class PairRows : int32_t { Blocked, Interleaved };

// Row of pair q's chosen (side 0) or rejected (side 1) sequence.
DPO_HD inline int64_t pair_row(PairRows rows, int64_t P, int64_t q, int side) {
  return rows == PairRows::Interleaved ? 2 * q + side : side * P + q;
}

// Plain parameters, passed by value to the kernel. train/loss.h's pair_loss_params() builds them from a validated
// LossConfig.
struct PairLossParams {
  int32_t n_terms = 0;                  // terms [0, n_terms) are used
  LossType type[kMaxLossTerms] = {};    // loss of term i
  double weight[kMaxLossTerms] = {};    // its weight in the sum
  double beta = 0.1;
  double label_smoothing = 0.0;         // eps of Robust, Cdpo, ExoPair and Simpo
  double discopop_tau = 0.05;           // tau of Discopop (TRL's discopop_tau default)
  double simpo_gamma = 0.5;             // target margin gamma of Simpo (TRL CPOConfig's simpo_gamma default)
  FDivergence f_div = FDivergence::ReverseKl;
  double f_alpha = 0.5;                 // alpha of FDivergence::Alpha (TRL's f_alpha_divergence_coef default)
  IpoNorm ipo_norm = IpoNorm::PerToken;
  RefMode ref = RefMode::WithReference;
  PairWeighting weighting = PairWeighting::None;  // TRL's use_weighting (WPO)
  PairRows rows = PairRows::Blocked;  // the order of the per-sequence arrays (not a loss setting)
};

// One pair's inputs. The lengths are completion token counts (kSeqTokens of kernels/seq_stats.h: exact integers
// stored as floating values).
struct PairLossInput {
  double policy_chosen = 0, policy_rejected = 0;  // summed completion log-probs under the policy (kSeqLogp)
  double ref_chosen = 0, ref_rejected = 0;        // the same under the reference; ignored with ReferenceFree
  double len_chosen = 1, len_rejected = 1;        // used by Sft, PerToken Ipo, SigmoidNorm and Simpo only
  double offset = 0;                              // ODPO offset (Sigmoid term only)
  // Metrics only (never enter the loss): kSeqLogitSum of each row, for TRL's logits/* (kSumLogitChosen below).
  double logit_sum_chosen = 0, logit_sum_rejected = 0;
  // kSeqWpoLogp of each row: WPO's aligned log-prob sums (PairWeighting::Wpo only).
  double wpo_chosen = 0, wpo_rejected = 0;
};

struct PairLossOutput {
  double loss = 0;                                // sum_i weight_i * term[i], not normalised
  double d_chosen = 0, d_rejected = 0;            // d loss / d policy_chosen, d policy_rejected
  double reward_chosen = 0, reward_rejected = 0;  // beta * (policy - ref)
  double term[kMaxLossTerms] = {};                // unweighted term losses in params order; 0 past n_terms
};

namespace pair_math {

// Written with the comparisons of std::max(x, 0.0) so that a NaN argument gives the same result as before.
DPO_HD inline double softplus(double x) { return (x < 0.0 ? 0.0 : x) + ::log1p(::exp(-::fabs(x))); }

DPO_HD inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + ::exp(-x));
  const double e = ::exp(x);
  return e / (1.0 + e);
}

// The f-divergence score S(x) of a log-ratio x and its derivative dS/dx (formulas at the top of this file).
struct Score {
  double value, deriv;
};
DPO_HD inline Score f_score(FDivergence f, double alpha, double x) {
  switch (f) {
    case FDivergence::ReverseKl:
      break;
    case FDivergence::ForwardKl:
      return {-::expm1(-x), ::exp(-x)};
    case FDivergence::Js:
      return {0.69314718055994530942 - softplus(-x), sigmoid(-x)};  // log 2 + log s(x)
    case FDivergence::Alpha: {
      const double am1 = alpha - 1.0;
      if (::fabs(am1) < 1e-6) break;  // TRL's limit case: reverse KL
      const double t = am1 * x;
      constexpr double kClamp = 80.0;  // TRL clamps (a-1) x at 80 before exp (float32 / bf16 range)
      if (t > kClamp) return {::expm1(kClamp) / am1, 0.0};
      return {::expm1(t) / am1, ::exp(t)};
    }
  }
  return {x, 1.0};
}

}  // namespace pair_math

// The losses that couple the pairs of a micro-batch (pair_loss_eval gives them 0; train/loss.h's batch_loss).
DPO_HD inline bool is_batch_term(LossType t) { return t == LossType::Aot || t == LossType::AotUnpaired; }

// The f-divergence losses: the types whose TRL form compares the scores Sc, Sr (the rest take the plain log-ratios
// and are refused with a non-default f_div, as TRL does; Sft takes neither but TRL allows it).
DPO_HD inline bool uses_f_divergence(LossType t) {
  switch (t) {
    case LossType::Sigmoid: case LossType::Cdpo: case LossType::Robust: case LossType::Ipo: case LossType::Hinge:
    case LossType::Sft: case LossType::ExoPair: case LossType::SigmoidNorm: case LossType::Discopop:
      return true;
    default:
      return false;
  }
}

// ODPO's offset Delta_r = alpha * log(score_chosen - score_rejected) (Amini et al. 2024), 0 when alpha <= 0. A
// constant of the data (not of the model), computed once per pair when a batch is built.
DPO_HD inline double odpo_offset(double alpha, double score_chosen, double score_rejected) {
  return alpha > 0 ? alpha * ::log(score_chosen - score_rejected) : 0.0;
}

// The pair's loss, gradients and reward metrics (formulas at the top of this file).
DPO_HD inline PairLossOutput pair_loss_eval(const PairLossParams& p, const PairLossInput& in) {
  const bool ref_free = p.ref == RefMode::ReferenceFree;
  const double ref_c = ref_free ? 0.0 : in.ref_chosen;
  const double ref_r = ref_free ? 0.0 : in.ref_rejected;
  const double c = in.policy_chosen - ref_c;  // dc / dpolicy_chosen = 1, likewise r
  const double r = in.policy_rejected - ref_r;
  const pair_math::Score sc = pair_math::f_score(p.f_div, p.f_alpha, c);
  const pair_math::Score sr = pair_math::f_score(p.f_div, p.f_alpha, r);
  const double delta = sc.value - sr.value;  // dDelta/dSc = 1, dDelta/dSr = -1
  const double beta = p.beta;
  const double eps = p.label_smoothing;
  // WPO's pair weight, a constant of the pair (no derivative): exp of the two per-token mean aligned log-probs.
  const double pw = p.weighting == PairWeighting::Wpo
                        ? ::exp(in.wpo_chosen / in.len_chosen + in.wpo_rejected / in.len_rejected)
                        : 1.0;

  PairLossOutput out;
  out.reward_chosen = beta * c;
  out.reward_rejected = beta * r;

  const int n = p.n_terms < kMaxLossTerms ? p.n_terms : kMaxLossTerms;
  for (int i = 0; i < n; ++i) {
    // Term loss and its derivatives: g_sc / g_sr w.r.t. the scores Sc / Sr (the f-divergence terms), g_c / g_r
    // w.r.t. the log-ratios c / r, equal to those w.r.t. policy_chosen / policy_rejected (the others).
    double value = 0, g_sc = 0, g_sr = 0, g_c = 0, g_r = 0;
    switch (p.type[i]) {
      case LossType::Sigmoid: {
        const double z = beta * delta - in.offset;
        value = pair_math::softplus(-z);              // -log s(z)
        const double dz = -pair_math::sigmoid(-z);    // d/dz
        g_sc = dz * beta;
        g_sr = -dz * beta;
        break;
      }
      case LossType::Cdpo: {
        const double z = beta * delta;
        value = (1 - eps) * pair_math::softplus(-z) + eps * pair_math::softplus(z);
        const double dz = -(1 - eps) * pair_math::sigmoid(-z) + eps * pair_math::sigmoid(z);
        g_sc = dz * beta;
        g_sr = -dz * beta;
        break;
      }
      case LossType::Robust: {
        const double z = beta * delta;
        const double k = 1.0 / (1 - 2 * eps);
        value = ((1 - eps) * pair_math::softplus(-z) - eps * pair_math::softplus(z)) * k;
        const double dz = (-(1 - eps) * pair_math::sigmoid(-z) - eps * pair_math::sigmoid(z)) * k;
        g_sc = dz * beta;
        g_sr = -dz * beta;
        break;
      }
      case LossType::Ipo: {
        double dc_ds = 1, dr_ds = 1;  // derivative of Sc' (Sr') w.r.t. Sc (Sr)
        if (p.ipo_norm == IpoNorm::PerToken) {
          dc_ds = 1.0 / in.len_chosen;
          dr_ds = 1.0 / in.len_rejected;
        }
        const double d = sc.value * dc_ds - sr.value * dr_ds - 1.0 / (2 * beta);
        value = d * d;
        g_sc = 2 * d * dc_ds;
        g_sr = -2 * d * dr_ds;
        break;
      }
      case LossType::Hinge: {
        const double z = beta * delta;
        const double h = 1 - z;
        value = 0.0 < h ? h : 0.0;             // std::max(0.0, 1 - z)
        const double dz = z < 1 ? -1.0 : 0.0;  // subgradient 0 at the kink z == 1
        g_sc = dz * beta;
        g_sr = -dz * beta;
        break;
      }
      case LossType::Sft: {
        const double inv = 1.0 / in.len_chosen;
        value = -in.policy_chosen * inv;
        g_c = -inv;
        break;
      }
      case LossType::ExoPair: {
        // d/dz = s(z) s(-z) (z - log((1-eps)/eps)), from d log s(z)/dz = s(-z) and log s(z) - log s(-z) = z.
        const double z = beta * delta;
        const double qw = pair_math::sigmoid(z), ql = pair_math::sigmoid(-z);
        const double log_pw = ::log1p(-eps), log_pl = ::log(eps);
        value = qw * (-pair_math::softplus(-z) - log_pw) + ql * (-pair_math::softplus(z) - log_pl);
        const double dz = qw * ql * (z - log_pw + log_pl);
        g_sc = dz * beta;
        g_sr = -dz * beta;
        break;
      }
      case LossType::SigmoidNorm: {
        const double ic = 1.0 / in.len_chosen, ir = 1.0 / in.len_rejected;
        const double z = beta * (sc.value * ic - sr.value * ir);
        value = pair_math::softplus(-z);
        const double dz = -pair_math::sigmoid(-z);
        g_sc = dz * beta * ic;
        g_sr = -dz * beta * ir;
        break;
      }
      case LossType::Discopop: {
        // m = s(z / tau), 1 - m = s(-z / tau), dm/dz = m (1 - m) / tau; e = exp(-z) m = exp(-z - softplus(-z/tau)).
        const double z = beta * delta;
        const double tau = p.discopop_tau;
        const double m = pair_math::sigmoid(z / tau), m1 = pair_math::sigmoid(-z / tau);
        const double logistic = pair_math::softplus(-z);
        const double e = ::exp(-z - pair_math::softplus(-z / tau));
        value = logistic * m1 + e;
        const double dz = -pair_math::sigmoid(-z) * m1 - logistic * m * m1 / tau + e * (m1 / tau - 1.0);
        g_sc = dz * beta;
        g_sr = -dz * beta;
        break;
      }
      case LossType::NcaPair: {
        const double zc = beta * c, zr = beta * r;
        value = pair_math::softplus(-zc) + 0.5 * pair_math::softplus(zc) + 0.5 * pair_math::softplus(zr);
        g_c = beta * (-pair_math::sigmoid(-zc) + 0.5 * pair_math::sigmoid(zc));
        g_r = beta * 0.5 * pair_math::sigmoid(zr);
        break;
      }
      case LossType::BcoPair: {
        const double zc = beta * c, zr = beta * r;
        value = pair_math::softplus(-zc) + pair_math::softplus(zr);
        g_c = -beta * pair_math::sigmoid(-zc);
        g_r = beta * pair_math::sigmoid(zr);
        break;
      }
      case LossType::SppoHard: {
        const double h = 0.5 / beta;
        const double dw = c - h, dl = r + h;
        value = dw * dw + dl * dl;
        g_c = 2 * dw;
        g_r = 2 * dl;
        break;
      }
      case LossType::ApoZero: {
        // 1 - s(x) is written s(-x): the same value without the cancellation near s(x) = 1.
        const double zc = beta * c, zr = beta * r;
        const double pc = pair_math::sigmoid(zc), qc = pair_math::sigmoid(-zc);
        const double pr = pair_math::sigmoid(zr), qr = pair_math::sigmoid(-zr);
        value = qc + pr;
        g_c = -beta * pc * qc;
        g_r = beta * pr * qr;
        break;
      }
      case LossType::ApoDown: {
        const double zc = beta * c, w = beta * (c - r);
        const double pc = pair_math::sigmoid(zc), qc = pair_math::sigmoid(-zc);
        const double pw = pair_math::sigmoid(w), qw = pair_math::sigmoid(-w);
        value = pc + qw;
        g_c = beta * (pc * qc - pw * qw);
        g_r = beta * pw * qw;
        break;
      }
      case LossType::Simpo: {
        const double ic = 1.0 / in.len_chosen, ir = 1.0 / in.len_rejected;
        const double u = beta * (in.policy_chosen * ic - in.policy_rejected * ir) - p.simpo_gamma;
        value = (1 - eps) * pair_math::softplus(-u) + eps * pair_math::softplus(u);
        const double du = -(1 - eps) * pair_math::sigmoid(-u) + eps * pair_math::sigmoid(u);
        g_c = du * beta * ic;
        g_r = -du * beta * ir;
        break;
      }
      case LossType::Aot:
      case LossType::AotUnpaired:
        break;  // batch terms (is_batch_term): 0 per pair
    }
    // Only the f-divergence terms set g_sc / g_sr. A zero one adds nothing, even where dS/dx overflowed (ForwardKl
    // at a log-ratio below about -709: Sft, or Hinge past its kink, must not turn 0 * inf into NaN).
    double d_c = g_c + (g_sc != 0.0 ? g_sc * sc.deriv : 0.0);
    double d_r = g_r + (g_sr != 0.0 ? g_sr * sr.deriv : 0.0);
    if (p.weighting == PairWeighting::Wpo) {
      value *= pw;
      d_c *= pw;
      d_r *= pw;
    }
    out.term[i] = value;
    out.loss += p.weight[i] * value;
    out.d_chosen += p.weight[i] * d_c;
    out.d_rejected += p.weight[i] * d_r;
  }
  return out;
}

// The batch sums of a preference loss: one row of kPairSumsWidth doubles, unnormalised (sums over pairs, so that
// micro-batches and ranks reduce by addition; divide by the global pair count to report TRL's means).
enum PairSum : int64_t {
  kSumLoss = 0,            // sum of loss
  kSumRewardChosen = 1,    // sum of reward_chosen
  kSumRewardRejected = 2,  // sum of reward_rejected
  kSumAccuracy = 3,        // count of reward_chosen > reward_rejected
  kSumMargin = 4,          // sum of reward_chosen - reward_rejected
  kSumLogpChosen = 5,      // sum of policy_chosen
  kSumLogpRejected = 6,    // sum of policy_rejected
  kSumTerm = 7,            // kSumTerm + i: sum of term[i] (unweighted), i < kMaxLossTerms
  // The completion tokens and logit sums of the two sides (kSeqTokens, kSeqLogitSum of kernels/seq_stats.h):
  // TRL's logits/chosen = kSumLogitChosen / (V * kSumTokensChosen), likewise rejected.
  kSumTokensChosen = kSumTerm + kMaxLossTerms,
  kSumTokensRejected = kSumTokensChosen + 1,
  kSumLogitChosen = kSumTokensChosen + 2,
  kSumLogitRejected = kSumTokensChosen + 3,
  kPairSumsWidth = kSumTokensChosen + 4,  // the row width; keep last
};

// sums[k] += pair's contribution to column k (every column, terms past n_terms add 0).
DPO_HD inline void pair_sums_add(double* sums, const PairLossInput& in, const PairLossOutput& o) {
  sums[kSumLoss] += o.loss;
  sums[kSumRewardChosen] += o.reward_chosen;
  sums[kSumRewardRejected] += o.reward_rejected;
  sums[kSumAccuracy] += o.reward_chosen > o.reward_rejected ? 1.0 : 0.0;
  sums[kSumMargin] += o.reward_chosen - o.reward_rejected;
  sums[kSumLogpChosen] += in.policy_chosen;
  sums[kSumLogpRejected] += in.policy_rejected;
  for (int i = 0; i < kMaxLossTerms; ++i) sums[kSumTerm + i] += o.term[i];
  sums[kSumTokensChosen] += in.len_chosen;
  sums[kSumTokensRejected] += in.len_rejected;
  sums[kSumLogitChosen] += in.logit_sum_chosen;
  sums[kSumLogitRejected] += in.logit_sum_rejected;
}

// Pair q's input read from the log-prob forward's per-sequence rows (kernels/seq_stats.h) of a preference batch of
// P pairs, rows [chosen 0..P-1, rejected P..2P-1] (or interleaved, `rows`): stats [2P, kSeqStatsWidth], ref_logp
// [2P] the reference's summed log-probs in the same row order (null: 0, for ReferenceFree), offset [P] the ODPO
// offsets (null: 0).
template <class F>
DPO_HD inline PairLossInput pair_input_at(const F* stats, const F* ref_logp, const F* offset, int64_t P, int64_t q,
                                          PairRows rows = PairRows::Blocked) {
  const int64_t ic = pair_row(rows, P, q, 0), ir = pair_row(rows, P, q, 1);
  const F* rc = stats + ic * kSeqStatsWidth;
  const F* rr = stats + ir * kSeqStatsWidth;
  PairLossInput in;
  in.policy_chosen = static_cast<double>(rc[kSeqLogp]);
  in.policy_rejected = static_cast<double>(rr[kSeqLogp]);
  in.len_chosen = static_cast<double>(rc[kSeqTokens]);
  in.len_rejected = static_cast<double>(rr[kSeqTokens]);
  in.ref_chosen = ref_logp ? static_cast<double>(ref_logp[ic]) : 0.0;
  in.ref_rejected = ref_logp ? static_cast<double>(ref_logp[ir]) : 0.0;
  in.offset = offset ? static_cast<double>(offset[q]) : 0.0;
  in.logit_sum_chosen = static_cast<double>(rc[kSeqLogitSum]);
  in.logit_sum_rejected = static_cast<double>(rr[kSeqLogitSum]);
  in.wpo_chosen = static_cast<double>(rc[kSeqWpoLogp]);
  in.wpo_rejected = static_cast<double>(rr[kSeqWpoLogp]);
  return in;
}

}  // namespace dpo
