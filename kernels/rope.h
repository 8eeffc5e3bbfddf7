// Rotary position embedding (RoPE), HF's rotate_half convention (Llama, Qwen2, Mistral: the two halves of a head are
// the pair partners, not adjacent elements).
//   inp, out [N, W], W = (n_head + 2 n_kv_head) * D: each row the heads [q 0..n_head-1 | k 0..n_kv_head-1 |
//   v 0..n_kv_head-1], D the head size (even). cos, sin [P, D/2] (row p the angles of position p; building them,
//   rope_theta and any frequency scaling included, is the model's business), pos [N] int32 in [0, P).
//   forward : for every q and k head, with c = cos[pos[n], i], s = sin[pos[n], i], i < D/2:
//               y_i = x_i c - x_{i+D/2} s,   y_{i+D/2} = x_{i+D/2} c + x_i s;   v heads copied        (=)
//   backward: the transpose rotation (angle -theta):
//               dx_i = dy_i c + dy_{i+D/2} s,   dx_{i+D/2} = dy_{i+D/2} c - dy_i s;   v heads copied  (=)
// Both may run in place (out == inp, dinp == dout): each pair is read before it is written. Every output is computed
// in double and rounded once to T. A position outside [0, P) throws dpo::Error naming the first such row before
// anything is written.
// BF16 (the backends): x read exactly, cos / sin in fp32 (grad_dtype), fp32 arithmetic, each output rounded once.
// HF instead rounds cos and sin to the activation dtype and rounds each product and the sum (three roundings): the
// difference is within a few BF16 roundings of the output.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void rope_forward(T* out, const T* inp, const T* cos, const T* sin, const int32_t* pos, int64_t N, int64_t n_head,
                  int64_t n_kv_head, int64_t D, int64_t P);

template <class T>
void rope_backward(T* dinp, const T* dout, const T* cos, const T* sin, const int32_t* pos, int64_t N, int64_t n_head,
                   int64_t n_kv_head, int64_t D, int64_t P);

}  // namespace dpo::cpu
