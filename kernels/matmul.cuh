// Dense layer on the GPU: cuBLASLt in FP32 compute, the same contract as the CPU twin (kernels/matmul.h).
//   WeightLayout::InOut  w is [C, OC] row-major (HF Conv1D).  WeightLayout::OutIn  w is [OC, C] (nn.Linear, wte).
//   forward : out[N,OC]  = inp[N,C] @ W + bias[OC]             (=; bias may be null)
//   backward: dinp[N,C] += dout[N,OC] @ W^T                     (+=; skipped if dinp is null)
//             dw        += inp^T @ dout in w's layout           (+=; skipped if dw is null)
//             dbias[OC] += sum over n of dout[n,:]              (+=; skipped if dbias is null)
// Storage: inp, w, bias, out (forward) and dinp, dout, inp, w (backward) are float or bf16, one type per call; dw
// and dbias are always float (parameter gradients, runtime/backend.h). fp32 compute (CUBLAS_COMPUTE_32F); each bf16
// output is rounded once (out after the bias add; dinp as dinp + product, through beta = 1). The cuBLASLt type
// combinations are listed in kernels/matmul.cu.
// Row strides (kernels/matmul.h): the forms with ld_out / ld_dout take out / dout as N rows of ld >= OC elements;
// columns [OC, ld) are padding, never read and never written (the LM head's logits; ld is cuBLASLt's leading
// dimension of out^T / dout^T). A row stride that is a multiple of 16 bytes keeps cuBLASLt on its aligned kernels;
// any ld >= OC is correct. The forms without them are ld = OC.
// All pointers are device pointers, asynchronous on ctx.stream(). out must not alias inp or w; the gradient outputs
// must not alias each other or the inputs. Bitwise reproducible run to run on one GPU model (cuBLAS guarantees this
// for cublasLtMatmul with a caller-owned workspace on one stream; dbias is a fixed-order reduction).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo::cuda {

void matmul_forward(CudaContext& ctx, float* out, const float* inp, const float* w, const float* bias, int64_t N,
                    int64_t C, int64_t OC, WeightLayout layout, int64_t ld_out);
void matmul_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, const __nv_bfloat16* w,
                    const __nv_bfloat16* bias, int64_t N, int64_t C, int64_t OC, WeightLayout layout,
                    int64_t ld_out);

void matmul_backward(CudaContext& ctx, float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int64_t N, int64_t C, int64_t OC, WeightLayout layout, int64_t ld_dout);
void matmul_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, float* dbias, const __nv_bfloat16* dout,
                     const __nv_bfloat16* inp, const __nv_bfloat16* w, int64_t N, int64_t C, int64_t OC,
                     WeightLayout layout, int64_t ld_dout);

// Dense out / dout (ld = OC).
inline void matmul_forward(CudaContext& ctx, float* out, const float* inp, const float* w, const float* bias,
                           int64_t N, int64_t C, int64_t OC, WeightLayout layout) {
  matmul_forward(ctx, out, inp, w, bias, N, C, OC, layout, OC);
}
inline void matmul_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, const __nv_bfloat16* w,
                           const __nv_bfloat16* bias, int64_t N, int64_t C, int64_t OC, WeightLayout layout) {
  matmul_forward(ctx, out, inp, w, bias, N, C, OC, layout, OC);
}
inline void matmul_backward(CudaContext& ctx, float* dinp, float* dw, float* dbias, const float* dout,
                            const float* inp, const float* w, int64_t N, int64_t C, int64_t OC, WeightLayout layout) {
  matmul_backward(ctx, dinp, dw, dbias, dout, inp, w, N, C, OC, layout, OC);
}
inline void matmul_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, float* dbias,
                            const __nv_bfloat16* dout, const __nv_bfloat16* inp, const __nv_bfloat16* w, int64_t N,
                            int64_t C, int64_t OC, WeightLayout layout) {
  matmul_backward(ctx, dinp, dw, dbias, dout, inp, w, N, C, OC, layout, OC);
}

}  // namespace dpo::cuda
