// The Llama-family kernels (RMSNorm, RoPE, SwiGLU, grouped-query heads) and the encoder without position embedding:
// the CPU twins against finite differences in double and closed forms, and the CPU backend's ops (F32, F64, BF16)
// against the twins, with outputs poisoned before every call and bad arguments refused at the boundary.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/repeat_kv.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/backend.h"
#include "runtime/counting_backend.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace {

using dpo::DType;
using dpo::GradWrite;
using dpo::Tensor;
using dpo::test::dot;
using dpo::test::max_rel_err;
using dpo::test::numeric_grad;
using dpo::test::randn;
using dpo::test::test_seed;

// Central differences in double, h = 1e-6 (tests/test_util.h): truncation and round-off are both ~1e-10 relative
// for these O(1)..O(10) losses, so 1e-7 leaves a 1000x margin while a wrong term is off by O(1).
constexpr double kGradTol = 1e-7;
// Float twin against double twin on identical inputs: every output is a double computation rounded once to float
// (2^-24 relative) from float inputs, and the RMSNorm statistics sum C <= 64 float-exact squares in double; 1e-6
// relative to the largest output leaves a 10x margin and catches any wrong term.
constexpr double kFloatTol = 1e-6;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// A host tensor of `dtype` holding v (rounded once when the dtype is narrower than double).
Tensor host_as(const std::vector<double>& v, dpo::Shape shape, DType dtype) {
  Tensor t = Tensor::host(std::move(shape), DType::F64);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(double));
  return dtype == DType::F64 ? t : dpo::convert_host(t, dtype, "test input");
}
std::vector<double> as_f64(const Tensor& t) {
  const Tensor d = dpo::convert_host(t, DType::F64, "test output");
  return {d.data<double>(), d.data<double>() + d.numel()};
}
// v rounded to BF16 and back (the values every dtype represents exactly).
std::vector<double> bf(const std::vector<double>& v) {
  return as_f64(host_as(v, {static_cast<int64_t>(v.size())}, DType::BF16));
}
// A tensor of `dtype` full of NaN (a "=" output before the call).
Tensor nan_tensor(dpo::Shape shape, DType dtype) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return host_as(std::vector<double>(static_cast<size_t>(n), kNaN), std::move(shape), dtype);
}
bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}
bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}
std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }
std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<double> randn_f(std::mt19937_64& g, size_t n, double scale = 1.0) {
  return to_double(to_float(randn<double>(g, n, scale)));
}
double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}
// max |a - b| / max(1e-30, max |b|).
double rel_to_max(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (!(d <= e)) e = d;
  }
  return e / std::max(1e-30, max_abs(b));
}

