#include "kernels/elementwise.cuh"

#include <algorithm>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;
constexpr int kSumSquaresThreads = 256;
static_assert(kSumSquaresBlocks <= 1024, "the second pass reduces the partials with one block");
static_assert((kSumSquaresBlocks & (kSumSquaresBlocks - 1)) == 0 &&
                  (kSumSquaresThreads & (kSumSquaresThreads - 1)) == 0,
              "tree reductions assume powers of two");

// Grid-stride launches: a capped grid keeps the block count in range for any n, and every index is int64_t.
static unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{1} << 16));
}

static __global__ void fill_kernel(float* x, int64_t n, float value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = value;
}

static __global__ void scale_kernel(float* x, int64_t n, double s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = static_cast<float>(static_cast<double>(x[i]) * s);
}

// Shared-memory tree over `n` (a power of two) doubles, in a fixed order; the result is in sh[0].
template <int n>
static __device__ void block_tree_sum(double* sh) {
  for (int s = n / 2; s > 0; s /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
  }
  __syncthreads();
}

// Pass 1: block b owns elements i with i % (kSumSquaresBlocks * kSumSquaresThreads) in its range.
static __global__ void sum_squares_partial_kernel(double* partial, const float* x, int64_t n) {
  __shared__ double sh[kSumSquaresThreads];
  const int64_t stride = static_cast<int64_t>(kSumSquaresBlocks) * kSumSquaresThreads;
  double acc = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kSumSquaresThreads + threadIdx.x; i < n; i += stride) {
    const double e = static_cast<double>(x[i]);
    acc += e * e;
  }
  sh[threadIdx.x] = acc;
  block_tree_sum<kSumSquaresThreads>(sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

// Pass 2: one block of kSumSquaresBlocks threads adds the partials in a fixed tree.
static __global__ void sum_squares_final_kernel(double* out, const double* partial) {
  __shared__ double sh[kSumSquaresBlocks];
  sh[threadIdx.x] = partial[threadIdx.x];
  block_tree_sum<kSumSquaresBlocks>(sh);
  if (threadIdx.x == 0) *out = sh[0];
}

void fill(CudaContext& ctx, float* x, int64_t n, float value) {
  DPO_NVTX_RANGE("fill");
  if (n <= 0) return;
  fill_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, value);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void scale(CudaContext& ctx, float* x, int64_t n, double s) {
  DPO_NVTX_RANGE("scale");
  if (n <= 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, s);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void sum_squares(CudaContext& ctx, double* out, const float* x, int64_t n) {
  DPO_NVTX_RANGE("sum_squares");
  // Scratch from the context's stream-ordered pool: freed (in stream order) when `partial` goes out of scope,
  // after both launches are enqueued.
  auto partial = ctx.alloc(static_cast<int64_t>(sizeof(double)) * kSumSquaresBlocks);
  double* p = static_cast<double*>(partial->data());
  sum_squares_partial_kernel<<<kSumSquaresBlocks, kSumSquaresThreads, 0, ctx.stream()>>>(p, x, n > 0 ? n : 0);
  DPO_CUDA_CHECK(cudaGetLastError());
  sum_squares_final_kernel<<<1, kSumSquaresBlocks, 0, ctx.stream()>>>(out, p);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dpo::cuda
