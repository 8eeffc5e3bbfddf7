#include "kernels/swiglu.h"

#include <cmath>

namespace dpo::cpu {

namespace {
inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }
}  // namespace

template <class T>
void swiglu_forward(T* out, const T* inp, int64_t N, int64_t I) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* gate = inp + n * 2 * I;
    const T* up = gate + I;
    T* o = out + n * I;
    for (int64_t i = 0; i < I; ++i) {
      const double g = static_cast<double>(gate[i]);
      o[i] = static_cast<T>(g * sigmoid(g) * static_cast<double>(up[i]));
    }
  }
}

template <class T>
void swiglu_backward(T* dinp, const T* dout, const T* inp, int64_t N, int64_t I) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* gate = inp + n * 2 * I;
    const T* up = gate + I;
    const T* d = dout + n * I;
    T* dg = dinp + n * 2 * I;
    T* du = dg + I;
    for (int64_t i = 0; i < I; ++i) {
      const double g = static_cast<double>(gate[i]), u = static_cast<double>(up[i]);
      const double dy = static_cast<double>(d[i]);
      const double s = sigmoid(g);
      dg[i] = static_cast<T>(dy * u * (s * (1.0 + g * (1.0 - s))));
      du[i] = static_cast<T>(dy * (g * s));
    }
  }
}

template void swiglu_forward<float>(float*, const float*, int64_t, int64_t);
template void swiglu_forward<double>(double*, const double*, int64_t, int64_t);
template void swiglu_backward<float>(float*, const float*, const float*, int64_t, int64_t);
template void swiglu_backward<double>(double*, const double*, const double*, int64_t, int64_t);

}  // namespace dpo::cpu
