// End-to-end trainer checks on a tiny GPT-2: bit-identical resume, gradient accumulation, the reference-log-prob
// cache, metrics names, checkpoint verification.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "runtime/safetensors.h"
#include "train/data.h"
#include "train/hash.h"
#include "train/reference.h"
#include "train/tokenizer.h"
#include "train/trainer.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

struct Workdir : test::ScratchDir {
  Workdir() : ScratchDir("dpo_trainer_") {}
};

// A tiny model (byte vocabulary) and small data files (tests/test_fixture.h).
void setup(const Workdir& w, int n_pairs = 22) { test::write_tiny_fixture(w.dir.string(), n_pairs); }

TrainConfig base_config(const Workdir& w, const std::string& out) {
  TrainConfig c;
  c.model = w / "base";
  c.train_file = w / "pref.jsonl";
  c.out_dir = w / out;
  c.ref_cache_dir = w / "cache";
  c.max_length = 32;  // truncation: trl1, the default (the fixture's records fit whole)
  c.learning_rate = 1e-2;
  c.per_device_train_batch_size = 4;
  c.gradient_accumulation_steps = 2;
  c.num_train_epochs = 2;
  c.logging_steps = 1;
  c.seed = 7;
  return c;
}

RunOptions quiet() {
  RunOptions r;
  r.quiet = true;
  return r;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::vector<double> weights_of(const std::string& dir) { return test::checkpoint_weights(dir); }

void run_resume_case(RunKind kind) {
  Workdir w;
  setup(w);
  TrainConfig full = base_config(w, "full");
  if (kind == RunKind::Sft) full.train_file = w / "sft.jsonl";
  full.weight_decay = 0.1;
  full.lr_scheduler_type = "cosine";
  full.warmup_steps = 2;
  RunSummary a = run_training(full, kind, quiet());
  ASSERT_EQ(a.steps, 6);  // 22 pairs / 8 per step = 3 steps per epoch (the last one short), 2 epochs

  // Same run, stopped at step 4 (mid-epoch 2) by max... we emulate the interruption by saving every 4 steps
  // and resuming from step-4 in a fresh out_dir copy.
  TrainConfig part = full;
  part.out_dir = w / "part";
  part.save_steps = 4;
  run_training(part, kind, quiet());
  fs::remove_all(fs::path(part.out_dir) / "checkpoints" / "step-6");
  RunOptions ro = quiet();
  ro.resume = (fs::path(part.out_dir) / "checkpoints" / "step-4").string();
  RunSummary b = run_training(part, kind, ro);
  ASSERT_EQ(b.steps, 6);
  const std::string fa = slurp(a.final_checkpoint + "/model.safetensors");
  const std::string fb = slurp(b.final_checkpoint + "/model.safetensors");
  ASSERT_FALSE(fa.empty());
  EXPECT_TRUE(fa == fb) << "resumed weights differ from the uninterrupted run";
  EXPECT_TRUE(slurp(a.final_checkpoint + "/optimizer.safetensors") ==
              slurp(b.final_checkpoint + "/optimizer.safetensors"));
  // Training moved the weights.
  EXPECT_NE(weights_of(w / "base"), weights_of(a.final_checkpoint));
  // The resumed run's metrics file has each step once, in order.
  std::ifstream mf(part.out_dir + "/metrics.jsonl");
  std::string line;
  std::vector<int64_t> steps;
  while (std::getline(mf, line)) steps.push_back(nlohmann::json::parse(line)["step"].get<int64_t>());
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
}

TEST(Trainer, DpoResumeIsBitIdentical) { run_resume_case(RunKind::Dpo); }
TEST(Trainer, SftResumeIsBitIdentical) { run_resume_case(RunKind::Sft); }

TEST(Trainer, GradientAccumulationMatchesOneBigBatch) {
  // 4 pairs x 2 micro-batches and 8 pairs x 1 must give the same step: the loss is normalised by the pairs of
  // the whole optimizer step. Not bitwise (different summation grouping), so float32 tolerance.
  Workdir w;
  setup(w, 16);
  TrainConfig a = base_config(w, "a");
  a.num_train_epochs = 1;
  a.learning_rate = 1e-3;
  a.max_grad_norm = 0;  // clipping would hide a normalisation error
  TrainConfig b = a;
  b.out_dir = w / "b";
  b.per_device_train_batch_size = 8;
  b.gradient_accumulation_steps = 1;
  TrainConfig c = a;  // the wrong normalisation a per-micro-batch average would give: compare its distance
  RunSummary ra = run_training(a, RunKind::Dpo, quiet());
  RunSummary rb = run_training(b, RunKind::Dpo, quiet());
  auto wa = weights_of(ra.final_checkpoint), wb = weights_of(rb.final_checkpoint), w0 = weights_of(w / "base");
  double max_diff = 0, max_move = 0;
  for (size_t i = 0; i < wa.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(wa[i] - wb[i])));
    max_move = std::max(max_move, static_cast<double>(std::fabs(wa[i] - w0[i])));
  }
  EXPECT_GT(max_move, 1e-4);              // the steps did something (Adam moves each weight by ~lr)
  EXPECT_LT(max_diff, 1e-3 * max_move);   // and the two runs agree to float rounding of the gradient
  EXPECT_EQ(ra.last_log.at("rewards/accuracies"), rb.last_log.at("rewards/accuracies"));
  EXPECT_NEAR(ra.last_log.at("loss"), rb.last_log.at("loss"), 1e-6);
}

