#include "kernels/layernorm.cuh"

#include <algorithm>
#include <string>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;    // rows per block in the warp-per-row kernels
constexpr int kChannelTile = 128;    // dw/db: channels per block
constexpr int64_t kMaxChunks = 512;  // dw/db: at most this many row chunks (partials per channel)
constexpr int64_t kMinChunkRows = 32;

// Butterfly sum: every lane ends with bitwise the same value (float addition is commutative, and at each level lane
// i and lane i^o add the same two numbers).
static __device__ float warp_sum(float v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Rows: each row is split on its own (kernels/bf16.cuh), since a row's address depends on the row index (C need not
// be a multiple of the vector width) and the view on its offset. The lanes take the row's 16-byte groups and its
// scalar edges in turn; each lane accumulates its elements in the order it meets them. The per-element expressions
// are the same in both paths; which lane adds which element (and so the float rounding of the row sums) follows the
// split.
// kResidual (residual_layernorm_forward): the row x is first computed as res = a + b, element for element as
// residual_forward computes it, stored (res_out), and the statistics are taken from the stored values; the split
// is that of the plain kernel over res_out (views res_out, out, w, b), so each lane meets the same elements in the
// same order as the plain kernel does over res_out, and the two are bitwise equal. a and b are moved 128 bits at
// a time where their row is aligned with that split, element by element otherwise (the same values either way).
template <class T>
static __device__ __forceinline__ Pack<T, 16 / sizeof(T)> load_pack_or_scalars(const T* p, int64_t i, bool vec) {
  constexpr int G = 16 / sizeof(T);
  if (vec) return load_pack<G>(p, i);
  Pack<T, G> v;
#pragma unroll
  for (int j = 0; j < G; ++j) v.e[j] = p[i + j];
  return v;
}

template <class T, bool kResidual>
static __global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, T* res, const T* ra,
                                                const T* rb, const T* w, const T* b, int64_t N, int64_t C,
                                                float eps) {
  constexpr int G = 16 / sizeof(T);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= N) return;  // the whole warp leaves together
  const T* x = (kResidual ? res : inp) + row * C;
  T* o = out + row * C;
  const VecView views[] = {{x, sizeof(T)}, {o, sizeof(T)}, {w, sizeof(T)}, {b, sizeof(T)}};
  const int64_t head = vec_head(C, G, views, 4);
  const float fc = static_cast<float>(C);
  float s = 0.0f;
  float x0;
  if constexpr (kResidual) {
    const T* pa = ra + row * C;
    const T* pb = rb + row * C;
    T* xr = res + row * C;
    // res may alias a or b: every lane reads element 0 before its owner overwrites it.
    x0 = to_float(from_float<T>(to_float(pa[0]) + to_float(pb[0])));
    __syncwarp();
    const bool va = (reinterpret_cast<uintptr_t>(pa + head) % 16) == 0;
    const bool vb = (reinterpret_cast<uintptr_t>(pb + head) % 16) == 0;
    split_loop<G>(
        lane, kWarpSize, C, head,
        [&](int64_t c) {
          const T r = from_float<T>(to_float(pa[c]) + to_float(pb[c]));
          xr[c] = r;
          s += to_float(r) - x0;
        },
        [&](int64_t c) {
          const Pack<T, G> av = load_pack_or_scalars(pa, c, va), bv = load_pack_or_scalars(pb, c, vb);
          Pack<T, G> rv;
#pragma unroll
          for (int j = 0; j < G; ++j) rv.e[j] = from_float<T>(to_float(av.e[j]) + to_float(bv.e[j]));
          store_pack<G>(xr, c, rv);
#pragma unroll
          for (int j = 0; j < G; ++j) s += to_float(rv.e[j]) - x0;
        });
    // The passes below read res_out back: each element by the lane that wrote it (the same split), so program
    // order makes the writes visible.
  } else {
    x0 = to_float(x[0]);
    split_loop<G>(
        lane, kWarpSize, C, head, [&](int64_t c) { s += to_float(x[c]) - x0; },
        [&](int64_t c) {
          const Pack<T, G> xv = load_pack<G>(x, c);
#pragma unroll
          for (int j = 0; j < G; ++j) s += to_float(xv.e[j]) - x0;
        });
  }
  const float delta = warp_sum(s) / fc;  // mean - x0
  float v = 0.0f;
  auto var_term = [&](float xc) {
    const float d = (xc - x0) - delta;
    v += d * d;
  };
  split_loop<G>(
      lane, kWarpSize, C, head, [&](int64_t c) { var_term(to_float(x[c])); },
      [&](int64_t c) {
        const Pack<T, G> xv = load_pack<G>(x, c);
#pragma unroll
        for (int j = 0; j < G; ++j) var_term(to_float(xv.e[j]));
      });
  const float var = warp_sum(v) / fc;
  const float rs = 1.0f / sqrtf(var + eps);
  auto norm = [&](float xc, float wc, float bc) { return from_float<T>(((xc - x0) - delta) * rs * wc + bc); };
  split_loop<G>(
      lane, kWarpSize, C, head, [&](int64_t c) { o[c] = norm(to_float(x[c]), to_float(w[c]), to_float(b[c])); },
      [&](int64_t c) {
        const Pack<T, G> xv = load_pack<G>(x, c), wv = load_pack<G>(w, c), bv = load_pack<G>(b, c);
        Pack<T, G> ov;
#pragma unroll
        for (int j = 0; j < G; ++j) ov.e[j] = norm(to_float(xv.e[j]), to_float(wv.e[j]), to_float(bv.e[j]));
        store_pack<G>(o, c, ov);
      });
  if (lane == 0) {
    mean[row] = x0 + delta;
    rstd[row] = rs;
  }
}

