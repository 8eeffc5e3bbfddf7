// `dpo train` on a tiny Llama-family model from an HF-format directory with a tokenizer.json (found next to the
// model) and text records, on the CPU: the loss falls on a repeated batch, the reference cache is written and
// reused, gradient accumulation matches one large batch, and a resumed run is bitwise the uninterrupted one.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "runtime/rng.h"
#include "train/trainer.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

struct Workdir : test::ScratchDir {
  Workdir() : ScratchDir("dpo_llama_train_") {}
};

// A tiny Llama (grouped-query heads, untied head, Llama 3 rope scaling) or Qwen2 (q/k/v biases, tied) whose
// vocabulary covers the llama3 fixture tokenizer (461 ids and one added token), saved in dir/base with that
// tokenizer.json next to it; preference pairs (text) in dir/pref.jsonl.
void setup(const Workdir& w, const std::string& model_type, int n_pairs) {
  auto be = make_cpu_backend(1);
  GPT2Config c;
  c.arch = Arch::Llama;
  c.model_type = model_type;
  c.vocab_size = 467;
  c.max_seq_len = 64;
  c.n_embd = 24;
  c.n_head = 4;
  c.n_kv_head = 2;
  c.n_layer = 2;
  c.intermediate_size = 40;
  c.ln_eps = 1e-6;
  if (model_type == "qwen2") {
    c.attention_bias = true;
    c.tie_word_embeddings = true;
  } else {
    c.tie_word_embeddings = false;
    c.rope_scaling = RopeScaling{8, 1, 4, 32};
  }
  c.bos_token_id = 0;  // <|begin_of_text|>
  c.eos_token_id = 1;  // <|end_of_text|>
  GPT2 m(*be, c, DType::F32);
  Rng rng(11);
  m.init_random(rng);
  save_gpt2_checkpoint(m, w / "base");
  fs::copy_file(std::string(DPO_FIXTURE_DIR) + "/tokenizers/llama3/tokenizer.json", w / "base/tokenizer.json");
  const char* good[] = {"great", "fine", "superb", "lovely"};
  const char* bad[] = {"awful", "dull", "weak", "bad"};
  std::ofstream pref(w / "pref.jsonl");
  for (int i = 0; i < n_pairs; ++i) {
    nlohmann::json j = {{"prompt", "Review " + std::to_string(i % 5) + ": the film was"},
                        {"chosen", std::string(" ") + good[i % 4] + (i % 3 ? ", truly" : "")},
                        {"rejected", std::string(" ") + bad[(i + 1) % 4]}};
    pref << j.dump() << "\n";
  }
}

TrainConfig base_config(const Workdir& w, const std::string& out) {
  TrainConfig c;
  c.model = w / "base";
  c.train_file = w / "pref.jsonl";
  c.out_dir = w / out;
  c.ref_cache_dir = w / "cache";
  c.max_length = 48;
  c.learning_rate = 1e-2;
  c.per_device_train_batch_size = 4;
  c.gradient_accumulation_steps = 2;
  c.num_train_epochs = 2;
  c.logging_steps = 1;
  c.seed = 5;
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

std::vector<double> losses(const std::string& out_dir) {
  std::ifstream mf(out_dir + "/metrics.jsonl");
  std::vector<double> l;
  std::string line;
  while (std::getline(mf, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) l.push_back(j["loss"].get<double>());
  }
  return l;
}

class LlamaTrain : public ::testing::TestWithParam<const char*> {};

TEST_P(LlamaTrain, LossFallsOnARepeatedBatch) {
  Workdir w;
  setup(w, GetParam(), 4);
  TrainConfig c = base_config(w, "run");
  c.per_device_train_batch_size = 4;  // the whole data set: every step sees the same four pairs
  c.gradient_accumulation_steps = 1;
  c.num_train_epochs = 3;
  c.learning_rate = 3e-3;
  const RunSummary r = run_training(c, RunKind::Dpo, quiet());
  ASSERT_EQ(r.steps, 3);
  const std::vector<double> l = losses(c.out_dir);
  ASSERT_EQ(l.size(), 3u);
  for (double x : l) EXPECT_TRUE(std::isfinite(x));
  // Step 1's policy equals the reference: DPO's loss is log 2 there.
  EXPECT_NEAR(l[0], std::log(2.0), 1e-5);
  EXPECT_LT(l[1], l[0]);
  EXPECT_LT(l[2], l[1]);
  // The saved checkpoint is an HF Llama-family directory that loads back.
  auto be = make_cpu_backend();
  auto m = load_gpt2_checkpoint(*be, r.final_checkpoint, DType::F32);
  EXPECT_EQ(m->config().model_type, GetParam());
  // The reference log-probs were cached, and a second run reuses them.
  ASSERT_TRUE(fs::exists(w / "cache"));
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(w / "cache")) files += e.is_regular_file();
  EXPECT_GE(files, 1u);
  TrainConfig again = c;
  again.out_dir = w / "again";
  const RunSummary r2 = run_training(again, RunKind::Dpo, quiet());
  size_t files2 = 0;
  for (const auto& e : fs::directory_iterator(w / "cache")) files2 += e.is_regular_file();
  EXPECT_EQ(files2, files);  // no new cache entry
  EXPECT_TRUE(slurp(r.final_checkpoint + "/model.safetensors") == slurp(r2.final_checkpoint + "/model.safetensors"));
}

