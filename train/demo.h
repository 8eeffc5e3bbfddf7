// `dpo demo`: the built-in offline task, end to end, with no input files and no network.
//   (a) generate a synthetic controlled-sentiment corpus (train/sentiment_task.h),
//   (b) SFT a small byte-level GPT-2 on it from random initialisation,
//   (c) sample completions per training prompt from the SFT model and label pairs with the ground-truth reward,
//   (d) run DPO from the SFT model, once per beta,
//   (e) evaluate on held-out prompts: mean ground-truth reward, sequence-level KL(policy || SFT) estimated from
//       policy samples, and implicit-reward accuracy on held-out pairs,
//   (f) write report.json, report.md, PNG plots and each run's metrics/config under DIR.
#pragma once

#include <string>
#include <vector>

namespace dpo {

struct DemoOptions {
  std::string out_dir;
  std::vector<double> betas = {0.1, 0.5};
  uint64_t seed = 1;
  int64_t num_threads = 0;
  bool plain_progress = false;
};

// Returns the path of report.json.
std::string run_demo(const DemoOptions& opt);

}  // namespace dpo
