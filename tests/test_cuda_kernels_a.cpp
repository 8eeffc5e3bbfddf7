// CUDA kernels against their CPU twins: encoder, layernorm, gelu, residual (kernels/<op>.cuh vs kernels/<op>.h), AdamW,
// and the elementwise helpers fill / scale / sum_squares (kernels/elementwise.cuh, kernels/adamw.cuh vs
// kernels/adamw.h). In the shape of ggml's test_case: fresh seeded random inputs, the CPU twin in float as the
// reference, device outputs poisoned with NaN (cudaMemset 0xFF) before every launch, sizes that are not multiples of
// a warp, a block or a tile, (+=) outputs pre-filled with random values, and bitwise checks wherever the kernel
// promises them (same order of float operations as the twin, or determinism run to run).
// Without a GPU every test skips with the reason; ctest shows them as skipped, not passed.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
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

// --- views at element offsets: 128-bit bodies, scalar edges ---------------------------------------------------------
// The memory-bound kernels move the 16-byte-aligned body of each view with 128-bit loads and stores and its head and
// tail element by element (kernels/bf16.cuh). These cases put every array of a call at element offsets 0..7 inside a
// buffer poisoned with NaN (all bytes 0xFF, a NaN in fp32 and bf16), so the head takes every length from 0 to one
// vector less one, with lengths 1, 7, 8, 9, 1023, 4097 (shorter than, equal to, one past a vector, and long bodies
// with every tail). Checks: the values against the CPU twin (bitwise where the twin's arithmetic is the kernel's);
// the same values when the arrays cannot be aligned together (one array one element further: everything scalar), so
// the vector path's per-element arithmetic is the scalar path's bit for bit; and every byte outside the view still
// 0xFF (a read outside an input view would also show, as a NaN in the output).

using bf16 = __nv_bfloat16;
float to_f(float x) { return x; }
float to_f(bf16 x) { return __bfloat162float(x); }
template <class T>
T from_f(float x);
template <>
float from_f<float>(float x) {
  return x;
}
template <>
bf16 from_f<bf16>(float x) {
  return __float2bfloat16_rn(x);
}
// x rounded to T and back: the value a T view holds.
template <class T>
std::vector<float> exact(std::vector<float> v) {
  for (auto& x : v) x = to_f(from_f<T>(x));
  return v;
}
template <class T>
const char* type_name() {
  return sizeof(T) == 4 ? "fp32" : "bf16";
}

constexpr int64_t kViewSizes[] = {1, 7, 8, 9, 1023, 4097};
constexpr int64_t kViewPad = 16;  // poisoned elements after a view (more than one 16-byte vector of either type)

// n elements of T at element offset `off` of a device buffer whose other bytes are all 0xFF.
template <class T>
class View {
 public:
  View(CudaContext& ctx, int64_t off, int64_t n, const std::vector<float>& vals = {})
      : off_(off), n_(n), buf_(ctx, off + n + kViewPad) {
    std::vector<T> h(static_cast<size_t>(buf_.size()));
    std::memset(h.data(), 0xFF, h.size() * sizeof(T));
    for (size_t i = 0; i < vals.size(); ++i) h[static_cast<size_t>(off) + i] = from_f<T>(vals[i]);
    buf_.upload(h);
  }
  T* get() const { return buf_.get() + off_; }
  std::vector<float> read() const {
    const auto h = buf_.download();
    std::vector<float> v(static_cast<size_t>(n_));
    for (int64_t i = 0; i < n_; ++i) v[static_cast<size_t>(i)] = to_f(h[static_cast<size_t>(off_ + i)]);
    return v;
  }
  // Every element outside the view still has all bytes 0xFF.
  bool outside_untouched() const {
    const auto h = buf_.download();
    for (int64_t i = 0; i < buf_.size(); ++i) {
      if (i >= off_ && i < off_ + n_) continue;
      const auto* b = reinterpret_cast<const unsigned char*>(&h[static_cast<size_t>(i)]);
      for (size_t k = 0; k < sizeof(T); ++k)
        if (b[k] != 0xFF) return false;
    }
    return true;
  }

 private:
  int64_t off_, n_;
  DeviceArray<T> buf_;
};

// The spacing of bf16 numbers at |x| (2^(e-7) for |x| in [2^e, 2^(e+1)); the smallest normal's below).
double ulp_bf16(double x) {
  const double a = std::max(std::fabs(x), static_cast<double>(FLT_MIN));
  return std::ldexp(1.0, std::ilogb(a) - 7);
}

