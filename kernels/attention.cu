// Causal attention with materialised scores; contract in kernels/attention.cuh (CPU twin: kernels/attention_cpu.cpp).
//
// Every product here is, per (b, h), a small GEMM on strided views of the packed qkv, dout and the [T,T] score
// matrices, and every one is triangular. One tiled kernel covers them all (tri_gemm_kernel), with the triangle
// expressed as the k-range or the set of output tiles:
//   forward : S = scale * Q K^T          lower output tiles only (s <= t)                      -> att (raw scores)
//             att = masked softmax(S)    one warp per row, fp32; writes zeros for s > t and masked keys
//             out = att V                k (= s) runs over [0, end of this t-tile)             (=)
//   backward: dP = dO V^T                lower output tiles only                               -> scratch
//             dS = att (dP - rowsum(dP att)) * scale     one warp per row, in place in scratch; zeros for s > t
//             dV += att^T dO             k (= t) runs over [start of this s-tile, T)           (+=)
//             dQ += dS K                 k (= s) runs over [0, end of this t-tile)             (+=)
//             dK += dS^T Q               k (= t) runs over [start of this s-tile, T)           (+=)
// Inside a diagonal tile the k-range includes a few entries above the diagonal; the softmax kernels leave those
// exactly 0 in att and dS, so they add nothing. The raw scores that the first GEMM writes above the diagonal of a
// diagonal tile are overwritten by the softmax, which writes every entry of every row.
//
// Why not cuBLAS strided-batched GEMMs: the packed layout needs two batch strides (b and h), the triangle would be
// computed in full, and the plain kernel is deterministic by construction. A flash-style kernel (no [T,T] state)
// replaces all of this when attention dominates; this one is the correct, readable baseline.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "kernels/attention.cuh"
#include "kernels/batch_layout.h"
#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kTile = 64;      // output tile: kTile x kTile
constexpr int kTileK = 32;     // k-slice staged in shared memory per step
constexpr int kThreads = 256;  // 16 x 16 threads, each owns a 4 x 4 block of the output tile (strided by 16)
constexpr int kMicro = kTile / 16;
static_assert(kTile * kTileK % kThreads == 0, "tile loads must divide evenly among the threads");

enum class Tri {
  kLowerTiles,  // compute only output tiles that touch s <= t (n-tile index <= m-tile index); full k range
  kKUpToRow,    // k in [0, min(K, m0 + kTile)): sum over s <= t
  kKFromRow,    // k in [m0, K): sum over t >= s
};

// Element (r, c) of one operand for batch (b, h): p[b*sb + h*sh + r*sr + c*sc]. For A, r = m and c = k; for B,
// r = k and c = n. T is the storage type (float or bf16); tiles are staged in shared memory as float.
template <class T>
struct Operand {
  const T* p;
  int64_t sb, sh, sr, sc;
};

// Output element (m, n) of batch (b, h): p[b*sb + h*sh + m*sm + n] (n is contiguous in every use).
template <class T>
struct Output {
  T* p;
  int64_t sb, sh, sm;
};

template <class TA, class TB, class TC>
struct GemmParams {
  Operand<TA> a;  // A(m, k)
  Operand<TB> b;  // B(k, n)
  Output<TC> c;
  int64_t M, N, K;
  int64_t NH;   // blockIdx.x = b * NH + h
  float alpha;  // C (= or +=) alpha * A B
};

