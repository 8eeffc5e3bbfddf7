// CUDA kernels against their CPU twins: encoder, layernorm, gelu, residual (kernels/<op>.cuh vs kernels/<op>.h), AdamW,
// and the elementwise helpers fill / scale / sum_squares (kernels/elementwise.cuh, kernels/adamw.cuh vs
// kernels/adamw.h). In the shape of ggml's test_case: fresh seeded random inputs, the CPU twin in float as the
// reference, device outputs poisoned with NaN (cudaMemset 0xFF) before every launch, sizes that are not multiples of
// a warp, a block or a tile, (+=) outputs pre-filled with random values, and bitwise checks wherever the kernel
// promises them (same order of float operations as the twin, or determinism run to run).
// Without a GPU every test skips with the reason; ctest shows them as skipped, not passed.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw.cuh"
#include "kernels/adamw.h"
#include "kernels/elementwise.cuh"
#include "kernels/encoder.cuh"
#include "kernels/encoder.h"
#include "kernels/gelu.cuh"
#include "kernels/gelu.h"
#include "kernels/layernorm.cuh"
#include "kernels/layernorm.h"
#include "kernels/residual.cuh"
#include "kernels/residual.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::max_rel_err;
using test::randn;
using test::test_seed;

// A device array on the context's stream. The context's stream is non-blocking, so every transfer goes through it
// (never the legacy default stream) and is followed by a stream sync.
template <class T>
class DeviceArray {
 public:
  DeviceArray(CudaContext& ctx, int64_t n) : ctx_(&ctx), n_(n), buf_(ctx.alloc(n * static_cast<int64_t>(sizeof(T)))) {}
  DeviceArray(CudaContext& ctx, const std::vector<T>& h) : DeviceArray(ctx, static_cast<int64_t>(h.size())) {
    upload(h);
  }
  T* get() const { return static_cast<T*>(buf_->data()); }
  int64_t size() const { return n_; }
  void upload(const std::vector<T>& h) {
    ASSERT_EQ(static_cast<int64_t>(h.size()), n_);
    DPO_CUDA_CHECK(cudaMemcpyAsync(get(), h.data(), bytes(), cudaMemcpyHostToDevice, ctx_->stream()));
    ctx_->synchronize();
  }
  std::vector<T> download() const {
    std::vector<T> h(static_cast<size_t>(n_));
    DPO_CUDA_CHECK(cudaMemcpyAsync(h.data(), get(), bytes(), cudaMemcpyDeviceToHost, ctx_->stream()));
    ctx_->synchronize();
    return h;
  }
  // All bytes 0xFF: a NaN for float and double, so an element the kernel forgets to write shows up.
  void poison() { DPO_CUDA_CHECK(cudaMemsetAsync(get(), 0xFF, bytes(), ctx_->stream())); }

 private:
  size_t bytes() const { return static_cast<size_t>(n_) * sizeof(T); }
  CudaContext* ctx_;
  int64_t n_;
  std::shared_ptr<Buffer> buf_;
};

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// max |got - ref| / max(1, max |ref|) (test_util.h); NaN anywhere makes it NaN, which fails every `<=`.
double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  return max_rel_err(to_double(got), to_double(ref));
}

using test::bitwise_equal;

// Fixture: skips without a GPU, owns the context, and hands out seeded random inputs. Public so that the shared
// case functions below can use it.
class CudaKernelTest : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    ctx_ = std::make_unique<CudaContext>(0);
    gen_.seed(test_seed());
  }
  CudaContext& ctx() { return *ctx_; }
  std::vector<float> rand(size_t n, double scale = 1.0, double offset = 0.0) {
    std::vector<float> v = randn<float>(gen_, n, scale);
    for (auto& x : v) x += static_cast<float>(offset);
    return v;
  }
  std::vector<int32_t> tokens(size_t n, int64_t V) {
    std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(V - 1));
    std::vector<int32_t> t(n);
    for (auto& x : t) x = d(gen_);
    return t;
  }

  std::unique_ptr<CudaContext> ctx_;  // declared before any DeviceArray of a test body, so it outlives them
  std::mt19937_64 gen_;
};

