// TR-DPO's reference update (sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps): the mix against its
// closed form, the schedule, the reference a run trains against after a sync against one built by hand, the
// configuration's refusals, and bitwise resume across syncs (fp32 and bf16).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "model/checkpoint.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "train/config.h"
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
  Workdir() : ScratchDir("dpo_trdpo_") {}
};

RunOptions quiet() {
  RunOptions r;
  r.quiet = true;
  return r;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// The weights of a model.safetensors-format file as doubles in the model's flat parameter order (read by name
// into an F64 model of the tiny fixture's config, which holds F32 and BF16 values exactly).
std::string g_config_dir;  // a directory whose config.json describes the files read below
std::vector<double> file_weights(const std::string& path) {
  auto be = make_cpu_backend(1);
  GPT2 m(*be, load_gpt2_config(g_config_dir + "/config.json"), DType::F64);
  load_gpt2_weights(m, path);
  return std::vector<double>(m.params().data<double>(), m.params().data<double>() + m.params().numel());
}

Tensor host_f32(const std::vector<float>& v) {
  Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, DType::F32);
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------------------------------------------------------
// The mix on the host against its closed form.

// Seeded weights of a few magnitudes (and signs), an odd count (not a multiple of any chunk or vector width), and
// a size past the 2^20-element chunk of mix_weights_host so that a chunk boundary is crossed.
std::vector<float> seeded_weights(uint64_t seed, int64_t n) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = d(g) * std::ldexp(1.0f, static_cast<int>(i % 7) - 4);
  return v;
}

TEST(TrDpoMix, F32IsTheCorrectlyRoundedClosedForm) {
  const int64_t n = (int64_t{1} << 20) + 4099;
  const std::vector<float> pol = seeded_weights(11, n), ref0 = seeded_weights(12, n);
  for (const double alpha : {0.6, 1.0, 0.0, 0.25}) {
    SCOPED_TRACE("alpha " + std::to_string(alpha));
    Tensor ref = host_f32(ref0);
    mix_weights_host(ref, host_f32(pol), alpha);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
      const size_t k = static_cast<size_t>(i);
      const float got = ref.data<float>()[i];
      if (alpha == 1.0) {  // a hard copy: the policy, bitwise
        wrong += std::memcmp(&got, &pol[k], 4) != 0;
        continue;
      }
      if (alpha == 0.0) {  // no change, bitwise
        wrong += std::memcmp(&got, &ref0[k], 4) != 0;
        continue;
      }
      // The exact value alpha * p + (1 - alpha) * r, to within double's rounding (~1e-16 relative, far below a
      // float's half ulp): the result must be a float nearest to it, i.e. no float neighbour is closer.
      const double exact = alpha * static_cast<double>(pol[k]) + (1.0 - alpha) * static_cast<double>(ref0[k]);
      const double err = std::fabs(static_cast<double>(got) - exact);
      const double up = std::fabs(static_cast<double>(std::nextafter(got, INFINITY)) - exact);
      const double down = std::fabs(static_cast<double>(std::nextafter(got, -INFINITY)) - exact);
      wrong += err > up || err > down;
    }
    EXPECT_EQ(wrong, 0);
  }
}

TEST(TrDpoMix, Bf16RoundsOnceToTheNearestBf16) {
  const int64_t n = 50021;
  const std::vector<float> pol = seeded_weights(21, n), ref32 = seeded_weights(22, n);
  // A BF16 reference: its stored values are what the mix reads.
  const Tensor ref_bf16 = convert_host(host_f32(ref32), DType::BF16, "test");
  for (const double alpha : {0.6, 1.0}) {
    SCOPED_TRACE("alpha " + std::to_string(alpha));
    Tensor ref = convert_host(ref_bf16, DType::BF16, "test");  // a copy
    mix_weights_host(ref, host_f32(pol), alpha);
    const auto* got = static_cast<const uint16_t*>(ref.raw());
    const auto* r0 = static_cast<const uint16_t*>(ref_bf16.raw());
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double exact = alpha * static_cast<double>(pol[static_cast<size_t>(i)]) +
                           (1.0 - alpha) * static_cast<double>(bf16_bits_to_float(r0[i]));
      // The bf16 neighbours of the result (adjacent bit patterns of a finite value of one sign).
      const double g = bf16_bits_to_float(got[i]);
      const double up = bf16_bits_to_float(static_cast<uint16_t>(got[i] + 1));
      const double down = bf16_bits_to_float(static_cast<uint16_t>(got[i] - 1));
      const double err = std::fabs(g - exact);
      wrong += err > std::fabs(up - exact) || err > std::fabs(down - exact);
    }
    EXPECT_EQ(wrong, 0);
  }
}

