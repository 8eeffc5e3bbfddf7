// Log-softmax + gather + per-sequence sum; contract in kernels/logprob.cuh (CPU twin: kernels/logprob_cpu.cpp).
//
// forward : one block per row (b, t): an online (max, sum of exp) over the row in fp32, 16-byte vector loads
//           (4 floats or 8 bf16) on the 16-byte-aligned middle of the row, then a fixed-shape block reduction; lp
//           goes to token_logp (or a scratch). A second kernel, one block per sequence, sums weights * lp in double
//           in a fixed order. Two passes instead of atomics: the per-sequence sum is bitwise reproducible.
//           The online pass also sums the squares of its exponentials (exp(2(x - max)), one multiply-add per
//           element, reduced with the pair). With seq_stats the row pass also sums the row's logits (one add per
//           element in the same loop, reduced by the same fixed tree as the (max, sum) pair) and writes the row's
//           logit sum and lp - log sum p^2 to per-row scratches, and the sequence kernel adds the completion token
//           count and those row values next to the log-prob sum (kernels/seq_stats.h).
// backward: one block per row: the same (max, sum) pass, a barrier, then every element is rewritten as
//           g * (onehot - exp(x - max) / sum). Each thread reads an element before it writes it and all reads of
//           the first pass finish at the barrier, so dlogits may alias logits.
// Segments (the _segments forms): a first kernel maps every slot to its sequence (owner, a binary search over the
//           range ends, one thread per slot); the row kernels skip rows with owner -1 like rows with weight 0 (and
//           the backward takes dseq[owner]); the sequence kernel sums over [seg[s,0], seg[s,1]) with the padded
//           form's thread-to-slot pattern relative to the range start, so padded ranges give the padded bits.
// Index arithmetic on logits is 64-bit: a row starts at row * ld, which passes 2^31 (and 2^32) for an LM head.
// Row stride ld >= V (kernels/logprob.h): only columns [0, V) of a row are read or written. With a padded ld that
// is a multiple of 16 bytes (model/gpt2.h) every row starts 16-byte aligned, so aligned_head is 0 and the whole
// row goes through the vector loads; an odd ld (V = 50257 unpadded) still works, each row at its own phase.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/bf16.cuh"
#include "kernels/logprob.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kRowThreads = 512;  // one block per (b, t) row
constexpr int kSeqThreads = 256;  // one block per sequence
constexpr unsigned kFullMask = 0xffffffffu;

// Running (max, sum of exp(x - max), sum of exp(2 (x - max))) of a set of values; m = -inf, s = s2 = 0 for the
// empty set. s2 (for kSeqWpoLogp) squares the same exponentials: no exponential of its own.
struct MaxSum {
  float m, s, s2;
};

// Symmetric in its arguments (fmaxf, + and * commute), so a butterfly reduction gives every lane the same bits.
__device__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f, 0.0f};  // both empty (or all -inf): avoid exp(-inf - -inf) = NaN
  const float ea = expf(a.m - m), eb = expf(b.m - m);
  return {m, a.s * ea + b.s * eb, a.s2 * (ea * ea) + b.s2 * (eb * eb)};
}

__device__ void add1(MaxSum& st, float x) {
  if (x > st.m) {
    const float r = expf(st.m - x);  // 0 for the first value (m = -inf)
    st.s = st.s * r + 1.0f;
    st.s2 = st.s2 * (r * r) + 1.0f;
    st.m = x;
  } else if (st.m != -INFINITY) {
    const float e = expf(x - st.m);
    st.s += e;
    st.s2 += e * e;
  }
}

// A 16-byte vector of storage: 4 floats or 8 bf16, unpacked to / packed from floats. p must be 16-byte aligned.
template <class St>
constexpr int kVec = 16 / static_cast<int>(sizeof(St));

