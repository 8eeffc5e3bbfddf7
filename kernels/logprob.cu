// Log-softmax + gather + per-sequence sum; contract in kernels/logprob.cuh (CPU twin: kernels/logprob_cpu.cpp).
//
// forward : one block per row (b, t): an online (max, sum of exp) over the row in fp32, float4 loads on the
//           16-byte-aligned middle of the row, then a fixed-shape block reduction; lp goes to token_logp (or a
//           scratch). A second kernel, one block per sequence, sums weights * lp in double in a fixed order.
//           Two passes instead of atomics: the per-sequence sum is bitwise reproducible.
// backward: one block per row: the same (max, sum) pass, a barrier, then every element is rewritten as
//           g * (onehot - exp(x - max) / sum). Each thread reads an element before it writes it and all reads of
//           the first pass finish at the barrier, so dlogits may alias logits.
// Index arithmetic on logits is 64-bit: a row starts at row * V, which passes 2^31 (and 2^32) for an LM head.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/logprob.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kRowThreads = 512;  // one block per (b, t) row
constexpr int kSeqThreads = 256;  // one block per sequence
constexpr unsigned kFullMask = 0xffffffffu;

// Running (max, sum of exp(x - max)) of a set of values; m = -inf, s = 0 for the empty set.
struct MaxSum {
  float m, s;
};

// Symmetric in its arguments (fmaxf and + commute), so a butterfly reduction gives every lane the same bits.
__device__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};  // both empty (or all -inf): avoid exp(-inf - -inf) = NaN
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ void add1(MaxSum& st, float x) {
  if (x > st.m) {
    st.s = st.s * expf(st.m - x) + 1.0f;
    st.m = x;
  } else if (st.m != -INFINITY) {
    st.s += expf(x - st.m);
  }
}

__device__ void add4(MaxSum& st, float4 x) {
  const float m4 = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
  if (m4 > st.m) {
    st.s *= expf(st.m - m4);  // 0 * exp(-inf) = 0 for the first chunk
    st.m = m4;
  }
  if (st.m == -INFINITY) return;
  st.s += expf(x.x - st.m) + expf(x.y - st.m) + expf(x.z - st.m) + expf(x.w - st.m);
}

// Number of leading floats before p + head is 16-byte aligned (p is a float*, so 4-byte aligned), at most V.
__device__ int64_t aligned_head(const void* p, int64_t V) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const int64_t head = static_cast<int64_t>(((16u - (a & 15u)) & 15u) / 4u);
  return head < V ? head : V;
}

// (max, sum) of x[0, V) across the block, returned to every thread. Contains __syncthreads: the whole block
// must call it. After it returns, every thread's reads of x are complete.
__device__ MaxSum row_max_sum(const float* x, int64_t V) {
  __shared__ MaxSum warp_part[kRowThreads / 32];
  __shared__ MaxSum result;
  MaxSum st{-INFINITY, 0.0f};
  const int64_t head = aligned_head(x, V);
  const int64_t n4 = (V - head) / 4;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) add1(st, x[v]);
  const float4* x4 = reinterpret_cast<const float4*>(x + head);
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) add4(st, x4[j]);
  for (int64_t v = head + 4 * n4 + threadIdx.x; v < V; v += blockDim.x) add1(st, x[v]);

  for (int off = 16; off > 0; off >>= 1) {
    const MaxSum o{__shfl_xor_sync(kFullMask, st.m, off), __shfl_xor_sync(kFullMask, st.s, off)};
    st = combine(st, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_part[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < int(blockDim.x / 32) ? warp_part[lane] : MaxSum{-INFINITY, 0.0f};
    for (int off = 16; off > 0; off >>= 1) {
      const MaxSum o{__shfl_xor_sync(kFullMask, st.m, off), __shfl_xor_sync(kFullMask, st.s, off)};
      st = combine(st, o);
    }
    if (lane == 0) result = st;
  }
  __syncthreads();
  return result;
}

// lp[i] for row i = blockIdx.x (see logprob.cuh for the out-of-range target rule).
__global__ void __launch_bounds__(kRowThreads)
    logprob_rows_kernel(float* __restrict__ lp, const float* __restrict__ logits, const int32_t* __restrict__ targets,
                        const float* __restrict__ weights, int64_t V) {
  const int64_t i = blockIdx.x;
  if (weights[i] == 0.0f) {  // uniform across the block
    if (threadIdx.x == 0) lp[i] = 0.0f;
    return;
  }
  const float* x = logits + i * V;
  const MaxSum st = row_max_sum(x, V);
  if (threadIdx.x == 0) {
    const int32_t tgt = targets[i];
    // (x_t - max) - log(sum): the two large terms cancel exactly first, unlike x_t - (max + log(sum)).
    lp[i] = (tgt >= 0 && tgt < V) ? (x[tgt] - st.m) - logf(st.s) : NAN;
  }
}

// seq_logp[b] = sum_t weights[b,t] * lp[b,t]: per-thread strided sums in double, then a fixed smem tree.
__global__ void __launch_bounds__(kSeqThreads)
    logprob_seq_kernel(float* __restrict__ seq_logp, const float* __restrict__ lp, const float* __restrict__ weights,
                       int64_t T) {
  __shared__ double part[kSeqThreads];
  const int64_t b = blockIdx.x;
  double acc = 0.0;
  for (int64_t t = threadIdx.x; t < T; t += kSeqThreads) {
    acc += static_cast<double>(weights[b * T + t]) * static_cast<double>(lp[b * T + t]);
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kSeqThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) seq_logp[b] = static_cast<float>(part[0]);
}

// d[0, V) = value, float4 stores on the aligned middle of the row.
__device__ void fill_row(float* d, int64_t V, float value) {
  const int64_t head = aligned_head(d, V);
  const int64_t n4 = (V - head) / 4;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) d[v] = value;
  float4* d4 = reinterpret_cast<float4*>(d + head);
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) d4[j] = make_float4(value, value, value, value);
  for (int64_t v = head + 4 * n4 + threadIdx.x; v < V; v += blockDim.x) d[v] = value;
}