// sync_reference on GPT-2 models of the CPU backend: the reference's parameters become the mix of its own stored
// values with the policy's master weights; a BF16 reference's master holds the same values, and alpha = 1 makes
// it the policy's BF16 compute copy bitwise. The same for a forward-only reference (the trainer's: no master).
TEST(TrDpoMix, SyncReferenceOnModels) {
  GPT2Config c;
  c.vocab_size = 61;
  c.max_seq_len = 12;
  c.n_embd = 8;
  c.n_head = 2;
  c.n_layer = 2;
  auto be = make_cpu_backend(1);
  for (const bool forward_only : {false, true}) {
    for (const DType dt : {DType::F32, DType::BF16}) {
      for (const double alpha : {0.6, 1.0}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " alpha " + std::to_string(alpha) +
                     (forward_only ? " forward-only reference" : ""));
        GPT2 policy(*be, c, dt), ref(*be, c, dt);
        Rng r1(5), r2(6);
        policy.init_random(r1);
        ref.init_random(r2);
        if (forward_only) ref.set_mode(GPT2::ModelMode::ForwardOnly);
        const int64_t n = policy.params().numel();
        Tensor pw = Tensor::host({n}, DType::F32);
        be->copy_to_host(pw, policy.master_params());
        Tensor before = Tensor::host({n}, DType::F64);
        be->copy_to_host(before, ref.params());
        sync_reference(ref, pw, alpha);
        Tensor after = Tensor::host({n}, DType::F64), master = Tensor::host({n}, DType::F64);
        be->copy_to_host(after, ref.params());
        be->copy_to_host(master, ref.master_params());
        Tensor pol_compute = Tensor::host({n}, DType::F64);
        be->copy_to_host(pol_compute, policy.params());
        // One rounding to dt of the double mix: within half an ulp of dt (bf16: 2^-8 relative, f32: 2^-24).
        const double half_ulp = dt == DType::BF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24);
        int64_t wrong = 0, moved = 0;
        for (int64_t i = 0; i < n; ++i) {
          const double exact =
              alpha * static_cast<double>(pw.data<float>()[i]) + (1.0 - alpha) * before.data<double>()[i];
          const double got = after.data<double>()[i];
          wrong += std::fabs(got - exact) > half_ulp * std::fabs(exact);
          wrong += master.data<double>()[i] != got;  // the master follows (F32: the same tensor)
          if (alpha == 1.0) wrong += got != pol_compute.data<double>()[i];
          moved += got != before.data<double>()[i];
        }
        EXPECT_EQ(wrong, 0);
        EXPECT_GT(moved, n / 2);  // the two models differ almost everywhere, so the mix moved the reference
      }
    }
  }
}

TEST(TrDpoSchedule, SyncsAfterEveryTauthStep) {
  std::vector<int64_t> due;
  for (int64_t s = 0; s <= 7; ++s)
    if (ref_sync_due(s, 2)) due.push_back(s);
  EXPECT_EQ(due, (std::vector<int64_t>{2, 4, 6}));  // TRL: global_step % ref_model_sync_steps == 0, after the step
  due.clear();
  for (int64_t s = 1; s <= 4; ++s)
    if (ref_sync_due(s, 1)) due.push_back(s);
  EXPECT_EQ(due, (std::vector<int64_t>{1, 2, 3, 4}));
  due.clear();
  for (int64_t s = 1; s <= 1100; ++s)
    if (ref_sync_due(s, 512)) due.push_back(s);
  EXPECT_EQ(due, (std::vector<int64_t>{512, 1024}));
}