TEST_P(LlamaTrain, GradientAccumulationMatchesOneBigBatch) {
  Workdir w;
  setup(w, GetParam(), 16);
  TrainConfig a = base_config(w, "a");
  a.num_train_epochs = 1;
  a.learning_rate = 1e-3;
  a.max_grad_norm = 0;
  TrainConfig b = a;
  b.out_dir = w / "b";
  b.per_device_train_batch_size = 8;
  b.gradient_accumulation_steps = 1;
  const RunSummary ra = run_training(a, RunKind::Dpo, quiet());
  const RunSummary rb = run_training(b, RunKind::Dpo, quiet());
  const auto wa = test::checkpoint_weights(ra.final_checkpoint), wb = test::checkpoint_weights(rb.final_checkpoint),
             w0 = test::checkpoint_weights(w / "base");
  double max_diff = 0, max_move = 0;
  for (size_t i = 0; i < wa.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(wa[i] - wb[i]));
    max_move = std::max(max_move, std::fabs(wa[i] - w0[i]));
  }
  size_t off = 0;
  for (size_t i = 0; i < wa.size(); ++i) off += std::fabs(wa[i] - wb[i]) > 1e-4 * max_move;
  // Adam moves each weight by ~lr whatever its gradient's size; the two runs differ by the float rounding of the
  // gradient's summation order. Where a gradient is a sum of cancelling terms its fp32 rounding is a larger
  // fraction of it, and Adam's normalisation carries that fraction into the step (observed: 1.3e-3 of the largest
  // move for one weight of the untied Llama). A wrong normalisation (per micro-batch instead of per step) changes
  // every step by a factor of 2: far outside both bounds below.
  EXPECT_GT(max_move, 1e-4);
  EXPECT_LT(max_diff, 1e-2 * max_move);
  EXPECT_LT(off, wa.size() / 1000) << off << " of " << wa.size() << " weights differ by more than 1e-4 of the largest move";
  EXPECT_NEAR(ra.last_log.at("loss"), rb.last_log.at("loss"), 1e-6);
}

TEST_P(LlamaTrain, ResumeIsBitIdentical) {
  Workdir w;
  setup(w, GetParam(), 22);
  TrainConfig full = base_config(w, "full");
  full.weight_decay = 0.1;
  full.lr_scheduler_type = "cosine";
  full.warmup_steps = 2;
  const RunSummary a = run_training(full, RunKind::Dpo, quiet());
  ASSERT_EQ(a.steps, 6);
  TrainConfig part = full;
  part.out_dir = w / "part";
  part.save_steps = 4;
  run_training(part, RunKind::Dpo, quiet());
  fs::remove_all(fs::path(part.out_dir) / "checkpoints" / "step-6");
  RunOptions ro = quiet();
  ro.resume = (fs::path(part.out_dir) / "checkpoints" / "step-4").string();
  const RunSummary b = run_training(part, RunKind::Dpo, ro);
  ASSERT_EQ(b.steps, 6);
  const std::string fa = slurp(a.final_checkpoint + "/model.safetensors");
  ASSERT_FALSE(fa.empty());
  EXPECT_TRUE(fa == slurp(b.final_checkpoint + "/model.safetensors")) << "resumed weights differ";
  EXPECT_TRUE(slurp(a.final_checkpoint + "/optimizer.safetensors") ==
              slurp(b.final_checkpoint + "/optimizer.safetensors"));
  EXPECT_NE(test::checkpoint_weights(w / "base"), test::checkpoint_weights(a.final_checkpoint));
}

INSTANTIATE_TEST_SUITE_P(Models, LlamaTrain, ::testing::Values("llama", "qwen2"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace dpo
