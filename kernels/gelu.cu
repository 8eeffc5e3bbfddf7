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

// Enough threads for one 16-byte group each (a capped grid-stride launch; every index is int64_t).
template <class T>
static unsigned grid_for(int64_t n) {
  const int64_t units = (n + 16 / static_cast<int64_t>(sizeof(T)) - 1) / (16 / static_cast<int64_t>(sizeof(T)));
  return static_cast<unsigned>(std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t{1} << 16));
}

// Per element, the same float expressions for the scalar edges and the vector body.
static __device__ __forceinline__ float gelu1(float x) {
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kCubic * x * x * x)));
}
// dinp + dout * gelu'(x), in one expression as `dinp[i] += dout[i] * g` was, so that the compiler contracts it to the
// same fma.
static __device__ __forceinline__ float gelu_grad1(float dinp, float dout, float x) {
  const float th = tanhf(kSqrt2OverPi * (x + kCubic * x * x * x));
  const float sech2 = 1.0f - th * th;
  const float g = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
  return dinp + dout * g;
}

// Grid-stride over the split of [0, N) (kernels/bf16.cuh); `head` was computed on the host for all arrays of the call.
template <class T>
static __global__ void gelu_forward_kernel(T* out, const T* inp, int64_t N, int64_t head) {
  constexpr int G = 16 / sizeof(T);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  split_loop<G>(
      t, nt, N, head, [&](int64_t i) { out[i] = from_float<T>(gelu1(to_float(inp[i]))); },
      [&](int64_t i) {
        const Pack<T, G> x = load_pack<G>(inp, i);
        Pack<T, G> y;
#pragma unroll
        for (int j = 0; j < G; ++j) y.e[j] = from_float<T>(gelu1(to_float(x.e[j])));
        store_pack<G>(out, i, y);
      });
}

// kOverwrite: the old dinp is not read; the same expression with 0 in its place (kernels/common.h, GradWrite).
template <class T, bool kOverwrite>
static __global__ void gelu_backward_kernel(T* dinp, const T* dout, const T* inp, int64_t N, int64_t head) {
  constexpr int G = 16 / sizeof(T);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  split_loop<G>(
      t, nt, N, head,
      [&](int64_t i) {
        const float old = kOverwrite ? 0.0f : to_float(dinp[i]);
        dinp[i] = from_float<T>(gelu_grad1(old, to_float(dout[i]), to_float(inp[i])));
      },
      [&](int64_t i) {
        const Pack<T, G> x = load_pack<G>(inp, i), d = load_pack<G>(dout, i);
        Pack<T, G> a;
        if constexpr (!kOverwrite) a = load_pack<G>(dinp, i);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const float old = kOverwrite ? 0.0f : to_float(a.e[j]);
          a.e[j] = from_float<T>(gelu_grad1(old, to_float(d.e[j]), to_float(x.e[j])));
        }
        store_pack<G>(dinp, i, a);
      });
}

template <class T>
static void gelu_forward_impl(CudaContext& ctx, T* out, const T* inp, int64_t N) {
  DPO_NVTX_RANGE("gelu_forward");
  if (N <= 0) return;
  const VecView v[] = {{out, sizeof(T)}, {inp, sizeof(T)}};
  const int64_t head = vec_head(N, 16 / sizeof(T), v, 2);
  gelu_forward_kernel<T><<<grid_for<T>(N), kThreads, 0, ctx.stream()>>>(out, inp, N, head);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void gelu_backward_impl(CudaContext& ctx, T* dinp, const T* dout, const T* inp, int64_t N,
                               GradWrite dinp_write) {
  DPO_NVTX_RANGE("gelu_backward");
  if (N <= 0) return;
  const VecView v[] = {{dinp, sizeof(T)}, {dout, sizeof(T)}, {inp, sizeof(T)}};
  const int64_t head = vec_head(N, 16 / sizeof(T), v, 3);
  if (dinp_write == GradWrite::Overwrite) {
    gelu_backward_kernel<T, true><<<grid_for<T>(N), kThreads, 0, ctx.stream()>>>(dinp, dout, inp, N, head);
  } else {
    gelu_backward_kernel<T, false><<<grid_for<T>(N), kThreads, 0, ctx.stream()>>>(dinp, dout, inp, N, head);
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

void gelu_forward(CudaContext& ctx, float* out, const float* inp, int64_t N) { gelu_forward_impl(ctx, out, inp, N); }
void gelu_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N) {
  gelu_forward_impl(ctx, out, inp, N);
}

void gelu_backward(CudaContext& ctx, float* dinp, const float* dout, const float* inp, int64_t N,
                   GradWrite dinp_write) {
  gelu_backward_impl(ctx, dinp, dout, inp, N, dinp_write);
}
void gelu_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                   int64_t N, GradWrite dinp_write) {
  gelu_backward_impl(ctx, dinp, dout, inp, N, dinp_write);
}

}  // namespace dpo::cuda
