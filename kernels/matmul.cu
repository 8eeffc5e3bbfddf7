// Dense layer through cuBLASLt; contract in kernels/matmul.cuh (same as the CPU twin, kernels/matmul.h).
//
// Row-major data, column-major BLAS: a row-major [R, K] buffer is the column-major [K, R] matrix with ld = K, i.e.
// its transpose. So every row-major product X = A @ B is computed as the column-major X^T = B^T @ A^T with the
// operands swapped, and no data is ever transposed:
//   forward  InOut : out^T[OC,N] = w(col [OC,C])      @ inp^T(col [C,N])           m=OC k=C  n=N
//            OutIn : out^T[OC,N] = w^T(col [C,OC])^T  @ inp^T                      m=OC k=C  n=N
//   dinp     InOut : dinp^T[C,N] = w(col [OC,C])^T    @ dout^T(col [OC,N])         m=C  k=OC n=N
//            OutIn : dinp^T[C,N] = w^T(col [C,OC])    @ dout^T                     m=C  k=OC n=N
//   dw       InOut : dw^T[OC,C]  = dout^T(col [OC,N]) @ (inp^T(col [C,N]))^T       m=OC k=N  n=C
//            OutIn : dw^T[C,OC]  = inp^T(col [C,N])   @ (dout^T(col [OC,N]))^T     m=C  k=N  n=OC
// The forward bias is the BIAS epilogue (a vector of length m = OC added to every column of the column-major D,
// i.e. to every row of out). The gradients accumulate through beta = 1 with C = D (in place).
//
// Precision: CUBLAS_COMPUTE_32F is true fp32 (no TF32, no bf16x9 emulation): this is the fp32 parity mode. A
// mixed-precision mode will go in lt_gemm (bf16 storage: CUDA_R_16BF layouts with CUBLAS_COMPUTE_32F; or TF32:
// CUBLAS_COMPUTE_32F_FAST_TF32) selected by a precision enum passed down from the backend.
//
// dbias: the BGRADB epilogue writes (=) the bias gradient and cannot accumulate, so it would need a scratch vector
// and an add; a fixed-order column-sum kernel is simpler, deterministic and reads dout once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/matmul.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

// Largest power of two (<= 256) dividing the address: cuBLASLt's heuristic assumes 256-byte aligned buffers unless
// told otherwise, and parameter views into one flat buffer can sit at any float offset.
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 4 && (a % align) != 0) align /= 2;
  return align;
}

template <class V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, V value) {
  DPO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

template <class V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, V value) {
  DPO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// Bias rows without cuBLASLt. kSet: out[n, j] = bias[j] (or 0 when bias is null), the forward pass when C == 0 (an
// empty product, which cuBLASLt rejects as k = 0). kAdd: out[n, j] += bias[j], the fallback when no cuBLASLt
// algorithm supports the BIAS epilogue for these pointers (e.g. a misaligned bias view).
enum class BiasMode { kSet, kAdd };

template <BiasMode kMode>
__global__ void bias_rows_kernel(float* __restrict__ out, const float* __restrict__ bias, int64_t N, int64_t OC) {
  const int64_t total = N * OC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (kMode == BiasMode::kSet) {
      out[i] = bias ? bias[i % OC] : 0.0f;
    } else {
      out[i] += bias[i % OC];
    }
  }
}

template <BiasMode kMode>
void launch_bias_rows(CudaContext& ctx, float* out, const float* bias, int64_t N, int64_t OC) {
  const int64_t blocks = std::min<int64_t>((N * OC + 255) / 256, 65536);
  bias_rows_kernel<kMode><<<static_cast<unsigned>(blocks), 256, 0, ctx.stream()>>>(out, bias, N, OC);
  DPO_CUDA_CHECK(cudaGetLastError());
}

