// The optimizer: the AdamW kernel against an independent long-double reimplementation of torch.optim.AdamW and
// against the closed form of its first step; sum_squares (determinism across thread counts, accuracy); the AdamW
// class (decay only where ParamSpec::weight_decay, global-norm clipping, non-finite norms, resume); the lr
// schedule; config validation; the backend's boundary checks for the optimizer ops. float and double throughout.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numbers>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/adamw.h"
#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/rng.h"
#include "test_util.h"
#include "train/optim.h"

namespace {

using namespace dpo;
using dpo::test::max_rel_err;
using dpo::test::randn;
using dpo::test::test_seed;
using LD = long double;

using test::ThreadCount;

using test::bitwise_equal;
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  return {v.begin(), v.end()};
}
std::vector<double> to_double(const std::vector<LD>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(v[i]);
  return r;
}
template <class T>
std::vector<LD> to_ld(const std::vector<T>& v) {
  return {v.begin(), v.end()};
}

// Tolerance of the T kernel against the long-double reference after up to 8 steps, relative to max(1, |ref|).
// double: each step is a chain of ~10 roundings of 1.1e-16 on O(1) values; measured <= 5e-16, asserted 1e-14.
// float: the kernel's arithmetic is float (ATen's opmath for float): each step is a chain of ~10 float roundings
// (6e-8 relative each) on O(1) values, and m, v and the parameters are stored in float; over 8 steps measured
// <= 2.6e-7 (1.6e-7 when the arithmetic was double), asserted 1e-6. A wrong term (no bias correction, no decay, coupled L2 decay) moves the result by O(lr) = 1e-2
// relative (ReferenceDistinguishesVariants); a missing grad_scale changes m and v by the scale itself.
template <class T>
constexpr double ref_tol() {
  return sizeof(T) == 8 ? 1e-14 : 1e-6;
}

// torch.optim.AdamW written from its documented algorithm (not from the kernel's order of operations), in long
// double: theta <- theta - lr * wd * theta; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
// mhat = m / (1-b1^t); vhat = v / (1-b2^t); theta <- theta - lr * mhat / (sqrt(vhat) + eps).
struct RefAdamW {
  std::vector<LD> p, m, v;
  int64_t t = 0;
  bool bias_correction = true;  // variants, only to show that the tolerances separate them from AdamW
  bool coupled_decay = false;   // Adam + L2 (torch.optim.Adam's weight_decay) instead of AdamW's decoupled decay
  explicit RefAdamW(std::vector<LD> p0) : p(std::move(p0)), m(p.size(), 0), v(p.size(), 0) {}
  // g is the gradient after clipping; wd[i] is the weight decay of element i.
  void step(const std::vector<LD>& g, LD lr, LD b1, LD b2, LD eps, const std::vector<LD>& wd) {
    ++t;
    LD bc1 = 1 - std::pow(b1, static_cast<LD>(t)), bc2 = 1 - std::pow(b2, static_cast<LD>(t));
    if (!bias_correction) bc1 = bc2 = 1;
    for (size_t i = 0; i < p.size(); ++i) {
      LD gi = g[i];
      if (coupled_decay) gi += wd[i] * p[i];
      else p[i] -= lr * wd[i] * p[i];
      m[i] = b1 * m[i] + (1 - b1) * gi;
      v[i] = b2 * v[i] + (1 - b2) * gi * gi;
      const LD mhat = m[i] / bc1, vhat = v[i] / bc2;
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

// torch.nn.utils.clip_grad_norm_ in long double: the factor the gradients are multiplied by.
LD clip_coef(const std::vector<LD>& g, LD max_norm) {
  LD s = 0;
  for (LD x : g) s += x * x;
  if (max_norm <= 0) return 1;
  return std::min<LD>(1, max_norm / (std::sqrt(s) + LD(1e-6)));
}

template <class T>
std::vector<T> rounded(std::mt19937_64& g, size_t n, double scale = 1.0) {
  return randn<T>(g, n, scale);  // randn<T> rounds to T: kernel and reference see the same values
}

template <class T>
Tensor host_tensor(const std::vector<T>& v) {
  Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, dtype_of<T>());
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return t;
}
template <class T>
std::vector<T> to_vec(const Tensor& t) {
  std::vector<T> v(static_cast<size_t>(t.numel()));
  if (!v.empty()) std::memcpy(v.data(), t.raw(), v.size() * sizeof(T));  // an empty vector's data() may be null
  return v;
}

template <class T>
class Optim : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Optim, FloatTypes);

// ============================================================================================== kernel

// Several steps of cpu::adamw_update against RefAdamW, fresh gradients each step.
template <class T>
void run_kernel_vs_reference(uint64_t seed, double wd, double grad_scale, int steps) {
  std::mt19937_64 g(seed);
  const size_t n = 1037;
  std::vector<T> p = rounded<T>(g, n), m(n, T(0)), v(n, T(0));
  RefAdamW ref(to_ld(p));
  AdamWParams hp;
  hp.lr = 1e-2;
  hp.beta1 = 0.9;
  hp.beta2 = 0.999;
  hp.eps = 1e-8;
  hp.weight_decay = wd;
  hp.grad_scale = grad_scale;
  const std::vector<LD> wdv(n, static_cast<LD>(wd));
  for (int s = 1; s <= steps; ++s) {
    std::vector<T> grad = rounded<T>(g, n, 0.5 * s);
    const std::vector<T> grad_copy = grad;
    hp.step = s;
    cpu::adamw_update<T>(p.data(), grad.data(), m.data(), v.data(), static_cast<int64_t>(n), hp);
    ASSERT_TRUE(bitwise_equal(grad, grad_copy)) << "grad must be read only";
    std::vector<LD> gs(n);
    for (size_t i = 0; i < n; ++i) gs[i] = static_cast<LD>(grad[i]) * static_cast<LD>(grad_scale);
    ref.step(gs, hp.lr, hp.beta1, hp.beta2, hp.eps, wdv);
    SCOPED_TRACE("step " + std::to_string(s));
    EXPECT_LT(max_rel_err(to_double(p), to_double(ref.p)), ref_tol<T>()) << "param";
    EXPECT_LT(max_rel_err(to_double(m), to_double(ref.m)), ref_tol<T>()) << "m";
    EXPECT_LT(max_rel_err(to_double(v), to_double(ref.v)), ref_tol<T>()) << "v";
  }
}

TYPED_TEST(Optim, KernelMatchesTorchAdamWWithWeightDecay) {
  run_kernel_vs_reference<TypeParam>(test_seed(), 0.1, 1.0, 8);
}

TYPED_TEST(Optim, KernelMatchesTorchAdamWWithoutWeightDecay) {
  run_kernel_vs_reference<TypeParam>(test_seed(), 0.0, 1.0, 6);
}

TYPED_TEST(Optim, KernelGradScaleEqualsPrescaledGradients) {
  run_kernel_vs_reference<TypeParam>(test_seed(), 0.05, 0.37, 5);
}

// Guard against tolerances that cannot tell formulas apart: dropping the decay, the bias corrections, or coupling
// the decay into the gradient moves the result by far more than the float tolerance. (A missing grad_scale shows in m and v, which the tests above compare.)
TEST(AdamWKernel, ReferenceDistinguishesVariants) {
  std::mt19937_64 g(test_seed());
  const size_t n = 257;
  const auto p0 = to_ld(rounded<double>(g, n));
  std::vector<std::vector<LD>> grads;
  for (int s = 0; s < 4; ++s) grads.push_back(to_ld(rounded<double>(g, n, 0.5 * (s + 1))));
  auto run = [&](LD wd, bool bias_correction, bool coupled) {
    RefAdamW r(p0);
    r.bias_correction = bias_correction;
    r.coupled_decay = coupled;
    for (const auto& gr : grads) r.step(gr, 1e-2L, 0.9L, 0.999L, 1e-8L, std::vector<LD>(n, wd));
    return to_double(r.p);
  };
  const auto base = run(0.1L, true, false);
  EXPECT_GT(max_rel_err(run(0.0L, true, false), base), 1e2 * ref_tol<float>());  // no decay
  EXPECT_GT(max_rel_err(run(0.1L, false, false), base), 1e2 * ref_tol<float>());  // no bias correction
  EXPECT_GT(max_rel_err(run(0.1L, true, true), base), 1e2 * ref_tol<float>());   // L2 instead of decoupled
}

// Closed form of the first step (m0 = v0 = 0, step 1): m1 = (1-b1) g, v1 = (1-b2) g^2, mhat = g, vhat = g^2, so
// p1 = p0 (1 - lr wd) - lr g / (|g| + eps): a step of -lr sign(g) for |g| >> eps, lr/2 for |g| = eps, 0 for g = 0.
TYPED_TEST(Optim, KernelFirstStepClosedForm) {
  using T = TypeParam;
  const double lr = 1e-3, wd = 0.01, eps = 1e-8;
  const std::vector<T> g = {T(3.0), T(-2.5), T(1e-8), T(-1e-8), T(0), T(1e-3), T(-7e5), T(0.25)};
  const std::vector<T> p0 = {T(0.5), T(-1.5), T(2.0), T(0.125), T(-3.0), T(1e-4), T(10.0), T(0)};
  const size_t n = g.size();
  std::vector<T> p = p0, m(n, T(0)), v(n, T(0));
  AdamWParams hp;
  hp.lr = lr;
  hp.weight_decay = wd;
  hp.eps = eps;
  hp.step = 1;
  cpu::adamw_update<T>(p.data(), g.data(), m.data(), v.data(), static_cast<int64_t>(n), hp);
  // Relative slack: ~10 roundings in double (the kernel's chain and this closed form's, 1e-14 with the factor 4),
  // or one float rounding of the stored value (1.2e-7, 4.8e-7 with the factor 4).
  const double rel = sizeof(T) == 8 ? 2.5e-15 : 1.2e-7;
  for (size_t i = 0; i < n; ++i) {
    const double gi = g[i], pi = p0[i];
    const double expect_p = pi * (1 - lr * wd) - lr * gi / (std::fabs(gi) + eps);
    const double scale_p = std::max(std::fabs(pi), lr);
    EXPECT_NEAR(static_cast<double>(p[i]), expect_p, 4 * rel * scale_p) << "i=" << i;
    EXPECT_NEAR(static_cast<double>(m[i]), 0.1 * gi, 4 * rel * std::fabs(0.1 * gi)) << "i=" << i;
    EXPECT_NEAR(static_cast<double>(v[i]), 0.001 * gi * gi, 4 * rel * 0.001 * gi * gi) << "i=" << i;
  }
  // |g| = eps gives exactly half a step; g = 0 gives pure decay, m = v = 0 exactly.
  EXPECT_NEAR(static_cast<double>(p[2]), static_cast<double>(p0[2]) * (1 - lr * wd) - lr * static_cast<double>(g[2]) /
                                             (std::fabs(static_cast<double>(g[2])) + eps),
              4 * rel * 2.0);
  EXPECT_EQ(p[4], p0[4] * static_cast<T>(1 - lr * wd));  // one multiply in T by the factor rounded to T
  EXPECT_EQ(m[4], T(0));
  EXPECT_EQ(v[4], T(0));
  // Large |g|: the step is lr * sign(g) up to lr * eps / |g|.
  EXPECT_NEAR(static_cast<double>(p[6]), static_cast<double>(p0[6]) * (1 - lr * wd) + lr, 4 * rel * 10.0);
}

// The kernel's arithmetic is T's own, one rounding per operation in torch.optim.AdamW's order (kernels/adamw.h,
// "Precision"): written out here per element from PyTorch's ops (scalars computed in double, then rounded to T),
// the results are bitwise equal, in float as in double, for both branches of ATen's lerp (1 - beta1 below and
// above 0.5). The double-arithmetic kernel this replaced, rounded to float, differs from it in ~70% of the elements.
TYPED_TEST(Optim, KernelArithmeticIsTorchOpmathOrderBitwise) {
  using T = TypeParam;
  std::mt19937_64 g(test_seed());
  const size_t n = 1031;
  for (double beta1 : {0.9, 0.3}) {
    AdamWParams hp;
    hp.lr = 3e-3;
    hp.beta1 = beta1;
    hp.beta2 = 0.995;
    hp.eps = 1e-6;
    hp.weight_decay = 0.05;
    hp.grad_scale = 0.7;
    hp.step = 3;
    const std::vector<T> p0 = rounded<T>(g, n), gr = rounded<T>(g, n), m0 = rounded<T>(g, n, 0.1);
    std::vector<T> v0 = rounded<T>(g, n, 0.1);
    for (auto& x : v0) x = x * x;
    std::vector<T> p = p0, m = m0, v = v0;
    cpu::adamw_update<T>(p.data(), gr.data(), m.data(), v.data(), static_cast<int64_t>(n), hp);
    const T decay = static_cast<T>(1.0 - hp.lr * hp.weight_decay), w1 = static_cast<T>(1.0 - beta1),
            b2 = static_cast<T>(hp.beta2), w2 = static_cast<T>(1.0 - hp.beta2), eps = static_cast<T>(hp.eps),
            gs = static_cast<T>(hp.grad_scale);
    const T step_size = static_cast<T>(-(hp.lr / (1.0 - std::pow(hp.beta1, 3.0))));
    const T bc2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(hp.beta2, 3.0)));
    size_t wrong = 0;
    for (size_t i = 0; i < n; ++i) {
      const T gi = gr[i] * gs;                                              // clip_grad_norm_'s grad.mul_
      const T x = p0[i] * decay;                                            // param.mul_
      const T mi = beta1 > 0.5 ? m0[i] + w1 * (gi - m0[i]) : gi - (gi - m0[i]) * (T(1) - w1);  // lerp_
      const T vi = v0[i] * b2 + w2 * gi * gi;                               // mul_, addcmul_
      const T denom = std::sqrt(vi) / bc2_sqrt + eps;                       // sqrt, div_, add_
      const T xi = x + step_size * mi / denom;                              // addcdiv_
      wrong += !(p[i] == xi && m[i] == mi && v[i] == vi);
    }
    EXPECT_EQ(wrong, 0u) << "beta1 " << beta1;
  }
}

