// Grouped-query heads expanded on the GPU (HF's repeat_kv). Contract: kernels/repeat_kv.h (CPU twin
// cpu::repeat_kv_forward/backward). g = n_head / n_kv_head (the backend checks n_head % n_kv_head == 0).
//   forward : inp [N, (n_head + 2 n_kv_head) D] -> out [N, 3 n_head D]: q copied, expanded head h = kv head h / g (=)
//   backward: dinp [N, (n_head + 2 n_kv_head) D] (=): q copied; kv head j = sum of the expanded heads j g .. j g + g-1
// Storage: float or bf16, one type per call. The forward is a copy. The backward adds in fp32 in head order starting
// from the first term, as the twin does in T (float) and as the CPU backend does for bf16 (F32 copies, one
// rounding): the results are bitwise those of the CPU backend, for float and bf16. No atomics: each output element
// is owned by one thread.
// Layout: one thread per group of G = 16 / sizeof(T) consecutive elements of one head (128-bit loads and stores)
// when D is a multiple of G and both pointers are 16-byte aligned; else scalar. out / dinp must not alias the input.
// 64-bit indices; asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void repeat_kv_forward(CudaContext& ctx, float* out, const float* inp, int64_t N, int64_t n_head, int64_t n_kv_head,
                       int64_t D);
void repeat_kv_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, int64_t N, int64_t n_head,
                       int64_t n_kv_head, int64_t D);
void repeat_kv_backward(CudaContext& ctx, float* dinp, const float* dout, int64_t N, int64_t n_head, int64_t n_kv_head,
                        int64_t D);
void repeat_kv_backward(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, int64_t N, int64_t n_head,
                        int64_t n_kv_head, int64_t D);

}  // namespace dpo::cuda
