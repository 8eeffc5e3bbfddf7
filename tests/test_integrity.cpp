// Integrity of every file the trainer reads back: checkpoints (checksums.json) on every path that loads them,
// the reference log-prob cache (its key and its values), and the training data on resume. Tiny models only.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>

#include "model/checkpoint.h"
#include "runtime/safetensors.h"
#include "train/hash.h"
#include "train/reference.h"
#include "train/tokenizer.h"
#include "train/trainer.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kDpoBinary = std::string(DPO_BINARY_DIR) + "/dpo";
using test::CliResult;
using test::slurp;

CliResult run_dpo(const test::ScratchDir& w, const std::string& args) {
  return test::run_cli(kDpoBinary, w.dir, args);
}

struct Workdir : test::ScratchDir {
  Workdir() : ScratchDir("dpo_integrity_") { test::write_tiny_fixture(dir.string(), 22); }
};

// Prompts ("review N:", 9 bytes) are longer than max_prompt_length, so the truncation settings change the tokens.
TrainConfig base_config(const Workdir& w, const std::string& out) {
  TrainConfig c;
  c.model = w / "base";
  c.train_file = w / "pref.jsonl";
  c.out_dir = w / out;
  c.ref_cache_dir = w / "cache";
  c.max_length = 24;
  c.max_prompt_length = 8;  // truncation: legacy (the key is set)
  c.learning_rate = 1e-2;
  c.per_device_train_batch_size = 4;
  c.gradient_accumulation_steps = 2;
  c.max_steps = 2;
  c.logging_steps = 1;
  c.seed = 7;
  return c;
}

RunOptions quiet() {
  RunOptions r;
  r.quiet = true;
  return r;
}


void spit(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// One bit of one byte, `from_end` bytes before the end of the file (inside the data, not the header).
void flip_bit(const std::string& path, size_t from_end) {
  std::string b = slurp(path);
  ASSERT_GT(b.size(), from_end);
  b[b.size() - 1 - from_end] ^= 0x10;
  spit(path, b);
}

// Runs `f`, which must throw InputError whose message names `file` (and contains `also`, when given).
void expect_refused(const std::function<void()>& f, const std::string& file, const std::string& what,
                    const std::string& also = "") {
  try {
    f();
    ADD_FAILURE() << what << ": no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << what << ": " << e.what();
    if (!also.empty()) EXPECT_NE(std::string(e.what()).find(also), std::string::npos) << what << ": " << e.what();
  }
}



// A training checkpoint of ours: out/checkpoints/step-2.
std::string train_checkpoint(const Workdir& w) {
  TrainConfig c = base_config(w, "orig");
  run_training(c, RunKind::Dpo, quiet());
  return c.out_dir + "/checkpoints/step-2";
}

void copy_dir(const std::string& from, const std::string& to) {
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
}

TEST(Integrity, CheckpointsCarryChecksumsOfEveryFile) {
  Workdir w;
  const std::string ck = train_checkpoint(w);
  json j = json::parse(slurp(ck + "/checksums.json"));
  std::set<std::string> listed;
  for (auto it = j["files"].begin(); it != j["files"].end(); ++it) {
    listed.insert(it.key());
    EXPECT_EQ(it.value().get<std::string>(), sha256_file(ck + "/" + it.key())) << it.key();
  }
  // Every file of the directory but the list itself.
  std::set<std::string> present;
  for (const auto& e : fs::directory_iterator(ck))
    if (e.path().filename() != "checksums.json") present.insert(e.path().filename().string());
  EXPECT_EQ(listed, present);
  EXPECT_EQ(listed.size(), 4u);
  EXPECT_TRUE(verify_checkpoint(ck, CheckpointUse::Resume));
  EXPECT_TRUE(verify_checkpoint(ck, CheckpointUse::Model));
  // A plain HF directory (no checksums.json, no trainer_state.json) is an external model: loaded unverified.
  EXPECT_FALSE(verify_checkpoint(w / "base", CheckpointUse::Model));
  // `dpo init` writes checksums too, and `dpo info` says so.
  CliResult r = run_dpo(w, "init --out '" + (w / "init") + "' --n-layer 1 --n-head 2 --n-embd 8 --n-positions 32");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(verify_checkpoint(w / "init", CheckpointUse::Model));
  r = run_dpo(w, "info '" + (w / "init") + "'");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("verified"), std::string::npos) << r.out;
}

