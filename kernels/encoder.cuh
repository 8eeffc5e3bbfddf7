// Token + position embedding on the GPU. Contract: kernels/encoder.h (CPU twin cpu::encoder_forward/backward).
//   tokens[B,T] int32, wte[V,C], wpe[maxT,C] with maxT >= T; out, wte, wpe (forward) and dout (backward) are float or
//   bf16 (one storage type per call); dwte, dwpe are always float (parameter gradients, runtime/backend.h).
//   forward : out[B,T,C]   = wte[tokens[b,t], :] + wpe[t, :]                     (=)
//   backward: dwte[V,C]   += sum over (b,t) with tokens[b,t]==v of dout[b,t,:]    (+=)
//             dwpe[maxT,C] += sum over b of dout[b,t,:]  (rows t < T)             (+=)
// Token ids outside [0, V) (the caller is meant to have checked them): the forward writes NaN to that row of out
// instead of reading outside wte, so the loss turns NaN rather than silently wrong; the backward ignores them.
//
// bf16: the forward adds the two bf16 values in float and rounds the sum once; the backward reads dout exactly and
// accumulates in float as for float storage.
//
// Determinism: no atomics. Every output element is owned by one thread, which adds its terms in the CPU twin's
// order, (b,t) ascending, in float. Both passes are therefore bitwise equal to cpu::encoder_backward<float> (on the
// float values of dout) and to themselves run after run, whatever the launch configuration.
//   dwpe: one thread per (t,c), looping over b.
//   dwte: block (r, j) owns vocabulary rows [r*kEncoderRowsPerBlock, (r+1)*kEncoderRowsPerBlock) and a tile of
//         channels; it streams all B*T token ids through shared memory in order and, for each id in its rows, adds
//         that dout row into dwte. Cost: each of the ceil(V/kEncoderRowsPerBlock) * ceil(C/128) blocks loops over
//         all B*T ids (GPT-2 small at B*T = 8192: 594 blocks of 8192 broadcast shared-memory reads each, all
//         resident at once on an H100, estimated ~0.1 ms); the adds themselves are B*T*C, coalesced. Bucketing the
//         (b,t) by token first (a stable sort) would remove the scan if it ever shows up in a profile.
// 64-bit indices throughout; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

constexpr int64_t kEncoderRowsPerBlock = 512;

void encoder_forward(CudaContext& ctx, float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B,
                     int64_t T, int64_t C, int64_t V);
void encoder_forward(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const __nv_bfloat16* wte,
                     const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C, int64_t V);
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int64_t B,
                      int64_t T, int64_t C, int64_t V);
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout, const int32_t* tokens,
                      int64_t B, int64_t T, int64_t C, int64_t V);

}  // namespace dpo::cuda
