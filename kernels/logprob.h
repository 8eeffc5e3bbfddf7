// Log-softmax + gather of the target token + per-sequence masked sum.
//   logits[B,T,V], targets[B,T] int32, weights[B,T] (completion mask; 0 or 1 in practice, any real allowed).
//   lp[b,t] = logits[b,t,targets[b,t]] - logsumexp(logits[b,t,:])        where weights[b,t] != 0, else 0
//   forward : seq_logp[B] = sum_t weights[b,t] * lp[b,t]                   (=)
//             token_logp[B,T] = lp (skipped if null)                       (=)
//             seq_stats[B, kSeqStatsWidth] (skipped if null)               (=)  the per-sequence statistics of
//             kernels/seq_stats.h: the seq_logp value, the completion token count, the sum of the logits, WPO's
//             aligned log-prob sum.
//   backward: dlogits[b,t,:] = dseq[b] * weights[b,t] * (onehot(targets[b,t]) - softmax(logits[b,t,:]))   (=)
//             rows with weight 0 are set to 0. dlogits may alias logits (in place).
// Row stride: the forms with `ld` read logits and write dlogits as B*T rows of ld >= V elements (row (b,t) starts
// at (b*T + t) * ld); columns [0, V) are the vocabulary, columns [V, ld) are padding that is never read (it may
// hold anything, NaN included) and never written. The forms without `ld` are ld = V.
// Targets where weights[b,t] == 0 are ignored (padding may hold any value, e.g. -1).
// A target outside [0, V) where the weight is non-zero throws dpo::Error before anything is written.
// The log-sum-exp, the per-sequence sums and the logit sums are computed in double for T=float as well as T=double;
// the logit sum of a row is taken in the pass that sums its exponentials (no extra pass over the row).
//
// Per-sequence slot ranges (the batch layouts of kernels/batch_layout.h, where a row may hold several sequences):
// the `_segments` forms take seg[S,2] int32, sequence s's slots being the flat range [seg[s,0], seg[s,1]) of the
// B*T slots (slot = b*T + t), and score each slot against its own sequence:
//   lp[i]  as above for a slot i in a range, and 0 (logits never read, target ignored) for a slot in no range
//   forward : seq_logp[S] = sum over i in [seg[s,0], seg[s,1]) of weights[i] * lp[i], in slot order   (=)
//             token_logp[B,T] = lp (skipped if null)                                               (=)
//             seq_stats[S, kSeqStatsWidth] (skipped if null; kernels/seq_stats.h over the sequence's slots)   (=)
//   backward: dlogits row i = dseq[s] * weights[i] * (onehot(targets[i]) - softmax(logits row i)) for i in range s;
//             rows with weight 0 and rows of slots in no range: columns [0, V) set to 0                (=)
//             dlogits may alias logits.
// Ranges must satisfy 0 <= seg[s,0] <= seg[s,1] <= B*T and seg[s,1] <= seg[s+1,0] (sorted, non-overlapping; an
// empty range is a sequence without scored slots: all its outputs 0). Anything else throws dpo::Error naming the
// range before anything is written; so does a target outside [0, V) with a non-zero weight in a range. Sequence
// sums run over the range in slot order, as the row sums of the forms above run over t: with seg[s] =
// [s*T, (s+1)*T) (S = B) the results are bitwise those of logprob_forward / logprob_backward (which are this with
// those ranges).
#pragma once
#include <cstdint>

#include "kernels/seq_stats.h"

namespace dpo::cpu {

template <class T>
void logprob_forward(T* seq_logp, T* token_logp, T* seq_stats, const T* logits, const int32_t* targets,
                     const T* weights, int64_t B, int64_t T_, int64_t V, int64_t ld);

// Without the per-sequence statistics.
template <class T>
inline void logprob_forward(T* seq_logp, T* token_logp, const T* logits, const int32_t* targets, const T* weights,
                            int64_t B, int64_t T_, int64_t V, int64_t ld) {
  logprob_forward<T>(seq_logp, token_logp, static_cast<T*>(nullptr), logits, targets, weights, B, T_, V, ld);
}

template <class T>
void logprob_backward(T* dlogits, const T* logits, const int32_t* targets, const T* weights, const T* dseq,
                      int64_t B, int64_t T_, int64_t V, int64_t ld);

template <class T>
void logprob_forward_segments(T* seq_logp, T* token_logp, T* seq_stats, const T* logits, const int32_t* targets,
                              const T* weights, const int32_t* seg, int64_t S, int64_t B, int64_t T_, int64_t V,
                              int64_t ld);

template <class T>
void logprob_backward_segments(T* dlogits, const T* logits, const int32_t* targets, const T* weights,
                               const int32_t* seg, const T* dseq, int64_t S, int64_t B, int64_t T_, int64_t V,
                               int64_t ld);

template <class T>
inline void logprob_forward(T* seq_logp, T* token_logp, const T* logits, const int32_t* targets, const T* weights,
                            int64_t B, int64_t T_, int64_t V) {
  logprob_forward<T>(seq_logp, token_logp, logits, targets, weights, B, T_, V, V);
}

template <class T>
inline void logprob_backward(T* dlogits, const T* logits, const int32_t* targets, const T* weights, const T* dseq,
                             int64_t B, int64_t T_, int64_t V) {
  logprob_backward<T>(dlogits, logits, targets, weights, dseq, B, T_, V, V);
}

}  // namespace dpo::cpu
