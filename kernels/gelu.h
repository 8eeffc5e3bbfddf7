// GELU, tanh form (GPT-2's "gelu_new"): gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
//   forward : out[N] = gelu(inp)                 (=)
//   backward: dinp[N] += dout * gelu'(inp)       (+=, or = with GradWrite::Overwrite)
// double: std::tanh. float: the equal form x * sigmoid(2u) with an in-line exp, vectorised, the same bits on every
// x86-64 CPU; error and limits in kernels/gelu_cpu.cpp and docs/performance.md.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace dpo::cpu {

template <class T>
void gelu_forward(T* out, const T* inp, int64_t N);

// dinp_write = GradWrite::Overwrite: dinp = 0 + dout * gelu'(inp) (=; the old dinp is not read; bitwise the +=
// result on a zeroed dinp).
template <class T>
void gelu_backward(T* dinp, const T* dout, const T* inp, int64_t N, GradWrite dinp_write = GradWrite::Accumulate);

}  // namespace dpo::cpu