// ============================================================================================== segments

// Segments of odd sizes (1, an empty one, one past kSumSquaresChunk, one past the kernel's OpenMP threshold of
// 65536) with gaps before the first, between and after the last, alternating decay flags.
std::vector<AdamWSegment> odd_segments(int64_t& n) {
  struct Part {
    int64_t gap, numel;
    bool decay;
  };
  const Part parts[] = {{2, 1, true}, {0, 17, false}, {0, 0, true}, {0, 4101, true},
                        {3, 1, false}, {0, 70001, true}, {1, 333, false}};
  std::vector<AdamWSegment> segs;
  int64_t at = 0;
  for (const Part& q : parts) {
    at += q.gap;
    segs.push_back({at, q.numel, q.decay});
    at += q.numel;
  }
  n = at + 5;
  return segs;
}

// The fused call against one adamw_update per segment (decay or 0 by flag), over three steps with clipping-style
// grad_scale: bitwise equal everywhere, and the gap elements (NaN-poisoned, in param, m and v) bitwise unchanged.
TYPED_TEST(Optim, SegmentsMatchPerSegmentCallsBitwise) {
  using T = TypeParam;
  std::mt19937_64 g(test_seed());
  int64_t n = 0;
  const std::vector<AdamWSegment> segs = odd_segments(n);
  const size_t N = static_cast<size_t>(n);
  std::vector<char> inside(N, 0);
  for (const AdamWSegment& sg : segs)
    for (int64_t i = sg.offset; i < sg.offset + sg.numel; ++i) inside[static_cast<size_t>(i)] = 1;
  std::vector<T> p = rounded<T>(g, N), m = rounded<T>(g, N, 0.1), v = rounded<T>(g, N, 0.1);
  for (auto& x : v) x = x * x;
  for (size_t i = 0; i < N; ++i)
    if (!inside[i]) p[i] = m[i] = v[i] = std::numeric_limits<T>::quiet_NaN();
  const std::vector<T> p0 = p, m0 = m, v0 = v;
  std::vector<T> rp = p, rm = m, rv = v;
  AdamWParams hp;
  hp.lr = 1e-2;
  hp.weight_decay = 0.1;
  hp.grad_scale = 0.7;
  for (int64_t step = 3; step <= 5; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    hp.step = step;
    const std::vector<T> grad = rounded<T>(g, N);
    cpu::adamw_update_segments<T>(p.data(), grad.data(), m.data(), v.data(), n, segs.data(),
                                  static_cast<int64_t>(segs.size()), hp);
    for (const AdamWSegment& sg : segs) {
      AdamWParams q = hp;
      q.weight_decay = sg.weight_decay ? hp.weight_decay : 0.0;
      const int64_t o = sg.offset;
      cpu::adamw_update<T>(rp.data() + o, grad.data() + o, rm.data() + o, rv.data() + o, sg.numel, q);
    }
    ASSERT_TRUE(bitwise_equal(p, rp)) << "param";
    ASSERT_TRUE(bitwise_equal(m, rm)) << "m";
    ASSERT_TRUE(bitwise_equal(v, rv)) << "v";
  }
  int64_t gaps = 0, moved = 0;
  for (size_t i = 0; i < N; ++i) {
    if (inside[i]) {
      moved += p[i] != p0[i];
      continue;
    }
    ++gaps;
    EXPECT_EQ(std::memcmp(&p[i], &p0[i], sizeof(T)), 0) << "param gap element " << i;
    EXPECT_EQ(std::memcmp(&m[i], &m0[i], sizeof(T)), 0) << "m gap element " << i;
    EXPECT_EQ(std::memcmp(&v[i], &v0[i], sizeof(T)), 0) << "v gap element " << i;
  }
  EXPECT_EQ(gaps, 11);
  EXPECT_GT(moved, n - gaps - 10) << "the segments were updated";
}

