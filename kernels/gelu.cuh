// GELU, tanh form (GPT-2's "gelu_new"), on the GPU. Contract: kernels/gelu.h (CPU twin cpu::gelu_forward/backward).
//   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   forward : out[N] = gelu(inp)                 (=; out may alias inp)
//   backward: dinp[N] += dout * gelu'(inp)       (+=)
// Storage float or bf16 (all three arrays of a call the same type); arithmetic in float, each bf16 output rounded
// once (dinp: read, add in float, round once). The CPU twin's formula term for term; results differ from it by
// tanhf's error (<= 2 ulp, CUDA math API) against the host libm's, i.e. float round-off. 64-bit indices; asynchronous
// on ctx.stream().
// Memory: 128-bit loads and stores on the body where all arrays of the call can be 16-byte aligned together,
// scalar head and tail (all scalar when they cannot; kernels/bf16.cuh); the same arithmetic per element either way.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void gelu_forward(CudaContext& ctx, float* out, const float* inp, int64_t N);
void gelu_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N);
void gelu_backward(CudaContext& ctx, float* dinp, const float* dout, const float* inp, int64_t N);
void gelu_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                   int64_t N);

}  // namespace dpo::cuda
