// `dpo demo`: the built-in offline task, end to end, with no input files and no network.
//   (a) generate a synthetic controlled-sentiment corpus (train/sentiment_task.h),
//   (b) SFT a small byte-level GPT-2 on it from random initialisation,
//   (c) sample completions per training prompt from the SFT model and label pairs with the ground-truth reward,
//   (d) run DPO from the SFT model, once per beta,
//   (e) evaluate on held-out prompts: mean ground-truth reward, sequence-level KL(policy || SFT) estimated from
//       policy samples, and implicit-reward accuracy on held-out pairs,
//   (f) write report.json, report.md, PNG plots and each run's metrics/config under DIR.
// Steps (a)-(c) and (e) are exposed below (namespace dpo::demo) for `dpo repro frontier`, which runs the same
// pipeline with more policies.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "train/config.h"
#include "train/data.h"
#include "train/plot.h"
#include "train/tokenizer.h"

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

namespace demo {

// Sizes of the pipeline. A byte-level model needs roughly 30k sequence passes of SFT before it spells the task's
// words; with less, its samples hold no sentiment words at all and every sampled pair is a tie.
struct Sizes {
  int64_t n_layer, n_embd, n_head, sft_examples, sft_epochs, pair_prompts, eval_prompts, eval_samples_per_prompt,
      eval_pairs_prompts, dpo_epochs;
};
// The demo's: about two minutes with two betas on a 2-core machine.
inline constexpr Sizes kDemoSizes = {3, 64, 4, 10000, 3, 600, 9, 24, 100, 3};

// Completions sampled at temperature 1 (exact samples of the policy), one per prompt.
struct Samples {
  std::vector<std::string> prompts, completions;  // completion text without EOS
  std::vector<SftExample> examples;               // token form, completion with EOS when generated
};
Samples sample_from(GPT2& m, const Tokenizer& tok, const std::vector<std::string>& prompts, uint64_t seed,
                    int64_t batch);

// Sequence log-probs of completions under `m` (rows: prompt + completion, weights on the completion).
std::vector<double> completion_logps(GPT2& m, const std::vector<SftExample>& ex, int64_t batch);

// A policy on the prompts (each an independent sample): mean ground-truth reward, the sequence-level
// KL(policy || sft) estimated as the mean of log pi(y|x) - log pi_sft(y|x) over samples y ~ pi, the fraction of
// grammatical completions, each with one standard error over the samples, and the first 8 samples as text.
struct PolicyEval {
  double reward_mean = 0, reward_sem = 0, kl = 0, kl_sem = 0, grammatical = 0, grammatical_sem = 0;
  std::vector<std::string> examples;
};
PolicyEval evaluate_policy(GPT2& policy, GPT2& sft, const Tokenizer& tok, const std::vector<std::string>& prompts,
                           uint64_t seed);

// Pairs from consecutive samples (0, 1), (2, 3), ... labelled by the ground-truth reward; ties are dropped (and
// counted). Kept in token form: a sampled completion need not be valid UTF-8, so it cannot always be JSON text.
struct TokenPair {
  std::vector<int32_t> prompt, chosen, rejected;
  double score_chosen = 0, score_rejected = 0;
};
std::vector<TokenPair> label_pairs(const Samples& s, int64_t* ties);
// {"prompt_ids", "chosen_ids", "rejected_ids", "score_chosen", "score_rejected"} per line, atomically.
void write_token_pairs(const std::string& path, const std::vector<TokenPair>& pairs);

// A run's metrics.jsonl: the numeric fields of each record; a curve of one key against "step".
std::vector<std::map<std::string, double>> read_metrics(const std::string& path);
Series metric_curve(const std::vector<std::map<std::string, double>>& rows, const std::string& key,
                    const std::string& label);

// Steps (a)-(c) under `out`: data/sft.jsonl, init/, sft/, data/pairs_train.jsonl, data/pairs_eval.jsonl.
// `say` receives the progress lines.
struct Prepared {
  TrainConfig base;           // the settings every run of the pipeline shares (lengths, seed, threads, ref cache)
  std::string sft_checkpoint;  // verified
  std::string sft_out_dir;     // the SFT run's directory (metrics.jsonl)
  std::string pairs_train, pairs_eval;
  int64_t n_train_pairs = 0, n_eval_pairs = 0, ties = 0;
};
Prepared prepare(const std::string& out, const Sizes& z, uint64_t seed, int64_t num_threads,
                 bool plain_progress, const std::function<void(const std::string&)>& say);

// The demo's DPO settings (sigmoid loss, lr 2e-4, warmup 10, 16 pairs x 2 accumulation steps, eval every 20
// steps) from the SFT checkpoint on the prepared pairs.
TrainConfig dpo_config(const Prepared& p, const std::string& out_dir, double beta, int64_t epochs);

// The held-out prompt set, each prompt repeated `per_prompt` times (the evaluation's prompts).
std::vector<std::string> repeated_eval_prompts(int64_t per_prompt);

}  // namespace demo
}  // namespace dpo