__device__ __forceinline__ void load_vec(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void load_vec(const bf16* p, float (&x)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    x[2 * k] = f.x, x[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void store_vec(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}
__device__ __forceinline__ void store_vec(bf16* p, const float (&x)[8]) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(x[2 * k], x[2 * k + 1]);  // each rounded to nearest even
  *reinterpret_cast<uint4*>(p) = v;
}

// Adds one vector of K values: the max by a pairwise tree, then the exponentials summed left to right; for K = 4,
// fmaxf(fmaxf(x0, x1), fmaxf(x2, x3)) and s + (((e0 + e1) + e2) + e3).
template <int K>
__device__ void add_vec(MaxSum& st, const float (&x)[K]) {
  float y[K];
#pragma unroll
  for (int k = 0; k < K; ++k) y[k] = x[k];
#pragma unroll
  for (int w = 1; w < K; w *= 2) {
#pragma unroll
    for (int k = 0; k + w < K; k += 2 * w) y[k] = fmaxf(y[k], y[k + w]);
  }
  const float mk = y[0];
  if (mk > st.m) {
    const float r = expf(st.m - mk);  // 0 for the first chunk: 0 * 0 = 0
    st.s *= r;
    st.s2 *= r * r;
    st.m = mk;
  }
  if (st.m == -INFINITY) return;
  float ek = expf(x[0] - st.m);
  float e = ek, e2 = ek * ek;
#pragma unroll
  for (int k = 1; k < K; ++k) {
    ek = expf(x[k] - st.m);
    e += ek;
    e2 += ek * ek;
  }
  st.s += e;
  st.s2 += e2;
}

// Number of leading elements before p + head is 16-byte aligned (p is an St*, so sizeof(St)-aligned), at most V.
template <class St>
__device__ int64_t aligned_head(const St* p, int64_t V) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const int64_t head = static_cast<int64_t>(((16u - (a & 15u)) & 15u) / sizeof(St));
  return head < V ? head : V;
}

// (max, sum) of x[0, V) across the block, returned to every thread; with kSum also *xsum = sum of x[0, V) (fp32;
// each thread's strided elements in order, a vector's K values summed left to right first, then the same butterfly
// and warp tree as the pair, whose + is commutative, so every lane gets the same bits). Contains __syncthreads: the
// whole block must call it. After it returns, every thread's reads of x are complete.
template <class St, bool kSum = false>
__device__ MaxSum row_max_sum(const St* x, int64_t V, float* xsum = nullptr) {
  constexpr int K = kVec<St>;
  __shared__ MaxSum warp_part[kRowThreads / 32];
  __shared__ float warp_xs[kRowThreads / 32];
  __shared__ MaxSum result;
  __shared__ float result_xs;
  MaxSum st{-INFINITY, 0.0f, 0.0f};
  float xs = 0.0f;
  const int64_t head = aligned_head(x, V);
  const int64_t nv = (V - head) / K;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) {
    const float xv = to_float(x[v]);
    add1(st, xv);
    if constexpr (kSum) xs += xv;
  }
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
    float xv[K];
    load_vec(x + head + K * j, xv);
    add_vec(st, xv);
    if constexpr (kSum) {
      float vs = xv[0];
#pragma unroll
      for (int k = 1; k < K; ++k) vs += xv[k];
      xs += vs;
    }
  }
  for (int64_t v = head + K * nv + threadIdx.x; v < V; v += blockDim.x) {
    const float xv = to_float(x[v]);
    add1(st, xv);
    if constexpr (kSum) xs += xv;
  }

  for (int off = 16; off > 0; off >>= 1) {
    const MaxSum o{__shfl_xor_sync(kFullMask, st.m, off), __shfl_xor_sync(kFullMask, st.s, off),
                   __shfl_xor_sync(kFullMask, st.s2, off)};
    st = combine(st, o);
    if constexpr (kSum) xs += __shfl_xor_sync(kFullMask, xs, off);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_part[warp] = st;
    if constexpr (kSum) warp_xs[warp] = xs;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < int(blockDim.x / 32);
    st = live ? warp_part[lane] : MaxSum{-INFINITY, 0.0f, 0.0f};
    if constexpr (kSum) xs = live ? warp_xs[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) {
      const MaxSum o{__shfl_xor_sync(kFullMask, st.m, off), __shfl_xor_sync(kFullMask, st.s, off),
                     __shfl_xor_sync(kFullMask, st.s2, off)};
      st = combine(st, o);
      if constexpr (kSum) xs += __shfl_xor_sync(kFullMask, xs, off);
    }
    if (lane == 0) {
      result = st;
      if constexpr (kSum) result_xs = xs;
    }
  }
  __syncthreads();
  if constexpr (kSum) *xsum = result_xs;
  return result;
}

