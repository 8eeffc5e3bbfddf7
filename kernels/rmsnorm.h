// RMSNorm over the last dimension (Llama, Qwen2, Mistral: HF's LlamaRMSNorm, no mean subtraction, no bias).
//   forward : rstd[N] = 1 / sqrt(mean_c(inp^2) + eps)                                       (=)
//             out[N,C] = inp * rstd * w                                                     (=)
//   backward: with xn = inp * rstd and g = w * dout,
//             dinp[N,C] += rstd * (g - xn * mean_c(g * xn))        (+=; = with GradWrite::Overwrite)
//             dw[C]     += sum_n dout * xn                                                  (+=)
// The statistics are accumulated in double for T = float as well as T = double (mean of squares, then rstd), and
// every output is computed in double and rounded once to T.
//
// Order of the weight product in BF16 (the backends' contract, runtime/backend.h "Llama-family ops"): HF's
// LlamaRMSNorm computes the normalised value in fp32, casts it back to the input dtype and only then multiplies by
// the weight (`self.weight * hidden_states.to(input_dtype)`). The backends follow that order for BF16 activations:
// out = round_bf16(w * round_bf16(inp * rstd)), so a checkpoint trained with HF sees the same rounding here. The
// product of two BF16 values is exact in fp32, so the second rounding is the only one after the first. With
// F32 / F64 activations there is no cast in HF and none here: out = inp * rstd * w rounded once.
// The CPU twin below computes the F32 / F64 form; with w == nullptr it writes the unweighted inp * rstd (what the
// CPU backend rounds to BF16 before it multiplies by the weight).
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace dpo::cpu {

// w may be nullptr: out = inp * rstd.
template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* w, int64_t N, int64_t C, double eps);

// The residual add fused into the RMSNorm (the pre-norm block's "x = x + f(x); h = RMSNorm(x)"):
//   res_out[N,C] = a + b                                                                   (=)
//   out[N,C], rstd[N] = rmsnorm_forward of res_out                                         (=)
// res_out is computed element for element as residual_forward computes it and the RMSNorm reads it as stored, so
// the fused op is bitwise equal to residual_forward followed by rmsnorm_forward. res_out may alias a or b; out must
// not alias any input.
template <class T>
void residual_rmsnorm_forward(T* res_out, T* out, T* rstd, const T* a, const T* b, const T* w, int64_t N, int64_t C,
                              double eps);

// rstd is the forward's (as stored). dinp_write = GradWrite::Overwrite: dinp = 0 + (the += term) (=; the old dinp
// is not read; bitwise the += result on a zeroed dinp).
template <class T>
void rmsnorm_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, const T* rstd, int64_t N, int64_t C,
                      GradWrite dinp_write = GradWrite::Accumulate);

}  // namespace dpo::cpu
