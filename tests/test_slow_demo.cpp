// The README's main job, `dpo demo`, end to end on the CPU, checked against what the DPO paper's IMDb experiment
// predicts: the DPO policy's ground-truth reward is clearly above the SFT policy's at a finite KL, and a larger
// beta keeps the policy closer to the reference (smaller KL).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "train/demo.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

TEST(Demo, DpoBeatsSftAtFiniteKlAndLargerBetaGivesSmallerKl) {
  const fs::path out = fs::path(::testing::TempDir()) / "dpo_demo_test";
  fs::remove_all(out);
  DemoOptions o;
  o.out_dir = out.string();
  o.betas = {0.1, 0.5};
  o.plain_progress = true;
  const std::string report_path = run_demo(o);
  std::ifstream f(report_path);
  auto r = nlohmann::json::parse(f);
  const double sft_reward = r["sft"]["reward_mean"], sft_sem = r["sft"]["reward_sem"];
  ASSERT_EQ(r["runs"].size(), 2u);
  for (const auto& run : r["runs"]) {
    const double reward = run["reward_mean"], sem = run["reward_sem"], kl = run["kl"];
    // "Clearly above": more than 3 combined standard errors (both means are over 216 held-out samples).
    EXPECT_GT(reward - sft_reward, 3.0 * std::sqrt(sem * sem + sft_sem * sft_sem)) << "beta " << run["beta"];
    EXPECT_TRUE(std::isfinite(kl) && kl > 0) << kl;
    EXPECT_GT(run["implicit_reward_accuracy"].get<double>(), 0.6);  // held-out pairs, chance = 0.5
  }
  const double kl_small_beta = r["runs"][0]["kl"], kl_large_beta = r["runs"][1]["kl"];
  const double sem_sum = r["runs"][0]["kl_sem"].get<double>() + r["runs"][1]["kl_sem"].get<double>();
  EXPECT_GT(kl_small_beta - kl_large_beta, sem_sum) << "beta 0.1 KL " << kl_small_beta << " vs beta 0.5 KL "
                                                     << kl_large_beta;
  for (const char* file : {"report.md", "training_curves.png", "reward_vs_kl.png", "sft/metrics.jsonl",
                           "dpo_beta_0.1/metrics.jsonl", "dpo_beta_0.5/metrics.jsonl", "data/sft.jsonl"})
    EXPECT_TRUE(fs::exists(out / file)) << file;
  // Refuses to overwrite a finished demo.
  EXPECT_THROW(run_demo(o), InputError);
  fs::remove_all(out);
}

}  // namespace
}  // namespace dpo
