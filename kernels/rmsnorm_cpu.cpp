#include "kernels/rmsnorm.h"

#include <algorithm>
#include <cmath>

namespace dpo::cpu {

namespace {

// One row of the forward: out, rstd from x[0, C). One pass suffices: no mean is subtracted, so there is no
// cancellation (every term of the sum is >= 0).
template <class T>
inline void rmsnorm_row(T* o, T* rstd, const T* x, const T* w, int64_t C, double eps) {
  double ss = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(x[c]);
    ss += v * v;
  }
  const double s = 1.0 / std::sqrt(ss / static_cast<double>(C) + eps);
  if (w != nullptr) {
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(static_cast<double>(x[c]) * s * static_cast<double>(w[c]));
  } else {
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(static_cast<double>(x[c]) * s);
  }
  *rstd = static_cast<T>(s);
}

}  // namespace

template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* w, int64_t N, int64_t C, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) rmsnorm_row(out + n * C, rstd + n, inp + n * C, w, C, eps);
}

// Row by row: the add (residual_forward's `a[i] + b[i]` in T), then the row's RMSNorm on the stored sum.
template <class T>
void residual_rmsnorm_forward(T* res_out, T* out, T* rstd, const T* a, const T* b, const T* w, int64_t N, int64_t C,
                              double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* r = res_out + n * C;
    const T* pa = a + n * C;
    const T* pb = b + n * C;
    for (int64_t c = 0; c < C; ++c) r[c] = pa[c] + pb[c];
    rmsnorm_row(out + n * C, rstd + n, static_cast<const T*>(r), w, C, eps);
  }
}

template <class T>
void rmsnorm_backward(T* dinp, T* dw, const T* dout, const T* inp, const T* w, const T* rstd, int64_t N, int64_t C,
                      GradWrite dinp_write) {
  const bool overwrite = dinp_write == GradWrite::Overwrite;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * C;
    const T* d = dout + n * C;
    const double s = static_cast<double>(rstd[n]);
    double gx = 0.0;  // mean_c(g * xn)
    for (int64_t c = 0; c < C; ++c)
      gx += static_cast<double>(w[c]) * static_cast<double>(d[c]) * (static_cast<double>(x[c]) * s);
    gx /= static_cast<double>(C);
    T* di = dinp + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const double xn = static_cast<double>(x[c]) * s;
      const double g = static_cast<double>(w[c]) * static_cast<double>(d[c]);
      const T v = static_cast<T>((g - xn * gx) * s);
      di[c] = (overwrite ? T(0) : di[c]) + v;  // T(0) + v, not v: the += result on a zeroed dinp, -0 included
    }
  }
  // dw reduces over rows: threads split the channels so each sum runs over n in a fixed order.
  constexpr int64_t kBlock = 32;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    double sw[kBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const T* x = inp + n * C;
      const T* d = dout + n * C;
      const double s = static_cast<double>(rstd[n]);
      for (int64_t c = c0; c < c1; ++c) sw[c - c0] += static_cast<double>(d[c]) * (static_cast<double>(x[c]) * s);
    }
    for (int64_t c = c0; c < c1; ++c) dw[c] += static_cast<T>(sw[c - c0]);
  }
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int64_t, int64_t, double);
template void rmsnorm_forward<double>(double*, double*, const double*, const double*, int64_t, int64_t, double);
template void residual_rmsnorm_forward<float>(float*, float*, float*, const float*, const float*, const float*, int64_t,
                                              int64_t, double);
template void residual_rmsnorm_forward<double>(double*, double*, double*, const double*, const double*, const double*,
                                               int64_t, int64_t, double);
template void rmsnorm_backward<float>(float*, float*, const float*, const float*, const float*, const float*, int64_t,
                                      int64_t, GradWrite);
template void rmsnorm_backward<double>(double*, double*, const double*, const double*, const double*, const double*,
                                       int64_t, int64_t, GradWrite);

}  // namespace dpo::cpu