// Column-major D[m,n] = op(A)[m,k] @ op(B)[k,n] (+ bias[m] per column) + beta * D, all fp32.
// A is stored [m,k] (ld >= m) if !ta, else [k,m] (ld >= k); likewise B is [k,n] if !tb, else [n,k].
// Descriptors live on the stack (the *Init forms: nothing to free when a check throws). Building them and asking
// the heuristic costs a few microseconds per call on the host; a per-context cache keyed by (shape, layout,
// epilogue, alignments) can remove that once the launch overhead matters (it will, next to the small kernels).
void lt_gemm(CudaContext& ctx, int64_t m, int64_t n, int64_t k, const float* A, bool ta, int64_t lda,
             const float* B, bool tb, int64_t ldb, float beta, float* D, int64_t ldd, const float* bias) {
  cublasLtMatmulDescOpaque_t op_storage;
  cublasLtMatmulDesc_t op = &op_storage;
  DPO_CUBLAS_CHECK(cublasLtMatmulDescInit(op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(op, CUBLASLT_MATMUL_DESC_TRANSA, ta ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_desc(op, CUBLASLT_MATMUL_DESC_TRANSB, tb ? CUBLAS_OP_T : CUBLAS_OP_N);
  if (bias) {
    set_desc(op, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set_desc(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(bias));
    set_desc(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUDA_R_32F);
  }

  cublasLtMatrixLayoutOpaque_t a_storage, b_storage, d_storage;
  cublasLtMatrixLayout_t a_layout = &a_storage, b_layout = &b_storage, d_layout = &d_storage;
  DPO_CUBLAS_CHECK(cublasLtMatrixLayoutInit(a_layout, CUDA_R_32F, static_cast<uint64_t>(ta ? k : m),
                                            static_cast<uint64_t>(ta ? m : k), lda));
  DPO_CUBLAS_CHECK(cublasLtMatrixLayoutInit(b_layout, CUDA_R_32F, static_cast<uint64_t>(tb ? n : k),
                                            static_cast<uint64_t>(tb ? k : n), ldb));
  DPO_CUBLAS_CHECK(cublasLtMatrixLayoutInit(d_layout, CUDA_R_32F, static_cast<uint64_t>(m),
                                            static_cast<uint64_t>(n), ldd));

  cublasLtMatmulPreferenceOpaque_t pref_storage;
  cublasLtMatmulPreference_t pref = &pref_storage;
  DPO_CUBLAS_CHECK(cublasLtMatmulPreferenceInit(pref));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(ctx.workspace_bytes()));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(A));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(B));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(D));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(D));

  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(ctx.cublaslt(), op, a_layout, b_layout, d_layout, d_layout,
                                                     pref, 1, &heur, &found);
  bool bias_after = false;
  if (bias && (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && found == 0))) {
    // No algorithm takes the BIAS epilogue here: plain GEMM, then a separate bias add (one extra pass over out).
    set_desc(op, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_DEFAULT);
    st = cublasLtMatmulAlgoGetHeuristic(ctx.cublaslt(), op, a_layout, b_layout, d_layout, d_layout, pref, 1, &heur,
                                        &found);
    bias_after = true;
  }
  auto shape = [&] { return "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k); };
  if (st != CUBLAS_STATUS_SUCCESS) {
    throw_library_error("cuBLAS", cublasGetStatusName(st),
                        ("cublasLtMatmulAlgoGetHeuristic, fp32 " + shape()).c_str(), __FILE__, __LINE__,
                        cuda_detail::current_device());
  }
  DPO_ASSERT(found > 0, "cuBLASLt has no fp32 algorithm for " + shape());
  const float alpha = 1.0f;
  // C and D are the same buffer with the same layout: the in-place accumulation cuBLASLt supports. With beta = 0
  // C is not read (BLAS semantics), so D may hold anything, NaN included.
  DPO_CUBLAS_CHECK(cublasLtMatmul(ctx.cublaslt(), op, &alpha, A, a_layout, B, b_layout, &beta, D, d_layout, D,
                                  d_layout, &heur.algo, ctx.workspace(), ctx.workspace_bytes(), ctx.stream()));
  // Only the forward passes a bias: D is out[N, OC] row-major, m = OC, n = N.
  if (bias_after) launch_bias_rows<BiasMode::kAdd>(ctx, D, bias, n, m);
}

// dbias[j] += sum_n dout[n, j]. A block owns 32 adjacent columns (coalesced rows of 128 bytes); its kBiasRows
// thread rows each sum a fixed, strided set of n in order, then thread row 0 adds the partial sums in order.
// The summation order depends only on N, so the result is bitwise reproducible. fp32 accumulation.
constexpr int kBiasCols = 32;
constexpr int kBiasRows = 16;

__global__ void __launch_bounds__(kBiasCols* kBiasRows)
    bias_grad_kernel(float* __restrict__ dbias, const float* __restrict__ dout, int64_t N, int64_t OC) {
  __shared__ float part[kBiasRows][kBiasCols + 1];
  const int64_t j = int64_t(blockIdx.x) * kBiasCols + threadIdx.x;
  float acc = 0.0f;
  if (j < OC) {
#pragma unroll 4
    for (int64_t n = threadIdx.y; n < N; n += kBiasRows) acc += dout[n * OC + j];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < OC) {
    float s = 0.0f;
    for (int r = 0; r < kBiasRows; ++r) s += part[r][threadIdx.x];
    dbias[j] += s;
  }
}

}  // namespace

void matmul_forward(CudaContext& ctx, float* out, const float* inp, const float* w, const float* bias, int64_t N,
                    int64_t C, int64_t OC, WeightLayout layout) {
  DPO_NVTX_RANGE("matmul_forward");
  if (N == 0 || OC == 0) return;
  if (C == 0) {
    launch_bias_rows<BiasMode::kSet>(ctx, out, bias, N, OC);
    return;
  }
  if (layout == WeightLayout::InOut) {
    lt_gemm(ctx, OC, N, C, w, false, OC, inp, false, C, 0.0f, out, OC, bias);
  } else {
    lt_gemm(ctx, OC, N, C, w, true, C, inp, false, C, 0.0f, out, OC, bias);
  }
}

void matmul_backward(CudaContext& ctx, float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int64_t N, int64_t C, int64_t OC, WeightLayout layout) {
  DPO_NVTX_RANGE("matmul_backward");
  if (N > 0 && C > 0 && OC > 0) {  // otherwise dinp and dw receive empty sums
    if (dinp) {
      if (layout == WeightLayout::InOut) {
        lt_gemm(ctx, C, N, OC, w, true, OC, dout, false, OC, 1.0f, dinp, C, nullptr);
      } else {
        lt_gemm(ctx, C, N, OC, w, false, C, dout, false, OC, 1.0f, dinp, C, nullptr);
      }
    }
    if (dw) {
      if (layout == WeightLayout::InOut) {
        lt_gemm(ctx, OC, C, N, dout, false, OC, inp, true, C, 1.0f, dw, OC, nullptr);
      } else {
        lt_gemm(ctx, C, OC, N, inp, false, C, dout, true, OC, 1.0f, dw, C, nullptr);
      }
    }
  }
  if (dbias && N > 0 && OC > 0) {
    const int64_t blocks = (OC + kBiasCols - 1) / kBiasCols;
    bias_grad_kernel<<<static_cast<unsigned>(blocks), dim3(kBiasCols, kBiasRows), 0, ctx.stream()>>>(dbias, dout, N,
                                                                                                    OC);
    DPO_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace dpo::cuda
