// Token + position embedding.
//   forward : out[B,T,C]  = wte[tokens[b,t], :] + wpe[t, :]                       (=)
//   backward: dwte[V,C]  += sum over (b,t) with tokens[b,t]==v of dout[b,t,:]       (+=)
//             dwpe[maxT,C] += sum over b of dout[b,t,:]                             (+=)
// tokens are int32 in [0, V); the caller checks the range (the model does, once per batch).
// The backward is deterministic: every output element is summed in a fixed (b,t) order.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void encoder_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_, int64_t C);

template <class T>
void encoder_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_, int64_t C);

}  // namespace dpo::cpu
