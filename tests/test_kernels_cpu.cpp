// CPU reference kernels: finite-difference gradient checks in double, forward checks against closed forms and
// naive loops, float-vs-double agreement, poisoning of (=) outputs, determinism.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "kernels/logprob.h"
#include "kernels/matmul.h"
#include "kernels/residual.h"
#include "runtime/backend.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace {

using namespace dpo::cpu;
using dpo::WeightLayout;
using dpo::test::dot;
using dpo::test::max_rel_err;
using dpo::test::numeric_grad;
using dpo::test::poison;
using dpo::test::randn;
using dpo::test::test_seed;

// Awkward sizes so that no loop bound is a multiple of a block or vector width.
constexpr int64_t kB = 3, kT = 7, kC = 12, kNH = 3, kV = 37, kOC = 11;
constexpr int64_t kN = kB * kT;  // rows for layernorm / matmul

// Gradient checks run in double with central differences, h = 1e-6: truncation O(h^2) and round-off
// O(eps_d * |L| / h) are both ~1e-10 relative for these O(1)..O(10) losses, so 1e-7 leaves a 1000x margin while a
// wrong term (a missing factor, a dropped sum) shows up as an O(1) error.
constexpr double kGradTol = 1e-7;

// Float vs double on identical (float-representable) inputs: each output is a short chain of at most ~100
// float roundings (eps_f = 6e-8), so a worst-case linear accumulation stays below 1e-5 relative; a kernel that
// e.g. skips a term or mixes up an index is off by O(1).
constexpr double kFloatTol = 1e-5;

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> to_float(const std::vector<double>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}
// Random inputs rounded to float, so float and double kernels see exactly the same values.
std::vector<double> randn_f(std::mt19937_64& g, size_t n, double scale = 1.0) {
  return to_double(to_float(randn<double>(g, n, scale)));
}
std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}
template <class T>
bool all_finite(const std::vector<T>& v) {
  for (T x : v)
    if (!std::isfinite(x)) return false;
  return true;
}
template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Analytic gradient of a (+=) backward: the buffer starts at random R, the backward adds g, and g = buf - R.
struct AccGrad {
  std::vector<double> R, buf;
  AccGrad(std::mt19937_64& g, size_t n) : R(randn<double>(g, n)), buf(R) {}
  std::vector<double> grad() const { return minus(buf, R); }
};

void expect_grad(std::vector<double>& x, const std::vector<double>& analytic, const std::function<double()>& L,
                 const char* what) {
  std::vector<double> num = numeric_grad(x, L);
  EXPECT_LT(max_rel_err(analytic, num), kGradTol) << "gradient w.r.t. " << what;
}

void expect_float_close(const std::vector<float>& f, const std::vector<double>& d, const char* what) {
  ASSERT_TRUE(all_finite(f)) << what;
  ASSERT_TRUE(all_finite(d)) << what;
  EXPECT_LT(max_rel_err(to_double(f), d), kFloatTol) << what;
}

using dpo::test::ThreadCount;

std::vector<int32_t> random_tokens(std::mt19937_64& g, size_t n, int32_t lo, int32_t hi) {
  std::uniform_int_distribution<int32_t> d(lo, hi - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// ============================================================================================== encoder

template <class T>
void check_encoder_forward(std::mt19937_64& g) {
  const int64_t maxT = kT + 2;
  auto tokens = random_tokens(g, kB * kT, 0, kV);
  auto wte = randn<T>(g, kV * kC), wpe = randn<T>(g, maxT * kC);
  std::vector<T> out(kB * kT * kC);
  poison(out);
  encoder_forward(out.data(), tokens.data(), wte.data(), wpe.data(), kB, kT, kC);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t t = 0; t < kT; ++t)
      for (int64_t c = 0; c < kC; ++c)
        ASSERT_EQ(out[(b * kT + t) * kC + c], wte[tokens[b * kT + t] * kC + c] + wpe[t * kC + c])
            << "b=" << b << " t=" << t << " c=" << c;
}

TEST(KernelEncoder, ForwardIsTokenRowPlusPositionRow) {
  std::mt19937_64 g(test_seed());
  check_encoder_forward<float>(g);
  check_encoder_forward<double>(g);
}

TEST(KernelEncoder, GradCheckWithRepeatedTokens) {
  std::mt19937_64 g(test_seed());
  const int64_t maxT = kT + 2;  // rows t >= T of wpe must get no gradient
  // Tokens from a small range so that many (b,t) share a row of wte; one token is the last row.
  auto tokens = random_tokens(g, kB * kT, 0, 4);
  tokens[5] = kV - 1;
  auto wte = randn<double>(g, kV * kC), wpe = randn<double>(g, maxT * kC), G = randn<double>(g, kB * kT * kC);
  std::vector<double> out(kB * kT * kC);
  auto L = [&] {
    encoder_forward(out.data(), tokens.data(), wte.data(), wpe.data(), kB, kT, kC);
    return dot(out, G);
  };
  AccGrad dwte(g, wte.size()), dwpe(g, wpe.size());
  encoder_backward(dwte.buf.data(), dwpe.buf.data(), G.data(), tokens.data(), kB, kT, kC);
  expect_grad(wte, dwte.grad(), L, "wte");
  expect_grad(wpe, dwpe.grad(), L, "wpe");
}

TEST(KernelEncoder, FloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  const int64_t maxT = kT;
  auto tokens = random_tokens(g, kB * kT, 0, 5);
  auto wte = randn_f(g, kV * kC), wpe = randn_f(g, maxT * kC), G = randn_f(g, kB * kT * kC);
  auto wte_f = to_float(wte), wpe_f = to_float(wpe), G_f = to_float(G);
  std::vector<double> out(kB * kT * kC), dwte(wte.size(), 0.0), dwpe(wpe.size(), 0.0);
  std::vector<float> out_f(out.size()), dwte_f(wte.size(), 0.f), dwpe_f(wpe.size(), 0.f);
  poison(out);
  poison(out_f);
  encoder_forward(out.data(), tokens.data(), wte.data(), wpe.data(), kB, kT, kC);
  encoder_forward(out_f.data(), tokens.data(), wte_f.data(), wpe_f.data(), kB, kT, kC);
  encoder_backward(dwte.data(), dwpe.data(), G.data(), tokens.data(), kB, kT, kC);
  encoder_backward(dwte_f.data(), dwpe_f.data(), G_f.data(), tokens.data(), kB, kT, kC);
  expect_float_close(out_f, out, "out");
  expect_float_close(dwte_f, dwte, "dwte");
  expect_float_close(dwpe_f, dwpe, "dwpe");
}

TEST(KernelEncoder, BackwardIsBitwiseDeterministicAcrossThreadCounts) {
  std::mt19937_64 g(test_seed());
  // Float and few distinct tokens: every dwte row sums ~100 rows of dout, so any change in summation order
  // (atomics, per-thread partial sums) changes the bits.
  const int64_t B = 4, T = 33, C = 100, V = 5;
  auto tokens = random_tokens(g, B * T, 0, V);
  auto dout = randn<float>(g, B * T * C);
  auto R = randn<float>(g, V * C), Rp = randn<float>(g, T * C);
  auto run = [&](int threads) {
    ThreadCount tc(threads);
    std::vector<float> dwte = R, dwpe = Rp;
    encoder_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), B, T, C);
    dwte.insert(dwte.end(), dwpe.begin(), dwpe.end());
    return dwte;
  };
  auto ref = run(1);
  EXPECT_TRUE(bitwise_equal(run(1), ref));
  EXPECT_TRUE(bitwise_equal(run(3), ref));
  EXPECT_TRUE(bitwise_equal(run(3), ref));
}

// ============================================================================================== layernorm

template <class T>
void check_layernorm_normalizes(std::mt19937_64& g, double tol) {
  const double eps = 1e-5;
  // Rows centred far from 0 (|mean| / std = 600): a float or one-pass E[x^2] - E[x]^2 statistic would lose
  // several digits here, accumulation in double does not.
  std::vector<T> inp(kN * kC);
  std::normal_distribution<double> nd(0.0, 0.5);
  for (int64_t n = 0; n < kN; ++n)
    for (int64_t c = 0; c < kC; ++c) inp[n * kC + c] = static_cast<T>(300.0 + 10.0 * n + nd(g));
  std::vector<T> w(kC, T(1)), b(kC, T(0)), out(kN * kC), mean(kN), rstd(kN);
  poison(out);
  poison(mean);
  poison(rstd);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), kN, kC, eps);
  for (int64_t n = 0; n < kN; ++n) {
    long double m = 0, v = 0, om = 0, ov = 0;
    for (int64_t c = 0; c < kC; ++c) m += inp[n * kC + c];
    m /= kC;
    for (int64_t c = 0; c < kC; ++c) v += (inp[n * kC + c] - m) * (inp[n * kC + c] - m);
    v /= kC;
    for (int64_t c = 0; c < kC; ++c) om += out[n * kC + c];
    om /= kC;
    for (int64_t c = 0; c < kC; ++c) ov += (out[n * kC + c] - om) * (out[n * kC + c] - om);
    ov /= kC;
    EXPECT_NEAR(static_cast<double>(om), 0.0, tol) << "row " << n;
    EXPECT_NEAR(static_cast<double>(ov), static_cast<double>(v / (v + eps)), tol) << "row " << n;
    EXPECT_NEAR(static_cast<double>(mean[n]) / static_cast<double>(m), 1.0, tol) << "row " << n;
    EXPECT_NEAR(static_cast<double>(rstd[n]) * std::sqrt(static_cast<double>(v + eps)), 1.0, tol) << "row " << n;
  }
}

TEST(KernelLayerNorm, ForwardNormalizesRows) {
  std::mt19937_64 g(test_seed());
  // float: outputs are O(1) and rounded once to float, so a few eps_f; float statistics would be off by
  // ~eps_f * |mean| * rstd ~ 1e-4 here. double: the double mean itself carries ~eps_d * |mean| ~ 1e-13, which
  // the normalisation multiplies by rstd ~ 2.
  check_layernorm_normalizes<float>(g, 1e-6);
  check_layernorm_normalizes<double>(g, 2e-12);
}

TEST(KernelLayerNorm, GradCheck) {
  std::mt19937_64 g(test_seed());
  auto inp = randn<double>(g, kN * kC, 2.0), w = randn<double>(g, kC), b = randn<double>(g, kC);
  auto G = randn<double>(g, kN * kC);
  for (auto& x : inp) x += 1.5;
  std::vector<double> out(kN * kC), mean(kN), rstd(kN);
  auto L = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), kN, kC, 1e-5);
    return dot(out, G);
  };
  L();
  AccGrad dinp(g, inp.size()), dw(g, w.size()), db(g, b.size());
  layernorm_backward(dinp.buf.data(), dw.buf.data(), db.buf.data(), G.data(), inp.data(), w.data(), mean.data(),
                     rstd.data(), kN, kC);
  expect_grad(inp, dinp.grad(), L, "inp");
  expect_grad(w, dw.grad(), L, "w");
  expect_grad(b, db.grad(), L, "b");
}

TEST(KernelLayerNorm, FloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  auto inp = randn_f(g, kN * kC, 2.0), w = randn_f(g, kC), b = randn_f(g, kC), G = randn_f(g, kN * kC);
  auto inp_f = to_float(inp), w_f = to_float(w), b_f = to_float(b), G_f = to_float(G);
  std::vector<double> out(kN * kC), mean(kN), rstd(kN), dinp(kN * kC, 0.0), dw(kC, 0.0), db(kC, 0.0);
  std::vector<float> out_f(kN * kC), mean_f(kN), rstd_f(kN), dinp_f(kN * kC, 0.f), dw_f(kC, 0.f), db_f(kC, 0.f);
  poison(out), poison(mean), poison(rstd), poison(out_f), poison(mean_f), poison(rstd_f);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), kN, kC, 1e-5);
  layernorm_forward(out_f.data(), mean_f.data(), rstd_f.data(), inp_f.data(), w_f.data(), b_f.data(), kN, kC, 1e-5);
  layernorm_backward(dinp.data(), dw.data(), db.data(), G.data(), inp.data(), w.data(), mean.data(), rstd.data(), kN,
                     kC);
  layernorm_backward(dinp_f.data(), dw_f.data(), db_f.data(), G_f.data(), inp_f.data(), w_f.data(), mean_f.data(),
                     rstd_f.data(), kN, kC);
  expect_float_close(out_f, out, "out");
  expect_float_close(mean_f, mean, "mean");
  expect_float_close(rstd_f, rstd, "rstd");
  expect_float_close(dinp_f, dinp, "dinp");
  expect_float_close(dw_f, dw, "dw");
  expect_float_close(db_f, db, "db");
}

TEST(KernelLayerNorm, BackwardTwiceAccumulatesExactlyTwice) {
  std::mt19937_64 g(test_seed());
  auto inp = randn<float>(g, kN * kC), w = randn<float>(g, kC), b = randn<float>(g, kC), G = randn<float>(g, kN * kC);
  std::vector<float> out(kN * kC), mean(kN), rstd(kN);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), kN, kC, 1e-5);
  auto run = [&](int times) {
    std::vector<float> dinp(kN * kC, 0.f), dw(kC, 0.f), db(kC, 0.f);
    for (int i = 0; i < times; ++i)
      layernorm_backward(dinp.data(), dw.data(), db.data(), G.data(), inp.data(), w.data(), mean.data(),
                         rstd.data(), kN, kC);
    dinp.insert(dinp.end(), dw.begin(), dw.end());
    dinp.insert(dinp.end(), db.begin(), db.end());
    return dinp;
  };
  auto once = run(1), twice = run(2);
  ASSERT_EQ(once.size(), twice.size());
  for (size_t i = 0; i < once.size(); ++i) ASSERT_EQ(twice[i], 2.0f * once[i]) << "element " << i;
}

// ============================================================================================== matmul

// w in the requested layout, read as W[c][j] (the [C,OC] matrix of out = inp @ W).
template <class T>
T weight_at(const std::vector<T>& w, int64_t c, int64_t j, WeightLayout layout) {
  return layout == WeightLayout::InOut ? w[c * kOC + j] : w[j * kC + c];
}