// got against the fp32 reference ref (unrounded): fp32 outputs within rel_tol * max(1, max|ref|) (as the fp32 tests
// above); bf16 outputs within one bf16 ulp of ref plus that (the GPU's fp32 result and the twin's differ by at most
// the fp32 budget, and each is rounded once: tests/test_cuda_bf16.cpp derives the bound).
template <class T>
void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double rel_tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size());
  double scale = 1.0;
  for (float r : ref) scale = std::max(scale, std::fabs(static_cast<double>(r)));
  for (size_t i = 0; i < got.size(); ++i) {
    const double mag = std::max(std::fabs(static_cast<double>(got[i])), std::fabs(static_cast<double>(ref[i])));
    const double tol = rel_tol * scale + (sizeof(T) == 2 ? ulp_bf16(mag) : 0.0);
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(ref[i]));
    if (!(err <= tol)) {  // NaN fails
      ADD_FAILURE() << what << ": element " << i << " got " << got[i] << " want " << ref[i] << " (tol " << tol << ")";
      return;
    }
  }
}

template <class T>
std::vector<float> rounded(std::vector<float> v) {
  return exact<T>(std::move(v));
}

template <class T>
void residual_gelu_views_case(CudaKernelTest& f) {
  for (int64_t n : kViewSizes) {
    for (int64_t off = 0; off < 8; ++off) {
      SCOPED_TRACE(std::string(type_name<T>()) + " n=" + std::to_string(n) + " off=" + std::to_string(off));
      const int64_t off2 = (off + 1) % 8;  // never congruent to off modulo one vector: the all-scalar path
      const auto a = exact<T>(f.rand(n)), b = exact<T>(f.rand(n)), d = exact<T>(f.rand(n)),
                 acc0 = exact<T>(f.rand(n));
      // residual forward: one float add per element, rounded once: bitwise the twin rounded.
      std::vector<float> ref(n);
      cpu::residual_forward<float>(ref.data(), a.data(), b.data(), n);
      ref = rounded<T>(ref);
      for (int64_t oa : {off, off2}) {
        View<T> out(f.ctx(), off, n), va(f.ctx(), oa, n, a), vb(f.ctx(), off, n, b);
        cuda::residual_forward(f.ctx(), out.get(), va.get(), vb.get(), n);
        EXPECT_TRUE(bitwise_equal(out.read(), ref)) << "residual_forward, a at offset " << oa;
        EXPECT_TRUE(out.outside_untouched()) << "residual_forward wrote outside its view";
      }
      // residual backward (+=): da = da0 + d, db = db0 + d, each rounded once.
      std::vector<float> ref_da = acc0, ref_db = a;
      cpu::residual_backward<float>(ref_da.data(), ref_db.data(), d.data(), n);
      ref_da = rounded<T>(ref_da);
      ref_db = rounded<T>(ref_db);
      for (int64_t od : {off, off2}) {
        View<T> da(f.ctx(), off, n, acc0), db(f.ctx(), off, n, a), vd(f.ctx(), od, n, d);
        cuda::residual_backward(f.ctx(), da.get(), db.get(), vd.get(), n);
        EXPECT_TRUE(bitwise_equal(da.read(), ref_da)) << "residual_backward da, dout at offset " << od;
        EXPECT_TRUE(bitwise_equal(db.read(), ref_db)) << "residual_backward db, dout at offset " << od;
        EXPECT_TRUE(da.outside_untouched() && db.outside_untouched()) << "residual_backward wrote outside its views";
      }
      // gelu: against the twin within the fp32 tests' budgets (tanhf differs from libm by a few ulp), and the
      // vector path bitwise equal to the all-scalar path.
      std::vector<float> gref(n), gref_d = acc0;
      cpu::gelu_forward<float>(gref.data(), a.data(), n);
      cpu::gelu_backward<float>(gref_d.data(), d.data(), a.data(), n);
      std::vector<float> fwd[2], bwd[2];
      int k = 0;
      for (int64_t oi : {off, off2}) {
        View<T> out(f.ctx(), off, n), inp(f.ctx(), oi, n, a), dinp(f.ctx(), off, n, acc0), dout(f.ctx(), off, n, d);
        cuda::gelu_forward(f.ctx(), out.get(), inp.get(), n);
        cuda::gelu_backward(f.ctx(), dinp.get(), dout.get(), inp.get(), n);
        fwd[k] = out.read();
        bwd[k] = dinp.read();
        EXPECT_TRUE(out.outside_untouched() && dinp.outside_untouched()) << "gelu wrote outside its views";
        ++k;
      }
      expect_close<T>(fwd[0], gref, 1e-6, "gelu_forward");
      expect_close<T>(bwd[0], gref_d, 5e-6, "gelu_backward");
      EXPECT_TRUE(bitwise_equal(fwd[0], fwd[1])) << "gelu_forward: vector and scalar paths differ";
      EXPECT_TRUE(bitwise_equal(bwd[0], bwd[1])) << "gelu_backward: vector and scalar paths differ";
    }
  }
}

