// Mixed precision (BF16 weights and activations, F32 master weights and gradients) on the CPU backend, whose BF16
// ops run the float kernels on exact upcasts and round each BF16 output once (runtime/backend.h). The oracle is
// the double-precision model (itself checked against finite differences and HF): the BF16 model must be as close
// to it as BF16 rounding explains, and much closer than a wrong op would be. Also the master/compute-copy
// bookkeeping, checkpoints (they hold the F32 master exactly) and a short DPO training run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>

#include "model/checkpoint.h"
#include "model/gpt2.h"
#include "runtime/safetensors.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/trainer.h"

namespace dpo {
namespace {

GPT2Config small_config() {
  GPT2Config c;
  c.vocab_size = 37;
  c.max_seq_len = 16;
  c.n_embd = 24;
  c.n_head = 3;
  c.n_layer = 2;
  return c;
}

using Inputs = test::PaddedBatch;

Inputs make_inputs(std::mt19937_64& g, const GPT2Config& c, int64_t B, int64_t T) {
  return test::make_padded_batch(g, c.vocab_size, B, T);
}

std::vector<double> vec(Backend& be, const Tensor& t) { return to_host_f64(be, t); }

// ||a - b|| / ||b||
double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0, r = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    d += (a[i] - b[i]) * (a[i] - b[i]);
    r += b[i] * b[i];
  }
  return std::sqrt(d / r);
}

struct RunOut {
  std::vector<double> logp, grad;
};

// seq log-probs and the gradient of sum_b c_b * logp_b through the chunked path (one sequence per chunk).
RunOut run(GPT2& m, const Inputs& in, const std::vector<double>& c) {
  Backend& be = m.backend();
  Tensor w = Tensor::host({in.B, in.T}, grad_dtype(m.dtype()));
  be.convert(w, in.weights);
  GPT2::LossHead head;
  head.grad = [&](int64_t s0, int64_t s1, const std::vector<double>&, std::vector<double>& d) {
    for (int64_t s = s0; s < s1; ++s) d[s] = c[s];
  };
  m.set_logits_chunk_rows(in.T);
  m.zero_grad();
  RunOut r;
  r.logp = m.fused_forward(in.tokens, in.keymask, in.targets, w, head);
  m.fused_backward();
  r.grad = vec(be, m.grads());
  return r;
}

TEST(Gpt2Bf16, CloseToTheDoubleModelAsBf16RoundingExplains) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = small_config();
  GPT2 m64(*be, cfg, DType::F64), m32(*be, cfg, DType::F32), m16(*be, cfg, DType::BF16);
  // N(0, 0.2) weights, rounded to BF16 first: all three models compute with the same weights, so what separates
  // them is the arithmetic alone.
  auto p = test::randn<double>(g, static_cast<size_t>(m64.params().numel()), 0.2);
  Tensor host = Tensor::host({m64.params().numel()}, DType::F64);
  std::memcpy(host.raw(), p.data(), p.size() * sizeof(double));
  Tensor rounded = convert_host(convert_host(host, DType::BF16, "w"), DType::F64, "w");
  for (GPT2* m : {&m64, &m32, &m16}) {
    be->copy_from_host(m->master_params(), rounded);
    m->sync_params();
  }
  const Inputs in = make_inputs(g, cfg, 4, 13);
  const auto c = test::randn<double>(g, 4, 1.0);
  const RunOut r64 = run(m64, in, c), r32 = run(m32, in, c), r16 = run(m16, in, c);

  // Float: round-off only. BF16: every activation is rounded to 8 significant bits (unit round-off u = 2^-8 =
  // 3.9e-3) at each of ~10 ops per layer; independent roundings add roughly in quadrature, ~sqrt(20) u ~ 2e-2 on
  // an activation. The summed log-prob of a sequence averages those errors over its tokens and is dominated by
  // large, well-conditioned terms (|logp| ~ 30), so it lands far lower; gradients pass through the roundings
  // twice. Measured (this seed): log-probs 7.3e-5, gradient 4.5e-3 relative; float 2e-8 and 1.6e-7. The limits
  // leave ~25x and ~7x; a wrong op (a dropped term, an F32/BF16 mix-up reading garbage) gives errors of order 1.
  const double e32 = rel(r32.logp, r64.logp), e16 = rel(r16.logp, r64.logp);
  const double g32 = rel(r32.grad, r64.grad), g16 = rel(r16.grad, r64.grad);
  EXPECT_LT(e32, 1e-6);
  EXPECT_LT(g32, 1e-5);
  EXPECT_LT(e16, 2e-3) << "bf16 log-probs vs double";
  EXPECT_LT(g16, 3e-2) << "bf16 gradient vs double";
  // And BF16 really rounds: it is further from double than float is (a test that cannot tell the two apart
  // would pass a BF16 mode that silently ran in float).
  EXPECT_GT(e16, 10 * e32);
  EXPECT_GT(g16, 10 * g32);
  std::printf("bf16 vs f64: log-probs %.2e, gradient %.2e; f32 vs f64: %.2e, %.2e\n", e16, g16, e32, g32);
  // Per parameter (so a wrong op's gradient cannot hide in the total). Measured worst: h.1.ln_2.weight at 1.1e-2
  // (printed); 5e-2 leaves ~4x.
  double worst = 0;
  std::string worst_name;
  for (const auto& sp : m64.specs()) {
    int64_t n = 1;
    for (int64_t d : sp.shape) n *= d;
    const std::vector<double> a(r16.grad.begin() + sp.offset, r16.grad.begin() + sp.offset + n);
    const std::vector<double> b(r64.grad.begin() + sp.offset, r64.grad.begin() + sp.offset + n);
    const double e = rel(a, b);
    EXPECT_LT(e, 5e-2) << sp.name;
    if (e > worst) worst = e, worst_name = sp.name;
  }
  std::printf("worst parameter: %s %.2e\n", worst_name.c_str(), worst);
}

