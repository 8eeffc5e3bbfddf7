// Host waits of the optimizer step, counted by CountingBackend (runtime/counting_backend.h): the device step
// (AdamW::step_async) enqueues a whole step without the host waiting for the device and without allocating after the
// first step, and finish_step reads the step's record with exactly one copy to the host. On the CPU backend always;
// on the CUDA backend when a GPU exists (skipped with the reason otherwise).
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/counting_backend.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/config.h"
#include "train/trainer.h"
#include "train/optim.h"

namespace {

using namespace dpo;

GPT2Config small_gpt2() {
  GPT2Config c;
  c.max_seq_len = 8;
  c.vocab_size = 37;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 12;
  return c;
}

// The backends to count: the CPU one, and the CUDA one when this build has CUDA and the machine a GPU.
std::unique_ptr<Backend> make_backend(const std::string& which, std::string& skip) {
  if (which == "cpu") return make_cpu_backend();
#ifdef DPO_HAVE_CUDA
  try {
    return make_cuda_backend(0);
  } catch (const Error& e) {
    skip = std::string("no usable CUDA device: ") + e.what();
    return nullptr;
  }
#else
  skip = "this build has no CUDA";
  return nullptr;
#endif
}

// A device F32 tensor of seeded normal values (scaled), through the counted backend's copy_from_host.
Tensor device_randn(Backend& be, std::mt19937_64& g, int64_t n, double scale) {
  const std::vector<double> v = test::randn<double>(g, static_cast<size_t>(n), scale);
  Tensor h = Tensor::host({n}, DType::F64);
  std::memcpy(h.raw(), v.data(), v.size() * sizeof(double));
  Tensor t = be.empty({n}, DType::F32);
  be.copy_from_host(t, h);
  return t;
}

class HostSync : public ::testing::TestWithParam<std::string> {};

// Per step, inside step_async: 0 waits, exactly 1 upload (the step state), no allocation after the first step;
// finish_step: exactly 1 wait (the record's copy to the host) and nothing else. Steps with the BF16 copy and the
// gradient zeroing and a device agreement, a clipped one and a skipped one (NaN gradient).
TEST_P(HostSync, DeviceStepWaitsOnlyForItsRecord) {
  std::string skip;
  std::unique_ptr<Backend> inner = make_backend(GetParam(), skip);
  if (!inner) GTEST_SKIP() << skip;
  CountingBackend be(*inner);
  const GPT2Config gc = small_gpt2();
  const auto specs = gpt2_param_specs(gc);
  const int64_t n = gc.num_parameters();
  std::mt19937_64 g(test::test_seed());
  Tensor master = device_randn(be, g, n, 0.02);
  Tensor copy = be.empty({n}, DType::BF16);
  OptimConfig cfg;
  cfg.lr = 1e-3;
  cfg.weight_decay = 0.1;
  cfg.max_grad_norm = 1.0;
  AdamW opt(be, specs, n, DType::F32, cfg, 10);
  // One rank: the agreement's sum over ranks leaves the count as it is (what matters here is that it gets a device
  // tensor and needs no wait).
  int agreed = 0;
  opt.set_device_agreement([&](const Tensor& t) { agreed += t.numel() == 1 ? 1 : 100; });
  AdamW::StepOutputs out;
  out.compute_copy = copy;
  out.grad_after = GradAfterStep::Zero;
  for (int s = 0; s < 5; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    Tensor grads = device_randn(be, g, n, s == 1 ? 10.0 : 1e-3);  // step 1 is clipped
    if (s == 3) {  // a NaN gradient: the step is skipped on the device
      Tensor nan = Tensor::host({1}, DType::F32);
      nan.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
      be.copy_from_host(grads.view(5, {1}), nan);
    }
    be.reset();
    opt.step_async(master, grads, out);
    EXPECT_EQ(be.counts().waits(), 0) << be.log_line();
    EXPECT_EQ(be.counts().copy_from_host, 1) << be.log_line();
    if (s > 0) EXPECT_EQ(be.counts().allocations, 0) << "the step allocated after the first one";
    be.reset();
    const AdamW::StepInfo info = opt.finish_step();
    EXPECT_EQ(be.counts().copy_to_host, 1) << be.log_line();
    EXPECT_EQ(be.counts().waits(), 1) << be.log_line();
    EXPECT_EQ(be.counts().ops, 1) << be.log_line();
    EXPECT_EQ(info.skipped, s == 3);
    if (s == 1) EXPECT_TRUE(info.clipped);
  }
  EXPECT_EQ(opt.step_count(), 4);
  EXPECT_EQ(agreed, 5) << "one agreement per step, on a [1] tensor";
}

// The host agreement (AdamW::set_finite_agreement) costs one more wait inside the step: the verdict must come back
// to the host before the ranks agree. The synchronous step() is step_async + finish_step: one wait in all.
TEST_P(HostSync, HostAgreementAndSynchronousStep) {
  std::string skip;
  std::unique_ptr<Backend> inner = make_backend(GetParam(), skip);
  if (!inner) GTEST_SKIP() << skip;
  CountingBackend be(*inner);
  const GPT2Config gc = small_gpt2();
  const int64_t n = gc.num_parameters();
  std::mt19937_64 g(test::test_seed());
  Tensor master = device_randn(be, g, n, 0.02);
  Tensor grads = device_randn(be, g, n, 1e-3);
  AdamW a(be, gpt2_param_specs(gc), n, DType::F32, OptimConfig{}, 10);
  AdamW b(be, gpt2_param_specs(gc), n, DType::F32, OptimConfig{}, 10);
  a.set_finite_agreement([](AdamWCheck c) { return c; });
  a.step(master, grads);  // the first step allocates
  b.step(master, grads);
  be.reset();
  a.step_async(master, grads);
  EXPECT_EQ(be.counts().waits(), 1) << be.log_line();
  a.finish_step();
  be.reset();
  b.step(master, grads);
  EXPECT_EQ(be.counts().waits(), 1) << be.log_line();
  EXPECT_EQ(be.counts().copy_to_host, 1) << be.log_line();
  EXPECT_EQ(be.counts().allocations, 0);
}

// The wrapper counts what it forwards: a direct sum_squares and dry run are value returns, synchronize is counted,
// and results are the inner backend's.
TEST_P(HostSync, WrapperCountsAndForwards) {
  std::string skip;
  std::unique_ptr<Backend> inner = make_backend(GetParam(), skip);
  if (!inner) GTEST_SKIP() << skip;
  CountingBackend be(*inner);
  EXPECT_EQ(be.name(), inner->name());
  EXPECT_TRUE(be.device() == inner->device());
  std::mt19937_64 g(test::test_seed());
  Tensor x = device_randn(be, g, 1001, 1.0);
  be.reset();
  const double a = be.sum_squares(x);
  EXPECT_EQ(a, inner->sum_squares(x));
  be.synchronize();
  EXPECT_EQ(be.counts().value_returns, 1);
  EXPECT_EQ(be.counts().synchronize, 1);
  EXPECT_EQ(be.counts().waits(), 2);
  EXPECT_EQ(be.log_line(), "sum_squares, synchronize");
  Tensor out = be.empty({1}, DType::F64);
  be.sum_squares_into(out, x);
  EXPECT_EQ(be.counts().allocations, 1);
  EXPECT_EQ(be.counts().waits(), 2) << "sum_squares_into leaves its value on the device";
  EXPECT_EQ(to_host_f64(*inner, out)[0], a) << "sum_squares_into is bitwise sum_squares";
}

// A whole DPO training step through the trainer (run_training with its backend wrapped): per optimizer step the
// host waits for the device exactly once, the read of the micro-batches' metric sums together with the
// optimizer's record. Two micro-batches per step, cached and live reference log-probs, with and without CUDA graphs
// (on the GPU; on the CPU the setting does nothing); a step's uploads are the batches' host data only.
TEST_P(HostSync, TrainingStepWaitsOnce) {
  std::string skip;
  std::unique_ptr<Backend> probe = make_backend(GetParam(), skip);
  if (!probe) GTEST_SKIP() << skip;
  probe.reset();
  test::ScratchDir w("dpo_host_sync_");
  test::write_tiny_fixture(w.dir.string(), 22);
  for (bool live : {false, true})
    for (bool graphs : {false, true}) {
      SCOPED_TRACE(std::string(live ? "live" : "cached") + " reference, cuda_graphs " + (graphs ? "on" : "off"));
      TrainConfig c;
      c.model = w / "base";
      c.train_file = w / "pref.jsonl";
      c.ref_cache_dir = w / "cache";
      c.out_dir = w / (std::string("run_") + (live ? "l" : "c") + (graphs ? "g" : ""));
      c.device = GetParam();
      c.max_length = 32;
      c.pad_to_multiple_of = 32;
      c.per_device_train_batch_size = 4;
      c.gradient_accumulation_steps = 2;
      c.num_train_epochs = 2;
      c.logging_steps = 1000;
      c.precompute_ref_log_probs = !live;
      c.cuda_graphs = graphs;
      CountingBackend* counter = nullptr;
      RunOptions ro;
      ro.quiet = true;
      ro.wrap_backend = [&](Backend& inner) {
        auto cb = std::make_unique<CountingBackend>(inner);
        counter = cb.get();
        return std::unique_ptr<Backend>(std::move(cb));
      };
      int64_t steps = 0;
      ro.on_step = [&](int64_t step) {
        // From the second step on, the counts cover exactly one step (from the previous step's hook to this one).
        if (steps > 0) EXPECT_EQ(counter->counts().waits(), 1) << "step " << step << ": " << counter->log_line();
        counter->reset();
        ++steps;
      };
      const RunSummary r = run_training(c, RunKind::Dpo, ro);
      EXPECT_EQ(steps, r.steps);
      EXPECT_GE(steps, 4);
    }
}

INSTANTIATE_TEST_SUITE_P(Backends, HostSync, ::testing::Values("cpu", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
