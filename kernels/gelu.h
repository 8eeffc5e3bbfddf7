// GELU, tanh form (GPT-2's "gelu_new"): gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
//   forward : out[N] = gelu(inp)                 (=)
//   backward: dinp[N] += dout * gelu'(inp)       (+=)
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void gelu_forward(T* out, const T* inp, int64_t N);

template <class T>
void gelu_backward(T* dinp, const T* dout, const T* inp, int64_t N);

}  // namespace dpo::cpu