using CudaViews = CudaKernelTest;

TEST_F(CudaViews, ResidualAndGeluAtEveryOffsetFp32) { residual_gelu_views_case<float>(*this); }
TEST_F(CudaViews, ResidualAndGeluAtEveryOffsetBf16) { residual_gelu_views_case<bf16>(*this); }

// convert fp32 <-> bf16: one rounding to nearest even per element (host __float2bfloat16_rn, the same operation):
// bitwise. The pair aligns together when both views sit at the same element offset (then 8 elements are one bf16
// vector and two float vectors); the bf16 view one element further forces the scalar path.
TEST_F(CudaViews, ConvertFp32Bf16AtEveryOffset) {
  for (int64_t n : kViewSizes) {
    for (int64_t off = 0; off < 8; ++off) {
      SCOPED_TRACE("n=" + std::to_string(n) + " off=" + std::to_string(off));
      auto x = rand(n, 3.0);
      x[0] = 1.0f + 1.0f / 256.0f;  // a tie: rounds to even (1.0)
      const auto xb = exact<bf16>(x);
      for (int64_t ob : {off, (off + 1) % 8}) {
        View<float> src(ctx(), off, n, x), back(ctx(), off, n);
        View<bf16> dst(ctx(), ob, n);
        cuda::convert(ctx(), dst.get(), src.get(), n);
        EXPECT_TRUE(bitwise_equal(dst.read(), xb)) << "fp32 -> bf16, bf16 view at offset " << ob;
        cuda::convert(ctx(), back.get(), dst.get(), n);
        EXPECT_TRUE(bitwise_equal(back.read(), xb)) << "bf16 -> fp32 (exact), bf16 view at offset " << ob;
        EXPECT_TRUE(dst.outside_untouched() && back.outside_untouched()) << "convert wrote outside its view";
      }
    }
  }
}

// LayerNorm rows of C in {1, 7, 8, 9, 1023}: every row is split on its own (a row starts at off + r*C, so
// consecutive rows have different heads when C is not a multiple of the vector width). inp, out, w, b (and dinp,
// dout) at offset off; once more with w one element further (the rows' scalar path). Budgets as the fp32 tests
// above (kLayerNormTol; each lane's chain stays ~C/32 terms); the two paths agree within the same budget, not
// bitwise, since which lane adds which element, and so the rounding of the row sums, follows the split.
template <class T>
void layernorm_views_case(CudaKernelTest& f) {
  const int64_t N = 5;
  for (int64_t C : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{1023}}) {
    for (int64_t off = 0; off < 8; ++off) {
      SCOPED_TRACE(std::string(type_name<T>()) + " C=" + std::to_string(C) + " off=" + std::to_string(off));
      const auto inp = exact<T>(f.rand(N * C, 1.5, 0.3)), w = exact<T>(f.rand(C)), b = exact<T>(f.rand(C)),
                 dout = exact<T>(f.rand(N * C)), dinp0 = exact<T>(f.rand(N * C));
      std::vector<float> out(N * C), mean(N), rstd(N);
      cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C, 1e-5);
      std::vector<float> ref_dinp = dinp0, dw(C, 0.0f), db(C, 0.0f);
      cpu::layernorm_backward<float>(ref_dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(),
                                     mean.data(), rstd.data(), N, C);
      for (int64_t ow : {off, (off + 1) % 8}) {
        View<T> vi(f.ctx(), off, N * C, inp), vw(f.ctx(), ow, C, w), vb(f.ctx(), off, C, b), vo(f.ctx(), off, N * C);
        DeviceArray<float> d_mean(f.ctx(), N), d_rstd(f.ctx(), N);
        cuda::layernorm_forward(f.ctx(), vo.get(), d_mean.get(), d_rstd.get(), vi.get(), vw.get(), vb.get(), N, C,
                                1e-5);
        expect_close<T>(vo.read(), out, kLayerNormTol, "layernorm_forward out, w at offset " + std::to_string(ow));
        EXPECT_TRUE(vo.outside_untouched()) << "layernorm_forward wrote outside its view";
        // Backward from the twin's statistics, so that only the backward is compared.
        DeviceArray<float> c_mean(f.ctx(), mean), c_rstd(f.ctx(), rstd), d_dw(f.ctx(), C), d_db(f.ctx(), C);
        DPO_CUDA_CHECK(cudaMemsetAsync(d_dw.get(), 0, C * sizeof(float), f.ctx().stream()));
        DPO_CUDA_CHECK(cudaMemsetAsync(d_db.get(), 0, C * sizeof(float), f.ctx().stream()));
        View<T> vdi(f.ctx(), off, N * C, dinp0), vdo(f.ctx(), off, N * C, dout);
        cuda::layernorm_backward(f.ctx(), vdi.get(), d_dw.get(), d_db.get(), vdo.get(), vi.get(), vw.get(),
                                 c_mean.get(), c_rstd.get(), N, C);
        expect_close<T>(vdi.read(), ref_dinp, kLayerNormTol, "layernorm_backward dinp, w at offset " + std::to_string(ow));
        EXPECT_TRUE(vdi.outside_untouched()) << "layernorm_backward wrote outside its view";
        EXPECT_LE(rel_err(d_db.download(), db), 2e-5);
      }
    }
  }
}