// RoPE tables as the model builds them (HF: inv_freq_i = theta^(-2i/D), angle = p * inv_freq_i), [P, D/2].
void rope_tables(int64_t P, int64_t D, double theta, std::vector<double>* cos, std::vector<double>* sin) {
  const int64_t H = D / 2;
  cos->assign(static_cast<size_t>(P * H), 0.0);
  sin->assign(static_cast<size_t>(P * H), 0.0);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < H; ++i) {
      const double a = static_cast<double>(p) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(D));
      (*cos)[p * H + i] = std::cos(a);
      (*sin)[p * H + i] = std::sin(a);
    }
}
std::vector<int32_t> random_positions(std::mt19937_64& g, int64_t N, int64_t P) {
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(P - 1));
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (auto& p : pos) p = d(g);
  return pos;
}
Tensor i32_tensor(const std::vector<int32_t>& v, dpo::Shape shape) {
  Tensor t = Tensor::host(std::move(shape), DType::I32);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

// ================================ CPU twins =====================================================================

// --- RMSNorm ---

// The forward against the formula written out: rstd = 1 / sqrt(mean(x^2) + eps), out = x * rstd * w.
TEST(RmsNormCpu, ForwardIsTheFormulaAndFloatAgreesWithDouble) {
  std::mt19937_64 g(test_seed());
  const int64_t N = 7, C = 13;
  const double eps = 1e-5;
  const auto x = randn_f(g, N * C, 2.0), w = randn_f(g, C);
  std::vector<double> out(N * C, kNaN), rstd(N, kNaN);
  dpo::cpu::rmsnorm_forward<double>(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += x[n * C + c] * x[n * C + c];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    EXPECT_NEAR(rstd[n], r, 1e-14 * r);
    for (int64_t c = 0; c < C; ++c) EXPECT_NEAR(out[n * C + c], x[n * C + c] * r * w[c], 1e-14 * (1 + r));
  }
  std::vector<float> outf(N * C, NAN), rstdf(N, NAN);
  const auto xf = to_float(x), wf = to_float(w);
  dpo::cpu::rmsnorm_forward<float>(outf.data(), rstdf.data(), xf.data(), wf.data(), N, C, eps);
  EXPECT_LT(rel_to_max(to_double(outf), out), kFloatTol);
  EXPECT_LT(rel_to_max(to_double(rstdf), rstd), kFloatTol);
  // w == nullptr: the unweighted x * rstd.
  std::vector<double> un(N * C, kNaN), r2(N, kNaN);
  dpo::cpu::rmsnorm_forward<double>(un.data(), r2.data(), x.data(), nullptr, N, C, eps);
  for (int64_t i = 0; i < N * C; ++i) EXPECT_NEAR(un[i], x[i] * rstd[i / C], 1e-14 * (1 + rstd[i / C]));
}

// dinp and dw of L = sum(R * out) against central differences; rstd is recomputed by every forward, so the
// numeric gradient includes rstd's dependence on x.
TEST(RmsNormCpu, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  for (int64_t C : {13, 1, 64}) {
    SCOPED_TRACE("C=" + std::to_string(C));
    const int64_t N = 7;
    const double eps = 1e-5;
    auto x = randn<double>(g, N * C, 1.5), w = randn<double>(g, C);
    const auto R = randn<double>(g, N * C);
    auto loss = [&]() {
      std::vector<double> out(N * C), rstd(N);
      dpo::cpu::rmsnorm_forward<double>(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
      return dot(out, R);
    };
    std::vector<double> out(N * C), rstd(N);
    dpo::cpu::rmsnorm_forward<double>(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
    // += onto random starting values: the analytic gradient is the difference.
    const auto dx0 = randn<double>(g, N * C), dw0 = randn<double>(g, C);
    auto dx = dx0, dw = dw0;
    dpo::cpu::rmsnorm_backward<double>(dx.data(), dw.data(), R.data(), x.data(), w.data(), rstd.data(), N, C);
    std::vector<double> gx(N * C), gw(C);
    for (size_t i = 0; i < gx.size(); ++i) gx[i] = dx[i] - dx0[i];
    for (size_t i = 0; i < gw.size(); ++i) gw[i] = dw[i] - dw0[i];
    EXPECT_LT(max_rel_err(gx, numeric_grad(x, loss)), kGradTol);
    EXPECT_LT(max_rel_err(gw, numeric_grad(w, loss)), kGradTol);

    // Overwrite: the old dinp (NaN) is not read, and the result is bitwise the += result on a zeroed dinp.
    std::vector<double> dz(N * C, 0.0), dn(N * C, kNaN), dwa(C, 0.0), dwb(C, 0.0);
    dpo::cpu::rmsnorm_backward<double>(dz.data(), dwa.data(), R.data(), x.data(), w.data(), rstd.data(), N, C);
    dpo::cpu::rmsnorm_backward<double>(dn.data(), dwb.data(), R.data(), x.data(), w.data(), rstd.data(), N, C,
                                       GradWrite::Overwrite);
    EXPECT_TRUE(bitwise_equal(dn, dz));
    // dw accumulates: a second call doubles it.
    dpo::cpu::rmsnorm_backward<double>(dz.data(), dwb.data(), R.data(), x.data(), w.data(), rstd.data(), N, C,
                                       GradWrite::Overwrite);
    for (int64_t c = 0; c < C; ++c) EXPECT_NEAR(dwb[c], 2 * dwa[c], 1e-12 * (1 + std::fabs(dwa[c])));
  }
}

TEST(RmsNormCpu, FusedResidualIsBitwiseTheAddThenTheNorm) {
  std::mt19937_64 g(test_seed());
  const int64_t N = 7, C = 13;
  const auto a = to_float(randn<double>(g, N * C)), b = to_float(randn<double>(g, N * C));
  const auto w = to_float(randn<double>(g, C));
  std::vector<float> sum(N * C), out(N * C), rstd(N);
  for (int64_t i = 0; i < N * C; ++i) sum[i] = a[i] + b[i];
  dpo::cpu::rmsnorm_forward<float>(out.data(), rstd.data(), sum.data(), w.data(), N, C, 1e-6);
  std::vector<float> res(N * C, NAN), out2(N * C, NAN), rstd2(N, NAN);
  dpo::cpu::residual_rmsnorm_forward<float>(res.data(), out2.data(), rstd2.data(), a.data(), b.data(), w.data(), N, C,
                                            1e-6);
  EXPECT_EQ(std::memcmp(res.data(), sum.data(), sum.size() * 4), 0);
  EXPECT_EQ(std::memcmp(out2.data(), out.data(), out.size() * 4), 0);
  EXPECT_EQ(std::memcmp(rstd2.data(), rstd.data(), rstd.size() * 4), 0);
  // res_out aliasing a.
  auto a2 = a;
  dpo::cpu::residual_rmsnorm_forward<float>(a2.data(), out2.data(), rstd2.data(), a2.data(), b.data(), w.data(), N, C,
                                            1e-6);
  EXPECT_EQ(std::memcmp(a2.data(), sum.data(), sum.size() * 4), 0);
  EXPECT_EQ(std::memcmp(out2.data(), out.data(), out.size() * 4), 0);
}

// --- RoPE ---

struct RopeCase {
  int64_t n_head, n_kv_head, D;
};
const RopeCase kRopeCases[] = {{6, 1, 6}, {6, 2, 10}, {6, 3, 6}, {6, 6, 10}, {1, 1, 2}};

TEST(RopeCpu, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  const int64_t N = 7, P = 11;
  for (const RopeCase& rc : kRopeCases) {
    SCOPED_TRACE("n_head=" + std::to_string(rc.n_head) + " n_kv_head=" + std::to_string(rc.n_kv_head) +
                 " D=" + std::to_string(rc.D));
    const int64_t W = (rc.n_head + 2 * rc.n_kv_head) * rc.D;
    std::vector<double> cs, sn;
    rope_tables(P, rc.D, 10000.0, &cs, &sn);
    const auto pos = random_positions(g, N, P);
    auto x = randn<double>(g, N * W);
    const auto R = randn<double>(g, N * W);
    auto loss = [&]() {
      std::vector<double> y(N * W);
      dpo::cpu::rope_forward<double>(y.data(), x.data(), cs.data(), sn.data(), pos.data(), N, rc.n_head, rc.n_kv_head,
                                     rc.D, P);
      return dot(y, R);
    };
    std::vector<double> dx(N * W, kNaN);
    dpo::cpu::rope_backward<double>(dx.data(), R.data(), cs.data(), sn.data(), pos.data(), N, rc.n_head, rc.n_kv_head,
                                    rc.D, P);
    EXPECT_LT(max_rel_err(dx, numeric_grad(x, loss)), kGradTol);
  }
}

TEST(RopeCpu, ClosedForms) {
  std::mt19937_64 g(test_seed());
  const int64_t N = 9, P = 13;
  for (const RopeCase& rc : kRopeCases) {
    SCOPED_TRACE("n_head=" + std::to_string(rc.n_head) + " n_kv_head=" + std::to_string(rc.n_kv_head) +
                 " D=" + std::to_string(rc.D));
    const int64_t H = rc.D / 2, W = (rc.n_head + 2 * rc.n_kv_head) * rc.D;
    const int64_t rotated = (rc.n_head + rc.n_kv_head) * rc.D;
    std::vector<double> cs, sn;
    rope_tables(P, rc.D, 500000.0, &cs, &sn);
    auto pos = random_positions(g, N, P);
    pos[0] = 0;
    pos[1] = static_cast<int32_t>(P - 1);
    const auto x = randn<double>(g, N * W);
    std::vector<double> y(N * W, kNaN);
    dpo::cpu::rope_forward<double>(y.data(), x.data(), cs.data(), sn.data(), pos.data(), N, rc.n_head, rc.n_kv_head,
                                   rc.D, P);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t h0 = 0; h0 < rotated; h0 += rc.D)
        for (int64_t i = 0; i < H; ++i) {
          const int64_t a = n * W + h0 + i, b = a + H;
          // A rotation keeps each pair's norm (cos^2 + sin^2 = 1 to a few ulps).
          EXPECT_NEAR(y[a] * y[a] + y[b] * y[b], x[a] * x[a] + x[b] * x[b], 1e-13 * (1 + x[a] * x[a] + x[b] * x[b]));
          // The formula itself, with the table's entries.
          const double c = cs[pos[n] * H + i], s = sn[pos[n] * H + i];
          EXPECT_NEAR(y[a], x[a] * c - x[b] * s, 1e-15 * (1 + std::fabs(x[a]) + std::fabs(x[b])));
          EXPECT_NEAR(y[b], x[b] * c + x[a] * s, 1e-15 * (1 + std::fabs(x[a]) + std::fabs(x[b])));
        }
      // v heads: copied bitwise.
      EXPECT_EQ(std::memcmp(&y[n * W + rotated], &x[n * W + rotated], (W - rotated) * sizeof(double)), 0);
    }
    // Position 0 (cos 1, sin 0) is the identity, bitwise.
    EXPECT_EQ(std::memcmp(&y[0], &x[0], W * sizeof(double)), 0);
    // Forward then backward (the inverse rotation) is the identity to rounding.
    std::vector<double> back(N * W, kNaN);
    dpo::cpu::rope_backward<double>(back.data(), y.data(), cs.data(), sn.data(), pos.data(), N, rc.n_head,
                                    rc.n_kv_head, rc.D, P);
    EXPECT_LT(rel_to_max(back, x), 1e-15 * 8);
    // In place is bitwise the out-of-place result, and a row at position P-1 is rotated (not the identity).
    auto inplace = x;
    dpo::cpu::rope_forward<double>(inplace.data(), inplace.data(), cs.data(), sn.data(), pos.data(), N, rc.n_head,
                                   rc.n_kv_head, rc.D, P);
    EXPECT_TRUE(bitwise_equal(inplace, y));
    EXPECT_NE(std::memcmp(&y[W], &x[W], rc.D * sizeof(double)), 0);
  }
}

TEST(RopeCpu, PositionOutsideTheTablesThrowsBeforeWriting) {
  const int64_t N = 3, P = 4, D = 6, W = (2 + 2) * D;
  std::vector<double> cs, sn;
  rope_tables(P, D, 10000.0, &cs, &sn);
  const std::vector<double> x(N * W, 1.0);
  for (int32_t bad : {-1, 4}) {
    std::vector<int32_t> pos = {0, bad, 1};
    std::vector<double> y(N * W, kNaN);
    try {
      dpo::cpu::rope_forward<double>(y.data(), x.data(), cs.data(), sn.data(), pos.data(), N, 2, 1, D, P);
      ADD_FAILURE() << "no error for position " << bad;
    } catch (const dpo::Error& e) {
      EXPECT_NE(std::string(e.what()).find("position " + std::to_string(bad) + " of row 1"), std::string::npos)
          << e.what();
    }
    EXPECT_TRUE(std::isnan(y[0]));  // nothing written
    EXPECT_THROW(
        dpo::cpu::rope_backward<double>(y.data(), x.data(), cs.data(), sn.data(), pos.data(), N, 2, 1, D, P),
        dpo::Error);
  }
}

// --- SwiGLU ---

TEST(SwigluCpu, ForwardIsTheFormulaAndBackwardMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  for (int64_t I : {11, 1}) {
    SCOPED_TRACE("I=" + std::to_string(I));
    const int64_t N = 7;
    auto x = randn<double>(g, N * 2 * I, 2.0);
    std::vector<double> y(N * I, kNaN);
    dpo::cpu::swiglu_forward<double>(y.data(), x.data(), N, I);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < I; ++i) {
        const double gt = x[n * 2 * I + i], u = x[n * 2 * I + I + i];
        EXPECT_NEAR(y[n * I + i], gt / (1 + std::exp(-gt)) * u, 1e-14 * (1 + std::fabs(gt * u)));
      }
    const auto R = randn<double>(g, N * I);
    auto loss = [&]() {
      std::vector<double> o(N * I);
      dpo::cpu::swiglu_forward<double>(o.data(), x.data(), N, I);
      return dot(o, R);
    };
    std::vector<double> dx(N * 2 * I, kNaN);
    dpo::cpu::swiglu_backward<double>(dx.data(), R.data(), x.data(), N, I);
    EXPECT_LT(max_rel_err(dx, numeric_grad(x, loss)), kGradTol);
    // Float against double.
    const auto xf = to_float(x), Rf = to_float(R);
    const auto xd = to_double(xf), Rd = to_double(Rf);
    std::vector<float> yf(N * I, NAN), dxf(N * 2 * I, NAN);
    std::vector<double> yd(N * I), dxd(N * 2 * I);
    dpo::cpu::swiglu_forward<float>(yf.data(), xf.data(), N, I);
    dpo::cpu::swiglu_forward<double>(yd.data(), xd.data(), N, I);
    dpo::cpu::swiglu_backward<float>(dxf.data(), Rf.data(), xf.data(), N, I);
    dpo::cpu::swiglu_backward<double>(dxd.data(), Rd.data(), xd.data(), N, I);
    EXPECT_LT(rel_to_max(to_double(yf), yd), kFloatTol);
    EXPECT_LT(rel_to_max(to_double(dxf), dxd), kFloatTol);
  }
}