// Bad tables throw dpo::Error before any element is written (here the first segment of each bad table is valid).
TEST(AdamWKernel, SegmentsAreValidated) {
  const int64_t n = 10;
  std::vector<float> p(n, 1.0f), gr(n, 1.0f), m(n, 0.0f), v(n, 0.0f);
  const std::vector<float> p0 = p;
  AdamWParams hp;
  hp.lr = 1e-2;
  auto run_n = [&](const std::vector<AdamWSegment>& s, int64_t size) {
    cpu::adamw_update_segments<float>(p.data(), gr.data(), m.data(), v.data(), size, s.data(),
                                      static_cast<int64_t>(s.size()), hp);
  };
  auto run = [&](const std::vector<AdamWSegment>& s) { run_n(s, n); };
  auto message = [&](const std::vector<AdamWSegment>& s) {
    try {
      run(s);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THROW(run({{0, 2, true}, {-1, 2, true}}), Error);                 // negative offset
  EXPECT_THROW(run({{0, 2, true}, {3, -1, true}}), Error);                 // negative size
  EXPECT_THROW(run({{0, 2, true}, {8, 3, true}}), Error);                  // past the end
  EXPECT_THROW(run({{0, 2, true}, {2, INT64_MAX, true}}), Error);          // offset + numel overflows
  EXPECT_THROW(run({{0, 2, true}, {INT64_MAX, 1, true}}), Error);
  EXPECT_THROW(run({{0, 4, true}, {3, 2, false}}), Error);                 // overlap
  EXPECT_THROW(run({{5, 2, true}, {0, 2, false}}), Error);                 // not sorted
  EXPECT_THROW(run_n({{0, 2, true}}, -1), Error);                          // negative n
  EXPECT_THROW(cpu::adamw_update_segments<float>(p.data(), gr.data(), m.data(), v.data(), n, nullptr, 1, hp), Error);
  EXPECT_TRUE(bitwise_equal(p, p0)) << "a rejected table must leave the parameters untouched";
  EXPECT_NE(message({{0, 4, true}, {3, 2, false}}).find("segment 1 (offset 3, numel 2)"), std::string::npos)
      << message({{0, 4, true}, {3, 2, false}});
  EXPECT_NO_THROW(run({}));                                                // nothing to do
  EXPECT_NO_THROW(run({{0, 0, true}, {0, 10, false}, {10, 0, true}}));     // empty segments at both ends
  EXPECT_NO_THROW(run({{0, 3, true}, {3, 2, false}, {9, 1, true}}));       // adjacent, then a gap
}

// ============================================================================================== sum_squares

// adamw_dry_run_segments (the numerical guard) on the odd layout, gaps NaN (never read). The oracle is the update
// itself, run on copies: "some in-segment param, m or v came out NaN or Inf". Cases: clean inputs; one poisoned
// element (NaN, +Inf, -Inf in param, grad, m or v; in a one-element segment, past the OpenMP threshold inside the
// 70001-element segment, at the last segment's end); finite inputs that overflow (an lr past the type's range, one
// gradient whose (1 - beta2) g^2 exceeds it). The verdict matches the oracle and the expectation, is the same with
// 1 and 4 threads, and the dry run writes nothing.
TYPED_TEST(Optim, DryRunFlagsExactlyTheNonFiniteUpdates) {
  using T = TypeParam;
  std::mt19937_64 g(test_seed());
  int64_t n = 0;
  const std::vector<AdamWSegment> segs = odd_segments(n);
  const int64_t n_segs = static_cast<int64_t>(segs.size());
  const size_t N = static_cast<size_t>(n);
  std::vector<char> inside(N, 0);
  for (const AdamWSegment& sg : segs)
    for (int64_t i = sg.offset; i < sg.offset + sg.numel; ++i) inside[static_cast<size_t>(i)] = 1;
  struct State {
    std::vector<T> p, gr, m, v;
  };
  State s0{rounded<T>(g, N), rounded<T>(g, N), rounded<T>(g, N, 0.1), rounded<T>(g, N, 0.1)};
  for (auto& x : s0.v) x = x * x;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (size_t i = 0; i < N; ++i)
    if (!inside[i]) s0.p[i] = s0.gr[i] = s0.m[i] = s0.v[i] = nan;
  AdamWParams base;
  base.lr = 1e-2;
  base.weight_decay = 0.1;
  base.grad_scale = 0.7;
  base.step = 3;

  auto oracle = [&](State st, const AdamWParams& hp) {
    cpu::adamw_update_segments<T>(st.p.data(), st.gr.data(), st.m.data(), st.v.data(), n, segs.data(), n_segs, hp);
    for (size_t i = 0; i < N; ++i)
      if (inside[i] && !(std::isfinite(st.p[i]) && std::isfinite(st.m[i]) && std::isfinite(st.v[i])))
        return AdamWCheck::NonFinite;
    return AdamWCheck::AllFinite;
  };
  auto expect_case = [&](const std::string& what, const State& st, const AdamWParams& hp, AdamWCheck want) {
    SCOPED_TRACE(what);
    ASSERT_EQ(oracle(st, hp), want) << "the case itself is wrong";
    for (int threads : {1, 4}) {
      ThreadCount tc(threads);
      const AdamWCheck got = cpu::adamw_dry_run_segments<T>(st.p.data(), st.gr.data(), st.m.data(), st.v.data(), n,
                                                            segs.data(), n_segs, hp);
      EXPECT_EQ(got, want) << threads << " threads";
    }
  };

  expect_case("clean (NaN only in the gaps)", s0, base, AdamWCheck::AllFinite);
  const int64_t where[] = {segs[0].offset, segs[5].offset + 69000, segs[6].offset + segs[6].numel - 1};
  const char* names[] = {"param", "grad", "m", "v"};
  for (int a = 0; a < 4; ++a)
    for (T bad : {nan, inf, -inf})
      for (int64_t i : where) {
        State st = s0;
        std::vector<T>* arr[] = {&st.p, &st.gr, &st.m, &st.v};
        (*arr[a])[static_cast<size_t>(i)] = bad;
        expect_case(std::string(names[a]) + "[" + std::to_string(i) + "] = " + std::to_string(static_cast<double>(bad)),
                    st, base, AdamWCheck::NonFinite);
      }
  // Overflow from finite inputs. lr: the first update moves each parameter by about lr (|mhat / sqrt(vhat)| = 1),
  // so lr = 10 * max() (float) and max() (double, whose step size lr / (1 - beta1) is then Inf) overflow.
  AdamWParams huge = base;
  huge.weight_decay = 0.0;
  huge.step = 1;
  huge.lr = sizeof(T) == 4 ? 1e39 : std::numeric_limits<double>::max();
  State fresh = s0;
  for (size_t i = 0; i < N; ++i)
    if (inside[i]) fresh.m[i] = fresh.v[i] = 0;
  expect_case("lr past the range", fresh, huge, AdamWCheck::NonFinite);
  // One gradient g with (1 - beta2) g^2 past the range (g itself and the norm's double sum of squares are finite
  // for float; for double the product (1e-3 * 1e160) * 1e160 = 1e317 overflows).
  State big = s0;
  big.gr[static_cast<size_t>(segs[3].offset + 7)] = sizeof(T) == 4 ? static_cast<T>(1e30) : static_cast<T>(1e160);
  AdamWParams unclipped = base;
  unclipped.grad_scale = 1.0;
  expect_case("v overflows", big, unclipped, AdamWCheck::NonFinite);
  // Read only: a poisoned state is bitwise unchanged after the dry run.
  State st = s0;
  st.m[static_cast<size_t>(where[1])] = inf;
  const State before = st;
  cpu::adamw_dry_run_segments<T>(st.p.data(), st.gr.data(), st.m.data(), st.v.data(), n, segs.data(), n_segs, base);
  EXPECT_TRUE(bitwise_equal(st.p, before.p) && bitwise_equal(st.gr, before.gr) && bitwise_equal(st.m, before.m) &&
              bitwise_equal(st.v, before.v));
  // The same segment checks as the update: a bad table throws.
  const std::vector<AdamWSegment> bad_segs = {{0, n + 1, true}};
  EXPECT_THROW(cpu::adamw_dry_run_segments<T>(st.p.data(), st.gr.data(), st.m.data(), st.v.data(), n,
                                              bad_segs.data(), 1, base),
               Error);
}

template <class T>
void check_sum_squares(uint64_t seed) {
  std::mt19937_64 g(seed);
  for (size_t n : {size_t(0), size_t(1), size_t(7), size_t(4097), size_t(300007)}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const std::vector<T> x = randn<T>(g, n, 3.0);
    LD ref = 0;
    for (T e : x) ref += static_cast<LD>(e) * static_cast<LD>(e);
    double s1, s3, s2;
    {
      ThreadCount tc(1);
      s1 = cpu::sum_squares<T>(x.data(), static_cast<int64_t>(n));
    }
    {
      ThreadCount tc(3);
      s3 = cpu::sum_squares<T>(x.data(), static_cast<int64_t>(n));
    }
    {
      ThreadCount tc(2);
      s2 = cpu::sum_squares<T>(x.data(), static_cast<int64_t>(n));
    }
    EXPECT_EQ(std::memcmp(&s1, &s3, sizeof(double)), 0) << s1 << " vs " << s3;
    EXPECT_EQ(std::memcmp(&s1, &s2, sizeof(double)), 0) << s1 << " vs " << s2;
    if (n == 0) {
      EXPECT_EQ(s1, 0.0);
    } else {
      EXPECT_LT(std::fabs(static_cast<LD>(s1) - ref) / ref, 1e-12L);
    }
  }
}

TYPED_TEST(Optim, SumSquaresDeterministicAcrossThreadsAndAccurate) { check_sum_squares<TypeParam>(test_seed()); }

TYPED_TEST(Optim, SumSquaresPropagatesNonFinite) {
  using T = TypeParam;
  std::vector<T> x(10000, T(1));
  x[9000] = std::numeric_limits<T>::quiet_NaN();
  EXPECT_TRUE(std::isnan(cpu::sum_squares<T>(x.data(), static_cast<int64_t>(x.size()))));
  x[9000] = std::numeric_limits<T>::infinity();
  EXPECT_TRUE(std::isinf(cpu::sum_squares<T>(x.data(), static_cast<int64_t>(x.size()))));
}

// ============================================================================================== backend ops

TYPED_TEST(Optim, BackendScaleAndSumSquares) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  std::mt19937_64 g(test_seed());
  const std::vector<T> x0 = randn<T>(g, 1001);
  Tensor x = host_tensor(x0);
  be->scale(x, -0.3);
  const auto x1 = to_vec<T>(x);
  for (size_t i = 0; i < x0.size(); ++i)
    ASSERT_EQ(x1[i], static_cast<T>(static_cast<double>(x0[i]) * -0.3)) << "i=" << i;
  EXPECT_EQ(be->sum_squares(x), cpu::sum_squares<T>(x1.data(), static_cast<int64_t>(x1.size())));
  EXPECT_EQ(global_grad_norm(*be, x), std::sqrt(be->sum_squares(x)));
}

TEST(AdamWBackend, BoundaryChecks) {
  auto be = make_cpu_backend();
  Tensor p = Tensor::host({10}, DType::F32), gr = Tensor::host({10}, DType::F32);
  Tensor m = Tensor::host({10}, DType::F32), v = Tensor::host({10}, DType::F32);
  AdamWParams hp;
  hp.lr = 1e-3;
  EXPECT_NO_THROW(be->adamw_update(p, gr, m, v, hp));
  EXPECT_THROW(be->adamw_update(p, Tensor::host({9}, DType::F32), m, v, hp), Error);
  EXPECT_THROW(be->adamw_update(p, gr, Tensor::host({10}, DType::F64), v, hp), Error);
  EXPECT_THROW(be->adamw_update(p, gr, m, Tensor::host({2, 5}, DType::F32), hp), Error);
  EXPECT_THROW(be->adamw_update(Tensor::host({10}, DType::I32), gr, m, v, hp), Error);
  EXPECT_THROW(be->adamw_update(p, gr, m, Tensor(), hp), Error);
  EXPECT_THROW(be->adamw_update(p, gr, m, m, hp), Error);                           // aliasing
  Tensor big = Tensor::host({20}, DType::F32);
  EXPECT_THROW(be->adamw_update(big.view(0, {10}), big.view(5, {10}), m, v, hp), Error);  // partial overlap
  EXPECT_NO_THROW(be->adamw_update(big.view(0, {10}), big.view(10, {10}), m, v, hp));
  hp.step = 0;
  EXPECT_THROW(be->adamw_update(p, gr, m, v, hp), Error);
  EXPECT_THROW(be->sum_squares(Tensor::host({3}, DType::I32)), Error);
  EXPECT_THROW(be->scale(Tensor(), 2.0), Error);
}

TEST(AdamWBackend, SegmentsBoundaryChecks) {
  auto be = make_cpu_backend();
  Tensor p = Tensor::host({10}, DType::F32), gr = Tensor::host({10}, DType::F32);
  Tensor m = Tensor::host({10}, DType::F32), v = Tensor::host({10}, DType::F32);
  be->fill_zero(p);
  be->fill_zero(gr);
  be->fill_zero(m);
  be->fill_zero(v);
  const std::vector<AdamWSegment> segs = {{0, 4, true}, {6, 4, false}};
  AdamWParams hp;
  hp.lr = 1e-3;
  EXPECT_NO_THROW(be->adamw_update_segments(p, gr, m, v, segs, hp));
  EXPECT_NO_THROW(be->adamw_update_segments(p, gr, m, v, {}, hp));
  EXPECT_THROW(be->adamw_update_segments(p, Tensor::host({9}, DType::F32), m, v, segs, hp), Error);
  EXPECT_THROW(be->adamw_update_segments(p, gr, Tensor::host({10}, DType::F64), v, segs, hp), Error);
  EXPECT_THROW(be->adamw_update_segments(Tensor::host({10}, DType::I32), gr, m, v, segs, hp), Error);
  EXPECT_THROW(be->adamw_update_segments(p, gr, m, Tensor(), segs, hp), Error);
  EXPECT_THROW(be->adamw_update_segments(p, gr, m, m, segs, hp), Error);  // aliasing
  Tensor p2 = Tensor::host({2, 5}, DType::F32), g2 = Tensor::host({2, 5}, DType::F32);
  Tensor m2 = Tensor::host({2, 5}, DType::F32), v2 = Tensor::host({2, 5}, DType::F32);
  EXPECT_THROW(be->adamw_update_segments(p2, g2, m2, v2, segs, hp), Error);  // not flat
  EXPECT_THROW(be->adamw_update_segments(p, gr, m, v, {{0, 11, true}}, hp), Error);
  EXPECT_THROW(be->adamw_update_segments(p, gr, m, v, {{4, 2, true}, {0, 2, true}}, hp), Error);
  hp.step = 0;
  EXPECT_THROW(be->adamw_update_segments(p, gr, m, v, segs, hp), Error);
}

// ============================================================================================== AdamW class

GPT2Config tiny_gpt2() {
  GPT2Config c;
  c.max_seq_len = 5;
  c.vocab_size = 11;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 6;
  return c;
}

OptimConfig base_cfg() {
  OptimConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.1;
  c.max_grad_norm = 0;  // off unless a test turns it on
  return c;
}

// Zero gradients: the Adam part of the update is exactly 0 (m = v = 0, 0/eps), so parameters that are decayed
// become exactly p * (1 - lr * wd) and the others (biases, LayerNorm) stay bitwise unchanged.
TYPED_TEST(Optim, NoDecayOnBiasesAndLayerNorm) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const GPT2Config gc = tiny_gpt2();
  const auto specs = gpt2_param_specs(gc);
  const int64_t n = gc.num_parameters();
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, static_cast<size_t>(n));
  Tensor params = host_tensor(p0), grads = Tensor::host({n}, dtype_of<T>());
  OptimConfig cfg = base_cfg();
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, 10);
  const auto info = opt.step(params, grads);
  EXPECT_EQ(info.grad_norm, 0.0);
  EXPECT_FALSE(info.clipped);
  EXPECT_FALSE(info.skipped);
  EXPECT_EQ(opt.step_count(), 1);
  const auto p1 = to_vec<T>(params);
  int decayed = 0, kept = 0;
  for (const ParamSpec& s : specs) {
    int64_t numel = 1;
    for (int64_t d : s.shape) numel *= d;
    const bool is_bias_or_ln = s.name.find("bias") != std::string::npos || s.name.find("ln_") != std::string::npos;
    EXPECT_EQ(s.weight_decay, !is_bias_or_ln) << s.name;
    for (int64_t i = s.offset; i < s.offset + numel; ++i) {
      // ATen's order for T: the factor 1 - lr * wd is computed in double and rounded to T, then one multiply in T.
      const T expect = s.weight_decay ? p0[i] * static_cast<T>(1 - cfg.lr * cfg.weight_decay) : p0[i];
      ASSERT_EQ(p1[i], expect) << s.name << " element " << i - s.offset;
    }
    (s.weight_decay ? decayed : kept) += 1;
  }
  EXPECT_GT(decayed, 0);
  EXPECT_GT(kept, 0);
}

