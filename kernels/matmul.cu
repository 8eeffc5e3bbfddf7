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
// Padded rows (the LM head's logits): out and dout may have a row stride ld >= OC. In the column-major view that is
// just the leading dimension of out^T / dout^T ([OC, N] with ld >= OC), so the shapes (m, n, k) stay those above and
// only ldd (forward) or the dout operand's ld (backward) changes; cuBLASLt reads and writes rows [0, m) of each
// column, never the padding. The BIAS epilogue adds bias[0, m) to those rows only. With ld a multiple of 16 bytes
// (ldv = round_up(V, 64) in model/gpt2.h) and a 256-byte-aligned base, every column starts 16-byte aligned, which
// the heuristic needs for its fast kernels (V = 50257 itself gives 2-byte-aligned columns in bf16).
//
// Precision: CUBLAS_COMPUTE_32F with CUDA_R_32F scale in every case (no TF32, no bf16x9 emulation). The type
// combinations (A/B, C = D, bias), all in cuBLASLt's table of supported regular types for CUBLAS_COMPUTE_32F:
//   fp32 storage: every operation   32F / 32F / 32F                     (the fp32 parity mode)
//   bf16 storage: forward, dinp     16BF / 16BF / 16BF   (fp32 accumulate, split-K partials and epilogue; one
//                                                         rounding of D; bias fused only when 16-byte aligned)
//                 dw                16BF / 32F           (parameter gradient, += in fp32 through beta = 1)
// A bf16 product of two bf16 numbers is exact in fp32, so with bf16 operands the only differences from the CPU
// twin on the same values are the fp32 summation order (and the tensor cores' accumulation, which is fp32).
//
// dbias: the BGRADB epilogue writes (=) the bias gradient and cannot accumulate, so it would need a scratch vector
// and an add (and in bf16 storage its output would be bf16, the type of D); a fixed-order two-stage column sum into
// the fp32 dbias (bias_grad below) is simpler, deterministic and reads dout once.
//
// GELU epilogues (matmul_gelu_forward / matmul_backward_dgelu, bf16 only; contract in kernels/matmul.cuh):
//   forward  GELU_AUX_BIAS on the MLP's c_fc GEMM (out^T = D, pre^T = aux, both column-major [OC, N], ld OC).
//   backward DGELU on the dinp GEMM of the layer after the GELU (c_proj): dpre^T = D = (W^T-product) * gelu'(aux),
//            aux = pre^T [C, N] with ld C. Which operand carries dout depends on the weight layout as in the table
//            above (dout^T is always B; W is A, transposed for InOut).
// DGELU_BGRAD does not fit our contracts, so it is not used: its bias gradient is sum_n dpre, the gradient of the
// *previous* layer's bias (c_fc), written with = (no accumulation: our dbias is += across micro-batches and GEMM
// calls) in D's type (bf16, where our parameter gradients are fp32 and a bf16 sum over N rows would lose about 8
// bits). Using it would take a bf16 scratch vector, an add kernel and a worse bias gradient; the c_fc bias gradient
// stays with the two-stage fp32 reduction (bias_grad) in that layer's matmul_backward. BGRADB is not used for the
// same reasons (see above).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/bf16.cuh"
#include "kernels/matmul.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

// Largest power of two (<= 256) dividing the address, at least the element size: cuBLASLt's heuristic assumes
// 256-byte aligned buffers unless told otherwise, and parameter views into one flat buffer can sit at any element
// offset.
uint32_t alignment_of(const void* p, uint32_t elem_bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > elem_bytes && (a % align) != 0) align /= 2;
  return align;
}

template <class T>
constexpr cudaDataType_t cuda_type();
template <>
constexpr cudaDataType_t cuda_type<float>() {
  return CUDA_R_32F;
}
template <>
constexpr cudaDataType_t cuda_type<bf16>() {
  return CUDA_R_16BF;
}

uint32_t type_bytes(cudaDataType_t t) { return t == CUDA_R_16BF ? 2u : 4u; }
const char* type_name(cudaDataType_t t) { return t == CUDA_R_16BF ? "bf16" : "fp32"; }

