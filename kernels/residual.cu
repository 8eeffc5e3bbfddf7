#include "kernels/residual.cuh"

#include <algorithm>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;

static unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

static __global__ void residual_forward_kernel(float* out, const float* a, const float* b, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride)
    out[i] = a[i] + b[i];
}

static __global__ void residual_backward_kernel(float* da, float* db, const float* dout, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const float d = dout[i];
    da[i] += d;
    db[i] += d;
  }
}

void residual_forward(CudaContext& ctx, float* out, const float* a, const float* b, int64_t N) {
  DPO_NVTX_RANGE("residual_forward");
  if (N <= 0) return;
  residual_forward_kernel<<<grid_for(N), kThreads, 0, ctx.stream()>>>(out, a, b, N);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void residual_backward(CudaContext& ctx, float* da, float* db, const float* dout, int64_t N) {
  DPO_NVTX_RANGE("residual_backward");
  if (N <= 0) return;
  residual_backward_kernel<<<grid_for(N), kThreads, 0, ctx.stream()>>>(da, db, dout, N);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dpo::cuda
