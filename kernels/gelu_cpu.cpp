#include "kernels/gelu.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace dpo::cpu {

namespace {
constexpr double kSqrt2OverPi = 0.79788456080286535587989211986876;
constexpr double kCubic = 0.044715;

// Float path. 0.5 (1 + tanh u) = sigmoid(2u), so gelu(x) = x * s and gelu'(x) = s + 2 a x (1 + 3 k x^2) s (1 - s),
// s = sigmoid(2u), u = a (x + k x^3). With q = exp(-2|u|) in [0, 1]:
//   u >= 0: s = 1 / (1 + q),  1 - s = q / (1 + q);     u < 0: s = q / (1 + q),  1 - s = 1 / (1 + q),
// so neither s nor 1 - s is formed by a subtraction (the tanh form loses all digits of 1 + tanh u for x < -3), exp
// never overflows, and the limits are exact: q underflows to 0 for |x| > ~11, giving gelu = x (x > 0) or -0
// (x < 0), gelu' = 1 or 0. The loops are straight-line code (no libm call, selects as integer blends), so the
// compiler vectorises them for the baseline x86-64 ISA; every operation is a correctly rounded IEEE float
// operation and the kernel library is not built with contraction-enabling ISA flags, so the result is the same
// bits on every x86-64 CPU. Measured error: docs/perf/2026-12-06-small/gelu_error.txt.

constexpr float kLog2e = 1.44269504088896340736f;
// ln 2 split so that n * kLn2Hi is exact for |n| <= 256: kLn2Hi = 45426 / 2^16 (16 significant bits),
// kLn2Lo = ln 2 - kLn2Hi rounded to float.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.42860682030941723212e-6f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds a |t| < 2^22 float to an integer

// Bit-level helpers. The selects and clamps below work on the integer images of the floats: a float comparison
// may raise the invalid flag on NaN, so under GCC's default -ftrapping-math a conditional on it blocks the loop's
// if-conversion and with it the vectorisation; integer compares and blends do not. For non-negative floats the
// int32 images order like the values.
inline int32_t bits(float f) { return std::bit_cast<int32_t>(f); }
inline float from_bits(int32_t i) { return std::bit_cast<float>(i); }
constexpr int32_t kAbsMask = 0x7fffffff;

// exp(z) for z in [-104, 0]. z = n ln2 + r, |r| <= ~0.35; e^r by its degree-7 Taylor polynomial (truncation
// < r^8 / 8! < 6e-9 relative, 0.1 float ulp); 2^n built from exponent bits in two halves, so that results down to
// the smallest subnormal (n = -150) come out right, and below it 0 (exp(-104) < 2^-150).
inline float exp_nonpos(float z) {
  const float nf = (z * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (z - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n = static_cast<int32_t>(nf);  // in [-150, 0]
  const int32_t n1 = n / 2, n2 = n - n1;       // each in [-75, 0]: normal powers of two
  return p * from_bits((n1 + 127) << 23) * from_bits((n2 + 127) << 23);
}

// s = sigmoid(2u) and c = 1 - s for u = a (x + k x^3).
inline void sigmoid2u(float x, float& s, float& c) {
  const float a = static_cast<float>(kSqrt2OverPi), k = static_cast<float>(kCubic);
  const float u = a * (x + k * x * x * x);
  // |u| clamped to 52 (q = exp(-104) = 0 either way; also maps an infinite u, from |x| > ~7e12 where x^3
  // overflows, to the limit). A NaN u is clamped too; the forward still returns NaN through its factor x.
  const int32_t au = std::min(bits(u) & kAbsMask, bits(52.0f));
  const float q = exp_nonpos(-2.0f * from_bits(au));
  const float r = 1.0f / (1.0f + q);
  const float qr = q * r;
  const int32_t neg = bits(u) >> 31;  // all ones where u has its sign bit set (u = -0 gives q = 1, r = qr)
  s = from_bits((bits(r) & ~neg) | (bits(qr) & neg));
  c = from_bits((bits(qr) & ~neg) | (bits(r) & neg));
}

inline float gelu_f(float x) {
  float s, c;
  sigmoid2u(x, s, c);
  return x * s;
}

inline float gelu_grad_f(float x) {
  const float a = static_cast<float>(kSqrt2OverPi), k = static_cast<float>(kCubic);
  float s, c;
  sigmoid2u(x, s, c);
  // For |x| > 32, q = 0 exactly and s * c = 0; clamping x in the polynomial only keeps x^2 finite (no inf * 0).
  // NaN is left alone (its image is above that of infinity), so a NaN input gives a NaN gradient.
  const int32_t ax = bits(x) & kAbsMask;
  const int32_t axc = (ax > bits(32.0f) && ax <= bits(INFINITY)) ? bits(32.0f) : ax;
  const float xc = from_bits(axc | (bits(x) & ~kAbsMask));
  return s + 2.0f * a * xc * (1.0f + 3.0f * k * xc * xc) * (s * c);
}
}  // namespace

template <class T>
void gelu_forward(T* out, const T* inp, int64_t N) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp parallel for simd schedule(static) if (N > 16384)
    for (int64_t i = 0; i < N; ++i) out[i] = gelu_f(inp[i]);
  } else {
    const T a = static_cast<T>(kSqrt2OverPi), k = static_cast<T>(kCubic);
#pragma omp parallel for schedule(static) if (N > 16384)
    for (int64_t i = 0; i < N; ++i) {
      const T x = inp[i];
      out[i] = T(0.5) * x * (T(1) + std::tanh(a * (x + k * x * x * x)));
    }
  }
}

template <class T>
void gelu_backward(T* dinp, const T* dout, const T* inp, int64_t N, GradWrite dinp_write) {
  if constexpr (std::is_same_v<T, float>) {
    if (dinp_write == GradWrite::Overwrite) {
      // 0.0f + p, not p: the += result on a zeroed dinp, -0 products included (IEEE: +0 + -0 = +0).
#pragma omp parallel for simd schedule(static) if (N > 16384)
      for (int64_t i = 0; i < N; ++i) dinp[i] = 0.0f + dout[i] * gelu_grad_f(inp[i]);
      return;
    }
#pragma omp parallel for simd schedule(static) if (N > 16384)
    for (int64_t i = 0; i < N; ++i) dinp[i] += dout[i] * gelu_grad_f(inp[i]);
  } else {
    if (dinp_write == GradWrite::Overwrite) std::fill(dinp, dinp + N, T(0));
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
}

template void gelu_forward<float>(float*, const float*, int64_t);
template void gelu_forward<double>(double*, const double*, int64_t);
template void gelu_backward<float>(float*, const float*, const float*, int64_t, GradWrite);
template void gelu_backward<double>(double*, const double*, const double*, int64_t, GradWrite);

}  // namespace dpo::cpu