template <class V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, V value) {
  DPO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

template <class V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, V value) {
  DPO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

// Bias rows without cuBLASLt. kSet: out[n, j] = bias[j] (or 0 when bias is null), the forward pass when C == 0 (an
// empty product, which cuBLASLt rejects as k = 0). kAdd: out[n, j] = acc[n, j] + bias[j], rounded once to T, the
// fallback when no cuBLASLt algorithm supports the BIAS epilogue for these pointers (e.g. a misaligned bias view);
// acc is out itself for float storage (ld_acc = ld_out) and a dense fp32 scratch for bf16 (ld_acc = OC; so that a
// bf16 out is rounded once, not twice). Only columns [0, OC) of each row of out are written.
enum class BiasMode { kSet, kAdd };

template <BiasMode kMode, class T>
__global__ void bias_rows_kernel(T* out, int64_t ld_out, const float* acc, int64_t ld_acc,
                                 const T* __restrict__ bias, int64_t N, int64_t OC) {
  const int64_t total = N * OC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / OC, j = i - n * OC;
    if (kMode == BiasMode::kSet) {
      out[n * ld_out + j] = bias ? bias[j] : from_float<T>(0.0f);
    } else {
      out[n * ld_out + j] = from_float<T>(acc[n * ld_acc + j] + to_float(bias[j]));
    }
  }
}

template <BiasMode kMode, class T>
void launch_bias_rows(CudaContext& ctx, T* out, int64_t ld_out, const float* acc, int64_t ld_acc, const T* bias,
                      int64_t N, int64_t OC) {
  const int64_t blocks = std::min<int64_t>((N * OC + 255) / 256, 65536);
  bias_rows_kernel<kMode, T><<<static_cast<unsigned>(blocks), 256, 0, ctx.stream()>>>(out, ld_out, acc, ld_acc, bias,
                                                                                      N, OC);
  DPO_CUDA_CHECK(cudaGetLastError());
}

// Column-major D[m,n] = op(A)[m,k] @ op(B)[k,n] (+ bias[m] per column) + beta * D, fp32 compute.
// A is stored [m,k] (ld >= m) if !ta, else [k,m] (ld >= k); likewise B is [k,n] if !tb, else [n,k]. A and B have
// type ab_type, D (= C) and bias type d_type (see the table at the top).
// Descriptors live on the stack (the *Init forms: nothing to free when a check throws). Building them and asking
// the heuristic costs a few microseconds per call on the host; a per-context cache keyed by (shape, layout, types,
// epilogue, alignments) can remove that once the launch overhead matters (it will, next to the small kernels).
// Returns false (nothing enqueued) when an epilogue is asked for and no algorithm takes it here; the caller then
// does the epilogue's work itself. Throws when there is no algorithm at all.
// The epilogue of one GEMM. mode DEFAULT: none. BIAS: D = AB + bias. GELU_AUX / GELU_AUX_BIAS: aux = AB (+ bias)
// (=, D's type, the pre-activation), D = gelu(aux) computed from the fp32 value before aux is rounded. DGELU:
// D = AB * gelu'(aux) with aux read (the forward's pre-activation). aux is a column-major [m, n] matrix with
// leading dimension aux_ld (a multiple of 8 elements, cuBLASLt's rule for the GELU aux matrix).
struct Epilogue {
  cublasLtEpilogue_t mode = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  const void* aux = nullptr;
  int64_t aux_ld = 0;
};

Epilogue bias_epilogue(const void* bias) {
  Epilogue e;
  if (bias) {
    e.mode = CUBLASLT_EPILOGUE_BIAS;
    e.bias = bias;
  }
  return e;
}