// owner[i] = the sequence whose range [seg[s,0], seg[s,1]) holds slot i, or -1: the first s with seg[s,1] > i (a
// binary search over the range ends, non-decreasing for valid ranges), if its range starts at or before i. Invalid
// ranges (unsorted, overlapping) give some s in [0, S) or -1, deterministically; nothing outside seg is read.
__global__ void logprob_owner_kernel(int32_t* __restrict__ owner, const int32_t* __restrict__ seg, int64_t S,
                                     int64_t BT) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BT; i += stride) {
    int64_t lo = 0, hi = S;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (seg[2 * mid + 1] <= i) lo = mid + 1;
      else hi = mid;
    }
    owner[i] = (lo < S && seg[2 * lo] <= i) ? static_cast<int32_t>(lo) : -1;
  }
}

// lp[i] for row i = blockIdx.x (see logprob.cuh for the out-of-range target rule); with kStats also row_sum[i], the
// fp32 sum of the row's V logits, and row_wpo[i] = lp[i] - log sum_v p^2 (kSeqWpoLogp's term) (both 0 for a row
// with weight 0 or, with owner, a row in no range: logits never read).
template <class St, bool kStats>
__global__ void __launch_bounds__(kRowThreads)
    logprob_rows_kernel(float* __restrict__ lp, float* __restrict__ row_sum, float* __restrict__ row_wpo,
                        const St* __restrict__ logits, const int32_t* __restrict__ targets,
                        const float* __restrict__ weights, const int32_t* __restrict__ owner, int64_t V, int64_t ld) {
  const int64_t i = blockIdx.x;
  if (weights[i] == 0.0f || (owner && owner[i] < 0)) {  // uniform across the block
    if (threadIdx.x == 0) {
      lp[i] = 0.0f;
      if constexpr (kStats) row_sum[i] = row_wpo[i] = 0.0f;
    }
    return;
  }
  const St* x = logits + i * ld;
  float xs = 0.0f;
  const MaxSum st = row_max_sum<St, kStats>(x, V, &xs);
  if (threadIdx.x == 0) {
    const int32_t tgt = targets[i];
    // (x_t - max) - log(sum): the two large terms cancel exactly first, unlike x_t - (max + log(sum)).
    const float log_s = logf(st.s);
    const float lpi = (tgt >= 0 && tgt < V) ? (to_float(x[tgt]) - st.m) - log_s : NAN;
    lp[i] = lpi;
    if constexpr (kStats) {
      row_sum[i] = xs;
      row_wpo[i] = lpi - (logf(st.s2) - 2.0f * log_s);  // log sum p^2 = log s2 - 2 log s (the max cancels)
    }
  }
}

