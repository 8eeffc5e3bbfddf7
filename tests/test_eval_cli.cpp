// `dpo eval` as a TRL user runs it: a checkpoint, an evaluation file and (optionally) a reference, with no config
// file, writing <out-dir>/eval_metrics.json; the same numbers as the --config form; bad inputs exit 2 naming the
// flag or file, with nothing created in the output directory. Runs the dpo binary on the tiny fixture.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "train/hash.h"
#include "train/run_control.h"
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

std::string q(const std::string& s) { return test::shell_quote(s); }

CliResult run_dpo(const test::ScratchDir& w, const std::string& args) {
  return test::run_cli(kDpoBinary, w.dir, args);
}

struct Workdir : test::ScratchDir {
  Workdir() : ScratchDir("dpo_eval_cli_") { test::write_tiny_fixture(dir.string(), 12); }
};





// A DPO checkpoint trained two steps from w/base: its trainer_state.json records model = w/base.
std::string train_checkpoint(const Workdir& w) {
  TrainConfig c;
  c.model = w / "base";
  c.train_file = w / "pref.jsonl";
  c.out_dir = w / "run";
  c.ref_cache_dir = w / "cache";
  c.max_length = 24;
  c.max_prompt_length = 8;
  c.learning_rate = 1e-2;
  c.per_device_train_batch_size = 4;
  c.max_steps = 2;
  c.seed = 7;
  RunOptions ro;
  ro.quiet = true;
  run_training(c, RunKind::Dpo, ro);
  return c.out_dir + "/checkpoints/step-2";
}

json read_metrics(const std::string& out_dir) {
  const std::string p = out_dir + "/eval_metrics.json";
  EXPECT_TRUE(fs::exists(p)) << p;
  return json::parse(slurp(p));
}

const char* const kTrlMetrics[] = {"eval_loss",          "eval_rewards/chosen",    "eval_rewards/rejected",
                                   "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
                                   "eval_logps/rejected", "eval_logits/chosen", "eval_logits/rejected",
                                   "eval_num_tokens"};

