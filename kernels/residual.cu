#include "kernels/residual.cuh"

#include <algorithm>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;

// Enough threads for one 16-byte group each (a capped grid-stride launch; every index is int64_t).
template <class T>
static unsigned grid_for(int64_t n) {
  constexpr int64_t G = 16 / sizeof(T);
  return static_cast<unsigned>(std::min<int64_t>(((n + G - 1) / G + kThreads - 1) / kThreads, int64_t{1} << 16));
}

// Grid-stride over the split of [0, N) (kernels/bf16.cuh); `head` was computed on the host for all arrays of the
// call. Each element is read, then written, by one thread in both paths, which is what lets out alias a or b.
template <class T>
static __global__ void residual_forward_kernel(T* out, const T* a, const T* b, int64_t N, int64_t head) {
  constexpr int G = 16 / sizeof(T);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  split_loop<G>(
      t, nt, N, head, [&](int64_t i) { out[i] = from_float<T>(to_float(a[i]) + to_float(b[i])); },
      [&](int64_t i) {
        const Pack<T, G> x = load_pack<G>(a, i), y = load_pack<G>(b, i);
        Pack<T, G> o;
#pragma unroll
        for (int j = 0; j < G; ++j) o.e[j] = from_float<T>(to_float(x.e[j]) + to_float(y.e[j]));
        store_pack<G>(out, i, o);
      });
}

template <class T>
static __global__ void residual_backward_kernel(T* da, T* db, const T* dout, int64_t N, int64_t head) {
  constexpr int G = 16 / sizeof(T);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  split_loop<G>(
      t, nt, N, head,
      [&](int64_t i) {
        const float d = to_float(dout[i]);
        add_to(da + i, d);
        add_to(db + i, d);
      },
      [&](int64_t i) {
        const Pack<T, G> d = load_pack<G>(dout, i);
        Pack<T, G> x = load_pack<G>(da, i), y = load_pack<G>(db, i);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          x.e[j] = from_float<T>(to_float(x.e[j]) + to_float(d.e[j]));
          y.e[j] = from_float<T>(to_float(y.e[j]) + to_float(d.e[j]));
        }
        store_pack<G>(da, i, x);
        store_pack<G>(db, i, y);
      });
}

template <class T>
static void residual_forward_impl(CudaContext& ctx, T* out, const T* a, const T* b, int64_t N) {
  DPO_NVTX_RANGE("residual_forward");
  if (N <= 0) return;
  const VecView v[] = {{out, sizeof(T)}, {a, sizeof(T)}, {b, sizeof(T)}};
  const int64_t head = vec_head(N, 16 / sizeof(T), v, 3);
  residual_forward_kernel<T><<<grid_for<T>(N), kThreads, 0, ctx.stream()>>>(out, a, b, N, head);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void residual_backward_impl(CudaContext& ctx, T* da, T* db, const T* dout, int64_t N) {
  DPO_NVTX_RANGE("residual_backward");
  if (N <= 0) return;
  const VecView v[] = {{da, sizeof(T)}, {db, sizeof(T)}, {dout, sizeof(T)}};
  const int64_t head = vec_head(N, 16 / sizeof(T), v, 3);
  residual_backward_kernel<T><<<grid_for<T>(N), kThreads, 0, ctx.stream()>>>(da, db, dout, N, head);
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
