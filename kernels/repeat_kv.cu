#include "kernels/repeat_kv.cuh"

#include <algorithm>

#include "kernels/bf16.cuh"
#include "kernels/llama_group.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kThreads = 256;

// Unit t: one group of G elements of out [N, 3 n_head D]: row n, expanded head e in [0, 3 n_head) (q, k, v parts),
// element d0 of the head.
template <class T, int G>
__global__ void repeat_kv_forward_kernel(T* out, const T* inp, int64_t N, int64_t n_head, int64_t n_kv_head,
                                         int64_t D) {
  const int64_t g = n_head / n_kv_head;
  const int64_t per_head = D / G, Wo = 3 * n_head * D, Wi = (n_head + 2 * n_kv_head) * D;
  const int64_t total = N * 3 * n_head * per_head;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t d0 = (t % per_head) * G;
    const int64_t e = (t / per_head) % (3 * n_head);
    const int64_t n = t / (per_head * 3 * n_head);
    const int64_t part = e / n_head, h = e % n_head;
    const int64_t src = part == 0 ? h : n_head + (part - 1) * n_kv_head + h / g;
    store_group<G>(out, n * Wo + e * D + d0, load_group<G>(inp, n * Wi + src * D + d0));
  }
}

// Unit t: one group of G elements of dinp [N, (n_head + 2 n_kv_head) D]: row n, compact head c, element d0. A q head
// is copied; kv head j of part k (1: k, 2: v) is the sum of the expanded heads k n_head + j g + r, r = 0..g-1, in
// that order from the first term.
template <class T, int G>
__global__ void repeat_kv_backward_kernel(T* dinp, const T* dout, int64_t N, int64_t n_head, int64_t n_kv_head,
                                          int64_t D) {
  const int64_t g = n_head / n_kv_head;
  const int64_t heads = n_head + 2 * n_kv_head;
  const int64_t per_head = D / G, Wo = 3 * n_head * D, Wi = heads * D;
  const int64_t total = N * heads * per_head;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t d0 = (t % per_head) * G;
    const int64_t c = (t / per_head) % heads;
    const int64_t n = t / (per_head * heads);
    const T* dy = dout + n * Wo;
    if (c < n_head) {
      store_group<G>(dinp, n * Wi + c * D + d0, load_group<G>(dy, c * D + d0));
      continue;
    }
    const int64_t part = c < n_head + n_kv_head ? 1 : 2;
    const int64_t j = c - n_head - (part - 1) * n_kv_head;
    const int64_t first = part * n_head + j * g;
    const Group<T, G> v0 = load_group<G>(dy, first * D + d0);
    float acc[G];
#pragma unroll
    for (int k = 0; k < G; ++k) acc[k] = to_float(v0.e[k]);
    for (int64_t r = 1; r < g; ++r) {
      const Group<T, G> v = load_group<G>(dy, (first + r) * D + d0);
#pragma unroll
      for (int k = 0; k < G; ++k) acc[k] += to_float(v.e[k]);
    }
    Group<T, G> o;
#pragma unroll
    for (int k = 0; k < G; ++k) o.e[k] = from_float<T>(acc[k]);
    store_group<G>(dinp, n * Wi + c * D + d0, o);
  }
}

unsigned blocks_for(int64_t units) {
  return static_cast<unsigned>(std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t{1} << 20));
}

template <class T>
void forward_impl(CudaContext& ctx, T* out, const T* inp, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D) {
  DPO_NVTX_RANGE("repeat_kv_forward");
  if (N <= 0 || D <= 0) return;
  constexpr int G = 16 / sizeof(T);
  const int64_t elems = N * 3 * n_head * D;
  if (D % G == 0 && aligned16(out) && aligned16(inp)) {
    repeat_kv_forward_kernel<T, G>
        <<<blocks_for(elems / G), kThreads, 0, ctx.stream()>>>(out, inp, N, n_head, n_kv_head, D);
  } else {
    repeat_kv_forward_kernel<T, 1><<<blocks_for(elems), kThreads, 0, ctx.stream()>>>(out, inp, N, n_head, n_kv_head, D);
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void backward_impl(CudaContext& ctx, T* dinp, const T* dout, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D) {
  DPO_NVTX_RANGE("repeat_kv_backward");
  if (N <= 0 || D <= 0) return;
  constexpr int G = 16 / sizeof(T);
  const int64_t elems = N * (n_head + 2 * n_kv_head) * D;
  if (D % G == 0 && aligned16(dinp) && aligned16(dout)) {
    repeat_kv_backward_kernel<T, G>
        <<<blocks_for(elems / G), kThreads, 0, ctx.stream()>>>(dinp, dout, N, n_head, n_kv_head, D);
  } else {
    repeat_kv_backward_kernel<T, 1>
        <<<blocks_for(elems), kThreads, 0, ctx.stream()>>>(dinp, dout, N, n_head, n_kv_head, D);
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void repeat_kv_forward(CudaContext& ctx, float* out, const float* inp, int64_t N, int64_t n_head, int64_t n_kv_head,
                       int64_t D) {
  forward_impl(ctx, out, inp, N, n_head, n_kv_head, D);
}
void repeat_kv_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N, int64_t n_head,
                       int64_t n_kv_head, int64_t D) {
  forward_impl(ctx, out, inp, N, n_head, n_kv_head, D);
}
void repeat_kv_backward(CudaContext& ctx, float* dinp, const float* dout, int64_t N, int64_t n_head, int64_t n_kv_head,
                        int64_t D) {
  backward_impl(ctx, dinp, dout, N, n_head, n_kv_head, D);
}
void repeat_kv_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, int64_t N, int64_t n_head,
                        int64_t n_kv_head, int64_t D) {
  backward_impl(ctx, dinp, dout, N, n_head, n_kv_head, D);
}

}  // namespace dpo::cuda
