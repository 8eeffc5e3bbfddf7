// Token + position embedding.
//   forward : out[B,T,C]  = wte[tokens[b,t], :] + wpe[t, :]                       (=)
//   backward: dwte[V,C]  += sum over (b,t) with tokens[b,t]==v of dout[b,t,:]       (+=)
//             dwpe[maxT,C] += sum over b of dout[b,t,:]                             (+=)
// tokens are int32 in [0, V); the caller checks the range (the model does, once per batch).
// The backward is deterministic: every output element is summed in a fixed (b,t) order.
//
// With explicit positions (the batch layouts of kernels/batch_layout.h: pos[b,t] is the slot's position id, which
// restarts at 0 for every packed sequence and continues after the prompt for a prefix-shared rejected completion):
//   forward : out[B,T,C]  = wte[tokens[b,t], :] + wpe[pos[b,t], :]                  (=)
//   backward: dwte[V,C]  += sum over (b,t) with tokens[b,t]==v of dout[b,t,:]       (+=)
//             dwpe[P,C]  += sum over (b,t) with pos[b,t]==p of dout[b,t,:]          (+=)
// pos is int32 [B,T] with 0 <= pos[b,t] < P = n_positions (the rows of wpe); a position outside [0, P) throws
// dpo::Error naming the slot before anything is written. Every element of dwte and dwpe is summed over its slots in
// flat slot order (b*T + t ascending), whatever the thread count. With pos[b,t] = t the orders and the arithmetic
// are those of encoder_forward / encoder_backward: the results are bitwise equal.
//
// No position embedding (Llama-family models; rotary positions are applied in the attention instead): wpe ==
// nullptr (forward) makes out = wte[tokens] (=), dwpe == nullptr (backward) leaves only the dwte sums; pos and
// n_positions are then not read.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void encoder_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_, int64_t C);

template <class T>
void encoder_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_, int64_t C);

template <class T>
void encoder_forward_pos(T* out, const int32_t* tokens, const int32_t* pos, const T* wte, const T* wpe, int64_t B,
                         int64_t T_, int64_t C, int64_t n_positions);

template <class T>
void encoder_backward_pos(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, const int32_t* pos, int64_t B,
                          int64_t T_, int64_t C, int64_t n_positions);

}  // namespace dpo::cpu
