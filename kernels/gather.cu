#include "kernels/gather.cuh"

#include <algorithm>
#include <string>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"
#include "runtime/error.h"

namespace dpo::cuda {

constexpr int kThreads = 256;

// Threads per row: the power of two >= the row's groups of G elements, in [1, kThreads].
static int threads_per_row(int64_t C, int G) {
  const int64_t groups = (C + G - 1) / G;
  int t = 1;
  while (t < kThreads && t < groups) t *= 2;
  return t;
}

static unsigned grid_for(int64_t n, int tpr) {
  const int64_t rows_per_block = kThreads / tpr;
  return static_cast<unsigned>(std::min<int64_t>((n + rows_per_block - 1) / rows_per_block, int64_t{1} << 16));
}

// T: an unsigned integer of the element's size, so the copy moves bit patterns.
template <class T>
static __global__ void gather_rows_kernel(T* out, const T* inp, const int32_t* idx, int64_t n, int64_t N, int64_t C,
                                          int tpr) {
  constexpr int G = 16 / sizeof(T);
  const int64_t rows_per_block = blockDim.x / tpr;
  const int64_t lane = threadIdx.x % tpr;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr; i < n;
       i += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    T* dst = out + i * C;
    const int64_t r = idx[i];
    if (r < 0 || r >= N) {
      for (int64_t c = lane; c < C; c += tpr) dst[c] = static_cast<T>(~T{0});
      continue;
    }
    const T* src = inp + r * C;
    const VecView v[] = {{dst, static_cast<int>(sizeof(T))}, {src, static_cast<int>(sizeof(T))}};
    const int64_t head = vec_head(C, G, v, 2);
    split_loop<G>(
        lane, tpr, C, head, [&](int64_t c) { dst[c] = src[c]; },
        [&](int64_t c) { store_pack<G>(dst, c, load_pack<G>(src, c)); });
  }
}

// T: float or bf16. Each row of dinp is written by the threads of one row of dout only (distinct entries).
template <class T>
static __global__ void scatter_add_rows_kernel(T* dinp, const T* dout, const int32_t* idx, int64_t n, int64_t N,
                                               int64_t C, int tpr) {
  constexpr int G = 16 / sizeof(T);
  const int64_t rows_per_block = blockDim.x / tpr;
  const int64_t lane = threadIdx.x % tpr;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr; i < n;
       i += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t r = idx[i];
    if (r < 0 || r >= N) continue;
    T* dst = dinp + r * C;
    const T* src = dout + i * C;
    const VecView v[] = {{dst, static_cast<int>(sizeof(T))}, {src, static_cast<int>(sizeof(T))}};
    const int64_t head = vec_head(C, G, v, 2);
    split_loop<G>(
        lane, tpr, C, head, [&](int64_t c) { add_to(dst + c, to_float(src[c])); },
        [&](int64_t c) {
          const Pack<T, G> s = load_pack<G>(src, c);
          Pack<T, G> d = load_pack<G>(dst, c);
#pragma unroll
          for (int j = 0; j < G; ++j) d.e[j] = from_float<T>(to_float(d.e[j]) + to_float(s.e[j]));
          store_pack<G>(dst, c, d);
        });
  }
}

template <class T>
static void gather_impl(CudaContext& ctx, T* out, const T* inp, const int32_t* idx, int64_t n, int64_t N,
                        int64_t C) {
  if (n <= 0 || C <= 0) return;
  const int tpr = threads_per_row(C, 16 / sizeof(T));
  gather_rows_kernel<T><<<grid_for(n, tpr), kThreads, 0, ctx.stream()>>>(out, inp, idx, n, N, C, tpr);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void scatter_impl(CudaContext& ctx, T* dinp, const T* dout, const int32_t* idx, int64_t n, int64_t N,
                         int64_t C) {
  DPO_NVTX_RANGE("scatter_add_rows");
  if (n <= 0 || C <= 0) return;
  const int tpr = threads_per_row(C, 16 / sizeof(T));
  scatter_add_rows_kernel<T><<<grid_for(n, tpr), kThreads, 0, ctx.stream()>>>(dinp, dout, idx, n, N, C, tpr);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void gather_rows(CudaContext& ctx, void* out, const void* inp, const int32_t* idx, int64_t n, int64_t N, int64_t C,
                 int elem_bytes) {
  DPO_NVTX_RANGE("gather_rows");
  if (elem_bytes == 2)
    gather_impl(ctx, static_cast<uint16_t*>(out), static_cast<const uint16_t*>(inp), idx, n, N, C);
  else if (elem_bytes == 4)
    gather_impl(ctx, static_cast<uint32_t*>(out), static_cast<const uint32_t*>(inp), idx, n, N, C);
  else
    throw Error("gather_rows: elements of " + std::to_string(elem_bytes) + " bytes (the GPU gathers 2 or 4)");
}

void scatter_add_rows(CudaContext& ctx, float* dinp, const float* dout, const int32_t* idx, int64_t n, int64_t N,
                      int64_t C) {
  scatter_impl(ctx, dinp, dout, idx, n, N, C);
}
void scatter_add_rows(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const int32_t* idx,
                      int64_t n, int64_t N, int64_t C) {
  scatter_impl(ctx, dinp, dout, idx, n, N, C);
}

}  // namespace dpo::cuda
