// LayerNorm over the last dimension (GPT-2: eps 1e-5, biased variance).
//   forward : out[N,C] = (inp - mean) * rstd * w + b;  mean[N], rstd[N] saved for backward   (=)
//             rstd = 1 / sqrt(var + eps), var = mean((inp - mean)^2)
//   backward: dinp[N,C] += ..., dw[C] += ..., db[C] += ...    (+=; dinp = with GradWrite::Overwrite)
// Statistics are accumulated in double for T=float as well as T=double.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace dpo::cpu {

template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int64_t N, int64_t C,
                       double eps);

// Residual add fused into the forward (the pre-LayerNorm block's "x = x + f(x); h = LayerNorm(x)"):
//   res_out[N,C] = a + b                                                                  (=)
//   out[N,C], mean[N], rstd[N] = layernorm_forward of res_out                             (=)
// Rounding contract: res_out is computed element for element as residual_forward computes it and the LayerNorm
// reads res_out as stored, so the fused op is bitwise equal to residual_forward followed by layernorm_forward (the
// same per-row arithmetic, one row at a time). res_out may alias a or b; out must not alias any input.
template <class T>
void residual_layernorm_forward(T* res_out, T* out, T* mean, T* rstd, const T* a, const T* b, const T* w,
                                const T* bias, int64_t N, int64_t C, double eps);

// dinp_write = GradWrite::Overwrite: dinp = 0 + (the += term) (=; the old dinp is not read; bitwise the += result
// on a zeroed dinp).
template <class T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w, const T* mean,
                        const T* rstd, int64_t N, int64_t C, GradWrite dinp_write = GradWrite::Accumulate);

}  // namespace dpo::cpu