// kAKContig / kBKContig say which index of A / B is contiguous in memory; they only choose the thread-to-element
// mapping of the shared-memory loads (so that a warp reads consecutive addresses), never the result. The summation
// order over k is fixed (k ascending, one fmaf per term), so results are bitwise reproducible. Operands are read
// exactly into float tiles; each output is rounded once to TC (an accumulated one is read, added to, rounded once).
template <Tri kTri, bool kAKContig, bool kBKContig, bool kAccumulate, class TA, class TB, class TC>
__global__ void __launch_bounds__(kThreads) tri_gemm_kernel(GemmParams<TA, TB, TC> p) {
  const int64_t z = blockIdx.x;
  const int64_t bi = z / p.NH, hi = z % p.NH;
  const int64_t m0 = int64_t(blockIdx.y) * kTile;
  const int64_t n0 = int64_t(blockIdx.z) * kTile;
  if (kTri == Tri::kLowerTiles && n0 > m0) return;  // the whole tile lies above the diagonal

  int64_t k_begin = 0, k_end = p.K;
  if (kTri == Tri::kKUpToRow && m0 + kTile < p.K) k_end = m0 + kTile;
  if (kTri == Tri::kKFromRow) k_begin = m0;

  const TA* A = p.a.p + bi * p.a.sb + hi * p.a.sh;
  const TB* Bm = p.b.p + bi * p.b.sb + hi * p.b.sh;

  // +1 padding: the k-contiguous loads store down a column, which is then conflict-free.
  __shared__ float As[kTileK][kTile + 1];
  __shared__ float Bs[kTileK][kTile + 1];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.0f;
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
#pragma unroll
    for (int e = 0; e < kTile * kTileK / kThreads; ++e) {
      const int l = tid + e * kThreads;
      const int mm = kAKContig ? l / kTileK : l % kTile;
      const int kk = kAKContig ? l % kTileK : l / kTile;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < p.M && k < k_end) ? to_float(A[m * p.a.sr + k * p.a.sc]) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kTile * kTileK / kThreads; ++e) {
      const int l = tid + e * kThreads;
      const int nn = kBKContig ? l / kTileK : l % kTile;
      const int kk = kBKContig ? l % kTileK : l / kTile;
      const int64_t n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = (n < p.N && k < k_end) ? to_float(Bm[k * p.b.sr + n * p.b.sc]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float ar[kMicro], br[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) ar[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) br[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  TC* Cm = p.c.p + bi * p.c.sb + hi * p.c.sh;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.N) continue;
      TC* dst = Cm + m * p.c.sm + n;
      const float v = p.alpha * acc[i][j];
      if (kAccumulate) {
        add_to(dst, v);
      } else {
        *dst = from_float<TC>(v);
      }
    }
  }
}

template <Tri kTri, bool kAKContig, bool kBKContig, bool kAccumulate, class TA, class TB, class TC>
void launch_tri_gemm(CudaContext& ctx, const GemmParams<TA, TB, TC>& p, int64_t batches) {
  const dim3 grid(static_cast<unsigned>(batches), static_cast<unsigned>((p.M + kTile - 1) / kTile),
                  static_cast<unsigned>((p.N + kTile - 1) / kTile));
  tri_gemm_kernel<kTri, kAKContig, kBKContig, kAccumulate, TA, TB, TC><<<grid, kThreads, 0, ctx.stream()>>>(p);
  DPO_CUDA_CHECK(cudaGetLastError());
}

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRowsPerBlock = 8;  // one warp per row, 256 threads

__device__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// att row r = (b, h, t) holds raw scaled scores for s <= t on entry; on exit the masked softmax over the visible
// keys, and exact zeros elsewhere. Visible: with span null, the keys s <= t with keymask[b,s] != 0 (or all s <= t
// without a mask); with span [B,T,kSpanWidth], the keys with span_sees(span[b,t], t, s). A row with no visible key
// (key mask: left padding) becomes all zeros. A row whose span is not span_valid becomes NaN at s <= t (0 above):
// the spans are only compared with s, never used as an index, so a bad span cannot move a read or a write.
// Lanes take s = lane, lane + 32, ... from 0 (key mask) or from lo rounded down to a multiple of 32 (spans): the same
// keys on the same lanes in the same order, so spans and the key mask they imply give bitwise-equal rows.
// With bf16 storage the fp32 probabilities stay in `att` (a float scratch, for att @ v) and are also written,
// rounded once, to `att_lo` (the saved state); with float storage att_lo is unused (null).
template <class St>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    softmax_forward_kernel(float* __restrict__ att, St* __restrict__ att_lo, const int32_t* __restrict__ keymask,
                           const int32_t* __restrict__ span, int64_t rows, int64_t T, int64_t NH) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;  // uniform per warp
  const int lane = threadIdx.x % 32;
  const int64_t t = r % T, b = r / (T * NH);
  float* row = att + r * T;
  const int32_t* mask = keymask && !span ? keymask + b * T : nullptr;
  // Visible keys: [lo, t] minus [hole_lo, hole_hi), then the key mask; the key-mask form has lo = 0 and no hole.
  int64_t lo = 0, hole_lo = 0, hole_hi = 0;
  if (span) {
    const int32_t* sp = span + (b * T + t) * kSpanWidth;
    if (!span_valid(sp, t)) {  // uniform per warp
      for (int64_t s = lane; s < T; s += 32) {
        const float pv = s <= t ? NAN : 0.0f;
        row[s] = pv;
        if constexpr (!std::is_same_v<St, float>) att_lo[r * T + s] = from_float<St>(pv);
      }
      return;
    }
    lo = sp[kSpanLo], hole_lo = sp[kSpanHoleLo], hole_hi = sp[kSpanHoleHi];
  }
  const auto sees = [&](int64_t s) {
    return s >= lo && s <= t && !(s >= hole_lo && s < hole_hi) && !(mask && mask[s] == 0);
  };
  const int64_t s_first = (lo / 32) * 32 + lane;

  float mx = -INFINITY;
  bool any = false;
  for (int64_t s = s_first; s <= t; s += 32) {
    if (!sees(s)) continue;
    mx = fmaxf(mx, row[s]);
    any = true;
  }
  mx = warp_max(mx);
  const bool visible = __any_sync(kFullMask, any);
  float sum = 0.0f;
  if (visible) {
    for (int64_t s = s_first; s <= t; s += 32) {
      if (!sees(s)) continue;
      sum += expf(row[s] - mx);
    }
  }
  sum = warp_sum(sum);
  const float inv = visible ? 1.0f / sum : 0.0f;
  for (int64_t s = lane; s < T; s += 32) {
    float pv = 0.0f;
    if (visible && sees(s)) pv = expf(row[s] - mx) * inv;
    row[s] = pv;
    if constexpr (!std::is_same_v<St, float>) att_lo[r * T + s] = from_float<St>(pv);
  }
}

