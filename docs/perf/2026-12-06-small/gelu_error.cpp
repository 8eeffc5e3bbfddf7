// Error of the float GELU kernels (kernels/gelu_cpu.cpp) against a long double closed form, over a dense sweep:
// every 61st float bit pattern of either sign (all exponents, subnormals included: ~70M points) plus a uniform
// grid of step 2^-20 over [-16, 16] (~33M points). The previous float formula (std::tanh per element) is measured
// the same way for comparison. Built against a build's kernel library:
//   g++ -O2 -fopenmp -I<src> gelu_error.cpp <build>/libdpo_kernels_cpu.a -o gelu_error && ./gelu_error
// Reported per region of x: the largest error in units of the float ulp of the reference (ulp of FLT_MIN for
// subnormal references), and the largest error divided by eps_f (1 + 2|u|) mag, the tolerance's shape in
// tests/test_kernels_cpu.cpp (u = a (x + k x^3); exp turns a relative error d of its argument 2u into 2|u| d).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/gelu.h"

namespace {
using LD = long double;
const LD kA = std::sqrt(2.0L / 3.14159265358979323846264338327950288L), kK = 0.044715L;

LD u_of(LD x) { return kA * (x + kK * x * x * x); }
// sigmoid(2u) and 1 - sigmoid(2u) without cancellation; gelu = x s, gelu' = s + 2 a x (1 + 3 k x^2) s (1 - s).
void sig(LD x, LD& s, LD& c) {
  const LD u = u_of(x);
  s = 1.0L / (1.0L + std::exp(-2.0L * u));
  c = 1.0L / (1.0L + std::exp(2.0L * u));
}
LD ref_fwd(LD x) {
  LD s, c;
  sig(x, s, c);
  return x * s;
}
LD bwd_mag(LD x) {
  LD s, c;
  sig(x, s, c);
  return s + std::fabs(2.0L * kA * x * (1.0L + 3.0L * kK * x * x) * s * c);
}
LD ref_bwd(LD x) {
  LD s, c;
  sig(x, s, c);
  return s + 2.0L * kA * x * (1.0L + 3.0L * kK * x * x) * s * c;
}
float old_fwd(float x) {
  const float a = static_cast<float>(0.79788456080286535587989211986876), k = 0.044715f;
  return 0.5f * x * (1.0f + std::tanh(a * (x + k * x * x * x)));
}
float old_bwd(float x) {
  const float a = static_cast<float>(0.79788456080286535587989211986876), k = 0.044715f;
  const float th = std::tanh(a * (x + k * x * x * x));
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * a * (1.0f + 3.0f * k * x * x);
}
double ulp_of(LD r) {
  const double ar = std::fabs(static_cast<double>(r));
  const double base = ar < FLT_MIN ? FLT_MIN : ar;
  int e;
  std::frexp(base, &e);
  return std::ldexp(1.0, e - 24);
}

struct Stat {
  double max_ulp = 0, max_scaled = 0, at_ulp = 0, at_scaled = 0;
  long nonfinite = 0, n = 0;
  // mag: the size of the terms the result is a sum of (|ref| for the forward; |s| + |2 a x (1 + 3 k x^2) s (1 - s)|
  // for gelu', whose two terms cancel near its zero at x = -0.7525).
  void add(float x, float got, LD ref, LD mag) {
    ++n;
    if (!std::isfinite(got)) {
      ++nonfinite;
      return;
    }
    const double err = std::fabs(static_cast<double>(static_cast<LD>(got) - ref));
    const double u = ulp_of(ref);
    const double e_ulp = err / u;
    if (e_ulp > max_ulp) max_ulp = e_ulp, at_ulp = x;
    const double scale = FLT_EPSILON * (1.0 + 2.0 * std::fabs(static_cast<double>(u_of(x)))) *
                         std::max(static_cast<double>(mag), static_cast<double>(FLT_MIN));
    const double sc = err / scale;
    if (sc > max_scaled) max_scaled = sc, at_scaled = x;
  }
};

const char* kRegion[] = {"|x| < 2^-20", "x in [-3, 3]", "x in (3, inf)", "x in [-11, -3)", "x < -11"};
int region(float x) {
  if (std::fabs(x) < 0x1p-20f) return 0;
  if (x >= -3 && x <= 3) return 1;
  if (x > 3) return 2;
  if (x >= -11) return 3;
  return 4;
}
}  // namespace

int main() {
  std::vector<float> xs;
  for (uint64_t b = 0; b < 0x7f800000u; b += 61) {
    uint32_t u = static_cast<uint32_t>(b);
    float f;
    std::memcpy(&f, &u, 4);
    xs.push_back(f);
    xs.push_back(-f);
  }
  for (int64_t i = -(int64_t(16) << 20); i <= (int64_t(16) << 20); ++i) xs.push_back(std::ldexp(float(i), -20));
  for (float x : {0.0f, -0.0f, FLT_MIN, -FLT_MIN, FLT_TRUE_MIN, -FLT_TRUE_MIN, FLT_MAX, -FLT_MAX}) xs.push_back(x);
  const int64_t n = static_cast<int64_t>(xs.size());
  std::vector<float> y(n), g(n, 0.0f), ones(n, 1.0f), yo(n), go(n);
  dpo::cpu::gelu_forward<float>(y.data(), xs.data(), n);
  dpo::cpu::gelu_backward<float>(g.data(), ones.data(), xs.data(), n);
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) yo[i] = old_fwd(xs[i]), go[i] = old_bwd(xs[i]);
  Stat sf[5], sb[5], of[5], ob[5];
  long limit_bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = xs[i];
    const int r = region(x);
    const LD rf = ref_fwd(x), rb = ref_bwd(x), mb = bwd_mag(x);
    sf[r].add(x, y[i], rf, std::fabs(rf)), sb[r].add(x, g[i], rb, mb);
    of[r].add(x, yo[i], rf, std::fabs(rf)), ob[r].add(x, go[i], rb, mb);
    // exact limits: gelu(x) = x and gelu'(x) = 1 for x >= 12; gelu(x) = -0 and gelu'(x) = 0 for x <= -12
    if (x >= 12 && (y[i] != x || g[i] != 1.0f)) ++limit_bad;
    if (x <= -12 && (y[i] != 0.0f || g[i] != 0.0f)) ++limit_bad;
  }
  std::printf("points: %ld (every 61st float bit pattern of both signs, the 2^-20 grid on [-16, 16], edge values)\n",
              static_cast<long>(n));
  std::printf("exact-limit violations (x >= 12: y = x, g = 1; x <= -12: y = 0, g = 0): %ld\n", limit_bad);
  auto show = [](const char* what, Stat* s) {
    std::printf("%s\n", what);
    for (int r = 0; r < 5; ++r)
      std::printf("  %-16s n=%-10ld max %10.3g ulp (x=%-12.6g)  max err/(eps(1+2|u|)mag) %8.3g (x=%-12.6g)  non-finite %ld\n",
                  kRegion[r], s[r].n, s[r].max_ulp, s[r].at_ulp, s[r].max_scaled, s[r].at_scaled, s[r].nonfinite);
  };
  show("forward, this kernel", sf);
  show("backward (gelu'), this kernel", sb);
  show("forward, previous formula (std::tanh float)", of);
  show("backward, previous formula (std::tanh float)", ob);
  return 0;
}