// ---------------------------------------------------------------------------------------------------------------
// The configuration.

const std::vector<std::string> kRequired = {"model=m", "train_file=t.jsonl", "out_dir=o"};

std::string error_of(std::vector<std::string> extra, RunKind kind = RunKind::Dpo) {
  std::vector<std::string> ov = kRequired;
  ov.insert(ov.end(), extra.begin(), extra.end());
  try {
    load_train_config("", ov, kind);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(TrDpoConfig, KeysDefaultsAndRefusals) {
  const TrainConfig d;
  EXPECT_FALSE(d.sync_ref_model);  // TRL's defaults
  EXPECT_EQ(d.ref_model_mixup_alpha, 0.6);
  EXPECT_EQ(d.ref_model_sync_steps, 512);
  const std::string help = config_help();
  for (const char* k : {"sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"}) EXPECT_TRUE(has(help, k));

  // The reference cache (the default here) holds the initial reference's log-probs: stale after a sync.
  std::string e = error_of({"sync_ref_model=true"});
  EXPECT_TRUE(has(e, "key 'sync_ref_model'") && has(e, "precompute_ref_log_probs")) << e;
  e = error_of({"sync_ref_model=true", "precompute_ref_log_probs=true"});
  EXPECT_TRUE(has(e, "key 'sync_ref_model'") && has(e, "precompute_ref_log_probs")) << e;
  // A reference-free loss has no reference to update.
  e = error_of({"sync_ref_model=true", "precompute_ref_log_probs=false", "reference_free=true"});
  EXPECT_TRUE(has(e, "key 'sync_ref_model'") && has(e, "reference_free")) << e;
  e = error_of({"sync_ref_model=true", "precompute_ref_log_probs=false", "loss_type=simpo", "reference_free=true"});
  EXPECT_TRUE(has(e, "key 'sync_ref_model'") && has(e, "reference_free")) << e;
  // SFT has no reference.
  e = error_of({"sync_ref_model=true", "precompute_ref_log_probs=false"}, RunKind::Sft);
  EXPECT_TRUE(has(e, "key 'sync_ref_model'")) << e;
  // Ranges.
  for (const char* v : {"-0.1", "1.5", ".nan", ".inf"}) {
    e = error_of({std::string("ref_model_mixup_alpha=") + v});
    EXPECT_TRUE(has(e, "key 'ref_model_mixup_alpha'")) << v << ": " << e;
  }
  for (const char* v : {"0", "-3", "2147483648"}) {
    e = error_of({std::string("ref_model_sync_steps=") + v});
    EXPECT_TRUE(has(e, "key 'ref_model_sync_steps'")) << v << ": " << e;
  }
  // Accepted: the edges of the ranges, with a live reference.
  EXPECT_EQ(error_of({"sync_ref_model=true", "precompute_ref_log_probs=false", "ref_model_mixup_alpha=0",
                      "ref_model_sync_steps=1"}),
            "");
  EXPECT_EQ(error_of({"sync_ref_model=true", "precompute_ref_log_probs=false", "ref_model_mixup_alpha=1",
                      "loss_type=[sigmoid,simpo]"}),
            "");
}

// ---------------------------------------------------------------------------------------------------------------
// Training runs on the tiny fixture (tests/test_fixture.h: 2 layers, width 16, byte vocabulary).

TrainConfig tr_config(const Workdir& w, const std::string& out) {
  TrainConfig c;
  c.model = w / "base";
  c.train_file = w / "pref.jsonl";
  c.out_dir = w / out;
  c.ref_cache_dir = w / "cache";
  c.max_length = 32;
  c.learning_rate = 2e-2;  // large, so that two steps move the policy well away from the reference
  c.per_device_train_batch_size = 4;
  c.gradient_accumulation_steps = 2;
  c.logging_steps = 1;
  c.seed = 7;
  c.precompute_ref_log_probs = false;
  c.sync_ref_model = true;
  c.ref_model_sync_steps = 2;
  c.ref_model_mixup_alpha = 0.6;
  return c;
}

std::string ckpt(const TrainConfig& c, int64_t step) {
  return c.out_dir + "/checkpoints/step-" + std::to_string(step);
}

// alpha * policy + (1 - alpha) * ref, rounded once to float: the closed form, computed here from files.
std::vector<double> mixed_f32(const std::vector<double>& policy, const std::vector<double>& ref, double alpha) {
  std::vector<double> out(policy.size());
  for (size_t i = 0; i < policy.size(); ++i)
    out[i] = static_cast<float>(alpha * policy[i] + (1.0 - alpha) * ref[i]);
  return out;
}

// A model directory holding `weights` (flat parameter order).
void write_model(const std::string& like, const std::vector<double>& weights, const std::string& dir) {
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, like, DType::F32);
  ASSERT_EQ(static_cast<int64_t>(weights.size()), m->params().numel());
  Tensor h = Tensor::host({m->params().numel()}, DType::F64);
  std::copy(weights.begin(), weights.end(), h.data<double>());
  save_gpt2_checkpoint(*m, dir, h);
}

std::vector<nlohmann::json> records(const std::string& out_dir, bool eval) {
  std::ifstream f(out_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("eval_loss") == eval) out.push_back(j);
  }
  return out;
}

