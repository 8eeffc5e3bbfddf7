// Residual add on the GPU. Contract: kernels/residual.h (CPU twin cpu::residual_forward/backward).
//   forward : out[N] = a[N] + b[N]                (=; out may alias a or b: each element is read, then written, by
//                                                  one thread)
//   backward: da[N] += dout; db[N] += dout        (+=; da and db must not alias each other or dout)
// float only, element for element the CPU twin's arithmetic (bitwise equal). 64-bit indices; asynchronous on
// ctx.stream().
#pragma once
#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void residual_forward(CudaContext& ctx, float* out, const float* a, const float* b, int64_t N);
void residual_backward(CudaContext& ctx, float* da, float* db, const float* dout, int64_t N);

}  // namespace dpo::cuda
