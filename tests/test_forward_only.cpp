// Forward-only mode (GPT2::ModelMode::ForwardOnly: the live reference, evaluation): on the CPU, in float, double and
// bf16 (emulated), every forward output is BITWISE that of a training-mode model with the same weights (the same
// ops in the same order on the same inputs; only the buffers differ): score() padded and in the packed and
// prefix_shared layouts, compacted head or not, one sequence per chunk or all in one; forward()'s logits;
// sequence_logprobs; the decoding prefill and a decode step; under fusions all and none, against the training
// model at checkpointing intervals 0 and 2. The mode holds no gradient and no master copy and refuses training
// calls; its weights can be overwritten (assign_weights) with the master path's rounding; its measured activation
// bytes are what model/memory_plan.h predicts. And the trainer: a run whose live reference is forward-only ends
// with weights bitwise those of a run whose reference is a training-mode model (DPO_TEST_TRAIN_MODE_REFERENCE).
// GPT-2 and the Llama family (grouped-query heads, q/k/v biases, an untied head, Llama 3 rope scaling: its blocks
// update the residual stream in place under the same rule).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/gpt2.h"
#include "model/memory_plan.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/config.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"
#include "train/trainer.h"

namespace dpo {
namespace {

using Mode = GPT2::ModelMode;

// GPT-2, or (llama) a Qwen2-style Llama-family model: 3 query heads sharing 1 key/value head, q/k/v biases, an
// untied head, an SwiGLU width of 10 and Llama 3 rope scaling.
GPT2Config small_config(bool llama = false) {
  GPT2Config c;
  c.vocab_size = 29;  // not a multiple of anything
  c.max_seq_len = 48;
  c.n_embd = 12;
  c.n_head = 3;
  c.n_layer = 5;
  if (llama) {
    c.arch = Arch::Llama;
    c.model_type = "qwen2";
    c.n_kv_head = 1;
    c.intermediate_size = 10;
    c.attention_bias = true;
    c.tie_word_embeddings = false;
    c.rope_scaling = RopeScaling{8, 1, 4, 16};
  }
  return c;
}

// N(0, 0.3) weights into the master (the parameters themselves in F32 / F64), rounded into the BF16 copy.
void randomize(GPT2& m, std::mt19937_64& g) {
  std::normal_distribution<double> d(0.0, 0.3);
  const Tensor& p = m.master_params();
  for (int64_t i = 0; i < p.numel(); ++i) {
    if (p.dtype() == DType::F64) p.data<double>()[i] = d(g);
    else p.data<float>()[i] = static_cast<float>(d(g));
  }
  m.sync_params();
}

std::string bytes_of(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw()), static_cast<size_t>(t.nbytes()));
}

Tensor poisoned(Shape s, DType dt) {
  Tensor t = Tensor::host(std::move(s), dt);
  std::memset(t.raw(), 0xff, static_cast<size_t>(t.nbytes()));  // NaN in F32 / F64
  return t;
}

// Every forward output the two models give on the same inputs, as bytes.
std::string forward_outputs(GPT2& m, const test::PaddedBatch& in, const std::vector<PreferencePair>& pairs) {
  const DType gd = grad_dtype(m.dtype());
  Tensor w = Tensor::host({in.B, in.T}, gd);
  for (int64_t i = 0; i < in.B * in.T; ++i) {
    const double v = in.weights.data<double>()[i];
    if (gd == DType::F64) w.data<double>()[i] = v;
    else w.data<float>()[i] = static_cast<float>(v);
  }
  std::string out;
  for (HeadRows rows : {HeadRows::Scored, HeadRows::All})
    for (int64_t chunk : {in.T, int64_t{1} << 20}) {
      m.set_head_rows(rows);
      m.set_logits_chunk_rows(chunk);
      Tensor seq = poisoned({in.B}, gd), stats = poisoned({in.B, kSeqStatsWidth}, gd);
      m.score(in.tokens, in.keymask, in.targets, w, seq, stats);
      out += bytes_of(seq) + bytes_of(stats);
      for (BatchLayout layout : {BatchLayout::Padded, BatchLayout::Packed, BatchLayout::PrefixShared}) {
        const Batch b = make_layout_batch(pairs, {4, 1, 0, 3, 2}, layout, 40, gd, 0);
        const std::vector<double> lp = sequence_logps(m, b);
        out += std::string(reinterpret_cast<const char*>(lp.data()), lp.size() * sizeof(double));
      }
    }
  m.set_head_rows(HeadRows::Scored);
  out += bytes_of(m.forward(in.tokens, in.keymask));
  Tensor seq = poisoned({in.B}, gd), tok = poisoned({in.B, in.T}, gd), stats = poisoned({in.B, kSeqStatsWidth}, gd);
  m.sequence_logprobs(in.tokens, in.keymask, in.targets, w, seq, tok, stats);
  out += bytes_of(seq) + bytes_of(tok) + bytes_of(stats);
  // The decoding prefill (right-padded prompts of T - b tokens) and one step reading its cache.
  std::vector<int64_t> lengths;
  for (int64_t b = 0; b < in.B; ++b) lengths.push_back(in.T - b);
  out += bytes_of(m.decode_prefill(in.tokens, lengths, in.T + 2));
  std::vector<int32_t> next;
  for (int64_t b = 0; b < in.B; ++b) next.push_back(static_cast<int32_t>(b + 1));
  out += bytes_of(m.decode_step(next, lengths));
  m.decode_end();
  return out;
}

