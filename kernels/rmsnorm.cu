#include "kernels/rmsnorm.cuh"

#include <algorithm>
#include <string>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;    // rows per block in the warp-per-row kernels
constexpr int kChannelTile = 128;    // dw: channels per block
constexpr int64_t kMaxChunks = 512;  // dw: at most this many row chunks (partials per channel)
constexpr int64_t kMinChunkRows = 32;

// Butterfly sum: every lane ends with bitwise the same value.
__device__ float warp_sum(float v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The forward's per-element value (kernels/rmsnorm.cuh): bf16 rounds x * rstd before the weight (HF's order).
template <class T>
__device__ __forceinline__ T rms_out(float x, float rs, float w) {
  return from_float<T>(to_float(from_float<T>(x * rs)) * w);
}

// 128-bit loads of a row of a or b when that row is aligned with the split, element by element otherwise.
template <class T>
__device__ __forceinline__ Pack<T, 16 / sizeof(T)> load_pack_or_scalars(const T* p, int64_t i, bool vec) {
  constexpr int G = 16 / sizeof(T);
  if (vec) return load_pack<G>(p, i);
  Pack<T, G> v;
#pragma unroll
  for (int j = 0; j < G; ++j) v.e[j] = p[i + j];
  return v;
}

// One warp per row. kResidual: the row is first res = a + b (stored into res; res may alias a or b: each element is
// read and written by the same lane, and no other lane reads it), then normalised from the stored values with the
// split of the plain kernel over res (views res, out, w), so each lane meets the same elements in the same order.
template <class T, bool kResidual>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, T* res, const T* ra, const T* rb,
                                       const T* w, int64_t N, int64_t C, float eps) {
  constexpr int G = 16 / sizeof(T);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= N) return;  // the whole warp leaves together
  const T* x = (kResidual ? res : inp) + row * C;
  T* o = out + row * C;
  const VecView views[] = {{x, sizeof(T)}, {o, sizeof(T)}, {w, sizeof(T)}};
  const int64_t head = vec_head(C, G, views, 3);
  float ss = 0.0f;
  if constexpr (kResidual) {
    const T* pa = ra + row * C;
    const T* pb = rb + row * C;
    T* xr = res + row * C;
    const bool va = (reinterpret_cast<uintptr_t>(pa + head) % 16) == 0;
    const bool vb = (reinterpret_cast<uintptr_t>(pb + head) % 16) == 0;
    split_loop<G>(
        lane, kWarpSize, C, head,
        [&](int64_t c) {
          const T r = from_float<T>(to_float(pa[c]) + to_float(pb[c]));
          xr[c] = r;
          const float v = to_float(r);
          ss += v * v;
        },
        [&](int64_t c) {
          const Pack<T, G> av = load_pack_or_scalars(pa, c, va), bv = load_pack_or_scalars(pb, c, vb);
          Pack<T, G> rv;
#pragma unroll
          for (int j = 0; j < G; ++j) rv.e[j] = from_float<T>(to_float(av.e[j]) + to_float(bv.e[j]));
          store_pack<G>(xr, c, rv);
#pragma unroll
          for (int j = 0; j < G; ++j) {
            const float v = to_float(rv.e[j]);
            ss += v * v;
          }
        });
    // The output pass reads res back: each element by the lane that wrote it (the same split).
  } else {
    split_loop<G>(
        lane, kWarpSize, C, head,
        [&](int64_t c) {
          const float v = to_float(x[c]);
          ss += v * v;
        },
        [&](int64_t c) {
          const Pack<T, G> xv = load_pack<G>(x, c);
#pragma unroll
          for (int j = 0; j < G; ++j) {
            const float v = to_float(xv.e[j]);
            ss += v * v;
          }
        });
  }
  const float rs = 1.0f / sqrtf(warp_sum(ss) / static_cast<float>(C) + eps);
  split_loop<G>(
      lane, kWarpSize, C, head, [&](int64_t c) { o[c] = rms_out<T>(to_float(x[c]), rs, to_float(w[c])); },
      [&](int64_t c) {
        const Pack<T, G> xv = load_pack<G>(x, c), wv = load_pack<G>(w, c);
        Pack<T, G> ov;
#pragma unroll
        for (int j = 0; j < G; ++j) ov.e[j] = rms_out<T>(to_float(xv.e[j]), rs, to_float(wv.e[j]));
        store_pack<G>(o, c, ov);
      });
  if (lane == 0) rstd[row] = rs;
}