template <class T>
void check_matmul_naive(std::mt19937_64& g, WeightLayout layout, bool with_bias) {
  auto inp = randn<T>(g, kN * kC), w = randn<T>(g, kC * kOC), bias = randn<T>(g, kOC);
  std::vector<T> out(kN * kOC);
  poison(out);
  matmul_forward(out.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, kN, kC, kOC, layout);
  // Standard dot-product error bound: |fl(sum) - sum| <= (K+1) eps sum|terms|, with a factor 2 of slack.
  const double eps = std::numeric_limits<T>::epsilon();
  for (int64_t n = 0; n < kN; ++n)
    for (int64_t j = 0; j < kOC; ++j) {
      long double ref = with_bias ? bias[j] : 0, mag = with_bias ? std::fabs(bias[j]) : 0;
      for (int64_t c = 0; c < kC; ++c) {
        const long double term = static_cast<long double>(inp[n * kC + c]) * weight_at(w, c, j, layout);
        ref += term;
        mag += std::fabs(term);
      }
      ASSERT_NEAR(out[n * kOC + j], static_cast<double>(ref), 2.0 * (kC + 1) * eps * static_cast<double>(mag))
          << "n=" << n << " j=" << j << " layout=" << int(layout) << " bias=" << with_bias;
    }
}

TEST(KernelMatmul, ForwardMatchesNaiveLoop) {
  std::mt19937_64 g(test_seed());
  for (auto layout : {WeightLayout::InOut, WeightLayout::OutIn})
    for (bool bias : {true, false}) {
      check_matmul_naive<float>(g, layout, bias);
      check_matmul_naive<double>(g, layout, bias);
    }
}

void matmul_gradcheck(WeightLayout layout) {
  std::mt19937_64 g(test_seed());
  auto inp = randn<double>(g, kN * kC), w = randn<double>(g, kC * kOC), bias = randn<double>(g, kOC);
  auto G = randn<double>(g, kN * kOC);
  std::vector<double> out(kN * kOC);
  auto L = [&] {
    matmul_forward(out.data(), inp.data(), w.data(), bias.data(), kN, kC, kOC, layout);
    return dot(out, G);
  };
  AccGrad dinp(g, inp.size()), dw(g, w.size()), dbias(g, bias.size());
  matmul_backward(dinp.buf.data(), dw.buf.data(), dbias.buf.data(), G.data(), inp.data(), w.data(), kN, kC, kOC,
                  layout);
  expect_grad(inp, dinp.grad(), L, "inp");
  expect_grad(w, dw.grad(), L, "w");
  expect_grad(bias, dbias.grad(), L, "bias");
}

TEST(KernelMatmul, GradCheckInOut) { matmul_gradcheck(WeightLayout::InOut); }
TEST(KernelMatmul, GradCheckOutIn) { matmul_gradcheck(WeightLayout::OutIn); }

TEST(KernelMatmul, NullGradientsAreSkipped) {
  std::mt19937_64 g(test_seed());
  for (auto layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    auto inp = randn<double>(g, kN * kC), w = randn<double>(g, kC * kOC), G = randn<double>(g, kN * kOC);
    auto R1 = randn<double>(g, kN * kC), R2 = randn<double>(g, kC * kOC), R3 = randn<double>(g, kOC);
    auto dinp = R1, dw = R2, dbias = R3;
    matmul_backward(dinp.data(), dw.data(), dbias.data(), G.data(), inp.data(), w.data(), kN, kC, kOC, layout);
    auto only_dinp = R1, only_dw = R2, only_dbias = R3;
    matmul_backward<double>(only_dinp.data(), nullptr, nullptr, G.data(), inp.data(), w.data(), kN, kC, kOC, layout);
    matmul_backward<double>(nullptr, only_dw.data(), nullptr, G.data(), inp.data(), w.data(), kN, kC, kOC, layout);
    matmul_backward<double>(nullptr, nullptr, only_dbias.data(), G.data(), inp.data(), w.data(), kN, kC, kOC,
                            layout);
    EXPECT_TRUE(bitwise_equal(only_dinp, dinp));
    EXPECT_TRUE(bitwise_equal(only_dw, dw));
    EXPECT_TRUE(bitwise_equal(only_dbias, dbias));
    EXPECT_FALSE(bitwise_equal(dinp, R1));  // the full call did change every buffer
    EXPECT_FALSE(bitwise_equal(dw, R2));
    EXPECT_FALSE(bitwise_equal(dbias, R3));
  }
}

TEST(KernelMatmul, FloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  for (auto layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    auto inp = randn_f(g, kN * kC), w = randn_f(g, kC * kOC), bias = randn_f(g, kOC), G = randn_f(g, kN * kOC);
    auto inp_f = to_float(inp), w_f = to_float(w), bias_f = to_float(bias), G_f = to_float(G);
    std::vector<double> out(kN * kOC), dinp(kN * kC, 0.0), dw(kC * kOC, 0.0), db(kOC, 0.0);
    std::vector<float> out_f(kN * kOC), dinp_f(kN * kC, 0.f), dw_f(kC * kOC, 0.f), db_f(kOC, 0.f);
    poison(out), poison(out_f);
    matmul_forward(out.data(), inp.data(), w.data(), bias.data(), kN, kC, kOC, layout);
    matmul_forward(out_f.data(), inp_f.data(), w_f.data(), bias_f.data(), kN, kC, kOC, layout);
    matmul_backward(dinp.data(), dw.data(), db.data(), G.data(), inp.data(), w.data(), kN, kC, kOC, layout);
    matmul_backward(dinp_f.data(), dw_f.data(), db_f.data(), G_f.data(), inp_f.data(), w_f.data(), kN, kC, kOC,
                    layout);
    expect_float_close(out_f, out, "out");
    expect_float_close(dinp_f, dinp, "dinp");
    expect_float_close(dw_f, dw, "dw");
    expect_float_close(db_f, db, "dbias");
  }
}

TEST(KernelMatmul, BackwardTwiceAccumulatesExactlyTwice) {
  std::mt19937_64 g(test_seed());
  for (auto layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    auto inp = randn<float>(g, kN * kC), w = randn<float>(g, kC * kOC), G = randn<float>(g, kN * kOC);
    auto run = [&](int times) {
      std::vector<float> dinp(kN * kC, 0.f), dw(kC * kOC, 0.f), db(kOC, 0.f);
      for (int i = 0; i < times; ++i)
        matmul_backward(dinp.data(), dw.data(), db.data(), G.data(), inp.data(), w.data(), kN, kC, kOC, layout);
      dinp.insert(dinp.end(), dw.begin(), dw.end());
      dinp.insert(dinp.end(), db.begin(), db.end());
      return dinp;
    };
    auto once = run(1), twice = run(2);
    ASSERT_EQ(once.size(), twice.size());
    for (size_t i = 0; i < once.size(); ++i) ASSERT_EQ(twice[i], 2.0f * once[i]) << "element " << i;
  }
}

// The sampled double reference of the GPU shape tests (tests/test_util.h: sampled_gemm and the operand views of
// forward, dinp and dw) against the double CPU kernel computed whole, so that oracle is itself checked: every
// sampled row and column of all three products in both layouts, with a padded row stride for out / dout, sizes
// that exercise the dot-product and row-update loops, several k slabs (K > 512) and column blocks. Both sides
// sum the same exact products in double, so they agree to ~K * 2^-53 of the magnitude; 1e-13 leaves a wide
// margin while a wrong index is off by O(1). The magnitudes are checked against a naive sum of |terms|.
TEST(KernelMatmul, SampledDoubleReferenceMatchesTheCpuKernel) {
  std::mt19937_64 g(test_seed());
  const int64_t N = 37, C = 53, OC = 601, ld = 640;
  for (auto layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    SCOPED_TRACE(layout == WeightLayout::InOut ? "InOut" : "OutIn");
    const auto inp_f = dpo::test::randn<float>(g, N * C), w_f = dpo::test::randn<float>(g, C * OC);
    std::vector<float> dout_f(N * ld, std::numeric_limits<float>::quiet_NaN());  // padding columns never read
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < OC; ++j) dout_f[n * ld + j] = static_cast<float>(std::normal_distribution<>()(g));
    std::vector<double> dout_packed(N * OC);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < OC; ++j) dout_packed[n * OC + j] = dout_f[n * ld + j];
    const auto inp = to_double(inp_f), w = to_double(w_f);
    std::vector<double> out(N * OC), dinp(N * C, 0.0), dw(C * OC, 0.0);
    matmul_forward<double>(out.data(), inp.data(), w.data(), nullptr, N, C, OC, layout);
    matmul_backward<double>(dinp.data(), dw.data(), nullptr, dout_packed.data(), inp.data(), w.data(), N, C, OC,
                            layout);
    const int64_t dw_rows = layout == WeightLayout::InOut ? C : OC, dw_cols = layout == WeightLayout::InOut ? OC : C;
    struct Product {
      const char* what;
      dpo::test::GemmOperands ops;
      const std::vector<double>& whole;
      int64_t M, P;
    };
    const Product products[] = {
        {"forward", dpo::test::forward_operands(inp_f.data(), w_f.data(), N, C, OC, layout), out, N, OC},
        {"dinp", dpo::test::dinp_operands(dout_f.data(), w_f.data(), N, C, OC, ld, layout), dinp, N, C},
        {"dw", dpo::test::dw_operands(dout_f.data(), inp_f.data(), N, C, OC, ld, layout), dw, dw_rows, dw_cols},
    };
    for (const Product& p : products) {
      SCOPED_TRACE(p.what);
      ASSERT_EQ(p.ops.A.rows, p.M);
      ASSERT_EQ(p.ops.B.cols, p.P);
      const auto rows = dpo::test::sample_indices(g, p.M, 5), cols = dpo::test::sample_indices(g, p.P, 5);
      ASSERT_EQ(rows.back(), p.M - 1);
      ASSERT_EQ(cols.front(), 0);
      const auto s = dpo::test::sampled_gemm(p.ops.A, p.ops.B, rows, cols);
      auto naive_mag = [&](int64_t i, int64_t j) {
        double m = 0;
        for (int64_t k = 0; k < p.ops.A.cols; ++k)
          m += std::fabs(double(p.ops.A.at(i, k)) * double(p.ops.B.at(k, j)));
        return m;
      };
      for (size_t q = 0; q < rows.size(); ++q)
        for (int64_t j = 0; j < p.P; ++j) {
          const double v = s.rows.val[q * p.P + j], m = s.rows.mag[q * p.P + j];
          ASSERT_NEAR(v, p.whole[rows[q] * p.P + j], 1e-13 * m) << "row " << rows[q] << " col " << j;
          ASSERT_NEAR(m, naive_mag(rows[q], j), 1e-13 * m) << "row " << rows[q] << " col " << j;
        }
      for (size_t q = 0; q < cols.size(); ++q)
        for (int64_t i = 0; i < p.M; ++i) {
          const double v = s.cols.val[q * p.M + i], m = s.cols.mag[q * p.M + i];
          ASSERT_NEAR(v, p.whole[i * p.P + cols[q]], 1e-13 * m) << "row " << i << " col " << cols[q];
          ASSERT_NEAR(m, naive_mag(i, cols[q]), 1e-13 * m) << "row " << i << " col " << cols[q];
        }
    }
  }
}

// ---------------------------------------------------------------------------- padded output rows (ld > OC)
// The LM head writes logits with a padded row stride (model/gpt2.h). The padded call does the same BLAS arithmetic
// as the dense one (only ldc / lda / ldb differ, which changes where BLAS reads and writes, not what it sums), so the
// valid columns must be bitwise equal; the padding, poisoned with NaN, must come back with the same bits.

// Columns [0, width) of each of `rows` rows of stride ld, packed densely.
template <class T>
std::vector<T> valid_cols(const std::vector<T>& padded, int64_t rows, int64_t width, int64_t ld) {
  std::vector<T> r(static_cast<size_t>(rows * width));
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j) r[n * width + j] = padded[n * ld + j];
  return r;
}

// True when every padding element (columns [width, ld)) still has the bits of `before`.
template <class T>
bool padding_unchanged(const std::vector<T>& after, const std::vector<T>& before, int64_t rows, int64_t width,
                       int64_t ld) {
  for (int64_t n = 0; n < rows; ++n)
    if (std::memcmp(&after[n * ld + width], &before[n * ld + width], static_cast<size_t>(ld - width) * sizeof(T)))
      return false;
  return true;
}

// The dense matrix m [rows, width] spread over rows of stride ld, with NaN in the padding.
template <class T>
std::vector<T> spread_nan(const std::vector<T>& m, int64_t rows, int64_t width, int64_t ld) {
  std::vector<T> r(static_cast<size_t>(rows * ld), std::numeric_limits<T>::quiet_NaN());
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j) r[n * ld + j] = m[n * width + j];
  return r;
}

template <class T>
void check_matmul_padded(std::mt19937_64& g, int64_t OC, int64_t ld) {
  SCOPED_TRACE("OC=" + std::to_string(OC) + " ld=" + std::to_string(ld));
  for (auto layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    auto inp = randn<T>(g, kN * kC), w = randn<T>(g, kC * OC), bias = randn<T>(g, OC);
    std::vector<T> dense(kN * OC);
    poison(dense);
    matmul_forward(dense.data(), inp.data(), w.data(), bias.data(), kN, kC, OC, layout);
    std::vector<T> out(static_cast<size_t>(kN * ld));
    poison(out);
    const auto before = out;
    matmul_forward(out.data(), inp.data(), w.data(), bias.data(), kN, kC, OC, layout, ld);
    ASSERT_TRUE(all_finite(dense));
    EXPECT_TRUE(bitwise_equal(valid_cols(out, kN, OC, ld), dense)) << "layout " << int(layout);
    EXPECT_TRUE(padding_unchanged(out, before, kN, OC, ld)) << "the forward wrote into the padding";

    // Backward: dout with NaN in its padding; every gradient equal to the dense call's and finite.
    const auto G = randn<T>(g, kN * OC);
    const auto Gp = spread_nan(G, kN, OC, ld);
    const auto R1 = randn<T>(g, kN * kC), R2 = randn<T>(g, kC * OC), R3 = randn<T>(g, OC);
    auto dinp = R1, dw = R2, db = R3, dinp_p = R1, dw_p = R2, db_p = R3;
    matmul_backward(dinp.data(), dw.data(), db.data(), G.data(), inp.data(), w.data(), kN, kC, OC, layout);
    matmul_backward(dinp_p.data(), dw_p.data(), db_p.data(), Gp.data(), inp.data(), w.data(), kN, kC, OC, layout,
                    ld);
    ASSERT_TRUE(all_finite(dinp_p) && all_finite(dw_p) && all_finite(db_p)) << "a padding NaN was read";
    EXPECT_TRUE(bitwise_equal(dinp_p, dinp));
    EXPECT_TRUE(bitwise_equal(dw_p, dw));
    EXPECT_TRUE(bitwise_equal(db_p, db));
  }
}

