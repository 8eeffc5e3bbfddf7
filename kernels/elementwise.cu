#include "kernels/elementwise.cuh"

#include <algorithm>

#include "kernels/bf16.cuh"
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

template <class T>
static __global__ void fill_kernel(T* x, int64_t n, T value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = value;
}

// One rounding per element, to nearest even (float -> bf16, double -> float, double -> bf16 directly, not through
// float, which could round twice); widening conversions are exact. NaN stays NaN.
static __device__ __forceinline__ void convert1(bf16* d, float s) { *d = __float2bfloat16_rn(s); }
static __device__ __forceinline__ void convert1(bf16* d, double s) { *d = __double2bfloat16(s); }
static __device__ __forceinline__ void convert1(float* d, bf16 s) { *d = __bfloat162float(s); }
static __device__ __forceinline__ void convert1(float* d, double s) { *d = static_cast<float>(s); }
static __device__ __forceinline__ void convert1(double* d, bf16 s) { *d = static_cast<double>(__bfloat162float(s)); }
static __device__ __forceinline__ void convert1(double* d, float s) { *d = static_cast<double>(s); }

// Groups of G elements, G = 16 / (the smaller element size): one 16-byte vector of the narrower type and one or more
// of the wider. Grid-stride over the split of [0, n) (kernels/bf16.cuh), `head` computed on the host for dst and src.
template <class D, class S>
constexpr int convert_group() {
  return 16 / static_cast<int>(sizeof(D) < sizeof(S) ? sizeof(D) : sizeof(S));
}

template <class D, class S>
static __global__ void convert_kernel(D* dst, const S* src, int64_t n, int64_t head) {
  constexpr int G = convert_group<D, S>();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  split_loop<G>(
      t, nt, n, head, [&](int64_t i) { convert1(dst + i, src[i]); },
      [&](int64_t i) {
        const Pack<S, G> x = load_pack<G>(src, i);
        Pack<D, G> y;
#pragma unroll
        for (int j = 0; j < G; ++j) convert1(&y.e[j], x.e[j]);
        store_pack<G>(dst, i, y);
      });
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
  fill_kernel<float><<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, value);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void fill(CudaContext& ctx, __nv_bfloat16* x, int64_t n, float value) {
  DPO_NVTX_RANGE("fill");
  if (n <= 0) return;
  fill_kernel<bf16><<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, __float2bfloat16_rn(value));
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class D, class S>
static void convert_impl(CudaContext& ctx, D* dst, const S* src, int64_t n) {
  DPO_NVTX_RANGE("convert");
  if (n <= 0) return;
  constexpr int G = convert_group<D, S>();
  const VecView v[] = {{dst, sizeof(D)}, {src, sizeof(S)}};
  const int64_t head = vec_head(n, G, v, 2);
  convert_kernel<D, S><<<grid_for((n + G - 1) / G), kThreads, 0, ctx.stream()>>>(dst, src, n, head);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void convert(CudaContext& ctx, __nv_bfloat16* dst, const float* src, int64_t n) { convert_impl(ctx, dst, src, n); }
void convert(CudaContext& ctx, __nv_bfloat16* dst, const double* src, int64_t n) { convert_impl(ctx, dst, src, n); }
void convert(CudaContext& ctx, float* dst, const __nv_bfloat16* src, int64_t n) { convert_impl(ctx, dst, src, n); }
void convert(CudaContext& ctx, float* dst, const double* src, int64_t n) { convert_impl(ctx, dst, src, n); }
void convert(CudaContext& ctx, double* dst, const __nv_bfloat16* src, int64_t n) { convert_impl(ctx, dst, src, n); }
void convert(CudaContext& ctx, double* dst, const float* src, int64_t n) { convert_impl(ctx, dst, src, n); }

void scale(CudaContext& ctx, float* x, int64_t n, double s) {
  DPO_NVTX_RANGE("scale");
  if (n <= 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, ctx.stream()>>>(x, n, s);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void sum_squares(CudaContext& ctx, double* out, const float* x, int64_t n, double* scratch) {
  DPO_NVTX_RANGE("sum_squares");
  // Without the caller's scratch, one from the context's stream-ordered pool: freed (in stream order) when
  // `partial` goes out of scope, after both launches are enqueued.
  std::shared_ptr<Buffer> partial;
  if (scratch == nullptr) partial = ctx.alloc(static_cast<int64_t>(sizeof(double)) * kSumSquaresBlocks);
  double* p = scratch != nullptr ? scratch : static_cast<double*>(partial->data());
  sum_squares_partial_kernel<<<kSumSquaresBlocks, kSumSquaresThreads, 0, ctx.stream()>>>(p, x, n > 0 ? n : 0);
  DPO_CUDA_CHECK(cudaGetLastError());
  sum_squares_final_kernel<<<1, kSumSquaresBlocks, 0, ctx.stream()>>>(out, p);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dpo::cuda