using CudaEncoder = CudaKernelTest;
using CudaLayerNorm = CudaKernelTest;
using CudaGelu = CudaKernelTest;
using CudaResidual = CudaKernelTest;
using CudaAdamW = CudaKernelTest;
using CudaElementwise = CudaKernelTest;

// --- encoder --------------------------------------------------------------------------------------------------------
// Both directions do the twin's float operations in the twin's order (one add per output in the forward; (b,t)
// ascending in the backward), so GPU and CPU agree bitwise: no tolerance is needed.

TEST_F(CudaEncoder, ForwardMatchesCpuBitwise) {
  const int64_t B = 3, T = 13, C = 77, V = 53, maxT = 20;
  auto tok = tokens(B * T, V);
  auto wte = rand(V * C), wpe = rand(maxT * C);
  std::vector<float> ref(B * T * C);
  cpu::encoder_forward<float>(ref.data(), tok.data(), wte.data(), wpe.data(), B, T, C);

  DeviceArray<int32_t> d_tok(ctx(), tok);
  DeviceArray<float> d_wte(ctx(), wte), d_wpe(ctx(), wpe), d_out(ctx(), B * T * C);
  d_out.poison();
  cuda::encoder_forward(ctx(), d_out.get(), d_tok.get(), d_wte.get(), d_wpe.get(), B, T, C, V);
  EXPECT_TRUE(bitwise_equal(d_out.download(), ref));
}

TEST_F(CudaEncoder, ForwardOutOfRangeTokenGivesNaNRow) {
  const int64_t B = 2, T = 5, C = 33, V = 7;
  auto tok = tokens(B * T, V);
  tok[3] = static_cast<int32_t>(V);
  tok[8] = -1;
  auto wte = rand(V * C), wpe = rand(T * C);
  DeviceArray<int32_t> d_tok(ctx(), tok);
  DeviceArray<float> d_wte(ctx(), wte), d_wpe(ctx(), wpe), d_out(ctx(), B * T * C);
  d_out.poison();
  cuda::encoder_forward(ctx(), d_out.get(), d_tok.get(), d_wte.get(), d_wpe.get(), B, T, C, V);
  const auto out = d_out.download();
  for (int64_t bt = 0; bt < B * T; ++bt)
    for (int64_t c = 0; c < C; ++c) {
      const float o = out[bt * C + c];
      if (bt == 3 || bt == 8)
        EXPECT_TRUE(std::isnan(o)) << bt << "," << c;
      else
        EXPECT_EQ(o, wte[tok[bt] * C + c] + wpe[(bt % T) * C + c]) << bt << "," << c;
    }
}