TEST_F(CudaViews, LayerNormRowsAtEveryOffsetFp32) { layernorm_views_case<float>(*this); }
TEST_F(CudaViews, LayerNormRowsAtEveryOffsetBf16) { layernorm_views_case<bf16>(*this); }

// AdamW, one step on views of param, grad, m, v at offset off: against the twin within the budget of UpdateMatchesCpu
// (one step here, three there), bitwise equal to the all-scalar path (grad one element further), nothing written
// outside the views. Then the multi-tensor launch with segments at odd offsets of flat arrays: bitwise the
// single-tensor update on each segment, elements outside every segment untouched.
TEST_F(CudaViews, AdamWAtEveryOffset) {
  AdamWParams p;
  p.lr = 1e-2;
  p.weight_decay = 0.1;
  p.grad_scale = 0.7;
  p.step = 5;
  for (int64_t n : kViewSizes) {
    for (int64_t off = 0; off < 8; ++off) {
      SCOPED_TRACE("n=" + std::to_string(n) + " off=" + std::to_string(off));
      const auto param = rand(n), grad = rand(n), m = rand(n, 0.1);
      auto v = rand(n, 0.1);
      for (auto& x : v) x = x * x;
      std::vector<float> rp = param, rm = m, rv = v;
      cpu::adamw_update<float>(rp.data(), grad.data(), rm.data(), rv.data(), n, p);
      std::vector<float> got[2][3];
      int k = 0;
      for (int64_t og : {off, (off + 1) % 8}) {
        View<float> vp(ctx(), off, n, param), vg(ctx(), og, n, grad), vm(ctx(), off, n, m), vv(ctx(), off, n, v);
        cuda::adamw_update(ctx(), vp.get(), vg.get(), vm.get(), vv.get(), n, p);
        got[k][0] = vp.read();
        got[k][1] = vm.read();
        got[k][2] = vv.read();
        EXPECT_TRUE(vp.outside_untouched() && vm.outside_untouched() && vv.outside_untouched())
            << "adamw_update wrote outside its views";
        EXPECT_TRUE(bitwise_equal(vg.read(), grad)) << "grad is read only";
        ++k;
      }
      EXPECT_LE(rel_err(got[0][0], rp), 2e-6);
      EXPECT_LE(rel_err(got[0][1], rm), 2e-6);
      EXPECT_LE(rel_err(got[0][2], rv), 2e-6);
      for (int j = 0; j < 3; ++j) EXPECT_TRUE(bitwise_equal(got[0][j], got[1][j])) << "vector and scalar paths differ";
    }
  }
  // Segments at offsets 1 and 1 + 4097 + 6 of flat arrays (different heads), one decayed, one not, and an empty one.
  const int64_t n1 = 4097, n2 = 1023, o1 = 1, o2 = o1 + n1 + 6, total = o2 + n2 + 5;
  const AdamWSegment segs[] = {{o1, n1, true}, {o2 - 3, 0, false}, {o2, n2, false}};
  const auto param = rand(total), grad = rand(total), m = rand(total, 0.1);
  auto v = rand(total, 0.1);
  for (auto& x : v) x = x * x;
  DeviceArray<float> fp(ctx(), param), fg(ctx(), grad), fm(ctx(), m), fv(ctx(), v);
  cuda::AdamWSegmentTable table;
  cuda::adamw_update_segments(ctx(), table, fp.get(), fg.get(), fm.get(), fv.get(), total, segs, 3, p);
  DeviceArray<float> sp(ctx(), param), sm(ctx(), m), sv(ctx(), v);
  AdamWParams off_p = p;
  off_p.weight_decay = 0.0;
  cuda::adamw_update(ctx(), sp.get() + o1, fg.get() + o1, sm.get() + o1, sv.get() + o1, n1, p);
  cuda::adamw_update(ctx(), sp.get() + o2, fg.get() + o2, sm.get() + o2, sv.get() + o2, n2, off_p);
  EXPECT_TRUE(bitwise_equal(fp.download(), sp.download())) << "segments: param differs from the per-segment update";
  EXPECT_TRUE(bitwise_equal(fm.download(), sm.download())) << "segments: m differs from the per-segment update";
  EXPECT_TRUE(bitwise_equal(fv.download(), sv.download())) << "segments: v differs from the per-segment update";
  const auto gp = fp.download();
  for (int64_t i : {int64_t{0}, o1 + n1, o2 - 1, o2 + n2, total - 1})
    EXPECT_EQ(gp[static_cast<size_t>(i)], param[static_cast<size_t>(i)]) << "element " << i << " outside the segments";
}