// dlogits and logits may be the same pointer: no __restrict__ on either.
__global__ void __launch_bounds__(kRowThreads)
    logprob_backward_kernel(float* dlogits, const float* logits, const int32_t* __restrict__ targets,
                            const float* __restrict__ weights, const float* __restrict__ dseq, int64_t T, int64_t V) {
  const int64_t i = blockIdx.x;
  float* d = dlogits + i * V;
  const float w = weights[i];
  if (w == 0.0f) {
    fill_row(d, V, 0.0f);
    return;
  }
  const int32_t tgt = targets[i];
  if (tgt < 0 || tgt >= V) {
    fill_row(d, V, NAN);
    return;
  }
  const float* x = logits + i * V;
  const MaxSum st = row_max_sum(x, V);
  const float g = dseq[i / T] * w;
  const float inv = 1.0f / st.s;
  // Same 16-byte phase for x and d (always true in place): float4 on the aligned middle; else element-wise.
  const bool same_phase = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(d)) & 15u) == 0;
  const int64_t head = same_phase ? aligned_head(x, V) : V;
  const int64_t n4 = (V - head) / 4;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) {
    d[v] = g * ((v == tgt ? 1.0f : 0.0f) - expf(x[v] - st.m) * inv);
  }
  const float4* x4 = reinterpret_cast<const float4*>(x + head);
  float4* d4 = reinterpret_cast<float4*>(d + head);
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
    const float4 xv = x4[j];
    const int64_t v = head + 4 * j;
    float4 r;
    r.x = g * ((v == tgt ? 1.0f : 0.0f) - expf(xv.x - st.m) * inv);
    r.y = g * ((v + 1 == tgt ? 1.0f : 0.0f) - expf(xv.y - st.m) * inv);
    r.z = g * ((v + 2 == tgt ? 1.0f : 0.0f) - expf(xv.z - st.m) * inv);
    r.w = g * ((v + 3 == tgt ? 1.0f : 0.0f) - expf(xv.w - st.m) * inv);
    d4[j] = r;
  }
  for (int64_t v = head + 4 * n4 + threadIdx.x; v < V; v += blockDim.x) {
    d[v] = g * ((v == tgt ? 1.0f : 0.0f) - expf(x[v] - st.m) * inv);
  }
}

unsigned grid_rows(const char* fn, int64_t rows) {
  DPO_ASSERT(rows <= INT_MAX, std::string(fn) + ": B*T exceeds the grid's x range");
  return static_cast<unsigned>(rows);
}

}  // namespace

void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, const float* logits,
                     const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V) {
  DPO_NVTX_RANGE("logprob_forward");
  if (B == 0) return;
  DPO_ASSERT(V > 0, "logprob_forward: V must be positive");
  DPO_ASSERT(B <= INT_MAX, "logprob_forward: B exceeds the grid's x range");
  std::shared_ptr<Buffer> scratch;  // lp when the caller does not want token_logp; freed in stream order
  float* lp = token_logp;
  if (!lp && T > 0) {
    scratch = ctx.alloc(B * T * static_cast<int64_t>(sizeof(float)));
    lp = static_cast<float*>(scratch->data());
  }
  if (T > 0) {
    logprob_rows_kernel<<<grid_rows("logprob_forward", B * T), kRowThreads, 0, ctx.stream()>>>(lp, logits, targets,
                                                                                             weights, V);
    DPO_CUDA_CHECK(cudaGetLastError());
  }
  logprob_seq_kernel<<<static_cast<unsigned>(B), kSeqThreads, 0, ctx.stream()>>>(seq_logp, lp, weights, T);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void logprob_backward(CudaContext& ctx, float* dlogits, const float* logits, const int32_t* targets,
                      const float* weights, const float* dseq, int64_t B, int64_t T, int64_t V) {
  DPO_NVTX_RANGE("logprob_backward");
  if (B == 0 || T == 0 || V == 0) return;
  logprob_backward_kernel<<<grid_rows("logprob_backward", B * T), kRowThreads, 0, ctx.stream()>>>(
      dlogits, logits, targets, weights, dseq, T, V);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dpo::cuda
