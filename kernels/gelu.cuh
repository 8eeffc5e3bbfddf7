// GELU, tanh form (GPT-2's "gelu_new"), on the GPU. Contract: kernels/gelu.h (CPU twin cpu::gelu_forward/backward).
//   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   forward : out[N] = gelu(inp)                 (=; out may alias inp)
//   backward: dinp[N] += dout * gelu'(inp)       (+=, or = with GradWrite::Overwrite)
// Storage float or bf16 (all three arrays of a call the same type); arithmetic in float, each bf16 output rounded
// once (dinp: read, add in float, round once). Computed as 0.5 x (1 + tanhf(u)) with the CUDA math API's tanhf
// (<= 2 ulp), while the CPU twin's float path evaluates the same function as x * sigmoid(2u) with its own exp
// (kernels/gelu.h): equal in exact arithmetic, they differ by float round-off relative to max(|x|, 1), and for
// x below about -3 the tanh form here loses relative (not absolute) accuracy to cancellation in 1 + tanhf(u).
// 64-bit indices; asynchronous on ctx.stream().
// Memory: 128-bit loads and stores on the body where all arrays of the call can be 16-byte aligned together,
// scalar head and tail (all scalar when they cannot; kernels/bf16.cuh); the same arithmetic per element either way.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common.h"

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void gelu_forward(CudaContext& ctx, float* out, const float* inp, int64_t N);
void gelu_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N);
// dinp_write = GradWrite::Overwrite: dinp = 0 + dout * gelu'(inp) (=; the old dinp is never read, NaN included).
void gelu_backward(CudaContext& ctx, float* dinp, const float* dout, const float* inp, int64_t N,
                   GradWrite dinp_write = GradWrite::Accumulate);
void gelu_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                   int64_t N, GradWrite dinp_write = GradWrite::Accumulate);

}  // namespace dpo::cuda
