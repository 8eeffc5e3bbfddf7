// Dense layer through CBLAS (OpenBLAS): out = inp @ W + bias.
//   WeightLayout::InOut  w is [C, OC] row-major: HF GPT-2's Conv1D layout (c_attn, c_proj, c_fc).
//   WeightLayout::OutIn  w is [OC, C] row-major: nn.Linear layout, and the tied LM head (wte is [V, C]).
//   forward : out[N,OC] = inp[N,C] @ W + bias[OC]                 (=; bias may be null)
//   backward: dinp[N,C] += dout @ W^T       (skipped if dinp is null)
//             dw        += inp^T @ dout in w's layout   (skipped if dw is null)
//             dbias[OC] += sum over n of dout[n,:]      (skipped if dbias is null)
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace dpo::cpu {

template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int64_t C, int64_t OC,
                    WeightLayout layout);

template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N, int64_t C,
                     int64_t OC, WeightLayout layout);

}  // namespace dpo::cpu
