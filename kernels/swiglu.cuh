// SwiGLU on the GPU. Contract: kernels/swiglu.h (CPU twin cpu::swiglu_forward/backward).
//   inp [N, 2I] rows [gate | up]; forward out [N, I] = silu(gate) * up (=); backward dinp [N, 2I] (=):
//   d gate = dout * up * silu'(gate), d up = dout * silu(gate); silu(g) = g * sigmoid(g).
// Storage: float or bf16, one type per call. fp32 arithmetic with sigmoid(g) = 1 / (1 + expf(-g)) (expf, not the
// fast __expf: within 2 ulp), each output rounded once. The limits are those of the twin: expf(-g) = +inf for
// g < -88.7 gives sigmoid 0, so silu and both gradients are finite for finite inputs.
// Layout: one thread per group of G = 16 / sizeof(T) consecutive columns of one row (128-bit loads and stores of the
// gate, up, out / dout and dinp parts) when I is a multiple of G and every pointer is 16-byte aligned; else scalar.
// dinp must not alias inp or dout; out must not alias inp.
// 64-bit indices; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void swiglu_forward(CudaContext& ctx, float* out, const float* inp, int64_t N, int64_t I);
void swiglu_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N, int64_t I);
void swiglu_backward(CudaContext& ctx, float* dinp, const float* dout, const float* inp, int64_t N, int64_t I);
void swiglu_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                     int64_t N, int64_t I);

}  // namespace dpo::cuda