// (+=) into random grads, run twice (so the second call accumulates onto the first) and compared with the CPU twin
// run twice; then the whole thing again from the same start must give the same bits. Sizes cover several ranges of
// sorted positions (B*T > 128), two channel tiles (C > 128), repeated tokens (every run shorter than
// kEncoderSegmentRows, so the twin's order and bitwise equality), and rows of dwpe beyond T that must stay untouched.
void encoder_backward_case(CudaKernelTest& f, int64_t B, int64_t T, int64_t C, int64_t V, int64_t maxT) {
  SCOPED_TRACE("B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
               " V=" + std::to_string(V));
  auto tok = f.tokens(B * T, V);
  tok[B * T - 1] = tok[0];               // at least one repeat
  tok[1] = static_cast<int32_t>(V - 1);  // the last row of the last row block
  auto dout = f.rand(B * T * C), dwte0 = f.rand(V * C), dwpe0 = f.rand(maxT * C);
  std::vector<float> ref_wte = dwte0, ref_wpe = dwpe0;
  for (int rep = 0; rep < 2; ++rep)
    cpu::encoder_backward<float>(ref_wte.data(), ref_wpe.data(), dout.data(), tok.data(), B, T, C);

  DeviceArray<int32_t> d_tok(f.ctx(), tok);
  DeviceArray<float> d_dout(f.ctx(), dout), d_wte(f.ctx(), dwte0), d_wpe(f.ctx(), dwpe0);
  std::vector<float> first_wte, first_wpe;
  for (int run = 0; run < 2; ++run) {
    d_wte.upload(dwte0);
    d_wpe.upload(dwpe0);
    for (int rep = 0; rep < 2; ++rep)
      cuda::encoder_backward(f.ctx(), d_wte.get(), d_wpe.get(), d_dout.get(), d_tok.get(), B, T, C, V);
    auto got_wte = d_wte.download(), got_wpe = d_wpe.download();
    EXPECT_TRUE(bitwise_equal(got_wte, ref_wte)) << "dwte, run " << run << ", rel err " << rel_err(got_wte, ref_wte);
    EXPECT_TRUE(bitwise_equal(got_wpe, ref_wpe)) << "dwpe, run " << run << ", rel err " << rel_err(got_wpe, ref_wpe);
    if (run == 0) {
      first_wte = got_wte;
      first_wpe = got_wpe;
    } else {
      EXPECT_TRUE(bitwise_equal(got_wte, first_wte)) << "dwte differs between two identical runs";
      EXPECT_TRUE(bitwise_equal(got_wpe, first_wpe)) << "dwpe differs between two identical runs";
    }
  }
}

TEST_F(CudaEncoder, BackwardAccumulatesAndMatchesCpuBitwise) {
  encoder_backward_case(*this, 3, 13, 77, 53, 20);
  encoder_backward_case(*this, 5, 233, 130, 1031, 240);
}

// --- layernorm ------------------------------------------------------------------------------------------------------
// Tolerances. The kernel keeps fp32 statistics; each warp sums a row as 32 lane chains of C/32 terms plus a 5-level
// butterfly, so a statistic carries at most ~(C/32 + 5) float roundings (eps_f = 6e-8): ~1e-6 relative for C = 770.
// The CPU twin sums in double and rounds once. An output is xn*w + b with |xn| <~ 4, |w|, |b| <~ 3, so the absolute
// error is <~ 1e-6 * 15 while the scale max(1, max|ref|) is ~10: 1e-5 relative leaves a 10x margin, and a wrong
// index, a missing term or a stale row is off by O(1).
constexpr double kLayerNormTol = 1e-5;

void layernorm_forward_case(CudaKernelTest& f, int64_t N, int64_t C, double offset, double spread) {
  SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C) + " offset=" + std::to_string(offset));
  const double eps = 1e-5;
  auto inp = f.rand(N * C, spread, offset), w = f.rand(C), b = f.rand(C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C, eps);

  DeviceArray<float> d_inp(f.ctx(), inp), d_w(f.ctx(), w), d_b(f.ctx(), b);
  DeviceArray<float> d_out(f.ctx(), N * C), d_mean(f.ctx(), N), d_rstd(f.ctx(), N);
  d_out.poison();
  d_mean.poison();
  d_rstd.poison();
  cuda::layernorm_forward(f.ctx(), d_out.get(), d_mean.get(), d_rstd.get(), d_inp.get(), d_w.get(), d_b.get(), N, C,
                          eps);
  EXPECT_LE(rel_err(d_out.download(), out), kLayerNormTol);
  // mean: with an offset the scale is |mean| and the float result is the rounding of x0 + delta (<= 1 ulp + the
  // delta's error); rstd ~ 0.5 is compared on the scale 1.
  EXPECT_LE(rel_err(d_mean.download(), mean), kLayerNormTol);
  EXPECT_LE(rel_err(d_rstd.download(), rstd), kLayerNormTol);
}

TEST_F(CudaLayerNorm, ForwardMatchesCpu) {
  layernorm_forward_case(*this, 37, 77, 0.5, 2.0);
  layernorm_forward_case(*this, 45, 770, 0.0, 2.0);
  layernorm_forward_case(*this, 1, 1, 0.0, 1.0);  // one channel: var = 0, out = b
}

