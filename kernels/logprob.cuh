// Fused log-softmax + target gather + per-sequence masked sum on the GPU; the contract of the CPU twin
// (kernels/logprob.h):
//   logits[B,T,V], targets[B,T] int32, weights[B,T] (completion mask; any real, 0 = ignored).
//   lp[b,t] = logits[b,t,targets[b,t]] - logsumexp(logits[b,t,:])        where weights[b,t] != 0, else 0
//   forward : seq_logp[B] = sum_t weights[b,t] * lp[b,t]                   (=)
//             token_logp[B,T] = lp (skipped if null)                       (=)
//             seq_stats[B, kSeqStatsWidth] (skipped if null)               (=)  kernels/seq_stats.h
//   backward: dlogits[b,t,:] = dseq[b] * weights[b,t] * (onehot(targets[b,t]) - softmax(logits[b,t,:]))   (=)
//             rows with weight 0 are set to 0. dlogits may alias logits (in place); no other aliasing.
// Storage: logits and dlogits are float or bf16 (the same type); weights, seq_logp, token_logp and dseq are always
// float (per-token / per-sequence scalars, runtime/backend.h). bf16 logits are read exactly; the log-sum-exp is fp32
// (online max / sum of exponentials), the per-sequence sum double, and each bf16 dlogits element is rounded once.
// seq_stats (float): the logit sum of a row is an fp32 sum taken in the row's (max, sum) pass (fixed tree), and so
// is the sum of squared exponentials behind kSeqWpoLogp (log sum p^2 = log s2 - 2 log s, s2 = sum exp(2(x - max)));
// the per-sequence sums of the stats are double in a fixed order, like seq_logp (whose value kSeqLogp repeats
// bitwise).
// Targets: the CPU twin throws on a target outside [0, V) with a non-zero weight; here the data pipeline is trusted
// to have validated the ids (no device-to-host sync to check them). Such a target never causes an out-of-bounds
// access: its lp is NaN (so seq_logp[b] is NaN) and its dlogits row is all NaN, which the trainer's non-finite
// loss/gradient checks report. Targets with weight 0 are never read.
// Row stride (kernels/logprob.h): the forms with `ld` read logits and write dlogits as B*T rows of ld >= V
// elements; columns [V, ld) are padding, never read and never written (they may hold NaN). ld a multiple of 16
// bytes keeps every row on the 16-byte vector path; any ld >= V is correct. The forms without `ld` are ld = V.
// Deterministic: fixed reduction trees, no atomics; repeated calls give bitwise-equal results.
// The forward takes a stream-ordered scratch from ctx.alloc: B*T floats when token_logp is null, 2*B*T more when
// seq_stats is requested (the rows' logit sums and aligned log-probs).
//
// Per-sequence slot ranges (the _segments forms; contract in kernels/logprob.h): seg[S,2] int32 on the device,
// sequence s's slots [seg[s,0], seg[s,1]) of the B*T slots; seq_logp, dseq [S], seq_stats [S, kSeqStatsWidth],
// token_logp [B,T] (0 for a slot in no range). The same row kernels and the same per-sequence sum (thread j of a
// sequence's block adds slots lo + j, lo + j + 256, ... in double, then the fixed tree): with seg[s] =
// [s*T, (s+1)*T) the results are bitwise those of logprob_forward / logprob_backward. Extra cost: one int32 per
// slot of scratch (the slot's sequence, from a binary search over the range ends) in each direction.
// The ranges are not checked here (that needs a device-to-host sync); the caller builds them (train/data.h) and the
// CPU twin checks them. With invalid ranges no access leaves [0, B*T) or [0, S): a range is clamped to [0, B*T), a
// slot's sequence is found by a binary search that only reads seg, and the results are unspecified but
// deterministic (an unsorted or overlapping set of ranges may score a slot in one range and sum it in another).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/seq_stats.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo::cuda {

void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats, const float* logits,
                     const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V, int64_t ld);
void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats,
                     const __nv_bfloat16* logits, const int32_t* targets, const float* weights, int64_t B, int64_t T,
                     int64_t V, int64_t ld);

// Without the per-sequence statistics.
inline void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, const float* logits,
                            const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V,
                            int64_t ld) {
  logprob_forward(ctx, seq_logp, token_logp, nullptr, logits, targets, weights, B, T, V, ld);
}
inline void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, const __nv_bfloat16* logits,
                            const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V,
                            int64_t ld) {
  logprob_forward(ctx, seq_logp, token_logp, nullptr, logits, targets, weights, B, T, V, ld);
}

void logprob_backward(CudaContext& ctx, float* dlogits, const float* logits, const int32_t* targets,
                      const float* weights, const float* dseq, int64_t B, int64_t T, int64_t V, int64_t ld);
void logprob_backward(CudaContext& ctx, __nv_bfloat16* dlogits, const __nv_bfloat16* logits, const int32_t* targets,
                      const float* weights, const float* dseq, int64_t B, int64_t T, int64_t V, int64_t ld);

void logprob_forward_segments(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats,
                              const float* logits, const int32_t* targets, const float* weights, const int32_t* seg,
                              int64_t S, int64_t B, int64_t T, int64_t V, int64_t ld);
void logprob_forward_segments(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats,
                              const __nv_bfloat16* logits, const int32_t* targets, const float* weights,
                              const int32_t* seg, int64_t S, int64_t B, int64_t T, int64_t V, int64_t ld);
void logprob_backward_segments(CudaContext& ctx, float* dlogits, const float* logits, const int32_t* targets,
                               const float* weights, const int32_t* seg, const float* dseq, int64_t S, int64_t B,
                               int64_t T, int64_t V, int64_t ld);
void logprob_backward_segments(CudaContext& ctx, __nv_bfloat16* dlogits, const __nv_bfloat16* logits,
                               const int32_t* targets, const float* weights, const int32_t* seg, const float* dseq,
                               int64_t S, int64_t B, int64_t T, int64_t V, int64_t ld);

// Dense rows (ld = V).
inline void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, const float* logits,
                            const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V) {
  logprob_forward(ctx, seq_logp, token_logp, logits, targets, weights, B, T, V, V);
}
inline void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, const __nv_bfloat16* logits,
                            const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V) {
  logprob_forward(ctx, seq_logp, token_logp, logits, targets, weights, B, T, V, V);
}
inline void logprob_backward(CudaContext& ctx, float* dlogits, const float* logits, const int32_t* targets,
                             const float* weights, const float* dseq, int64_t B, int64_t T, int64_t V) {
  logprob_backward(ctx, dlogits, logits, targets, weights, dseq, B, T, V, V);
}
inline void logprob_backward(CudaContext& ctx, __nv_bfloat16* dlogits, const __nv_bfloat16* logits,
                             const int32_t* targets, const float* weights, const float* dseq, int64_t B, int64_t T,
                             int64_t V) {
  logprob_backward(ctx, dlogits, logits, targets, weights, dseq, B, T, V, V);
}

}  // namespace dpo::cuda
