// Causal multi-head self-attention with a key padding mask, on the packed qkv of GPT-2's c_attn.
//   qkv[B,T,3C]: q = qkv[..., 0:C], k = qkv[..., C:2C], v = qkv[..., 2C:3C]; head h owns channels
//                [h*hs, (h+1)*hs) of each, hs = C / NH.
//   keymask[B,T] int32 (1 = real token, 0 = padding) or null (all real).
//   Query t of sequence b attends to keys s <= t with keymask[b,s] != 0, scores scaled by 1/sqrt(hs).
//   forward : att[B,NH,T,T] = softmax probabilities (saved for backward; entries for s > t or masked s are 0)  (=)
//             out[B,T,C]    = att @ v, heads concatenated                                                    (=)
//             A query row with no visible key (left padding) gets att = 0 and out = 0.
//   backward: dqkv[B,T,3C] += gradient through q, k and v                                                    (+=)
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void attention_forward(T* out, T* att, const T* qkv, const int32_t* keymask, int64_t B, int64_t T_, int64_t C,
                       int64_t NH);

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int64_t B, int64_t T_, int64_t C,
                        int64_t NH);

}  // namespace dpo::cpu

// --- Blocked attention (kernels/attention_tiled_cpu.cpp) ----------------------------------------------------------
// The same attention as attention_forward / attention_backward above, without the [B,NH,T,T] probabilities:
//   forward : out[B,T,C] as above                                                                            (=)
//             lse[B,NH,T] = log sum_s exp(score[t, s]) over the visible keys s of query t (the row's
//                           log-sum-exp), +inf for a query with no visible key (its out is 0)                  (=)
//   backward: dqkv[B,T,3C] += gradient through q, k and v, the probabilities recomputed from q, k, keymask and
//             lse (keymask must be the one the forward saw)                                                  (+=)
// Queries are taken in blocks of 32 rows against tiles of 64 keys; each block's scores are held in a per-thread
// buffer (32 x T), so memory is O(threads * 32 * T) instead of O(B * NH * T^2). Arithmetic is T's own (float for
// float, double for double) with vectorisable inner loops. Every value is computed by one thread in a fixed order,
// so the results do not depend on the thread count. The reference above stays the oracle (tests compare the two).
namespace dpo::cpu {

template <class T>
void attention_tiled_forward(T* out, T* lse, const T* qkv, const int32_t* keymask, int64_t B, int64_t T_, int64_t C,
                             int64_t NH);

template <class T>
void attention_tiled_backward(T* dqkv, const T* dout, const T* qkv, const int32_t* keymask, const T* lse, int64_t B,
                              int64_t T_, int64_t C, int64_t NH);

}  // namespace dpo::cpu