bool lt_gemm(CudaContext& ctx, int64_t m, int64_t n, int64_t k, cudaDataType_t ab_type, const void* A, bool ta,
             int64_t lda, const void* B, bool tb, int64_t ldb, float beta, cudaDataType_t d_type, void* D,
             int64_t ldd, const Epilogue& epi) {
  cublasLtMatmulDescOpaque_t op_storage;
  cublasLtMatmulDesc_t op = &op_storage;
  DPO_CUBLAS_CHECK(cublasLtMatmulDescInit(op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(op, CUBLASLT_MATMUL_DESC_TRANSA, ta ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_desc(op, CUBLASLT_MATMUL_DESC_TRANSB, tb ? CUBLAS_OP_T : CUBLAS_OP_N);
  const bool fused = epi.mode != CUBLASLT_EPILOGUE_DEFAULT;
  if (fused) set_desc(op, CUBLASLT_MATMUL_DESC_EPILOGUE, epi.mode);
  if (epi.bias) {
    set_desc(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, epi.bias);
    set_desc(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(d_type));  // = D's type, the default
  }
  if (epi.aux) {
    // The aux data type is left at its default, D's type (bf16 for the GELU fusions, which run in bf16 only).
    set_desc(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, epi.aux);
    set_desc(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<int64_t>(epi.aux_ld));
  }

  cublasLtMatrixLayoutOpaque_t a_storage, b_storage, d_storage;
  cublasLtMatrixLayout_t a_layout = &a_storage, b_layout = &b_storage, d_layout = &d_storage;
  DPO_CUBLAS_CHECK(cublasLtMatrixLayoutInit(a_layout, ab_type, static_cast<uint64_t>(ta ? k : m),
                                            static_cast<uint64_t>(ta ? m : k), lda));
  DPO_CUBLAS_CHECK(cublasLtMatrixLayoutInit(b_layout, ab_type, static_cast<uint64_t>(tb ? n : k),
                                            static_cast<uint64_t>(tb ? k : n), ldb));
  DPO_CUBLAS_CHECK(cublasLtMatrixLayoutInit(d_layout, d_type, static_cast<uint64_t>(m), static_cast<uint64_t>(n),
                                            ldd));

  cublasLtMatmulPreferenceOpaque_t pref_storage;
  cublasLtMatmulPreference_t pref = &pref_storage;
  DPO_CUBLAS_CHECK(cublasLtMatmulPreferenceInit(pref));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(ctx.workspace_bytes()));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(A, type_bytes(ab_type)));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(B, type_bytes(ab_type)));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(D, type_bytes(d_type)));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(D, type_bytes(d_type)));
  // Split-K partial sums must stay fp32: the INPLACE and OUTPUT_TYPE reduction schemes accumulate them in D's type,
  // which for a bf16 D would round every partial (and break "fp32 compute, one rounding"). COMPUTE_TYPE keeps them in
  // fp32 in the workspace. (A float D is left with every scheme allowed: they are all fp32 there.)
  if (d_type == CUDA_R_16BF) {
    set_pref(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
             static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
  }

  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(ctx.cublaslt(), op, a_layout, b_layout, d_layout,
                                                           d_layout, pref, 1, &heur, &found);
  // No algorithm takes the epilogue here: the caller runs a plain GEMM, then the epilogue's work separately. For the
  // GELU epilogues (an aux matrix) any refusal of the heuristic counts as that: their attribute rules (aux layout,
  // types) vary between cuBLASLt versions, and the unfused ops are always correct.
  if (fused && (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && found == 0) ||
                (epi.aux && st != CUBLAS_STATUS_SUCCESS))) {
    return false;
  }
  auto what = [&] {
    return std::string(type_name(ab_type)) + " x " + type_name(ab_type) + " -> " + type_name(d_type) +
           " m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
  };
  if (st != CUBLAS_STATUS_SUCCESS) {
    throw_library_error("cuBLAS", cublasGetStatusName(st), ("cublasLtMatmulAlgoGetHeuristic, " + what()).c_str(),
                        __FILE__, __LINE__, cuda_detail::current_device());
  }
  DPO_ASSERT(found > 0, "cuBLASLt has no algorithm for " + what());
  const float alpha = 1.0f;
  // C and D are the same buffer with the same layout: the in-place accumulation cuBLASLt supports. With beta = 0
  // C is not read (BLAS semantics), so D may hold anything, NaN included.
  DPO_CUBLAS_CHECK(cublasLtMatmul(ctx.cublaslt(), op, &alpha, A, a_layout, B, b_layout, &beta, D, d_layout, D,
                                  d_layout, &heur.algo, ctx.workspace(), ctx.workspace_bytes(), ctx.stream()));
  return true;
}