// (dtype, Llama family)
class ForwardOnly : public ::testing::TestWithParam<std::tuple<DType, bool>> {};

TEST_P(ForwardOnly, OutputsAreBitwiseThoseOfATrainingModel) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const DType dt = std::get<0>(GetParam());
  const GPT2Config cfg = small_config(std::get<1>(GetParam()));
  GPT2 train(*be, cfg, dt);
  randomize(train, g);
  // Two ways to a forward-only model: weights written before the switch (as the trainer loads the reference),
  // and weights assigned afterwards from the training model's master (as the bench and a weight mix do).
  GPT2 fwd_loaded(*be, cfg, dt);
  be->copy(fwd_loaded.master_params(), train.master_params());
  fwd_loaded.sync_params();
  fwd_loaded.set_mode(Mode::ForwardOnly);
  GPT2 fwd_assigned(*be, cfg, dt);
  fwd_assigned.set_mode(Mode::ForwardOnly);
  fwd_assigned.assign_weights(train.master_params());
  ASSERT_TRUE(bytes_of(fwd_loaded.params()) == bytes_of(train.params()));
  ASSERT_TRUE(bytes_of(fwd_assigned.params()) == bytes_of(train.params()));

  const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 4, 10);
  const std::vector<PreferencePair> pairs = test::random_pairs(g, 5, static_cast<int32_t>(cfg.vocab_size));
  for (const Fusions& f : {Fusions::all(), Fusions::none()}) {
    SCOPED_TRACE(f == Fusions::all() ? "fusions all" : "fusions none");
    for (GPT2* m : {&train, &fwd_loaded, &fwd_assigned}) m->set_fusions(f);
    for (int64_t interval : {int64_t{0}, int64_t{2}}) {
      SCOPED_TRACE("training model's interval " + std::to_string(interval));
      train.set_gradient_checkpointing(interval);
      fwd_assigned.set_gradient_checkpointing(interval);  // no effect on a forward-only model's arrangement
      const std::string want = forward_outputs(train, in, pairs);
      EXPECT_TRUE(forward_outputs(fwd_loaded, in, pairs) == want);
      EXPECT_TRUE(forward_outputs(fwd_assigned, in, pairs) == want);
    }
  }
}

