// SwiGLU, the gated MLP activation of HF's LlamaMLP: down(silu(gate(x)) * up(x)). The model concatenates gate_proj
// and up_proj into one weight, so one matmul yields both halves.
//   inp [N, 2I], each row [gate 0..I-1 | up 0..I-1];  silu(g) = g * sigmoid(g)
//   forward : out[N, I] = silu(gate) * up                                                        (=)
//   backward: dinp[N, 2I] (=):  d gate = dout * up * silu'(gate),  d up = dout * silu(gate),
//             silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
// Computed in double and rounded once to T. sigmoid(g) = 1 / (1 + exp(-g)): for g -> -inf exp overflows to +inf and
// sigmoid is 0 (silu -0), for g -> +inf it is 1, so the limits are exact and nothing is NaN for finite g.
// BF16 (the backends): fp32 arithmetic and one rounding per output; HF rounds silu(gate) to BF16 before the
// product (two roundings), within one BF16 rounding of this.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void swiglu_forward(T* out, const T* inp, int64_t N, int64_t I);

template <class T>
void swiglu_backward(T* dinp, const T* dout, const T* inp, int64_t N, int64_t I);

}  // namespace dpo::cpu