// out[N,OC] (= out^T[OC,N] column-major, leading dimension ld_out) = inp @ W + bias, see the table at the top;
// bias may be null.
template <class T>
void gemm_forward(CudaContext& ctx, T* out, const T* inp, const T* w, const T* bias, int64_t N, int64_t C,
                  int64_t OC, WeightLayout layout, int64_t ld_out) {
  constexpr cudaDataType_t t = cuda_type<T>();
  const bool ta = layout == WeightLayout::OutIn;
  const int64_t lda = layout == WeightLayout::InOut ? OC : C;
  // The alignment preferences cover A, B, C and D but not the bias, and the heuristic has been seen to pick a kernel
  // that assumes a 16-byte aligned bias (pytorch/pytorch#194497, "misaligned address"). A bf16 bias view into a flat
  // parameter buffer is only 2-byte aligned in general, so it goes to the fallback unless it is 16-byte aligned;
  // so does an fp32 bias (GPT-2's biases are 16-byte aligned in fp32 whenever C % 4 == 0, so they fuse).
  const bool fuse = reinterpret_cast<uintptr_t>(bias) % 16 == 0;
  if (fuse && lt_gemm(ctx, OC, N, C, t, w, ta, lda, inp, false, C, 0.0f, t, out, ld_out, bias_epilogue(bias))) {
    return;
  }
  // Bias fallback. Float: D = out, then out += bias (one more fp32 rounding, as in the CPU twin's separate add).
  // bf16: D = an fp32 scratch (16BF x 16BF -> 32F, the dw combination), then out = bf16(D + bias), rounded once.
  if constexpr (std::is_same_v<T, float>) {
    lt_gemm(ctx, OC, N, C, t, w, ta, lda, inp, false, C, 0.0f, t, out, ld_out, Epilogue{});
    launch_bias_rows<BiasMode::kAdd, float>(ctx, out, ld_out, out, ld_out, bias, N, OC);
  } else {
    auto scratch = ctx.alloc(N * OC * static_cast<int64_t>(sizeof(float)));
    float* acc = static_cast<float*>(scratch->data());
    lt_gemm(ctx, OC, N, C, t, w, ta, lda, inp, false, C, 0.0f, CUDA_R_32F, acc, OC, Epilogue{});
    launch_bias_rows<BiasMode::kAdd, T>(ctx, out, ld_out, acc, OC, bias, N, OC);
  }
}

// dbias[j] += sum_n dout[n * ld + j] (ld >= OC: dout's row stride), in two deterministic stages so that the grid
// fills the GPU (one block per 32 columns alone gives OC/32 = 24..96 blocks for GPT-2, on 132 SMs):
//   stage 1, grid (column tiles, row chunks): block (x, r) owns kBiasCols adjacent columns (coalesced rows) of the
//            rows [r * chunk_rows, min(N, (r + 1) * chunk_rows)); its kBiasRows thread rows each sum a fixed,
//            strided subset of those rows in ascending order, then thread row 0 adds the kBiasRows sums in order
//            and writes the chunk's partial sum (=) into the context's scratch, partial[r * OC + j];
//   stage 2: one thread per column adds the chunks' partials in chunk order and accumulates (+=) into dbias.
// The chunking (bias_chunk_rows) depends on N only, never on the device or the launch, so the summation order and
// the result are bitwise reproducible. fp32 accumulation throughout.
constexpr int kBiasCols = 32;
constexpr int kBiasRows = 8;
constexpr int64_t kBiasMaxChunks = 64;     // at most this many partials per column (stage 2 reads them all)
constexpr int64_t kBiasMinChunkRows = 64;  // at least this many rows per block (8 per thread row)

int64_t bias_chunk_rows(int64_t N) { return std::max(kBiasMinChunkRows, (N + kBiasMaxChunks - 1) / kBiasMaxChunks); }

template <class T>
__global__ void __launch_bounds__(kBiasCols* kBiasRows)
    bias_grad_partial_kernel(float* __restrict__ partial, const T* __restrict__ dout, int64_t N, int64_t OC,
                             int64_t ld, int64_t chunk_rows) {
  __shared__ float part[kBiasRows][kBiasCols + 1];
  const int64_t j = int64_t(blockIdx.x) * kBiasCols + threadIdx.x;
  const int64_t r = blockIdx.y;
  const int64_t n0 = r * chunk_rows;
  const int64_t n1 = n0 + chunk_rows < N ? n0 + chunk_rows : N;
  float acc = 0.0f;
  if (j < OC) {
#pragma unroll 4
    for (int64_t n = n0 + threadIdx.y; n < n1; n += kBiasRows) acc += to_float(dout[n * ld + j]);
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < OC) {
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < kBiasRows; ++q) s += part[q][threadIdx.x];
    partial[r * OC + j] = s;
  }
}

__global__ void bias_grad_reduce_kernel(float* __restrict__ dbias, const float* __restrict__ partial, int64_t chunks,
                                        int64_t OC) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= OC) return;
  float s = 0.0f;
  for (int64_t r = 0; r < chunks; ++r) s += partial[r * OC + j];
  dbias[j] += s;
}