// AdamW::step (one fused call over the merged runs) against one backend adamw_update per ParamSpec, unmerged, with
// the same lr, clip scale and decay flag: bitwise equal over three clipped steps (the update is elementwise).
TYPED_TEST(Optim, StepEqualsOneUpdatePerParameterBitwise) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const GPT2Config gc = tiny_gpt2();
  const auto specs = gpt2_param_specs(gc);
  const int64_t n = gc.num_parameters();
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, static_cast<size_t>(n));
  Tensor params = host_tensor(p0), ref = host_tensor(p0);
  Tensor rm = be->zeros({n}, dtype_of<T>()), rv = be->zeros({n}, dtype_of<T>());
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 0.5;
  cfg.warmup_steps = 2;
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, 3);
  for (int64_t s = 0; s < 3; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    const Tensor grads = host_tensor(randn<T>(g, static_cast<size_t>(n)));
    const auto info = opt.step(params, grads);
    ASSERT_TRUE(info.clipped);
    AdamWParams hp;
    hp.lr = lr_at(cfg, s, 3);
    hp.beta1 = cfg.beta1;
    hp.beta2 = cfg.beta2;
    hp.eps = cfg.eps;
    hp.grad_scale = cfg.max_grad_norm / (global_grad_norm(*be, grads) + 1e-6);
    hp.step = s + 1;
    for (const ParamSpec& ps : specs) {
      int64_t k = 1;
      for (int64_t d : ps.shape) k *= d;
      hp.weight_decay = ps.weight_decay ? cfg.weight_decay : 0.0;
      be->adamw_update(ref.view(ps.offset, {k}), grads.view(ps.offset, {k}), rm.view(ps.offset, {k}),
                       rv.view(ps.offset, {k}), hp);
    }
    ASSERT_TRUE(bitwise_equal(to_vec<T>(params), to_vec<T>(ref))) << "param";
    ASSERT_TRUE(bitwise_equal(to_vec<T>(opt.m()), to_vec<T>(rm))) << "m";
    ASSERT_TRUE(bitwise_equal(to_vec<T>(opt.v()), to_vec<T>(rv))) << "v";
  }
}

// ZeRO-1: three optimizers owning [0, a), [a, b), [b, n) (cuts inside parameters, an empty range too), each
// updating its own range of a shared parameter vector, give bitwise the parameters and moments of one optimizer
// over everything; step_shard with the norm passed in equals step. Elements outside a range are untouched.
TYPED_TEST(Optim, ShardedStepsEqualTheWholeStepBitwise) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const GPT2Config gc = tiny_gpt2();
  const auto specs = gpt2_param_specs(gc);
  const int64_t n = gc.num_parameters();
  const int64_t cuts[] = {0, n / 3 + 1, n / 3 + 1, 2 * n / 3 + 5, n};  // [a, a) is empty
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, static_cast<size_t>(n));
  Tensor whole = host_tensor(p0), sharded = host_tensor(p0);
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 0.5;
  AdamW ref(*be, specs, n, dtype_of<T>(), cfg, 3);
  std::vector<std::unique_ptr<AdamW>> parts;
  for (int k = 0; k < 4; ++k) {
    parts.push_back(std::make_unique<AdamW>(*be, specs, n, dtype_of<T>(), cfg, 3));
    parts.back()->set_shard(cuts[k], cuts[k + 1]);
    ASSERT_EQ(parts.back()->m().numel(), cuts[k + 1] - cuts[k]);
  }
  for (int64_t s = 0; s < 3; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    const Tensor grads = host_tensor(randn<T>(g, static_cast<size_t>(n)));
    const auto want = ref.step(whole, grads);
    const double norm = global_grad_norm(*be, grads);
    for (int k = 0; k < 4; ++k) {
      // Before this part's update, everything outside earlier parts' ranges is still the old value.
      const auto before = to_vec<T>(sharded);
      const int64_t b = cuts[k], len = cuts[k + 1] - cuts[k];
      const auto got = (k % 2 == 0) ? parts[static_cast<size_t>(k)]->step(sharded, grads)
                                    : parts[static_cast<size_t>(k)]->step_shard(sharded, grads.view(b, {len}), norm);
      EXPECT_EQ(got.grad_norm, want.grad_norm);
      EXPECT_EQ(got.clipped, want.clipped);
      const auto after = to_vec<T>(sharded);
      for (int64_t i = 0; i < n; ++i)
        if (i < b || i >= b + len) ASSERT_EQ(std::memcmp(&after[i], &before[i], sizeof(T)), 0) << "element " << i;
    }
    ASSERT_TRUE(bitwise_equal(to_vec<T>(sharded), to_vec<T>(whole))) << "params";
    for (int k = 0; k < 4; ++k) {
      const int64_t b = cuts[k], len = cuts[k + 1] - cuts[k];
      const auto rm = to_vec<T>(ref.m()), rv = to_vec<T>(ref.v());
      const auto pm = to_vec<T>(parts[static_cast<size_t>(k)]->m()), pv = to_vec<T>(parts[static_cast<size_t>(k)]->v());
      ASSERT_TRUE(bitwise_equal(pm, std::vector<T>(rm.begin() + b, rm.begin() + b + len))) << "m of part " << k;
      ASSERT_TRUE(bitwise_equal(pv, std::vector<T>(rv.begin() + b, rv.begin() + b + len))) << "v of part " << k;
    }
  }
  EXPECT_THROW(parts[0]->set_shard(5, 4), Error);
  EXPECT_THROW(parts[0]->set_shard(0, n + 1), Error);
  EXPECT_THROW(parts[1]->step_shard(sharded, host_tensor(std::vector<T>(7)), 1.0), Error);  // not the range size
}

// Two segments (one decayed, one not), three steps: the first has each segment's norm below max_grad_norm but
// the global norm above (must clip: the norm is over ALL gradients), the second is below (no clipping), the third
// far above. Parameters, m and v follow RefAdamW fed clip_grad_norm_'s clipped gradients.
TYPED_TEST(Optim, ClipsByGlobalNormOverAllSegments) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t na = 50, nb = 70, n = na + nb;
  const std::vector<ParamSpec> specs = {{"b.weight", {nb}, na, false}, {"a.weight", {5, 10}, 0, true}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n);
  Tensor params = host_tensor(p0);
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 1.0;
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, 3);
  RefAdamW ref(to_ld(p0));
  std::vector<LD> wd(n, 0);
  for (int64_t i = 0; i < na; ++i) wd[i] = static_cast<LD>(cfg.weight_decay);

  // Per-segment norms before clipping, per step.
  const double seg_norm[3][2] = {{0.8, 0.8}, {0.2, 0.2}, {3.0, 4.0}};
  const bool expect_clip[3] = {true, false, true};
  for (int s = 0; s < 3; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    std::vector<T> gr = randn<T>(g, n);
    for (int k = 0; k < 2; ++k) {
      const int64_t lo = k == 0 ? 0 : na, hi = k == 0 ? na : n;
      double ss = 0;
      for (int64_t i = lo; i < hi; ++i) ss += double(gr[i]) * double(gr[i]);
      for (int64_t i = lo; i < hi; ++i) gr[i] = static_cast<T>(gr[i] * seg_norm[s][k] / std::sqrt(ss));
    }
    const auto gl = to_ld(gr);
    LD ss = 0;
    for (LD x : gl) ss += x * x;
    const auto info = opt.step(params, host_tensor(gr));
    EXPECT_EQ(info.clipped, expect_clip[s]);
    EXPECT_NEAR(info.grad_norm, static_cast<double>(std::sqrt(ss)), 1e-13 * static_cast<double>(std::sqrt(ss)));
    EXPECT_EQ(info.lr, cfg.lr);
    const LD coef = clip_coef(gl, cfg.max_grad_norm);
    EXPECT_EQ(coef < 1, expect_clip[s]);
    std::vector<LD> gs(gl);
    for (auto& x : gs) x *= coef;
    ref.step(gs, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, wd);
    EXPECT_LT(max_rel_err(to_double(to_vec<T>(params)), to_double(ref.p)), ref_tol<T>()) << "param";
    EXPECT_LT(max_rel_err(to_double(to_vec<T>(opt.m())), to_double(ref.m)), ref_tol<T>()) << "m";
    EXPECT_LT(max_rel_err(to_double(to_vec<T>(opt.v())), to_double(ref.v)), ref_tol<T>()) << "v";
  }
}

// A clipped step equals an unclipped step on gradients pre-multiplied by max_norm / (norm + 1e-6): bitwise in
// both types, since the kernel forms grad * scale in T with the scale rounded to T, as the test does here.
TYPED_TEST(Optim, ClippedStepEqualsStepOnPrescaledGradients) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 333;
  const std::vector<ParamSpec> specs = {{"w", {300}, 0, true}, {"b", {33}, 300, false}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n);
  OptimConfig clip = base_cfg();
  clip.max_grad_norm = 0.5;
  clip.eps = 1e-2;  // make the first step depend on the gradients' scale, not only on their sign
  OptimConfig noclip = clip;
  noclip.max_grad_norm = 0;
  AdamW a(*be, specs, n, dtype_of<T>(), clip, 5), b(*be, specs, n, dtype_of<T>(), noclip, 5);
  Tensor pa = host_tensor(p0), pb = host_tensor(p0), pu = host_tensor(p0);
  AdamW u(*be, specs, n, dtype_of<T>(), noclip, 5);  // unclipped, to show that clipping changed something
  for (int s = 0; s < 2; ++s) {
    const std::vector<T> gr = randn<T>(g, n, 0.2);
    const auto ia = a.step(pa, host_tensor(gr));
    ASSERT_TRUE(ia.clipped);
    const double coef = clip.max_grad_norm / (ia.grad_norm + 1e-6);
    std::vector<T> pre(gr);
    for (auto& x : pre) x = x * static_cast<T>(coef);
    const auto ib = b.step(pb, host_tensor(pre));
    EXPECT_FALSE(ib.clipped);
    u.step(pu, host_tensor(gr));
  }
  const auto va = to_vec<T>(pa), vb = to_vec<T>(pb), vu = to_vec<T>(pu);
  EXPECT_TRUE(bitwise_equal(va, vb));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(a.m()), to_vec<T>(b.m())));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(a.v()), to_vec<T>(b.v())));
  EXPECT_GT(max_rel_err(to_double(va), to_double(vu)), 1e-4);
}

TYPED_TEST(Optim, NoClippingAtOrBelowThreshold) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 97;
  const std::vector<ParamSpec> specs = {{"w", {n}, 0, true}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n);
  std::vector<T> gr = randn<T>(g, n);
  double ss = 0;
  for (T x : gr) ss += double(x) * double(x);
  for (auto& x : gr) x = static_cast<T>(x * (0.5 / std::sqrt(ss)));  // norm 0.5
  OptimConfig on = base_cfg();
  on.max_grad_norm = 1.0;
  OptimConfig off = on;
  off.max_grad_norm = 0;
  AdamW a(*be, specs, n, dtype_of<T>(), on, 4), b(*be, specs, n, dtype_of<T>(), off, 4);
  Tensor pa = host_tensor(p0), pb = host_tensor(p0);
  for (int s = 0; s < 3; ++s) {
    const auto ia = a.step(pa, host_tensor(gr));
    const auto ib = b.step(pb, host_tensor(gr));
    EXPECT_FALSE(ia.clipped);
    EXPECT_NEAR(ia.grad_norm, 0.5, 1e-6);
    EXPECT_EQ(ia.grad_norm, ib.grad_norm);
  }
  EXPECT_TRUE(bitwise_equal(to_vec<T>(pa), to_vec<T>(pb)));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(a.m()), to_vec<T>(b.m())));
  // clip_grad_norm_'s +1e-6: a norm just below max_grad_norm (within 1e-6) is still scaled down, as in PyTorch.
  OptimConfig tight = on;
  tight.max_grad_norm = 0.5 + 5e-7;
  AdamW c(*be, specs, n, dtype_of<T>(), tight, 4);
  Tensor pc = host_tensor(p0);
  EXPECT_TRUE(c.step(pc, host_tensor(gr)).clipped);
}