// Large |gate|: sigmoid saturates; silu(g) -> g for g -> +inf and -> 0 for g -> -inf, the gradient to 1 / 0; never
// NaN or Inf for finite inputs (exp(-g) overflowing to +inf must give 0, not NaN).
TEST(SwigluCpu, SaturatedGatesStayFinite) {
  const std::vector<float> x = {-1000.f, -100.f, 100.f, 1000.f, 2.f, 3.f, 5.f, 7.f};  // I = 4: gates, ups
  std::vector<float> y(4, NAN), dx(8, NAN);
  const std::vector<float> dy(4, 1.0f);
  dpo::cpu::swiglu_forward<float>(y.data(), x.data(), 1, 4);
  dpo::cpu::swiglu_backward<float>(dx.data(), dy.data(), x.data(), 1, 4);
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
  for (float v : dx) EXPECT_TRUE(std::isfinite(v));
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[3], 1000.0f * 7.0f);
  EXPECT_EQ(dx[0], 0.0f);      // d gate at -1000
  EXPECT_EQ(dx[3], 7.0f);      // d gate at +1000: up * silu'(g) = up * 1
  EXPECT_EQ(dx[7], 1000.0f);   // d up = silu(1000) = 1000
}

// --- repeat_kv ---

TEST(RepeatKvCpu, ForwardCopiesTheGroupsHeadAndBackwardSumsThemInOrder) {
  std::mt19937_64 g(test_seed());
  const int64_t N = 5;
  for (const RopeCase& rc : kRopeCases) {
    SCOPED_TRACE("n_head=" + std::to_string(rc.n_head) + " n_kv_head=" + std::to_string(rc.n_kv_head));
    const int64_t nh = rc.n_head, nkv = rc.n_kv_head, D = rc.D, gsz = nh / nkv;
    const int64_t Wi = (nh + 2 * nkv) * D, Wo = 3 * nh * D;
    const auto x = randn<double>(g, N * Wi);
    std::vector<double> y(N * Wo, kNaN);
    dpo::cpu::repeat_kv_forward<double>(y.data(), x.data(), N, nh, nkv, D);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t h = 0; h < nh; ++h) {
          EXPECT_EQ(y[n * Wo + h * D + d], x[n * Wi + h * D + d]);                                // q
          EXPECT_EQ(y[n * Wo + (nh + h) * D + d], x[n * Wi + (nh + h / gsz) * D + d]);           // k
          EXPECT_EQ(y[n * Wo + (2 * nh + h) * D + d], x[n * Wi + (nh + nkv + h / gsz) * D + d]);  // v
        }
    // Backward: the adjoint of the forward (<repeat(x), dy> = <x, repeat^T(dy)>) and each kv head's sum written out
    // in head order (bitwise: the same additions in the same order).
    const auto dy = randn<double>(g, N * Wo);
    std::vector<double> dx(N * Wi, kNaN);
    dpo::cpu::repeat_kv_backward<double>(dx.data(), dy.data(), N, nh, nkv, D);
    EXPECT_NEAR(dot(y, dy), dot(x, dx), 1e-12 * N * Wo);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t h = 0; h < nh; ++h) EXPECT_EQ(dx[n * Wi + h * D + d], dy[n * Wo + h * D + d]);
        for (int part = 1; part <= 2; ++part)
          for (int64_t j = 0; j < nkv; ++j) {
            double s = dy[n * Wo + (part * nh + j * gsz) * D + d];
            for (int64_t r = 1; r < gsz; ++r) s += dy[n * Wo + (part * nh + j * gsz + r) * D + d];
            EXPECT_EQ(dx[n * Wi + (nh + (part - 1) * nkv + j) * D + d], s);
          }
      }
  }
}