// seq_logp[b] = sum over the slots i of sequence b of weights[i] * lp[i]: per-thread strided sums in double (thread
// j: slots lo + j, lo + j + kSeqThreads, ...), then a fixed smem tree. The slots are [b*T, (b+1)*T) without seg and
// [seg[b,0], seg[b,1]) clamped to [0, BT) with it, so the padded ranges give the same sums in the same order. With
// stats (non-null, then row_sum too) the same for the completion token count (weights != 0) and the rows' logit
// sums over those tokens, written as row b of seq_stats (kernels/seq_stats.h).
__global__ void __launch_bounds__(kSeqThreads)
    logprob_seq_kernel(float* __restrict__ seq_logp, float* __restrict__ stats, const float* __restrict__ lp,
                       const float* __restrict__ row_sum, const float* __restrict__ row_wpo,
                       const float* __restrict__ weights, const int32_t* __restrict__ seg, int64_t T, int64_t BT) {
  __shared__ double part[kSeqThreads];
  __shared__ double part_n[kSeqThreads];
  __shared__ double part_x[kSeqThreads];
  __shared__ double part_w[kSeqThreads];
  const int64_t b = blockIdx.x;
  const bool with_stats = stats != nullptr;  // uniform across the grid
  int64_t lo = b * T, hi = lo + T;
  if (seg) {
    const int64_t s0 = seg[2 * b], s1 = seg[2 * b + 1];
    lo = s0 < 0 ? 0 : (s0 > BT ? BT : s0);
    hi = s1 < lo ? lo : (s1 > BT ? BT : s1);
  }
  double acc = 0.0, n = 0.0, xs = 0.0, wp = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kSeqThreads) {
    const float w = weights[i];
    acc += static_cast<double>(w) * static_cast<double>(lp[i]);
    if (with_stats && w != 0.0f) {
      n += 1.0;
      xs += static_cast<double>(row_sum[i]);
      wp += static_cast<double>(row_wpo[i]);
    }
  }
  part[threadIdx.x] = acc;
  part_n[threadIdx.x] = n;
  part_x[threadIdx.x] = xs;
  part_w[threadIdx.x] = wp;
  __syncthreads();
  for (int stride = kSeqThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) {
      part[threadIdx.x] += part[threadIdx.x + stride];
      part_n[threadIdx.x] += part_n[threadIdx.x + stride];
      part_x[threadIdx.x] += part_x[threadIdx.x + stride];
      part_w[threadIdx.x] += part_w[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float logp = static_cast<float>(part[0]);
    seq_logp[b] = logp;
    if (with_stats) {
      float* row = stats + b * kSeqStatsWidth;
      row[kSeqLogp] = logp;
      row[kSeqTokens] = static_cast<float>(part_n[0]);
      row[kSeqLogitSum] = static_cast<float>(part_x[0]);
      row[kSeqWpoLogp] = static_cast<float>(part_w[0]);
    }
  }
}

// d[0, V) = value (rounded once to St), vector stores on the aligned middle of the row.
template <class St>
__device__ void fill_row(St* d, int64_t V, float value) {
  constexpr int K = kVec<St>;
  const int64_t head = aligned_head(d, V);
  const int64_t nv = (V - head) / K;
  const St value_st = from_float<St>(value);
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) d[v] = value_st;
  float vals[K];
#pragma unroll
  for (int k = 0; k < K; ++k) vals[k] = value;
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) store_vec(d + head + K * j, vals);
  for (int64_t v = head + K * nv + threadIdx.x; v < V; v += blockDim.x) d[v] = value_st;
}

// dlogits and logits may be the same pointer: no __restrict__ on either.
// The row's sequence is i / T without owner, owner[i] with it (-1: in no range, a zero row).
template <class St>
__global__ void __launch_bounds__(kRowThreads)
    logprob_backward_kernel(St* dlogits, const St* logits, const int32_t* __restrict__ targets,
                            const float* __restrict__ weights, const float* __restrict__ dseq,
                            const int32_t* __restrict__ owner, int64_t T, int64_t V, int64_t ld) {
  constexpr int K = kVec<St>;
  const int64_t i = blockIdx.x;
  St* d = dlogits + i * ld;
  const float w = weights[i];
  const int64_t seq = owner ? static_cast<int64_t>(owner[i]) : i / T;
  if (w == 0.0f || seq < 0) {
    fill_row(d, V, 0.0f);
    return;
  }
  const int32_t tgt = targets[i];
  if (tgt < 0 || tgt >= V) {
    fill_row(d, V, NAN);
    return;
  }
  const St* x = logits + i * ld;
  const MaxSum st = row_max_sum(x, V);
  const float g = dseq[seq] * w;
  const float inv = 1.0f / st.s;
  // Same 16-byte phase for x and d (always true in place): vectors on the aligned middle; else element-wise.
  const bool same_phase = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(d)) & 15u) == 0;
  const int64_t head = same_phase ? aligned_head(x, V) : V;
  const int64_t nv = (V - head) / K;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) {
    d[v] = from_float<St>(g * ((v == tgt ? 1.0f : 0.0f) - expf(to_float(x[v]) - st.m) * inv));
  }
  for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
    const int64_t v = head + K * j;
    float r[K];
    load_vec(x + v, r);