TYPED_TEST(Optim, NonPositiveMaxGradNormDisablesClipping) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 64;
  const std::vector<ParamSpec> specs = {{"w", {n}, 0, true}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> gr = randn<T>(g, n, 100.0);  // norm ~ 800
  for (double max_norm : {0.0, -1.0}) {
    OptimConfig cfg = base_cfg();
    cfg.max_grad_norm = max_norm;
    AdamW opt(*be, specs, n, dtype_of<T>(), cfg, 4);
    Tensor p = host_tensor(randn<T>(g, n));
    const auto info = opt.step(p, host_tensor(gr));
    EXPECT_FALSE(info.clipped);
    EXPECT_GT(info.grad_norm, 100.0);
    // First step: m = lerp(0, g, 1 - beta1) = (1 - beta1) * g with the unscaled gradient, one multiply in T by the
    // weight rounded to T (ATen's opmath order).
    const auto m = to_vec<T>(opt.m());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(m[i], static_cast<T>(1.0 - cfg.beta1) * gr[i]) << "i=" << i;
  }
}

TYPED_TEST(Optim, NonFiniteGradNormSkipsTheStep) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 200;
  const std::vector<ParamSpec> specs = {{"w", {120}, 0, true}, {"b", {80}, 120, false}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n), g1 = randn<T>(g, n), g2 = randn<T>(g, n);
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 1.0;
  cfg.warmup_steps = 3;
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, 10), clean(*be, specs, n, dtype_of<T>(), cfg, 10);
  Tensor p = host_tensor(p0), pc = host_tensor(p0);
  opt.step(p, host_tensor(g1));
  clean.step(pc, host_tensor(g1));
  const auto before_p = to_vec<T>(p), before_m = to_vec<T>(opt.m()), before_v = to_vec<T>(opt.v());
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                -std::numeric_limits<T>::infinity()}) {
    std::vector<T> gb = g2;
    gb[150] = bad;  // in the no-decay segment: the norm is global
    const auto info = opt.step(p, host_tensor(gb));
    EXPECT_TRUE(info.skipped);
    EXPECT_TRUE(std::isnan(info.grad_norm));
    EXPECT_FALSE(info.clipped);
    EXPECT_EQ(info.lr, lr_at(cfg, 1, 10));
    EXPECT_EQ(opt.step_count(), 1);
    EXPECT_TRUE(bitwise_equal(to_vec<T>(p), before_p));
    EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.m()), before_m));
    EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.v()), before_v));
  }
  // The next good step is step 2 (bias correction and lr), exactly as if the bad ones never happened.
  const auto info = opt.step(p, host_tensor(g2));
  EXPECT_FALSE(info.skipped);
  clean.step(pc, host_tensor(g2));
  EXPECT_EQ(opt.step_count(), 2);
  EXPECT_TRUE(bitwise_equal(to_vec<T>(p), to_vec<T>(pc)));
}

// The guard in the class: a step whose update would write a non-finite value is skipped with skip_reason
// NonFiniteUpdate: the gradient norm is reported (finite), step_count() does not advance, and parameters and both
// moments are bitwise as before. Three ways in: an Inf already in a moment (then restored: the next step equals a
// run that never saw the bad one, bitwise), an lr past the type's range, and (float) a gradient whose squared
// moment overflows.
TYPED_TEST(Optim, NonFiniteUpdateSkipsTheStep) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 200;
  const std::vector<ParamSpec> specs = {{"w", {120}, 0, true}, {"b", {80}, 120, false}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n), g1 = randn<T>(g, n), g2 = randn<T>(g, n);
  OptimConfig cfg = base_cfg();
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, 10), clean(*be, specs, n, dtype_of<T>(), cfg, 10);
  Tensor p = host_tensor(p0), pc = host_tensor(p0);
  ASSERT_FALSE(opt.step(p, host_tensor(g1)).skipped);
  clean.step(pc, host_tensor(g1));
  auto expect_untouched = [&](AdamW& o, const Tensor& params, const std::vector<T>& bp, const std::vector<T>& bm,
                              const std::vector<T>& bv) {
    EXPECT_TRUE(bitwise_equal(to_vec<T>(params), bp)) << "param";
    EXPECT_TRUE(bitwise_equal(to_vec<T>(o.m()), bm)) << "m";
    EXPECT_TRUE(bitwise_equal(to_vec<T>(o.v()), bv)) << "v";
  };
  {
    SCOPED_TRACE("Inf in m");
    T* m = opt.m().template data<T>();
    const T saved = m[150];
    m[150] = std::numeric_limits<T>::infinity();
    const auto bp = to_vec<T>(p), bm = to_vec<T>(opt.m()), bv = to_vec<T>(opt.v());
    const auto info = opt.step(p, host_tensor(g2));
    EXPECT_TRUE(info.skipped);
    EXPECT_EQ(info.skip_reason, SkipReason::NonFiniteUpdate);
    EXPECT_TRUE(std::isfinite(info.grad_norm));
    EXPECT_EQ(opt.step_count(), 1);
    expect_untouched(opt, p, bp, bm, bv);
    m[150] = saved;
    const auto ok = opt.step(p, host_tensor(g2));
    EXPECT_FALSE(ok.skipped);
    EXPECT_EQ(ok.skip_reason, SkipReason::None);
    clean.step(pc, host_tensor(g2));
    EXPECT_EQ(opt.step_count(), 2);
    EXPECT_TRUE(bitwise_equal(to_vec<T>(p), to_vec<T>(pc)));
    EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.v()), to_vec<T>(clean.v())));
  }
  {
    SCOPED_TRACE("lr past the range");
    OptimConfig big = cfg;
    big.weight_decay = 0;  // lr * weight_decay must stay < 1
    big.lr = sizeof(T) == 4 ? 1e39 : std::numeric_limits<double>::max();
    AdamW o(*be, specs, n, dtype_of<T>(), big, 10);
    Tensor q = host_tensor(p0);
    const auto zero = std::vector<T>(n, T(0));
    const auto info = o.step(q, host_tensor(g1));
    EXPECT_TRUE(info.skipped);
    EXPECT_EQ(info.skip_reason, SkipReason::NonFiniteUpdate);
    EXPECT_EQ(o.step_count(), 0);
    expect_untouched(o, q, p0, zero, zero);
  }
  if constexpr (sizeof(T) == 4) {
    SCOPED_TRACE("v overflows");
    std::vector<T> gb = g2;
    gb[30] = 1e30f;
    const auto bp = to_vec<T>(p), bm = to_vec<T>(opt.m()), bv = to_vec<T>(opt.v());
    const auto info = opt.step(p, host_tensor(gb));
    EXPECT_TRUE(info.skipped);
    EXPECT_EQ(info.skip_reason, SkipReason::NonFiniteUpdate);
    EXPECT_GT(info.grad_norm, 1e29);
    EXPECT_EQ(opt.step_count(), 2);
    expect_untouched(opt, p, bp, bm, bv);
  }
  EXPECT_STREQ(skip_reason_text(SkipReason::NonFiniteUpdate), "non-finite updated weights or moments");
  EXPECT_STREQ(skip_reason_text(SkipReason::NonFiniteGradNorm), "non-finite gradient norm");
}

// The cross-rank agreement (ZeRO-1): the hook sees this rank's verdict once per step with a finite norm (also for
// an empty range) and its answer decides; it is not called when the norm already skipped the step.
TYPED_TEST(Optim, FiniteAgreementDecidesAndIsCalledOncePerStep) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 64;
  const std::vector<ParamSpec> specs = {{"w", {64}, 0, true}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n), g1 = randn<T>(g, n);
  const std::pair<int64_t, int64_t> shards[] = {{10, 40}, {20, 20}};
  for (const auto& [lo, hi] : shards) {
    SCOPED_TRACE("shard [" + std::to_string(lo) + ", " + std::to_string(hi) + ")");
    AdamW opt(*be, specs, n, dtype_of<T>(), base_cfg(), 10);
    opt.set_shard(lo, hi);
    int calls = 0;
    AdamWCheck seen = AdamWCheck::NonFinite, answer = AdamWCheck::NonFinite;
    opt.set_finite_agreement([&](AdamWCheck mine) {
      ++calls;
      seen = mine;
      return answer;
    });
    Tensor p = host_tensor(p0);
    const Tensor gr = host_tensor(g1);
    auto info = opt.step_shard(p, gr.view(lo, {hi - lo}), 1.0);  // another rank found a non-finite value
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(seen, AdamWCheck::AllFinite);
    EXPECT_TRUE(info.skipped);
    EXPECT_EQ(info.skip_reason, SkipReason::NonFiniteUpdate);
    EXPECT_TRUE(bitwise_equal(to_vec<T>(p), p0));
    EXPECT_EQ(opt.step_count(), 0);
    info = opt.step_shard(p, gr.view(lo, {hi - lo}), std::numeric_limits<double>::infinity());
    EXPECT_EQ(calls, 1) << "a non-finite norm skips before the agreement";
    EXPECT_EQ(info.skip_reason, SkipReason::NonFiniteGradNorm);
    answer = AdamWCheck::AllFinite;
    info = opt.step_shard(p, gr.view(lo, {hi - lo}), 1.0);
    EXPECT_EQ(calls, 2);
    EXPECT_FALSE(info.skipped);
    EXPECT_EQ(opt.step_count(), 1);
    EXPECT_EQ(bitwise_equal(to_vec<T>(p), p0), lo == hi) << "the range moved (unless empty)";
  }
}

// The whole class over a GPT-2 layout with warmup + cosine decay, weight decay and clipping on some steps,
// against RefAdamW with lr_at's closed form recomputed here.
TYPED_TEST(Optim, GPT2LayoutWithScheduleMatchesReference) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const GPT2Config gc = tiny_gpt2();
  const auto specs = gpt2_param_specs(gc);
  const int64_t n = gc.num_parameters(), total = 7;
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, static_cast<size_t>(n), 0.5);
  OptimConfig cfg;
  cfg.lr = 3e-2;
  cfg.weight_decay = 0.05;
  cfg.max_grad_norm = 20.0;
  cfg.warmup_steps = 2;
  cfg.schedule = LrSchedule::Cosine;
  cfg.min_lr_ratio = 0.1;
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, total);
  // Step 0 runs at lr 0 (transformers' warmup): the parameters do not move, the moments do.
  Tensor params = host_tensor(p0);
  RefAdamW ref(to_ld(p0));
  std::vector<LD> wd(static_cast<size_t>(n), 0);
  for (const ParamSpec& s : specs) {
    int64_t numel = 1;
    for (int64_t d : s.shape) numel *= d;
    if (s.weight_decay)
      for (int64_t i = s.offset; i < s.offset + numel; ++i) wd[i] = static_cast<LD>(cfg.weight_decay);
  }
  int clipped = 0;
  for (int64_t s = 0; s < total; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    const std::vector<T> gr = randn<T>(g, static_cast<size_t>(n), s % 2 ? 0.1 : 2.0);  // norm ~3 or ~60
    const auto info = opt.step(params, host_tensor(gr));
    LD lr;
    if (s < 2) {
      lr = static_cast<LD>(cfg.lr) * s / 2;  // transformers: current_step / num_warmup_steps, from 0
    } else {
      const LD progress = static_cast<LD>(s - 2) / (total - 2), lo = 0.1L * static_cast<LD>(cfg.lr);
      lr = lo + (static_cast<LD>(cfg.lr) - lo) * 0.5L * (1 + std::cos(std::numbers::pi_v<LD> * progress));
    }
    EXPECT_NEAR(info.lr, static_cast<double>(lr), 1e-15);
    const auto gl = to_ld(gr);
    const LD coef = clip_coef(gl, cfg.max_grad_norm);
    clipped += info.clipped;
    EXPECT_EQ(info.clipped, coef < 1);
    std::vector<LD> gs(gl);
    for (auto& x : gs) x *= coef;
    ref.step(gs, lr, cfg.beta1, cfg.beta2, cfg.eps, wd);
    EXPECT_LT(max_rel_err(to_double(to_vec<T>(params)), to_double(ref.p)), ref_tol<T>());
  }
  EXPECT_GT(clipped, 0);
  EXPECT_LT(clipped, total);
  EXPECT_EQ(opt.step_count(), total);
}