// ds row r holds dP = dO V^T for s <= t on entry; on exit dS = att * (dP - sum_s att dP) * scale for s <= t and 0
// for s > t (att is 0 at masked keys, so they get 0 too).
template <class St>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    softmax_backward_kernel(float* __restrict__ ds, const St* __restrict__ att, int64_t rows, int64_t T,
                            float scale) {
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = r % T;
  const St* a = att + r * T;
  float* d = ds + r * T;
  float dot = 0.0f;
  for (int64_t s = lane; s <= t; s += 32) dot += to_float(a[s]) * d[s];
  dot = warp_sum(dot);
  for (int64_t s = lane; s < T; s += 32) d[s] = s <= t ? to_float(a[s]) * (d[s] - dot) * scale : 0.0f;
}

void check_shape(const char* fn, int64_t B, int64_t T, int64_t C, int64_t NH) {
  DPO_ASSERT(NH > 0 && C > 0 && C % NH == 0, std::string(fn) + ": C must be a positive multiple of NH");
  DPO_ASSERT(B * NH <= INT_MAX, std::string(fn) + ": B*NH exceeds the grid's x range");
  DPO_ASSERT((T + kTile - 1) / kTile <= 65535, std::string(fn) + ": T exceeds the grid's y/z range");
}

unsigned row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  DPO_ASSERT(blocks <= INT_MAX, "attention: B*NH*T rows exceed the grid's x range");
  return static_cast<unsigned>(blocks);
}

// Float storage: the scores, then the probabilities, live in att itself. bf16: they live in an fp32 scratch of
// B*NH*T*T floats (stream-ordered, freed on return), so that neither the scores nor the probabilities that att @ v
// reads are rounded; only the saved att is bf16.
template <class St>
void attention_forward_impl(CudaContext& ctx, St* out, St* att, const St* qkv, const int32_t* keymask,
                            const int32_t* span, int64_t B, int64_t T, int64_t C, int64_t NH) {
  DPO_NVTX_RANGE(span ? "attention_forward_spans" : "attention_forward");
  if (B == 0 || T == 0) return;
  check_shape("attention_forward", B, T, C, NH);
  const int64_t C3 = 3 * C, hs = C / NH, TT = T * T;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hs)));
  constexpr bool kFloat = std::is_same_v<St, float>;
  std::shared_ptr<Buffer> scratch;
  float* att_f32 = nullptr;
  if constexpr (kFloat) {
    att_f32 = att;
  } else {
    scratch = ctx.alloc(B * NH * TT * static_cast<int64_t>(sizeof(float)));
    att_f32 = static_cast<float*>(scratch->data());
  }

  GemmParams<St, St, float> s{};  // att_f32 <- scale * Q K^T (raw scores)
  s.a = {qkv, T * C3, hs, C3, 1};
  s.b = {qkv + C, T * C3, hs, 1, C3};
  s.c = {att_f32, NH * TT, TT, T};
  s.M = T, s.N = T, s.K = hs, s.NH = NH, s.alpha = scale;
  launch_tri_gemm<Tri::kLowerTiles, true, true, false>(ctx, s, B * NH);

  const int64_t rows = B * NH * T;
  softmax_forward_kernel<St><<<row_blocks(rows), kRowsPerBlock * 32, 0, ctx.stream()>>>(
      att_f32, kFloat ? nullptr : att, keymask, span, rows, T, NH);
  DPO_CUDA_CHECK(cudaGetLastError());

  GemmParams<float, St, St> o{};  // out = att V
  o.a = {att_f32, NH * TT, TT, T, 1};
  o.b = {qkv + 2 * C, T * C3, hs, C3, 1};
  o.c = {out, T * C, hs, C};
  o.M = T, o.N = hs, o.K = T, o.NH = NH, o.alpha = 1.0f;
  launch_tri_gemm<Tri::kKUpToRow, true, false, false>(ctx, o, B * NH);
}