TEST(Trainer, MetricsUseTrlNamesAndEvalPrefix) {
  Workdir w;
  setup(w);
  TrainConfig c = base_config(w, "m");
  c.eval_file = w / "pref.jsonl";
  c.eval_steps = 2;
  run_training(c, RunKind::Dpo, quiet());
  std::ifstream f(c.out_dir + "/metrics.jsonl");
  std::string line;
  int train_lines = 0, eval_lines = 0;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    ASSERT_TRUE(j.contains("step"));
    if (j.contains("eval_loss")) {
      ++eval_lines;
      for (const char* k : {"eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                            "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"})
        EXPECT_TRUE(j.contains(k)) << k;
    } else {
      ++train_lines;
      for (const char* k : {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch",
                            "tokens_per_second"})
        EXPECT_TRUE(j.contains(k)) << k;
      // margins = chosen - rejected, by definition
      EXPECT_NEAR(j["rewards/margins"].get<double>(),
                  j["rewards/chosen"].get<double>() - j["rewards/rejected"].get<double>(), 1e-9);
    }
  }
  EXPECT_EQ(train_lines, 6);
  EXPECT_EQ(eval_lines, 3);  // steps 2, 4 and the end
  // At step 1 the policy equals the reference: every reward is 0 and the sigmoid loss is log 2.
  std::ifstream f2(c.out_dir + "/metrics.jsonl");
  std::getline(f2, line);
  auto first = nlohmann::json::parse(line);
  EXPECT_NEAR(first["loss"].get<double>(), std::log(2.0), 1e-6);
  EXPECT_NEAR(first["rewards/chosen"].get<double>(), 0.0, 1e-6);
}

TEST(Trainer, ReferenceCacheIsReusedAndStaleCacheDetected) {
  Workdir w;
  setup(w);
  auto be = make_cpu_backend();
  auto ref = load_gpt2_checkpoint(*be, w / "base", DType::F32);
  auto tok = make_tokenizer("byte");
  DataOptions d;
  d.max_length = 32;
  LoadStats st;
  auto pairs = load_preferences(w / "pref.jsonl", *tok, d, &st);
  auto r1 = cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s1", w / "cache", 5);
  EXPECT_EQ(r1.status, RefCacheResult::Status::Miss);
  auto r2 = cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s1", w / "cache", 5);
  EXPECT_EQ(r2.status, RefCacheResult::Status::Hit);
  EXPECT_EQ(r1.logps.chosen, r2.logps.chosen);
  // Cached values equal a direct computation with another batch size, to float rounding.
  RefLogps direct = compute_ref_logps(*ref, pairs, 3);
  for (size_t i = 0; i < pairs.size(); ++i) EXPECT_NEAR(direct.chosen[i], r2.logps.chosen[i], 1e-4);
  // Other settings or other weights: another key, so no reuse.
  EXPECT_EQ(cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s2", w / "cache", 5).status,
            RefCacheResult::Status::Miss);
  const float saved = ref->params().data<float>()[0];
  ref->params().data<float>()[0] = saved + 1.0f;
  EXPECT_EQ(cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s1", w / "cache", 5).status,
            RefCacheResult::Status::Miss);
  ref->params().data<float>()[0] = saved;
  // A cache file whose recorded key does not match (tampered, or written by a buggy version) is stale.
  SafetensorsFile f(r1.path);
  auto meta = f.metadata();
  meta["data_sha256"] = "0000";
  save_safetensors(r1.path, {{"chosen", f.read("chosen")}, {"rejected", f.read("rejected")}}, meta);
  auto r3 = cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s1", w / "cache", 5);
  EXPECT_EQ(r3.status, RefCacheResult::Status::Stale);
  EXPECT_NE(r3.reason.find("data_sha256"), std::string::npos) << r3.reason;
  // A truncated cache file is stale too, never a crash.
  std::string bytes = slurp(r1.path);
  std::ofstream(r1.path, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  EXPECT_EQ(cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s1", w / "cache", 5).status,
            RefCacheResult::Status::Stale);
}

TEST(Trainer, LiveReferenceMatchesPrecomputed) {
  Workdir w;
  setup(w);
  TrainConfig a = base_config(w, "pre");
  TrainConfig b = a;
  b.out_dir = w / "live";
  b.precompute_ref_log_probs = false;
  RunSummary ra = run_training(a, RunKind::Dpo, quiet());
  RunSummary rb = run_training(b, RunKind::Dpo, quiet());
  // Same math; the reference log-probs come from batches of different padding, so float rounding differs.
  EXPECT_NEAR(ra.last_log.at("loss"), rb.last_log.at("loss"), 1e-4);
  EXPECT_NEAR(ra.last_log.at("rewards/margins"), rb.last_log.at("rewards/margins"), 1e-4);
}

// The CUDA-graph path of the trainer (cuda_graphs: each micro-batch shape's forward, loss and backward recorded
// once and replayed, reading its inputs from buffers of its own), run on the CPU through the test switch, where
// the "graph" is the recorded function: every step's weights and metrics are bitwise those of the plain path, with
// cached and with live reference log-probs. pad_to_multiple_of makes the shapes repeat (the fixture's rows are
// shorter than 32), so shapes are run eagerly, captured and replayed; an epoch's last step has a smaller
// micro-batch, which is another shape.
TEST(Trainer, GraphPathIsBitwiseThePlainPath) {
  Workdir w;
  setup(w);
  for (bool live : {false, true}) {
    SCOPED_TRACE(live ? "live reference" : "cached reference");
    TrainConfig a = base_config(w, live ? "plain_live" : "plain");
    a.pad_to_multiple_of = 32;
    a.precompute_ref_log_probs = !live;
    a.num_train_epochs = 3;
    TrainConfig b = a;
    b.out_dir = w / (live ? "graph_live" : "graph");
    RunSummary ra = run_training(a, RunKind::Dpo, quiet());
    ::setenv("DPO_TEST_GRAPHS_ON_CPU", "1", 1);
    RunSummary rb = run_training(b, RunKind::Dpo, quiet());
    ::unsetenv("DPO_TEST_GRAPHS_ON_CPU");
    ASSERT_EQ(ra.steps, rb.steps);
    EXPECT_GE(ra.steps, 6);
    EXPECT_TRUE(slurp(ra.final_checkpoint + "/model.safetensors") == slurp(rb.final_checkpoint + "/model.safetensors"));
    std::ifstream fa(a.out_dir + "/metrics.jsonl"), fb(b.out_dir + "/metrics.jsonl");
    std::string la, lb;
    int lines = 0;
    while (std::getline(fa, la) && std::getline(fb, lb)) {
      nlohmann::json ja = nlohmann::json::parse(la), jb = nlohmann::json::parse(lb);
      for (const char* k : {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logits/rejected",
                            "grad_norm", "num_tokens"})
        if (ja.contains(k)) EXPECT_EQ(ja[k], jb[k]) << k << " at step " << ja["step"];
      ++lines;
    }
    EXPECT_EQ(lines, ra.steps);
    EXPECT_NE(weights_of(w / "base"), weights_of(rb.final_checkpoint));
  }
}

TEST(Trainer, CorruptedCheckpointIsRejectedOnResume) {
  Workdir w;
  setup(w);
  TrainConfig c = base_config(w, "x");
  c.save_steps = 2;
  run_training(c, RunKind::Dpo, quiet());
  const std::string model = c.out_dir + "/checkpoints/step-2/model.safetensors";
  std::string bytes = slurp(model);
  bytes[bytes.size() - 3] ^= 0x40;
  std::ofstream(model, std::ios::binary) << bytes;
  RunOptions ro = quiet();
  ro.resume = c.out_dir + "/checkpoints/step-2";
  try {
    run_training(c, RunKind::Dpo, ro);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("SHA-256"), std::string::npos) << e.what();
  }
  // Starting over in the same out_dir without --resume is refused.
  try {
    run_training(c, RunKind::Dpo, quiet());
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("--resume"), std::string::npos) << e.what();
  }
  // Resuming with a different learning rate is refused and names the key.
  ro.resume = "latest";
  TrainConfig d = c;
  d.learning_rate = 0.5;
  try {
    run_training(d, RunKind::Dpo, ro);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("learning_rate"), std::string::npos) << e.what();
  }
  // No temporary checkpoint directories are left behind.
  for (const auto& e : fs::directory_iterator(c.out_dir + "/checkpoints"))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

