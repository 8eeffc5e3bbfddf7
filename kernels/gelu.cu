#include "kernels/gelu.cuh"

#include <algorithm>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;
constexpr float kSqrt2OverPi = 0.79788456080286535587989211986876f;
constexpr float kCubic = 0.044715f;

static unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

template <class T>
static __global__ void gelu_forward_kernel(T* out, const T* inp, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const float x = to_float(inp[i]);
    out[i] = from_float<T>(0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kCubic * x * x * x))));
  }
}

template <class T>
static __global__ void gelu_backward_kernel(T* dinp, const T* dout, const T* inp, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const float x = to_float(inp[i]);
    const float th = tanhf(kSqrt2OverPi * (x + kCubic * x * x * x));
    const float sech2 = 1.0f - th * th;
    const float g = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
    // One expression, as `dinp[i] += dout[i] * g` was, so that the compiler contracts it to the same fma.
    dinp[i] = from_float<T>(to_float(dinp[i]) + to_float(dout[i]) * g);
  }
}

template <class T>
static void gelu_forward_impl(CudaContext& ctx, T* out, const T* inp, int64_t N) {
  DPO_NVTX_RANGE("gelu_forward");
  if (N <= 0) return;
  gelu_forward_kernel<T><<<grid_for(N), kThreads, 0, ctx.stream()>>>(out, inp, N);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void gelu_backward_impl(CudaContext& ctx, T* dinp, const T* dout, const T* inp, int64_t N) {
  DPO_NVTX_RANGE("gelu_backward");
  if (N <= 0) return;
  gelu_backward_kernel<T><<<grid_for(N), kThreads, 0, ctx.stream()>>>(dinp, dout, inp, N);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void gelu_forward(CudaContext& ctx, float* out, const float* inp, int64_t N) { gelu_forward_impl(ctx, out, inp, N); }
void gelu_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N) {
  gelu_forward_impl(ctx, out, inp, N);
}

void gelu_backward(CudaContext& ctx, float* dinp, const float* dout, const float* inp, int64_t N) {
  gelu_backward_impl(ctx, dinp, dout, inp, N);
}
void gelu_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                   int64_t N) {
  gelu_backward_impl(ctx, dinp, dout, inp, N);
}

}  // namespace dpo::cuda