// A changed byte in any file of a checkpoint is refused on every path that loads it, with the file named.
TEST(Integrity, ChangedByteIsRefusedOnEveryLoadPath) {
  Workdir w;
  const std::string good = train_checkpoint(w);
  const std::string bad = w / "bad";
  int n = 0;
  for (const std::string file : {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"}) {
    SCOPED_TRACE(file);
    copy_dir(good, bad);
    flip_bit(bad + "/" + file, 20);
    const std::string path = bad + "/" + file;
    // --resume
    expect_refused([&] {
      RunOptions ro = quiet();
      ro.resume = bad;
      run_training(base_config(w, "resume" + std::to_string(n)), RunKind::Dpo, ro);
    }, path, "resume", "SHA-256");
    // model= for train and sft (the reference defaults to the same directory)
    expect_refused([&] {
      TrainConfig c = base_config(w, "model" + std::to_string(n));
      c.model = bad;
      run_training(c, RunKind::Dpo, quiet());
    }, path, "train model=");
    expect_refused([&] {
      TrainConfig c = base_config(w, "sft" + std::to_string(n));
      c.model = bad;
      c.train_file = w / "sft.jsonl";
      run_training(c, RunKind::Sft, quiet());
    }, path, "sft model=");
    // ref_model=
    expect_refused([&] {
      TrainConfig c = base_config(w, "ref" + std::to_string(n));
      c.ref_model = bad;
      run_training(c, RunKind::Dpo, quiet());
    }, path, "ref_model=");
    // dpo eval: the evaluated checkpoint, and its reference
    expect_refused([&] { run_evaluation(base_config(w, "ev"), bad); }, path, "eval checkpoint");
    expect_refused([&] {
      TrainConfig c = base_config(w, "ev");
      c.ref_model = bad;
      run_evaluation(c, good);
    }, path, "eval ref_model=");
    // The CLI: exit code 2 and the file named, for sample, info and eval.
    for (const std::string args :
         {"sample '" + bad + "' -p hi --max-new-tokens 2", "info '" + bad + "'",
          "eval '" + bad + "' model='" + (w / "base") + "' train_file='" + (w / "pref.jsonl") + "' max_length=24 max_prompt_length=8"}) {
      CliResult r = run_dpo(w, args);
      EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
      EXPECT_NE(r.err.find(path), std::string::npos) << args << "\n" << r.err;
    }
    ++n;
  }
  // The untouched checkpoint loads on every path.
  RunOptions ro = quiet();
  ro.resume = good;
  TrainConfig c = base_config(w, "resumed");
  c.max_steps = 2;
  EXPECT_EQ(run_training(c, RunKind::Dpo, ro).steps, 2);
  EXPECT_NO_THROW(run_evaluation(base_config(w, "ev"), good));
  CliResult r = run_dpo(w, "sample '" + good + "' -p hi --max-new-tokens 2");
  EXPECT_EQ(r.code, 0) << r.err;
}

// Rewrites checksums.json without `entry`, with its own checksum recomputed (a deliberate edit, not corruption).
void drop_entry(const std::string& dir, const std::string& entry) {
  json j = json::parse(slurp(dir + "/checksums.json"));
  j["files"].erase(entry);
  j["sha256"] = sha256_string(j["files"].dump());
  spit(dir + "/checksums.json", j.dump(2));
}

TEST(Integrity, RemovedChecksumEntriesNeverSkipVerification) {
  Workdir w;
  const std::string good = train_checkpoint(w);
  const std::string bad = w / "bad";
  auto resume = [&] {
    RunOptions ro = quiet();
    ro.resume = bad;
    run_training(base_config(w, "resume"), RunKind::Dpo, ro);
  };
  auto model = [&] {
    TrainConfig c = base_config(w, "model");
    c.model = bad;
    run_training(c, RunKind::Dpo, quiet());
  };
  for (const std::string file : {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"}) {
    SCOPED_TRACE(file);
    // The entry removed and the file changed: refused as unlisted, on resume and on model=.
    copy_dir(good, bad);
    flip_bit(bad + "/" + file, 20);
    drop_entry(bad, file);
    expect_refused(resume, bad + "/" + file, "resume", "not listed");
    expect_refused(model, bad + "/" + file, "model=", "not listed");
    // The entry removed without updating the list's own checksum: the list itself is refused.
    copy_dir(good, bad);
    json j = json::parse(slurp(bad + "/checksums.json"));
    j["files"].erase(file);
    spit(bad + "/checksums.json", j.dump(2));
    expect_refused(resume, bad + "/checksums.json", "resume (list edited)");
    // The entry and the file removed: a resume needs every file of a training checkpoint.
    if (file == "optimizer.safetensors" || file == "trainer_state.json") {
      copy_dir(good, bad);
      drop_entry(bad, file);
      fs::remove(bad + "/" + file);
      expect_refused(resume, bad + "/checksums.json", "resume (file gone)", file);
    }
  }
  // checksums.json deleted: trainer_state.json marks the directory as ours, so it is refused, not taken as external.
  copy_dir(good, bad);
  fs::remove(bad + "/checksums.json");
  expect_refused(resume, bad + "/checksums.json", "resume (no list)");
  expect_refused(model, bad + "/checksums.json", "model= (no list)");
  // A corrupted checksum list.
  copy_dir(good, bad);
  flip_bit(bad + "/checksums.json", 30);
  expect_refused(model, bad + "/checksums.json", "model= (list corrupted)");
  // A listed file that is missing.
  copy_dir(good, bad);
  fs::remove(bad + "/optimizer.safetensors");
  expect_refused(model, bad + "/optimizer.safetensors", "model= (listed file missing)", "missing");
}

TEST(Integrity, ChangedTrainingDataIsRefusedOnResume) {
  Workdir w;
  TrainConfig c = base_config(w, "run");
  c.save_steps = 1;
  run_training(c, RunKind::Dpo, quiet());
  // Same path, same number of records, one character different.
  std::string data = slurp(c.train_file);
  const size_t at = data.find("great");
  ASSERT_NE(at, std::string::npos);
  data[at] = 'G';
  spit(c.train_file, data);
  RunOptions ro = quiet();
  ro.resume = c.out_dir + "/checkpoints/step-1";
  expect_refused([&] { run_training(c, RunKind::Dpo, ro); }, c.train_file, "resume on changed data", "changed");
  // The original contents resume.
  data[at] = 'g';
  spit(c.train_file, data);
  EXPECT_EQ(run_training(c, RunKind::Dpo, ro).steps, 2);
}

// The reference cache: one file per key in c.ref_cache_dir.
std::set<std::string> cache_files(const TrainConfig& c) {
  std::set<std::string> s;
  if (fs::exists(c.ref_cache_dir))
    for (const auto& e : fs::directory_iterator(c.ref_cache_dir)) s.insert(e.path().filename().string());
  return s;
}

// The reference-cache key as the trainer builds it: every setting that changes the reference log-probs, changed
// one at a time in a real run, misses the cache (a new file); the same settings hit it (no new file, the file not
// rewritten).
TEST(Integrity, ReferenceCacheKeyCoversEverySetting) {
  Workdir w;
  // Another reference model: the same shape, other weights.
  {
    auto be = make_cpu_backend(1);
    auto m = load_gpt2_checkpoint(*be, w / "base", DType::F32);
    m->params().data<float>()[5] += 0.25f;
    save_gpt2_checkpoint(*m, w / "base2");
  }
  int run = 0;
  auto train = [&](TrainConfig c) {
    c.out_dir = w / ("run" + std::to_string(run++));
    c.max_steps = 1;
    run_training(c, RunKind::Dpo, quiet());
  };
  const TrainConfig base = base_config(w, "");
  train(base);
  std::set<std::string> files = cache_files(base);
  ASSERT_EQ(files.size(), 1u);
  const std::string first = base.ref_cache_dir + "/" + *files.begin();
  fs::last_write_time(first, fs::file_time_type::clock::now() - std::chrono::hours(1));
  const auto old_time = fs::last_write_time(first);
  const std::string data2 = w / "pref2.jsonl";
  // Unchanged settings, and settings that do not change the reference log-probs: a hit.
  for (const auto& [what, change] : std::vector<std::pair<std::string, std::function<void(TrainConfig&)>>>{
           {"unchanged", [](TrainConfig&) {}},
           {"learning_rate", [](TrainConfig& c) { c.learning_rate = 0.5; }},
           {"beta", [](TrainConfig& c) { c.beta = 0.3; }},
           {"seed", [](TrainConfig& c) { c.seed = 99; }},
           {"per_device_train_batch_size", [](TrainConfig& c) { c.per_device_train_batch_size = 2; }},
           // The key is the data's contents, not its path.
           {"train_file (other path, same bytes)", [&](TrainConfig& c) {
              spit(data2, slurp(c.train_file));
              c.train_file = data2;
            }}}) {
    TrainConfig c = base;
    change(c);
    train(c);
    EXPECT_EQ(cache_files(c), files) << what << ": a new cache file";
    EXPECT_EQ(fs::last_write_time(first), old_time) << what << ": the cache file was rewritten";
  }
  // Each setting that changes them: a miss (a new file).
  for (const auto& [what, change] : std::vector<std::pair<std::string, std::function<void(TrainConfig&)>>>{
           {"max_length", [](TrainConfig& c) { c.max_length = 20; }},
           {"max_prompt_length", [](TrainConfig& c) { c.max_prompt_length = 6; }},
           {"truncation_mode", [](TrainConfig& c) { c.truncation_mode = "keep_start"; }},  // legacy's default: keep_end
           {"truncation (trl1 instead of legacy)", [](TrainConfig& c) {
              c.truncation = "trl1";
              c.max_prompt_length = 0;
            }},
           {"ref_model (other weights)", [&](TrainConfig& c) { c.ref_model = w / "base2"; }},
           {"precision", [](TrainConfig& c) { c.precision = c.precision == "fp32" ? "bf16" : "fp32"; }},
           {"per_device_eval_batch_size (padding changes rounding)",
            [](TrainConfig& c) { c.per_device_eval_batch_size = 3; }}}) {
    TrainConfig c = base;
    change(c);
    const size_t before = cache_files(c).size();
    train(c);
    EXPECT_EQ(cache_files(c).size(), before + 1) << what << ": no new cache file (the key missed this setting)";
    EXPECT_EQ(fs::last_write_time(first), old_time) << what;
  }
  // The data file's contents changed under the same path: a miss.
  const size_t before = cache_files(base).size();
  std::string data = slurp(base.train_file);
  data[data.find("lovely")] = 'L';
  spit(base.train_file, data);
  train(base);
  EXPECT_EQ(cache_files(base).size(), before + 1) << "data contents: no new cache file";
}

// A flipped bit in the cached values is detected: the file is recomputed (with a reason naming it), never used.
TEST(Integrity, FlippedBitInReferenceCacheIsRecomputed) {
  Workdir w;
  auto be = make_cpu_backend(1);
  auto ref = load_gpt2_checkpoint(*be, w / "base", DType::F32);
  auto tok = make_tokenizer("byte");
  DataOptions d;
  d.max_length = 24;
  LoadStats st;
  auto pairs = load_preferences(w / "pref.jsonl", *tok, d, &st);
  auto r1 = cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s", w / "cache", 5);
  ASSERT_EQ(r1.status, RefCacheResult::Status::Miss);
  ASSERT_EQ(cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s", w / "cache", 5).status,
            RefCacheResult::Status::Hit);
  // The last bytes of the file are the "rejected" values (F64): flip a low mantissa bit of one of them, a change
  // that no range check could see.
  for (size_t from_end : {size_t{0}, size_t{8 * 3 + 1}, size_t{8 * pairs.size() + 2}}) {
    SCOPED_TRACE(from_end);
    flip_bit(r1.path, from_end);
    auto r = cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s", w / "cache", 5);
    EXPECT_EQ(r.status, RefCacheResult::Status::Stale);
    EXPECT_NE(r.reason.find("SHA-256"), std::string::npos) << r.reason;
    EXPECT_EQ(r.logps.chosen, r1.logps.chosen);
    EXPECT_EQ(r.logps.rejected, r1.logps.rejected);
    // Rewritten: the next use hits.
    EXPECT_EQ(cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s", w / "cache", 5).status,
              RefCacheResult::Status::Hit);
  }
  // A cache file without values_sha256 (an edited or older file) is not used either.
  {
    SafetensorsFile f(r1.path);
    auto meta = f.metadata();
    meta.erase("values_sha256");
    save_safetensors(r1.path, {{"chosen", f.read("chosen")}, {"rejected", f.read("rejected")}}, meta);
  }
  EXPECT_EQ(cached_ref_logps(*ref, pairs, w / "pref.jsonl", "s", w / "cache", 5).status,
            RefCacheResult::Status::Stale);

  // In a run: the policy equals the reference at step 1, so the first loss is exactly ln 2 only if the
  // recomputed reference values are used, not the corrupted ones.
  TrainConfig c = base_config(w, "first");
  c.max_steps = 1;
  run_training(c, RunKind::Dpo, quiet());
  std::set<std::string> files = cache_files(c);
  for (const auto& f : files) flip_bit(c.ref_cache_dir + "/" + f, 5);
  c.out_dir = w / "second";
  RunSummary s = run_training(c, RunKind::Dpo, quiet());
  EXPECT_NEAR(s.last_log.at("loss"), std::log(2.0), 1e-6);
  EXPECT_NEAR(s.last_log.at("rewards/margins"), 0.0, 1e-6);
}

}  // namespace
}  // namespace dpo
