#include "kernels/residual.cuh"

#include <algorithm>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;

static unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

template <class T>
static __global__ void residual_forward_kernel(T* out, const T* a, const T* b, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride)
    out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

template <class T>
static __global__ void residual_backward_kernel(T* da, T* db, const T* dout, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const float d = to_float(dout[i]);
    add_to(da + i, d);
    add_to(db + i, d);
  }
}

template <class T>
static void residual_forward_impl(CudaContext& ctx, T* out, const T* a, const T* b, int64_t N) {
  DPO_NVTX_RANGE("residual_forward");
  if (N <= 0) return;
  residual_forward_kernel<T><<<grid_for(N), kThreads, 0, ctx.stream()>>>(out, a, b, N);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void residual_backward_impl(CudaContext& ctx, T* da, T* db, const T* dout, int64_t N) {
  DPO_NVTX_RANGE("residual_backward");
  if (N <= 0) return;
  residual_backward_kernel<T><<<grid_for(N), kThreads, 0, ctx.stream()>>>(da, db, dout, N);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void residual_forward(CudaContext& ctx, float* out, const float* a, const float* b, int64_t N) {
  residual_forward_impl(ctx, out, a, b, N);
}
void residual_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b,
                      int64_t N) {
  residual_forward_impl(ctx, out, a, b, N);
}

void residual_backward(CudaContext& ctx, float* da, float* db, const float* dout, int64_t N) {
  residual_backward_impl(ctx, da, db, dout, N);
}
void residual_backward(CudaContext& ctx, __nv_bfloat16* da, __nv_bfloat16* db, const __nv_bfloat16* dout, int64_t N) {
  residual_backward_impl(ctx, da, db, dout, N);
}

}  // namespace dpo::cuda
