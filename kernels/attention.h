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

// --- Incremental decoding: one new query per sequence against a key/value cache -------------------------------------
// The cache of one layer is two arrays kcache, vcache [B,Tc,C]: row (b,s) holds the key (value) of position s of
// sequence b, heads laid out as in qkv (head h owns channels [h*hs, (h+1)*hs)). Positions are per sequence, so
// sequences of different lengths share a batch without padding inside the cache (a sequence's positions past its
// length are simply not read).
//
// attention_cache_store (the prefill): for every b and t < T_ (T_ <= Tc)
//   kcache[b,t,:] = qkv[b,t,C:2C], vcache[b,t,:] = qkv[b,t,2C:3C]                                  (=)
//   positions [T_, Tc) are untouched.
//
// attention_decode_forward (one step): qkv[B,3C] is the packed q | k | v of one new token per sequence, at position
// pos[b] (int32, 0 <= pos[b] < Tc, else dpo::Error before anything is written). Then
//   kcache[b,pos[b],:] = k, vcache[b,pos[b],:] = v                                                 (=)
//   out[b,:] [B,C]     = per head, softmax_s(q . kcache[b,s] / sqrt(hs)) over s in [0, pos[b]], times vcache[b,s]  (=)
// Positions s < pos[b] are read as they are (written by the prefill or by earlier steps); positions > pos[b] are
// never read, nor written. There is no key mask: the sequence's own positions [0, pos[b]] are all real, which is
// the right-padded batch of the full forward with its causal mask (a query never sees a later position).
// The arithmetic is that of attention_forward for query row t = pos[b] (dot products, softmax and the weighted sum
// in double, in the same order), so with the keys and values of the same qkv the result is bitwise that row of
// attention_forward's out.
template <class T>
void attention_cache_store(T* kcache, T* vcache, const T* qkv, int64_t B, int64_t T_, int64_t Tc, int64_t C);

template <class T>
void attention_decode_forward(T* out, T* kcache, T* vcache, const T* qkv, const int32_t* pos, int64_t B, int64_t Tc,
                              int64_t C, int64_t NH);

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
