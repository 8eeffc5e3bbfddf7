// The device optimizer step on the CUDA backend (AdamW::step_async / finish_step; kernels/adamw.cuh, "The device
// step") against its CPU twin (the same step on the CPU backend), against the pre-device sequence of host-returning
// ops on the GPU itself (bitwise), and its skip paths. Sizes are odd (segments of 4099, 1 and 10007 elements, a shard
// starting at element 3, a BF16 copy one element off the parameters' alignment) so that the kernels' scalar heads and
// tails, the vector body and the bf16 pair stores all run. Outputs are poisoned before every step. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"
#include "train/optim.h"

namespace dpo {
namespace {

using test::bitwise_equal;
using test::max_rel_err;

const std::vector<ParamSpec> kSpecs = {
    {"w", {4099}, 0, true}, {"b", {1}, 4099, false}, {"x", {10007}, 4100, true}};
constexpr int64_t kN = 4099 + 1 + 10007;

std::vector<float> randn_f(std::mt19937_64& g, int64_t n, double scale) {
  return test::randn<float>(g, static_cast<size_t>(n), scale);
}

Tensor host_f32(const std::vector<float>& v) {
  Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, DType::F32);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(float));
  return t;
}

// A tensor of `be` holding v (F32).
Tensor on(Backend& be, const std::vector<float>& v) {
  Tensor t = be.empty({static_cast<int64_t>(v.size())}, DType::F32);
  be.copy_from_host(t, host_f32(v));
  return t;
}

std::vector<float> f32_of(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), DType::F32);
  be.copy_to_host(h, t);
  std::vector<float> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), h.raw(), v.size() * sizeof(float));
  return v;
}

std::vector<double> f64_of(const std::vector<float>& v) { return {v.begin(), v.end()}; }

std::vector<uint16_t> bf16_of(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), DType::BF16);
  be.copy_to_host(h, t);
  std::vector<uint16_t> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), h.raw(), v.size() * sizeof(uint16_t));
  return v;
}

// A BF16 tensor of `be` of n NaNs with a payload no rounding produces (0x7fc1).
Tensor poisoned_bf16(Backend& be, int64_t n) {
  Tensor h = Tensor::host({n}, DType::BF16);
  std::vector<uint16_t> v(static_cast<size_t>(n), 0x7fc1);
  std::memcpy(h.raw(), v.data(), v.size() * sizeof(uint16_t));
  Tensor t = be.empty({n}, DType::BF16);
  be.copy_from_host(t, h);
  return t;
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

OptimConfig config() {
  OptimConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.1;
  c.max_grad_norm = 1.0;
  c.warmup_steps = 1;
  return c;
}

class CudaOptimStep : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }
  Backend& gpu() { return *gpu_; }
  Backend& cpu() { return *cpu_; }
  std::unique_ptr<Backend> gpu_, cpu_;
};