template <class St>
void attention_backward_impl(CudaContext& ctx, St* dqkv, const St* dout, const St* qkv, const St* att, int64_t B,
                             int64_t T, int64_t C, int64_t NH) {
  DPO_NVTX_RANGE("attention_backward");
  if (B == 0 || T == 0) return;
  check_shape("attention_backward", B, T, C, NH);
  const int64_t C3 = 3 * C, hs = C / NH, TT = T * T;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hs)));
  // dS scratch [B,NH,T,T], fp32 for either storage type; released with cudaFreeAsync on the stream after the
  // kernels below.
  const auto scratch = ctx.alloc(B * NH * TT * static_cast<int64_t>(sizeof(float)));
  float* ds = static_cast<float*>(scratch->data());

  GemmParams<St, St, float> dp{};  // ds <- dO V^T
  dp.a = {dout, T * C, hs, C, 1};
  dp.b = {qkv + 2 * C, T * C3, hs, 1, C3};
  dp.c = {ds, NH * TT, TT, T};
  dp.M = T, dp.N = T, dp.K = hs, dp.NH = NH, dp.alpha = 1.0f;
  launch_tri_gemm<Tri::kLowerTiles, true, true, false>(ctx, dp, B * NH);

  const int64_t rows = B * NH * T;
  softmax_backward_kernel<St><<<row_blocks(rows), kRowsPerBlock * 32, 0, ctx.stream()>>>(ds, att, rows, T, scale);
  DPO_CUDA_CHECK(cudaGetLastError());

  GemmParams<St, St, St> dv{};  // dV += att^T dO: A(m = s, k = t) = att[t, s]
  dv.a = {att, NH * TT, TT, 1, T};
  dv.b = {dout, T * C, hs, C, 1};
  dv.c = {dqkv + 2 * C, T * C3, hs, C3};
  dv.M = T, dv.N = hs, dv.K = T, dv.NH = NH, dv.alpha = 1.0f;
  launch_tri_gemm<Tri::kKFromRow, false, false, true>(ctx, dv, B * NH);

  GemmParams<float, St, St> dq{};  // dQ += dS K
  dq.a = {ds, NH * TT, TT, T, 1};
  dq.b = {qkv + C, T * C3, hs, C3, 1};
  dq.c = {dqkv, T * C3, hs, C3};
  dq.M = T, dq.N = hs, dq.K = T, dq.NH = NH, dq.alpha = 1.0f;
  launch_tri_gemm<Tri::kKUpToRow, true, false, true>(ctx, dq, B * NH);

  GemmParams<float, St, St> dk{};  // dK += dS^T Q: A(m = s, k = t) = dS[t, s]
  dk.a = {ds, NH * TT, TT, 1, T};
  dk.b = {qkv, T * C3, hs, C3, 1};
  dk.c = {dqkv + C, T * C3, hs, C3};
  dk.M = T, dk.N = hs, dk.K = T, dk.NH = NH, dk.alpha = 1.0f;
  launch_tri_gemm<Tri::kKFromRow, false, false, true>(ctx, dk, B * NH);
}

// --- incremental decoding (contract in kernels/attention.cuh) -----------------------------------------------------

constexpr int kStoreThreads = 256;