// |mean| >> std, as in some channels of GPT-2's residual stream. An unshifted fp32 sum of 770 values near 1e4 runs
// up to 7.7e6, where one rounding is ulp/2 = 0.25: the mean is off by ~1e-3 std and so is every output, tens of times
// the tolerance. The kernel's shifted sums (x - x[0] is exact here) carry only the spread, as the double twin does.
TEST_F(CudaLayerNorm, ForwardLargeMeanSmallSpread) { layernorm_forward_case(*this, 37, 770, 1e4, 1.0); }

// dinp, dw, db (+=) from random pre-filled values, with the CPU forward's mean/rstd as input to both. N = 1041 rows
// gives 33 row chunks of 32 (the last one partial) for the dw/db partials, C = 77 less than one channel tile.
// Tolerance: dinp as the forward (1e-5). dw, db sum N terms: per channel the kernel does a float chain of <= 32 rows
// and then a chain over 33 chunks, <= ~65 roundings. The worst case, 65 eps_f * sum|term| (~ 4e-6 * 1041 * 0.8) over
// a scale of max|ref| ~ 3 sqrt(N) ~ 100, is ~3e-5; random-sign rounding makes the expected error ~sqrt(65) eps_f ~
// 5e-7. 2e-5 sits between, and a dropped or doubled row moves a channel by ~1, i.e. 1e-2 of the scale.
TEST_F(CudaLayerNorm, BackwardAccumulatesAndMatchesCpu) {
  const int64_t N = 1041, C = 77;
  auto inp = rand(N * C, 1.5, 0.3), w = rand(C), b = rand(C), dout = rand(N * C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C, 1e-5);
  auto dinp0 = rand(N * C), dw0 = rand(C), db0 = rand(C);
  // Twice: the second call accumulates onto the first.
  std::vector<float> ref_dinp = dinp0, ref_dw = dw0, ref_db = db0;
  for (int rep = 0; rep < 2; ++rep)
    cpu::layernorm_backward<float>(ref_dinp.data(), ref_dw.data(), ref_db.data(), dout.data(), inp.data(), w.data(),
                                   mean.data(), rstd.data(), N, C);

  DeviceArray<float> d_inp(ctx(), inp), d_w(ctx(), w), d_dout(ctx(), dout), d_mean(ctx(), mean), d_rstd(ctx(), rstd);
  DeviceArray<float> d_dinp(ctx(), dinp0), d_dw(ctx(), dw0), d_db(ctx(), db0);
  for (int rep = 0; rep < 2; ++rep)
    cuda::layernorm_backward(ctx(), d_dinp.get(), d_dw.get(), d_db.get(), d_dout.get(), d_inp.get(), d_w.get(),
                             d_mean.get(), d_rstd.get(), N, C);
  EXPECT_LE(rel_err(d_dinp.download(), ref_dinp), kLayerNormTol);
  EXPECT_LE(rel_err(d_dw.download(), ref_dw), 2e-5);
  EXPECT_LE(rel_err(d_db.download(), ref_db), 2e-5);
}

// Promised: no atomics, fixed chunking; the same inputs give the same bits. Large enough for 512 row chunks.
TEST_F(CudaLayerNorm, BackwardIsBitwiseDeterministic) {
  const int64_t N = 16411, C = 203;
  auto inp = rand(N * C), w = rand(C), b = rand(C), dout = rand(N * C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C, 1e-5);
  auto dinp0 = rand(N * C), dw0 = rand(C), db0 = rand(C);
  DeviceArray<float> d_inp(ctx(), inp), d_w(ctx(), w), d_dout(ctx(), dout), d_mean(ctx(), mean), d_rstd(ctx(), rstd);
  DeviceArray<float> d_dinp(ctx(), N * C), d_dw(ctx(), C), d_db(ctx(), C);
  std::vector<float> first[3];
  for (int run = 0; run < 2; ++run) {
    d_dinp.upload(dinp0);
    d_dw.upload(dw0);
    d_db.upload(db0);
    cuda::layernorm_backward(ctx(), d_dinp.get(), d_dw.get(), d_db.get(), d_dout.get(), d_inp.get(), d_w.get(),
                             d_mean.get(), d_rstd.get(), N, C);
    std::vector<float> got[3] = {d_dinp.download(), d_dw.download(), d_db.download()};
    for (int k = 0; k < 3; ++k) {
      if (run == 0)
        first[k] = got[k];
      else
        EXPECT_TRUE(bitwise_equal(got[k], first[k])) << "output " << k << " differs between two identical runs";
    }
  }
}