// Three steps (warmup's lr 0, then clipped steps) of the same optimizer over the shard [3, kN) on both backends,
// with the BF16 copy (at the copy's own alignment and one element off it) and the gradient zeroed.
// Budget: the kernel does each element's ~10 operations in float and nvcc fuses the lerp and the v update into
// FMAs where the twin does not (kernels/adamw.cuh); per step that is <~ 10 eps_f of each quantity's scale, three
// chained steps <~ 30 eps_f = 2e-6 relative to max(1, max|ref|) (CudaAdamW.UpdateMatchesCpu's budget). The grad
// scale comes from norms that differ by summation order only (double, 14k terms: <= 2 n eps_d = 3.2e-12 relative),
// which moves float(grad_scale) by at most one float rounding, inside the same budget. The norm: 4e-12 relative.
// The GPU's BF16 copy is bitwise convert() of the GPU's own parameters (the exact check); against the CPU's copy
// it may differ by one BF16 ulp where the float parameters straddle a rounding boundary.
TEST_F(CudaOptimStep, MatchesTheCpuTwin) {
  for (int64_t copy_off : {0, 1}) {
    SCOPED_TRACE("copy offset " + std::to_string(copy_off));
    std::mt19937_64 g(test::test_seed() + static_cast<uint64_t>(copy_off));
    const std::vector<float> p0 = randn_f(g, kN, 1.0);
    const int64_t b = 3, len = kN - b;
    AdamW og(gpu(), kSpecs, kN, DType::F32, config(), 5), oc(cpu(), kSpecs, kN, DType::F32, config(), 5);
    og.set_shard(b, kN);
    oc.set_shard(b, kN);
    Tensor pg = on(gpu(), p0), pc = host_f32(p0);
    for (int s = 0; s < 3; ++s) {
      SCOPED_TRACE("step " + std::to_string(s));
      const std::vector<float> gv = randn_f(g, kN, 1.0);
      Tensor gg = on(gpu(), gv), gc = host_f32(gv);
      Tensor copy_buf = poisoned_bf16(gpu(), len + 1), copy_c = poisoned_bf16(cpu(), len);
      AdamW::StepOutputs out_g, out_c;
      out_g.compute_copy = copy_buf.view(copy_off, {len});
      out_g.grad_after = GradAfterStep::Zero;
      out_c.compute_copy = copy_c;
      out_c.grad_after = GradAfterStep::Zero;
      og.step_async(pg, gg, out_g);
      oc.step_async(pc, gc, out_c);
      const AdamW::StepInfo ig = og.finish_step(), ic = oc.finish_step();
      ASSERT_FALSE(ig.skipped);
      ASSERT_FALSE(ic.skipped);
      EXPECT_NEAR(ig.grad_norm, ic.grad_norm, 4e-12 * ic.grad_norm);
      EXPECT_EQ(ig.clipped, ic.clipped);
      EXPECT_EQ(og.step_count(), s + 1);
      const std::vector<float> got_p = f32_of(gpu(), pg), want_p = f32_of(cpu(), pc);
      EXPECT_LE(max_rel_err(f64_of(got_p), f64_of(want_p)), 2e-6);
      EXPECT_LE(max_rel_err(f64_of(f32_of(gpu(), og.m())), f64_of(f32_of(cpu(), oc.m()))), 2e-6);
      EXPECT_LE(max_rel_err(f64_of(f32_of(gpu(), og.v())), f64_of(f32_of(cpu(), oc.v()))), 2e-6);
      EXPECT_TRUE(bitwise_equal(std::vector<float>(got_p.begin(), got_p.begin() + b),
                                std::vector<float>(p0.begin(), p0.begin() + b)))
          << "the step wrote outside its shard";
      // The copy: exactly convert() of the updated range; nothing of the buffer outside the view written.
      Tensor conv = gpu().empty({len}, DType::BF16);
      gpu().convert(conv, pg.view(b, {len}));
      const std::vector<uint16_t> got_c = bf16_of(gpu(), copy_buf), want_c = bf16_of(gpu(), conv);
      EXPECT_EQ(std::vector<uint16_t>(got_c.begin() + copy_off, got_c.begin() + copy_off + len), want_c);
      EXPECT_EQ(got_c[copy_off == 0 ? len : 0], 0x7fc1) << "the copy was written outside its view";
      const std::vector<uint16_t> cpu_c = bf16_of(cpu(), copy_c);
      double worst = 0;
      for (int64_t i = 0; i < len; ++i) {
        const float a = bf16_to_float(got_c[static_cast<size_t>(copy_off + i)]);
        const float r = bf16_to_float(cpu_c[static_cast<size_t>(i)]);
        worst = std::max(worst, std::fabs(double(a) - double(r)) / std::max(std::fabs(double(r)), 1e-30));
      }
      EXPECT_LE(worst, 1.0 / 128) << "more than one BF16 ulp from the CPU twin's copy";
      // The gradient's range is zeroed; the rest (outside the shard) is not the step's.
      const std::vector<float> gz = f32_of(gpu(), gg);
      for (int64_t i = 0; i < kN; ++i)
        ASSERT_EQ(gz[static_cast<size_t>(i)], i < b ? gv[static_cast<size_t>(i)] : 0.0f) << "grad element " << i;
    }
  }
}

