// Causal multi-head self-attention on the GPU with a key padding mask; the contract of the CPU twin
// (kernels/attention.h), with the full probability matrix as the saved state:
//   qkv[B,T,3C] packed q | k | v (GPT-2 c_attn); head h owns channels [h*hs, (h+1)*hs) of each, hs = C / NH.
//   keymask[B,T] int32 (1 = real token, 0 = padding) or null (all real).
//   forward : att[B,NH,T,T] = softmax(q k^T / sqrt(hs)) over the keys s <= t with keymask != 0, 0 elsewhere  (=)
//             out[B,T,C]    = att @ v, heads concatenated                                                  (=)
//             a query row with no visible key (left padding) gets att = 0 and out = 0.
//   backward: dqkv[B,T,3C] += gradient through q, k and v                                                  (+=)
//             (reads att as written by the forward; its entries for s > t must be 0, as the forward leaves them)
// Storage: qkv, out, att, dqkv, dout are all float or all bf16 (one type per call; att is the saved state, so
// attention_saved_dtype(A) = A). Arithmetic is fp32 throughout: bf16 operands are read exactly into fp32 tiles, the
// scores, the softmax and dS stay fp32, and each bf16 output (out, att, and dqkv as read + add + round) is rounded
// once. With bf16 the forward keeps the fp32 scores/probabilities in a scratch, so out = P V uses the unrounded P
// (as the CPU oracle does); the backward reads the saved, rounded P (as the CPU oracle does too).
// Device pointers, asynchronous on ctx.stream(). No output may alias an input.
// Memory: att is B*NH*T*T elements; the backward takes a stream-ordered scratch of B*NH*T*T floats from ctx.alloc
// (dscore), and so does the bf16 forward (the fp32 scores); both are freed on the stream when the launcher returns
// (no synchronisation).
// Deterministic: every output element is written by one thread with a fixed summation order (no atomics), so
// repeated calls give bitwise-equal results.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "runtime/cuda/cuda_context.h"

namespace dpo::cuda {

void attention_forward(CudaContext& ctx, float* out, float* att, const float* qkv, const int32_t* keymask, int64_t B,
                       int64_t T, int64_t C, int64_t NH);
void attention_forward(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* att, const __nv_bfloat16* qkv,
                       const int32_t* keymask, int64_t B, int64_t T, int64_t C, int64_t NH);

void attention_backward(CudaContext& ctx, float* dqkv, const float* dout, const float* qkv, const float* att,
                        int64_t B, int64_t T, int64_t C, int64_t NH);
void attention_backward(CudaContext& ctx, __nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                        const __nv_bfloat16* att, int64_t B, int64_t T, int64_t C, int64_t NH);

}  // namespace dpo::cuda
