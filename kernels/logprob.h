// Log-softmax + gather of the target token + per-sequence masked sum.
//   logits[B,T,V], targets[B,T] int32, weights[B,T] (completion mask; 0 or 1 in practice, any real allowed).
//   lp[b,t] = logits[b,t,targets[b,t]] - logsumexp(logits[b,t,:])        where weights[b,t] != 0, else 0
//   forward : seq_logp[B] = sum_t weights[b,t] * lp[b,t]                   (=)
//             token_logp[B,T] = lp (skipped if null)                       (=)
//             seq_stats[B, kSeqStatsWidth] (skipped if null)               (=)  the per-sequence statistics of
//             kernels/seq_stats.h: the seq_logp value, the completion token count, the sum of the logits.
//   backward: dlogits[b,t,:] = dseq[b] * weights[b,t] * (onehot(targets[b,t]) - softmax(logits[b,t,:]))   (=)
//             rows with weight 0 are set to 0. dlogits may alias logits (in place).
// Row stride: the forms with `ld` read logits and write dlogits as B*T rows of ld >= V elements (row (b,t) starts
// at (b*T + t) * ld); columns [0, V) are the vocabulary, columns [V, ld) are padding that is never read (it may
// hold anything, NaN included) and never written. The forms without `ld` are ld = V.
// Targets where weights[b,t] == 0 are ignored (padding may hold any value, e.g. -1).
// A target outside [0, V) where the weight is non-zero throws dpo::Error before anything is written.
// The log-sum-exp, the per-sequence sums and the logit sums are computed in double for T=float as well as T=double;
// the logit sum of a row is taken in the pass that sums its exponentials (no extra pass over the row).
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