// On the GPU the device step equals the pre-device sequence (sum_squares and the clip factor on the host, the dry
// run read back, adamw_update_segments over unmerged segments, convert() into the copy) bitwise: the same kernels
// for the norm, the same host-computed doubles rounded to the same floats, one element function.
TEST_F(CudaOptimStep, EqualsTheHostSequenceBitwise) {
  std::mt19937_64 g(test::test_seed());
  const std::vector<float> p0 = randn_f(g, kN, 1.0);
  const OptimConfig cfg = config();
  AdamW opt(gpu(), kSpecs, kN, DType::F32, cfg, 5);
  Tensor p = on(gpu(), p0), ref = on(gpu(), p0);
  Tensor rm = gpu().zeros({kN}, DType::F32), rv = gpu().zeros({kN}, DType::F32);
  std::vector<AdamWSegment> segs;
  for (const ParamSpec& s : kSpecs) segs.push_back({s.offset, s.shape[0], s.weight_decay});
  for (int s = 0; s < 3; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    const std::vector<float> gv = randn_f(g, kN, s == 2 ? 1e-4 : 1.0);  // step 2 is not clipped
    Tensor grads = on(gpu(), gv);
    Tensor copy = poisoned_bf16(gpu(), kN), ref_copy = gpu().empty({kN}, DType::BF16);
    AdamW::StepOutputs out;
    out.compute_copy = copy;
    opt.step_async(p, grads, out);
    const AdamW::StepInfo info = opt.finish_step();
    // The sequence, on the same gradient.
    const double norm = std::sqrt(gpu().sum_squares(grads));
    AdamWParams hp;
    hp.lr = lr_at(cfg, s, 5);
    hp.beta1 = cfg.beta1;
    hp.beta2 = cfg.beta2;
    hp.eps = cfg.eps;
    hp.weight_decay = cfg.weight_decay;
    hp.step = s + 1;
    const double coef = cfg.max_grad_norm / (norm + 1e-6);
    if (coef < 1.0) hp.grad_scale = coef;
    ASSERT_EQ(gpu().adamw_dry_run_segments(ref, grads, rm, rv, segs, hp), AdamWCheck::AllFinite);
    gpu().adamw_update_segments(ref, grads, rm, rv, segs, hp);
    gpu().convert(ref_copy, ref);
    EXPECT_EQ(info.grad_norm, norm);
    EXPECT_EQ(info.clipped, coef < 1.0);
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), p), f32_of(gpu(), ref)));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), opt.m()), f32_of(gpu(), rm)));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), opt.v()), f32_of(gpu(), rv)));
    EXPECT_EQ(bf16_of(gpu(), copy), bf16_of(gpu(), ref_copy));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), grads), gv)) << "GradAfterStep::Keep must leave the gradient";
  }
}