#pragma unroll
    for (int k = 0; k < K; ++k) r[k] = g * ((v + k == tgt ? 1.0f : 0.0f) - expf(r[k] - st.m) * inv);
    store_vec(d + v, r);
  }
  for (int64_t v = head + K * nv + threadIdx.x; v < V; v += blockDim.x) {
    d[v] = from_float<St>(g * ((v == tgt ? 1.0f : 0.0f) - expf(to_float(x[v]) - st.m) * inv));
  }
}

unsigned grid_rows(const char* fn, int64_t rows) {
  DPO_ASSERT(rows <= INT_MAX, std::string(fn) + ": B*T exceeds the grid's x range");
  return static_cast<unsigned>(rows);
}

// owner[BT] (scratch from ctx.alloc, freed in stream order after the launches that read it) for seg[S,2].
std::shared_ptr<Buffer> slot_owners(CudaContext& ctx, const int32_t* seg, int64_t S, int64_t BT) {
  auto buf = ctx.alloc(std::max<int64_t>(BT, 1) * static_cast<int64_t>(sizeof(int32_t)));
  if (BT > 0) {
    const int64_t blocks = std::min<int64_t>((BT + kSeqThreads - 1) / kSeqThreads, int64_t{1} << 16);
    logprob_owner_kernel<<<static_cast<unsigned>(blocks), kSeqThreads, 0, ctx.stream()>>>(
        static_cast<int32_t*>(buf->data()), seg, S, BT);
    DPO_CUDA_CHECK(cudaGetLastError());
  }
  return buf;
}

// seg null: the padded form (sequence b = row b, S = B); else the ranges seg[S,2].
template <class St>
void logprob_forward_impl(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats, const St* logits,
                          const int32_t* targets, const float* weights, const int32_t* seg, int64_t S, int64_t B,
                          int64_t T, int64_t V, int64_t ld) {
  DPO_NVTX_RANGE(seg ? "logprob_forward_segments" : "logprob_forward");
  const int64_t BT = B * T;
  if (S == 0 && (BT == 0 || !token_logp)) return;  // no output to write
  DPO_ASSERT(V > 0, "logprob_forward: V must be positive");
  DPO_ASSERT(ld >= V, "logprob_forward: row stride " + std::to_string(ld) + " < V " + std::to_string(V));
  DPO_ASSERT(S <= INT_MAX, "logprob_forward: the sequence count exceeds the grid's x range");
  // Scratch, freed in stream order: lp when the caller does not want token_logp, then the rows' logit sums and
  // aligned log-probs when it wants seq_stats; with seg the slots' sequences.
  const int64_t n_scratch = (token_logp ? 0 : BT) + (seq_stats ? 2 * BT : 0);
  std::shared_ptr<Buffer> scratch, owner_buf;
  float* lp = token_logp;
  float* row_sum = nullptr;
  float* row_wpo = nullptr;
  if (n_scratch > 0) {
    scratch = ctx.alloc(n_scratch * static_cast<int64_t>(sizeof(float)));
    float* s = static_cast<float*>(scratch->data());
    if (!lp) {
      lp = s;
      s += BT;
    }
    if (seq_stats) {
      row_sum = s;
      row_wpo = s + BT;
    }
  }
  const int32_t* owner = nullptr;
  if (seg) {
    owner_buf = slot_owners(ctx, seg, S, BT);
    owner = static_cast<const int32_t*>(owner_buf->data());
  }
  if (BT > 0) {
    if (seq_stats) {
      logprob_rows_kernel<St, true><<<grid_rows("logprob_forward", BT), kRowThreads, 0, ctx.stream()>>>(
          lp, row_sum, row_wpo, logits, targets, weights, owner, V, ld);
    } else {
      logprob_rows_kernel<St, false><<<grid_rows("logprob_forward", BT), kRowThreads, 0, ctx.stream()>>>(
          lp, nullptr, nullptr, logits, targets, weights, owner, V, ld);
    }
    DPO_CUDA_CHECK(cudaGetLastError());
  }
  if (S > 0) {
    logprob_seq_kernel<<<static_cast<unsigned>(S), kSeqThreads, 0, ctx.stream()>>>(seq_logp, seq_stats, lp, row_sum,
                                                                                    row_wpo, weights, seg, T, BT);
    DPO_CUDA_CHECK(cudaGetLastError());
  }
}