// The numerical guard end to end. learning_rate 1e39 (accepted by today's validation; set on the TrainConfig) makes
// every update overflow the float weights: each step is skipped (weights, moments and optimizer step unchanged),
// the metrics say so, every checkpoint written holds the initial weights bitwise (no Inf/NaN), and after
// max_consecutive_skipped_steps skips in a row the run stops with an InputError (the CLI's exit code 2) naming the
// key. fp32 and bf16 (fp32 master weights + a bf16 compute copy, which a skipped step must not touch either).
// A weight that no step can make finite again: +Inf in the last position embedding row, which the runs never read
// (positions < max_length = 32 < max_seq_len = 40). Its gradient is 0, so the gradient norm stays finite and only the
// optimizer's dry run sees the non-finite update. (A learning rate that overflows, e.g. 1e39, is refused by config
// validation since learning_rate is bounded; the optimizer-level overflow case is in test_optim.cpp.)
void poison_unused_position(const Workdir& w) {
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, w / "base", DType::F32);
  Tensor wpe = m->param("wpe.weight");
  wpe.data<float>()[wpe.numel() - 1] = std::numeric_limits<float>::infinity();
  save_gpt2_checkpoint(*m, w / "base");
}

void run_overflow_case(const std::string& precision) {
  Workdir w;
  setup(w);
  poison_unused_position(w);
  TrainConfig c = base_config(w, "overflow");
  c.precision = precision;
  c.save_steps = 1;
  c.max_consecutive_skipped_steps = 3;  // of the run's 6 steps
  try {
    run_training(c, RunKind::Dpo, quiet());
    FAIL() << "the run did not stop";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("3 optimizer steps in a row were skipped"), std::string::npos) << m;
    EXPECT_NE(m.find("steps 1-3"), std::string::npos) << m;
    EXPECT_NE(m.find("non-finite updated weights"), std::string::npos) << m;
    EXPECT_NE(m.find("max_consecutive_skipped_steps"), std::string::npos) << m;
    EXPECT_NE(m.find("step-2"), std::string::npos) << "names the last checkpoint: " << m;
  }
  const std::vector<double> base = weights_of(w / "base");
  for (int step : {1, 2}) {
    const std::string dir = c.out_dir + "/checkpoints/step-" + std::to_string(step);
    SCOPED_TRACE(dir);
    const std::vector<double> got = weights_of(dir);
    int64_t non_finite = 0;
    for (double x : got) non_finite += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(non_finite, 1) << "only the poisoned element is non-finite";
    EXPECT_EQ(got, base) << "a skipped step changed the weights";
    auto st = nlohmann::json::parse(slurp(dir + "/trainer_state.json"));
    EXPECT_EQ(st["optimizer_step"].get<int64_t>(), 0);
    SafetensorsFile of(dir + "/optimizer.safetensors");
    for (const char* k : {"exp_avg", "exp_avg_sq"}) {
      const Tensor t = of.read_as(k, DType::F32);
      const float* v = t.data<float>();
      for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(v[i], 0.0f) << k << " moved at " << i;
    }
  }
  EXPECT_FALSE(fs::exists(c.out_dir + "/checkpoints/step-3")) << "the stopping step is not checkpointed";
  // One metrics line per step, each with a finite gradient norm and skipped_steps = 1.
  std::ifstream mf(c.out_dir + "/metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(mf, line)) {
    auto j = nlohmann::json::parse(line);
    ++lines;
    EXPECT_TRUE(std::isfinite(j["grad_norm"].get<double>()));
    ASSERT_TRUE(j.contains("skipped_steps")) << line;
    EXPECT_EQ(j["skipped_steps"].get<double>(), 1.0);
  }
  EXPECT_EQ(lines, 3);
}