TEST(Gpt2Bf16, MasterWeightsAreF32AndTheComputeCopyIsTheirRounding) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = small_config();
  GPT2 m(*be, cfg, DType::BF16);
  EXPECT_EQ(m.params().dtype(), DType::BF16);
  EXPECT_EQ(m.master_params().dtype(), DType::F32);
  EXPECT_EQ(m.grads().dtype(), DType::F32);
  Rng rng(5);
  m.init_random(rng);
  auto check = [&]() {
    const Tensor want = convert_host(m.master_params(), DType::BF16, "master");
    ASSERT_EQ(std::memcmp(want.raw(), m.params().raw(), static_cast<size_t>(want.nbytes())), 0);
  };
  check();
  // A change to the master shows in the compute copy only after sync_params().
  m.master_params().data<float>()[3] += 0.125f;
  const uint16_t before = static_cast<const uint16_t*>(m.params().raw())[3];
  m.sync_params();
  EXPECT_NE(static_cast<const uint16_t*>(m.params().raw())[3], before);
  check();
  // GPT2 in F32 keeps one tensor for both.
  GPT2 f(*be, cfg, DType::F32);
  EXPECT_EQ(f.master_params().raw(), f.params().raw());
}

TEST(Gpt2Bf16, ShardedMasterKeepsOnlyItsRangeAndSyncsOnlyIt) {
  auto be = make_cpu_backend();
  const GPT2Config cfg = small_config();
  GPT2 m(*be, cfg, DType::BF16);
  Rng rng(5);
  m.init_random(rng);
  const int64_t n = m.params().numel(), b = n / 3, e = n / 3 + 1000;
  const std::vector<float> full(m.master_params().data<float>(), m.master_params().data<float>() + n);
  m.shard_master(b, e);
  ASSERT_TRUE(m.master_sharded());
  ASSERT_EQ(m.master_params().numel(), e - b);
  ASSERT_EQ(std::memcmp(m.master_params().raw(), full.data() + b, static_cast<size_t>((e - b) * 4)), 0);
  // A change to the range reaches params() at sync_params(); nothing outside the range moves.
  const Tensor before = convert_host(m.params(), DType::BF16, "p");
  for (int64_t i = 0; i < e - b; ++i) m.master_params().data<float>()[i] *= 2.0f;
  m.sync_params();
  const auto* p0 = static_cast<const uint16_t*>(before.raw());
  const auto* p1 = static_cast<const uint16_t*>(m.params().raw());
  for (int64_t i = 0; i < n; ++i) {
    if (i >= b && i < e) {
      const Tensor one = convert_host(m.master_params().view(i - b, {1}), DType::BF16, "x");
      ASSERT_EQ(p1[i], static_cast<const uint16_t*>(one.raw())[0]) << i;
    } else {
      ASSERT_EQ(p1[i], p0[i]) << i;
    }
  }
  EXPECT_THROW(m.master_param("wte.weight"), Error);
  EXPECT_THROW(m.shard_master(0, 1), Error);  // already sharded
  EXPECT_THROW(save_gpt2_checkpoint(m, "/nonexistent-dir-for-test"), Error);
  GPT2 f(*be, cfg, DType::F32);
  EXPECT_THROW(f.shard_master(0, 10), Error);  // fp32 has no separate master
}

TEST(Gpt2Bf16, CheckpointsHoldTheF32MasterExactly) {
  test::ScratchDir dir("dpo_bf16_");
  auto be = make_cpu_backend();
  const GPT2Config cfg = small_config();
  GPT2 m(*be, cfg, DType::BF16);
  Rng rng(9);
  m.init_random(rng);
  // Values BF16 cannot hold: the checkpoint must keep them (it is written from the master).
  for (int64_t i = 0; i < m.master_params().numel(); ++i) m.master_params().data<float>()[i] *= 1.0f + 1e-6f;
  m.sync_params();
  save_gpt2_checkpoint(m, dir / "ckpt");
  auto back = load_gpt2_checkpoint(*be, dir / "ckpt", DType::BF16);
  ASSERT_EQ(std::memcmp(back->master_params().raw(), m.master_params().raw(),
                        static_cast<size_t>(m.master_params().nbytes())),
            0);
  ASSERT_EQ(std::memcmp(back->params().raw(), m.params().raw(), static_cast<size_t>(m.params().nbytes())), 0);
  auto f32 = load_gpt2_checkpoint(*be, dir / "ckpt", DType::F32);
  ASSERT_EQ(std::memcmp(f32->params().raw(), m.master_params().raw(), static_cast<size_t>(m.master_params().nbytes())),
            0);
}