// Checkpoint state: restoring params, m, v and the step count into a fresh optimizer continues bitwise.
TYPED_TEST(Optim, SetStepAndMomentsResumeExactly) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 150;
  const std::vector<ParamSpec> specs = {{"w", {100}, 0, true}, {"b", {50}, 100, false}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n);
  std::vector<std::vector<T>> grads;
  for (int s = 0; s < 4; ++s) grads.push_back(randn<T>(g, n));
  OptimConfig cfg = base_cfg();
  cfg.schedule = LrSchedule::Linear;
  cfg.warmup_steps = 1;
  AdamW a(*be, specs, n, dtype_of<T>(), cfg, 4);
  Tensor pa = host_tensor(p0);
  for (int s = 0; s < 2; ++s) a.step(pa, host_tensor(grads[s]));
  // "checkpoint"
  const auto ck_p = to_vec<T>(pa), ck_m = to_vec<T>(a.m()), ck_v = to_vec<T>(a.v());
  const int64_t ck_step = a.step_count();
  for (int s = 2; s < 4; ++s) a.step(pa, host_tensor(grads[s]));

  AdamW b(*be, specs, n, dtype_of<T>(), cfg, 4);
  Tensor pb = host_tensor(ck_p);
  be->copy_from_host(b.m(), host_tensor(ck_m));
  be->copy_from_host(b.v(), host_tensor(ck_v));
  b.set_step(ck_step);
  EXPECT_EQ(b.step_count(), 2);
  for (int s = 2; s < 4; ++s) b.step(pb, host_tensor(grads[s]));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(pa), to_vec<T>(pb)));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(a.m()), to_vec<T>(b.m())));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(a.v()), to_vec<T>(b.v())));

  // Without set_step the bias correction restarts at 1 and the result differs.
  AdamW c(*be, specs, n, dtype_of<T>(), cfg, 4);
  Tensor pc = host_tensor(ck_p);
  be->copy_from_host(c.m(), host_tensor(ck_m));
  be->copy_from_host(c.v(), host_tensor(ck_v));
  for (int s = 2; s < 4; ++s) c.step(pc, host_tensor(grads[s]));
  EXPECT_FALSE(bitwise_equal(to_vec<T>(pa), to_vec<T>(pc)));
}

TEST(AdamWClass, RejectsBadLayoutsAndTensors) {
  auto be = make_cpu_backend();
  const OptimConfig cfg = base_cfg();
  const std::vector<ParamSpec> gap = {{"a", {10}, 0, true}, {"b", {5}, 11, false}};
  const std::vector<ParamSpec> overlap = {{"a", {10}, 0, true}, {"b", {5}, 9, false}};
  const std::vector<ParamSpec> ok = {{"a", {10}, 0, true}, {"b", {5}, 10, false}};
  EXPECT_THROW((void)AdamW(*be, gap, 16, DType::F32, cfg, 1), Error);
  EXPECT_THROW((void)AdamW(*be, overlap, 15, DType::F32, cfg, 1), Error);
  EXPECT_THROW((void)AdamW(*be, ok, 16, DType::F32, cfg, 1), Error);  // does not cover the end
  EXPECT_THROW((void)AdamW(*be, ok, 15, DType::I32, cfg, 1), Error);
  EXPECT_THROW((void)AdamW(*be, ok, 15, DType::F32, cfg, -1), Error);
  OptimConfig bad = cfg;
  bad.lr = 0;
  EXPECT_THROW((void)AdamW(*be, ok, 15, DType::F32, bad, 1), InputError);  // the config is validated
  AdamW opt(*be, ok, 15, DType::F32, cfg, 1);
  EXPECT_THROW(opt.step(Tensor::host({15}, DType::F64), Tensor::host({15}, DType::F64)), Error);
  EXPECT_THROW(opt.step(Tensor::host({15}, DType::F32), Tensor::host({14}, DType::F32)), Error);
  EXPECT_THROW(opt.set_step(-1), Error);
  EXPECT_NO_THROW(opt.step(Tensor::host({15}, DType::F32), Tensor::host({15}, DType::F32)));
}

// ============================================================================================== schedule

// Closed forms written from transformers' optimization.py (the lr_lambda of get_constant_schedule,
// get_constant_schedule_with_warmup, get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup with
// num_cycles 0.5, and get_cosine_with_min_lr_schedule_with_warmup's min_lr_rate), evaluated at current_step = s,
// the 0-based optimizer step; the lr is peak * lambda. Each is recomputed here, in long double, not taken from
// lr_at. lr_at does the same few double operations, so its factor in [0, 1] is off by a few ulp of 1 at most
// (absolute: near the end of a cosine, 1 + cos(x) cancels, so a relative bound would not hold): tolerance
// 1e-15 * peak.
namespace hf {
LD warm(int64_t s, int64_t W) { return static_cast<LD>(s) / static_cast<LD>(std::max<int64_t>(1, W)); }
LD constant(int64_t) { return 1; }
LD constant_with_warmup(int64_t s, int64_t W) { return s < W ? warm(s, W) : 1; }
LD linear(int64_t s, int64_t W, int64_t T) {
  if (s < W) return warm(s, W);
  return std::max<LD>(0, static_cast<LD>(T - s) / static_cast<LD>(std::max<int64_t>(1, T - W)));
}
LD cosine(int64_t s, int64_t W, int64_t T, LD min_rate = 0) {
  if (s < W) return warm(s, W);
  const LD progress = static_cast<LD>(s - W) / static_cast<LD>(std::max<int64_t>(1, T - W));
  const LD f = 0.5L * (1 + std::cos(std::numbers::pi_v<LD> * 0.5L * 2 * progress));
  return std::max<LD>(0, f * (1 - min_rate) + min_rate);
}
}  // namespace hf

void expect_lr(double got, LD want, double peak, const std::string& what) {
  EXPECT_NEAR(got, static_cast<double>(want), 1e-15 * peak) << what;
  if (want == 0) EXPECT_EQ(got, 0.0) << what;  // exactly 0, as in transformers
}

TEST(LrSchedule, EveryScheduleFollowsTransformersStepByStep) {
  OptimConfig c;
  c.lr = 3e-4;
  for (int64_t T : {1, 2, 7, 100})
    for (int64_t W : {0, 1, 3, 10, 150}) {
      c.warmup_steps = W;
      for (int64_t s = 0; s < T; ++s) {
        const std::string at = "T=" + std::to_string(T) + " W=" + std::to_string(W) + " s=" + std::to_string(s);
        c.schedule = LrSchedule::Constant;
        expect_lr(lr_at(c, s, T), 3e-4L * hf::constant(s), 3e-4, "constant " + at);
        c.schedule = LrSchedule::ConstantWithWarmup;
        expect_lr(lr_at(c, s, T), 3e-4L * hf::constant_with_warmup(s, W), 3e-4, "constant_with_warmup " + at);
        c.schedule = LrSchedule::Linear;
        expect_lr(lr_at(c, s, T), 3e-4L * hf::linear(s, W, T), 3e-4, "linear " + at);
        c.schedule = LrSchedule::Cosine;
        expect_lr(lr_at(c, s, T), 3e-4L * hf::cosine(s, W, T), 3e-4, "cosine " + at);
        c.min_lr_ratio = 0.1;  // cosine_with_min_lr, min_lr_rate 0.1
        expect_lr(lr_at(c, s, T), 3e-4L * hf::cosine(s, W, T, 0.1L), 3e-4, "cosine_with_min_lr " + at);
        c.min_lr_ratio = 0;
      }
    }
}

TEST(LrSchedule, WarmupStartsAtZeroOnTheFirstStep) {
  OptimConfig c;
  c.lr = 1e-3;
  c.warmup_steps = 4;
  for (LrSchedule s : {LrSchedule::ConstantWithWarmup, LrSchedule::Cosine, LrSchedule::Linear}) {
    c.schedule = s;
    SCOPED_TRACE(lr_schedule_name(s));
    EXPECT_EQ(lr_at(c, 0, 100), 0.0);  // optimizer step 1 (1-based): lr 0
    EXPECT_DOUBLE_EQ(lr_at(c, 1, 100), 2.5e-4);
    EXPECT_DOUBLE_EQ(lr_at(c, 2, 100), 5e-4);
    EXPECT_DOUBLE_EQ(lr_at(c, 3, 100), 7.5e-4);
    EXPECT_DOUBLE_EQ(lr_at(c, 4, 100), 1e-3);  // first step at the peak: warmup over, decay progress 0
  }
  c.schedule = LrSchedule::ConstantWithWarmup;
  EXPECT_EQ(lr_at(c, 50, 100), 1e-3);
  EXPECT_EQ(lr_at(c, 500, 100), 1e-3);
  // "constant" has no warmup (transformers' get_constant_schedule ignores num_warmup_steps).
  c.schedule = LrSchedule::Constant;
  EXPECT_EQ(lr_at(c, 0, 100), 1e-3);
  EXPECT_EQ(lr_at(c, 3, 100), 1e-3);
  c.warmup_steps = 0;
  c.schedule = LrSchedule::Linear;
  EXPECT_EQ(lr_at(c, 0, 100), 1e-3);  // no warmup: the first step runs at the peak
  EXPECT_THROW(lr_at(c, -1, 100), Error);
}

TEST(LrSchedule, CosineEndpointsAndMidpoint) {
  OptimConfig c;
  c.lr = 2e-5;
  c.warmup_steps = 10;
  c.schedule = LrSchedule::Cosine;
  c.min_lr_ratio = 0.1;
  const int64_t total = 110;
  const double lo = 2e-6, hi = 2e-5;
  EXPECT_EQ(lr_at(c, 0, total), 0.0);  // the warmup starts at 0, not at the floor
  EXPECT_DOUBLE_EQ(lr_at(c, 5, total), hi / 2);
  EXPECT_DOUBLE_EQ(lr_at(c, 10, total), hi);
  EXPECT_DOUBLE_EQ(lr_at(c, 60, total), lo + (hi - lo) * 0.5);                                  // midpoint
  EXPECT_DOUBLE_EQ(lr_at(c, 35, total), lo + (hi - lo) * 0.5 * (1 + std::cos(std::numbers::pi / 4)));  // quarter
  EXPECT_DOUBLE_EQ(lr_at(c, 85, total), lo + (hi - lo) * 0.5 * (1 - std::cos(std::numbers::pi / 4)));
  EXPECT_DOUBLE_EQ(lr_at(c, total - 1, total), lo + (hi - lo) * 0.5 * (1 + std::cos(std::numbers::pi * 0.99)));
  EXPECT_DOUBLE_EQ(lr_at(c, total, total), lo);
  double prev = hi;
  for (int64_t s = 10; s <= total; ++s) {
    const double x = lr_at(c, s, total);
    EXPECT_LE(x, prev) << "s=" << s;
    prev = x;
  }
  c.min_lr_ratio = 0;
  EXPECT_EQ(lr_at(c, total, total), 0.0);
}