TEST(Trainer, OverflowingStepsAreSkippedAndTheRunStops) { run_overflow_case("fp32"); }
TEST(Trainer, OverflowingStepsAreSkippedAndTheRunStopsBf16) { run_overflow_case("bf16"); }

// With the limit off (0), a run whose every step was skipped still fails at the end (never "success" with the
// initial weights), and writes no final checkpoint.
TEST(Trainer, RunWithEveryStepSkippedFails) {
  Workdir w;
  setup(w);
  poison_unused_position(w);
  TrainConfig c = base_config(w, "allskipped");
  c.max_consecutive_skipped_steps = 0;
  try {
    run_training(c, RunKind::Dpo, quiet());
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("every one of the run's 6 optimizer steps was skipped"), std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(c.out_dir + "/checkpoints/step-6"));
}

// A normal run is untouched by the guard: no metrics line carries skipped_steps. (Bitwise equality of the guarded
// update with the plain kernel: test_optim.cpp, StepEqualsOneUpdatePerParameterBitwise.)
TEST(Trainer, NormalRunSkipsNothing) {
  Workdir w;
  setup(w);
  TrainConfig c = base_config(w, "normal");
  c.max_consecutive_skipped_steps = 1;  // the strictest limit: any skip would stop the run
  RunSummary r = run_training(c, RunKind::Dpo, quiet());
  EXPECT_EQ(r.steps, 6);
  std::ifstream mf(c.out_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(mf, line)) EXPECT_FALSE(nlohmann::json::parse(line).contains("skipped_steps")) << line;
}