// Encoder forward with rows of C in {1, 7, 8, 9, 1023}: each (b,t) row of out, wte and wpe is split on its own; one
// add per element, bitwise the twin (rounded once for bf16), for out/wte/wpe at offset off and with wpe one element
// further (the rows' scalar path).
template <class T>
void encoder_forward_views_case(CudaKernelTest& f) {
  const int64_t B = 2, Tn = 3, V = 5, maxT = 4;
  for (int64_t C : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{1023}}) {
    for (int64_t off = 0; off < 8; ++off) {
      SCOPED_TRACE(std::string(type_name<T>()) + " C=" + std::to_string(C) + " off=" + std::to_string(off));
      const auto tok = f.tokens(B * Tn, V);
      const auto wte = exact<T>(f.rand(V * C)), wpe = exact<T>(f.rand(maxT * C));
      std::vector<float> ref(B * Tn * C);
      cpu::encoder_forward<float>(ref.data(), tok.data(), wte.data(), wpe.data(), B, Tn, C);
      ref = rounded<T>(ref);
      DeviceArray<int32_t> d_tok(f.ctx(), tok);
      for (int64_t op : {off, (off + 1) % 8}) {
        View<T> out(f.ctx(), off, B * Tn * C), vte(f.ctx(), off, V * C, wte), vpe(f.ctx(), op, maxT * C, wpe);
        cuda::encoder_forward(f.ctx(), out.get(), d_tok.get(), vte.get(), vpe.get(), B, Tn, C, V);
        EXPECT_TRUE(bitwise_equal(out.read(), ref)) << "encoder_forward, wpe at offset " << op;
        EXPECT_TRUE(out.outside_untouched()) << "encoder_forward wrote outside its view";
      }
    }
  }
}

TEST_F(CudaViews, EncoderForwardRowsAtEveryOffsetFp32) { encoder_forward_views_case<float>(*this); }
TEST_F(CudaViews, EncoderForwardRowsAtEveryOffsetBf16) { encoder_forward_views_case<bf16>(*this); }