TEST(KernelMatmul, PaddedRowStrideEqualsDenseBitwiseAndLeavesThePadding) {
  std::mt19937_64 g(test_seed());
  // OC not a multiple of 64, ld = round_up(OC, 64) as the model pads; and an odd ld (the kernel takes any ld >= OC).
  for (auto [OC, ld] : {std::pair<int64_t, int64_t>{257, 320}, {1000, 1024}, {kOC, kOC + 3}}) {
    check_matmul_padded<float>(g, OC, ld);
    check_matmul_padded<double>(g, OC, ld);
  }
  std::vector<float> x(kN * kC), w(kC * kOC), o(kN * kOC);
  EXPECT_THROW(matmul_forward<float>(o.data(), x.data(), w.data(), nullptr, kN, kC, kOC, WeightLayout::InOut, kOC - 1),
               dpo::Error);
  EXPECT_THROW(matmul_backward<float>(nullptr, w.data(), nullptr, o.data(), x.data(), w.data(), kN, kC, kOC,
                                      WeightLayout::InOut, kOC - 1),
               dpo::Error);
}

// ============================================================================================== attention

constexpr int64_t kHS = kC / kNH;

// Sequence 0: two left-padding tokens; sequence 1: no padding; sequence 2: a padding hole at position 3.
std::vector<int32_t> test_keymask() {
  std::vector<int32_t> m(kB * kT, 1);
  m[0 * kT + 0] = m[0 * kT + 1] = 0;
  m[2 * kT + 3] = 0;
  return m;
}

int64_t qkv_at(int64_t b, int64_t t, int64_t part, int64_t h, int64_t i) {
  return (b * kT + t) * 3 * kC + part * kC + h * kHS + i;
}

TEST(KernelAttention, EqualKeysGiveMeanOfVisibleValues) {
  std::mt19937_64 g(test_seed());
  auto mask = test_keymask();
  auto qkv = randn<double>(g, kB * kT * 3 * kC);
  // Every key of a head is the same vector: all visible scores are equal and softmax is uniform.
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kNH; ++h)
      for (int64_t t = 1; t < kT; ++t)
        for (int64_t i = 0; i < kHS; ++i) qkv[qkv_at(b, t, 1, h, i)] = qkv[qkv_at(b, 0, 1, h, i)];
  std::vector<double> out(kB * kT * kC), att(kB * kNH * kT * kT);
  poison(out), poison(att);
  attention_forward(out.data(), att.data(), qkv.data(), mask.data(), kB, kT, kC, kNH);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kNH; ++h)
      for (int64_t t = 0; t < kT; ++t) {
        int count = 0;
        for (int64_t s = 0; s <= t; ++s) count += mask[b * kT + s] != 0;
        for (int64_t i = 0; i < kHS; ++i) {
          double ref = 0;
          for (int64_t s = 0; s <= t; ++s)
            if (mask[b * kT + s]) ref += qkv[qkv_at(b, s, 2, h, i)] / count;
          ASSERT_NEAR(out[(b * kT + t) * kC + h * kHS + i], count ? ref : 0.0, 1e-13)
              << "b=" << b << " h=" << h << " t=" << t << " i=" << i;
        }
        for (int64_t s = 0; s < kT; ++s) {
          const bool visible = s <= t && mask[b * kT + s];
          ASSERT_NEAR(att[((b * kNH + h) * kT + t) * kT + s], visible ? 1.0 / count : 0.0, 1e-15);
        }
      }
}

TEST(KernelAttention, MaskAndEmptyRows) {
  std::mt19937_64 g(test_seed());
  auto mask = test_keymask();
  auto qkv = randn<double>(g, kB * kT * 3 * kC);
  std::vector<double> out(kB * kT * kC), att(kB * kNH * kT * kT);
  poison(out), poison(att);
  attention_forward(out.data(), att.data(), qkv.data(), mask.data(), kB, kT, kC, kNH);
  ASSERT_TRUE(all_finite(out));
  ASSERT_TRUE(all_finite(att));
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kNH; ++h)
      for (int64_t t = 0; t < kT; ++t) {
        const double* row = &att[((b * kNH + h) * kT + t) * kT];
        bool any = false;
        double sum = 0;
        for (int64_t s = 0; s < kT; ++s) {
          const bool visible = s <= t && mask[b * kT + s];
          any |= visible;
          if (!visible) {
            EXPECT_EQ(row[s], 0.0) << "b=" << b << " h=" << h << " t=" << t << " s=" << s;
          }
          sum += row[s];
        }
        EXPECT_NEAR(sum, any ? 1.0 : 0.0, 1e-14) << "b=" << b << " h=" << h << " t=" << t;
        if (!any) {
          for (int64_t i = 0; i < kHS; ++i) EXPECT_EQ(out[(b * kT + t) * kC + h * kHS + i], 0.0);
        }
      }
  // Changing the keys and values of masked positions changes nothing (their queries are left alone).
  auto qkv2 = qkv;
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t t = 0; t < kT; ++t)
      if (!mask[b * kT + t])
        for (int64_t c = kC; c < 3 * kC; ++c) qkv2[(b * kT + t) * 3 * kC + c] += 10.0;
  std::vector<double> out2(out.size()), att2(att.size());
  attention_forward(out2.data(), att2.data(), qkv2.data(), mask.data(), kB, kT, kC, kNH);
  EXPECT_TRUE(bitwise_equal(out2, out));
  EXPECT_TRUE(bitwise_equal(att2, att));
  // Without the mask the same change does matter (the test above is not vacuous).
  std::vector<double> out3(out.size()), out4(out.size());
  attention_forward(out3.data(), att2.data(), qkv.data(), nullptr, kB, kT, kC, kNH);
  attention_forward(out4.data(), att2.data(), qkv2.data(), nullptr, kB, kT, kC, kNH);
  EXPECT_FALSE(bitwise_equal(out3, out4));
}

TEST(KernelAttention, IsCausal) {
  std::mt19937_64 g(test_seed());
  auto qkv = randn<double>(g, kB * kT * 3 * kC);
  std::vector<double> out(kB * kT * kC), att(kB * kNH * kT * kT), out2(out.size()), att2(att.size());
  attention_forward(out.data(), att.data(), qkv.data(), nullptr, kB, kT, kC, kNH);
  const int64_t b0 = 1, t0 = 4;
  for (int64_t c = 0; c < 3 * kC; ++c) qkv[(b0 * kT + t0) * 3 * kC + c] += 1.0;
  attention_forward(out2.data(), att2.data(), qkv.data(), nullptr, kB, kT, kC, kNH);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t t = 0; t < kT; ++t) {
      const bool affected = b == b0 && t >= t0;
      bool same = true;
      for (int64_t c = 0; c < kC; ++c) same &= out[(b * kT + t) * kC + c] == out2[(b * kT + t) * kC + c];
      // Earlier queries never read the later key/value; later queries must see the change.
      EXPECT_EQ(same, !affected) << "b=" << b << " t=" << t;
    }
}

TEST(KernelAttention, GradCheckWithPadding) {
  std::mt19937_64 g(test_seed());
  auto mask = test_keymask();
  auto qkv = randn<double>(g, kB * kT * 3 * kC), G = randn<double>(g, kB * kT * kC);
  std::vector<double> out(kB * kT * kC), att(kB * kNH * kT * kT);
  auto L = [&] {
    attention_forward(out.data(), att.data(), qkv.data(), mask.data(), kB, kT, kC, kNH);
    return dot(out, G);
  };
  L();
  AccGrad dqkv(g, qkv.size());
  attention_backward(dqkv.buf.data(), G.data(), qkv.data(), att.data(), kB, kT, kC, kNH);
  expect_grad(qkv, dqkv.grad(), L, "qkv");
  // Masked keys and values get exactly no gradient.
  auto grad = dqkv.grad();
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t t = 0; t < kT; ++t)
      if (!mask[b * kT + t]) {
        for (int64_t c = kC; c < 3 * kC; ++c) EXPECT_EQ(grad[(b * kT + t) * 3 * kC + c], 0.0);
      }
}

TEST(KernelAttention, FloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  auto mask = test_keymask();
  auto qkv = randn_f(g, kB * kT * 3 * kC), G = randn_f(g, kB * kT * kC);
  auto qkv_f = to_float(qkv), G_f = to_float(G);
  std::vector<double> out(kB * kT * kC), att(kB * kNH * kT * kT), dqkv(qkv.size(), 0.0);
  std::vector<float> out_f(out.size()), att_f(att.size()), dqkv_f(qkv.size(), 0.f);
  poison(out), poison(att), poison(out_f), poison(att_f);
  attention_forward(out.data(), att.data(), qkv.data(), mask.data(), kB, kT, kC, kNH);
  attention_forward(out_f.data(), att_f.data(), qkv_f.data(), mask.data(), kB, kT, kC, kNH);
  attention_backward(dqkv.data(), G.data(), qkv.data(), att.data(), kB, kT, kC, kNH);
  attention_backward(dqkv_f.data(), G_f.data(), qkv_f.data(), att_f.data(), kB, kT, kC, kNH);
  expect_float_close(out_f, out, "out");
  expect_float_close(att_f, att, "att");
  expect_float_close(dqkv_f, dqkv, "dqkv");
}

TEST(KernelAttention, BackwardIsBitwiseDeterministicAcrossThreadCounts) {
  std::mt19937_64 g(test_seed());
  const int64_t B = 2, T = 29, C = 40, NH = 4;
  std::vector<int32_t> mask(B * T, 1);
  for (int64_t t = 0; t < 5; ++t) mask[t] = 0;
  auto qkv = randn<float>(g, B * T * 3 * C), dout = randn<float>(g, B * T * C), R = randn<float>(g, qkv.size());
  std::vector<float> out(B * T * C), att(B * NH * T * T);
  attention_forward(out.data(), att.data(), qkv.data(), mask.data(), B, T, C, NH);
  auto run = [&](int threads) {
    ThreadCount tc(threads);
    auto dqkv = R;
    attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH);
    return dqkv;
  };
  auto ref = run(1);
  EXPECT_TRUE(bitwise_equal(run(1), ref));
  EXPECT_TRUE(bitwise_equal(run(3), ref));
  EXPECT_TRUE(bitwise_equal(run(3), ref));
}

// --- blocked attention (attention_tiled_*) against the reference -----------------------------------------------

// A case for the blocked attention: B = 3 rows of T tokens: row 0 left-padded (`left` leading padding tokens),
// row 1 right-padded (`right` trailing ones), row 2 with a one-token hole in the middle.
struct TiledCase {
  int64_t T, C, NH, left, right;
};
std::vector<int32_t> tiled_mask(const TiledCase& tc) {
  const int64_t B = 3, T = tc.T;
  std::vector<int32_t> m(static_cast<size_t>(B * T), 1);
  for (int64_t t = 0; t < tc.left; ++t) m[0 * T + t] = 0;
  for (int64_t t = T - tc.right; t < T; ++t) m[1 * T + t] = 0;
  m[2 * T + T / 2] = 0;
  return m;
}
// T = 7: inside one block and one key tile. T = 77: three query blocks of 32 and two key tiles of 64, none full.
// T = 130 with hs = 64 (GPT-2's head size): past two key tiles. No T is a multiple of 32 or 64.
const TiledCase kTiledCases[] = {{7, 12, 3, 2, 1}, {77, 128, 2, 5, 9}, {130, 192, 3, 33, 40}};

// Runs the reference in double and the blocked attention in T on the same (float-representable) inputs; returns the
// largest errors of out and of the gradient added to dqkv, relative to max(1, largest reference value).
template <class T>
void tiled_vs_reference(const TiledCase& tc, double out_tol, double grad_tol) {
  SCOPED_TRACE("T=" + std::to_string(tc.T) + " C=" + std::to_string(tc.C) + " NH=" + std::to_string(tc.NH));
  std::mt19937_64 g(test_seed());
  const int64_t B = 3, T_ = tc.T, C = tc.C, NH = tc.NH;
  const auto mask = tiled_mask(tc);
  const auto qkv = randn_f(g, B * T_ * 3 * C), dout = randn_f(g, B * T_ * C), R = randn_f(g, B * T_ * 3 * C);
  std::vector<double> ref_out(B * T_ * C), att(B * NH * T_ * T_), ref_dqkv = R;
  attention_forward(ref_out.data(), att.data(), qkv.data(), mask.data(), B, T_, C, NH);
  attention_backward(ref_dqkv.data(), dout.data(), qkv.data(), att.data(), B, T_, C, NH);

  const std::vector<T> qkv_t(qkv.begin(), qkv.end()), dout_t(dout.begin(), dout.end());
  std::vector<T> out(ref_out.size()), lse(B * NH * T_), dqkv(R.begin(), R.end());
  poison(out), poison(lse);
  attention_tiled_forward(out.data(), lse.data(), qkv_t.data(), mask.data(), B, T_, C, NH);
  attention_tiled_backward(dqkv.data(), dout_t.data(), qkv_t.data(), mask.data(), lse.data(), B, T_, C, NH);
  ASSERT_TRUE(all_finite(out));
  EXPECT_LT(max_rel_err({out.begin(), out.end()}, ref_out), out_tol) << "out";
  EXPECT_LT(max_rel_err(minus({dqkv.begin(), dqkv.end()}, R), minus(ref_dqkv, R)), grad_tol) << "dqkv";

  // lse against the reference probabilities: a visible key's probability is exp(score - lse); rows without a
  // visible key have lse = +inf and out exactly 0.
  const double scale = 1.0 / std::sqrt(static_cast<double>(C / NH));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < T_; ++t) {
        int64_t s_vis = -1;
        for (int64_t s = 0; s <= t; ++s)
          if (mask[b * T_ + s]) s_vis = s;
        const double l = static_cast<double>(lse[(b * NH + h) * T_ + t]);
        if (s_vis < 0) {
          ASSERT_EQ(l, std::numeric_limits<double>::infinity()) << "b=" << b << " h=" << h << " t=" << t;
          for (int64_t c = 0; c < C / NH; ++c) ASSERT_EQ(out[(b * T_ + t) * C + h * (C / NH) + c], T(0));
          continue;
        }
        double score = 0;
        for (int64_t c = 0; c < C / NH; ++c)
          score += qkv[(b * T_ + t) * 3 * C + h * (C / NH) + c] * qkv[(b * T_ + s_vis) * 3 * C + C + h * (C / NH) + c];
        const double p = att[((b * NH + h) * T_ + t) * T_ + s_vis];
        // |score * scale - lse| is at most ~10 here; 10 roundings of such values in float: 1e-5 absolute.
        ASSERT_NEAR(std::exp(score * scale - l), p, 1e-5 * std::max(p, 1e-3)) << "b=" << b << " h=" << h << " t=" << t;
      }
  // Masked keys and values get exactly no gradient.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t)
      if (!mask[b * T_ + t])
        for (int64_t c = C; c < 3 * C; ++c)
          ASSERT_EQ(dqkv[(b * T_ + t) * 3 * C + c], static_cast<T>(R[(b * T_ + t) * 3 * C + c])) << "b=" << b << " t=" << t;
}