// transformers' warmup: optimizer step 1 runs at lr 0 (lr_lambda(0) = 0 / warmup_steps), so its checkpoint holds
// the initial weights exactly (AdamW with lr 0 moves nothing, weight decay included); steps 2 and 3 use lr / 2 and
// lr (warmup_steps 2), and the weights move.
TEST(Trainer, WarmupFirstStepUsesLrZero) {
  Workdir w;
  setup(w);
  for (const char* sched : {"constant_with_warmup", "linear", "cosine"}) {
    SCOPED_TRACE(sched);
    TrainConfig c = base_config(w, std::string("warm_") + sched);
    c.lr_scheduler_type = sched;
    c.warmup_steps = 2;
    c.weight_decay = 0.1;
    c.max_steps = 3;
    c.save_steps = 1;
    run_training(c, RunKind::Dpo, quiet());
    std::ifstream mf(c.out_dir + "/metrics.jsonl");
    std::string line;
    std::vector<double> lrs;
    while (std::getline(mf, line)) lrs.push_back(nlohmann::json::parse(line)["learning_rate"].get<double>());
    ASSERT_EQ(lrs.size(), 3u);
    EXPECT_EQ(lrs[0], 0.0);
    EXPECT_DOUBLE_EQ(lrs[1], c.learning_rate / 2);
    // Step 3 (0-based 2 = warmup_steps) is the first at the peak; linear and cosine start decaying after it.
    EXPECT_DOUBLE_EQ(lrs[2], c.learning_rate);
    const auto w0 = weights_of(w / "base");
    EXPECT_EQ(weights_of(c.out_dir + "/checkpoints/step-1"), w0) << "lr 0 moved the weights";
    EXPECT_NE(weights_of(c.out_dir + "/checkpoints/step-2"), w0);
  }
}