// --- gelu -----------------------------------------------------------------------------------------------------------
// The same float formula as the twin; they differ by tanhf (<= 2 ulp on the GPU, CUDA math API) against the host's
// tanhf (<= 1 ulp). Forward: out = 0.5 x (1 + tanh), an error of 3 ulp(1) in tanh moves out by <= 0.5 |x| 3.6e-7,
// ~2e-6 at |x| = 10, over a scale max(1, max|ref|) ~ 10: 1e-6 relative is a 5x margin. Backward: gelu' contains
// 1 - th^2 times 0.5 x sqrt(2/pi)(1 + 3k x^2) (<~ 5 for |x| < 10), so 3 ulp of th give <~ 4e-6 absolute per unit of
// dout (|dout| <~ 4) over a scale ~ 5: 5e-6 relative. A wrong coefficient changes results by O(0.1).
TEST_F(CudaGelu, ForwardMatchesCpu) {
  const int64_t N = 37 * 77 + 5;
  auto inp = rand(N, 3.0);
  std::vector<float> ref(N);
  cpu::gelu_forward<float>(ref.data(), inp.data(), N);
  DeviceArray<float> d_inp(ctx(), inp), d_out(ctx(), N);
  d_out.poison();
  cuda::gelu_forward(ctx(), d_out.get(), d_inp.get(), N);
  EXPECT_LE(rel_err(d_out.download(), ref), 1e-6);
}

TEST_F(CudaGelu, BackwardAccumulatesAndMatchesCpu) {
  const int64_t N = 37 * 77 + 5;
  auto inp = rand(N, 3.0), dout = rand(N), dinp0 = rand(N);
  std::vector<float> ref = dinp0;
  cpu::gelu_backward<float>(ref.data(), dout.data(), inp.data(), N);
  DeviceArray<float> d_inp(ctx(), inp), d_dout(ctx(), dout), d_dinp(ctx(), dinp0);
  cuda::gelu_backward(ctx(), d_dinp.get(), d_dout.get(), d_inp.get(), N);
  EXPECT_LE(rel_err(d_dinp.download(), ref), 5e-6);
}

// --- residual -------------------------------------------------------------------------------------------------------
// One float add per output, as in the twin: bitwise equal.
TEST_F(CudaResidual, ForwardMatchesCpuBitwiseAndAllowsAliasing) {
  const int64_t N = 37 * 77;
  auto a = rand(N), b = rand(N);
  std::vector<float> ref(N);
  cpu::residual_forward<float>(ref.data(), a.data(), b.data(), N);
  DeviceArray<float> d_a(ctx(), a), d_b(ctx(), b), d_out(ctx(), N);
  d_out.poison();
  cuda::residual_forward(ctx(), d_out.get(), d_a.get(), d_b.get(), N);
  EXPECT_TRUE(bitwise_equal(d_out.download(), ref));
  cuda::residual_forward(ctx(), d_a.get(), d_a.get(), d_b.get(), N);  // out aliases a
  EXPECT_TRUE(bitwise_equal(d_a.download(), ref));
}

TEST_F(CudaResidual, BackwardAccumulatesAndMatchesCpuBitwise) {
  const int64_t N = 37 * 77;
  auto dout = rand(N), da0 = rand(N), db0 = rand(N);
  std::vector<float> ref_a = da0, ref_b = db0;
  cpu::residual_backward<float>(ref_a.data(), ref_b.data(), dout.data(), N);
  DeviceArray<float> d_dout(ctx(), dout), d_da(ctx(), da0), d_db(ctx(), db0);
  cuda::residual_backward(ctx(), d_da.get(), d_db.get(), d_dout.get(), N);
  EXPECT_TRUE(bitwise_equal(d_da.download(), ref_a));
  EXPECT_TRUE(bitwise_equal(d_db.download(), ref_b));
}