// One row of the backward, by one warp: dinp (+=, or = with kOverwrite: the old dinp is not read, 0 in its place).
// kPartials: also adds the row's dw terms (dout * xn) into the warp's own shared accumulators sw[C]; each channel is
// visited by exactly one lane per row, and the caller syncs the warp between rows.
template <class T, bool kOverwrite, bool kPartials>
__device__ __forceinline__ void rmsnorm_backward_row(T* dinp, const T* dout, const T* inp, const T* w,
                                                     const float* rstd, int64_t row, int64_t C, int lane, float* sw) {
  constexpr int G = 16 / sizeof(T);
  const T* x = inp + row * C;
  const T* d = dout + row * C;
  T* di = dinp + row * C;
  const VecView views[] = {{x, sizeof(T)}, {d, sizeof(T)}, {w, sizeof(T)}, {di, sizeof(T)}};
  const int64_t head = vec_head(C, G, views, 4);
  const float s = rstd[row];
  float gx = 0.0f;
  auto sums = [&](float xc, float wc, float dc) { gx += (wc * dc) * (xc * s); };
  split_loop<G>(
      lane, kWarpSize, C, head, [&](int64_t c) { sums(to_float(x[c]), to_float(w[c]), to_float(d[c])); },
      [&](int64_t c) {
        const Pack<T, G> xv = load_pack<G>(x, c), wv = load_pack<G>(w, c), dv = load_pack<G>(d, c);
#pragma unroll
        for (int j = 0; j < G; ++j) sums(to_float(xv.e[j]), to_float(wv.e[j]), to_float(dv.e[j]));
      });
  const float gx_mean = warp_sum(gx) / static_cast<float>(C);
  auto grad = [&](int64_t c, float xc, float wc, float dc, float dic) {
    const float xn = xc * s;
    if constexpr (kPartials) sw[c] += dc * xn;
    return from_float<T>(dic + (wc * dc - xn * gx_mean) * s);
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
__global__ void rmsnorm_backward_dinp_kernel(T* dinp, const T* dout, const T* inp, const T* w, const float* rstd,
                                             int64_t N, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= N) return;
  rmsnorm_backward_row<T, kOverwrite, false>(dinp, dout, inp, w, rstd, row, C, lane, nullptr);
}

// One-pass form: block r owns rows [r * chunk_rows, min(N, (r + 1) * chunk_rows)); warp k takes rows k,
// k + kWarpsPerBlock, ... in ascending order into its own shared accumulators (kWarpsPerBlock * C floats), then one
// thread per channel adds the warps' sums in warp order into the chunk's partial (=).
template <class T, bool kOverwrite>
__global__ void rmsnorm_backward_onepass_kernel(T* dinp, float* pw, const T* dout, const T* inp, const T* w,
                                                const float* rstd, int64_t N, int64_t C, int64_t chunk_rows) {
  extern __shared__ float acc[];  // [kWarpsPerBlock][C]
  const int warp = static_cast<int>(threadIdx.x / kWarpSize);
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  float* sw = acc + static_cast<int64_t>(warp) * C;
  for (int64_t c = lane; c < C; c += kWarpSize) sw[c] = 0.0f;
  __syncwarp();
  const int64_t r = blockIdx.x;
  const int64_t n0 = r * chunk_rows;
  const int64_t n1 = n0 + chunk_rows < N ? n0 + chunk_rows : N;
  for (int64_t row = n0 + warp; row < n1; row += kWarpsPerBlock) {
    rmsnorm_backward_row<T, kOverwrite, true>(dinp, dout, inp, w, rstd, row, C, lane, sw);
    __syncwarp();  // the next row's split may give a channel to another lane
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float a = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarpsPerBlock; ++k) a += acc[static_cast<int64_t>(k) * C + c];
    pw[r * C + c] = a;
  }
}

// Two-pass form, pass 1: block (j, r) sums rows [r * chunk_rows, ...) of channels [j * kChannelTile, ...) in order.
template <class T>
__global__ void rmsnorm_backward_partial_kernel(float* pw, const T* dout, const T* inp, const float* rstd, int64_t N,
                                                int64_t C, int64_t chunk_rows) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelTile + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (c >= C) return;
  const int64_t n0 = r * chunk_rows;
  const int64_t n1 = n0 + chunk_rows < N ? n0 + chunk_rows : N;
  float sw = 0.0f;
  for (int64_t n = n0; n < n1; ++n) sw += to_float(dout[n * C + c]) * (to_float(inp[n * C + c]) * rstd[n]);
  pw[r * C + c] = sw;
}

// The chunks' partials of each channel added in chunk order, then onto dw.
__global__ void rmsnorm_backward_reduce_kernel(float* dw, const float* pw, int64_t chunks, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f;
  for (int64_t r = 0; r < chunks; ++r) sw += pw[r * C + c];
  dw[c] += sw;
}

unsigned row_blocks(int64_t N, const char* fn) {
  const int64_t blocks = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  DPO_ASSERT(blocks <= INT32_MAX, std::string(fn) + ": N = " + std::to_string(N) + " exceeds one launch");
  return static_cast<unsigned>(blocks);
}

