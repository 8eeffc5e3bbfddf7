#include "kernels/rope.cuh"

#include <algorithm>
#include <string>

#include "kernels/bf16.cuh"
#include "kernels/llama_group.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

constexpr int kThreads = 256;

// Unit u of row n: u < R rotates G pairs (head u / (H/G), pairs from (u % (H/G)) * G), else copies G elements of the
// v heads. sgn = +1 (forward) or -1 (backward; exact).
template <class T, int G>
__global__ void rope_kernel(T* out, const T* inp, const float* cos, const float* sin, const int32_t* pos, int64_t N,
                            int64_t rot_heads, int64_t D, int64_t W, int64_t P, float sgn) {
  const int64_t H = D / 2;
  const int64_t per_head = H / G;
  const int64_t R = rot_heads * per_head;          // rotation units per row
  const int64_t U = R + (W - rot_heads * D) / G;   // + copy units (the v heads)
  const int64_t total = N * U;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t n = t / U, u = t % U;
    const int64_t p = pos[n];
    const bool bad = p < 0 || p >= P;
    const T* x = inp + n * W;
    T* y = out + n * W;
    if (u < R) {
      const int64_t h0 = (u / per_head) * D, i0 = (u % per_head) * G;
      Group<T, G> a = load_group<G>(x, h0 + i0), b = load_group<G>(x, h0 + H + i0);
      if (bad) {
        const T nan = from_float<T>(__int_as_float(0x7fffffff));
#pragma unroll
        for (int j = 0; j < G; ++j) a.e[j] = b.e[j] = nan;
      } else {
        const Group<float, G> c = load_group<G>(cos, p * H + i0), s = load_group<G>(sin, p * H + i0);
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const float xa = to_float(a.e[j]), xb = to_float(b.e[j]);
          const float cj = c.e[j], sj = sgn * s.e[j];
          a.e[j] = from_float<T>(__fmaf_rn(xa, cj, -(xb * sj)));
          b.e[j] = from_float<T>(__fmaf_rn(xb, cj, xa * sj));
        }
      }
      store_group<G>(y, h0 + i0, a);
      store_group<G>(y, h0 + H + i0, b);
    } else {
      const int64_t k = rot_heads * D + (u - R) * G;
      if (bad) {
        Group<T, G> v;
        const T nan = from_float<T>(__int_as_float(0x7fffffff));
#pragma unroll
        for (int j = 0; j < G; ++j) v.e[j] = nan;
        store_group<G>(y, k, v);
      } else if (y != x) {
        store_group<G>(y, k, load_group<G>(x, k));
      }
    }
  }
}

template <class T>
void rope_impl(CudaContext& ctx, T* out, const T* inp, const float* cos, const float* sin, const int32_t* pos,
               int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D, int64_t P, RopeDirection dir) {
  DPO_NVTX_RANGE(dir == RopeDirection::Forward ? "rope_forward" : "rope_backward");
  const int64_t W = (n_head + 2 * n_kv_head) * D;
  if (N <= 0 || W <= 0) return;
  constexpr int G = 16 / sizeof(T);
  const bool vec = (D / 2) % G == 0 && aligned16(out) && aligned16(inp) && aligned16(cos) && aligned16(sin);
  const int64_t g = vec ? G : 1;
  const int64_t units = N * (((n_head + n_kv_head) * (D / 2) + n_kv_head * D) / g);  // the kernel's N * U
  const int64_t blocks = std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t{1} << 20);
  const float sgn = dir == RopeDirection::Forward ? 1.0f : -1.0f;
  if (vec) {
    rope_kernel<T, G><<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream()>>>(out, inp, cos, sin, pos, N,
                                                                                   n_head + n_kv_head, D, W, P, sgn);
  } else {
    rope_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream()>>>(out, inp, cos, sin, pos, N,
                                                                                   n_head + n_kv_head, D, W, P, sgn);
  }
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rope(CudaContext& ctx, float* out, const float* inp, const float* cos, const float* sin, const int32_t* pos,
          int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D, int64_t P, RopeDirection dir) {
  rope_impl(ctx, out, inp, cos, sin, pos, N, n_head, n_kv_head, D, P, dir);
}
void rope(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, const float* cos, const float* sin,
          const int32_t* pos, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D, int64_t P, RopeDirection dir) {
  rope_impl(ctx, out, inp, cos, sin, pos, N, n_head, n_kv_head, D, P, dir);
}

}  // namespace dpo::cuda