// --- adamw ----------------------------------------------------------------------------------------------------------
// The kernel does each element's ~10 operations in float (fp32 state), the twin in double rounded once per stored
// value. Per step the float chain adds <~ 10 eps_f relative to each quantity's scale (param and m ~ 1, v ~ 0.01..1,
// the update ~ lr = 1e-2); three chained steps <~ 30 eps_f = 2e-6 worst case, with the scale max(1, max|ref|) >= 1.
// 2e-6 holds that; a wrong bias correction or a swapped beta moves values by >= 1e-3 of the scale.
TEST_F(CudaAdamW, UpdateMatchesCpu) {
  const int64_t n = 10007;
  auto param = rand(n), grad = rand(n), m = rand(n, 0.1), v = rand(n, 0.1);
  for (auto& x : v) x = x * x;  // second moments are non-negative
  AdamWParams p;
  p.lr = 1e-2;
  p.weight_decay = 0.1;
  p.grad_scale = 0.7;
  std::vector<float> rp = param, rm = m, rv = v;
  DeviceArray<float> d_p(ctx(), param), d_g(ctx(), grad), d_m(ctx(), m), d_v(ctx(), v);
  for (int64_t step = 4; step <= 6; ++step) {
    p.step = step;
    cpu::adamw_update<float>(rp.data(), grad.data(), rm.data(), rv.data(), n, p);
    cuda::adamw_update(ctx(), d_p.get(), d_g.get(), d_m.get(), d_v.get(), n, p);
  }
  EXPECT_LE(rel_err(d_p.download(), rp), 2e-6);
  EXPECT_LE(rel_err(d_m.download(), rm), 2e-6);
  EXPECT_LE(rel_err(d_v.download(), rv), 2e-6);
  EXPECT_TRUE(bitwise_equal(d_g.download(), grad)) << "grad is read only";
}

// The first step from zero state (bias corrections at their largest) with default hyper-parameters.
TEST_F(CudaAdamW, FirstStepFromZeroState) {
  const int64_t n = 4099;
  auto param = rand(n), grad = rand(n, 1e-3);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  AdamWParams p;
  p.lr = 3e-4;
  p.step = 1;
  std::vector<float> rp = param, rm = m, rv = v;
  cpu::adamw_update<float>(rp.data(), grad.data(), rm.data(), rv.data(), n, p);
  DeviceArray<float> d_p(ctx(), param), d_g(ctx(), grad), d_m(ctx(), m), d_v(ctx(), v);
  cuda::adamw_update(ctx(), d_p.get(), d_g.get(), d_m.get(), d_v.get(), n, p);
  EXPECT_LE(rel_err(d_p.download(), rp), 1e-6);
  // m ~ 1e-4 and v ~ 1e-9: compare on their own scale, not on max(1, .).
  auto scaled = [](std::vector<float> a, double s) {
    for (auto& x : a) x = static_cast<float>(x / s);
    return a;
  };
  EXPECT_LE(rel_err(scaled(d_m.download(), 1e-4), scaled(rm, 1e-4)), 1e-6);
  EXPECT_LE(rel_err(scaled(d_v.download(), 1e-9), scaled(rv, 1e-9)), 1e-6);
}

// --- fill / scale / sum_squares
// ---------------------------------------------------------------------------------------

// float(double(x) * s) on both sides: bitwise equal.
TEST_F(CudaElementwise, ScaleMatchesCpuBitwise) {
  const int64_t n = 100003;
  auto x = rand(n);
  std::vector<float> ref = x;
  cpu::scale<float>(ref.data(), n, 0.3711);
  DeviceArray<float> d_x(ctx(), x);
  cuda::scale(ctx(), d_x.get(), n, 0.3711);
  EXPECT_TRUE(bitwise_equal(d_x.download(), ref));
}