// ================================ CPU backend ====================================================================

const DType kDtypes[] = {DType::F32, DType::F64, DType::BF16};

// RMSNorm through the backend in every dtype, outputs poisoned: F32 / F64 equal the twins; BF16 is HF's order
// round(w * round(x * rstd)) on the same BF16 inputs; its backward is the F32 backward rounded once.
TEST(CpuBackendLlama, RmsNormInEveryDtype) {
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t B = 2, T = 7, C = 13, N = B * T;
  const double eps = 1e-5;
  const auto x = bf(randn<double>(g, N * C, 3.0)), w = bf(randn<double>(g, C)), dy = bf(randn<double>(g, N * C));
  struct Run {
    std::vector<double> out, rstd, dx, dw, dx_over;
  };
  auto run = [&](DType dt) {
    const DType G = dpo::grad_dtype(dt);
    const Tensor tx = host_as(x, {B, T, C}, dt), tw = host_as(w, {C}, dt), tdy = host_as(dy, {B, T, C}, dt);
    Tensor out = nan_tensor({B, T, C}, dt), rstd = nan_tensor({B, T}, G);
    be->rmsnorm_forward(out, rstd, tx, tw, eps);
    Tensor dx = host_as(std::vector<double>(N * C, 0.5), {B, T, C}, dt);
    Tensor dw = host_as(std::vector<double>(C, 0.25), {C}, G);
    be->rmsnorm_backward(dx, dw, tdy, tx, tw, rstd, GradWrite::Accumulate);
    Tensor dxo = nan_tensor({B, T, C}, dt), dw2 = host_as(std::vector<double>(C, 0.0), {C}, G);
    be->rmsnorm_backward(dxo, dw2, tdy, tx, tw, rstd, GradWrite::Overwrite);
    return Run{as_f64(out), as_f64(rstd), as_f64(dx), as_f64(dw), as_f64(dxo)};
  };
  std::vector<double> ref_out(N * C), ref_rstd(N), ref_dx(N * C, 0.5), ref_dw(C, 0.25);
  dpo::cpu::rmsnorm_forward<double>(ref_out.data(), ref_rstd.data(), x.data(), w.data(), N, C, eps);
  dpo::cpu::rmsnorm_backward<double>(ref_dx.data(), ref_dw.data(), dy.data(), x.data(), w.data(), ref_rstd.data(), N,
                                     C);
  const Run d = run(DType::F64), f = run(DType::F32), h = run(DType::BF16);
  for (const Run* r : {&d, &f, &h})
    ASSERT_TRUE(all_finite(r->out) && all_finite(r->rstd) && all_finite(r->dx) && all_finite(r->dw) &&
                all_finite(r->dx_over));
  EXPECT_TRUE(bitwise_equal(d.out, ref_out));
  EXPECT_TRUE(bitwise_equal(d.dx, ref_dx));
  EXPECT_TRUE(bitwise_equal(d.dw, ref_dw));
  EXPECT_LT(rel_to_max(f.out, d.out), kFloatTol);
  EXPECT_LT(rel_to_max(f.dx, d.dx), kFloatTol);
  EXPECT_LT(rel_to_max(f.dw, d.dw), kFloatTol);

  // BF16 forward: rstd is the F32 statistics (F32 output, same inputs), out is round(w * round(n)) with n the F32
  // normalised value, which is the F32 run with unit weights.
  EXPECT_TRUE(bitwise_equal(h.rstd, f.rstd));
  {
    const Tensor tx = host_as(x, {N, C}, DType::F32), ones = host_as(std::vector<double>(C, 1.0), {C}, DType::F32);
    Tensor n32 = nan_tensor({N, C}, DType::F32), r32 = nan_tensor({N}, DType::F32);
    be->rmsnorm_forward(n32, r32, tx, ones, eps);
    const auto nb = bf(as_f64(n32));
    std::vector<double> expect(N * C);
    for (int64_t i = 0; i < N * C; ++i) expect[i] = nb[i] * w[i % C];  // exact: two 8-bit significands
    EXPECT_TRUE(bitwise_equal(h.out, bf(expect)));
    // ... which is within two BF16 roundings (2^-8 relative each) of the F32 output.
    for (int64_t i = 0; i < N * C; ++i)
      EXPECT_LE(std::fabs(h.out[i] - f.out[i]), 2.1 * std::ldexp(std::fabs(f.out[i]), -8));
  }
  // BF16 backward: fp32 arithmetic on the same values, one rounding of dinp (the += reads dinp 0.5 exactly and
  // rounds the F32 sum once); dw is F32 and bitwise the F32 run's.
  EXPECT_TRUE(bitwise_equal(h.dx, bf(f.dx)));
  EXPECT_TRUE(bitwise_equal(h.dx_over, bf(f.dx_over)));
  EXPECT_TRUE(bitwise_equal(h.dw, f.dw));
}

