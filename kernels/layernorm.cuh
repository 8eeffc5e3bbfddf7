// LayerNorm over the last dimension on the GPU. Contract: kernels/layernorm.h (CPU twin cpu::layernorm_forward/
// backward).
//   forward : out[N,C] = (inp - mean) * rstd * w + b;  mean[N], rstd[N] saved for backward   (=)
//             rstd = 1 / sqrt(var + eps), var = mean((inp - mean)^2)  (biased)
//   backward: dinp[N,C] += ..., dw[C] += ..., db[C] += ...                                  (+=)
//             dinp must not alias dout or inp.
// Storage: inp, w, b, out (forward) and dinp, dout, inp, w (backward) are float or bf16, one type per call; mean,
// rstd, dw, db are always float (statistics and parameter gradients, runtime/backend.h). bf16 values are read
// exactly, everything is computed in float, and each bf16 output is rounded once (dinp: read, add, round once).
// Precision: fp32 statistics (the CPU twin uses double). To keep fp32 accurate when |mean| >> std
// (GPT-2's residual stream has such channels), the forward works on x - x[0] (the shifted-data algorithm): the
// shift is exact for x near x[0], and the sums then carry the spread of the row, not its offset. Mean and variance
// are two passes over the row, as in the CPU twin.
// Layout: forward and the dinp part of backward use one warp per row (butterfly shuffles). Each row is split on its
// own into a scalar head, a body of 16-byte groups moved with 128-bit loads/stores and a scalar tail
// (kernels/bf16.cuh), aligned for all arrays of the row at once, so a view at any offset and any C work; the lanes
// take the groups and edge elements in turn, so each lane still sums about C/32 elements in order.
// Backward, one pass (where 2 * 8 * C floats of per-warp accumulators fit in a block's shared memory: C <= ~3.6k on
// an H100, GPT-2 124M's C = 768 in the default 48 KiB): a block owns a fixed chunk of rows (a function of N only);
// each warp writes its rows' dinp and adds their dw/db terms into its own shared accumulators in row order; the
// block adds its warps' sums in warp order into one partial per (chunk, channel); a second, small kernel adds the
// partials of each channel in chunk order. dout and inp are read once. Wider rows use the two-pass form (dinp
// kernel, then a column pass over dout and inp for the partials). No atomics: the same inputs give bitwise the same
// result on every run, and on every GPU that takes the same form. The partials live in the context's scratch
// (CudaContext::scratch).
// 64-bit indices; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common.h"

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void layernorm_forward(CudaContext& ctx, float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, double eps);
void layernorm_forward(CudaContext& ctx, __nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* inp,
                       const __nv_bfloat16* w, const __nv_bfloat16* b, int64_t N, int64_t C, double eps);
// The residual add fused into the forward (CPU twin cpu::residual_layernorm_forward, kernels/layernorm.h):
//   res_out[N,C] = a + b                                   (=; may alias a or b)
//   out[N,C], mean[N], rstd[N] = layernorm_forward(res_out) (=; out must not alias any argument)
// Rounding contract: res_out = from_float<T>(float(a) + float(b)), element for element residual_forward's value
// (kernels/residual.cuh), and the statistics and out are computed from the stored res_out by the same kernel body
// as layernorm_forward, with the same per-row split and per-lane order (the split depends on the addresses of
// res_out, out, w and b only). So the fused op is bitwise equal to residual_forward followed by layernorm_forward
// on the GPU, for float and bf16, any C and any view offsets. One read of a and b and one write of res_out replace
// the residual kernel's pass and the first LayerNorm read of res_out.
void residual_layernorm_forward(CudaContext& ctx, float* res_out, float* out, float* mean, float* rstd,
                                const float* a, const float* b, const float* w, const float* bias, int64_t N,
                                int64_t C, double eps);
void residual_layernorm_forward(CudaContext& ctx, __nv_bfloat16* res_out, __nv_bfloat16* out, float* mean,
                                float* rstd, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* w,
                                const __nv_bfloat16* bias, int64_t N, int64_t C, double eps);
// dinp_write = GradWrite::Overwrite: dinp = 0 + (the += term) (=; the old dinp is never read, NaN included).
void layernorm_backward(CudaContext& ctx, float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C,
                        GradWrite dinp_write = GradWrite::Accumulate);
void layernorm_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, float* db, const __nv_bfloat16* dout,
                        const __nv_bfloat16* inp, const __nv_bfloat16* w, const float* mean, const float* rstd,
                        int64_t N, int64_t C, GradWrite dinp_write = GradWrite::Accumulate);

}  // namespace dpo::cuda