// A 5-step run with ref_model_sync_steps 2 (syncs after steps 2 and 4): which checkpoints hold a synced
// reference, its weights against the closed form from the checkpoints' policy weights, and the reference the run
// scores against after a sync against a reference built by hand from those weights.
TEST(TrDpoRun, ReferenceAfterASyncIsTheHandMixedModel) {
  Workdir w;
  test::write_tiny_fixture(w.dir.string(), 12);
  g_config_dir = w / "base";
  TrainConfig c = tr_config(w, "run");
  c.per_device_train_batch_size = 12;  // one micro-batch of every pair per step: each step's metrics cover all
  c.gradient_accumulation_steps = 1;
  c.max_steps = 5;
  c.save_steps = 1;
  c.eval_file = w / "eval.jsonl";
  c.eval_steps = 1;
  RunSummary r = run_training(c, RunKind::Dpo, quiet());
  ASSERT_EQ(r.steps, 5);

  // The schedule: no synced reference before step 2; the reference changes after steps 2 and 4 only.
  EXPECT_FALSE(fs::exists(ckpt(c, 1) + "/ref_model.safetensors"));
  for (int s = 2; s <= 5; ++s) ASSERT_TRUE(fs::exists(ckpt(c, s) + "/ref_model.safetensors")) << s;
  auto ref_at = [&](int s) { return file_weights(ckpt(c, s) + "/ref_model.safetensors"); };
  auto policy_at = [&](int s) { return file_weights(ckpt(c, s) + "/model.safetensors"); };
  const std::vector<double> base = file_weights(w / "base/model.safetensors");
  EXPECT_EQ(ref_at(2), ref_at(3));
  EXPECT_EQ(ref_at(4), ref_at(5));
  // The closed form, from the policy's weights after the sync's step (fp32: the master weights the checkpoint
  // holds), each value rounded once to float: equal, element for element.
  const std::vector<double> ref2 = mixed_f32(policy_at(2), base, 0.6);
  EXPECT_TRUE(ref_at(2) == ref2);
  EXPECT_TRUE(ref_at(4) == mixed_f32(policy_at(4), ref2, 0.6));
  EXPECT_NE(ref2, base);
  EXPECT_NE(ref_at(4), ref2);

  // The reference the run scores against. Evaluation at step s runs after that step's sync: `dpo eval` of the
  // step's policy against a reference directory built by hand gives the same numbers (the same forward passes
  // on the same weights; 1e-9 allows only a last-bit difference in the double sums). Against the base reference
  // the step-2 numbers must differ, or the sync did not happen before the evaluation.
  write_model(w / "base", ref2, w / "hand_ref2");
  const auto ev = records(c.out_dir, true);
  ASSERT_EQ(ev.size(), 5u);
  auto eval_with_ref = [&](int step, const std::string& ref_dir) {
    TrainConfig e = c;
    e.ref_model = ref_dir;
    e.sync_ref_model = false;
    return run_evaluation(e, ckpt(c, step));
  };
  for (const char* k : {"eval_rewards/chosen", "eval_rewards/rejected", "eval_loss"}) {
    SCOPED_TRACE(k);
    EXPECT_NEAR(ev[0][k].get<double>(), eval_with_ref(1, w / "base").at(k), 1e-9);  // before the first sync
    EXPECT_NEAR(ev[1][k].get<double>(), eval_with_ref(2, w / "hand_ref2").at(k), 1e-9);
    EXPECT_NEAR(ev[2][k].get<double>(), eval_with_ref(3, w / "hand_ref2").at(k), 1e-9);
  }
  EXPECT_GT(std::fabs(ev[1]["eval_rewards/chosen"].get<double>() - eval_with_ref(2, w / "base").at("eval_rewards/chosen")),
            1e-4);

  // Training steps: step 3 (all 12 pairs) scores against the step-2 sync's reference; its mean reference
  // log-probs are logps/* - rewards/* / beta. The hand-built reference's own log-probs over the same pairs agree
  // to fp32 rounding of ~20-token sums of O(5) terms (1e-4 absolute); the base reference is off by far more.
  auto tok = make_tokenizer(c.tokenizer);
  DataOptions d;  // the run's: truncation trl1, keep_start (c leaves both keys unset), EOS appended
  d.max_length = c.max_length;
  d.rule = TruncationRule::Trl1;
  d.truncation = TruncationMode::KeepStart;
  d.append_eos = true;
  const auto pairs = load_preferences(c.train_file, *tok, d, nullptr);
  ASSERT_EQ(pairs.size(), 12u);
  auto be = make_cpu_backend(1);
  auto mean_ref = [&](const std::string& dir) {
    auto m = load_gpt2_checkpoint(*be, dir, DType::F32);
    const RefLogps lp = compute_ref_logps(*m, pairs, 12);
    double sc = 0, sr = 0;
    for (size_t i = 0; i < pairs.size(); ++i) sc += lp.chosen[i], sr += lp.rejected[i];
    return std::make_pair(sc / 12, sr / 12);
  };
  const auto tr = records(c.out_dir, false);
  ASSERT_EQ(tr.size(), 5u);
  auto implied = [&](int step) {
    const auto& j = tr[static_cast<size_t>(step - 1)];
    return std::make_pair(j["logps/chosen"].get<double>() - j["rewards/chosen"].get<double>() / c.beta,
                          j["logps/rejected"].get<double>() - j["rewards/rejected"].get<double>() / c.beta);
  };
  const auto hand = mean_ref(w / "hand_ref2"), orig = mean_ref(w / "base");
  EXPECT_NEAR(implied(3).first, hand.first, 1e-4);
  EXPECT_NEAR(implied(3).second, hand.second, 1e-4);
  EXPECT_NEAR(implied(2).first, orig.first, 1e-4);  // step 2 itself still scored against the initial reference
  EXPECT_GT(std::fabs(hand.first - orig.first), 1e-2);
}