TEST(CpuBackendLlama, ResidualRmsNormIsBitwiseThePairInEveryDtype) {
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t N = 7, C = 13;
  const auto a = bf(randn<double>(g, N * C)), b = bf(randn<double>(g, N * C)), w = bf(randn<double>(g, C));
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dpo::dtype_name(dt));
    const DType G = dpo::grad_dtype(dt);
    const Tensor ta = host_as(a, {N, C}, dt), tb = host_as(b, {N, C}, dt), tw = host_as(w, {C}, dt);
    Tensor sum = nan_tensor({N, C}, dt), out = nan_tensor({N, C}, dt), rstd = nan_tensor({N}, G);
    be->residual_forward(sum, ta, tb);
    be->rmsnorm_forward(out, rstd, sum, tw, 1e-6);
    Tensor res2 = nan_tensor({N, C}, dt), out2 = nan_tensor({N, C}, dt), rstd2 = nan_tensor({N}, G);
    be->residual_rmsnorm_forward(res2, out2, rstd2, ta, tb, tw, 1e-6);
    ASSERT_TRUE(all_finite(as_f64(out2)));
    EXPECT_TRUE(bitwise_equal(as_f64(res2), as_f64(sum)));
    EXPECT_TRUE(bitwise_equal(as_f64(out2), as_f64(out)));
    EXPECT_TRUE(bitwise_equal(as_f64(rstd2), as_f64(rstd)));
    // res_out aliasing a.
    const Tensor a2 = host_as(a, {N, C}, dt);
    be->residual_rmsnorm_forward(a2, out2, rstd2, a2, tb, tw, 1e-6);
    EXPECT_TRUE(bitwise_equal(as_f64(a2), as_f64(sum)));
    EXPECT_TRUE(bitwise_equal(as_f64(out2), as_f64(out)));
    // ln_out aliasing an input is refused.
    EXPECT_THROW(be->residual_rmsnorm_forward(res2, ta, rstd2, ta, tb, tw, 1e-6), dpo::Error);
  }
}