// The token-embedding backward with a heavily repeated token (as a padding or end-of-text token can be): token 7 at
// ~70% of B*T = 4000 positions, and tokens with exactly K-1, K, K+1, 2K, 2K+1 occurrences (K =
// cuda::kEncoderSegmentRows, the segment length), the rest random. Checks:
//  - two calls from the same start give the same bits (the sort and every sum order are fixed by the data);
//  - rows of tokens with at most K occurrences (one segment, the twin's order) are bitwise cpu::encoder_backward;
//  - every row within a budget of a double-precision reference: the kernel adds a token's L rows in chains of at
//    most K and then adds the ceil(L/K) segment sums onto dwte, so by the recursive-summation bound (Higham 4.2,
//    u = eps_f / 2 per add) its error is <= (K + ceil(L/K) + 1) u (|dwte0| + sum |dout|). For L ~ 2800 that is
//    ~110 u * ~2200 ~ 0.015, while one dropped or doubled dout row moves the row by ~0.8.
template <class T>
void encoder_backward_heavy_case(CudaKernelTest& f) {
  SCOPED_TRACE(type_name<T>());
  const int64_t B = 4, Tn = 1000, C = 130, V = 300, BT = B * Tn, K = cuda::kEncoderSegmentRows;
  auto tok = f.tokens(BT, V);
  std::mt19937_64 g(test_seed() + 7);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (auto& t : tok) {
    if (u(g) < 0.7) t = 7;
    else if (t >= 10 && t < 20) t = 20;  // tokens 10..14 get exactly the counts below
  }
  const int64_t counts[] = {K - 1, K, K + 1, 2 * K, 2 * K + 1};
  int64_t at = 0;
  for (int k = 0; k < 5; ++k)
    for (int64_t r = 0; r < counts[k]; ++r) tok[static_cast<size_t>((at++ * 7919) % BT)] = static_cast<int32_t>(10 + k);
  std::vector<int64_t> occ(V, 0);
  for (auto t : tok) ++occ[static_cast<size_t>(t)];
  ASSERT_GT(occ[7], 2000);
  for (int k = 0; k < 5; ++k) ASSERT_EQ(occ[static_cast<size_t>(10 + k)], counts[k]);

  const auto dout = exact<T>(f.rand(BT * C)), dwte0 = f.rand(V * C), dwpe0 = f.rand(Tn * C);
  std::vector<float> ref_wte = dwte0, ref_wpe = dwpe0;
  cpu::encoder_backward<float>(ref_wte.data(), ref_wpe.data(), dout.data(), tok.data(), B, Tn, C);
  std::vector<double> exact_wte(dwte0.begin(), dwte0.end()), mag(V * C);
  for (size_t i = 0; i < mag.size(); ++i) mag[i] = std::fabs(static_cast<double>(dwte0[i]));
  for (int64_t bt = 0; bt < BT; ++bt)
    for (int64_t c = 0; c < C; ++c) {
      const size_t o = static_cast<size_t>(tok[static_cast<size_t>(bt)] * C + c);
      exact_wte[o] += dout[static_cast<size_t>(bt * C + c)];
      mag[o] += std::fabs(static_cast<double>(dout[static_cast<size_t>(bt * C + c)]));
    }

  DeviceArray<int32_t> d_tok(f.ctx(), tok);
  View<T> d_dout(f.ctx(), 3, BT * C, dout);  // dout at an odd offset: the backward reads element by element anyway
  DeviceArray<float> d_wte(f.ctx(), dwte0), d_wpe(f.ctx(), dwpe0);
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    d_wte.upload(dwte0);
    d_wpe.upload(dwpe0);
    cuda::encoder_backward(f.ctx(), d_wte.get(), d_wpe.get(), d_dout.get(), d_tok.get(), B, Tn, C, V);
    auto got = d_wte.download();
    EXPECT_TRUE(bitwise_equal(d_wpe.download(), ref_wpe)) << "dwpe, run " << run;
    if (run == 0) first = got;
    else EXPECT_TRUE(bitwise_equal(got, first)) << "dwte differs between two identical runs";
    int bad = 0;
    for (int64_t v = 0; v < V && bad < 5; ++v) {
      const int64_t L = occ[static_cast<size_t>(v)];
      for (int64_t c = 0; c < C; ++c) {
        const size_t o = static_cast<size_t>(v * C + c);
        if (L <= K && got[o] != ref_wte[o]) {
          ADD_FAILURE() << "token " << v << " (" << L << " occurrences), channel " << c << ": " << got[o]
                        << " is not the twin's " << ref_wte[o];
          ++bad;
          break;
        }
        const double tol = static_cast<double>(K + (L + K - 1) / K + 1) * (FLT_EPSILON / 2) * mag[o];
        if (!(std::fabs(got[o] - exact_wte[o]) <= tol)) {
          ADD_FAILURE() << "token " << v << " (" << L << " occurrences), channel " << c << ": " << got[o]
                        << " vs exact " << exact_wte[o] << ", tol " << tol;
          ++bad;
          break;
        }
      }
    }
  }
}

TEST_F(CudaEncoder, BackwardHeavyTokenIsDeterministicFp32) { encoder_backward_heavy_case<float>(*this); }
TEST_F(CudaEncoder, BackwardHeavyTokenIsDeterministicBf16) { encoder_backward_heavy_case<bf16>(*this); }

}  // namespace
}  // namespace dpo