// The model a resume case trains: the tiny GPT-2, or a tiny Llama (grouped-query heads, untied head) over the
// same byte vocabulary whose checkpoints are saved in shards (max_shard_size below the weights' size).
enum class ResumeModel { GPT2, LlamaSharded };

void write_tiny_llama(const std::string& dir) {
  auto be = make_cpu_backend(1);
  GPT2Config c;
  c.arch = Arch::Llama;
  c.model_type = "llama";
  c.vocab_size = 257;
  c.max_seq_len = 40;
  c.n_embd = 24;
  c.n_head = 4;
  c.n_kv_head = 2;
  c.n_layer = 2;
  c.intermediate_size = 40;
  c.ln_eps = 1e-6;
  c.tie_word_embeddings = false;
  GPT2 m(*be, c, DType::F32);
  Rng rng(3);
  m.init_random(rng);
  fs::remove_all(dir);
  save_gpt2_checkpoint(m, dir);
}

// The weights and optimizer files of a checkpoint (model.safetensors or the shards and their index,
// optimizer.safetensors, ref_model.safetensors), name -> bytes.
std::map<std::string, std::string> state_files(const std::string& dir) {
  std::map<std::string, std::string> r;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 12 && (n.compare(n.size() - 12, 12, ".safetensors") == 0 || n == kSafetensorsIndexName))
      r[n] = slurp(e.path().string());
  }
  return r;
}

