#include "kernels/gelu.h"

#include <cmath>

namespace dpo::cpu {

namespace {
constexpr double kSqrt2OverPi = 0.79788456080286535587989211986876;
constexpr double kCubic = 0.044715;
}  // namespace

template <class T>
void gelu_forward(T* out, const T* inp, int64_t N) {
  const T a = static_cast<T>(kSqrt2OverPi), k = static_cast<T>(kCubic);
#pragma omp parallel for schedule(static) if (N > 16384)
  for (int64_t i = 0; i < N; ++i) {
    const T x = inp[i];
    out[i] = T(0.5) * x * (T(1) + std::tanh(a * (x + k * x * x * x)));
  }
}

template <class T>
void gelu_backward(T* dinp, const T* dout, const T* inp, int64_t N) {
  const T a = static_cast<T>(kSqrt2OverPi), k = static_cast<T>(kCubic);
#pragma omp parallel for schedule(static) if (N > 16384)
  for (int64_t i = 0; i < N; ++i) {
    const T x = inp[i];
    const T th = std::tanh(a * (x + k * x * x * x));
    const T sech2 = T(1) - th * th;
    const T g = T(0.5) * (T(1) + th) + T(0.5) * x * sech2 * a * (T(1) + T(3) * k * x * x);
    dinp[i] += dout[i] * g;
  }
}

template void gelu_forward<float>(float*, const float*, int64_t);
template void gelu_forward<double>(double*, const double*, int64_t);
template void gelu_backward<float>(float*, const float*, const float*, int64_t);
template void gelu_backward<double>(double*, const double*, const double*, int64_t);

}  // namespace dpo::cpu