// One row of the backward, by one warp: dinp (+=, or = with kOverwrite: the old dinp is not read, the same
// expression with 0 in its place; kernels/common.h, GradWrite). kPartials: also adds the row's dw, db terms
// (dout * xn, dout) into the warp's own shared accumulators sw[C], sb[C]; each channel is visited by exactly one
// lane per row, and the caller syncs the warp between rows (the split, and so the lane of a channel, can change
// from row to row).
template <class T, bool kOverwrite, bool kPartials>
static __device__ __forceinline__ void layernorm_backward_row(T* dinp, const T* dout, const T* inp, const T* w,
                                                              const float* mean, const float* rstd, int64_t row,
                                                              int64_t C, int lane, float* sw, float* sb) {
  constexpr int G = 16 / sizeof(T);
  const T* x = inp + row * C;
  const T* d = dout + row * C;
  T* di = dinp + row * C;
  const VecView views[] = {{x, sizeof(T)}, {d, sizeof(T)}, {w, sizeof(T)}, {di, sizeof(T)}};
  const int64_t head = vec_head(C, G, views, 4);
  const float m = mean[row], s = rstd[row];
  const float fc = static_cast<float>(C);
  float dnorm = 0.0f, dnorm_xn = 0.0f;
  auto sums = [&](float xc, float wc, float dc) {
    const float xn = (xc - m) * s;
    const float dn = wc * dc;
    dnorm += dn;
    dnorm_xn += dn * xn;
  };
  split_loop<G>(
      lane, kWarpSize, C, head, [&](int64_t c) { sums(to_float(x[c]), to_float(w[c]), to_float(d[c])); },
      [&](int64_t c) {
        const Pack<T, G> xv = load_pack<G>(x, c), wv = load_pack<G>(w, c), dv = load_pack<G>(d, c);
#pragma unroll
        for (int j = 0; j < G; ++j) sums(to_float(xv.e[j]), to_float(wv.e[j]), to_float(dv.e[j]));
      });
  const float dnorm_mean = warp_sum(dnorm) / fc;
  const float dnorm_norm_mean = warp_sum(dnorm_xn) / fc;
  // The (+=) term of one element: read dinp, add in float, round once; and the dw, db terms of the element.
  auto grad = [&](int64_t c, float xc, float wc, float dc, float dic) {
    const float xn = (xc - m) * s;
    const float dn = wc * dc;
    if constexpr (kPartials) {
      sw[c] += dc * xn;
      sb[c] += dc;
    }
    return from_float<T>(dic + (dn - dnorm_mean - xn * dnorm_norm_mean) * s);
  };
  split_loop<G>(
      lane, kWarpSize, C, head,
      [&](int64_t c) {
        const float old = kOverwrite ? 0.0f : to_float(di[c]);
        di[c] = grad(c, to_float(x[c]), to_float(w[c]), to_float(d[c]), old);
      },
      [&](int64_t c) {
        const Pack<T, G> xv = load_pack<G>(x, c), wv = load_pack<G>(w, c), dv = load_pack<G>(d, c);
        Pack<T, G> iv;
        if constexpr (!kOverwrite) iv = load_pack<G>(di, c);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const float old = kOverwrite ? 0.0f : to_float(iv.e[j]);
          iv.e[j] = grad(c + j, to_float(xv.e[j]), to_float(wv.e[j]), to_float(dv.e[j]), old);
        }
        store_pack<G>(di, c, iv);
      });
}

// Two-pass form, pass 0: dinp only, one warp per row.
template <class T, bool kOverwrite>
static __global__ void layernorm_backward_dinp_kernel(T* dinp, const T* dout, const T* inp, const T* w,
                                                      const float* mean, const float* rstd, int64_t N, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= N) return;
  layernorm_backward_row<T, kOverwrite, false>(dinp, dout, inp, w, mean, rstd, row, C, lane, nullptr, nullptr);
}

