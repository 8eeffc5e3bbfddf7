// Log-softmax + gather of the target token + per-sequence masked sum.
//   logits[B,T,V], targets[B,T] int32, weights[B,T] (completion mask; 0 or 1 in practice, any real allowed).
//   lp[b,t] = logits[b,t,targets[b,t]] - logsumexp(logits[b,t,:])        where weights[b,t] != 0, else 0
//   forward : seq_logp[B] = sum_t weights[b,t] * lp[b,t]                   (=)
//             token_logp[B,T] = lp (skipped if null)                       (=)
//   backward: dlogits[b,t,:] = dseq[b] * weights[b,t] * (onehot(targets[b,t]) - softmax(logits[b,t,:]))   (=)
//             rows with weight 0 are set to 0. dlogits may alias logits (in place).
// Targets where weights[b,t] == 0 are ignored (padding may hold any value, e.g. -1).
// A target outside [0, V) where the weight is non-zero throws dpo::Error before anything is written.
// The log-sum-exp is computed in double for T=float as well as T=double.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void logprob_forward(T* seq_logp, T* token_logp, const T* logits, const int32_t* targets, const T* weights,
                     int64_t B, int64_t T_, int64_t V);

template <class T>
void logprob_backward(T* dlogits, const T* logits, const int32_t* targets, const T* weights, const T* dseq,
                      int64_t B, int64_t T_, int64_t V);

}  // namespace dpo::cpu