// One thread per (b, t, c) of the stored keys (and values); grid-stride, so any B*T*C fits the grid.
template <class St>
__global__ void __launch_bounds__(kStoreThreads)
    cache_store_kernel(St* __restrict__ kcache, St* __restrict__ vcache, const St* __restrict__ qkv, int64_t B,
                       int64_t T, int64_t Tc, int64_t C) {
  const int64_t n = B * T * C;
  const int64_t stride = int64_t(gridDim.x) * kStoreThreads;
  for (int64_t i = int64_t(blockIdx.x) * kStoreThreads + threadIdx.x; i < n; i += stride) {
    const int64_t c = i % C, bt = i / C, t = bt % T, b = bt / T;
    const St* src = qkv + bt * 3 * C;
    const int64_t dst = (b * Tc + t) * C + c;
    kcache[dst] = src[C + c];
    vcache[dst] = src[2 * C + c];
  }
}

// Block (b, h) = blockIdx.x (b * NH + h), kDecodeWarps warps. Dynamic shared memory: q [hs] then the per-warp
// partial sums [kDecodeWarps][hs], as floats. `scores` is a [B*NH, Tc] fp32 scratch: the scores, then exp(score -
// max), of this block's keys s <= p.
// The cache is written (the new k, v) and read (every key s <= p, the new one included) by the same block; the
// __syncthreads after the writes makes them visible to all its threads. Other blocks touch other heads or
// sequences only.
template <class St>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    decode_forward_kernel(St* __restrict__ out, St* __restrict__ kcache, St* __restrict__ vcache,
                          const St* __restrict__ qkv, const int32_t* __restrict__ pos, float* __restrict__ scores,
                          int64_t Tc, int64_t C, int64_t NH, float scale) {
  extern __shared__ float smem[];
  __shared__ float red[kDecodeWarps];
  const int64_t bh = blockIdx.x, b = bh / NH, h = bh % NH, hs = C / NH;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  constexpr int kThreadsDecode = kDecodeWarps * 32;
  St* o = out + b * C + h * hs;
  const int64_t p = pos[b];
  if (p < 0 || p >= Tc) {  // uniform over the block: nothing written to the cache, a loud NaN output
    for (int64_t i = tid; i < hs; i += kThreadsDecode) o[i] = from_float<St>(NAN);
    return;
  }
  const St* q = qkv + b * 3 * C + h * hs;
  St* kb = kcache + b * Tc * C + h * hs;  // the key of position s is kb[s * C + i], i < hs
  St* vb = vcache + b * Tc * C + h * hs;
  float* qs = smem;
  float* part = smem + hs;
  float* sc = scores + bh * Tc;

  for (int64_t i = tid; i < hs; i += kThreadsDecode) {
    kb[p * C + i] = q[C + i];
    vb[p * C + i] = q[2 * C + i];
    qs[i] = to_float(q[i]);
  }
  __syncthreads();

  // Scores: one warp per key, lanes over the channels, one butterfly sum.
  for (int64_t s = warp; s <= p; s += kDecodeWarps) {
    const St* k = kb + s * C;
    float d = 0.0f;
    for (int64_t i = lane; i < hs; i += 32) d = fmaf(qs[i], to_float(k[i]), d);
    d = warp_sum(d);
    if (lane == 0) sc[s] = d * scale;
  }
  __syncthreads();

  float mx = -INFINITY;
  for (int64_t s = tid; s <= p; s += kThreadsDecode) mx = fmaxf(mx, sc[s]);
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
  for (int w = 1; w < kDecodeWarps; ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();  // every thread has read red before it is reused for the sum

  float sum = 0.0f;
  for (int64_t s = tid; s <= p; s += kThreadsDecode) {
    const float e = expf(sc[s] - mx);
    sc[s] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  if (lane == 0) red[warp] = sum;
  __syncthreads();  // also orders the exp values in sc before the weighted sum reads them from other threads
  float total = 0.0f;
  for (int w = 0; w < kDecodeWarps; ++w) total += red[w];
  const float inv = 1.0f / total;  // total >= 1: the maximum's own term is exp(0)

  // Weighted sum of the values: warp w over its keys s = w, w + kDecodeWarps, ..., lanes over the channels.
  for (int64_t i = lane; i < hs; i += 32) {
    float a = 0.0f;
    for (int64_t s = warp; s <= p; s += kDecodeWarps) a = fmaf(sc[s], to_float(vb[s * C + i]), a);
    part[warp * hs + i] = a;
  }
  __syncthreads();
  for (int64_t i = tid; i < hs; i += kThreadsDecode) {
    float a = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) a += part[w * hs + i];
    o[i] = from_float<St>(a * inv);
  }
}

template <class St>
void attention_cache_store_impl(CudaContext& ctx, St* kcache, St* vcache, const St* qkv, int64_t B, int64_t T,
                                int64_t Tc, int64_t C) {
  DPO_NVTX_RANGE("attention_cache_store");
  DPO_ASSERT(B >= 0 && T >= 0 && C > 0, "attention_cache_store: B, T must be >= 0 and C > 0");
  DPO_ASSERT(T <= Tc, "attention_cache_store: " + std::to_string(T) + " positions do not fit a cache of " +
                          std::to_string(Tc));
  const int64_t n = B * T * C;
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kStoreThreads - 1) / kStoreThreads, int64_t(1) << 20);
  cache_store_kernel<St><<<static_cast<unsigned>(blocks), kStoreThreads, 0, ctx.stream()>>>(kcache, vcache, qkv, B,
                                                                                            T, Tc, C);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class St>