// One-pass form: block r owns the row chunk [r * chunk_rows, min(N, (r + 1) * chunk_rows)); warp k takes its rows
// k, k + kWarpsPerBlock, ... in ascending order, writes their dinp and adds their dw, db terms into its own shared
// accumulators (dynamic shared memory, 2 * kWarpsPerBlock * C floats); then one thread per channel adds the warps'
// sums in warp order and writes the chunk's partials (=). dout and inp are read once (the two-pass form reads them
// twice). The summation order depends on N and C only, so dw and db are bitwise reproducible.
template <class T, bool kOverwrite>
static __global__ void layernorm_backward_onepass_kernel(T* dinp, float* pw, float* pb, const T* dout, const T* inp,
                                                         const T* w, const float* mean, const float* rstd, int64_t N,
                                                         int64_t C, int64_t chunk_rows) {
  extern __shared__ float acc[];  // [kWarpsPerBlock][2][C]
  const int warp = static_cast<int>(threadIdx.x / kWarpSize);
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  float* sw = acc + static_cast<int64_t>(warp) * 2 * C;
  float* sb = sw + C;
  for (int64_t c = lane; c < C; c += kWarpSize) {
    sw[c] = 0.0f;
    sb[c] = 0.0f;
  }
  __syncwarp();
  const int64_t r = blockIdx.x;
  const int64_t n0 = r * chunk_rows;
  const int64_t n1 = n0 + chunk_rows < N ? n0 + chunk_rows : N;
  for (int64_t row = n0 + warp; row < n1; row += kWarpsPerBlock) {
    layernorm_backward_row<T, kOverwrite, true>(dinp, dout, inp, w, mean, rstd, row, C, lane, sw, sb);
    __syncwarp();  // the next row's split may give a channel to another lane
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarpsPerBlock; ++k) {
      a += acc[static_cast<int64_t>(k) * 2 * C + c];
      b += acc[static_cast<int64_t>(k) * 2 * C + C + c];
    }
    pw[r * C + c] = a;
    pb[r * C + c] = b;
  }
}

// Pass 1: block (j, r) sums rows [r*chunk_rows, ...) for channels [j*kChannelTile, ...), rows in ascending order.
template <class T>
static __global__ void layernorm_backward_partial_kernel(float* pw, float* pb, const T* dout, const T* inp,
                                                         const float* mean, const float* rstd, int64_t N, int64_t C,
                                                         int64_t chunk_rows) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelTile + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (c >= C) return;
  const int64_t n0 = r * chunk_rows;
  const int64_t n1 = n0 + chunk_rows < N ? n0 + chunk_rows : N;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t n = n0; n < n1; ++n) {
    const float d = to_float(dout[n * C + c]);
    sw += d * ((to_float(inp[n * C + c]) - mean[n]) * rstd[n]);
    sb += d;
  }
  pw[r * C + c] = sw;
  pb[r * C + c] = sb;
}

// Pass 2: one thread per channel adds the chunks' partials in chunk order, then accumulates into dw, db.
static __global__ void layernorm_backward_reduce_kernel(float* dw, float* db, const float* pw, const float* pb,
                                                        int64_t chunks, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t r = 0; r < chunks; ++r) {
    sw += pw[r * C + c];
    sb += pb[r * C + c];
  }
  dw[c] += sw;
  db[c] += sb;
}

static unsigned row_blocks(int64_t N, const char* fn) {
  const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  DPO_ASSERT(blocks <= INT32_MAX, std::string(fn) + ": N = " + std::to_string(N) + " exceeds one launch");
  return static_cast<unsigned>(blocks);
}

