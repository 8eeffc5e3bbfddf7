// Rotary position embedding on the GPU. Contract: kernels/rope.h (CPU twin cpu::rope_forward/backward).
//   inp/out [N, W], W = (n_head + 2 n_kv_head) D, rows [q heads | k heads | v heads]; cos, sin [P, D/2] float; pos [N].
//   forward : y_i = x_i c - x_{i+D/2} s,  y_{i+D/2} = x_{i+D/2} c + x_i s  (q and k heads); v heads copied     (=)
//   backward: the same with s negated (the transpose rotation)                                                (=)
// Storage: inp / out float or bf16 (one type per call); cos and sin are always float (grad_dtype). Per element,
// fp32: y_i = fmaf(x_i, c, -(x_{i+D/2} s)), y_{i+D/2} = fmaf(x_{i+D/2}, c, x_i s), rounded once to T; the CPU twin
// computes in double and rounds once, so float results agree to about two float roundings of |x_i c| + |x_j s|.
// In place (out == inp): every pair and every copied element is read and written by the same thread.
// Layout: one thread per group of G consecutive pairs of one head (G = 16 / sizeof(T): 128-bit loads of both halves
// and of the cos / sin entries) when D/2 is a multiple of G and every pointer is 16-byte aligned; otherwise G = 1
// (scalar). The v heads are copied by the same threads, in groups of G.
// A position outside [0, P) is not checked (that needs a device-to-host sync): the whole row of out is written NaN
// (q, k and v heads), never reading outside cos / sin, so the loss turns NaN.
// 64-bit indices; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

enum class RopeDirection { Forward, Backward };

void rope(CudaContext& ctx, float* out, const float* inp, const float* cos, const float* sin, const int32_t* pos,
          int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D, int64_t P, RopeDirection dir);
void rope(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, const float* cos, const float* sin,
          const int32_t* pos, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D, int64_t P, RopeDirection dir);

}  // namespace dpo::cuda