// The mode holds no gradient and no F32 master, refuses the training entry points, and is one-way.
TEST_P(ForwardOnly, HoldsNoGradientsOrMasterAndRefusesTraining) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const DType dt = std::get<0>(GetParam());
  const GPT2Config cfg = small_config(std::get<1>(GetParam()));
  const int64_t live0 = host_memory_stats().live;
  GPT2 m(*be, cfg, dt);
  randomize(m, g);
  m.set_mode(Mode::ForwardOnly);
  m.set_mode(Mode::ForwardOnly);  // the same mode again: nothing
  EXPECT_EQ(m.mode(), Mode::ForwardOnly);
  const int64_t N = cfg.num_parameters();
  // Only the weights in the compute dtype remain (BF16: no F32 master; every dtype: no gradient vector), and a
  // Llama's rotary cos / sin tables [max_seq_len, head_dim / 2] in the statistics dtype.
  const int64_t rope = cfg.arch == Arch::Llama ? 2 * cfg.max_seq_len * (cfg.head_dim() / 2) * dtype_size(grad_dtype(dt))
                                               : 0;
  EXPECT_EQ(host_memory_stats().live - live0, N * dtype_size(dt) + rope);
  EXPECT_FALSE(m.grads().defined());
  EXPECT_EQ(m.master_params().dtype(), dt);
  EXPECT_THROW(m.set_mode(Mode::Train), Error);
  EXPECT_THROW(m.zero_grad(), Error);
  const std::string embed = cfg.arch == Arch::Llama ? "embed_tokens.weight" : "wte.weight";
  EXPECT_THROW(m.grad(embed), Error);
  if (dt == DType::BF16) EXPECT_THROW(m.master_param(embed), Error);
  const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 2, 6);
  const DType gd = grad_dtype(dt);
  Tensor w = Tensor::host({2, 6}, gd), seq = Tensor::host({2}, gd), dseq = Tensor::host({2}, gd);
  m.sequence_logprobs(in.tokens, in.keymask, in.targets, w, seq);
  EXPECT_THROW(m.backward(dseq), Error);
  GPT2::LossHead head;
  head.pair_stride = 1;
  head.grad = [](int64_t, int64_t, const std::vector<double>&, std::vector<double>& d) { d.assign(d.size(), 0.0); };
  EXPECT_THROW(m.fused_forward(in.tokens, in.keymask, in.targets, w, head), Error);
  GPT2::PairLossHead ph;
  ph.ref_logp = Tensor::host({2}, gd);
  ph.params = pair_loss_params(LossConfig{});
  ph.sums = Tensor::host({kPairSumsWidth}, DType::F64);
  EXPECT_THROW(m.fused_forward_pairs(in.tokens, in.keymask, in.targets, w, ph), Error);
  EXPECT_THROW(m.fused_backward(), Error);
}

// assign_weights rounds F64 first to F32 and then to BF16, as loading into the master and sync_params() do, not
// straight to BF16: 1 + 2^-8 + 2^-30 rounds to F32 1 + 2^-8 (2^-30 is below half an F32 ulp at 1, 2^-24), the
// midpoint between the BF16 neighbours 1 and 1 + 2^-7, which ties to even: 1. Rounded once from F64 it would be
// above the midpoint: 1 + 2^-7.
TEST(ForwardOnlyWeights, AssignRoundsAsTheMasterPath) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = small_config();
  const int64_t N = cfg.num_parameters();
  Tensor host = Tensor::host({N}, DType::F64);
  std::normal_distribution<double> d(0.0, 0.3);
  for (int64_t i = 0; i < N; ++i) host.data<double>()[i] = d(g);
  host.data<double>()[0] = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30);
  host.data<double>()[1] = -(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30));
  GPT2 train(*be, cfg, DType::BF16);
  train.assign_weights(host);
  GPT2 fwd(*be, cfg, DType::BF16);
  fwd.set_mode(Mode::ForwardOnly);
  fwd.assign_weights(host);
  EXPECT_TRUE(bytes_of(fwd.params()) == bytes_of(train.params()));
  Tensor first = Tensor::host({2}, DType::F64);
  be->copy_to_host(first, fwd.params().view(0, {2}));
  EXPECT_EQ(first.data<double>()[0], 1.0);
  EXPECT_EQ(first.data<double>()[1], -1.0);
  // F32 sources, and a second assignment over the first (the weight mix's case): the same bits.
  Tensor host32 = Tensor::host({N}, DType::F32);
  for (int64_t i = 0; i < N; ++i) host32.data<float>()[i] = static_cast<float>(d(g));
  train.assign_weights(host32);
  fwd.assign_weights(host32);
  EXPECT_TRUE(bytes_of(fwd.params()) == bytes_of(train.params()));
  EXPECT_THROW(fwd.assign_weights(Tensor::host({N - 1}, DType::F32)), Error);
}