template <class T>
static void layernorm_forward_impl(CudaContext& ctx, T* out, float* mean, float* rstd, const T* inp, const T* w,
                                   const T* b, int64_t N, int64_t C, double eps) {
  DPO_NVTX_RANGE("layernorm_forward");
  if (N <= 0 || C <= 0) return;
  layernorm_forward_kernel<T, false>
      <<<row_blocks(N, "layernorm_forward"), kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(
          out, mean, rstd, inp, nullptr, nullptr, nullptr, w, b, N, C, static_cast<float>(eps));
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void residual_layernorm_forward_impl(CudaContext& ctx, T* res_out, T* out, float* mean, float* rstd,
                                            const T* a, const T* b, const T* w, const T* bias, int64_t N, int64_t C,
                                            double eps) {
  DPO_NVTX_RANGE("residual_layernorm_forward");
  if (N <= 0 || C <= 0) return;
  layernorm_forward_kernel<T, true>
      <<<row_blocks(N, "residual_layernorm_forward"), kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(
          out, mean, rstd, nullptr, res_out, a, b, w, bias, N, C, static_cast<float>(eps));
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void layernorm_backward_impl(CudaContext& ctx, T* dinp, float* dw, float* db, const T* dout, const T* inp,
                                    const T* w, const float* mean, const float* rstd, int64_t N, int64_t C,
                                    GradWrite dinp_write) {
  DPO_NVTX_RANGE("layernorm_backward");
  if (N <= 0 || C <= 0) return;
  const bool ow = dinp_write == GradWrite::Overwrite;
  // The chunking depends on N only, never on the device, so the summation order is fixed.
  const int64_t chunk_rows = std::max(kMinChunkRows, (N + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
  const int64_t tiles = (C + kChannelTile - 1) / kChannelTile;
  DPO_ASSERT(tiles <= INT32_MAX, "layernorm_backward: C = " + std::to_string(C) + " exceeds one launch");
  float* pw = static_cast<float*>(ctx.scratch(2 * chunks * C * static_cast<int64_t>(sizeof(float))));
  float* pb = pw + chunks * C;
  // One pass where the per-warp accumulators fit in a block's shared memory (C <= 3.5k on an H100; GPT-2 124M's
  // C = 768 takes exactly the default 48 KiB), else the two-pass form.
  const size_t smem = static_cast<size_t>(2 * kWarpsPerBlock) * static_cast<size_t>(C) * sizeof(float);
  if (smem <= static_cast<size_t>(ctx.props().sharedMemPerBlockOptin)) {
    auto kernel = ow ? layernorm_backward_onepass_kernel<T, true> : layernorm_backward_onepass_kernel<T, false>;
    if (smem > 48u * 1024u) {
      DPO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(chunks), kWarpsPerBlock * kWarpSize, smem, ctx.stream()>>>(
        dinp, pw, pb, dout, inp, w, mean, rstd, N, C, chunk_rows);
    DPO_CUDA_CHECK(cudaGetLastError());
  } else {
    const unsigned blocks = row_blocks(N, "layernorm_backward");
    if (ow) {
      layernorm_backward_dinp_kernel<T, true>
          <<<blocks, kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(dinp, dout, inp, w, mean, rstd, N, C);
    } else {
      layernorm_backward_dinp_kernel<T, false>
          <<<blocks, kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(dinp, dout, inp, w, mean, rstd, N, C);
    }
    DPO_CUDA_CHECK(cudaGetLastError());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
    layernorm_backward_partial_kernel<T><<<grid, kChannelTile, 0, ctx.stream()>>>(pw, pb, dout, inp, mean, rstd, N,
                                                                                  C, chunk_rows);
    DPO_CUDA_CHECK(cudaGetLastError());
  }
  layernorm_backward_reduce_kernel<<<static_cast<unsigned>(tiles), kChannelTile, 0, ctx.stream()>>>(dw, db, pw, pb,
                                                                                                    chunks, C);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void layernorm_forward(CudaContext& ctx, float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, double eps) {
  layernorm_forward_impl(ctx, out, mean, rstd, inp, w, b, N, C, eps);
}
void layernorm_forward(CudaContext& ctx, __nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* inp,
                       const __nv_bfloat16* w, const __nv_bfloat16* b, int64_t N, int64_t C, double eps) {
  layernorm_forward_impl(ctx, out, mean, rstd, inp, w, b, N, C, eps);
}

void residual_layernorm_forward(CudaContext& ctx, float* res_out, float* out, float* mean, float* rstd,
                                const float* a, const float* b, const float* w, const float* bias, int64_t N,
                                int64_t C, double eps) {
  residual_layernorm_forward_impl(ctx, res_out, out, mean, rstd, a, b, w, bias, N, C, eps);
}
void residual_layernorm_forward(CudaContext& ctx, __nv_bfloat16* res_out, __nv_bfloat16* out, float* mean,
                                float* rstd, const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* w,
                                const __nv_bfloat16* bias, int64_t N, int64_t C, double eps) {
  residual_layernorm_forward_impl(ctx, res_out, out, mean, rstd, a, b, w, bias, N, C, eps);
}

void layernorm_backward(CudaContext& ctx, float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C,
                        GradWrite dinp_write) {
  layernorm_backward_impl(ctx, dinp, dw, db, dout, inp, w, mean, rstd, N, C, dinp_write);
}
void layernorm_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, float* db, const __nv_bfloat16* dout,
                        const __nv_bfloat16* inp, const __nv_bfloat16* w, const float* mean, const float* rstd,
                        int64_t N, int64_t C, GradWrite dinp_write) {
  layernorm_backward_impl(ctx, dinp, dw, db, dout, inp, w, mean, rstd, N, C, dinp_write);
}

}  // namespace dpo::cuda