// Bitwise resume across syncs: 6 steps straight against stopped after step 3 and resumed (syncs after steps 2,
// 4 and 6: one before the stop, two after), in fp32 and in bf16.
void run_resume_case(const std::string& precision, ResumeModel model = ResumeModel::GPT2) {
  Workdir w;
  test::write_tiny_fixture(w.dir.string(), 22);
  if (model == ResumeModel::LlamaSharded) write_tiny_llama(w / "base");
  g_config_dir = w / "base";
  TrainConfig full = tr_config(w, "full");
  full.precision = precision;
  if (model == ResumeModel::LlamaSharded) full.max_shard_size = "30KB";  // 87 KB of F32 weights
  full.num_train_epochs = 2;  // 22 pairs / 8 per step: 3 steps per epoch, 6 in all
  full.eval_file = w / "eval.jsonl";
  full.eval_steps = 3;
  RunSummary a = run_training(full, RunKind::Dpo, quiet());
  ASSERT_EQ(a.steps, 6);

  TrainConfig part = full;
  part.out_dir = w / "part";
  part.save_steps = 3;
  run_training(part, RunKind::Dpo, quiet());
  fs::remove_all(ckpt(part, 6));
  ASSERT_TRUE(fs::exists(ckpt(part, 3) + "/ref_model.safetensors"));
  RunOptions ro = quiet();
  ro.resume = ckpt(part, 3);
  RunSummary b = run_training(part, RunKind::Dpo, ro);
  ASSERT_EQ(b.steps, 6);
  const auto fa = state_files(a.final_checkpoint), fb = state_files(b.final_checkpoint);
  for (const char* f : {"optimizer.safetensors", "ref_model.safetensors"}) EXPECT_TRUE(fa.count(f)) << f;
  if (model == ResumeModel::LlamaSharded) {
    EXPECT_TRUE(fa.count(kSafetensorsIndexName) && !fa.count("model.safetensors"));
    int shards = 0;
    for (const auto& nb : fa) shards += nb.first.rfind("model-", 0) == 0;
    EXPECT_GE(shards, 2);
    // The reference stays one file, with the model's HF tensor names (what load_gpt2_weights reads back).
    EXPECT_NE(SafetensorsFile(a.final_checkpoint + "/ref_model.safetensors").find("model.norm.weight"), nullptr);
  } else {
    EXPECT_TRUE(fa.count("model.safetensors"));
  }
  ASSERT_EQ(fa.size(), fb.size());
  for (const auto& [f, bytes] : fa) {
    ASSERT_TRUE(fb.count(f)) << f;
    EXPECT_TRUE(bytes == fb.at(f)) << f << " differs from the uninterrupted run's";
  }
  auto strip = [](std::vector<nlohmann::json> v) {
    for (auto& j : v) j.erase("tokens_per_second");
    return v;
  };
  EXPECT_EQ(strip(records(full.out_dir, false)), strip(records(part.out_dir, false)));
  EXPECT_EQ(strip(records(full.out_dir, true)), strip(records(part.out_dir, true)));
  EXPECT_NE(slurp(a.final_checkpoint + "/ref_model.safetensors"),
            slurp(ckpt(part, 3) + "/ref_model.safetensors"));  // the syncs after the resume moved it

  if (precision == "bf16") {
    // The reference keeps its dtype: every stored value is a bf16 number (the low 16 bits of its F32 are 0).
    SafetensorsFile f(a.final_checkpoint + "/ref_model.safetensors");
    int64_t not_bf16 = 0;
    for (const auto& e : f.entries()) {
      const Tensor t = f.read_as(e.name, DType::F32);
      for (int64_t i = 0; i < t.numel(); ++i) {
        uint32_t u;
        std::memcpy(&u, &t.data<float>()[i], 4);
        not_bf16 += (u & 0xffffu) != 0;
      }
    }
    EXPECT_EQ(not_bf16, 0);
  }

  // A checkpoint past the first sync without its reference cannot be resumed as if it had one: a removed entry
  // and file is refused, naming the file.
  const std::string c3 = ckpt(part, 3);
  fs::remove(c3 + "/ref_model.safetensors");
  {
    auto j = nlohmann::json::parse(slurp(c3 + "/checksums.json"));
    j["files"].erase("ref_model.safetensors");
    std::vector<std::string> names;
    for (auto it = j["files"].begin(); it != j["files"].end(); ++it) names.push_back(it.key());
    write_checksums(c3, names);
  }
  TrainConfig again = part;
  again.out_dir = w / "again";
  fs::create_directories(again.out_dir);
  ro.resume = c3;
  try {
    run_training(again, RunKind::Dpo, ro);
    ADD_FAILURE() << "resuming without the synced reference was accepted";
  } catch (const InputError& e) {
    EXPECT_TRUE(has(e.what(), "ref_model.safetensors")) << e.what();
  }
}