TEST(LrSchedule, LinearDecay) {
  OptimConfig c;
  c.lr = 4e-4;
  c.schedule = LrSchedule::Linear;
  EXPECT_DOUBLE_EQ(lr_at(c, 0, 100), 4e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 25, 100), 3e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 50, 100), 2e-4);
  EXPECT_DOUBLE_EQ(lr_at(c, 99, 100), 4e-6);  // the last step of 100: (100 - 99) / 100
  EXPECT_DOUBLE_EQ(lr_at(c, 100, 100), 0.0);
  EXPECT_DOUBLE_EQ(lr_at(c, 150, 100), 0.0);  // max(0, .) past the end
  c.min_lr_ratio = 0.25;
  EXPECT_DOUBLE_EQ(lr_at(c, 50, 100), 1e-4 + 3e-4 * 0.5);
  EXPECT_DOUBLE_EQ(lr_at(c, 100, 100), 1e-4);
  c.warmup_steps = 20;
  EXPECT_DOUBLE_EQ(lr_at(c, 60, 100), 1e-4 + 3e-4 * 0.5);  // decay spans [warmup, total]
  EXPECT_DOUBLE_EQ(lr_at(c, 10, 100), 2e-4);              // warmup 10/20 of the peak, from 0
  // Degenerate: total <= warmup, the whole run is warmup.
  EXPECT_DOUBLE_EQ(lr_at(c, 9, 10), 4e-4 * 9 / 20);
}

TEST(LrSchedule, ParseNamesAndErrors) {
  EXPECT_EQ(parse_lr_schedule("constant"), LrSchedule::Constant);
  EXPECT_EQ(parse_lr_schedule("constant_with_warmup"), LrSchedule::ConstantWithWarmup);
  EXPECT_EQ(parse_lr_schedule("cosine"), LrSchedule::Cosine);
  EXPECT_EQ(parse_lr_schedule("linear"), LrSchedule::Linear);
  for (LrSchedule s : {LrSchedule::Constant, LrSchedule::ConstantWithWarmup, LrSchedule::Cosine, LrSchedule::Linear})
    EXPECT_EQ(parse_lr_schedule(lr_schedule_name(s)), s);
  try {
    parse_lr_schedule("cosinus");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    for (const char* part : {"lr_scheduler_type", "'cosinus'", "constant", "constant_with_warmup", "cosine", "linear"})
      EXPECT_NE(msg.find(part), std::string::npos) << msg << " lacks " << part;
  }
  EXPECT_THROW(parse_lr_schedule("Cosine"), InputError);
  EXPECT_THROW(parse_lr_schedule(""), InputError);
}

// ============================================================================================== config

TEST(OptimConfig, ValidateNamesTheKey) {
  EXPECT_NO_THROW(OptimConfig{}.validate());
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  struct Case {
    const char* key;
    std::function<void(OptimConfig&)> set;
  };
  const std::vector<Case> cases = {
      {"learning_rate", [](OptimConfig& c) { c.lr = -1e-5; }},
      {"learning_rate", [](OptimConfig& c) { c.lr = 0; }},
      {"learning_rate", [&](OptimConfig& c) { c.lr = nan; }},
      {"learning_rate", [&](OptimConfig& c) { c.lr = inf; }},
      {"adam_beta1", [](OptimConfig& c) { c.beta1 = 1.0; }},
      {"adam_beta1", [](OptimConfig& c) { c.beta1 = -0.1; }},
      {"adam_beta1", [&](OptimConfig& c) { c.beta1 = nan; }},
      {"adam_beta2", [](OptimConfig& c) { c.beta2 = 1.5; }},
      {"adam_beta2", [](OptimConfig& c) { c.beta2 = 1.0; }},
      {"adam_epsilon", [](OptimConfig& c) { c.eps = 0; }},
      {"adam_epsilon", [](OptimConfig& c) { c.eps = -1e-8; }},
      {"weight_decay", [](OptimConfig& c) { c.weight_decay = -0.01; }},
      {"weight_decay", [&](OptimConfig& c) { c.weight_decay = nan; }},
      {"weight_decay", [](OptimConfig& c) { c.lr = 0.1; c.weight_decay = 10; }},  // lr * wd >= 1
      {"warmup_steps", [](OptimConfig& c) { c.warmup_steps = -1; }},
      {"max_grad_norm", [&](OptimConfig& c) { c.max_grad_norm = nan; }},
      {"max_grad_norm", [&](OptimConfig& c) { c.max_grad_norm = inf; }},
      {"min_lr_ratio", [](OptimConfig& c) { c.min_lr_ratio = 1.5; }},
      {"min_lr_ratio", [](OptimConfig& c) { c.min_lr_ratio = -0.5; }},
  };
  for (const Case& cs : cases) {
    OptimConfig c;
    cs.set(c);
    try {
      c.validate();
      ADD_FAILURE() << "no error for a bad " << cs.key;
    } catch (const InputError& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(std::string(cs.key) + ":", 0), 0u) << msg;
    }
  }
  // Allowed edge values.
  OptimConfig c;
  c.beta1 = 0;
  c.beta2 = 0;
  c.weight_decay = 0;
  c.max_grad_norm = -1;  // disables clipping
  c.warmup_steps = 0;
  c.min_lr_ratio = 1;
  EXPECT_NO_THROW(c.validate());
}

// ============================================================================================== the device step

// The unmerged segments of a parameter layout, sorted by offset (AdamW merges neighbours; the update is elementwise,
// so the result is the same).
std::vector<AdamWSegment> spec_segments(std::vector<ParamSpec> specs) {
  std::sort(specs.begin(), specs.end(), [](const ParamSpec& a, const ParamSpec& b) { return a.offset < b.offset; });
  std::vector<AdamWSegment> segs;
  for (const ParamSpec& s : specs) {
    int64_t k = 1;
    for (int64_t d : s.shape) k *= d;
    segs.push_back({s.offset, k, s.weight_decay});
  }
  return segs;
}

// One optimizer step as AdamW::step computed it before the device step, from the backend's host-returning ops:
// the norm (sqrt of sum_squares) and the clipping factor on the host, the dry run's verdict read back, then
// adamw_update_segments and convert() into the BF16 copy (what GPT2::sync_params calls). `step` is 0-based.
struct LegacyOutcome {
  double norm = 0;
  bool clipped = false;
  SkipReason skip = SkipReason::None;
};
LegacyOutcome legacy_step(Backend& be, const OptimConfig& cfg, int64_t step, int64_t total,
                          const std::vector<AdamWSegment>& segs, const Tensor& params, const Tensor& grads,
                          const Tensor& m, const Tensor& v, const Tensor& copy) {
  LegacyOutcome r;
  r.norm = std::sqrt(be.sum_squares(grads));
  if (!std::isfinite(r.norm)) {
    r.skip = SkipReason::NonFiniteGradNorm;
    return r;
  }
  AdamWParams p;
  p.lr = lr_at(cfg, step, total);
  p.beta1 = cfg.beta1;
  p.beta2 = cfg.beta2;
  p.eps = cfg.eps;
  p.weight_decay = cfg.weight_decay;
  p.step = step + 1;
  if (cfg.max_grad_norm > 0) {
    const double coef = cfg.max_grad_norm / (r.norm + 1e-6);
    if (coef < 1.0) {
      p.grad_scale = coef;
      r.clipped = true;
    }
  }
  if (be.adamw_dry_run_segments(params, grads, m, v, segs, p) == AdamWCheck::NonFinite) {
    r.skip = SkipReason::NonFiniteUpdate;
    return r;
  }
  be.adamw_update_segments(params, grads, m, v, segs, p);
  if (copy.defined()) be.convert(copy, params);
  return r;
}

// BF16 bits as a vector (the tests compare bits; Tensor::data has no bf16 type).
std::vector<uint16_t> bf16_bits(const Tensor& t) {
  std::vector<uint16_t> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.raw(), v.size() * sizeof(uint16_t));
  return v;
}
// A BF16 host tensor of NaNs with a payload no rounding produces (0x7fc1), so an element the step failed to write
// is seen.
Tensor poisoned_bf16(int64_t n) {
  Tensor t = Tensor::host({n}, DType::BF16);
  std::vector<uint16_t> v(static_cast<size_t>(n), 0x7fc1);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(uint16_t));
  return t;
}

// The device step (step_async + finish_step, with the BF16 copy for F32 and the gradient zeroed) against the
// pre-device sequence of host-returning ops, over the GPT-2 layout: parameters, both moments, the BF16 copy (all of
// it, from a poisoned start, against convert()'s rounding) bitwise, the norm exactly, and the gradient zeroed after
// every step. Four steps with warmup (lr 0 first), clipped and unclipped ones (a step with gradients scaled by 1e-4
// has a norm below max_grad_norm).
TYPED_TEST(Optim, DeviceStepEqualsTheHostSequenceBitwise) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const GPT2Config gc = tiny_gpt2();
  const auto specs = gpt2_param_specs(gc);
  const auto segs = spec_segments(specs);
  const int64_t n = gc.num_parameters(), total = 6;
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, static_cast<size_t>(n));
  Tensor params = host_tensor(p0), ref = host_tensor(p0);
  Tensor rm = be->zeros({n}, dtype_of<T>()), rv = be->zeros({n}, dtype_of<T>());
  const bool with_copy = std::is_same_v<T, float>;
  Tensor copy = with_copy ? poisoned_bf16(n) : Tensor(), ref_copy = with_copy ? poisoned_bf16(n) : Tensor();
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 0.5;
  cfg.warmup_steps = 2;
  AdamW opt(*be, specs, n, dtype_of<T>(), cfg, total);
  AdamW::StepOutputs out;
  out.compute_copy = copy;
  out.grad_after = GradAfterStep::Zero;
  int clipped = 0, unclipped = 0;
  for (int64_t s = 0; s < 4; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    const std::vector<T> gv = randn<T>(g, static_cast<size_t>(n), s == 2 ? 1e-4 : 1.0);
    const Tensor grads = host_tensor(gv), ref_grads = host_tensor(gv);
    const LegacyOutcome want = legacy_step(*be, cfg, s, total, segs, ref, ref_grads, rm, rv, ref_copy);
    opt.step_async(params, grads, out);
    const AdamW::StepInfo info = opt.finish_step();
    ASSERT_EQ(want.skip, SkipReason::None);
    EXPECT_FALSE(info.skipped);
    EXPECT_EQ(info.grad_norm, want.norm);
    EXPECT_EQ(info.clipped, want.clipped);
    EXPECT_EQ(info.lr, lr_at(cfg, s, total));
    (info.clipped ? clipped : unclipped) += 1;
    EXPECT_EQ(opt.step_count(), s + 1);
    ASSERT_TRUE(bitwise_equal(to_vec<T>(params), to_vec<T>(ref))) << "param";
    ASSERT_TRUE(bitwise_equal(to_vec<T>(opt.m()), to_vec<T>(rm))) << "m";
    ASSERT_TRUE(bitwise_equal(to_vec<T>(opt.v()), to_vec<T>(rv))) << "v";
    if (with_copy) ASSERT_EQ(bf16_bits(copy), bf16_bits(ref_copy)) << "BF16 copy";
    ASSERT_TRUE(bitwise_equal(to_vec<T>(grads), std::vector<T>(static_cast<size_t>(n), T(0)))) << "grad not zeroed";
    ASSERT_TRUE(bitwise_equal(to_vec<T>(ref_grads), gv)) << "the host sequence must leave its gradient";
  }
  EXPECT_GT(clipped, 0);
  EXPECT_GT(unclipped, 0);
}