void attention_decode_forward_impl(CudaContext& ctx, St* out, St* kcache, St* vcache, const St* qkv,
                                   const int32_t* pos, int64_t B, int64_t Tc, int64_t C, int64_t NH) {
  DPO_NVTX_RANGE("attention_decode_forward");
  if (B == 0) return;
  DPO_ASSERT(NH > 0 && C > 0 && C % NH == 0, "attention_decode_forward: C must be a positive multiple of NH");
  DPO_ASSERT(Tc > 0, "attention_decode_forward: the cache has no positions");
  const int64_t hs = C / NH;
  DPO_ASSERT(hs <= kDecodeMaxHeadSize, "attention_decode_forward: head size " + std::to_string(hs) +
                                           " exceeds the kernel's " + std::to_string(kDecodeMaxHeadSize));
  DPO_ASSERT(B * NH <= INT_MAX, "attention_decode_forward: B*NH exceeds the grid's x range");
  const auto scratch = ctx.alloc(B * NH * Tc * static_cast<int64_t>(sizeof(float)));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hs)));
  const size_t smem = static_cast<size_t>((kDecodeWarps + 1) * hs) * sizeof(float);
  decode_forward_kernel<St><<<static_cast<unsigned>(B * NH), kDecodeWarps * 32, smem, ctx.stream()>>>(
      out, kcache, vcache, qkv, pos, static_cast<float*>(scratch->data()), Tc, C, NH, scale);
  DPO_CUDA_CHECK(cudaGetLastError());
}

// One warp per row (kernels/attention.cuh, "Spans of a key mask"). Each lane's first real slot is its smallest (its
// slots ascend), the butterfly min gives the row's; the warp's row is the same for all its lanes, so the early
// return keeps whole warps and every lane reaches the shuffles.
constexpr int kSpanRowsPerBlock = 4;

template <class M>
__global__ void __launch_bounds__(kSpanRowsPerBlock * 32)
    keymask_spans_kernel(int32_t* span, float* mask_copy, const M* mask, int64_t B, int64_t T) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kSpanRowsPerBlock + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (b >= B) return;
  const M* m = mask != nullptr ? mask + b * T : nullptr;
  long long lo = static_cast<long long>(T);
  for (int64_t t = lane; t < T; t += 32)
    if (m == nullptr || m[t] != M(0)) {
      lo = t;
      break;
    }
  for (int off = 16; off > 0; off >>= 1) {
    const long long o = __shfl_xor_sync(0xffffffffu, lo, off);
    lo = o < lo ? o : lo;
  }
  for (int64_t t = lane; t < T; t += 32) {
    const bool real = m == nullptr || m[t] != M(0);
    int32_t* sp = span + (b * T + t) * kSpanWidth;
    sp[kSpanLo] = static_cast<int32_t>(real ? lo : t);
    sp[kSpanHoleLo] = static_cast<int32_t>(t);
    sp[kSpanHoleHi] = static_cast<int32_t>(t);
    if (mask_copy != nullptr) mask_copy[b * T + t] = real ? 1.0f : 0.0f;
  }
}