// truncation: trl1 drops a record whose prompt alone has >= max_length tokens, and says so in the run's log (the
// "data:" summary line and a line of its own), for the training and the evaluation file; dpo eval reports it.
TEST(Trainer, DroppedRecordsAreCountedInTheRunLog) {
  Workdir w;
  setup(w);
  const std::string data = w / "long.jsonl";
  {
    std::ofstream f(data);
    auto rec = [&](size_t prompt_bytes) {
      f << nlohmann::json{{"prompt", std::string(prompt_bytes, 'p')}, {"chosen", " good"}, {"rejected", " bad"}}.dump()
        << "\n";
    };
    for (int i = 0; i < 4; ++i) rec(9);
    rec(31);  // max_length - 1: kept, its completions cut to one token
    rec(32);  // max_length: dropped
    rec(39);  // dropped
  }
  TrainConfig c = base_config(w, "dropped");
  c.train_file = data;
  c.eval_file = data;
  c.max_steps = 1;
  RunOptions ro;
  ro.plain_progress = true;
  testing::internal::CaptureStderr();
  run_training(c, RunKind::Dpo, ro);
  const std::string log = testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("data: " + data + ": 5 records (1 truncated, 2 dropped, 0 skipped)"), std::string::npos) << log;
  EXPECT_NE(log.find("data: " + data + ": 5 evaluation records (1 truncated, 2 dropped)"), std::string::npos) << log;
  EXPECT_NE(log.find("dropped 2: prompt alone has >= max_length (32) tokens"), std::string::npos) << log;
  EvalReport rep;
  TrainConfig e = c;
  run_evaluation(e, w / "base", nullptr, &rep);
  EXPECT_EQ(rep.pairs, 5);
  EXPECT_EQ(rep.dropped, 2);
  EXPECT_EQ(rep.truncated, 1);
  // The legacy rule (max_prompt_length set) cuts those prompts instead: nothing dropped.
  e.max_prompt_length = 16;
  run_evaluation(e, w / "base", nullptr, &rep);
  EXPECT_EQ(rep.pairs, 7);
  EXPECT_EQ(rep.dropped, 0);
  EXPECT_EQ(rep.truncated, 3);
}

TEST(Trainer, DpoImprovesPreferenceAccuracyOnHeldInPairs) {
  // A learning signal sanity check: after a few epochs on 22 separable pairs the implicit reward ranks the chosen
  // completion above the rejected one for most pairs (it starts at exactly 0 margin).
  Workdir w;
  setup(w);
  TrainConfig c = base_config(w, "learn");
  c.num_train_epochs = 8;
  c.eval_file = w / "pref.jsonl";
  RunSummary r = run_training(c, RunKind::Dpo, quiet());
  EXPECT_GT(r.eval.at("eval_rewards/accuracies"), 0.8);
  EXPECT_GT(r.eval.at("eval_rewards/margins"), 0.0);
  EXPECT_LT(r.eval.at("eval_loss"), std::log(2.0));
}

