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

// --- Under a batch layout's spans (kernels/batch_layout.h; CPU twins in kernels/attention.h) ----------------------
// attention_forward_spans: the forward above with span [B,T,kSpanWidth] int32 (device) in place of the key mask:
// query t of row b sees the keys s with span_sees(span[b,t], t, s). Same outputs, storage, arithmetic, scratch and
// determinism as attention_forward; the kernels are the same (the span is read by the softmax only), so the cost is
// that of the key-mask form (the full lower triangle); the flash kernels (kernels/flash_attention.h, the backend's
// attn_implementation flash) are the path whose work follows the spans.
// With the spans a key mask implies, att and out are bitwise those of attention_forward with that mask at every
// real query slot (the softmax visits the same keys on the same lanes in the same order).
// The backward of this forward is attention_backward above: it reads only att, whose zeros carry the spans.
// A span that is not span_valid cannot be reported without a device sync (the CPU backend checks them; the data
// pipeline builds them): that query's att row becomes NaN at s <= t (0 above), so its out row is NaN and the
// backward spreads NaN into the gradients it touches. The spans are only compared with key indices, never used as
// addresses: a bad span never causes an out-of-bounds access.
void attention_forward_spans(CudaContext& ctx, float* out, float* att, const float* qkv, const int32_t* span,
                             int64_t B, int64_t T, int64_t C, int64_t NH);
void attention_forward_spans(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* att, const __nv_bfloat16* qkv,
                             const int32_t* span, int64_t B, int64_t T, int64_t C, int64_t NH);

// --- Spans of a key mask (the flash kernels' one form; CPU twin cpu::attention_keymask_spans, kernels/attention.h) --
// span[B,T,kSpanWidth] (=) from a key mask: real slot t of row b -> {first real slot of the row, t, t}, padding slot
// t -> {t, t, t}; a row with no real slot has only padding spans. Two mask forms: keymask [B,T] int32 (non-zero =
// real; null = all real), which also writes mask_copy[B*T] = 1.0f / 0.0f when mask_copy is not null (the flash
// saved state keeps it for the backward, runtime/cuda/cuda_backend.h); or mask [B*T] float (non-zero = real), that
// copy. Both give the same integers as the CPU twin. One warp per row: a min-reduction over the row's slots for
// its first real slot, then each lane writes the spans of its slots. No atomics, no scratch.
void attention_keymask_spans(CudaContext& ctx, int32_t* span, float* mask_copy, const int32_t* keymask, int64_t B,
                             int64_t T);
void attention_keymask_spans(CudaContext& ctx, int32_t* span, const float* mask, int64_t B, int64_t T);

// --- Incremental decoding (the key/value cache); contract of the CPU twins in kernels/attention.h ------------------
//   attention_cache_store: kcache[b,t,:] = qkv[b,t,C:2C], vcache[b,t,:] = qkv[b,t,2C:3C] for t < T <= Tc   (=)
//   attention_decode_forward: with p = pos[b] (one new token per sequence, qkv [B,3C]):
//     kcache[b,p,:] = k, vcache[b,p,:] = v, then out[b,:] = per head softmax(q . kcache[b,s] / sqrt(hs)) over
//     s in [0, p], times vcache[b,s]                                                                       (=)
//     A position outside [0, Tc) cannot be reported without a device sync (the backend's caller checks them on the
//     host): that sequence's out row is set to NaN and its cache is not touched, never an out-of-bounds access.
// Storage: float or bf16, one type per call; the caches hold the activation dtype. Arithmetic in fp32: bf16 values
// are read exactly, scores, softmax and the weighted sum stay fp32 (the CPU twin uses double), and each bf16 output
// is rounded once; the stored k and v are copies (exact).
// Layout of the step: one block per (b, h). Its threads copy the new k, v of head h into the cache and q into shared
// memory; then each warp takes the keys s = warp, warp + kDecodeWarps, ... (lanes split the head's channels, one
// butterfly sum per key), the block reduces max and sum of the softmax, and each warp sums p_s v_s over its keys
// into a shared partial that is added across warps in warp order. The scores live in a stream-ordered scratch of
// B*NH*Tc floats from ctx.alloc (freed on the stream when the launcher returns). Shared memory: (kDecodeWarps + 1)
// * hs floats; hs <= kDecodeMaxHeadSize (dpo::Error otherwise).
// Deterministic: fixed summation orders, no atomics; repeated calls give bitwise-equal results. 64-bit indices.
constexpr int kDecodeWarps = 8;
constexpr int64_t kDecodeMaxHeadSize = 1024;

void attention_cache_store(CudaContext& ctx, float* kcache, float* vcache, const float* qkv, int64_t B, int64_t T,
                           int64_t Tc, int64_t C);
void attention_cache_store(CudaContext& ctx, __nv_bfloat16* kcache, __nv_bfloat16* vcache, const __nv_bfloat16* qkv,
                           int64_t B, int64_t T, int64_t Tc, int64_t C);

void attention_decode_forward(CudaContext& ctx, float* out, float* kcache, float* vcache, const float* qkv,
                              const int32_t* pos, int64_t B, int64_t Tc, int64_t C, int64_t NH);
void attention_decode_forward(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* kcache, __nv_bfloat16* vcache,
                              const __nv_bfloat16* qkv, const int32_t* pos, int64_t B, int64_t Tc, int64_t C,
                              int64_t NH);

}  // namespace dpo::cuda
