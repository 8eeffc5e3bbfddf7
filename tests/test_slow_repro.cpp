// `dpo repro` experiments at fast configurations, asserting their pass criteria (the PASS verdicts the
// experiments compute from theory, not numbers copied from a run). Label `slow` (the file name): minutes, not
// seconds. docs/reproductions.md has the criteria, their reasons and the default runs.
//
//   ipo-bandit, optimum, overfit  their default runs (seconds; seed 1, as in docs/reproductions.md;
//                                 tests/test_repro.cpp asserts the same on every run of the test command)
//   frontier                      the demo's pipeline, DPO at beta 0.05, 0.5 and 5, RPO at 0.05, 2 seeds, 144
//                                 evaluation samples, Best-of-N up to 16 from 64 SFT samples per prompt
//   odpo                          the demo's pipeline, alpha 0 (DPO), 1 and 2 at beta 0.1, 3 seeds, 144 evaluation
//                                 samples
//
// Not asserted here (reported in the test's output; asserted by the default run in docs/reproductions.md):
//   frontier "dpo dominates preferred-ft": a reward advantage of 2 combined standard errors at Preferred-FT's KL
//   needs the default run's statistical power (3 seeds and 216 evaluation samples per point, and the beta grid
//   that reaches Preferred-FT's KL); at 2 seeds and 144 samples the standard errors are about 1.4 times larger,
//   so a real advantage of the default run's size can read below 2 here.
//
// The exact experiments were also run at seeds 2 to 8 (docs/reproductions.md, "Other seeds"): ipo-bandit passes at
// every one; optimum fails at seeds 2, 7 and 8 (no Bradley-Terry fit of the 2,000-pair set at seed 7; the beta 0.25
// rate criterion at 2 and 8) and overfit at seeds 3, 4, 6 and 8 (beta 1's KL midpoint ratio 0.47-0.50 against 0.5).
// Those are properties of the experiments' default sizes, reported there; this test asserts the documented runs.
//
// Measured (2026-12-06, the 2-core AMD EPYC VM, OMP_WAIT_POLICY=passive, the three tests in one process): 268 CPU s
// (user + system), 7 min 21 s wall time on the machine at load average 5 to 9 from other work; frontier 245 s and
// odpo 186 s of that wall time, the exact experiments 10 s. On the idle machine: at least 134 s, about 3 minutes.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "test_util.h"
#include "train/repro.h"

namespace dpo {
namespace {

using json = nlohmann::json;

json run_and_read(ReproOptions opt, const test::ScratchDir& dir) {
  opt.out_dir = dir / "out";
  const int rc = run_repro(opt);
  std::ifstream f(dir / "out/report.json");
  EXPECT_TRUE(f.good());
  json r = json::parse(f);
  EXPECT_EQ(r["passed"].get<bool>(), rc == 0);
  return r;
}

// Every criterion passes except those named in `reported_only`, which must exist and are printed, not asserted.
void expect_pass(const json& r, const std::set<std::string>& reported_only) {
  ASSERT_TRUE(r["criteria"].is_array());
  ASSERT_GT(r["criteria"].size(), 0u);
  std::set<std::string> seen;
  for (const auto& c : r["criteria"]) {
    const std::string id = c["id"];
    if (reported_only.count(id)) {
      seen.insert(id);
      std::printf("reported, not asserted: %s %s: %s\n", c["pass"].get<bool>() ? "PASS" : "FAIL", id.c_str(),
                  c["measured"].dump().c_str());
      continue;
    }
    EXPECT_TRUE(c["pass"].get<bool>()) << c.dump();
  }
  EXPECT_EQ(seen.size(), reported_only.size());
}

TEST(SlowRepro, ExactExperimentsDefaultRuns) {
  for (const char* name : {"ipo-bandit", "optimum", "overfit"}) {
    test::ScratchDir dir("slow_repro_");
    ReproOptions opt;
    opt.name = name;
    opt.seed = 1;
    const json r = run_and_read(opt, dir);
    expect_pass(r, {});
  }
}

TEST(SlowRepro, FrontierFastConfiguration) {
  test::ScratchDir dir("slow_repro_");
  FrontierSizes z = frontier_sizes(false);
  z.pipeline.eval_samples_per_prompt = 16;
  z.betas = {0.05, 0.5, 5.0};
  z.rpo_betas = {0.05};
  z.seeds = 2;
  z.best_of_n = {1, 2, 4, 16};
  z.bon_samples_per_prompt = 64;
  z.bootstrap = 50;
  ReproOptions opt;
  opt.name = "frontier";
  opt.frontier_sizes = &z;
  const json r = run_and_read(opt, dir);
  // dominance, 3 Best-of-N bounds, 3 Best-of-N increases, 2 for the RPO beta, 2 log-prob falls
  EXPECT_EQ(r["criteria"].size(), 1u + 3 + 3 + 2 + 2);
  expect_pass(r, {"dpo dominates preferred-ft"});
}

TEST(SlowRepro, OdpoFastConfiguration) {
  test::ScratchDir dir("slow_repro_");
  OdpoSizes z = odpo_sizes(false);
  z.pipeline.eval_samples_per_prompt = 16;
  z.alphas = {0.0, 1.0, 2.0};
  z.seeds = 3;
  ReproOptions opt;
  opt.name = "odpo";
  opt.odpo_sizes = &z;
  const json r = run_and_read(opt, dir);
  EXPECT_EQ(r["criteria"].size(), 2u);
  expect_pass(r, {});
}

}  // namespace
}  // namespace dpo
