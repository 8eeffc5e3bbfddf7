// The memory model (model/memory_plan.h) against the CPU backend's measured peak (host_memory_stats: every tensor
// the CPU backend creates is a counted host buffer): a DPO training step (live reference forward, policy forward
// with the device loss and the chunked head, backward, AdamW step) for a few shapes and dtypes, with and without
// checkpointing; checkpointing lowers both the predicted and the measured activation peak by the predicted factor;
// and `dpo plan` (exit 0 fits, 1 does not, 2 bad input; --json).
#include <gtest/gtest.h>

#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "model/gpt2.h"
#include "model/memory_plan.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"
#include "train/optim.h"

namespace dpo {
namespace {

struct Shape4 {
  int64_t layers, embd, heads, vocab, pairs, T;
};

struct Measured {
  int64_t peak = 0;        // the step's peak over the bytes alive before anything was built
  int64_t activations = 0;  // the peak during forward + backward over the bytes alive just before them
};

// One training step on the CPU with everything built inside the measured window. HeadRows::All: the chunk holds
// every slot of its pairs, as the plan's bound assumes (the compacted head allocates less).
Measured measure_step(const GPT2Config& cfg, DType dt, int64_t P, int64_t T, int64_t interval, bool live_ref,
                      int64_t chunk_rows) {
  auto be = make_cpu_backend();
  std::mt19937_64 g(1234 + static_cast<uint64_t>(T) * 7 + static_cast<uint64_t>(interval));
  const int64_t live0 = host_memory_stats().live;
  reset_host_peak_bytes();
  Measured out;
  {
    const DType gd = grad_dtype(dt);
    GPT2 policy(*be, cfg, dt);
    std::unique_ptr<GPT2> ref;
    if (live_ref) ref = std::make_unique<GPT2>(*be, cfg, dt);
    Rng rng(5);
    policy.init_random(rng);
    if (ref) ref->init_random(rng);
    for (GPT2* m : {&policy, ref.get()}) {
      if (!m) continue;
      m->set_gradient_checkpointing(interval);
      m->set_head_rows(HeadRows::All);
      m->set_logits_chunk_rows(chunk_rows);
    }
    AdamW opt(*be, policy.specs(), policy.params().numel(), dt == DType::F64 ? DType::F64 : DType::F32,
              OptimConfig{}, 10);
    const int64_t B = 2 * P;
    Tensor tokens = Tensor::host({B, T}, DType::I32), keymask = Tensor::host({B, T}, DType::I32),
           targets = Tensor::host({B, T}, DType::I32), weights = Tensor::host({B, T}, gd);
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(cfg.vocab_size - 1));
    for (int64_t i = 0; i < B * T; ++i) {
      tokens.data<int32_t>()[i] = tok(g);
      keymask.data<int32_t>()[i] = 1;
      targets.data<int32_t>()[i] = (i % T) + 1 < T ? tok(g) : -1;
      const double w = (i % T) >= T / 2 && (i % T) + 1 < T ? 1.0 : 0.0;
      if (gd == DType::F64) weights.data<double>()[i] = w;
      else weights.data<float>()[i] = static_cast<float>(w);
    }
    Tensor ref_logp = Tensor::host({B}, gd);
    const int64_t before = host_memory_stats().live;
    reset_host_peak_bytes();
    if (ref) ref->score(tokens, keymask, targets, weights, ref_logp);
    GPT2::PairLossHead head;
    head.ref_logp = ref_logp;
    LossConfig lc;
    head.params = pair_loss_params(lc);
    head.normalizer = static_cast<double>(P);
    head.sums = Tensor::host({kPairSumsWidth}, DType::F64);
    policy.zero_grad();
    policy.fused_forward_pairs(tokens, keymask, targets, weights, head);
    policy.fused_backward();
    out.activations = host_memory_stats().peak - before;
    opt.step(policy.master_params(), policy.grads());
    policy.sync_params();
  }
  out.peak = std::max(out.activations, host_memory_stats().peak - live0);
  // The peak of the whole window: reset_host_peak_bytes() above moved the peak, so take the larger of the two
  // windows (construction, then the step on top of it).
  return out;
}

MemoryPlanInput plan_input(const GPT2Config& cfg, DType dt, int64_t P, int64_t T, int64_t interval, bool live_ref,
                           int64_t chunk_rows) {
  MemoryPlanInput in;
  in.model = cfg;
  in.dtype = dt;
  in.pairs = P;
  in.rows = 2 * P;
  in.T = T;
  in.logits_chunk_rows = chunk_rows;
  in.checkpoint_interval = interval;
  in.reference = live_ref ? ReferencePlan::Live : ReferencePlan::Cached;
  in.attention = AttentionSaved::RowStats;
  in.compact_head = false;  // measure_step runs HeadRows::All
  in.f32_op_copies = true;   // the CPU backend
  return in;
}

GPT2Config shape_config(const Shape4& s) {
  GPT2Config c;
  c.n_layer = s.layers;
  c.n_embd = s.embd;
  c.n_head = s.heads;
  c.vocab_size = s.vocab;
  c.max_seq_len = std::max<int64_t>(s.T, 8);
  return c;
}

// The margin: the plan counts every buffer the step allocates and over-counts nothing, except the per-sequence
// tensors of the loss (a few [2P] and [2P, kSeqStatsWidth] tensors) and AdamW's small step record and state, about
// 450 bytes at these sizes, which it leaves out; so the measured peak lies in [plan, plan + 4 KiB]. A term
// forgotten or mis-sized by one [B,T,C] buffer (12 KiB and more here) moves it out of that window on one side or
// the other (a single [B,T] statistics row, 384 bytes in the smallest case, would not).
constexpr int64_t kSmallBytes = 4096;

TEST(MemoryPlan, PredictsTheCpuPeakOfATrainingStep) {
  const Shape4 shapes[] = {{4, 32, 4, 61, 2, 24}, {3, 48, 3, 100, 3, 37}, {6, 16, 2, 50, 1, 64}};
  for (const Shape4& s : shapes)
    for (DType dt : {DType::F32, DType::F64, DType::BF16})
      for (int64_t interval : {int64_t{0}, int64_t{1}, int64_t{2}})
        for (bool live : {false, true}) {
          SCOPED_TRACE("layers " + std::to_string(s.layers) + " T " + std::to_string(s.T) + " " + dtype_name(dt) +
                       " interval " + std::to_string(interval) + (live ? " live ref" : ""));
          const GPT2Config cfg = shape_config(s);
          const int64_t chunk = 2 * s.T + 5;  // one pair per chunk
          const Measured got = measure_step(cfg, dt, s.pairs, s.T, interval, live, chunk);
          const MemoryPlan plan = plan_memory(plan_input(cfg, dt, s.pairs, s.T, interval, live, chunk));
          // Cached reference: the plan has no reference term and the step builds none. The measured window has
          // no "device reserve" (0 on the CPU).
          EXPECT_LE(got.peak, plan.total + kSmallBytes) << "measured " << got.peak << ", planned " << plan.total;
          EXPECT_GE(got.peak, plan.total) << "measured " << got.peak << ", planned " << plan.total;
        }
}

// The Llama family: grouped-query heads (the expanded q|k|v and its gradient buffers), an untied head (a second
// [V, C] parameter), the SwiGLU width, the rotary tables and RMSNorm's single statistic, against the measured step.
TEST(MemoryPlan, PredictsTheCpuPeakOfALlamaTrainingStep) {
  struct LlamaShape {
    int64_t layers, embd, heads, kv, inter, vocab, pairs, T;
    bool tied;
  };
  const LlamaShape shapes[] = {{3, 24, 6, 2, 50, 61, 2, 24, false}, {2, 32, 4, 4, 44, 100, 3, 37, true}};
  for (const LlamaShape& s : shapes)
    for (DType dt : {DType::F32, DType::F64, DType::BF16})
      for (int64_t interval : {int64_t{0}, int64_t{2}})
        for (bool live : {false, true}) {
          SCOPED_TRACE("layers " + std::to_string(s.layers) + " kv " + std::to_string(s.kv) + " " + dtype_name(dt) +
                       " interval " + std::to_string(interval) + (live ? " live ref" : ""));
          GPT2Config cfg = shape_config({s.layers, s.embd, s.heads, s.vocab, s.pairs, s.T});
          cfg.arch = Arch::Llama;
          cfg.model_type = "llama";
          cfg.n_kv_head = s.kv;
          cfg.intermediate_size = s.inter;
          cfg.tie_word_embeddings = s.tied;
          cfg.max_seq_len = 2 * s.T;  // rotary tables larger than the batch
          const int64_t chunk = 2 * s.T + 5;
          const Measured got = measure_step(cfg, dt, s.pairs, s.T, interval, live, chunk);
          const MemoryPlan plan = plan_memory(plan_input(cfg, dt, s.pairs, s.T, interval, live, chunk));
          EXPECT_LE(got.peak, plan.total + kSmallBytes) << "measured " << got.peak << ", planned " << plan.total;
          EXPECT_GE(got.peak, plan.total) << "measured " << got.peak << ", planned " << plan.total;
        }
}

// Checkpointing's saving: the predicted activation terms and the measured forward + backward peak shrink by the
// same factor (within 2%: the measured figure also holds the LM-head chunk and the per-sequence tensors, which do
// not change), and the factor is what the layout implies: 12 layers at interval 1 keep one block plus 12 [B,T,C]
// outputs instead of 12 blocks.
TEST(MemoryPlan, CheckpointingLowersActivationsByThePredictedFactor) {
  GPT2Config cfg = shape_config({12, 32, 4, 40, 2, 48});
  const int64_t P = 2, T = 48, chunk = 2 * T;
  auto act = [&](int64_t interval) {
    const MemoryPlan p = plan_memory(plan_input(cfg, DType::F32, P, T, interval, false, chunk));
    int64_t head = 0;
    for (const auto& t : p.terms)
      if (t.name == "LM-head chunk") head = t.bytes;
    return std::make_pair(p.activations + head, measure_step(cfg, DType::F32, P, T, interval, false, chunk));
  };
  const auto [plan_off, meas_off] = act(0);
  for (int64_t interval : {int64_t{1}, int64_t{3}, int64_t{4}}) {
    SCOPED_TRACE("interval " + std::to_string(interval));
    const auto [plan_on, meas_on] = act(interval);
    const double predicted = static_cast<double>(plan_on) / static_cast<double>(plan_off);
    const double measured = static_cast<double>(meas_on.activations) / static_cast<double>(meas_off.activations);
    EXPECT_LT(predicted, 0.5);  // the saving is real: less than half at 12 layers
    EXPECT_NEAR(measured, predicted, 0.02 * predicted);
  }
  // The blocks' arithmetic itself: 12 blocks vs (interval-1 scratch = 1 block without res3) + 12 kept outputs.
  const int64_t BT = 2 * P * T, C = cfg.n_embd;
  const ActivationBytes off = activation_bytes(cfg, DType::F32, 2 * P, T, 0, AttentionSaved::RowStats);
  const ActivationBytes on = activation_bytes(cfg, DType::F32, 2 * P, T, 1, AttentionSaved::RowStats);
  const int64_t block = BT * (16 * C * 4 + 4 * 4);
  EXPECT_EQ(off.blocks, 12 * block);
  EXPECT_EQ(on.blocks, block - BT * C * 4 + 12 * BT * C * 4);
}

// A prefix_shared batch (rows of several pairs, the LM head over whole rows): the plan with the batch's own rows
// and row length and the layout's per-slot inputs (positions, spans), against the measured step, policy only.
TEST(MemoryPlan, PredictsTheCpuPeakOfAPrefixSharedStep) {
  std::mt19937_64 g(test::test_seed());
  const GPT2Config cfg = shape_config({3, 32, 4, 53, 1, 64});
  const std::vector<PreferencePair> data = test::random_pairs(g, 7, static_cast<int32_t>(cfg.vocab_size), 9, 7);
  const std::vector<int64_t> idx = {0, 1, 2, 3, 4, 5, 6};
  for (int64_t interval : {int64_t{0}, int64_t{1}}) {
    SCOPED_TRACE("interval " + std::to_string(interval));
    auto be = make_cpu_backend();
    const int64_t live0 = host_memory_stats().live;
    reset_host_peak_bytes();
    int64_t R = 0, T = 0;
    {
      GPT2 m(*be, cfg, DType::F32);
      Rng rng(9);
      m.init_random(rng);
      m.set_gradient_checkpointing(interval);
      m.set_head_rows(HeadRows::All);
      m.set_logits_chunk_rows(40);
      AdamW opt(*be, m.specs(), m.params().numel(), DType::F32, OptimConfig{}, 10);
      const Batch b = make_layout_batch(data, idx, BatchLayout::PrefixShared, 40, DType::F32, 0);
      R = b.tokens.size(0);
      T = b.T;
      Tensor ref_logp = Tensor::host({2 * b.pairs}, DType::F32);
      GPT2::PairLossHead head;
      head.ref_logp = ref_logp;
      head.params = pair_loss_params(LossConfig{});
      head.sums = Tensor::host({kPairSumsWidth}, DType::F64);
      const LayoutScope scope(m, b);
      m.zero_grad();
      m.fused_forward_pairs(b.tokens, b.keymask, b.targets, b.weights, head);
      m.fused_backward();
      opt.step(m.master_params(), m.grads());
    }
    const int64_t measured = host_memory_stats().peak - live0;
    MemoryPlanInput in = plan_input(cfg, DType::F32, 7, T, interval, false, 40);
    in.rows = R;
    in.pair_rows = false;
    const MemoryPlan plan = plan_memory(in);
    ASSERT_GT(R, 1);
    EXPECT_LE(measured, plan.total + kSmallBytes) << "measured " << measured << ", planned " << plan.total;
    EXPECT_GE(measured, plan.total) << "measured " << measured << ", planned " << plan.total;
  }
}

TEST(MemoryPlan, TermsFollowShardingReferenceAndAttentionForm) {
  MemoryPlanInput in;
  in.model = GPT2Config{};  // GPT-2 124M
  in.dtype = DType::BF16;
  in.pairs = 4;
  in.rows = 8;
  in.T = 1024;
  in.attention = AttentionSaved::Probabilities;
  const int64_t N = in.model.num_parameters();
  auto term = [](const MemoryPlan& p, const std::string& name) -> int64_t {
    for (const auto& t : p.terms)
      if (t.name == name) return t.bytes;
    return -1;
  };
  const MemoryPlan one = plan_memory(in);
  EXPECT_EQ(term(one, "weights"), 2 * N);
  EXPECT_EQ(term(one, "master weights"), 4 * N);
  EXPECT_EQ(term(one, "gradients"), 4 * N);
  EXPECT_EQ(term(one, "AdamW moments"), 8 * N);
  EXPECT_EQ(term(one, "reference model"), -1);
  // [B,NH,T,T] bf16 per layer: 8 * 12 * 1024^2 * 2 bytes * 12 layers.
  EXPECT_EQ(term(one, "activations: attention saved state"), int64_t{8} * 12 * 1024 * 1024 * 2 * 12);
  in.zero1 = true;
  in.ranks = 8;
  const MemoryPlan z = plan_memory(in);
  EXPECT_EQ(term(z, "AdamW moments"), 8 * ((N + 7) / 8));
  EXPECT_EQ(term(z, "master weights"), 4 * ((N + 7) / 8));
  in.reference = ReferencePlan::Live;
  EXPECT_EQ(term(plan_memory(in), "reference model"), (2 + 4 + 4) * N);
  EXPECT_THROW(parse_bytes("80 parsecs", "--device-memory"), InputError);
  EXPECT_EQ(parse_bytes("80GiB", "x"), int64_t{80} << 30);
  EXPECT_EQ(parse_bytes("80 GB", "x"), int64_t{80000000000});
  EXPECT_EQ(parse_bytes("1.5KiB", "x"), 1536);
}

// `dpo plan`: a GPT-2-shaped checkpoint directory (config.json only is read), a config, the fit decision and JSON.
TEST(MemoryPlanCli, FitsDoesNotFitJsonAndBadInput) {
  test::ScratchDir w("dpo_plan_");
  test::write_tiny_fixture(w.dir.string(), 4);
  {
    std::ofstream y(w / "run.yaml");
    y << "model: " << (w / "base") << "\ntrain_file: " << (w / "pref.jsonl") << "\nout_dir: " << (w / "out")
      << "\nmax_length: 32\nper_device_train_batch_size: 2\n";
  }
  auto plan = [&](const std::string& args) {
    return test::run_cli(std::string(DPO_BINARY_DIR) + "/dpo", w.dir,
                         "plan --config " + test::shell_quote(w / "run.yaml") + " " + args);
  };
  const auto fits = plan("--device-memory 1GiB");
  EXPECT_EQ(fits.code, 0) << fits.out << fits.err;
  EXPECT_NE(fits.out.find("activations: blocks"), std::string::npos) << fits.out;
  EXPECT_NE(fits.out.find("fits"), std::string::npos) << fits.out;
  const auto no = plan("--device-memory 100KiB");
  EXPECT_EQ(no.code, 1) << no.out << no.err;
  EXPECT_NE(no.out.find("does not fit"), std::string::npos) << no.out;
  const auto js = plan("--json --device-memory 1GiB gradient_checkpointing=true");
  ASSERT_EQ(js.code, 0) << js.out << js.err;
  const nlohmann::json j = nlohmann::json::parse(js.out);
  EXPECT_TRUE(j.at("fits").get<bool>());
  EXPECT_GT(j.at("total_bytes").get<int64_t>(), 0);
  EXPECT_GE(j.at("terms").size(), 6u);
  const auto bad = plan("--device-memory lots");
  EXPECT_EQ(bad.code, 2) << bad.out << bad.err;
  EXPECT_NE(bad.err.find("--device-memory"), std::string::npos) << bad.err;
  const auto badkey = plan("gradient_checkpointing_interval=0");
  EXPECT_EQ(badkey.code, 2) << badkey.out << badkey.err;
  EXPECT_NE(badkey.err.find("gradient_checkpointing_interval"), std::string::npos) << badkey.err;
}

}  // namespace
}  // namespace dpo