template <class M>
void keymask_spans_impl(CudaContext& ctx, int32_t* span, float* mask_copy, const M* mask, int64_t B, int64_t T) {
  DPO_ASSERT(B >= 0 && T >= 0 && T <= INT32_MAX, "attention_keymask_spans: bad sizes B=" + std::to_string(B) +
                                                     " T=" + std::to_string(T));
  if (B == 0 || T == 0) return;
  const int64_t blocks = (B + kSpanRowsPerBlock - 1) / kSpanRowsPerBlock;
  DPO_ASSERT(blocks <= INT32_MAX, "attention_keymask_spans: B too large");
  keymask_spans_kernel<M><<<static_cast<unsigned>(blocks), kSpanRowsPerBlock * 32, 0, ctx.stream()>>>(
      span, mask_copy, mask, B, T);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void attention_keymask_spans(CudaContext& ctx, int32_t* span, float* mask_copy, const int32_t* keymask, int64_t B,
                             int64_t T) {
  keymask_spans_impl(ctx, span, mask_copy, keymask, B, T);
}
void attention_keymask_spans(CudaContext& ctx, int32_t* span, const float* mask, int64_t B, int64_t T) {
  DPO_ASSERT(mask != nullptr || B * T == 0, "attention_keymask_spans: mask is null");
  keymask_spans_impl<float>(ctx, span, nullptr, mask, B, T);
}

void attention_forward(CudaContext& ctx, float* out, float* att, const float* qkv, const int32_t* keymask, int64_t B,
                       int64_t T, int64_t C, int64_t NH) {
  attention_forward_impl(ctx, out, att, qkv, keymask, nullptr, B, T, C, NH);
}
void attention_forward(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* att, const __nv_bfloat16* qkv,
                       const int32_t* keymask, int64_t B, int64_t T, int64_t C, int64_t NH) {
  attention_forward_impl(ctx, out, att, qkv, keymask, nullptr, B, T, C, NH);
}

void attention_forward_spans(CudaContext& ctx, float* out, float* att, const float* qkv, const int32_t* span,
                             int64_t B, int64_t T, int64_t C, int64_t NH) {
  DPO_ASSERT(span != nullptr || B * T == 0, "attention_forward_spans: span is null");
  attention_forward_impl(ctx, out, att, qkv, nullptr, span, B, T, C, NH);
}
void attention_forward_spans(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* att, const __nv_bfloat16* qkv,
                             const int32_t* span, int64_t B, int64_t T, int64_t C, int64_t NH) {
  DPO_ASSERT(span != nullptr || B * T == 0, "attention_forward_spans: span is null");
  attention_forward_impl(ctx, out, att, qkv, nullptr, span, B, T, C, NH);
}

void attention_backward(CudaContext& ctx, float* dqkv, const float* dout, const float* qkv, const float* att,
                        int64_t B, int64_t T, int64_t C, int64_t NH) {
  attention_backward_impl(ctx, dqkv, dout, qkv, att, B, T, C, NH);
}
void attention_backward(CudaContext& ctx, __nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                        const __nv_bfloat16* att, int64_t B, int64_t T, int64_t C, int64_t NH) {
  attention_backward_impl(ctx, dqkv, dout, qkv, att, B, T, C, NH);
}

void attention_cache_store(CudaContext& ctx, float* kcache, float* vcache, const float* qkv, int64_t B, int64_t T,
                           int64_t Tc, int64_t C) {
  attention_cache_store_impl(ctx, kcache, vcache, qkv, B, T, Tc, C);
}
void attention_cache_store(CudaContext& ctx, __nv_bfloat16* kcache, __nv_bfloat16* vcache, const __nv_bfloat16* qkv,
                           int64_t B, int64_t T, int64_t Tc, int64_t C) {
  attention_cache_store_impl(ctx, kcache, vcache, qkv, B, T, Tc, C);
}

void attention_decode_forward(CudaContext& ctx, float* out, float* kcache, float* vcache, const float* qkv,
                              const int32_t* pos, int64_t B, int64_t Tc, int64_t C, int64_t NH) {
  attention_decode_forward_impl(ctx, out, kcache, vcache, qkv, pos, B, Tc, C, NH);
}
void attention_decode_forward(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* kcache, __nv_bfloat16* vcache,
                              const __nv_bfloat16* qkv, const int32_t* pos, int64_t B, int64_t Tc, int64_t C,
                              int64_t NH) {
  attention_decode_forward_impl(ctx, out, kcache, vcache, qkv, pos, B, Tc, C, NH);
}

}  // namespace dpo::cuda
