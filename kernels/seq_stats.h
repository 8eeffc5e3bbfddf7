// What the LM-head log-prob forward emits per sequence: one row of kSeqStatsWidth scalars per sequence, defined
// here once for the CPU twin (kernels/logprob_cpu.cpp), the CUDA kernel (kernels/logprob.cu), the backends
// (runtime/backend.h) and their readers (model/gpt2.h, train/trainer.cpp).
//
// Layout: seq_stats[B, kSeqStatsWidth], row-major, dtype that of the per-sequence scalars (grad_dtype of the
// activation dtype: F32 for F32 and BF16 activations, F64 for the CPU's F64). Row b, with m[b,t] = (w[b,t] != 0)
// the completion mask of the weights w (kernels/logprob.h) and lp[b,t] the token log-prob:
//
//   column             value                                                    used for
//   kSeqLogp           sum_t w[b,t] * lp[b,t]          (bitwise seq_logp[b])    the losses, logps/*
//   kSeqTokens         sum_t m[b,t]                    (an integer, exact)      completion length; logits/* denominator
//   kSeqLogitSum       sum_t m[b,t] * sum_{v<V} logits[b,t,v]                   TRL's logits/* (divide by V * tokens)
//   kSeqWpoLogp        sum_t m[b,t] * (lp[b,t] - log sum_v p[b,t,v]^2)           WPO's weight (use_weighting)
//                      p = softmax(logits[b,t,:]); log sum_v p^2 = lse(2x) - 2 lse(x), TRL's log_sum_sq_probs: the
//                      token's "aligned" log-prob of Zhou et al. 2024, eq. 2
//
// Every column is written (=) for every sequence, 0 for a sequence without completion tokens. Only vocabulary
// columns [0, V) of a logits row enter kSeqLogitSum (the padding of a padded row is never read) and only rows with
// m = 1 (the mask, unweighted: TRL averages the logits over completion_mask.bool() positions). The logit sum is
// taken in the pass that reads the row for its log-sum-exp, so it costs one add per element; it is accumulated
// in double on the CPU, and on the GPU in fp32 per row (a fixed reduction tree) then in double per sequence in a
// fixed order: bitwise reproducible, no atomics.
//
// kSeqWpoLogp's sum of exp(2(x - max)) runs in the same online (max, sum) pass as the log-sum-exp, as the square of
// each exp(x - max) term (one multiply-add per element, no extra exponential). Like the other statistics it uses
// the unweighted mask m (TRL's aligned log-probs are masked by the completion mask, not by LD-DPO's weights).
// A later statistic appends a column before kSeqStatsWidth and one term to each kernel's row pass and per-sequence
// sum; existing columns never move, so readers indexing by name keep working. LD-DPO (ld_alpha) needs none: it is
// the weights w themselves (train/data.h apply_ld_alpha). Per-token values (the token log-probs themselves) are the
// token_logp output, [B, T].
#pragma once

#include <cstdint>

namespace dpo {

enum SeqStat : int64_t {
  kSeqLogp = 0,
  kSeqTokens = 1,
  kSeqLogitSum = 2,
  kSeqWpoLogp = 3,
  kSeqStatsWidth = 4,  // the row width; keep last
};

}  // namespace dpo
