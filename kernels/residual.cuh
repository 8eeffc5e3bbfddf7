// Residual add on the GPU. Contract: kernels/residual.h (CPU twin cpu::residual_forward/backward).
//   forward : out[N] = a[N] + b[N]                (=; out may alias a or b: each element is read, then written, by
//                                                  one thread)
//   backward: da[N] += dout; db[N] += dout        (+=; da and db must not alias each other or dout)
// Storage float or bf16 (all arrays of a call the same type). Element for element the CPU twin's arithmetic in float
// (bitwise equal for float storage; for bf16 the float result is rounded once, so it is bitwise equal to the twin's
// float result rounded to bf16). 64-bit indices; asynchronous on ctx.stream().
// Memory: 128-bit loads and stores on the body where all arrays of the call can be 16-byte aligned together,
// scalar head and tail (all scalar when they cannot; kernels/bf16.cuh); the same arithmetic per element either way.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void residual_forward(CudaContext& ctx, float* out, const float* a, const float* b, int64_t N);
void residual_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                      int64_t N);
void residual_backward(CudaContext& ctx, float* da, float* db, const float* dout, int64_t N);
void residual_backward(CudaContext& ctx, __nv_bfloat16* da, __nv_bfloat16* db, const __nv_bfloat16* dout, int64_t N);

}  // namespace dpo::cuda