template <class St>
void logprob_backward_impl(CudaContext& ctx, St* dlogits, const St* logits, const int32_t* targets,
                           const float* weights, const int32_t* seg, const float* dseq, int64_t S, int64_t B,
                           int64_t T, int64_t V, int64_t ld) {
  DPO_NVTX_RANGE(seg ? "logprob_backward_segments" : "logprob_backward");
  if (B == 0 || T == 0 || V == 0) return;
  DPO_ASSERT(ld >= V, "logprob_backward: row stride " + std::to_string(ld) + " < V " + std::to_string(V));
  std::shared_ptr<Buffer> owner_buf;
  const int32_t* owner = nullptr;
  if (seg) {
    owner_buf = slot_owners(ctx, seg, S, B * T);
    owner = static_cast<const int32_t*>(owner_buf->data());
  }
  logprob_backward_kernel<St><<<grid_rows("logprob_backward", B * T), kRowThreads, 0, ctx.stream()>>>(
      dlogits, logits, targets, weights, dseq, owner, T, V, ld);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats, const float* logits,
                     const int32_t* targets, const float* weights, int64_t B, int64_t T, int64_t V, int64_t ld) {
  logprob_forward_impl(ctx, seq_logp, token_logp, seq_stats, logits, targets, weights, nullptr, B, B, T, V, ld);
}
void logprob_forward(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats,
                     const __nv_bfloat16* logits, const int32_t* targets, const float* weights, int64_t B, int64_t T,
                     int64_t V, int64_t ld) {
  logprob_forward_impl(ctx, seq_logp, token_logp, seq_stats, logits, targets, weights, nullptr, B, B, T, V, ld);
}

void logprob_backward(CudaContext& ctx, float* dlogits, const float* logits, const int32_t* targets,
                      const float* weights, const float* dseq, int64_t B, int64_t T, int64_t V, int64_t ld) {
  logprob_backward_impl(ctx, dlogits, logits, targets, weights, nullptr, dseq, B, B, T, V, ld);
}
void logprob_backward(CudaContext& ctx, __nv_bfloat16* dlogits, const __nv_bfloat16* logits, const int32_t* targets,
                      const float* weights, const float* dseq, int64_t B, int64_t T, int64_t V, int64_t ld) {
  logprob_backward_impl(ctx, dlogits, logits, targets, weights, nullptr, dseq, B, B, T, V, ld);
}

void logprob_forward_segments(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats,
                              const float* logits, const int32_t* targets, const float* weights, const int32_t* seg,
                              int64_t S, int64_t B, int64_t T, int64_t V, int64_t ld) {
  logprob_forward_impl(ctx, seq_logp, token_logp, seq_stats, logits, targets, weights, seg, S, B, T, V, ld);
}
void logprob_forward_segments(CudaContext& ctx, float* seq_logp, float* token_logp, float* seq_stats,
                              const __nv_bfloat16* logits, const int32_t* targets, const float* weights,
                              const int32_t* seg, int64_t S, int64_t B, int64_t T, int64_t V, int64_t ld) {
  logprob_forward_impl(ctx, seq_logp, token_logp, seq_stats, logits, targets, weights, seg, S, B, T, V, ld);
}

void logprob_backward_segments(CudaContext& ctx, float* dlogits, const float* logits, const int32_t* targets,
                               const float* weights, const int32_t* seg, const float* dseq, int64_t S, int64_t B,
                               int64_t T, int64_t V, int64_t ld) {
  logprob_backward_impl(ctx, dlogits, logits, targets, weights, seg, dseq, S, B, T, V, ld);
}
void logprob_backward_segments(CudaContext& ctx, __nv_bfloat16* dlogits, const __nv_bfloat16* logits,
                               const int32_t* targets, const float* weights, const int32_t* seg, const float* dseq,
                               int64_t S, int64_t B, int64_t T, int64_t V, int64_t ld) {
  logprob_backward_impl(ctx, dlogits, logits, targets, weights, seg, dseq, S, B, T, V, ld);
}

}  // namespace dpo::cuda
