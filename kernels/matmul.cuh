// Dense layer on the GPU: cuBLASLt in FP32 compute, the same contract as the CPU twin (kernels/matmul.h).
//   WeightLayout::InOut  w is [C, OC] row-major (HF Conv1D).  WeightLayout::OutIn  w is [OC, C] (nn.Linear, wte).
//   forward : out[N,OC]  = inp[N,C] @ W + bias[OC]             (=; bias may be null)
//   backward: dinp[N,C] += dout[N,OC] @ W^T                     (+=, or = with GradWrite::Overwrite; skipped if
//                                                                dinp is null)
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
// for cublasLtMatmul with a caller-owned workspace on one stream; dbias is a fixed-order two-stage reduction through
// the context's scratch, CudaContext::scratch).
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

// dinp_write = GradWrite::Overwrite: dinp = dout @ W^T (=, beta = 0: the old dinp is never read, NaN included).
void matmul_backward(CudaContext& ctx, float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int64_t N, int64_t C, int64_t OC, WeightLayout layout, int64_t ld_dout,
                     GradWrite dinp_write = GradWrite::Accumulate);
void matmul_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, float* dbias, const __nv_bfloat16* dout,
                     const __nv_bfloat16* inp, const __nv_bfloat16* w, int64_t N, int64_t C, int64_t OC,
                     WeightLayout layout, int64_t ld_dout, GradWrite dinp_write = GradWrite::Accumulate);

// GELU fusions through cuBLASLt epilogues, bf16 storage only (never in the fp32 parity mode: cuBLASLt's GELU is
// its own tanh approximation, not our kernels/gelu.cu). Each returns false, with nothing enqueued and every output
// untouched, when the call does not fit the epilogue (shapes empty; pre not 16-byte aligned; its leading dimension,
// OC resp. C, not a multiple of 8 elements; a bias not 16-byte aligned; or no cuBLASLt algorithm takes the
// epilogue): the caller then runs the unfused ops (runtime/cuda/cuda_backend.cu). Dense rows (ld = OC).
//   matmul_gelu_forward (GELU_AUX_BIAS, or GELU_AUX without a bias):
//     pre[N,OC] = inp @ W + bias   (=, the fp32 sum rounded once to bf16: what matmul_forward stores)
//     out[N,OC] = gelu(pre)        (=, cuBLASLt's GELU of the fp32 sum, before pre is rounded; rounded once)
//   matmul_backward_dgelu (DGELU; the layer after the GELU, whose input is inp = gelu(pre)):
//     dpre[N,C] = (dout @ W^T) * gelu'(pre)   (=, fp32 product times cuBLASLt's gelu' of the bf16 pre, rounded once)
//     dw += inp^T @ dout, dbias += sum_n dout (+=, exactly as matmul_backward computes them)
// Rounding contract against the unfused ops (matmul_forward + gelu_forward; matmul_backward into a zeroed buffer +
// gelu_backward): the unfused path rounds the GEMM result to bf16 before the GELU (or its derivative) and uses
// kernels/gelu.cu's formula; the fused path applies cuBLASLt's GELU to the fp32 result. out and dpre therefore differ
// by about one bf16 rounding of the GEMM result times |gelu'| (<= 1.13), i.e. about 1 bf16 ulp of the value, plus
// the difference between the two tanh-GELU evaluations (fp32 round-off, far below a bf16 ulp). pre is the same
// value in both (one rounding of the same fp32 sum, up to the GEMM's summation order). The CPU backend's
// matmul_gelu_forward / matmul_backward_dgelu mirror the fused order (runtime/backend.h). The DGELU_BGRAD epilogue
// does not fit: kernels/matmul.cu says why.
bool matmul_gelu_forward(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* pre, const __nv_bfloat16* inp,
                         const __nv_bfloat16* w, const __nv_bfloat16* bias, int64_t N, int64_t C, int64_t OC,
                         WeightLayout layout);
bool matmul_backward_dgelu(CudaContext& ctx, __nv_bfloat16* dpre, float* dw, float* dbias,
                           const __nv_bfloat16* dout, const __nv_bfloat16* inp, const __nv_bfloat16* w,
                           const __nv_bfloat16* pre, int64_t N, int64_t C, int64_t OC, WeightLayout layout);

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