TEST(EvalCli, CheckpointAndEvalFileOnlyWritesMetricsEqualToConfigForm) {
  Workdir w;
  const std::string ck = train_checkpoint(w);
  const std::string base = w / "base", ev = w / "eval.jsonl";

  // 1. Checkpoint + eval file only: the reference is the one the checkpoint's run recorded (base), and says so.
  CliResult r = run_dpo(w, "eval " + q(ck) + " --eval-file " + q(ev) + " --out-dir " + q(w / "o_flags"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("reference: " + base), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("eval_loss"), std::string::npos) << r.out;  // the table is still printed
  const json a = read_metrics(w / "o_flags");

  // 2. The same with the reference named.
  r = run_dpo(w, "eval " + q(ck) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " --out-dir " +
                     q(w / "o_ref"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json b = read_metrics(w / "o_ref");

  // 3. The --config form of before (model is the reference, eval_file the data), with --out-dir.
  std::ofstream(w / "run.yaml") << "model: " << base << "\ntrain_file: " << (w / "pref.jsonl")
                                << "\neval_file: " << ev << "\nout_dir: " << (w / "train_out") << "\n";
  r = run_dpo(w, "eval " + q(ck) + " --config " + q(w / "run.yaml") + " --out-dir " + q(w / "o_config"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json c = read_metrics(w / "o_config");
  EXPECT_FALSE(fs::exists(w / "train_out"));  // the config's out_dir is the training run's: not written by eval

  for (const json* j : {&a, &b, &c}) {
    for (const char* k : kTrlMetrics) {
      SCOPED_TRACE(k);
      ASSERT_TRUE(j->contains(k)) << j->dump(2);
      ASSERT_TRUE((*j)[k].is_number()) << j->dump(2);
      // The same computation on the same inputs in the same process layout: deterministic, so equal up to the
      // decimal round trip of the JSON numbers (nlohmann writes the shortest form that reads back exactly).
      EXPECT_DOUBLE_EQ((*j)[k].get<double>(), a[k].get<double>());
    }
    EXPECT_EQ((*j)["eval_samples"], 9);  // write_tiny_fixture writes 9 evaluation pairs, none cut at max_length 40
    EXPECT_EQ((*j)["checkpoint"], ck);
    EXPECT_EQ((*j)["eval_file"], ev);
    EXPECT_EQ((*j)["eval_file_sha256"], sha256_file(ev));
    EXPECT_EQ((*j)["ref_model"], base);
    EXPECT_EQ((*j)["reference_free"], false);
    EXPECT_TRUE((*j)["eval_runtime"].is_number());
    EXPECT_GE((*j)["eval_runtime"].get<double>(), 0.0);
    EXPECT_TRUE((*j)["eval_samples_per_second"].is_number());
  }
  // The metrics are TRL's: margins = chosen - rejected, accuracies a fraction of 9 pairs, and two steps at
  // learning_rate 1e-2 moved the policy away from its reference.
  EXPECT_NEAR(a["eval_rewards/margins"].get<double>(),
              a["eval_rewards/chosen"].get<double>() - a["eval_rewards/rejected"].get<double>(), 1e-6);
  // eval_num_tokens: the training tokens of the checkpoint's run (TRL's count at evaluation time), as recorded.
  EXPECT_EQ(a["eval_num_tokens"].get<double>(),
            json::parse(slurp(ck + "/trainer_state.json"))["num_tokens"].get<double>());
  EXPECT_GT(a["eval_num_tokens"].get<double>(), 0.0);
  const double acc9 = a["eval_rewards/accuracies"].get<double>() * 9;
  EXPECT_NEAR(acc9, std::round(acc9), 1e-6);
  EXPECT_NE(a["eval_loss"].get<double>(), std::log(2.0));
  // Atomic write: no temporary file is left beside it (only the one-writer lock file, as in a training out_dir).
  for (const auto& e : fs::directory_iterator(w / "o_flags")) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "eval_metrics.json" || n == "dpo.lock") << e.path();
  }
}

// The policy evaluated against itself: every reward is 0 and the sigmoid loss is ln 2, whatever the data.
TEST(EvalCli, PolicyAgainstItselfGivesLn2) {
  Workdir w;
  const std::string base = w / "base";
  CliResult r = run_dpo(w, "eval " + q(base) + " --eval-file " + q(w / "eval.jsonl") + " --ref-model " + q(base) +
                               " --out-dir " + q(w / "o"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = read_metrics(w / "o");
  // Policy and reference are the same weights in the same computation: the log-ratios are exactly 0.
  EXPECT_NEAR(j["eval_loss"].get<double>(), std::log(2.0), 1e-6);
  EXPECT_NEAR(j["eval_rewards/chosen"].get<double>(), 0.0, 1e-9);
  EXPECT_NEAR(j["eval_rewards/margins"].get<double>(), 0.0, 1e-9);
  EXPECT_EQ(j["eval_samples"], 9);
  // The logits metrics are the policy's; a model directory without a trainer state has no training token count.
  EXPECT_TRUE(j["eval_logits/chosen"].is_number() && j["eval_logits/rejected"].is_number()) << j.dump(2);
  EXPECT_FALSE(j.contains("eval_num_tokens")) << j.dump(2);
}

// reference_free needs no reference; without --out-dir nothing is written and the table is printed.
TEST(EvalCli, ReferenceFreeAndNoOutDir) {
  Workdir w;
  CliResult r = run_dpo(w, "eval " + q(w / "base") + " --eval-file " + q(w / "eval.jsonl") + " reference_free=true");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("eval_loss"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(w / "eval_metrics.json"));
  r = run_dpo(w, "eval " + q(w / "base") + " --eval-file " + q(w / "eval.jsonl") +
                     " reference_free=true --out-dir " + q(w / "o"));
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = read_metrics(w / "o");
  EXPECT_TRUE(j["ref_model"].is_null());
  EXPECT_EQ(j["reference_free"], true);
}

// Each bad input exits 2 with a message naming the flag or file, and the output directory is never created.
TEST(EvalCli, BadInputsExit2NamingTheFlagAndCreateNothing) {
  Workdir w;
  const std::string base = w / "base", ev = w / "eval.jsonl", out = w / "out";
  std::ofstream(w / "broken.jsonl") << "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{not json\n";
  fs::create_directories(w / "a_dir");
  std::ofstream(w / "a_file") << "x";
  const std::string o = " --out-dir " + q(out);
  struct Case {
    std::string args, named;
  };
  const Case cases[] = {
      {"eval " + q(base) + " --ref-model " + q(base) + o, "--eval-file"},  // no evaluation data at all
      {"eval " + q(base) + " --eval-file " + q(w / "missing.jsonl") + " --ref-model " + q(base) + o,
       w / "missing.jsonl"},
      {"eval " + q(base) + " --eval-file " + q(w / "a_dir") + " --ref-model " + q(base) + o, "--eval-file"},
      {"eval " + q(base) + " --eval-file " + q(w / "broken.jsonl") + " --ref-model " + q(base) + o,
       w / "broken.jsonl:2"},
      {"eval " + q(w / "no_ckpt") + " --eval-file " + q(ev) + " --ref-model " + q(base) + o, w / "no_ckpt"},
      {"eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(w / "no_ref") + o, "--ref-model"},
      // An external model records no reference: one must be named.
      {"eval " + q(base) + " --eval-file " + q(ev) + o, "--ref-model"},
      {"eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " reference_free=true" + o,
       "--ref-model"},
      {"eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " out_dir=" + q(w / "other") + o,
       "--out-dir"},
      {"eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " beta=-1" + o, "beta"},
      {"eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " --config " + q(w / "no.yaml") + o,
       w / "no.yaml"},
      {"eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " max_length=4096" + o,
       "max_length"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    CliResult r = run_dpo(w, c.args);
    EXPECT_EQ(r.code, 2) << r.err;
    EXPECT_NE(r.err.find(c.named), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out)) << "created before the inputs were validated";
    EXPECT_FALSE(fs::exists(w / "other"));
  }
  // --out-dir naming an existing file.
  CliResult r = run_dpo(w, "eval " + q(base) + " --eval-file " + q(ev) + " --ref-model " + q(base) + " --out-dir " +
                               q(w / "a_file"));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("--out-dir"), std::string::npos) << r.err;
  EXPECT_EQ(slurp(w / "a_file"), "x");
}

// One writer per output directory, as for training: an --out-dir locked by another process is refused (exit 2,
// naming the flag, the directory and the holder) before anything is evaluated or written; once released it works.
TEST(EvalCli, OutDirHeldByAnotherWriterIsRefused) {
  Workdir w;
  const std::string base = w / "base", out = w / "o";
  fs::create_directories(out);
  const std::string args =
      "eval " + q(base) + " --eval-file " + q(w / "eval.jsonl") + " --ref-model " + q(base) + " --out-dir " + q(out);
  {
    OutDirLock held(out);  // flock is per open file: the child process cannot take it while this one holds it
    CliResult r = run_dpo(w, args);
    EXPECT_EQ(r.code, 2) << r.err;
    EXPECT_NE(r.err.find("--out-dir: " + out + " is in use by another run"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("pid " + std::to_string(::getpid())), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(fs::path(out) / "eval_metrics.json"));
  }
  CliResult r = run_dpo(w, args);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(fs::path(out) / "eval_metrics.json"));
}

}  // namespace
}  // namespace dpo
