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
//
// With explicit positions (encoder_forward_pos / encoder_backward_pos; contract in kernels/encoder.h): pos[B,T]
// int32, wpe / dwpe [P,C].
//   forward : out[b,t] = wte[tokens[b,t]] + wpe[pos[b,t]] by the same kernel (the position row read from pos[bt]
//             instead of t): bitwise cpu::encoder_forward_pos, and with pos[b,t] = t bitwise encoder_forward.
//   backward: dwte exactly as encoder_backward (the same sort and kernels). dwpe by the same sort-and-segment
//             scheme keyed by position instead of token, with segments of K_pos = max(K, B) slots
//             (encoder_position_segment_rows): a position's run in slot order is one chain summed onto dwpe while it
//             has at most K_pos slots, which covers the padded layout (every position has exactly B slots), so with
//             pos[b,t] = t the chain is b = 0..B-1 in order: bitwise encoder_backward's dwpe and
//             cpu::encoder_backward_pos. Packed layouts repeat the low positions once per sequence; a run longer
//             than K_pos is regrouped as for dwte (segment sums, then their sum in segment order): deterministic,
//             within float round-off of the twin, and no thread adds more than K_pos rows in a chain (no more than
//             the padded kernel's B). No atomics.
// A position outside [0, P) is not checked (that needs a device-to-host sync): the forward writes NaN to that slot's
// out row (never reading outside wpe) and the backward skips its dout row for dwpe (sorted last, as an out-of-range
// token is for dwte), so the loss turns NaN and nothing outside dwpe is written.
// No position embedding (Llama-family models): wpe == nullptr makes out = wte[tokens] (a copy of the rows, bitwise),
// dwpe == nullptr leaves only the dwte sums; pos and P are then not read.
// 64-bit indices throughout; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

constexpr int64_t kEncoderSegmentRows = 64;  // K above: longest chain of dout rows one thread adds

// K_pos above: the segment length of the dwpe sums with explicit positions, for a batch of B rows.
constexpr int64_t encoder_position_segment_rows(int64_t B) { return B > kEncoderSegmentRows ? B : kEncoderSegmentRows; }

void encoder_forward(CudaContext& ctx, float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B,
                     int64_t T, int64_t C, int64_t V);
void encoder_forward(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const __nv_bfloat16* wte,
                     const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C, int64_t V);
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int64_t B,
                      int64_t T, int64_t C, int64_t V);
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout, const int32_t* tokens,
                      int64_t B, int64_t T, int64_t C, int64_t V);

// Explicit positions: V = rows of wte / dwte, P = rows of wpe / dwpe.
void encoder_forward_pos(CudaContext& ctx, float* out, const int32_t* tokens, const int32_t* pos, const float* wte,
                         const float* wpe, int64_t B, int64_t T, int64_t C, int64_t V, int64_t P);
void encoder_forward_pos(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const int32_t* pos,
                         const __nv_bfloat16* wte, const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C,
                         int64_t V, int64_t P);
void encoder_backward_pos(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                          const int32_t* pos, int64_t B, int64_t T, int64_t C, int64_t V, int64_t P);
void encoder_backward_pos(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout,
                          const int32_t* tokens, const int32_t* pos, int64_t B, int64_t T, int64_t C, int64_t V,
                          int64_t P);

}  // namespace dpo::cuda
