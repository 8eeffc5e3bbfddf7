// Dense layer through CBLAS (OpenBLAS): out = inp @ W + bias.
//   WeightLayout::InOut  w is [C, OC] row-major: HF GPT-2's Conv1D layout (c_attn, c_proj, c_fc).
//   WeightLayout::OutIn  w is [OC, C] row-major: nn.Linear layout, and the tied LM head (wte is [V, C]).
//   forward : out[N,OC] = inp[N,C] @ W + bias[OC]                 (=; bias may be null)
//   backward: dinp[N,C] += dout @ W^T       (skipped if dinp is null)
//             dw        += inp^T @ dout in w's layout   (skipped if dw is null)
//             dbias[OC] += sum over n of dout[n,:]      (skipped if dbias is null)
// Row strides: the forms with ld_out / ld_dout read and write out / dout as N rows of ld >= OC elements, of which
// columns [0, OC) are the matrix and columns [OC, ld) are padding: never read, never written (the padded logits of
// the LM head, model/gpt2.h). The forms without them are ld = OC. inp, w, dinp and dw are always contiguous.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace dpo::cpu {

template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int64_t C, int64_t OC,
                    WeightLayout layout, int64_t ld_out);

// dinp_write = GradWrite::Overwrite: dinp = dout @ W^T (=; BLAS beta = 0, bitwise the += result on a zeroed dinp).
template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N, int64_t C,
                     int64_t OC, WeightLayout layout, int64_t ld_dout, GradWrite dinp_write = GradWrite::Accumulate);

template <class T>
inline void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int64_t C, int64_t OC,
                           WeightLayout layout) {
  matmul_forward<T>(out, inp, w, bias, N, C, OC, layout, OC);
}

template <class T>
inline void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N, int64_t C,
                            int64_t OC, WeightLayout layout) {
  matmul_backward<T>(dinp, dw, dbias, dout, inp, w, N, C, OC, layout, OC);
}

}  // namespace dpo::cpu