// double: the two compute the same sums in different orders (blocked dot products, exp(x - max) / sum vs
// exp(x - lse)): ~T + hs roundings of 1.1e-16 on O(1)..O(10) values, measured <= 1e-14; asserted 1e-12.
// float: every score, probability and sum is rounded to float (6e-8) instead of double, and the backward sums up to
// T = 130 terms per gradient element in float: measured <= 2e-6 (out) and 4e-6 (dqkv); asserted 2e-5 (kFloatTol
// scaled by 2 for the longest sums), while a wrong term (a missing scale, a probability off by one key, a lost
// block) is an O(1e-2..1) error.
TEST(KernelAttentionTiled, MatchesReferenceInDouble) {
  for (const auto& tc : kTiledCases) tiled_vs_reference<double>(tc, 1e-12, 1e-12);
}
TEST(KernelAttentionTiled, FloatMatchesDoubleReference) {
  for (const auto& tc : kTiledCases) tiled_vs_reference<float>(tc, 2e-5, 2e-5);
}

// Finite differences in double through the blocked forward (the backward is checked against the derivative of the
// function it claims to differentiate, not only against the reference backward).
TEST(KernelAttentionTiled, GradCheckWithPadding) {
  std::mt19937_64 g(test_seed());
  auto mask = test_keymask();
  auto qkv = randn<double>(g, kB * kT * 3 * kC), G = randn<double>(g, kB * kT * kC);
  std::vector<double> out(kB * kT * kC), lse(kB * kNH * kT);
  auto L = [&] {
    attention_tiled_forward(out.data(), lse.data(), qkv.data(), mask.data(), kB, kT, kC, kNH);
    return dot(out, G);
  };
  L();
  AccGrad dqkv(g, qkv.size());
  attention_tiled_backward(dqkv.buf.data(), G.data(), qkv.data(), mask.data(), lse.data(), kB, kT, kC, kNH);
  expect_grad(qkv, dqkv.grad(), L, "qkv");
}

TEST(KernelAttentionTiled, BitwiseDeterministicAcrossThreadCountsAndAccumulates) {
  std::mt19937_64 g(test_seed());
  const TiledCase tc = kTiledCases[1];
  const int64_t B = 3, T_ = tc.T, C = tc.C, NH = tc.NH;
  const auto mask = tiled_mask(tc);
  auto qkv = randn<float>(g, B * T_ * 3 * C), dout = randn<float>(g, B * T_ * C);
  auto run = [&](int threads, int backward_calls) {
    ThreadCount tcount(threads);
    std::vector<float> out(B * T_ * C), lse(B * NH * T_), dqkv(qkv.size(), 0.f);
    poison(out), poison(lse);
    attention_tiled_forward(out.data(), lse.data(), qkv.data(), mask.data(), B, T_, C, NH);
    for (int k = 0; k < backward_calls; ++k)
      attention_tiled_backward(dqkv.data(), dout.data(), qkv.data(), mask.data(), lse.data(), B, T_, C, NH);
    out.insert(out.end(), lse.begin(), lse.end());
    out.insert(out.end(), dqkv.begin(), dqkv.end());
    return out;
  };
  const auto ref = run(1, 1);
  EXPECT_TRUE(bitwise_equal(run(2, 1), ref));
  EXPECT_TRUE(bitwise_equal(run(3, 1), ref));
  // A second backward into the same dqkv (from 0) adds the same gradient again: exactly twice (x + x is exact).
  const auto twice = run(2, 2);
  const size_t n_fwd = static_cast<size_t>(B * T_ * C + B * NH * T_);
  for (size_t i = n_fwd; i < ref.size(); ++i) ASSERT_EQ(twice[i], 2.0f * ref[i]) << "i=" << i - n_fwd;
}

// ============================================================================================== gelu

long double gelu_ref(long double x) {
  const long double a = std::sqrt(2.0L / 3.14159265358979323846264338327950288L);
  return 0.5L * x * (1.0L + std::tanh(a * (x + 0.044715L * x * x * x)));
}

template <class T>
void check_gelu_points() {
  std::vector<T> x = {T(0), T(10), T(-10), T(-3), T(-1), T(-0.5), T(0.1), T(0.7), T(1), T(2.5), T(6)};
  std::vector<T> y(x.size());
  poison(y);
  gelu_forward(y.data(), x.data(), static_cast<int64_t>(x.size()));
  EXPECT_EQ(y[0], T(0));
  EXPECT_EQ(y[1], T(10));              // tanh saturates to 1: gelu(x) = x
  EXPECT_LE(std::fabs(y[2]), T(1e-30));  // and to -1: gelu(x) = 0
  // 0.5 x (1 + tanh u): tanh has an O(eps) absolute error, multiplied by |x|/2; allow 8 eps |x|.
  const double eps = std::numeric_limits<T>::epsilon();
  for (size_t i = 0; i < x.size(); ++i)
    EXPECT_NEAR(static_cast<double>(y[i]), static_cast<double>(gelu_ref(x[i])),
                8 * eps * std::max(1.0, std::fabs(static_cast<double>(x[i]))))
        << "x=" << x[i];
}

TEST(KernelGelu, KnownPoints) {
  check_gelu_points<float>();
  check_gelu_points<double>();
}

TEST(KernelGelu, GradCheck) {
  std::mt19937_64 g(test_seed());
  const int64_t N = kB * kT * kC;
  auto inp = randn<double>(g, N, 2.0), G = randn<double>(g, N);
  std::vector<double> out(N);
  auto L = [&] {
    gelu_forward(out.data(), inp.data(), N);
    return dot(out, G);
  };
  AccGrad dinp(g, N);
  gelu_backward(dinp.buf.data(), G.data(), inp.data(), N);
  expect_grad(inp, dinp.grad(), L, "inp");
}

TEST(KernelGelu, FloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  const int64_t N = kB * kT * kC;
  auto inp = randn_f(g, N, 2.0), G = randn_f(g, N);
  auto inp_f = to_float(inp), G_f = to_float(G);
  std::vector<double> out(N), dinp(N, 0.0);
  std::vector<float> out_f(N), dinp_f(N, 0.f);
  poison(out), poison(out_f);
  gelu_forward(out.data(), inp.data(), N);
  gelu_forward(out_f.data(), inp_f.data(), N);
  gelu_backward(dinp.data(), G.data(), inp.data(), N);
  gelu_backward(dinp_f.data(), G_f.data(), inp_f.data(), N);
  expect_float_close(out_f, out, "out");
  expect_float_close(dinp_f, dinp, "dinp");
}

// The float kernels evaluate gelu(x) = x sigmoid(2u) with their own vectorisable exp (kernels/gelu_cpu.cpp). The
// reference is the same closed form in long double, with sigmoid(2u) and 1 - sigmoid(2u) each taken without a
// subtraction, so it stays accurate where 1 + tanh(u) cancels (x < -3); CloseFormMatchesTanhForm ties it to the
// tanh definition. gelu' = s + 2 a x (1 + 3 k x^2) s (1 - s), s = sigmoid(2u).
struct GeluRef {
  long double y, g, g_mag, u;  // gelu, gelu', the size of gelu''s two terms, u = a (x + k x^3)
};
GeluRef gelu_closed(long double x) {
  const long double a = std::sqrt(2.0L / 3.14159265358979323846264338327950288L), k = 0.044715L;
  const long double u = a * (x + k * x * x * x);
  const long double s = 1.0L / (1.0L + std::exp(-2.0L * u)), c = 1.0L / (1.0L + std::exp(2.0L * u));
  const long double t = 2.0L * a * x * (1.0L + 3.0L * k * x * x) * s * c;
  return {x * s, s + t, s + std::fabs(t), u};
}

TEST(KernelGelu, ClosedFormMatchesTanhForm) {
  for (long double x = -3.0L; x <= 8.0L; x += 0.01L)
    EXPECT_NEAR(static_cast<double>(gelu_closed(x).y), static_cast<double>(gelu_ref(x)), 1e-15) << "x=" << x;
}

// Error budget of the float kernels: u carries a few float roundings (relative error d ~ 2 eps) and exp turns a
// relative error d of its argument 2u into 2|u| d, plus a few roundings of the final products: the error is at
// most ~eps (1 + 2|u|) times the size of the result's terms. Measured over ~1e8 points (every 61st float bit
// pattern and a dense grid on [-16, 16], docs/perf/2026-12-06-small/gelu_error.txt) the worst ratio is below 2.3;
// 4 leaves margin while a wrong constant or term is off by orders of magnitude. Subnormal results are compared
// on the scale of FLT_MIN.
void expect_gelu_float_close(const std::vector<float>& x, const std::vector<float>& y, const std::vector<float>& dx,
                             const std::vector<float>& dy, const std::vector<float>& dx0) {
  const double eps = std::numeric_limits<float>::epsilon(), fmin = std::numeric_limits<float>::min();
  for (size_t i = 0; i < x.size(); ++i) {
    const GeluRef r = gelu_closed(x[i]);
    const double budget = 4 * eps * (1 + 2 * std::fabs(static_cast<double>(r.u)));
    ASSERT_TRUE(std::isfinite(y[i]) && std::isfinite(dx[i])) << "x=" << x[i];
    EXPECT_NEAR(y[i], static_cast<double>(r.y), budget * std::max(std::fabs(static_cast<double>(r.y)), fmin))
        << "x=" << x[i];
    // dx = dx0 + dy * gelu': one more rounding in the product and one in the sum.
    const double g = static_cast<double>(r.g) * dy[i];
    const double mag = static_cast<double>(r.g_mag) * std::fabs(dy[i]);
    EXPECT_NEAR(dx[i], dx0[i] + g, budget * std::max(mag, fmin) + 2 * eps * std::fabs(dx0[i] + g)) << "x=" << x[i];
  }
}

TEST(KernelGelu, FloatMatchesClosedForm) {
  std::mt19937_64 g(test_seed());
  // Real activations (randn * 3), the whole range where the exp matters ([-14, 14]) and edge values, in a length
  // that is not a multiple of the vector width; and a large array so that the threaded path runs too.
  std::vector<float> x;
  std::normal_distribution<float> nd(0.f, 3.f);
  std::uniform_real_distribution<float> ud(-14.f, 14.f);
  for (int i = 0; i < 40001; ++i) x.push_back(i % 2 ? nd(g) : ud(g));
  const float fmax = std::numeric_limits<float>::max(), fmin = std::numeric_limits<float>::min(),
              fden = std::numeric_limits<float>::denorm_min();
  // 10.061: 2u = log(FLT_MAX), where exp(2u) would overflow; 10.680: exp(-2u) = 2^-150, the end of the
  // subnormals; 7e12: x^3 overflows.
  for (float e : {0.0f, -0.0f, fden, -fden, fmin, -fmin, 1e-30f, -1e-30f, 1e-7f, -1e-7f, -0.7525f, 10.0f, -10.0f,
                  10.061f, -10.061f, 10.6802f, -10.6802f, 10.6813f, -10.6813f, 12.0f, -12.0f, 32.0f, -32.0f, 33.0f,
                  -33.0f, 1e4f, -1e4f, 6.9e12f, -6.9e12f, 7e12f, -7e12f, 1e30f, -1e30f, fmax, -fmax})
    x.push_back(e);
  const int64_t N = static_cast<int64_t>(x.size());
  std::vector<float> y(N), dy = randn<float>(g, N), dx0 = randn<float>(g, N);
  poison(y);
  gelu_forward(y.data(), x.data(), N);
  std::vector<float> dx = dx0;
  gelu_backward(dx.data(), dy.data(), x.data(), N);
  expect_gelu_float_close(x, y, dx, dy, dx0);
}

TEST(KernelGelu, FloatExactLimits) {
  // The float kernel's limits are exact: gelu(x) = x and gelu'(x) = 1 once gelu' - 1 ~ 2 a x (1 + 3 k x^2) e^-2u
  // is below half an ulp of 1 (x > ~6.5), gelu(x) = -0 and gelu'(x) = 0 once exp(-2u) underflows (x < -10.69).
  const float fmax = std::numeric_limits<float>::max();
  std::vector<float> x = {7.0f, 10.0f, 12.0f, 1e4f, 7e12f, 1e30f, fmax, -10.7f, -12.0f, -1e4f, -7e12f, -1e30f, -fmax};
  const int64_t N = static_cast<int64_t>(x.size());
  std::vector<float> y(N), one(N, 1.0f), dx(N, 0.0f);
  poison(y);
  gelu_forward(y.data(), x.data(), N);
  gelu_backward(dx.data(), one.data(), x.data(), N);
  for (int64_t i = 0; i < N; ++i) {
    if (x[i] > 0) {
      EXPECT_EQ(y[i], x[i]) << "x=" << x[i];
      EXPECT_EQ(dx[i], 1.0f) << "x=" << x[i];
    } else {
      EXPECT_EQ(y[i], 0.0f) << "x=" << x[i];
      EXPECT_TRUE(std::signbit(y[i])) << "x=" << x[i];
      EXPECT_EQ(dx[i], 0.0f) << "x=" << x[i];
    }
  }
}

TEST(KernelGelu, FloatThreadCountInvariant) {
  // Element-wise: the result may not depend on how the loop is split over threads or vector lanes.
  std::mt19937_64 g(test_seed());
  const int64_t N = 70001;
  auto x = randn<float>(g, N, 4.0), dy = randn<float>(g, N);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> y(N), dx(N, 0.0f);
    gelu_forward(y.data(), x.data(), N);
    gelu_backward(dx.data(), dy.data(), x.data(), N);
    y.insert(y.end(), dx.begin(), dx.end());
    return y;
  };
  const int saved = omp_get_max_threads();
  const auto ref = run(1);
  EXPECT_TRUE(bitwise_equal(run(3), ref));
  omp_set_num_threads(saved);
  // and the single-element calls (scalar tail of the vector loop) agree with the array call
  for (int64_t i = 0; i < 37; ++i) {
    float y1, dx1 = 0.0f;
    gelu_forward(&y1, &x[i], 1);
    gelu_backward(&dx1, &dy[i], &x[i], 1);
    EXPECT_EQ(std::memcmp(&y1, &ref[i], 4), 0) << "i=" << i;
    EXPECT_EQ(std::memcmp(&dx1, &ref[N + i], 4), 0) << "i=" << i;
  }
}