TEST(TrDpoRun, ResumeAcrossSyncsIsBitIdentical) { run_resume_case("fp32"); }
TEST(TrDpoRun, ResumeAcrossSyncsIsBitIdenticalBf16) { run_resume_case("bf16"); }
TEST(TrDpoRun, ResumeAcrossSyncsIsBitIdenticalLlamaSharded) { run_resume_case("fp32", ResumeModel::LlamaSharded); }

// bf16 with alpha = 1: the reference after a sync is the policy's weights rounded to bf16 (its compute copy).
TEST(TrDpoRun, HardCopyInBf16IsThePolicyRoundedToBf16) {
  Workdir w;
  test::write_tiny_fixture(w.dir.string(), 10);
  g_config_dir = w / "base";
  TrainConfig c = tr_config(w, "hard");
  c.precision = "bf16";
  c.ref_model_mixup_alpha = 1;
  c.max_steps = 2;
  RunSummary r = run_training(c, RunKind::Dpo, quiet());
  ASSERT_EQ(r.steps, 2);
  const std::vector<double> pol = file_weights(r.final_checkpoint + "/model.safetensors");
  const std::vector<double> ref = file_weights(r.final_checkpoint + "/ref_model.safetensors");
  ASSERT_EQ(pol.size(), ref.size());
  Tensor p = Tensor::host({static_cast<int64_t>(pol.size())}, DType::F64);
  std::copy(pol.begin(), pol.end(), p.data<double>());
  const Tensor rounded = convert_host(convert_host(p, DType::BF16, "test"), DType::F64, "test");
  EXPECT_TRUE(std::equal(ref.begin(), ref.end(), rounded.data<double>()));
  EXPECT_NE(ref, file_weights(w / "base/model.safetensors"));
}

// A reference of another shape cannot be mixed with the policy.
TEST(TrDpoRun, ReferenceOfAnotherShapeIsRefused) {
  Workdir w;
  test::write_tiny_fixture(w.dir.string(), 6);
  {
    auto be = make_cpu_backend(1);
    GPT2Config c = load_gpt2_config(w / "base/config.json");
    c.n_layer = 1;
    GPT2 m(*be, c, DType::F32);
    Rng rng(9);
    m.init_random(rng);
    save_gpt2_checkpoint(m, w / "small");
  }
  TrainConfig c = tr_config(w, "shape");
  c.ref_model = w / "small";
  c.max_steps = 1;
  try {
    run_training(c, RunKind::Dpo, quiet());
    ADD_FAILURE() << "a reference of another shape was accepted";
  } catch (const InputError& e) {
    EXPECT_TRUE(has(e.what(), "key 'sync_ref_model'") && has(e.what(), "n_layer")) << e.what();
  }
}

}  // namespace
}  // namespace dpo
