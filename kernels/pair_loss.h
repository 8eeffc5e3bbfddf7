// The preference loss of one pair, written once for the host and the device: train/loss.cpp (the trainer's CPU
// path), the CPU backend's preference_loss (runtime/cpu_backend.cpp) and the CUDA kernel (kernels/pair_loss.cu)
// all evaluate pair_loss_eval() below, so the CPU and GPU paths use the same formulas from one source. They agree
// to rounding, not bitwise: nvcc contracts a * b + c into an FMA where the host compiler does not, and the device's
// exp / log1p differ from glibc's by an ulp or so.
//
// Notation (train/loss.h has the sources of the formulas): c = policy_chosen - ref_chosen, r = policy_rejected -
// ref_rejected (ref = 0 with RefMode::ReferenceFree), D = c - r, z = beta * D, eps = label_smoothing, s = sigmoid.
//   Sigmoid  -log s(z - offset)          offset: the ODPO offset of the pair (odpo_offset below; 0 when off)
//   Cdpo     -(1-eps) log s(z) - eps log s(-z)
//   Robust   [-(1-eps) log s(z) + eps log s(-z)] / (1-2eps)
//   Ipo      (c' - r' - 1/(2 beta))^2    c' = c / len_chosen, r' = r / len_rejected with IpoNorm::PerToken (TRL's
//                                        ipo); c' = c, r' = r with IpoNorm::Summed (the IPO paper)
//   Hinge    max(0, 1 - z)               subgradient 0 at z == 1
//   Sft      -policy_chosen / len_chosen  (RPO's NLL term; no reference, no beta)
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
//     finite and >= 0, beta finite and > 0, 0 <= label_smoothing < 0.5;
//   - len_chosen > 0 when an Sft or a PerToken Ipo term is present, len_rejected > 0 with a PerToken Ipo term
//     (the loaders refuse empty completions and truncation keeps >= 1 completion token, so every batch row has
//     kSeqTokens >= 1);
//   - offset finite (odpo_offset of scores with score_chosen > score_rejected, which the loaders check with
//     DataOptions::require_score_gap, naming file:line).
// A violated precondition gives a non-finite loss or gradient (division by 0, log of a non-positive number),
// never an out-of-bounds access: the trainer's non-finite checks report it. Non-finite log-probs propagate the
// same way. Terms past kMaxLossTerms are never read.
//
// Stability: log s(x) = -softplus(-x) with softplus(x) = max(x, 0) + log1p(exp(-|x|)) and s evaluated on the side
// that cannot overflow, so the sigmoid-family losses and gradients are finite for every finite z.
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

enum class LossType : int32_t { Sigmoid, Ipo, Hinge, Robust, Cdpo, Sft };
constexpr int kMaxLossTerms = 6;  // one per LossType: validate() refuses a type listed twice

enum class IpoNorm : int32_t { PerToken, Summed };
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
  double label_smoothing = 0.0;         // eps of Robust and Cdpo
  IpoNorm ipo_norm = IpoNorm::PerToken;
  RefMode ref = RefMode::WithReference;
  PairRows rows = PairRows::Blocked;  // the order of the per-sequence arrays (not a loss setting)
};

// One pair's inputs. The lengths are completion token counts (kSeqTokens of kernels/seq_stats.h: exact integers
// stored as floating values).
struct PairLossInput {
  double policy_chosen = 0, policy_rejected = 0;  // summed completion log-probs under the policy (kSeqLogp)
  double ref_chosen = 0, ref_rejected = 0;        // the same under the reference; ignored with ReferenceFree
  double len_chosen = 1, len_rejected = 1;        // used by Sft and PerToken Ipo only
  double offset = 0;                              // ODPO offset (Sigmoid term only)
  // Metrics only (never enter the loss): kSeqLogitSum of each row, for TRL's logits/* (kSumLogitChosen below).
  double logit_sum_chosen = 0, logit_sum_rejected = 0;
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

}  // namespace pair_math

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
  const double c = in.policy_chosen - ref_c;
  const double r = in.policy_rejected - ref_r;
  const double delta = c - r;  // dDelta/dpolicy_chosen = 1, dDelta/dpolicy_rejected = -1
  const double beta = p.beta;
  const double eps = p.label_smoothing;

  PairLossOutput out;
  out.reward_chosen = beta * c;
  out.reward_rejected = beta * r;

  const int n = p.n_terms < kMaxLossTerms ? p.n_terms : kMaxLossTerms;
  for (int i = 0; i < n; ++i) {
    double value = 0, d_c = 0, d_r = 0;  // term loss and its derivatives w.r.t. policy_chosen / policy_rejected
    switch (p.type[i]) {
      case LossType::Sigmoid: {
        const double z = beta * delta - in.offset;
        value = pair_math::softplus(-z);          // -log s(z)
        const double dz = -pair_math::sigmoid(-z);  // d/dz
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Cdpo: {
        const double z = beta * delta;
        value = (1 - eps) * pair_math::softplus(-z) + eps * pair_math::softplus(z);
        const double dz = -(1 - eps) * pair_math::sigmoid(-z) + eps * pair_math::sigmoid(z);
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Robust: {
        const double z = beta * delta;
        const double k = 1.0 / (1 - 2 * eps);
        value = ((1 - eps) * pair_math::softplus(-z) - eps * pair_math::softplus(z)) * k;
        const double dz = (-(1 - eps) * pair_math::sigmoid(-z) - eps * pair_math::sigmoid(z)) * k;
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Ipo: {
        double dc_dp = 1, dr_dp = 1;  // derivative of c' (r') w.r.t. the policy log-prob
        if (p.ipo_norm == IpoNorm::PerToken) {
          dc_dp = 1.0 / in.len_chosen;
          dr_dp = 1.0 / in.len_rejected;
        }
        const double d = c * dc_dp - r * dr_dp - 1.0 / (2 * beta);
        value = d * d;
        d_c = 2 * d * dc_dp;
        d_r = -2 * d * dr_dp;
        break;
      }
      case LossType::Hinge: {
        const double z = beta * delta;
        const double h = 1 - z;
        value = 0.0 < h ? h : 0.0;  // std::max(0.0, 1 - z)
        const double dz = z < 1 ? -1.0 : 0.0;  // subgradient 0 at the kink z == 1
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Sft: {
        const double inv = 1.0 / in.len_chosen;
        value = -in.policy_chosen * inv;
        d_c = -inv;
        d_r = 0;
        break;
      }
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
  return in;
}

}  // namespace dpo
