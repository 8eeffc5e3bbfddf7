#include "kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include "runtime/error.h"

namespace dpo::cpu {

namespace {

// Row-major C[M,N] = alpha * op(A) @ op(B) + beta * C. CBLAS takes int dimensions.
template <class T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  for (int64_t v : {M, N, K, lda, ldb, ldc}) {
    if (v > INT_MAX) throw Error("matmul: dimension " + std::to_string(v) + " exceeds the CBLAS int range");
  }
  const auto opa = ta ? CblasTrans : CblasNoTrans;
  const auto opb = tb ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, opa, opb, int(M), int(N), int(K), 1.0f, A, int(lda), B, int(ldb), beta, C, int(ldc));
  } else {
    static_assert(std::is_same_v<T, double>);
    cblas_dgemm(CblasRowMajor, opa, opb, int(M), int(N), int(K), 1.0, A, int(lda), B, int(ldb), beta, C, int(ldc));
  }
}

}  // namespace

// The row strides (ld_out, ld_dout >= OC) are BLAS's ldc / lda / ldb for out and dout: BLAS touches only the
// first OC elements of each row, so the padding columns are never read or written.
template <class T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int64_t N, int64_t C, int64_t OC,
                    WeightLayout layout, int64_t ld_out) {
  if (ld_out < OC)
    throw Error("matmul_forward: row stride " + std::to_string(ld_out) + " < OC " + std::to_string(OC));
  if (N == 0 || OC == 0) return;
  if (C == 0) {
    for (int64_t n = 0; n < N; ++n) std::fill(out + n * ld_out, out + n * ld_out + OC, T(0));  // an empty product
  } else if (layout == WeightLayout::InOut) {
    gemm<T>(false, false, N, OC, C, inp, C, w, OC, T(0), out, ld_out);
  } else {
    gemm<T>(false, true, N, OC, C, inp, C, w, C, T(0), out, ld_out);
  }
  if (bias) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* o = out + n * ld_out;
      for (int64_t j = 0; j < OC; ++j) o[j] += bias[j];
    }
  }
}

template <class T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int64_t N, int64_t C,
                     int64_t OC, WeightLayout layout, int64_t ld_dout, GradWrite dinp_write) {
  if (ld_dout < OC)
    throw Error("matmul_backward: row stride " + std::to_string(ld_dout) + " < OC " + std::to_string(OC));
  if (N > 0 && C > 0 && OC > 0) {  // otherwise dinp and dw get empty sums
    if (dinp) {
      // beta = 0: BLAS does not read C (NaN included) and starts from +0, as the += form does on a zeroed dinp.
      const T beta = dinp_write == GradWrite::Overwrite ? T(0) : T(1);
      if (layout == WeightLayout::InOut) {
        gemm<T>(false, true, N, C, OC, dout, ld_dout, w, OC, beta, dinp, C);  // dout[N,OC] @ w[C,OC]^T
      } else {
        gemm<T>(false, false, N, C, OC, dout, ld_dout, w, C, beta, dinp, C);  // dout[N,OC] @ w[OC,C]
      }
    }
    if (dw) {
      if (layout == WeightLayout::InOut) {
        gemm<T>(true, false, C, OC, N, inp, C, dout, ld_dout, T(1), dw, OC);  // inp^T @ dout -> [C,OC]
      } else {
        gemm<T>(true, false, OC, C, N, dout, ld_dout, inp, C, T(1), dw, C);  // dout^T @ inp -> [OC,C]
      }
    }
  }
  if (dinp && dinp_write == GradWrite::Overwrite && !(N > 0 && C > 0 && OC > 0)) {
    std::fill(dinp, dinp + N * C, T(0));  // an empty sum
  }
  if (dbias && N > 0) {
    // Threads split the output channels; each sums over n in order (deterministic for any thread count).
    constexpr int64_t kBlock = 64;
    const int64_t nblk = (OC + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t j0 = blk * kBlock, j1 = std::min(OC, j0 + kBlock);
      double acc[kBlock] = {};
      for (int64_t n = 0; n < N; ++n) {
        const T* d = dout + n * ld_dout;
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(d[j]);
      }
      for (int64_t j = j0; j < j1; ++j) dbias[j] += static_cast<T>(acc[j - j0]);
    }
  }
}

template void matmul_forward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t,
                                    WeightLayout, int64_t);
template void matmul_forward<double>(double*, const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                     WeightLayout, int64_t);
template void matmul_backward<float>(float*, float*, float*, const float*, const float*, const float*, int64_t,
                                     int64_t, int64_t, WeightLayout, int64_t, GradWrite);
template void matmul_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                      int64_t, int64_t, int64_t, WeightLayout, int64_t, GradWrite);

}  // namespace dpo::cpu
