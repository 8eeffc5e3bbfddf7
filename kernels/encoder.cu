#include "kernels/encoder.cuh"

#include <algorithm>
#include <string>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;
constexpr int kChannelTile = 128;  // dwte: channels per block (threads per block)
constexpr int kTokenChunk = 1024;  // dwte: token ids staged in shared memory at a time

static unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

template <class T>
static __global__ void encoder_forward_kernel(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t BT,
                                              int64_t T_, int64_t C, int64_t V) {
  const int64_t n = BT * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t bt = i / C, c = i - bt * C;
    const int64_t tok = tokens[bt];
    const int64_t t = bt % T_;
    out[i] = from_float<T>(tok >= 0 && tok < V ? to_float(wte[tok * C + c]) + to_float(wpe[t * C + c])
                                               : __int_as_float(0x7fffffff));
  }
}

// One thread per (t,c); sums b = 0..B-1 in order into dwpe[t,c] (the CPU twin's order).
template <class T>
static __global__ void encoder_backward_wpe_kernel(float* dwpe, const T* dout, int64_t B, int64_t T_, int64_t C) {
  const int64_t n = T_ * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc = dwpe[i];
    for (int64_t b = 0; b < B; ++b) acc += to_float(dout[b * T_ * C + i]);  // dout[b,t,c], (b*T + t)*C + c
    dwpe[i] = acc;
  }
}

// Block (blockIdx.x, blockIdx.y) owns rows [v0, v0 + kEncoderRowsPerBlock) and channels
// [blockIdx.y * kChannelTile, ...). All threads see the same token id at the same time, so the branch is uniform.
template <class T>
static __global__ void encoder_backward_wte_kernel(float* dwte, const T* dout, const int32_t* tokens, int64_t BT,
                                                   int64_t C, int64_t V) {
  __shared__ int32_t ids[kTokenChunk];
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * kEncoderRowsPerBlock;
  const int64_t v1 = v0 + kEncoderRowsPerBlock < V ? v0 + kEncoderRowsPerBlock : V;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kChannelTile + threadIdx.x;
  for (int64_t base = 0; base < BT; base += kTokenChunk) {
    const int64_t len = BT - base < kTokenChunk ? BT - base : kTokenChunk;
    __syncthreads();  // the previous chunk has been consumed
    for (int64_t k = threadIdx.x; k < len; k += blockDim.x) ids[k] = tokens[base + k];
    __syncthreads();
    for (int64_t k = 0; k < len; ++k) {
      const int64_t tok = ids[k];
      if (tok >= v0 && tok < v1 && c < C) dwte[tok * C + c] += to_float(dout[(base + k) * C + c]);
    }
  }
}

template <class T>
static void encoder_forward_impl(CudaContext& ctx, T* out, const int32_t* tokens, const T* wte, const T* wpe,
                                 int64_t B, int64_t T_, int64_t C, int64_t V) {
  DPO_NVTX_RANGE("encoder_forward");
  if (B * T_ * C <= 0) return;
  encoder_forward_kernel<T><<<grid_for(B * T_ * C), kThreads, 0, ctx.stream()>>>(out, tokens, wte, wpe, B * T_, T_, C,
                                                                                V);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void encoder_backward_impl(CudaContext& ctx, float* dwte, float* dwpe, const T* dout, const int32_t* tokens,
                                  int64_t B, int64_t T_, int64_t C, int64_t V) {
  DPO_NVTX_RANGE("encoder_backward");
  if (B * T_ * C <= 0 || V <= 0) return;
  encoder_backward_wpe_kernel<T><<<grid_for(T_ * C), kThreads, 0, ctx.stream()>>>(dwpe, dout, B, T_, C);
  DPO_CUDA_CHECK(cudaGetLastError());
  const int64_t row_blocks = (V + kEncoderRowsPerBlock - 1) / kEncoderRowsPerBlock;
  const int64_t channel_tiles = (C + kChannelTile - 1) / kChannelTile;
  DPO_ASSERT(row_blocks <= INT32_MAX && channel_tiles <= 65535,
             "encoder_backward: V = " + std::to_string(V) + ", C = " + std::to_string(C) + " exceed one launch");
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(channel_tiles));
  encoder_backward_wte_kernel<T><<<grid, kChannelTile, 0, ctx.stream()>>>(dwte, dout, tokens, B * T_, C, V);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void encoder_forward(CudaContext& ctx, float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B,
                     int64_t T, int64_t C, int64_t V) {
  encoder_forward_impl(ctx, out, tokens, wte, wpe, B, T, C, V);
}
void encoder_forward(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const __nv_bfloat16* wte,
                     const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C, int64_t V) {
  encoder_forward_impl(ctx, out, tokens, wte, wpe, B, T, C, V);
}

void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int64_t B,
                      int64_t T, int64_t C, int64_t V) {
  encoder_backward_impl(ctx, dwte, dwpe, dout, tokens, B, T, C, V);
}
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout, const int32_t* tokens,
                      int64_t B, int64_t T, int64_t C, int64_t V) {
  encoder_backward_impl(ctx, dwte, dwpe, dout, tokens, B, T, C, V);
}

}  // namespace dpo::cuda