// TRL's logits/chosen, logits/rejected and num_tokens (docs/training.md), against a direct computation: the base
// model's full [R, T, V] logits in F64 (GPT2::forward, not the log-prob kernel that emits the statistics), averaged
// over the vocabulary at every completion position, summed over the step's chosen / rejected rows and divided by
// their completion tokens; num_tokens the real tokens of both rows of every pair trained on so far.
TEST(Trainer, LogitsAndNumTokensMetricsMatchADirectComputation) {
  Workdir w;
  setup(w);
  TrainConfig c = base_config(w, "lg");
  c.eval_file = w / "eval.jsonl";
  c.eval_steps = 2;
  c.save_steps = 4;
  RunSummary r = run_training(c, RunKind::Dpo, quiet());
  ASSERT_EQ(r.steps, 6);

  std::vector<nlohmann::json> train, eval;
  {
    std::ifstream f(c.out_dir + "/metrics.jsonl");
    std::string line;
    while (std::getline(f, line)) {
      auto j = nlohmann::json::parse(line);
      (j.contains("eval_loss") ? eval : train).push_back(j);
    }
  }
  ASSERT_EQ(train.size(), 6u);
  ASSERT_EQ(eval.size(), 3u);

  // The data as the trainer loads it, in epoch 0's order; step 1 is the first 8 pairs, before any update, so its
  // logits are the base model's.
  auto tok = make_tokenizer(c.tokenizer);
  DataOptions d;
  d.max_length = c.max_length;
  // The run's rule: truncation trl1 with keep_start, the defaults (c leaves both keys unset).
  ASSERT_TRUE(c.truncation.empty() || c.truncation == "trl1");
  ASSERT_TRUE(c.truncation_mode.empty() || c.truncation_mode == "keep_start");
  d.rule = TruncationRule::Trl1;
  d.truncation = TruncationMode::KeepStart;
  d.append_eos = true;
  const auto pairs = load_preferences(c.train_file, *tok, d, nullptr);
  const int64_t N = static_cast<int64_t>(pairs.size());
  const int64_t per_step = c.per_device_train_batch_size * c.gradient_accumulation_steps;
  const auto order = epoch_order(N, static_cast<uint64_t>(c.seed), 0);
  auto be = make_cpu_backend(1);
  auto base = load_gpt2_checkpoint(*be, w / "base", DType::F64);
  const int64_t V = base->config().vocab_size;
  double sum_c = 0, sum_r = 0, n_c = 0, n_r = 0, tokens_step1 = 0;
  for (int64_t m0 = 0; m0 < per_step; m0 += c.per_device_train_batch_size) {
    const std::vector<int64_t> idx(order.begin() + m0, order.begin() + m0 + c.per_device_train_batch_size);
    Batch b = make_batch(pairs, idx, DType::F64, 0);
    const Tensor& logits = base->forward(b.tokens, b.keymask);
    const int64_t R = b.tokens.size(0), T = b.T, ld = logits.size(-1);
    for (int64_t row = 0; row < R; ++row)
      for (int64_t t = 0; t < T; ++t) {
        if (b.weights.data<double>()[row * T + t] == 0.0) continue;
        double mean = 0;
        for (int64_t v = 0; v < V; ++v) mean += logits.data<double>()[(row * T + t) * ld + v];
        mean /= static_cast<double>(V);
        (row < b.pairs ? sum_c : sum_r) += mean;
        (row < b.pairs ? n_c : n_r) += 1;
      }
    for (int64_t q : idx) {
      const auto& p = pairs[static_cast<size_t>(q)];
      tokens_step1 += static_cast<double>(2 * p.prompt.size() + p.chosen.size() + p.rejected.size());
    }
  }
  ASSERT_GT(n_c, 0);
  ASSERT_GT(n_r, 0);
  // fp32 training forward vs the F64 one: the means are O(0.1..1) sums of 257 logits of O(1); 1e-5 absolute is
  // ~100 fp32 roundings of the sum, and a metric over the wrong positions or rows is off by ~1e-2 or more.
  EXPECT_NEAR(train[0]["logits/chosen"].get<double>(), sum_c / n_c, 1e-5);
  EXPECT_NEAR(train[0]["logits/rejected"].get<double>(), sum_r / n_r, 1e-5);
  EXPECT_NE(sum_c / n_c, sum_r / n_r);  // the two metrics are told apart by the data
  EXPECT_EQ(train[0]["num_tokens"].get<double>(), tokens_step1);

  // num_tokens accumulates over steps (both epochs: every pair twice by the end) and never decreases; every
  // logits metric is finite.
  double all_tokens = 0;
  for (const auto& p : pairs)
    all_tokens += static_cast<double>(2 * p.prompt.size() + p.chosen.size() + p.rejected.size());
  double last = 0;
  for (const auto& j : train) {
    EXPECT_GT(j["num_tokens"].get<double>(), last);
    last = j["num_tokens"].get<double>();
    EXPECT_TRUE(j["logits/chosen"].is_number() && j["logits/rejected"].is_number()) << j.dump();
  }
  EXPECT_EQ(last, 2 * all_tokens);
  // Evaluation records: TRL's eval_num_tokens is the training count at that point.
  for (const auto& j : eval) {
    const int64_t step = j["step"].get<int64_t>();
    EXPECT_EQ(j["eval_num_tokens"].get<double>(), train[static_cast<size_t>(step - 1)]["num_tokens"].get<double>());
    EXPECT_TRUE(j["eval_logits/chosen"].is_number() && j["eval_logits/rejected"].is_number()) << j.dump();
  }
  // `dpo eval` of the final checkpoint: the same logits metrics (float rounding), and the checkpoint's count.
  auto m = run_evaluation(c, r.final_checkpoint);
  EXPECT_NEAR(m.at("eval_logits/chosen"), r.eval.at("eval_logits/chosen"), 1e-5);
  EXPECT_NEAR(m.at("eval_logits/rejected"), r.eval.at("eval_logits/rejected"), 1e-5);
  EXPECT_EQ(m.at("eval_num_tokens"), last);
  // A model directory without a trainer state has no training count to report.
  EXPECT_EQ(run_evaluation(c, w / "base").count("eval_num_tokens"), 0u);

  // Resumed from step 4: the same counts as the uninterrupted run, whether the checkpoint recorded num_tokens or
  // (an older checkpoint) not, when it is recounted from the data.
  for (const bool recorded : {true, false}) {
    SCOPED_TRACE(recorded ? "recorded" : "recounted");
    TrainConfig part = c;
    part.out_dir = w / (recorded ? "part_a" : "part_b");
    fs::create_directories(fs::path(part.out_dir) / "checkpoints");
    fs::copy(fs::path(c.out_dir) / "checkpoints" / "step-4", fs::path(part.out_dir) / "checkpoints" / "step-4");
    const fs::path ckpt = fs::path(part.out_dir) / "checkpoints" / "step-4";
    if (!recorded) {
      auto st = nlohmann::json::parse(slurp((ckpt / "trainer_state.json").string()));
      ASSERT_TRUE(st.contains("num_tokens"));
      st.erase("num_tokens");
      std::ofstream((ckpt / "trainer_state.json").string()) << st.dump(2) << "\n";
      write_checksums(ckpt.string(), {"config.json", "model.safetensors", "optimizer.safetensors",
                                      "trainer_state.json"});
    }
    RunOptions ro = quiet();
    ro.resume = ckpt.string();
    RunSummary b = run_training(part, RunKind::Dpo, ro);
    ASSERT_EQ(b.steps, 6);
    EXPECT_EQ(b.last_log.at("num_tokens"), last);
    EXPECT_EQ(b.last_log.at("logits/chosen"), r.last_log.at("logits/chosen"));
  }
}

}  // namespace
}  // namespace dpo

namespace dpo {
namespace {

TEST(Trainer, EvalCommandAgreesWithEvaluationDuringTraining) {
  Workdir w;
  setup(w);
  TrainConfig c = base_config(w, "ev");
  c.eval_file = w / "pref.jsonl";
  RunSummary r = run_training(c, RunKind::Dpo, quiet());
  // `dpo eval` runs the reference live; training used cached reference log-probs from other batches, so only
  // float rounding separates them.
  auto m = run_evaluation(c, r.final_checkpoint);
  for (const char* k : {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"})
    EXPECT_NEAR(m.at(k), r.eval.at(k), 1e-4) << k;
  EXPECT_GT(std::fabs(m.at("eval_rewards/margins")), 1e-3);  // the policy moved: not a trivial agreement at 0
}

}  // namespace
}  // namespace dpo