// The BF16 copy the step writes is what GPT2::sync_params writes: a BF16 model on the CPU backend, its F32 master
// updated by the step with the copy set to params(), against a twin model whose step writes no copy and then
// calls sync_params.
TEST(AdamWDeviceStep, Bf16CopyEqualsSyncParams) {
  auto be = make_cpu_backend();
  const GPT2Config gc = tiny_gpt2();
  GPT2 a(*be, gc, DType::BF16), b(*be, gc, DType::BF16);
  Rng rng(test_seed());
  a.init_random(rng);
  be->copy(b.master_params(), a.master_params());
  b.sync_params();
  const int64_t n = gc.num_parameters();
  OptimConfig cfg = base_cfg();
  AdamW oa(*be, a.specs(), n, DType::F32, cfg, 5), ob(*be, b.specs(), n, DType::F32, cfg, 5);
  std::mt19937_64 g(test_seed() + 1);
  for (int s = 0; s < 3; ++s) {
    const std::vector<float> gv = randn<float>(g, static_cast<size_t>(n));
    AdamW::StepOutputs out;
    out.compute_copy = a.params();
    oa.step_async(a.master_params(), host_tensor(gv), out);
    ASSERT_FALSE(oa.finish_step().skipped);
    ASSERT_FALSE(ob.step(b.master_params(), host_tensor(gv)).skipped);
    b.sync_params();
    ASSERT_EQ(bf16_bits(a.params()), bf16_bits(b.params())) << "step " << s;
  }
}

// A skipped device step writes nothing of the step: parameters, moments, the BF16 copy (poisoned beforehand, so a
// write shows) and step_count() stay bit-identical; the gradient is zeroed with GradAfterStep::Zero and left as it
// was with Keep. Three ways in: a NaN gradient, an Inf gradient (NonFiniteGradNorm), and a learning rate whose step
// size overflows the type (NonFiniteUpdate). The next good step then equals a run that never saw the bad ones.
TYPED_TEST(Optim, DeviceStepSkipsLeaveEverythingBitIdentical) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 301;
  const std::vector<ParamSpec> specs = {{"w", {120}, 0, true}, {"b", {181}, 120, false}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n), g1 = randn<T>(g, n), g2 = randn<T>(g, n);
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 1.0;
  for (int way = 0; way < 3; ++way) {
    for (GradAfterStep after : {GradAfterStep::Zero, GradAfterStep::Keep}) {
      SCOPED_TRACE("way " + std::to_string(way) + (after == GradAfterStep::Zero ? ", zero" : ", keep"));
      OptimConfig c = cfg;
      std::vector<T> gb = g2;
      SkipReason want = SkipReason::NonFiniteGradNorm;
      if (way == 0) gb[150] = std::numeric_limits<T>::quiet_NaN();
      if (way == 1) gb[7] = -std::numeric_limits<T>::infinity();
      if (way == 2) {
        // lr / (1 - beta1^2) past T's range: the step size itself is +-Inf in T (weight decay off: lr * wd < 1).
        c.lr = 0.5 * static_cast<double>(std::numeric_limits<T>::max());
        c.weight_decay = 0;
        want = SkipReason::NonFiniteUpdate;
      }
      AdamW opt(*be, specs, n, dtype_of<T>(), c, 10), clean(*be, specs, n, dtype_of<T>(), c, 10);
      Tensor p = host_tensor(p0), pc = host_tensor(p0);
      // A first step, so that the moments are not zero (way 2: its first step overflows too and changes nothing).
      opt.step(p, host_tensor(g1));
      clean.step(pc, host_tensor(g1));
      if (way == 2) {
        ASSERT_EQ(opt.step_count(), 0);
        ASSERT_TRUE(bitwise_equal(to_vec<T>(p), p0));
      }
      Tensor copy = std::is_same_v<T, float> ? poisoned_bf16(n) : Tensor();
      const auto before_p = to_vec<T>(p), before_m = to_vec<T>(opt.m()), before_v = to_vec<T>(opt.v());
      const int64_t before_step = opt.step_count();
      Tensor grads = host_tensor(gb);
      AdamW::StepOutputs out;
      out.compute_copy = copy;
      out.grad_after = after;
      opt.step_async(p, grads, out);
      const AdamW::StepInfo info = opt.finish_step();
      EXPECT_TRUE(info.skipped);
      EXPECT_EQ(info.skip_reason, want);
      EXPECT_EQ(std::isnan(info.grad_norm), want == SkipReason::NonFiniteGradNorm);
      EXPECT_EQ(opt.step_count(), before_step);
      EXPECT_TRUE(bitwise_equal(to_vec<T>(p), before_p));
      EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.m()), before_m));
      EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.v()), before_v));
      if (copy.defined()) EXPECT_EQ(bf16_bits(copy), bf16_bits(poisoned_bf16(n))) << "a skipped step wrote the copy";
      if (after == GradAfterStep::Zero)
        EXPECT_TRUE(bitwise_equal(to_vec<T>(grads), std::vector<T>(static_cast<size_t>(n), T(0))));
      else
        EXPECT_TRUE(bitwise_equal(to_vec<T>(grads), gb));
      if (way < 2) {
        // The next good step equals the run that never saw the bad one.
        EXPECT_FALSE(opt.step(p, host_tensor(g2)).skipped);
        clean.step(pc, host_tensor(g2));
        EXPECT_TRUE(bitwise_equal(to_vec<T>(p), to_vec<T>(pc)));
        EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.m()), to_vec<T>(clean.m())));
      }
    }
  }
}

// The device agreement: called exactly once per step, also when the norm already skips the step, with a [1] F64
// tensor holding this rank's count (0 or 1); what it leaves there decides (a count > 0 from "another rank" skips
// the step with NonFiniteUpdate, bit-identically).
TYPED_TEST(Optim, DeviceAgreementIsCalledOncePerStepAndDecides) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 97;
  const std::vector<ParamSpec> specs = {{"w", {97}, 0, true}};
  std::mt19937_64 g(test_seed());
  Tensor p = host_tensor(randn<T>(g, n));
  AdamW opt(*be, specs, n, dtype_of<T>(), base_cfg(), 10);
  int calls = 0;
  double others = 0;  // what the other ranks add
  opt.set_device_agreement([&](const Tensor& t) {
    ++calls;
    ASSERT_EQ(t.shape(), Shape({1}));
    ASSERT_EQ(t.dtype(), DType::F64);
    EXPECT_EQ(t.data<double>()[0], 0.0) << "this rank's dry run found nothing";
    t.data<double>()[0] += others;
  });
  EXPECT_THROW(opt.set_finite_agreement([](AdamWCheck c) { return c; }), Error);
  EXPECT_FALSE(opt.step(p, host_tensor(randn<T>(g, n))).skipped);
  EXPECT_EQ(calls, 1);
  others = 1;
  const auto before = to_vec<T>(p), before_m = to_vec<T>(opt.m());
  const auto info = opt.step(p, host_tensor(randn<T>(g, n)));
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(info.skipped);
  EXPECT_EQ(info.skip_reason, SkipReason::NonFiniteUpdate);
  EXPECT_TRUE(std::isfinite(info.grad_norm));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(p), before));
  EXPECT_TRUE(bitwise_equal(to_vec<T>(opt.m()), before_m));
  EXPECT_EQ(opt.step_count(), 1);
  others = 0;
  std::vector<T> bad = randn<T>(g, n);
  bad[3] = std::numeric_limits<T>::quiet_NaN();
  EXPECT_EQ(opt.step(p, host_tensor(bad)).skip_reason, SkipReason::NonFiniteGradNorm);
  EXPECT_EQ(calls, 3) << "the agreement is a collective of every step";
}

// NormSource::shard_sums with one rank (the reduction leaves the sum as it is) equals the norm over all gradients,
// bitwise; NormSource::given uses the norm it is handed.
TYPED_TEST(Optim, NormSourcesAgree) {
  using T = TypeParam;
  auto be = make_cpu_backend();
  const int64_t n = 1000;
  const std::vector<ParamSpec> specs = {{"w", {600}, 0, true}, {"b", {400}, 600, false}};
  std::mt19937_64 g(test_seed());
  const std::vector<T> p0 = randn<T>(g, n), gv = randn<T>(g, n);
  OptimConfig cfg = base_cfg();
  cfg.max_grad_norm = 1.0;
  AdamW a(*be, specs, n, dtype_of<T>(), cfg, 10), b(*be, specs, n, dtype_of<T>(), cfg, 10),
      c(*be, specs, n, dtype_of<T>(), cfg, 10);
  Tensor pa = host_tensor(p0), pb = host_tensor(p0), pc = host_tensor(p0);
  const Tensor grads = host_tensor(gv);
  int reduced = 0;
  a.step_async(pa, grads);
  b.step_owned_async(pb, grads, AdamW::NormSource::shard_sums([&](const Tensor&) { ++reduced; }));
  c.step_owned_async(pc, grads, AdamW::NormSource::given(2 * std::sqrt(be->sum_squares(grads))));
  const auto ia = a.finish_step(), ib = b.finish_step(), ic = c.finish_step();
  EXPECT_EQ(reduced, 1);
  EXPECT_EQ(ia.grad_norm, ib.grad_norm);
  EXPECT_TRUE(bitwise_equal(to_vec<T>(pa), to_vec<T>(pb)));
  EXPECT_EQ(ic.grad_norm, 2 * ia.grad_norm);
  EXPECT_TRUE(ic.clipped);
  EXPECT_FALSE(bitwise_equal(to_vec<T>(pa), to_vec<T>(pc))) << "a different clipping factor must change the update";
}

// The asynchronous protocol: one pending step at a time, finish_step only for a pending step, no set_step or
// set_shard while one is pending; the record is F64 [adamw_record::kWidth] on the backend's device.
TEST(AdamWDeviceStep, ProtocolErrors) {
  auto be = make_cpu_backend();
  const int64_t n = 10;
  const std::vector<ParamSpec> specs = {{"w", {10}, 0, true}};
  Tensor p = Tensor::host({n}, DType::F32), gr = Tensor::host({n}, DType::F32);
  std::memset(p.raw(), 0, static_cast<size_t>(p.nbytes()));
  std::memset(gr.raw(), 0, static_cast<size_t>(gr.nbytes()));
  AdamW opt(*be, specs, n, DType::F32, base_cfg(), 10);
  EXPECT_THROW(opt.finish_step(), Error);
  opt.step_async(p, gr);
  EXPECT_TRUE(opt.step_pending());
  EXPECT_THROW(opt.step_async(p, gr), Error);
  EXPECT_THROW(opt.set_step(3), Error);
  EXPECT_THROW(opt.set_shard(0, 5), Error);
  EXPECT_EQ(opt.step_record().shape(), Shape({adamw_record::kWidth}));
  EXPECT_EQ(opt.step_record().dtype(), DType::F64);
  EXPECT_FALSE(opt.finish_step().skipped);
  EXPECT_FALSE(opt.step_pending());
  AdamW::StepOutputs bad;
  bad.compute_copy = Tensor::host({n + 1}, DType::BF16);
  EXPECT_THROW(opt.step_async(p, gr, bad), Error);
  EXPECT_FALSE(opt.step_pending());
}

}  // namespace