// RoPE, SwiGLU and repeat_kv through the backend: F32 / F64 equal the twins bitwise; BF16 is the F32 result on the
// same BF16 inputs rounded once (bitwise: the CPU's BF16 path is exactly that), which is within one BF16 rounding.
TEST(CpuBackendLlama, RopeSwigluRepeatKvInEveryDtype) {
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t B = 2, T = 5, N = B * T, nh = 6, nkv = 2, D = 10, P = 9, I = 11;
  const int64_t W = (nh + 2 * nkv) * D, Wo = 3 * nh * D;
  std::vector<double> cs, sn;
  rope_tables(P, D, 10000.0, &cs, &sn);
  cs = to_double(to_float(cs));  // F32 tables (grad_dtype of F32 and BF16); F64 gets the same values
  sn = to_double(to_float(sn));
  const auto pos = random_positions(g, N, P);
  const Tensor tpos = i32_tensor(pos, {B, T});  // the batch layout's [B,T] positions
  const auto x = bf(randn<double>(g, N * W)), dy = bf(randn<double>(g, N * W));
  const auto xs = bf(randn<double>(g, N * 2 * I, 2.0)), dys = bf(randn<double>(g, N * I));
  const auto dyk = bf(randn<double>(g, N * Wo));
  std::vector<std::vector<double>> res[3];
  for (int k = 0; k < 3; ++k) {
    const DType dt = kDtypes[k], G = dpo::grad_dtype(dt);
    SCOPED_TRACE(dpo::dtype_name(dt));
    const Tensor tc = host_as(cs, {P, D / 2}, G), ts = host_as(sn, {P, D / 2}, G);
    Tensor y = nan_tensor({B, T, W}, dt), dx = nan_tensor({B, T, W}, dt);
    be->rope_forward(y, host_as(x, {B, T, W}, dt), tc, ts, tpos, nh, nkv);
    be->rope_backward(dx, host_as(dy, {B, T, W}, dt), tc, ts, tpos, nh, nkv);
    Tensor inplace = host_as(x, {B, T, W}, dt);
    be->rope_forward(inplace, inplace, tc, ts, tpos, nh, nkv);
    EXPECT_TRUE(bitwise_equal(as_f64(inplace), as_f64(y)));
    Tensor so = nan_tensor({B, T, I}, dt), sdx = nan_tensor({B, T, 2 * I}, dt);
    be->swiglu_forward(so, host_as(xs, {B, T, 2 * I}, dt));
    be->swiglu_backward(sdx, host_as(dys, {B, T, I}, dt), host_as(xs, {B, T, 2 * I}, dt));
    Tensor ko = nan_tensor({B, T, Wo}, dt), kdx = nan_tensor({B, T, W}, dt);
    be->repeat_kv_forward(ko, host_as(x, {B, T, W}, dt), nh, nkv);
    be->repeat_kv_backward(kdx, host_as(dyk, {B, T, Wo}, dt), nh, nkv);
    res[k] = {as_f64(y), as_f64(dx), as_f64(so), as_f64(sdx), as_f64(ko), as_f64(kdx)};
    for (const auto& v : res[k]) EXPECT_TRUE(all_finite(v));
  }
  // F64 against the double twins.
  std::vector<double> e(N * W), ex(N * W), es(N * I), esx(N * 2 * I), ek(N * Wo), ekx(N * W);
  dpo::cpu::rope_forward<double>(e.data(), x.data(), cs.data(), sn.data(), pos.data(), N, nh, nkv, D, P);
  dpo::cpu::rope_backward<double>(ex.data(), dy.data(), cs.data(), sn.data(), pos.data(), N, nh, nkv, D, P);
  dpo::cpu::swiglu_forward<double>(es.data(), xs.data(), N, I);
  dpo::cpu::swiglu_backward<double>(esx.data(), dys.data(), xs.data(), N, I);
  dpo::cpu::repeat_kv_forward<double>(ek.data(), x.data(), N, nh, nkv, D);
  dpo::cpu::repeat_kv_backward<double>(ekx.data(), dyk.data(), N, nh, nkv, D);
  const std::vector<double>* twins[] = {&e, &ex, &es, &esx, &ek, &ekx};
  const char* names[] = {"rope_forward", "rope_backward", "swiglu_forward", "swiglu_backward", "repeat_kv_forward",
                         "repeat_kv_backward"};
  for (int i = 0; i < 6; ++i) {
    SCOPED_TRACE(names[i]);
    EXPECT_TRUE(bitwise_equal(res[1][i], *twins[i]));
    EXPECT_LT(rel_to_max(res[0][i], res[1][i]), kFloatTol);
    // BF16: one rounding of the F32 result, bitwise, hence within 2^-8 relative of it element by element.
    EXPECT_TRUE(bitwise_equal(res[2][i], bf(res[0][i])));
    for (size_t j = 0; j < res[2][i].size(); ++j)
      ASSERT_LE(std::fabs(res[2][i][j] - res[0][i][j]), std::ldexp(std::fabs(res[0][i][j]), -8)) << j;
  }
  // repeat_kv forward is a copy in every dtype.
  EXPECT_TRUE(bitwise_equal(res[2][4], ek));
}

