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
// Forward: one warp per (b,t) row; each row is split into a scalar head, a body of 16-byte groups (128-bit loads of
// the wte and wpe rows, 128-bit stores to out) and a scalar tail (kernels/bf16.cuh), so views at any offset and any
// C work. One add per element, as the twin: bitwise equal to cpu::encoder_forward.
//
// Determinism: no atomics; every output element is owned by one thread at a time and every order is fixed by the
// data (tokens, B, T), never by the device or the launch, so the backward is bitwise equal to itself run after run.
//   dwpe: one thread per (t,c), adding b = 0..B-1 in order: bitwise cpu::encoder_backward<float>.
//   dwte: positions sorted by token once per call (a stable radix sort of (token, position) pairs, so each token's
//         positions, its "run", stay ascending). A run is cut into segments of K = kEncoderSegmentRows positions
//         from its start, each summed by one thread per channel in position order, so no thread adds more than K
//         rows in a chain however often a token occurs (a padding or end-of-text token may fill half a batch).
//         A run of at most K positions is a single segment added onto dwte in the twin's order: bitwise
//         cpu::encoder_backward<float>. A longer run's segment sums (each from 0) are added onto dwte in segment
//         order by a second pass: dwte + (s_0 + ...) regrouped, which differs from the twin's single chain by float
//         round-off (<= about (K + L/K) eps_f * sum |dout| for a run of L positions, against the twin's L eps_f).
//         Cost: the sort, one binary-search pair per position, and B*T*C coalesced reads of dout.
// 64-bit indices throughout; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

constexpr int64_t kEncoderSegmentRows = 64;  // K above: longest chain of dout rows one thread adds

void encoder_forward(CudaContext& ctx, float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B,
                     int64_t T, int64_t C, int64_t V);
void encoder_forward(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const __nv_bfloat16* wte,
                     const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C, int64_t V);
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int64_t B,
                      int64_t T, int64_t C, int64_t V);
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout, const int32_t* tokens,
                      int64_t B, int64_t T, int64_t C, int64_t V);

}  // namespace dpo::cuda
