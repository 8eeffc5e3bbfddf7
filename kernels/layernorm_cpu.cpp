#include "kernels/layernorm.h"

#include <algorithm>
#include <cmath>

namespace dpo::cpu {

namespace {

// One row of the forward: out, mean, rstd from x[0, C).
template <class T>
inline void layernorm_row(T* o, T* mean, T* rstd, const T* x, const T* w, const T* b, int64_t C, double eps) {
  // Two passes in double: GPT-2 activations can have |mean| >> std, where a one-pass E[x^2]-E[x]^2 cancels.
  double m = 0.0;
  for (int64_t c = 0; c < C; ++c) m += static_cast<double>(x[c]);
  m /= static_cast<double>(C);
  double v = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double d = static_cast<double>(x[c]) - m;
    v += d * d;
  }
  v /= static_cast<double>(C);
  const double s = 1.0 / std::sqrt(v + eps);
  for (int64_t c = 0; c < C; ++c) {
    const double xn = (static_cast<double>(x[c]) - m) * s;
    o[c] = static_cast<T>(xn * static_cast<double>(w[c]) + static_cast<double>(b[c]));
  }
  *mean = static_cast<T>(m);
  *rstd = static_cast<T>(s);
}

}  // namespace

template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int64_t N, int64_t C,
                       double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) layernorm_row(out + n * C, mean + n, rstd + n, inp + n * C, w, b, C, eps);
}

// Row by row: the add (residual_forward's `a[i] + b[i]` in T), then the row's LayerNorm on the stored sum, while
// the row is still in cache.
template <class T>
void residual_layernorm_forward(T* res_out, T* out, T* mean, T* rstd, const T* a, const T* b, const T* w,
                                const T* bias, int64_t N, int64_t C, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* r = res_out + n * C;
    const T* pa = a + n * C;
    const T* pb = b + n * C;
    for (int64_t c = 0; c < C; ++c) r[c] = pa[c] + pb[c];
    layernorm_row(out + n * C, mean + n, rstd + n, static_cast<const T*>(r), w, bias, C, eps);
  }
}

template <class T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w, const T* mean,
                        const T* rstd, int64_t N, int64_t C, GradWrite dinp_write) {
  const bool overwrite = dinp_write == GradWrite::Overwrite;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * C;
    const T* d = dout + n * C;
    const double m = static_cast<double>(mean[n]), s = static_cast<double>(rstd[n]);
    double dnorm_mean = 0.0, dnorm_norm_mean = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double xn = (static_cast<double>(x[c]) - m) * s;
      const double dn = static_cast<double>(w[c]) * static_cast<double>(d[c]);
      dnorm_mean += dn;
      dnorm_norm_mean += dn * xn;
    }
    dnorm_mean /= static_cast<double>(C);
    dnorm_norm_mean /= static_cast<double>(C);
    T* di = dinp + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const double xn = (static_cast<double>(x[c]) - m) * s;
      const double dn = static_cast<double>(w[c]) * static_cast<double>(d[c]);
      const T g = static_cast<T>((dn - dnorm_mean - xn * dnorm_norm_mean) * s);
      di[c] = (overwrite ? T(0) : di[c]) + g;  // T(0) + g, not g: the += result on a zeroed dinp, -0 included
    }
  }
  // dw and db reduce over rows: threads split the channels so each sum runs over n in a fixed order.
  constexpr int64_t kBlock = 32;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    double sw[kBlock] = {}, sb[kBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const T* x = inp + n * C;
      const T* d = dout + n * C;
      const double m = static_cast<double>(mean[n]), s = static_cast<double>(rstd[n]);
      for (int64_t c = c0; c < c1; ++c) {
        const double dc = static_cast<double>(d[c]);
        sw[c - c0] += dc * ((static_cast<double>(x[c]) - m) * s);
        sb[c - c0] += dc;
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dw[c] += static_cast<T>(sw[c - c0]);
      db[c] += static_cast<T>(sb[c - c0]);
    }
  }
}

template void layernorm_forward<float>(float*, float*, float*, const float*, const float*, const float*, int64_t,
                                       int64_t, double);
template void layernorm_forward<double>(double*, double*, double*, const double*, const double*, const double*,
                                        int64_t, int64_t, double);
template void residual_layernorm_forward<float>(float*, float*, float*, float*, const float*, const float*,
                                                const float*, const float*, int64_t, int64_t, double);
template void residual_layernorm_forward<double>(double*, double*, double*, double*, const double*, const double*,
                                                 const double*, const double*, int64_t, int64_t, double);
template void layernorm_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, int64_t, int64_t, GradWrite);
template void layernorm_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                         const double*, const double*, int64_t, int64_t, GradWrite);

}  // namespace dpo::cpu
