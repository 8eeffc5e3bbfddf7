// RMSNorm over the last dimension on the GPU. Contract: kernels/rmsnorm.h (CPU twin cpu::rmsnorm_forward/backward).
//   forward : rstd[N] = 1 / sqrt(mean_c(inp^2) + eps);  out[N,C] = inp * rstd * w                 (=)
//   backward: dinp[N,C] += rstd * (g - xn * mean_c(g * xn)), g = w * dout, xn = inp * rstd   (+=; = with Overwrite)
//             dw[C] += sum_n dout * xn                                                             (+=)
//             dinp must not alias dout or inp.
// Storage: inp, w, out (forward) and dinp, dout, inp, w (backward) are float or bf16, one type per call; rstd and dw
// are always float. Everything is computed in float; per element the forward is
//   out = from_float<T>(to_float(from_float<T>(x * rstd)) * w),
// which for bf16 is HF's order (the normalised value rounded to bf16, then multiplied by the weight and rounded;
// the product of two bf16 values is exact in float) and for float is (x * rstd) * w.
// Precision: fp32 statistics (the CPU twin uses double): a sum of squares has no cancellation, so the fp32 sum is
// accurate to about (C / 32 + 5) float roundings relative.
// Layout (as kernels/layernorm.cuh): one warp per row, each row split on its own into a scalar head, 16-byte groups
// (128-bit loads/stores) and a scalar tail, aligned for all arrays of the row at once, so any C and any view offset
// work. Backward, one pass where kWarpsPerBlock * C floats of per-warp dw accumulators fit in a block's shared
// memory (C <= ~7k on an H100; Llama's C = 2048 and Qwen2-0.5B's 896 take one pass): a block owns a fixed chunk of
// rows (a function of N only), each warp writes its rows' dinp and adds their dw terms into its own accumulators in
// row order, the block adds its warps' sums in warp order into one partial per (chunk, channel), and a second
// kernel adds the partials of each channel in chunk order onto dw. Wider rows: a dinp kernel, then a column pass
// for the partials. No atomics: bitwise reproducible run to run. The partials live in the context's scratch.
// Fused residual (residual_rmsnorm_forward): res_out = from_float<T>(float(a) + float(b)) element for element as
// residual_forward (kernels/residual.cuh), stored, and the norm computed from the stored values by the same kernel
// body with the same per-row split (which depends on the addresses of res_out, out and w only): bitwise equal to
// residual_forward followed by rmsnorm_forward. res_out may alias a or b; out must not alias any argument.
// 64-bit indices; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common.h"

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void rmsnorm_forward(CudaContext& ctx, float* out, float* rstd, const float* inp, const float* w, int64_t N, int64_t C,
                     double eps);
void rmsnorm_forward(CudaContext& ctx, __nv_bfloat16* out, float* rstd, const __nv_bfloat16* inp,
                     const __nv_bfloat16* w, int64_t N, int64_t C, double eps);
void residual_rmsnorm_forward(CudaContext& ctx, float* res_out, float* out, float* rstd, const float* a, const float* b,
                              const float* w, int64_t N, int64_t C, double eps);
void residual_rmsnorm_forward(CudaContext& ctx, __nv_bfloat16* res_out, __nv_bfloat16* out, float* rstd,
                              const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* w, int64_t N,
                              int64_t C, double eps);
void rmsnorm_backward(CudaContext& ctx, float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int64_t N, int64_t C, GradWrite dinp_write);
void rmsnorm_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, const __nv_bfloat16* dout,
                      const __nv_bfloat16* inp, const __nv_bfloat16* w, const float* rstd, int64_t N, int64_t C,
                      GradWrite dinp_write);

}  // namespace dpo::cuda
