// LayerNorm over the last dimension (GPT-2: eps 1e-5, biased variance).
//   forward : out[N,C] = (inp - mean) * rstd * w + b;  mean[N], rstd[N] saved for backward   (=)
//             rstd = 1 / sqrt(var + eps), var = mean((inp - mean)^2)
//   backward: dinp[N,C] += ..., dw[C] += ..., db[C] += ...                                  (+=)
// Statistics are accumulated in double for T=float as well as T=double.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int64_t N, int64_t C,
                       double eps);

template <class T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w, const T* mean,
                        const T* rstd, int64_t N, int64_t C);

}  // namespace dpo::cpu