// ============================================================================================== residual

template <class T>
void check_residual_forward(std::mt19937_64& g) {
  const int64_t N = kN * kC;
  auto a = randn<T>(g, N), b = randn<T>(g, N);
  std::vector<T> ref(N), out(N);
  for (int64_t i = 0; i < N; ++i) ref[i] = a[i] + b[i];
  poison(out);
  residual_forward(out.data(), a.data(), b.data(), N);
  EXPECT_TRUE(bitwise_equal(out, ref));
  auto a2 = a, b2 = b;
  residual_forward(a2.data(), a2.data(), b.data(), N);  // out aliases a
  residual_forward(b2.data(), a.data(), b2.data(), N);  // out aliases b
  EXPECT_TRUE(bitwise_equal(a2, ref));
  EXPECT_TRUE(bitwise_equal(b2, ref));
}

TEST(KernelResidual, ForwardAllowsAliasing) {
  std::mt19937_64 g(test_seed());
  check_residual_forward<float>(g);
  check_residual_forward<double>(g);
}

TEST(KernelResidual, GradCheckAndFloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  const int64_t N = kN * kC;
  auto a = randn<double>(g, N), b = randn<double>(g, N), G = randn<double>(g, N);
  std::vector<double> out(N);
  auto L = [&] {
    residual_forward(out.data(), a.data(), b.data(), N);
    return dot(out, G);
  };
  AccGrad da(g, N), db(g, N);
  residual_backward(da.buf.data(), db.buf.data(), G.data(), N);
  expect_grad(a, da.grad(), L, "a");
  expect_grad(b, db.grad(), L, "b");

  auto a_f = to_float(a), b_f = to_float(b), G_f = to_float(G);
  std::vector<float> out_f(N), da_f = to_float(da.R), db_f = to_float(db.R);
  poison(out_f);
  residual_forward(out_f.data(), a_f.data(), b_f.data(), N);
  residual_backward(da_f.data(), db_f.data(), G_f.data(), N);
  residual_forward(out.data(), a.data(), b.data(), N);
  expect_float_close(out_f, out, "out");
  expect_float_close(da_f, da.buf, "da");
  expect_float_close(db_f, db.buf, "db");
}

// ============================================================================================== logprob

// Weights with zeros (prompt / padding) and non-1 values; targets at weight-0 positions are garbage (-1).
template <class T>
void logprob_inputs(std::mt19937_64& g, std::vector<int32_t>& targets, std::vector<T>& weights) {
  targets = random_tokens(g, kB * kT, 0, kV);
  weights.assign(kB * kT, T(1));
  const double choices[] = {0.0, 1.0, 0.5, 2.0, -0.75};
  std::uniform_int_distribution<int> pick(0, 4);
  for (auto& w : weights) w = static_cast<T>(choices[pick(g)]);
  weights[0] = weights[1] = T(0);  // sequence 0 starts with a prompt
  weights[2] = T(1);
  targets[0] = -1;
  targets[1] = static_cast<int32_t>(kV + 3);
  for (int64_t t = 0; t < kT; ++t) weights[1 * kT + t] = t < 3 ? T(0) : T(1);  // sequence 1: 0/1 mask
}

template <class T>
void check_logprob_uniform(std::mt19937_64& g, double tol) {
  std::vector<int32_t> targets;
  std::vector<T> weights;
  logprob_inputs(g, targets, weights);
  std::vector<T> logits(kB * kT * kV);
  std::normal_distribution<double> nd(0.0, 5.0);
  for (int64_t i = 0; i < kB * kT; ++i) {
    const T c = static_cast<T>(nd(g));
    for (int64_t v = 0; v < kV; ++v) logits[i * kV + v] = c;
  }
  std::vector<T> seq(kB), tok(kB * kT), seq2(kB);
  poison(seq), poison(tok), poison(seq2);
  logprob_forward(seq.data(), tok.data(), logits.data(), targets.data(), weights.data(), kB, kT, kV);
  logprob_forward<T>(seq2.data(), nullptr, logits.data(), targets.data(), weights.data(), kB, kT, kV);
  const double lp = -std::log(static_cast<double>(kV));
  for (int64_t b = 0; b < kB; ++b) {
    double wsum = 0;
    for (int64_t t = 0; t < kT; ++t) {
      wsum += weights[b * kT + t];
      EXPECT_NEAR(tok[b * kT + t], weights[b * kT + t] != T(0) ? lp : 0.0, tol);
    }
    EXPECT_NEAR(seq[b], wsum * lp, tol * kT);
    EXPECT_EQ(seq2[b], seq[b]);
  }
}

TEST(KernelLogprob, UniformLogitsGiveMinusLogV) {
  std::mt19937_64 g(test_seed());
  // Logits up to ~20 in magnitude, rounded to T: a few eps of T times 20.
  check_logprob_uniform<float>(g, 1e-5);
  check_logprob_uniform<double>(g, 1e-13);
}

template <class T>
void check_logprob_reference(std::mt19937_64& g, double tol) {
  std::vector<int32_t> targets;
  std::vector<T> weights;
  logprob_inputs(g, targets, weights);
  auto logits = randn<T>(g, kB * kT * kV, 3.0);
  // A dominant logit: exp(1000) overflows even in double, so the log-sum-exp must shift by the row max.
  logits[5 * kV + 7] = T(1000);
  weights[5] = T(1);
  std::vector<T> seq(kB), tok(kB * kT);
  poison(seq), poison(tok);
  logprob_forward(seq.data(), tok.data(), logits.data(), targets.data(), weights.data(), kB, kT, kV);
  for (int64_t b = 0; b < kB; ++b) {
    long double sref = 0;
    for (int64_t t = 0; t < kT; ++t) {
      const int64_t i = b * kT + t;
      long double lp = 0;
      if (weights[i] != T(0)) {
        long double z = 0;
        for (int64_t v = 0; v < kV; ++v) z += std::exp(static_cast<long double>(logits[i * kV + v]));
        lp = logits[i * kV + targets[i]] - std::log(z);
      }
      sref += weights[i] * lp;
      EXPECT_NEAR(tok[i], static_cast<double>(lp), tol * std::max(1.0L, std::fabs(lp))) << "b=" << b << " t=" << t;
    }
    EXPECT_NEAR(seq[b], static_cast<double>(sref), tol * std::max(1.0L, std::fabs(sref)) * kT) << "b=" << b;
  }
}

TEST(KernelLogprob, ForwardMatchesLongDoubleReference) {
  std::mt19937_64 g(test_seed());
  check_logprob_reference<float>(g, 1e-6);
  check_logprob_reference<double>(g, 1e-13);
}

TEST(KernelLogprob, GradCheck) {
  std::mt19937_64 g(test_seed());
  std::vector<int32_t> targets;
  std::vector<double> weights;
  logprob_inputs(g, targets, weights);
  auto logits = randn<double>(g, kB * kT * kV, 2.0), dseq = randn<double>(g, kB);
  std::vector<double> seq(kB);
  auto L = [&] {
    logprob_forward<double>(seq.data(), nullptr, logits.data(), targets.data(), weights.data(), kB, kT, kV);
    return dot(seq, dseq);
  };
  std::vector<double> dlogits(logits.size());
  poison(dlogits);  // (=) semantics: every element must be written
  logprob_backward(dlogits.data(), logits.data(), targets.data(), weights.data(), dseq.data(), kB, kT, kV);
  ASSERT_TRUE(all_finite(dlogits));
  expect_grad(logits, dlogits, L, "logits");
  for (int64_t i = 0; i < kB * kT; ++i)
    if (weights[i] == 0.0) {
      for (int64_t v = 0; v < kV; ++v) EXPECT_EQ(dlogits[i * kV + v], 0.0) << "row " << i;
    }
}

TEST(KernelLogprob, BackwardInPlace) {
  std::mt19937_64 g(test_seed());
  std::vector<int32_t> targets;
  std::vector<float> weights;
  logprob_inputs(g, targets, weights);
  auto logits = randn<float>(g, kB * kT * kV, 2.0), dseq = randn<float>(g, kB);
  std::vector<float> dlogits(logits.size());
  poison(dlogits);
  logprob_backward(dlogits.data(), logits.data(), targets.data(), weights.data(), dseq.data(), kB, kT, kV);
  auto inplace = logits;
  logprob_backward(inplace.data(), inplace.data(), targets.data(), weights.data(), dseq.data(), kB, kT, kV);
  EXPECT_TRUE(bitwise_equal(inplace, dlogits));
}