// n_kv_head == n_head: repeat_kv is the identity layout (a copy both ways).
TEST(CpuBackendLlama, RepeatKvWithoutGroupingIsACopy) {
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t N = 7, nh = 3, D = 6, W = 3 * nh * D;
  const auto x = randn<double>(g, N * W);
  Tensor y = nan_tensor({N, W}, DType::F64), dx = nan_tensor({N, W}, DType::F64);
  be->repeat_kv_forward(y, host_as(x, {N, W}, DType::F64), nh, nh);
  be->repeat_kv_backward(dx, host_as(x, {N, W}, DType::F64), nh, nh);
  EXPECT_TRUE(bitwise_equal(as_f64(y), x));
  EXPECT_TRUE(bitwise_equal(as_f64(dx), x));
}

TEST(CpuBackendLlama, BadArgumentsAreRefused) {
  auto be = dpo::make_cpu_backend();
  const int64_t N = 4, C = 6, nh = 6, nkv = 2, D = 4, P = 5, W = (nh + 2 * nkv) * D;
  auto err_of = [](const std::function<void()>& f) -> std::string {
    try {
      f();
    } catch (const dpo::Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  auto has = [](const std::string& msg, const char* part) {
    return msg.find(part) != std::string::npos ? ::testing::AssertionSuccess()
                                               : ::testing::AssertionFailure() << "'" << part << "' not in: " << msg;
  };
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dpo::dtype_name(dt));
    const DType G = dpo::grad_dtype(dt);
    Tensor x = be->zeros({N, C}, dt), out = be->zeros({N, C}, dt), w = be->zeros({C}, dt), rstd = be->zeros({N}, G);
    EXPECT_TRUE(has(err_of([&] { be->rmsnorm_forward(out, rstd, x, be->zeros({C + 1}, dt), 1e-5); }), "rmsnorm w"));
    EXPECT_TRUE(has(err_of([&] { be->rmsnorm_forward(be->zeros({N, C + 1}, dt), rstd, x, w, 1e-5); }), "rmsnorm out"));
    EXPECT_TRUE(has(err_of([&] { be->rmsnorm_forward(out, be->zeros({N + 1}, G), x, w, 1e-5); }), "rmsnorm rstd"));
    EXPECT_TRUE(has(err_of([&] {
                      be->rmsnorm_backward(out, be->zeros({C - 1}, G), x, x, w, rstd, GradWrite::Overwrite);
                    }),
                    "rmsnorm dw"));

    // RoPE: a table of the wrong width, a pos of the wrong length or dtype, a row width that is no head layout,
    // positions outside the tables (named).
    Tensor q = be->zeros({N, W}, dt), cs = be->zeros({P, D / 2}, G), sn = be->zeros({P, D / 2}, G);
    Tensor pos = be->zeros({N}, DType::I32);
    EXPECT_TRUE(has(err_of([&] { be->rope_forward(q, q, be->zeros({P, D}, G), sn, pos, nh, nkv); }), "cos"));
    EXPECT_TRUE(has(err_of([&] { be->rope_forward(q, q, cs, be->zeros({P, D}, G), pos, nh, nkv); }), "sin"));
    EXPECT_TRUE(has(err_of([&] { be->rope_forward(q, q, cs, sn, be->zeros({N + 1}, DType::I32), nh, nkv); }), "pos"));
    EXPECT_TRUE(has(err_of([&] { be->rope_forward(q, q, cs, sn, be->zeros({N}, G), nh, nkv); }), "pos"));
    EXPECT_TRUE(has(err_of([&] { be->rope_forward(q, q, cs, sn, pos, nh + 1, nkv); }), "n_kv_head"));
    EXPECT_TRUE(has(err_of([&] { be->rope_backward(q, q, cs, sn, pos, nh, 0); }), "n_kv_head"));
    const Tensor badpos = i32_tensor({0, 1, 5, 2}, {N});
    EXPECT_TRUE(has(err_of([&] { be->rope_forward(q, q, cs, sn, badpos, nh, nkv); }), "position 5 of row 2"));
    EXPECT_TRUE(has(err_of([&] { be->rope_backward(q, q, cs, sn, badpos, nh, nkv); }), "position 5 of row 2"));
    if (dt != DType::F64) {  // tables in the activation dtype instead of grad_dtype
      const DType wrong = dt == DType::BF16 ? DType::BF16 : DType::F64;
      EXPECT_THROW(be->rope_forward(q, q, be->zeros({P, D / 2}, wrong), sn, pos, nh, nkv), dpo::Error);
    }

    // SwiGLU: an odd inp width, an out of the wrong width.
    EXPECT_TRUE(has(err_of([&] { be->swiglu_forward(be->zeros({N, 3}, dt), be->zeros({N, 7}, dt)); }), "swiglu inp"));
    EXPECT_TRUE(has(err_of([&] { be->swiglu_forward(be->zeros({N, 4}, dt), be->zeros({N, 6}, dt)); }), "swiglu out"));
    EXPECT_TRUE(has(err_of([&] {
                      be->swiglu_backward(be->zeros({N, 6}, dt), be->zeros({N, 4}, dt), be->zeros({N, 6}, dt));
                    }),
                    "swiglu dout"));

    // repeat_kv: n_head not a multiple of n_kv_head; an out of the wrong width.
    Tensor kv = be->zeros({N, (4 + 2 * 3) * D}, dt);
    EXPECT_TRUE(has(err_of([&] { be->repeat_kv_forward(be->zeros({N, 3 * 4 * D}, dt), kv, 4, 3); }),
                    "not a multiple of n_kv_head"));
    EXPECT_TRUE(has(err_of([&] { be->repeat_kv_backward(kv, be->zeros({N, 3 * 4 * D}, dt), 4, 3); }),
                    "not a multiple of n_kv_head"));
    EXPECT_TRUE(has(err_of([&] { be->repeat_kv_forward(be->zeros({N, 3 * nh * D + 1}, dt), q, nh, nkv); }),
                    "repeat_kv_forward out"));
  }
  // Mixed activation dtypes.
  EXPECT_THROW(be->rmsnorm_forward(be->zeros({N, C}, DType::F64), be->zeros({N}, DType::F32),
                                   be->zeros({N, C}, DType::F32), be->zeros({C}, DType::F32), 1e-5),
               dpo::Error);
  EXPECT_THROW(be->swiglu_forward(be->zeros({N, 3}, DType::F64), be->zeros({N, 6}, DType::F32)), dpo::Error);
}

