// Causal multi-head self-attention on the GPU with a key padding mask; the contract of the CPU twin
// (kernels/attention.h), with the full probability matrix as the saved state:
//   qkv[B,T,3C] packed q | k | v (GPT-2 c_attn); head h owns channels [h*hs, (h+1)*hs) of each, hs = C / NH.
//   keymask[B,T] int32 (1 = real token, 0 = padding) or null (all real).
//   forward : att[B,NH,T,T] = softmax(q k^T / sqrt(hs)) over the keys s <= t with keymask != 0, 0 elsewhere  (=)
//             out[B,T,C]    = att @ v, heads concatenated                                                  (=)
//             a query row with no visible key (left padding) gets att = 0 and out = 0.
//   backward: dqkv[B,T,3C] += gradient through q, k and v                                                  (+=)
//             (reads att as written by the forward; its entries for s > t must be 0, as the forward leaves them)
// float only, device pointers, asynchronous on ctx.stream(). No output may alias an input.
// Memory: att is B*NH*T*T floats; the backward also takes a stream-ordered scratch of the same size from ctx.alloc
// (dscore), freed on the stream when the launcher returns (no synchronisation).
// Deterministic: every output element is written by one thread with a fixed summation order (no atomics), so
// repeated calls give bitwise-equal results.
#pragma once
#include <cstdint>

#include "runtime/cuda/cuda_context.h"

namespace dpo::cuda {

void attention_forward(CudaContext& ctx, float* out, float* att, const float* qkv, const int32_t* keymask, int64_t B,
                       int64_t T, int64_t C, int64_t NH);

void attention_backward(CudaContext& ctx, float* dqkv, const float* dout, const float* qkv, const float* att,
                        int64_t B, int64_t T, int64_t C, int64_t NH);

}  // namespace dpo::cuda