template <class T>
void bias_grad(CudaContext& ctx, float* dbias, const T* dout, int64_t N, int64_t OC, int64_t ld) {
  const int64_t chunk_rows = bias_chunk_rows(N);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;  // <= kBiasMaxChunks
  const int64_t tiles = (OC + kBiasCols - 1) / kBiasCols;
  DPO_ASSERT(tiles <= INT32_MAX, "matmul_backward: OC = " + std::to_string(OC) + " exceeds one launch");
  float* partial = static_cast<float*>(ctx.scratch(chunks * OC * static_cast<int64_t>(sizeof(float))));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
  bias_grad_partial_kernel<T><<<grid, dim3(kBiasCols, kBiasRows), 0, ctx.stream()>>>(partial, dout, N, OC, ld,
                                                                                   chunk_rows);
  DPO_CUDA_CHECK(cudaGetLastError());
  constexpr int kReduceThreads = 256;
  const int64_t rblocks = (OC + kReduceThreads - 1) / kReduceThreads;
  bias_grad_reduce_kernel<<<static_cast<unsigned>(rblocks), kReduceThreads, 0, ctx.stream()>>>(dbias, partial, chunks,
                                                                                              OC);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void check_ld(const char* fn, const char* what, int64_t ld, int64_t OC) {
  DPO_ASSERT(ld >= OC, std::string(fn) + ": the row stride of " + what + " (" + std::to_string(ld) +
                           ") is smaller than OC (" + std::to_string(OC) + ")");
}

template <class T>
void matmul_forward_impl(CudaContext& ctx, T* out, const T* inp, const T* w, const T* bias, int64_t N, int64_t C,
                         int64_t OC, WeightLayout layout, int64_t ld_out) {
  DPO_NVTX_RANGE("matmul_forward");
  check_ld("matmul_forward", "out", ld_out, OC);
  if (N == 0 || OC == 0) return;
  if (C == 0) {
    launch_bias_rows<BiasMode::kSet, T>(ctx, out, ld_out, nullptr, 0, bias, N, OC);
    return;
  }
  gemm_forward(ctx, out, inp, w, bias, N, C, OC, layout, ld_out);
}

// dinp (type T, like the activations) and dw (always fp32) accumulate through beta = 1; see the table at the top.
// GradWrite::Overwrite: dinp through beta = 0 (C is not read). dout^T is the column-major [OC, N] operand with
// leading dimension ld (the padded case at the top).
template <class T>
void matmul_backward_impl(CudaContext& ctx, T* dinp, float* dw, float* dbias, const T* dout, const T* inp,
                          const T* w, int64_t N, int64_t C, int64_t OC, WeightLayout layout, int64_t ld,
                          GradWrite dinp_write) {
  DPO_NVTX_RANGE("matmul_backward");
  check_ld("matmul_backward", "dout", ld, OC);
  constexpr cudaDataType_t t = cuda_type<T>();
  const float dinp_beta = dinp_write == GradWrite::Overwrite ? 0.0f : 1.0f;
  if (N > 0 && C > 0 && OC > 0) {  // otherwise dinp and dw receive empty sums
    if (dinp) {
      if (layout == WeightLayout::InOut) {
        lt_gemm(ctx, C, N, OC, t, w, true, OC, dout, false, ld, dinp_beta, t, dinp, C, Epilogue{});
      } else {
        lt_gemm(ctx, C, N, OC, t, w, false, C, dout, false, ld, dinp_beta, t, dinp, C, Epilogue{});
      }
    }
    if (dw) {
      if (layout == WeightLayout::InOut) {
        lt_gemm(ctx, OC, C, N, t, dout, false, ld, inp, true, C, 1.0f, CUDA_R_32F, dw, OC, Epilogue{});
      } else {
        lt_gemm(ctx, C, OC, N, t, inp, false, C, dout, true, ld, 1.0f, CUDA_R_32F, dw, C, Epilogue{});
      }
    }
  } else if (dinp && dinp_write == GradWrite::Overwrite && N > 0 && C > 0) {
    DPO_CUDA_CHECK(cudaMemsetAsync(dinp, 0, static_cast<size_t>(N * C) * sizeof(T), ctx.stream()));  // OC = 0
  }
  if (dbias && N > 0 && OC > 0) bias_grad(ctx, dbias, dout, N, OC, ld);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The GELU fusions' fit (kernels/matmul.cuh): bf16 storage only, non-empty shapes, the aux matrix (pre) 16-byte
// aligned with a leading dimension that is a multiple of 8 elements (cuBLASLt's rule for the GELU aux matrix), the
// bias (when there is one) 16-byte aligned as for the BIAS epilogue above.
bool gelu_fusion_fits(const void* pre, int64_t aux_ld, const void* bias, int64_t N, int64_t C, int64_t OC) {
  return N > 0 && C > 0 && OC > 0 && aux_ld % 8 == 0 && aligned16(pre) && (bias == nullptr || aligned16(bias));
}

}  // namespace

bool matmul_gelu_forward(CudaContext& ctx, __nv_bfloat16* out, __nv_bfloat16* pre, const __nv_bfloat16* inp,
                         const __nv_bfloat16* w, const __nv_bfloat16* bias, int64_t N, int64_t C, int64_t OC,
                         WeightLayout layout) {
  DPO_NVTX_RANGE("matmul_gelu_forward");
  if (!gelu_fusion_fits(pre, OC, bias, N, C, OC)) return false;
  Epilogue e;
  e.mode = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  e.bias = bias;
  e.aux = pre;
  e.aux_ld = OC;  // pre^T is the column-major [OC, N] matrix of D's shape
  const bool ta = layout == WeightLayout::OutIn;
  const int64_t lda = layout == WeightLayout::InOut ? OC : C;
  return lt_gemm(ctx, OC, N, C, CUDA_R_16BF, w, ta, lda, inp, false, C, 0.0f, CUDA_R_16BF, out, OC, e);
}

bool matmul_backward_dgelu(CudaContext& ctx, __nv_bfloat16* dpre, float* dw, float* dbias,
                           const __nv_bfloat16* dout, const __nv_bfloat16* inp, const __nv_bfloat16* w,
                           const __nv_bfloat16* pre, int64_t N, int64_t C, int64_t OC, WeightLayout layout) {
  DPO_NVTX_RANGE("matmul_backward_dgelu");
  if (!gelu_fusion_fits(pre, C, nullptr, N, C, OC)) return false;
  Epilogue e;
  e.mode = CUBLASLT_EPILOGUE_DGELU;
  e.aux = pre;
  e.aux_ld = C;  // pre^T is the column-major [C, N] matrix of D's (dpre^T's) shape
  // The dinp GEMM of the table at the top, with beta = 0 and the DGELU epilogue; nothing else is enqueued unless
  // it was, so a false return leaves every output untouched.
  const bool ok = layout == WeightLayout::InOut
                      ? lt_gemm(ctx, C, N, OC, CUDA_R_16BF, w, true, OC, dout, false, OC, 0.0f, CUDA_R_16BF, dpre, C, e)
                      : lt_gemm(ctx, C, N, OC, CUDA_R_16BF, w, false, C, dout, false, OC, 0.0f, CUDA_R_16BF, dpre, C, e);
  if (!ok) return false;
  matmul_backward_impl<bf16>(ctx, nullptr, dw, dbias, dout, inp, w, N, C, OC, layout, OC, GradWrite::Accumulate);
  return true;
}

void matmul_forward(CudaContext& ctx, float* out, const float* inp, const float* w, const float* bias, int64_t N,
                    int64_t C, int64_t OC, WeightLayout layout, int64_t ld_out) {
  matmul_forward_impl(ctx, out, inp, w, bias, N, C, OC, layout, ld_out);
}
void matmul_forward(CudaContext& ctx, __nv_bfloat16* out, const __nv_bfloat16* inp, const __nv_bfloat16* w,
                    const __nv_bfloat16* bias, int64_t N, int64_t C, int64_t OC, WeightLayout layout,
                    int64_t ld_out) {
  matmul_forward_impl(ctx, out, inp, w, bias, N, C, OC, layout, ld_out);
}

void matmul_backward(CudaContext& ctx, float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int64_t N, int64_t C, int64_t OC, WeightLayout layout, int64_t ld_dout,
                     GradWrite dinp_write) {
  matmul_backward_impl(ctx, dinp, dw, dbias, dout, inp, w, N, C, OC, layout, ld_dout, dinp_write);
}
void matmul_backward(CudaContext& ctx, __nv_bfloat16* dinp, float* dw, float* dbias, const __nv_bfloat16* dout,
                     const __nv_bfloat16* inp, const __nv_bfloat16* w, int64_t N, int64_t C, int64_t OC,
                     WeightLayout layout, int64_t ld_dout, GradWrite dinp_write) {
  matmul_backward_impl(ctx, dinp, dw, dbias, dout, inp, w, N, C, OC, layout, ld_dout, dinp_write);
}

}  // namespace dpo::cuda
