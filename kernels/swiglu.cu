#include "kernels/swiglu.cuh"

#include <algorithm>

#include "kernels/bf16.cuh"
#include "kernels/llama_group.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

// Unit t: row t / (I/G), columns from (t % (I/G)) * G.
template <class T, int G>
__global__ void swiglu_forward_kernel(T* out, const T* inp, int64_t N, int64_t I) {
  const int64_t per_row = I / G, total = N * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t n = t / per_row, i = (t % per_row) * G;
    const T* row = inp + n * 2 * I;
    const Group<T, G> g = load_group<G>(row, i), u = load_group<G>(row, I + i);
    Group<T, G> o;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float gf = to_float(g.e[j]);
      o.e[j] = from_float<T>(gf * sigmoidf(gf) * to_float(u.e[j]));
    }
    store_group<G>(out, n * I + i, o);
  }
}

template <class T, int G>
__global__ void swiglu_backward_kernel(T* dinp, const T* dout, const T* inp, int64_t N, int64_t I) {
  const int64_t per_row = I / G, total = N * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t n = t / per_row, i = (t % per_row) * G;
    const T* row = inp + n * 2 * I;
    const Group<T, G> g = load_group<G>(row, i), u = load_group<G>(row, I + i), d = load_group<G>(dout, n * I + i);
    Group<T, G> dg, du;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float gf = to_float(g.e[j]), uf = to_float(u.e[j]), dy = to_float(d.e[j]);
      const float s = sigmoidf(gf);
      dg.e[j] = from_float<T>(dy * uf * (s * (1.0f + gf * (1.0f - s))));
      du.e[j] = from_float<T>(dy * (gf * s));
    }
    store_group<G>(dinp, n * 2 * I + i, dg);
    store_group<G>(dinp, n * 2 * I + I + i, du);
  }
}

unsigned blocks_for(int64_t units) {
  return static_cast<unsigned>(std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t{1} << 20));
}

template <class T>
void forward_impl(CudaContext& ctx, T* out, const T* inp, int64_t N, int64_t I) {
  DPO_NVTX_RANGE("swiglu_forward");
  if (N <= 0 || I <= 0) return;
  constexpr int G = 16 / sizeof(T);
  if (I % G == 0 && aligned16(out) && aligned16(inp)) {
    swiglu_forward_kernel<T, G><<<blocks_for(N * I / G), kThreads, 0, ctx.stream()>>>(out, inp, N, I);
  } else {
    swiglu_forward_kernel<T, 1><<<blocks_for(N * I), kThreads, 0, ctx.stream()>>>(out, inp, N, I);
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void backward_impl(CudaContext& ctx, T* dinp, const T* dout, const T* inp, int64_t N, int64_t I) {
  DPO_NVTX_RANGE("swiglu_backward");
  if (N <= 0 || I <= 0) return;
  constexpr int G = 16 / sizeof(T);
  if (I % G == 0 && aligned16(dinp) && aligned16(dout) && aligned16(inp)) {
    swiglu_backward_kernel<T, G><<<blocks_for(N * I / G), kThreads, 0, ctx.stream()>>>(dinp, dout, inp, N, I);
  } else {
    swiglu_backward_kernel<T, 1><<<blocks_for(N * I), kThreads, 0, ctx.stream()>>>(dinp, dout, inp, N, I);
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void swiglu_forward(CudaContext& ctx, float* out, const float* inp, int64_t N, int64_t I) {
  forward_impl(ctx, out, inp, N, I);
}
void swiglu_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N, int64_t I) {
  forward_impl(ctx, out, inp, N, I);
}
void swiglu_backward(CudaContext& ctx, float* dinp, const float* dout, const float* inp, int64_t N, int64_t I) {
  backward_impl(ctx, dinp, dout, inp, N, I);
}
void swiglu_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                     int64_t N, int64_t I) {
  backward_impl(ctx, dinp, dout, inp, N, I);
}

}  // namespace dpo::cuda