// Skipped steps on the GPU: a NaN gradient (NonFiniteGradNorm), an Inf in the last element (the scalar tail), and a
// learning rate whose step size overflows float (NonFiniteUpdate, found by the Check pass) leave parameters, moments,
// the poisoned copy and step_count() bit-identical and zero the gradient (GradAfterStep::Zero). Then the same
// optimizer takes a good step, bitwise equal to one that never saw the bad ones.
TEST_F(CudaOptimStep, SkipsLeaveEverythingBitIdentical) {
  std::mt19937_64 g(test::test_seed());
  const std::vector<float> p0 = randn_f(g, kN, 1.0), g1 = randn_f(g, kN, 1.0), g2 = randn_f(g, kN, 1.0);
  for (int way = 0; way < 3; ++way) {
    SCOPED_TRACE("way " + std::to_string(way));
    OptimConfig cfg = config();
    cfg.warmup_steps = 0;
    std::vector<float> gb = g2;
    SkipReason want = SkipReason::NonFiniteGradNorm;
    if (way == 0) gb[4099] = std::numeric_limits<float>::quiet_NaN();
    if (way == 1) gb[kN - 1] = std::numeric_limits<float>::infinity();
    if (way == 2) want = SkipReason::NonFiniteUpdate;
    AdamW opt(gpu(), kSpecs, kN, DType::F32, cfg, 10), clean(gpu(), kSpecs, kN, DType::F32, cfg, 10);
    Tensor p = on(gpu(), p0), pc = on(gpu(), p0);
    opt.step(p, on(gpu(), g1));
    clean.step(pc, on(gpu(), g1));
    if (way == 2) {
      // lr / (1 - beta1^2) past float's range for the next step: set through a fresh optimizer state at step 1.
      OptimConfig big = cfg;
      big.lr = 1e38;
      big.weight_decay = 0;
      AdamW over(gpu(), kSpecs, kN, DType::F32, big, 10);
      gpu().copy(over.m(), opt.m());
      gpu().copy(over.v(), opt.v());
      over.set_step(1);
      const auto bp = f32_of(gpu(), p), bm = f32_of(gpu(), over.m()), bv = f32_of(gpu(), over.v());
      Tensor grads = on(gpu(), gb), copy = poisoned_bf16(gpu(), kN);
      AdamW::StepOutputs out;
      out.compute_copy = copy;
      out.grad_after = GradAfterStep::Zero;
      over.step_async(p, grads, out);
      const auto info = over.finish_step();
      EXPECT_TRUE(info.skipped);
      EXPECT_EQ(info.skip_reason, want);
      EXPECT_TRUE(std::isfinite(info.grad_norm));
      EXPECT_EQ(over.step_count(), 1);
      EXPECT_TRUE(bitwise_equal(f32_of(gpu(), p), bp));
      EXPECT_TRUE(bitwise_equal(f32_of(gpu(), over.m()), bm));
      EXPECT_TRUE(bitwise_equal(f32_of(gpu(), over.v()), bv));
      EXPECT_EQ(bf16_of(gpu(), copy), std::vector<uint16_t>(static_cast<size_t>(kN), 0x7fc1));
      EXPECT_TRUE(bitwise_equal(f32_of(gpu(), grads), std::vector<float>(static_cast<size_t>(kN), 0.0f)));
      continue;
    }
    const auto bp = f32_of(gpu(), p), bm = f32_of(gpu(), opt.m()), bv = f32_of(gpu(), opt.v());
    Tensor grads = on(gpu(), gb), copy = poisoned_bf16(gpu(), kN);
    AdamW::StepOutputs out;
    out.compute_copy = copy;
    out.grad_after = GradAfterStep::Zero;
    opt.step_async(p, grads, out);
    const auto info = opt.finish_step();
    EXPECT_TRUE(info.skipped);
    EXPECT_EQ(info.skip_reason, want);
    EXPECT_TRUE(std::isnan(info.grad_norm));
    EXPECT_EQ(opt.step_count(), 1);
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), p), bp));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), opt.m()), bm));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), opt.v()), bv));
    EXPECT_EQ(bf16_of(gpu(), copy), std::vector<uint16_t>(static_cast<size_t>(kN), 0x7fc1));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), grads), std::vector<float>(static_cast<size_t>(kN), 0.0f)));
    EXPECT_FALSE(opt.step(p, on(gpu(), g2)).skipped);
    clean.step(pc, on(gpu(), g2));
    EXPECT_TRUE(bitwise_equal(f32_of(gpu(), p), f32_of(gpu(), pc)));
  }
}

// Bitwise reproducible: the same step twice from the same state gives the same parameters, moments and norm.
TEST_F(CudaOptimStep, Deterministic) {
  std::mt19937_64 g(test::test_seed());
  const std::vector<float> p0 = randn_f(g, kN, 1.0), gv = randn_f(g, kN, 1.0);
  std::vector<float> first_p;
  double first_norm = 0;
  for (int run = 0; run < 2; ++run) {
    AdamW opt(gpu(), kSpecs, kN, DType::F32, config(), 5);
    Tensor p = on(gpu(), p0);
    opt.step(p, on(gpu(), gv));
    const AdamW::StepInfo info = opt.step(p, on(gpu(), gv));
    if (run == 0) {
      first_p = f32_of(gpu(), p);
      first_norm = info.grad_norm;
    } else {
      EXPECT_TRUE(bitwise_equal(f32_of(gpu(), p), first_p));
      EXPECT_EQ(info.grad_norm, first_norm);
    }
  }
}

}  // namespace
}  // namespace dpo
