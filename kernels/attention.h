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