// The encoder without position embedding (undefined wpe / dwpe): out = wte[tokens] bitwise in every dtype; the
// backward's dwte is the one computed with a position table; the _pos variants ignore pos.
TEST(CpuBackendLlama, EncoderWithoutPositionEmbedding) {
  std::mt19937_64 g(test_seed());
  auto be = dpo::make_cpu_backend();
  const int64_t B = 2, T = 5, C = 7, V = 11;
  const auto wte = bf(randn<double>(g, V * C)), dout = bf(randn<double>(g, B * T * C));
  std::vector<int32_t> tok(B * T);
  std::uniform_int_distribution<int32_t> d(0, V - 1);
  for (auto& t : tok) t = d(g);
  tok[3] = tok[7];  // a repeated token
  const Tensor ttok = i32_tensor(tok, {B, T});
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dpo::dtype_name(dt));
    const DType G = dpo::grad_dtype(dt);
    const Tensor tw = host_as(wte, {V, C}, dt), tdo = host_as(dout, {B, T, C}, dt);
    Tensor out = nan_tensor({B, T, C}, dt), out2 = nan_tensor({B, T, C}, dt);
    be->encoder_forward(out, ttok, tw, Tensor());
    be->encoder_forward_pos(out2, ttok, Tensor(), tw, Tensor());
    std::vector<double> expect(B * T * C);
    for (int64_t i = 0; i < B * T; ++i)
      for (int64_t c = 0; c < C; ++c) expect[i * C + c] = wte[tok[i] * C + c];
    EXPECT_TRUE(bitwise_equal(as_f64(out), expect));
    EXPECT_TRUE(bitwise_equal(as_f64(out2), expect));
    // Backward: dwte as with a position table.
    Tensor dw_ref = be->zeros({V, C}, G), dpe = be->zeros({T, C}, G), dw1 = be->zeros({V, C}, G),
           dw2 = be->zeros({V, C}, G);
    be->encoder_backward(dw_ref, dpe, tdo, ttok);
    be->encoder_backward(dw1, Tensor(), tdo, ttok);
    be->encoder_backward_pos(dw2, Tensor(), tdo, ttok, Tensor());
    EXPECT_TRUE(bitwise_equal(as_f64(dw1), as_f64(dw_ref)));
    EXPECT_TRUE(bitwise_equal(as_f64(dw2), as_f64(dw_ref)));
  }
}

TEST(CountingBackendLlama, ForwardsTheLlamaOps) {
  auto cpu = dpo::make_cpu_backend();
  dpo::CountingBackend be(*cpu);
  const int64_t N = 3, nh = 2, nkv = 1, D = 4, W = (nh + 2 * nkv) * D, C = 8;
  Tensor x = be.zeros({N, C}, DType::F32), w = be.zeros({C}, DType::F32), r = be.zeros({N}, DType::F32);
  Tensor q = be.zeros({N, W}, DType::F32), cs = be.zeros({2, D / 2}, DType::F32), pos = be.zeros({N}, DType::I32);
  Tensor e = be.zeros({N, 3 * nh * D}, DType::F32), s = be.zeros({N, 2 * C}, DType::F32);
  be.reset();
  be.rmsnorm_forward(be.inner().zeros({N, C}, DType::F32), r, x, w, 1e-5);
  be.rmsnorm_backward(x, w, x, x, w, r, GradWrite::Accumulate);
  be.residual_rmsnorm_forward(x, be.inner().zeros({N, C}, DType::F32), r, x, x, w, 1e-5);
  be.rope_forward(q, q, cs, cs, pos, nh, nkv);
  be.rope_backward(q, q, cs, cs, pos, nh, nkv);
  be.swiglu_forward(x, s);
  be.swiglu_backward(s, x, be.inner().zeros({N, 2 * C}, DType::F32));
  be.repeat_kv_forward(e, q, nh, nkv);
  be.repeat_kv_backward(q, e, nh, nkv);
  EXPECT_EQ(be.counts().ops, 9);
  EXPECT_EQ(be.counts().waits(), 0);
}

}  // namespace
