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
//
// Every column is written (=) for every sequence, 0 for a sequence without completion tokens. Only vocabulary
// columns [0, V) of a logits row enter kSeqLogitSum (the padding of a padded row is never read) and only rows with
// m = 1 (the mask, unweighted: TRL averages the logits over completion_mask.bool() positions). The logit sum is
// taken in the pass that reads the row for its log-sum-exp, so it costs one add per element; it is accumulated
// in double on the CPU, and on the GPU in fp32 per row (a fixed reduction tree) then in double per sequence in a
// fixed order: bitwise reproducible, no atomics.
//
// Room for the later losses (append a column before kSeqStatsWidth and one term to each kernel's row pass and
// per-sequence sum; existing columns never move, so readers indexing by name keep working):
//   - WPO (use_weighting): sum_t m * (lp - (lse(2x) - 2 lse(x))), the per-token "aligned" log-prob; lse(2x) is one
//     more running sum in the same online (max, sum) pass (exp(2(x - max)) next to exp(x - max)).
//   - LD-DPO (ld_alpha): the log-prob of the tail beyond a per-pair shared length, sum_t m * [pos > shared] * lp;
//     the shared length is an input per sequence, the split a per-token predicate in the per-sequence sum.
//   - per-token values (the token log-probs themselves) are the token_logp output, [B, T].
#pragma once

#include <cstdint>

namespace dpo {

enum SeqStat : int64_t {
  kSeqLogp = 0,
  kSeqTokens = 1,
  kSeqLogitSum = 2,
  kSeqStatsWidth = 3,  // the row width; keep last
};

}  // namespace dpo