TEST(KernelLogprob, OutOfRangeTargetThrowsBeforeWriting) {
  std::mt19937_64 g(test_seed());
  std::vector<int32_t> targets;
  std::vector<double> weights;
  logprob_inputs(g, targets, weights);
  auto logits = randn<double>(g, kB * kT * kV), dseq = randn<double>(g, kB);
  const int64_t b0 = 2, t0 = 4;
  weights[b0 * kT + t0] = 0.5;
  for (int32_t bad : {static_cast<int32_t>(kV), static_cast<int32_t>(kV + 5), -1}) {
    SCOPED_TRACE("target " + std::to_string(bad));
    auto tg = targets;
    tg[b0 * kT + t0] = bad;
    const std::vector<double> seq0 = randn<double>(g, kB), tok0 = randn<double>(g, kB * kT);
    auto seq = seq0, tok = tok0, dlogits = logits;
    try {
      logprob_forward(seq.data(), tok.data(), logits.data(), tg.data(), weights.data(), kB, kT, kV);
      ADD_FAILURE() << "logprob_forward did not throw";
    } catch (const dpo::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("b=2"), std::string::npos) << msg;
      EXPECT_NE(msg.find("t=4"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
      EXPECT_NE(msg.find("V=37"), std::string::npos) << msg;
    }
    EXPECT_TRUE(bitwise_equal(seq, seq0));
    EXPECT_TRUE(bitwise_equal(tok, tok0));
    EXPECT_THROW(
        logprob_backward(dlogits.data(), logits.data(), tg.data(), weights.data(), dseq.data(), kB, kT, kV),
        dpo::Error);
    EXPECT_TRUE(bitwise_equal(dlogits, logits));
  }
}

TEST(KernelLogprob, IgnoredTargetsMayBeOutOfRange) {
  std::mt19937_64 g(test_seed());
  std::vector<int32_t> targets;
  std::vector<double> weights;
  logprob_inputs(g, targets, weights);
  auto logits = randn<double>(g, kB * kT * kV), dseq = randn<double>(g, kB);
  // Same batch with the ignored targets replaced by valid ones: results must not change.
  auto valid = targets;
  int n_bad = 0;
  for (int64_t i = 0; i < kB * kT; ++i)
    if (weights[i] == 0.0) {
      n_bad += targets[i] < 0 || targets[i] >= kV;
      valid[i] = 3;
    }
  ASSERT_GE(n_bad, 2);
  std::vector<double> seq(kB), tok(kB * kT), seq2(kB), tok2(kB * kT), d(logits.size()), d2(logits.size());
  poison(seq), poison(tok), poison(d);
  ASSERT_NO_THROW(logprob_forward(seq.data(), tok.data(), logits.data(), targets.data(), weights.data(), kB, kT, kV));
  ASSERT_NO_THROW(
      logprob_backward(d.data(), logits.data(), targets.data(), weights.data(), dseq.data(), kB, kT, kV));
  logprob_forward(seq2.data(), tok2.data(), logits.data(), valid.data(), weights.data(), kB, kT, kV);
  logprob_backward(d2.data(), logits.data(), valid.data(), weights.data(), dseq.data(), kB, kT, kV);
  EXPECT_TRUE(bitwise_equal(seq, seq2));
  EXPECT_TRUE(bitwise_equal(tok, tok2));
  EXPECT_TRUE(bitwise_equal(d, d2));
  for (int64_t i = 0; i < kB * kT; ++i)
    if (weights[i] == 0.0) {
      EXPECT_EQ(tok[i], 0.0);
    }
}

TEST(KernelLogprob, FloatMatchesDouble) {
  std::mt19937_64 g(test_seed());
  std::vector<int32_t> targets;
  std::vector<double> weights;
  logprob_inputs(g, targets, weights);
  auto logits = randn_f(g, kB * kT * kV, 3.0), dseq = randn_f(g, kB);
  auto logits_f = to_float(logits), dseq_f = to_float(dseq), weights_f = to_float(weights);
  std::vector<double> seq(kB), tok(kB * kT), d(logits.size());
  std::vector<float> seq_f(kB), tok_f(kB * kT), d_f(logits.size());
  poison(seq), poison(tok), poison(d), poison(seq_f), poison(tok_f), poison(d_f);
  logprob_forward(seq.data(), tok.data(), logits.data(), targets.data(), weights.data(), kB, kT, kV);
  logprob_forward(seq_f.data(), tok_f.data(), logits_f.data(), targets.data(), weights_f.data(), kB, kT, kV);
  logprob_backward(d.data(), logits.data(), targets.data(), weights.data(), dseq.data(), kB, kT, kV);
  logprob_backward(d_f.data(), logits_f.data(), targets.data(), weights_f.data(), dseq_f.data(), kB, kT, kV);
  expect_float_close(seq_f, seq, "seq_logp");
  expect_float_close(tok_f, tok, "token_logp");
  expect_float_close(d_f, d, "dlogits");
}

// ---------------------------------------------------------------------------- padded logits rows (ld > V)

template <class T>
void check_logprob_padded(std::mt19937_64& g, int64_t V, int64_t ld) {
  SCOPED_TRACE("V=" + std::to_string(V) + " ld=" + std::to_string(ld));
  std::vector<int32_t> targets = random_tokens(g, kB * kT, 0, static_cast<int32_t>(V));
  std::vector<T> weights;
  {
    std::vector<int32_t> unused;
    logprob_inputs(g, unused, weights);  // the zero / fractional / negative weight pattern
  }
  targets[0] = -1;  // ignored (weight 0)
  const auto logits = randn<T>(g, kB * kT * V, 3.0), dseq = randn<T>(g, kB);
  const auto padded = spread_nan(logits, kB * kT, V, ld);
  std::vector<T> seq(kB), tok(kB * kT), seq_p(kB), tok_p(kB * kT);
  poison(seq), poison(tok), poison(seq_p), poison(tok_p);
  logprob_forward(seq.data(), tok.data(), logits.data(), targets.data(), weights.data(), kB, kT, V);
  logprob_forward(seq_p.data(), tok_p.data(), padded.data(), targets.data(), weights.data(), kB, kT, V, ld);
  ASSERT_TRUE(all_finite(seq_p) && all_finite(tok_p)) << "a padding NaN entered the log-sum-exp";
  EXPECT_TRUE(bitwise_equal(seq_p, seq));
  EXPECT_TRUE(bitwise_equal(tok_p, tok));

  std::vector<T> d(logits.size());
  poison(d);
  logprob_backward(d.data(), logits.data(), targets.data(), weights.data(), dseq.data(), kB, kT, V);
  std::vector<T> d_p(padded.size());
  poison(d_p);
  const auto before = d_p;
  logprob_backward(d_p.data(), padded.data(), targets.data(), weights.data(), dseq.data(), kB, kT, V, ld);
  const auto valid = valid_cols(d_p, kB * kT, V, ld);
  ASSERT_TRUE(all_finite(valid));
  EXPECT_TRUE(bitwise_equal(valid, d));
  EXPECT_TRUE(padding_unchanged(d_p, before, kB * kT, V, ld)) << "the backward wrote into the padding";
  // In place, as the model runs it.
  auto inplace = padded;
  logprob_backward(inplace.data(), inplace.data(), targets.data(), weights.data(), dseq.data(), kB, kT, V, ld);
  EXPECT_TRUE(bitwise_equal(valid_cols(inplace, kB * kT, V, ld), d));
  EXPECT_TRUE(padding_unchanged(inplace, padded, kB * kT, V, ld));
}

TEST(KernelLogprob, PaddedRowStrideEqualsDenseBitwiseAndNeverTouchesThePadding) {
  std::mt19937_64 g(test_seed());
  for (auto [V, ld] : {std::pair<int64_t, int64_t>{257, 320}, {1000, 1024}, {kV, kV + 5}}) {
    check_logprob_padded<float>(g, V, ld);
    check_logprob_padded<double>(g, V, ld);
  }
  std::vector<float> x(kB * kT * kV), w(kB * kT, 1.f), s(kB);
  std::vector<int32_t> tg(kB * kT, 0);
  EXPECT_THROW(logprob_forward<float>(s.data(), nullptr, x.data(), tg.data(), w.data(), kB, kT, kV, kV - 1),
               dpo::Error);
  EXPECT_THROW(logprob_backward(x.data(), x.data(), tg.data(), w.data(), s.data(), kB, kT, kV, kV - 1), dpo::Error);
}

// ----------------------------------------------------------- per-sequence statistics (kernels/seq_stats.h)

// Closed form in long double: the weighted log-prob sum, the count of positions with a non-zero weight, and the
// sum of the V logits of those positions. Rows of the padded input (stride ld) hold NaN beyond V, which must
// never be read; positions with weight 0 hold garbage targets (-1, V + 3) that must be ignored.
template <class T>
void check_logprob_stats(std::mt19937_64& g, int64_t V, int64_t ld, double tol) {
  SCOPED_TRACE("V=" + std::to_string(V) + " ld=" + std::to_string(ld));
  std::vector<int32_t> targets = random_tokens(g, kB * kT, 0, static_cast<int32_t>(V));
  std::vector<T> weights;
  {
    std::vector<int32_t> unused;
    logprob_inputs(g, unused, weights);  // zeros, fractional and negative weights; sequence 1 a 0/1 mask
  }
  targets[0] = -1, targets[1] = static_cast<int32_t>(V + 3);  // weight 0 there
  // Logits with a non-zero mean per row (an LM head's logits are far from centred), so a sum that dropped or
  // doubled a row, or read a padding column, is off by much more than the tolerance.
  auto logits = randn<T>(g, kB * kT * V, 3.0);
  std::normal_distribution<double> shift(-20.0, 10.0);
  for (int64_t i = 0; i < kB * kT; ++i) {
    const double c = shift(g);
    for (int64_t v = 0; v < V; ++v) logits[i * V + v] = static_cast<T>(logits[i * V + v] + c);
  }
  const auto padded = spread_nan(logits, kB * kT, V, ld);
  std::vector<T> seq(kB), stats(kB * dpo::kSeqStatsWidth), seq_plain(kB);
  poison(seq), poison(stats), poison(seq_plain);
  logprob_forward<T>(seq.data(), nullptr, stats.data(), padded.data(), targets.data(), weights.data(), kB, kT, V, ld);
  logprob_forward<T>(seq_plain.data(), nullptr, padded.data(), targets.data(), weights.data(), kB, kT, V, ld);
  ASSERT_TRUE(all_finite(stats)) << "a padding NaN or an ignored row entered the statistics";
  EXPECT_TRUE(bitwise_equal(seq, seq_plain)) << "asking for the statistics changed seq_logp";
  for (int64_t b = 0; b < kB; ++b) {
    long double lp_ref = 0, sum_ref = 0, abs_sum = 0;
    int64_t n_ref = 0;
    for (int64_t t = 0; t < kT; ++t) {
      const int64_t i = b * kT + t;
      if (weights[i] == T(0)) continue;
      long double z = 0, m = -INFINITY;
      for (int64_t v = 0; v < V; ++v) m = std::max<long double>(m, logits[i * V + v]);
      for (int64_t v = 0; v < V; ++v) {
        z += std::exp(static_cast<long double>(logits[i * V + v]) - m);
        sum_ref += logits[i * V + v];
        abs_sum += std::fabs(static_cast<long double>(logits[i * V + v]));
      }
      lp_ref += weights[i] * (logits[i * V + targets[i]] - m - std::log(z));
      ++n_ref;
    }
    const T* st = stats.data() + b * dpo::kSeqStatsWidth;
    SCOPED_TRACE("b=" + std::to_string(b));
    EXPECT_EQ(std::memcmp(&st[dpo::kSeqLogp], &seq[b], sizeof(T)), 0) << "kSeqLogp is not seq_logp bitwise";
    EXPECT_EQ(st[dpo::kSeqTokens], static_cast<T>(n_ref));
    // The sum is accumulated in double and rounded once to T: tol relative to the result, plus double's rounding
    // of the running sum relative to the sum of magnitudes.
    EXPECT_NEAR(st[dpo::kSeqLogitSum], static_cast<double>(sum_ref),
                tol * std::fabs(static_cast<double>(sum_ref)) + 1e-13 * static_cast<double>(abs_sum));
    EXPECT_NEAR(st[dpo::kSeqLogp], static_cast<double>(lp_ref),
                tol * std::max(1.0L, std::fabs(lp_ref)) * kT);
  }
  // The dense layout gives the same statistics bitwise (the padding is never read).
  std::vector<T> stats_dense(stats.size()), seq_dense(kB);
  poison(stats_dense);
  logprob_forward<T>(seq_dense.data(), nullptr, stats_dense.data(), logits.data(), targets.data(), weights.data(), kB,
                     kT, V, V);
  EXPECT_TRUE(bitwise_equal(stats_dense, stats));
}

TEST(KernelLogprob, SequenceStatsMatchLongDoubleClosedForm) {
  std::mt19937_64 g(test_seed());
  // float: one rounding of a double result (eps_f = 6e-8) and the log-sum-exp's float input; double: ~1e-16 per
  // operation over at most kT * V = 7000 terms.
  for (auto [V, ld] : {std::pair<int64_t, int64_t>{kV, kV}, {kV, kV + 5}, {257, 320}, {1000, 1024}}) {
    check_logprob_stats<float>(g, V, ld, 1e-6);
    check_logprob_stats<double>(g, V, ld, 1e-13);
  }
}

TEST(KernelLogprob, SequenceStatsOfASequenceWithoutCompletionAreZero) {
  std::mt19937_64 g(test_seed());
  auto logits = randn<double>(g, kB * kT * kV, 3.0);
  std::vector<double> weights(kB * kT, 1.0), seq(kB), stats(kB * dpo::kSeqStatsWidth);
  std::vector<int32_t> targets = random_tokens(g, kB * kT, 0, kV);
  for (int64_t t = 0; t < kT; ++t) weights[1 * kT + t] = 0.0, targets[1 * kT + t] = -1;  // sequence 1: all prompt
  poison(seq), poison(stats);
  logprob_forward<double>(seq.data(), nullptr, stats.data(), logits.data(), targets.data(), weights.data(), kB, kT,
                          kV, kV);
  for (int64_t k = 0; k < dpo::kSeqStatsWidth; ++k) EXPECT_EQ(stats[1 * dpo::kSeqStatsWidth + k], 0.0) << k;
  EXPECT_EQ(stats[0 * dpo::kSeqStatsWidth + dpo::kSeqTokens], static_cast<double>(kT));
  EXPECT_EQ(stats[2 * dpo::kSeqStatsWidth + dpo::kSeqTokens], static_cast<double>(kT));
}

// ------------------------------------------------- the LM head through the CPU backend, padded vs dense, per dtype
// logits = lnf @ wte^T, log-probs, their backward in place, and the two backward GEMMs, once with dense [B,T,V]
// logits and once with [B,T,ldv] logits poisoned with NaN, in F32, F64 and BF16 (the CPU's BF16 emulation: F32
// kernels on F32 copies, each BF16 output rounded once). The arithmetic on the valid columns is the same in both
// runs, so every result must be bitwise equal; the padding must keep its NaN bits through forward and backward.

// A host tensor of `dtype` holding v (rounded once when dtype is narrower than double).
dpo::Tensor host_as(const std::vector<double>& v, dpo::Shape shape, dpo::DType dtype) {
  dpo::Tensor t = dpo::Tensor::host(std::move(shape), dpo::DType::F64);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(double));
  return dtype == dpo::DType::F64 ? t : dpo::convert_host(t, dtype, "test input");
}
std::vector<double> as_f64(const dpo::Tensor& t) {
  const dpo::Tensor d = dpo::convert_host(t, dpo::DType::F64, "test output");
  return {d.data<double>(), d.data<double>() + d.numel()};
}
std::vector<uint8_t> bytes_of(const dpo::Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.raw());
  return {p, p + t.nbytes()};
}
// The bytes of the padding columns [width, ld) of every row of t.
std::vector<uint8_t> padding_bytes(const dpo::Tensor& t, int64_t width) {
  const int64_t ld = t.size(-1), es = dpo::dtype_size(t.dtype());
  const auto all = bytes_of(t);
  std::vector<uint8_t> r;
  for (int64_t n = 0; n < t.numel() / ld; ++n)
    r.insert(r.end(), all.begin() + (n * ld + width) * es, all.begin() + (n * ld + ld) * es);
  return r;
}

struct HeadResult {
  std::vector<double> seq, tok, dlogits, dinp, dwte;  // dlogits: valid columns only, packed [B*T, V]
};

HeadResult run_lm_head(dpo::Backend& be, dpo::DType dt, int64_t B, int64_t T, int64_t C, int64_t V, int64_t ld,
                       const std::vector<double>& lnf, const std::vector<double>& wte,
                       const std::vector<int32_t>& targets, const std::vector<double>& weights,
                       const std::vector<double>& dseq, bool check_padding) {
  using dpo::DType;
  using dpo::Tensor;
  const DType G = dpo::grad_dtype(dt);
  const Tensor x = host_as(lnf, {B, T, C}, dt), w = host_as(wte, {V, C}, dt);
  Tensor tg = Tensor::host({B, T}, DType::I32);
  std::memcpy(tg.raw(), targets.data(), targets.size() * sizeof(int32_t));
  const Tensor wt = host_as(weights, {B, T}, G), ds = host_as(dseq, {B}, G);
  const Tensor logits = host_as(std::vector<double>(static_cast<size_t>(B * T * ld), std::nan("")), {B, T, ld}, dt);
  const auto poisoned = padding_bytes(logits, V);
  Tensor seq = host_as(std::vector<double>(B, std::nan("")), {B}, G);
  Tensor tok = host_as(std::vector<double>(B * T, std::nan("")), {B, T}, G);
  be.matmul_forward(logits, x, w, Tensor(), dpo::WeightLayout::OutIn);
  be.logprob_forward(seq, tok, logits, tg, wt, V);
  if (check_padding) EXPECT_EQ(padding_bytes(logits, V), poisoned) << "forward wrote into the padding";
  be.logprob_backward(logits, logits, tg, wt, ds, V);
  if (check_padding) EXPECT_EQ(padding_bytes(logits, V), poisoned) << "logprob_backward wrote into the padding";
  Tensor dinp = be.zeros({B, T, C}, dt), dwte = be.zeros({V, C}, G);
  be.matmul_backward(dinp, dwte, Tensor(), logits, x, w, dpo::WeightLayout::OutIn);
  HeadResult r{as_f64(seq), as_f64(tok), {}, as_f64(dinp), as_f64(dwte)};
  const auto dl = as_f64(logits);
  r.dlogits = valid_cols(dl, B * T, V, ld);
  return r;
}

TEST(CpuBackendPaddedLogits, LmHeadEqualsTheDenseLayoutBitwiseInEveryDtype) {
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t B = 2, T = 5, C = 24;
  for (int64_t V : {257, 1000}) {
    const int64_t ld = (V + 63) / 64 * 64;
    // Values exactly representable in BF16 so that all three dtypes see the same inputs.
    auto bf = [](std::vector<double> v) {
      return as_f64(host_as(v, {static_cast<int64_t>(v.size())}, dpo::DType::BF16));
    };
    const auto lnf = bf(randn<double>(g, B * T * C)), wte = bf(randn<double>(g, V * C, 0.3));
    auto targets = random_tokens(g, B * T, 0, static_cast<int32_t>(V));
    std::vector<double> weights(B * T, 1.0);
    weights[0] = weights[1] = 0.0;
    targets[0] = -1;
    weights[7] = 0.5;
    const auto dseq = bf(randn<double>(g, B));
    for (dpo::DType dt : {dpo::DType::F32, dpo::DType::F64, dpo::DType::BF16}) {
      SCOPED_TRACE(std::string("V=") + std::to_string(V) + " dtype " + dpo::dtype_name(dt));
      const HeadResult dense = run_lm_head(*be, dt, B, T, C, V, V, lnf, wte, targets, weights, dseq, false);
      const HeadResult pad = run_lm_head(*be, dt, B, T, C, V, ld, lnf, wte, targets, weights, dseq, true);
      ASSERT_TRUE(all_finite(pad.seq) && all_finite(pad.dlogits) && all_finite(pad.dinp) && all_finite(pad.dwte));
      EXPECT_TRUE(bitwise_equal(pad.seq, dense.seq));
      EXPECT_TRUE(bitwise_equal(pad.tok, dense.tok));
      EXPECT_TRUE(bitwise_equal(pad.dlogits, dense.dlogits));
      EXPECT_TRUE(bitwise_equal(pad.dinp, dense.dinp));
      EXPECT_TRUE(bitwise_equal(pad.dwte, dense.dwte));
      // Not trivially equal: the gradients are there.
      double n2 = 0;
      for (double v : pad.dwte) n2 += v * v;
      EXPECT_GT(n2, 1e-6);
    }
  }
}