TEST(Gpt2Bf16, ConvertRoundsOnceToNearestEven) {
  auto be = make_cpu_backend();
  // 1 + 2^-8 is the tie between bf16 neighbours 1 and 1 + 2^-7; a double just above it must round up. Through a
  // round-to-nearest float it would become the tie itself and round down to even (1.0): two roundings.
  const double above = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30);
  const double cases[][2] = {{above, 1.0 + std::ldexp(1.0, -7)},
                             {-above, -(1.0 + std::ldexp(1.0, -7))},
                             {1.0 + std::ldexp(1.0, -8), 1.0},                                      // tie: to even
                             {1.0 + 3 * std::ldexp(1.0, -8), 1.0 + 2 * std::ldexp(1.0, -7)},        // tie: to even
                             {1.0 + std::ldexp(1.0, -8) - std::ldexp(1.0, -40), 1.0}};              // just below
  Tensor src = Tensor::host({5}, DType::F64), dst = Tensor::host({5}, DType::BF16), back = Tensor::host({5}, DType::F64);
  for (int i = 0; i < 5; ++i) src.data<double>()[i] = cases[i][0];
  be->convert(dst, src);
  be->convert(back, dst);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back.data<double>()[i], cases[i][1]) << "case " << i;
  Tensor nan = Tensor::host({1}, DType::F64), n16 = Tensor::host({1}, DType::BF16);
  nan.data<double>()[0] = std::nan("");
  be->convert(n16, nan);
  be->convert(nan, n16);
  EXPECT_TRUE(std::isnan(nan.data<double>()[0]));
  Tensor buf = Tensor::host({8}, DType::F32);
  EXPECT_THROW(be->convert(buf.view(0, {4}), buf.view(2, {4})), Error);  // overlap
  EXPECT_THROW(be->convert(buf.view(0, {4}), buf.view(4, {3})), Error);  // sizes
}

TEST(Gpt2Bf16, OpsRejectMixedUpDtypes) {
  auto be = make_cpu_backend();
  Tensor a = be->zeros({2, 3}, DType::BF16), f = be->zeros({2, 3}, DType::F32);
  EXPECT_THROW(be->residual_forward(a, a, f), Error);  // BF16 activations with an F32 one
  EXPECT_THROW(be->gelu_forward(f, a), Error);
  Tensor w = be->zeros({3, 4}, DType::BF16), dw32 = be->zeros({3, 4}, DType::F32), o = be->zeros({2, 4}, DType::BF16);
  EXPECT_THROW(be->matmul_backward(a, w, Tensor(), o, a, w, WeightLayout::InOut), Error);  // dw must be F32
  EXPECT_NO_THROW(be->matmul_backward(a, dw32, Tensor(), o, a, w, WeightLayout::InOut));
}

TEST(Gpt2Bf16, DpoTrainingInBf16FollowsTheFp32Run) {
  test::ScratchDir dir("dpo_bf16_train_");
  test::write_tiny_fixture(dir.dir.string(), 16);
  auto config = [&](const std::string& precision) {
    TrainConfig c;
    c.model = dir / "base";
    c.train_file = dir / "pref.jsonl";
    c.eval_file = dir / "pref.jsonl";
    c.out_dir = dir / ("run-" + precision);
    c.ref_cache_dir = dir / "cache";
    c.precision = precision;
    c.max_length = 32;
    c.max_prompt_length = 16;
    c.learning_rate = 1e-2;
    c.per_device_train_batch_size = 4;
    c.num_train_epochs = 6;
    return c;
  };
  RunOptions ro;
  ro.quiet = true;
  const RunSummary a = run_training(config("fp32"), RunKind::Dpo, ro);
  const RunSummary b = run_training(config("bf16"), RunKind::Dpo, ro);
  // Both learn (the loss starts at log 2 with a zero margin) and end close: 24 AdamW steps at lr 1e-2 with bf16
  // forward/backward. The checkpoint of the bf16 run holds F32 master weights.
  EXPECT_LT(a.eval.at("eval_loss"), 0.6);
  EXPECT_LT(b.eval.at("eval_loss"), 0.6);
  EXPECT_NEAR(b.eval.at("eval_loss"), a.eval.at("eval_loss"), 0.1);
  EXPECT_GT(b.eval.at("eval_rewards/accuracies"), 0.8);
  SafetensorsFile f(b.final_checkpoint + "/model.safetensors");
  for (const auto& e : f.entries()) EXPECT_EQ(e.dtype, DType::F32) << e.name;
}

}  // namespace
}  // namespace dpo