// The forward-only arrangement's bytes, measured on the CPU (every tensor a counted host buffer), are exactly
// model/memory_plan.h's forward_only_activation_bytes plus the LM-head chunk, and a fraction of the training
// arrangement's. HeadRows::All with one sequence per chunk: the chunk is T x ldv.
TEST(ForwardOnlyMemory, MeasuredActivationsAreThePlannedOnes) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  for (bool llama : {false, true}) {
    for (DType dt : {DType::F32, DType::F64}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (llama ? " llama" : " gpt2"));
      GPT2Config cfg = small_config(llama);
      cfg.n_layer = 6;
      const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 3, 17);
      const DType gd = grad_dtype(dt);
      Tensor w = Tensor::host({in.B, in.T}, gd), seq = Tensor::host({in.B}, gd);
      for (int64_t i = 0; i < in.B * in.T; ++i) {
        if (gd == DType::F64) w.data<double>()[i] = in.weights.data<double>()[i];
        else w.data<float>()[i] = static_cast<float>(in.weights.data<double>()[i]);
      }
      auto measure = [&](Mode mode) {
        GPT2 m(*be, cfg, dt);
        randomize(m, g);
        m.set_mode(mode);
        m.set_head_rows(HeadRows::All);
        m.set_logits_chunk_rows(in.T);
        const int64_t before = host_memory_stats().live;
        reset_host_peak_bytes();
        m.score(in.tokens, in.keymask, in.targets, w, seq);
        return host_memory_stats().peak - before;
      };
      const int64_t fwd = measure(Mode::ForwardOnly), train = measure(Mode::Train);
      const int64_t chunk = in.T * GPT2::logits_stride(cfg.vocab_size) * dtype_size(dt);
      const ActivationBytes plan = forward_only_activation_bytes(cfg, dt, in.B, in.T, AttentionSaved::RowStats);
      const ActivationBytes full = activation_bytes(cfg, dt, in.B, in.T, 0, AttentionSaved::RowStats);
      EXPECT_EQ(plan.backward_scratch, 0);
      EXPECT_EQ(fwd, plan.total() + chunk);
      EXPECT_EQ(train, full.total() + chunk);
      // One block instead of six, no per-layer output, no backward scratch: under a quarter here.
      EXPECT_LT(4 * fwd, train);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ForwardOnly,
                         ::testing::Combine(::testing::Values(DType::F32, DType::F64, DType::BF16),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<DType, bool>>& i) {
                           return std::string(dtype_name(std::get<0>(i.param))) +
                                  (std::get<1>(i.param) ? "_llama" : "_gpt2");
                         });

// The trainer: 3 optimizer steps of 2 accumulated micro-batches with a live reference, fp32 and bf16, recomputation
// off and on: the forward-only reference gives weights, optimizer state and loss bitwise those of a training-mode
// reference (the arrangement before forward-only mode existed), and training moved the weights.
TEST(ForwardOnlyTrainer, LiveReferenceRunIsBitwiseTheTrainingModeReferenceRun) {
  test::ScratchDir w("dpo_fwdonly_");
  test::write_tiny_fixture(w.dir.string(), 22);
  for (const char* precision : {"fp32", "bf16"})
    for (bool ckpt : {false, true}) {
      SCOPED_TRACE(std::string(precision) + (ckpt ? ", gradient_checkpointing" : ""));
      TrainConfig c;
      c.model = w / "base";
      c.train_file = w / "pref.jsonl";
      c.ref_cache_dir = w / "cache";
      c.max_length = 32;
      c.learning_rate = 1e-2;
      c.per_device_train_batch_size = 3;
      c.gradient_accumulation_steps = 2;
      c.max_steps = 3;
      c.logging_steps = 1;
      c.seed = 13;
      c.precision = precision;
      c.gradient_checkpointing = ckpt;
      c.precompute_ref_log_probs = false;
      RunOptions ro;
      ro.quiet = true;
      const std::string tag = std::string(precision) + (ckpt ? "_ck" : "");
      c.out_dir = w / ("train_mode_" + tag);
      ::setenv("DPO_TEST_TRAIN_MODE_REFERENCE", "1", 1);
      const RunSummary want = run_training(c, RunKind::Dpo, ro);
      ::unsetenv("DPO_TEST_TRAIN_MODE_REFERENCE");
      c.out_dir = w / ("forward_only_" + tag);
      const RunSummary got = run_training(c, RunKind::Dpo, ro);
      ASSERT_EQ(want.steps, 3);
      ASSERT_EQ(got.steps, 3);
      const std::string wm = test::slurp(want.final_checkpoint + "/model.safetensors");
      ASSERT_FALSE(wm.empty());
      EXPECT_TRUE(test::slurp(got.final_checkpoint + "/model.safetensors") == wm);
      EXPECT_TRUE(test::slurp(got.final_checkpoint + "/optimizer.safetensors") ==
                  test::slurp(want.final_checkpoint + "/optimizer.safetensors"));
      EXPECT_EQ(got.last_log.at("loss"), want.last_log.at("loss"));
      EXPECT_NE(test::checkpoint_weights(w / "base"), test::checkpoint_weights(got.final_checkpoint));
    }
}

}  // namespace
}  // namespace dpo