TEST_F(CudaElementwise, FillWritesEveryElement) {
  const int64_t n = 77777;
  DeviceArray<float> d_x(ctx(), n);
  d_x.poison();
  cuda::fill(ctx(), d_x.get(), n, 3.25f);
  EXPECT_EQ(d_x.download(), std::vector<float>(n, 3.25f));
}

// Both sides accumulate in double; they differ only in order, by <~ (log2(threads) + n / (blocks*threads) + 10)
// eps_d ~ 1e-14 relative for these sizes. 1e-12 is a 100x margin; a dropped or doubled element moves the sum by ~1/n
// (>= 1e-6 here). Run twice, the GPU result must be the same bits.
TEST_F(CudaElementwise, SumSquaresMatchesCpuAndIsDeterministic) {
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{3 * 4096 + 5}, int64_t{1000003}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    auto x = rand(static_cast<size_t>(n));
    const double ref = cpu::sum_squares<float>(x.data(), n);
    DeviceArray<float> d_x(ctx(), std::max<int64_t>(n, 1));
    if (n > 0) d_x.upload(x);
    DeviceArray<double> d_out(ctx(), 1);
    double got[2];
    for (int run = 0; run < 2; ++run) {
      d_out.poison();
      cuda::sum_squares(ctx(), d_out.get(), d_x.get(), n);
      got[run] = d_out.download()[0];
    }
    EXPECT_LE(std::fabs(got[0] - ref), 1e-12 * std::max(1.0, ref)) << got[0] << " vs " << ref;
    EXPECT_EQ(std::memcmp(&got[0], &got[1], sizeof(double)), 0) << "two identical runs differ";
  }
}

TEST_F(CudaElementwise, SumSquaresPropagatesNaN) {
  auto x = rand(5000);
  x[4321] = std::numeric_limits<float>::quiet_NaN();
  DeviceArray<float> d_x(ctx(), x);
  DeviceArray<double> d_out(ctx(), 1);
  cuda::sum_squares(ctx(), d_out.get(), d_x.get(), 5000);
  EXPECT_TRUE(std::isnan(d_out.download()[0]));
}

// n = 2^31 + 7 floats (8.6 GB): every index above 2^31 must be reached by fill, scale and sum_squares. Poisoned
// first, filled with 1, scaled by 0.5, so every element is 0.5 and the sum of squares is exactly n / 4 (all partial
// sums are multiples of 1/4 below 2^53, so the double sum is exact in any order): a skipped element leaves NaN or
// 1.0 behind and changes the sum. Skipped when the device lacks the memory.
TEST_F(CudaElementwise, FillScaleSumSquaresBeyond2Pow31) {
  const int64_t n = (int64_t{1} << 31) + 7;
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  size_t free_bytes = 0, total_bytes = 0;
  DPO_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < bytes + (size_t{1} << 30))
    GTEST_SKIP() << "needs " << (bytes >> 20) + 1024 << " MiB of free device memory, " << (free_bytes >> 20)
                 << " MiB free";
  DeviceArray<float> d_x(ctx(), n);
  d_x.poison();
  cuda::fill(ctx(), d_x.get(), n, 1.0f);
  cuda::scale(ctx(), d_x.get(), n, 0.5);
  DeviceArray<double> d_out(ctx(), 1);
  cuda::sum_squares(ctx(), d_out.get(), d_x.get(), n);
  EXPECT_EQ(d_out.download()[0], static_cast<double>(n) * 0.25);
  // Spot checks around 2^31 and at the very end.
  for (int64_t at : {(int64_t{1} << 31) - 8, n - 16}) {
    std::vector<float> h(16);
    DPO_CUDA_CHECK(
        cudaMemcpyAsync(h.data(), d_x.get() + at, 16 * sizeof(float), cudaMemcpyDeviceToHost, ctx().stream()));
    ctx().synchronize();
    EXPECT_EQ(h, std::vector<float>(16, 0.5f)) << "at " << at;
  }
}

}  // namespace
}  // namespace dpo