template <class T>
void forward_impl(CudaContext& ctx, T* res_out, T* out, float* rstd, const T* inp, const T* a, const T* b, const T* w,
                  int64_t N, int64_t C, double eps) {
  const bool residual = res_out != nullptr;
  DPO_NVTX_RANGE(residual ? "residual_rmsnorm_forward" : "rmsnorm_forward");
  if (N <= 0 || C <= 0) return;
  const unsigned blocks = row_blocks(N, residual ? "residual_rmsnorm_forward" : "rmsnorm_forward");
  if (residual) {
    rmsnorm_forward_kernel<T, true><<<blocks, kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(
        out, rstd, nullptr, res_out, a, b, w, N, C, static_cast<float>(eps));
  } else {
    rmsnorm_forward_kernel<T, false><<<blocks, kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(
        out, rstd, inp, nullptr, nullptr, nullptr, w, N, C, static_cast<float>(eps));
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void backward_impl(CudaContext& ctx, T* dinp, float* dw, const T* dout, const T* inp, const T* w, const float* rstd,
                   int64_t N, int64_t C, GradWrite dinp_write) {
  DPO_NVTX_RANGE("rmsnorm_backward");
  if (N <= 0 || C <= 0) return;
  const bool ow = dinp_write == GradWrite::Overwrite;
  // The chunking depends on N only, never on the device, so the summation order is fixed.
  const int64_t chunk_rows = std::max(kMinChunkRows, (N + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
  const int64_t tiles = (C + kChannelTile - 1) / kChannelTile;
  DPO_ASSERT(tiles <= INT32_MAX, "rmsnorm_backward: C = " + std::to_string(C) + " exceeds one launch");
  float* pw = static_cast<float*>(ctx.scratch(chunks * C * static_cast<int64_t>(sizeof(float))));
  const size_t smem = static_cast<size_t>(kWarpsPerBlock) * static_cast<size_t>(C) * sizeof(float);
  if (smem <= static_cast<size_t>(ctx.props().sharedMemPerBlockOptin)) {
    auto kernel = ow ? rmsnorm_backward_onepass_kernel<T, true> : rmsnorm_backward_onepass_kernel<T, false>;
    if (smem > 48u * 1024u) {
      DPO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(chunks), kWarpsPerBlock * kWarpSize, smem, ctx.stream()>>>(dinp, pw, dout, inp, w,
                                                                                               rstd, N, C, chunk_rows);
    DPO_CUDA_CHECK(cudaGetLastError());
  } else {
    const unsigned blocks = row_blocks(N, "rmsnorm_backward");
    if (ow) {
      rmsnorm_backward_dinp_kernel<T, true>
          <<<blocks, kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(dinp, dout, inp, w, rstd, N, C);
    } else {
      rmsnorm_backward_dinp_kernel<T, false>
          <<<blocks, kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(dinp, dout, inp, w, rstd, N, C);
    }
    DPO_CUDA_CHECK(cudaGetLastError());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
    rmsnorm_backward_partial_kernel<T><<<grid, kChannelTile, 0, ctx.stream()>>>(pw, dout, inp, rstd, N, C, chunk_rows);
    DPO_CUDA_CHECK(cudaGetLastError());
  }
  rmsnorm_backward_reduce_kernel<<<static_cast<unsigned>(tiles), kChannelTile, 0, ctx.stream()>>>(dw, pw, chunks, C);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rmsnorm_forward(CudaContext& ctx, float* out, float* rstd, const float* inp, const float* w, int64_t N, int64_t C,
                     double eps) {
  forward_impl<float>(ctx, nullptr, out, rstd, inp, nullptr, nullptr, w, N, C, eps);
}
void rmsnorm_forward(CudaContext& ctx, __nv_bfloat16* out, float* rstd, const __nv_bfloat16* inp,
                     const __nv_bfloat16* w, int64_t N, int64_t C, double eps) {
  forward_impl<__nv_bfloat16>(ctx, nullptr, out, rstd, inp, nullptr, nullptr, w, N, C, eps);
}
void residual_rmsnorm_forward(CudaContext& ctx, float* res_out, float* out, float* rstd, const float* a, const float* b,
                              const float* w, int64_t N, int64_t C, double eps) {
  forward_impl<float>(ctx, res_out, out, rstd, nullptr, a, b, w, N, C, eps);
}
void residual_rmsnorm_forward(CudaContext& ctx, __nv_bfloat16* res_out, __nv_bfloat16* out, float* rstd,
                              const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* w, int64_t N,
                              int64_t C, double eps) {
  forward_impl<__nv_bfloat16>(ctx, res_out, out, rstd, nullptr, a, b, w, N, C, eps);
}
void rmsnorm_backward(CudaContext& ctx, float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int64_t N, int64_t C, GradWrite dinp_write) {
  backward_impl(ctx, dinp, dw, dout, inp, w, rstd, N, C, dinp_write);
}
void rmsnorm_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, const __nv_bfloat16* dout,
                      const __nv_bfloat16* inp, const __nv_bfloat16* w, const float* rstd, int64_t N, int64_t C,
                      GradWrite dinp_write) {
  backward_impl(ctx, dinp, dw, dout, inp, w, rstd, N, C, dinp_write);
}

}  // namespace dpo::cuda