TEST(CpuBackendPaddedLogits, RowStrideRulesAreCheckedAtTheBoundary) {
  using dpo::DType;
  using dpo::Tensor;
  auto be = dpo::make_cpu_backend();
  const int64_t B = 1, T = 2, C = 4, V = 257;
  auto run = [&](DType dt, int64_t ld) {
    const DType G = dpo::grad_dtype(dt);
    Tensor x = be->zeros({B, T, C}, dt), w = be->zeros({V, C}, dt), logits = be->zeros({B, T, ld}, dt);
    Tensor tg = be->zeros({B, T}, DType::I32), wt = be->zeros({B, T}, G), s = be->zeros({B}, G);
    be->matmul_forward(logits, x, w, Tensor(), dpo::WeightLayout::OutIn);
    be->logprob_forward(s, Tensor(), logits, tg, wt, V);
    be->logprob_backward(logits, logits, tg, wt, s, V);
    be->matmul_backward(Tensor(), be->zeros({V, C}, G), Tensor(), logits, x, w, dpo::WeightLayout::OutIn);
  };
  for (DType dt : {DType::F32, DType::F64, DType::BF16}) {
    SCOPED_TRACE(dpo::dtype_name(dt));
    EXPECT_NO_THROW(run(dt, V));    // dense
    EXPECT_NO_THROW(run(dt, 320));  // the model's padding
    EXPECT_THROW(run(dt, V - 1), dpo::Error);
    EXPECT_THROW(run(dt, V + 2), dpo::Error);  // padded, but no row a multiple of 16 bytes in any dtype
  }
  EXPECT_NO_THROW(run(DType::F32, 260));  // 1040 bytes: 16-byte rows are enough
  EXPECT_THROW(run(DType::BF16, 260), dpo::Error);  // 520 bytes
  try {
    run(DType::BF16, 260);
  } catch (const dpo::Error& e) {
    EXPECT_NE(std::string(e.what()).find("matmul out"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("16"), std::string::npos) << e.what();
  }
  // logprob alone: V beyond the row, and V = 0.
  Tensor logits = be->zeros({B, T, 320}, DType::F32), tg = be->zeros({B, T}, DType::I32);
  Tensor wt = be->zeros({B, T}, DType::F32), s = be->zeros({B}, DType::F32);
  EXPECT_THROW(be->logprob_forward(s, Tensor(), logits, tg, wt, 321), dpo::Error);
  EXPECT_THROW(be->logprob_forward(s, Tensor(), logits, tg, wt, 0), dpo::Error);
  EXPECT_THROW(be->logprob_backward(logits, logits, tg, wt, s, 321), dpo::Error);
}

// ============================================================================================== attention, KV cache
// The decoding step against its oracle, the full attention: with the keys and values of the same qkv, the step for
// query t = pos[b] must be bitwise row (b, pos[b]) of attention_forward's out (the same arithmetic in the same
// order, kernels/attention.h). Cache positions the step may not read are NaN, so reading one shows up.

struct DecodeShape {
  int64_t B, T, C, NH;
};

// Row b of the step is at position pos[b]; caches hold positions [0, pos[b]) of qkv, NaN elsewhere.
template <class F>
void check_decode_step_against_full(const DecodeShape& sh, std::mt19937_64& g) {
  const int64_t B = sh.B, T = sh.T, C = sh.C, NH = sh.NH, Tc = T + 3;
  SCOPED_TRACE("B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
               " NH=" + std::to_string(NH));
  const auto qkv = randn<F>(g, B * T * 3 * C);
  std::vector<F> full(B * T * C), att(B * NH * T * T);
  attention_forward(full.data(), att.data(), qkv.data(), nullptr, B, T, C, NH);
  std::vector<int32_t> pos(B);
  for (int64_t b = 0; b < B; ++b) pos[b] = static_cast<int32_t>(b == 0 ? 0 : b == 1 ? T - 1 : (b * 5) % T);

  std::vector<F> kc(B * Tc * C), vc(B * Tc * C);
  poison(kc), poison(vc);
  attention_cache_store(kc.data(), vc.data(), qkv.data(), B, T, Tc, C);
  for (int64_t b = 0; b < B; ++b)  // un-write positions >= pos[b]: the step writes pos[b] and reads only up to it
    for (int64_t s = pos[b]; s < Tc; ++s)
      for (int64_t c = 0; c < C; ++c) {
        kc[(b * Tc + s) * C + c] = std::numeric_limits<F>::quiet_NaN();
        vc[(b * Tc + s) * C + c] = std::numeric_limits<F>::quiet_NaN();
      }
  const auto kc0 = kc, vc0 = vc;
  std::vector<F> step_qkv(B * 3 * C), out(B * C);
  for (int64_t b = 0; b < B; ++b)
    std::copy(qkv.begin() + (b * T + pos[b]) * 3 * C, qkv.begin() + (b * T + pos[b] + 1) * 3 * C,
              step_qkv.begin() + b * 3 * C);
  poison(out);
  attention_decode_forward(out.data(), kc.data(), vc.data(), step_qkv.data(), pos.data(), B, Tc, C, NH);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<F> got(out.begin() + b * C, out.begin() + (b + 1) * C);
    const std::vector<F> want(full.begin() + (b * T + pos[b]) * C, full.begin() + (b * T + pos[b] + 1) * C);
    EXPECT_TRUE(bitwise_equal(got, want)) << "sequence " << b << " at position " << pos[b];
    for (int64_t s = 0; s < Tc; ++s)
      for (int64_t c = 0; c < C; ++c) {
        const size_t i = static_cast<size_t>((b * Tc + s) * C + c);
        if (s == pos[b]) {
          ASSERT_EQ(kc[i], step_qkv[b * 3 * C + C + c]) << "b=" << b << " c=" << c;
          ASSERT_EQ(vc[i], step_qkv[b * 3 * C + 2 * C + c]) << "b=" << b << " c=" << c;
        } else {  // untouched: earlier positions keep their values, later ones stay NaN
          ASSERT_TRUE(std::memcmp(&kc[i], &kc0[i], sizeof(F)) == 0) << "b=" << b << " s=" << s << " c=" << c;
          ASSERT_TRUE(std::memcmp(&vc[i], &vc0[i], sizeof(F)) == 0) << "b=" << b << " s=" << s << " c=" << c;
        }
      }
  }
}

TEST(KernelAttentionDecode, StepIsBitwiseTheFullAttentionRow) {
  std::mt19937_64 g(test_seed());
  // Awkward sizes (hs = 4), then GPT-2's head size 64 (two heads) and an odd one (hs = 24, 5 heads).
  for (const DecodeShape& sh : {DecodeShape{kB, kT, kC, kNH}, DecodeShape{4, 37, 128, 2}, DecodeShape{3, 19, 120, 5}}) {
    check_decode_step_against_full<float>(sh, g);
    check_decode_step_against_full<double>(sh, g);
  }
}

TEST(KernelAttentionDecode, StepsReproduceEveryRowOfTheFullAttention) {
  // Prefill of the first P positions, then one step per later position, each reading what the earlier steps wrote.
  std::mt19937_64 g(test_seed());
  const int64_t B = 2, T = 23, C = 128, NH = 2, P = 5, Tc = T;
  const auto qkv = randn<float>(g, B * T * 3 * C);
  std::vector<float> full(B * T * C), att(B * NH * T * T);
  attention_forward(full.data(), att.data(), qkv.data(), nullptr, B, T, C, NH);
  std::vector<float> prefix(B * P * 3 * C);
  for (int64_t b = 0; b < B; ++b)
    std::copy(qkv.begin() + b * T * 3 * C, qkv.begin() + (b * T + P) * 3 * C, prefix.begin() + b * P * 3 * C);
  std::vector<float> kc(B * Tc * C), vc(B * Tc * C);
  poison(kc), poison(vc);
  attention_cache_store(kc.data(), vc.data(), prefix.data(), B, P, Tc, C);
  for (int64_t t = P; t < T; ++t) {
    std::vector<float> step(B * 3 * C), out(B * C);
    for (int64_t b = 0; b < B; ++b)
      std::copy(qkv.begin() + (b * T + t) * 3 * C, qkv.begin() + (b * T + t + 1) * 3 * C, step.begin() + b * 3 * C);
    const std::vector<int32_t> pos(B, static_cast<int32_t>(t));
    poison(out);
    attention_decode_forward(out.data(), kc.data(), vc.data(), step.data(), pos.data(), B, Tc, C, NH);
    for (int64_t b = 0; b < B; ++b)
      EXPECT_TRUE(bitwise_equal(std::vector<float>(out.begin() + b * C, out.begin() + (b + 1) * C),
                                std::vector<float>(full.begin() + (b * T + t) * C, full.begin() + (b * T + t + 1) * C)))
          << "b=" << b << " t=" << t;
  }
}

TEST(KernelAttentionDecode, StoreCopiesKeysAndValuesAndLeavesTheRest) {
  std::mt19937_64 g(test_seed());
  const int64_t B = 3, T = 6, C = 20, Tc = 9;
  const auto qkv = randn<double>(g, B * T * 3 * C);
  std::vector<double> kc(B * Tc * C), vc(B * Tc * C);
  poison(kc), poison(vc);
  attention_cache_store(kc.data(), vc.data(), qkv.data(), B, T, Tc, C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < Tc; ++s)
      for (int64_t c = 0; c < C; ++c) {
        const double k = kc[(b * Tc + s) * C + c], v = vc[(b * Tc + s) * C + c];
        if (s < T) {
          ASSERT_EQ(k, qkv[(b * T + s) * 3 * C + C + c]);
          ASSERT_EQ(v, qkv[(b * T + s) * 3 * C + 2 * C + c]);
        } else {
          ASSERT_TRUE(std::isnan(k) && std::isnan(v)) << "position " << s << " past the stored ones was written";
        }
      }
  EXPECT_THROW(attention_cache_store(kc.data(), vc.data(), qkv.data(), 1, Tc + 1, Tc, C), dpo::Error);
}

TEST(KernelAttentionDecode, PositionOutsideTheCacheThrowsBeforeWriting) {
  std::mt19937_64 g(test_seed());
  const int64_t B = 2, C = 12, NH = 3, Tc = 5;
  const auto qkv = randn<float>(g, B * 3 * C);
  for (int32_t bad : {-1, static_cast<int32_t>(Tc)}) {
    std::vector<float> kc = randn<float>(g, B * Tc * C), vc = randn<float>(g, B * Tc * C), out(B * C);
    const auto kc0 = kc, vc0 = vc;
    poison(out);
    const std::vector<int32_t> pos = {2, bad};
    EXPECT_THROW(attention_decode_forward(out.data(), kc.data(), vc.data(), qkv.data(), pos.data(), B, Tc, C, NH),
                 dpo::Error);
    EXPECT_TRUE(bitwise_equal(kc, kc0) && bitwise_equal(vc, vc0)) << "position " << bad;
    EXPECT_FALSE(all_finite(out)) << "out was written";
  }
}

// The CPU backend's BF16 step is the F32 step on the BF16 values, each output rounded once; cache positions other
// than the step's keep their bits.
TEST(CpuBackendDecode, Bf16StepIsTheF32StepRoundedOnceAndArgumentsAreChecked) {
  using dpo::DType;
  using dpo::Tensor;
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t B = 3, Tc = 10, C = 96, NH = 3, T = 6;
  auto bf = [](const std::vector<double>& v) {
    return as_f64(host_as(v, {static_cast<int64_t>(v.size())}, DType::BF16));
  };
  const auto prompt = bf(randn<double>(g, B * T * 3 * C)), step = bf(randn<double>(g, B * 3 * C));
  const std::vector<int32_t> positions = {6, 0, 3};  // 6: right after the prompt; 0 and 3 rewrite a position
  Tensor pos = Tensor::host({B}, DType::I32);
  std::copy(positions.begin(), positions.end(), pos.data<int32_t>());
  std::vector<double> result[2], cache_k[2], cache_v[2];
  for (int pass = 0; pass < 2; ++pass) {
    const DType dt = pass == 0 ? DType::F32 : DType::BF16;
    Tensor kc = host_as(std::vector<double>(B * Tc * C, 0.25), {B, Tc, C}, dt);
    Tensor vc = host_as(std::vector<double>(B * Tc * C, -0.5), {B, Tc, C}, dt);
    Tensor out = host_as(std::vector<double>(B * C, std::nan("")), {B, C}, dt);
    be->attention_cache_store(kc, vc, host_as(prompt, {B, T, 3 * C}, dt));
    be->attention_decode_forward(out, kc, vc, host_as(step, {B, 3 * C}, dt), pos, NH);
    result[pass] = as_f64(out);
    cache_k[pass] = as_f64(kc);
    cache_v[pass] = as_f64(vc);
  }
  EXPECT_TRUE(all_finite(result[1]));
  EXPECT_TRUE(bitwise_equal(result[1], bf(result[0])));
  EXPECT_TRUE(bitwise_equal(cache_k[1], cache_k[0]));  // all cache values are BF16 values: stored exactly
  EXPECT_TRUE(bitwise_equal(cache_v[1], cache_v[0]));
  EXPECT_EQ(cache_k[1][(0 * Tc + 8) * C], 0.25);  // never written
  EXPECT_EQ(cache_k[1][(1 * Tc + 0) * C], step[1 * 3 * C + C]);  // rewritten by the step

  // Boundary checks name the argument.
  auto expect_error = [](const std::function<void()>& f, const char* needle) {
    try {
      f();
      ADD_FAILURE() << "no error, expected one naming " << needle;
    } catch (const dpo::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const Tensor kc = be->zeros({B, Tc, C}, DType::F32), vc = be->zeros({B, Tc, C}, DType::F32);
  const Tensor q = be->zeros({B, 3 * C}, DType::F32), out = be->zeros({B, C}, DType::F32);
  expect_error([&] { be->attention_decode_forward(out, kc, be->zeros({B, Tc + 1, C}, DType::F32), q, pos, NH); },
               "vcache");
  expect_error([&] { be->attention_decode_forward(out, kc, vc, q, be->zeros({B}, DType::F32), NH); }, "pos");
  expect_error([&] { be->attention_decode_forward(be->zeros({B, C + 1}, DType::F32), kc, vc, q, pos, NH); }, "out");
  expect_error([&] { be->attention_decode_forward(out, kc, vc, q, pos, 7); }, "n_head");
  expect_error([&] { be->attention_cache_store(kc, vc, be->zeros({B, Tc + 1, 3 * C}, DType::F32)); }, "positions");
  const Tensor v64 = be->zeros({B, Tc, C}, DType::F64);
  expect_error([&] { be->attention_cache_store(kc, v64, be->zeros({B, 2, 3 * C}, DType::F32)); }, "vcache");
}

// ============================================================================================== fusions
// The fused ops of the training step (docs/architecture.md, "Fusions") against the unfused ops they replace.

// residual_layernorm_forward is bitwise residual_forward followed by layernorm_forward, in float and double, at the
// test's odd sizes and at C = 771 (no vector width divides it), with every output poisoned first and with res_out
// aliasing a.
template <class T>
void check_residual_layernorm_bitwise(std::mt19937_64& g, int64_t N, int64_t C) {
  auto a = randn<T>(g, N * C, 2.0), b = randn<T>(g, N * C), w = randn<T>(g, C), bias = randn<T>(g, C);
  for (auto& x : a) x += T(3);  // |mean| >> std in some rows, as in GPT-2's residual stream
  std::vector<T> res_ref(N * C), ln_ref(N * C), mean_ref(N), rstd_ref(N);
  std::vector<T> res(N * C), ln(N * C), mean(N), rstd(N);
  poison(res_ref), poison(ln_ref), poison(mean_ref), poison(rstd_ref);
  poison(res), poison(ln), poison(mean), poison(rstd);
  residual_forward(res_ref.data(), a.data(), b.data(), N * C);
  layernorm_forward(ln_ref.data(), mean_ref.data(), rstd_ref.data(), res_ref.data(), w.data(), bias.data(), N, C,
                    1e-5);
  residual_layernorm_forward(res.data(), ln.data(), mean.data(), rstd.data(), a.data(), b.data(), w.data(),
                             bias.data(), N, C, 1e-5);
  EXPECT_TRUE(all_finite(ln));
  EXPECT_TRUE(bitwise_equal(res, res_ref)) << "res_out, C = " << C;
  EXPECT_TRUE(bitwise_equal(ln, ln_ref)) << "ln_out, C = " << C;
  EXPECT_TRUE(bitwise_equal(mean, mean_ref)) << "mean, C = " << C;
  EXPECT_TRUE(bitwise_equal(rstd, rstd_ref)) << "rstd, C = " << C;
  // res_out aliasing a (the in-place residual stream).
  auto a2 = a;
  poison(ln), poison(mean), poison(rstd);
  residual_layernorm_forward(a2.data(), ln.data(), mean.data(), rstd.data(), a2.data(), b.data(), w.data(),
                             bias.data(), N, C, 1e-5);
  EXPECT_TRUE(bitwise_equal(a2, res_ref)) << "aliased res_out, C = " << C;
  EXPECT_TRUE(bitwise_equal(ln, ln_ref)) << "aliased ln_out, C = " << C;
}

TEST(KernelFusion, ResidualLayerNormIsBitwiseTheUnfusedPair) {
  std::mt19937_64 g(test_seed());
  check_residual_layernorm_bitwise<float>(g, kN, kC);
  check_residual_layernorm_bitwise<double>(g, kN, kC);
  check_residual_layernorm_bitwise<float>(g, 5, 771);
  check_residual_layernorm_bitwise<double>(g, 5, 771);
}

// The fused op's backward is residual_backward + layernorm_backward (the model does both in place on one buffer):
// finite differences in double of L = <ln_out, G> + <res_out, H> w.r.t. a, b, w and bias.
TEST(KernelFusion, ResidualLayerNormGradCheck) {
  std::mt19937_64 g(test_seed());
  auto a = randn<double>(g, kN * kC, 2.0), b = randn<double>(g, kN * kC), w = randn<double>(g, kC),
       bias = randn<double>(g, kC), G = randn<double>(g, kN * kC), H = randn<double>(g, kN * kC);
  for (auto& x : a) x += 1.5;
  std::vector<double> res(kN * kC), ln(kN * kC), mean(kN), rstd(kN);
  auto L = [&] {
    residual_layernorm_forward(res.data(), ln.data(), mean.data(), rstd.data(), a.data(), b.data(), w.data(),
                               bias.data(), kN, kC, 1e-5);
    return dot(ln, G) + dot(res, H);
  };
  L();
  // dL/dres = H + LayerNorm backward of G (accumulated into the same buffer), then the residual backward.
  std::vector<double> dres = H;
  AccGrad dw(g, w.size()), db(g, bias.size()), da(g, a.size()), dbb(g, b.size());
  layernorm_backward(dres.data(), dw.buf.data(), db.buf.data(), G.data(), res.data(), w.data(), mean.data(),
                     rstd.data(), kN, kC);
  residual_backward(da.buf.data(), dbb.buf.data(), dres.data(), kN * kC);
  expect_grad(a, da.grad(), L, "a");
  expect_grad(b, dbb.grad(), L, "b");
  expect_grad(w, dw.grad(), L, "w");
  expect_grad(bias, db.grad(), L, "bias");
}

// GradWrite::Overwrite is bitwise the += result on a zeroed buffer, and never reads the old contents (NaN).
template <class T>
void check_overwrite_modes(std::mt19937_64& g) {
  using dpo::GradWrite;
  auto inp = randn<T>(g, kN * kC), w = randn<T>(g, kC * kOC), dout = randn<T>(g, kN * kOC);
  for (WeightLayout layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    std::vector<T> acc(kN * kC, T(0)), ow(kN * kC), dw(kC * kOC, T(0)), dw2(kC * kOC, T(0));
    poison(ow);
    matmul_backward(acc.data(), dw.data(), static_cast<T*>(nullptr), dout.data(), inp.data(), w.data(), kN, kC, kOC,
                    layout, kOC);
    matmul_backward(ow.data(), dw2.data(), static_cast<T*>(nullptr), dout.data(), inp.data(), w.data(), kN, kC, kOC,
                    layout, kOC, GradWrite::Overwrite);
    EXPECT_TRUE(all_finite(ow));
    EXPECT_TRUE(bitwise_equal(ow, acc)) << "matmul dinp";
    EXPECT_TRUE(bitwise_equal(dw2, dw)) << "matmul dw still accumulates";
  }
  {
    auto x = randn<T>(g, kN * kC, 2.0), d = randn<T>(g, kN * kC);
    std::vector<T> acc(kN * kC, T(0)), ow(kN * kC);
    poison(ow);
    gelu_backward(acc.data(), d.data(), x.data(), kN * kC);
    gelu_backward(ow.data(), d.data(), x.data(), kN * kC, GradWrite::Overwrite);
    EXPECT_TRUE(all_finite(ow));
    EXPECT_TRUE(bitwise_equal(ow, acc)) << "gelu dinp";
  }
  {
    auto x = randn<T>(g, kN * kC, 2.0), lw = randn<T>(g, kC), lb = randn<T>(g, kC), d = randn<T>(g, kN * kC);
    std::vector<T> out(kN * kC), mean(kN), rstd(kN);
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), lw.data(), lb.data(), kN, kC, 1e-5);
    std::vector<T> acc(kN * kC, T(0)), ow(kN * kC), dw(kC, T(0)), db(kC, T(0)), dw2(kC, T(0)), db2(kC, T(0));
    poison(ow);
    layernorm_backward(acc.data(), dw.data(), db.data(), d.data(), x.data(), lw.data(), mean.data(), rstd.data(), kN,
                       kC);
    layernorm_backward(ow.data(), dw2.data(), db2.data(), d.data(), x.data(), lw.data(), mean.data(), rstd.data(), kN,
                       kC, GradWrite::Overwrite);
    EXPECT_TRUE(all_finite(ow));
    EXPECT_TRUE(bitwise_equal(ow, acc)) << "layernorm dinp";
    EXPECT_TRUE(bitwise_equal(dw2, dw) && bitwise_equal(db2, db)) << "layernorm dw, db still accumulate";
  }
}

TEST(KernelFusion, OverwriteIsBitwiseAccumulateIntoZero) {
  std::mt19937_64 g(test_seed());
  check_overwrite_modes<float>(g);
  check_overwrite_modes<double>(g);
}

// The GELU fusions through the CPU backend. F32 / F64: bitwise the unfused ops (matmul_forward + gelu_forward;
// fill_zero + matmul_backward + fill_zero + gelu_backward), outputs poisoned first. BF16: the fused order (GELU of the
// fp32 GEMM result) against the unfused ops, within the contract of runtime/backend.h.
struct GeluFusionOut {
  std::vector<double> pre, out, dpre, dw, dbias;
};
GeluFusionOut run_gelu_fusion(dpo::Backend& be, dpo::DType dt, bool fused, const std::vector<double>& inp,
                              const std::vector<double>& w1, const std::vector<double>& b1,
                              const std::vector<double>& w2, const std::vector<double>& dout, int64_t N, int64_t C,
                              int64_t H) {
  using dpo::DType;
  using dpo::Tensor;
  const DType G = dpo::grad_dtype(dt);
  const double nan = std::nan("");
  Tensor x = host_as(inp, {N, C}, dt), W1 = host_as(w1, {C, H}, dt), B1 = host_as(b1, {H}, dt);
  Tensor W2 = host_as(w2, {H, C}, dt), D = host_as(dout, {N, C}, dt);
  Tensor pre = host_as(std::vector<double>(N * H, nan), {N, H}, dt);
  Tensor out = host_as(std::vector<double>(N * H, nan), {N, H}, dt);
  Tensor dpre = host_as(std::vector<double>(N * H, nan), {N, H}, dt);
  Tensor dw = host_as(std::vector<double>(H * C, 0.0), {H, C}, G), db = host_as(std::vector<double>(C, 0.0), {C}, G);
  if (fused) {
    be.matmul_gelu_forward(out, pre, x, W1, B1, WeightLayout::InOut);
    be.matmul_backward_dgelu(dpre, dw, db, D, out, W2, pre, WeightLayout::InOut);
  } else {
    be.matmul_forward(pre, x, W1, B1, WeightLayout::InOut);
    be.gelu_forward(out, pre);
    Tensor prod = be.zeros({N, H}, dt);
    be.matmul_backward(prod, dw, db, D, out, W2, WeightLayout::InOut);
    be.fill_zero(dpre);
    be.gelu_backward(dpre, prod, pre);
  }
  return {as_f64(pre), as_f64(out), as_f64(dpre), as_f64(dw), as_f64(db)};
}

TEST(CpuBackendFusion, GeluFusionsAreBitwiseUnfusedInF32F64AndWithinContractInBf16) {
  using dpo::DType;
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t N = 9, C = 13, H = 4 * C;
  const auto inp = randn<double>(g, N * C), w1 = randn<double>(g, C * H, 0.5), b1 = randn<double>(g, H, 0.5),
             w2 = randn<double>(g, H * C, 0.3), dout = randn<double>(g, N * C);
  for (DType dt : {DType::F32, DType::F64}) {
    const auto u = run_gelu_fusion(*be, dt, false, inp, w1, b1, w2, dout, N, C, H);
    const auto f = run_gelu_fusion(*be, dt, true, inp, w1, b1, w2, dout, N, C, H);
    EXPECT_TRUE(all_finite(f.out) && all_finite(f.dpre)) << dtype_name(dt);
    EXPECT_TRUE(bitwise_equal(f.pre, u.pre)) << dtype_name(dt);
    EXPECT_TRUE(bitwise_equal(f.out, u.out)) << dtype_name(dt);
    EXPECT_TRUE(bitwise_equal(f.dpre, u.dpre)) << dtype_name(dt);
    EXPECT_TRUE(bitwise_equal(f.dw, u.dw)) << dtype_name(dt);
    EXPECT_TRUE(bitwise_equal(f.dbias, u.dbias)) << dtype_name(dt);
  }
  const auto u = run_gelu_fusion(*be, DType::BF16, false, inp, w1, b1, w2, dout, N, C, H);
  const auto f = run_gelu_fusion(*be, DType::BF16, true, inp, w1, b1, w2, dout, N, C, H);
  ASSERT_TRUE(all_finite(f.out) && all_finite(f.dpre));
  // pre is one rounding of the same fp32 sum; dw and dbias read the same bf16 inputs (out may differ, see below).
  EXPECT_TRUE(bitwise_equal(f.pre, u.pre));
  // out: gelu of the fp32 pre instead of the bf16 pre: |gelu'| <= 1.13 times half a bf16 ulp of pre (2^-9 |pre|),
  // plus one bf16 rounding of out itself each side: 2^-8 (|pre| + |out|) bounds it with margin. A wrong GELU (or
  // the GELU applied twice) is off by O(|out|).
  for (size_t i = 0; i < f.out.size(); ++i)
    ASSERT_LE(std::fabs(f.out[i] - u.out[i]), 0x1p-8 * (std::fabs(u.pre[i]) + std::fabs(u.out[i])) + 1e-30) << i;
  // dpre: the product kept in fp32 instead of rounded to bf16: relative 2^-9 of |prod| times |gelu'| <= 1.13, plus
  // the final bf16 rounding each side; the budget is 2^-7 of |dpre| plus 2^-8 of the largest |dpre| (for values
  // where gelu' is small and the product is not).
  double dmax = 0;
  for (double v : u.dpre) dmax = std::max(dmax, std::fabs(v));
  for (size_t i = 0; i < f.dpre.size(); ++i)
    ASSERT_LE(std::fabs(f.dpre[i] - u.dpre[i]), 0x1p-7 * std::fabs(u.dpre[i]) + 0x1p-8 * dmax) << i;
  // dw = out^T @ dout, with out as each path stored it: close, not equal; dbias = sum dout: equal.
  EXPECT_TRUE(bitwise_equal(f.dbias, u.dbias));
  EXPECT_LT(max_rel_err(f.dw, u.dw), 2e-2);
}

}  // namespace
