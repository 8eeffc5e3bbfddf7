// The training loop for DPO-family losses and for SFT, on any Backend.
//
// One optimizer step = gradient_accumulation_steps micro-batches of per_device_train_batch_size pairs (SFT:
// examples), never crossing an epoch boundary, so an epoch's last step may be short. The loss is normalised by
// the number of pairs in the whole step (SFT: completion tokens in the whole step), not per micro-batch, so
// accumulation gives the same gradient as one big batch.
//
// Outputs in out_dir: config.yaml (effective configuration), metrics.jsonl, checkpoints/step-<N>/ (HF
// model.safetensors + config.json, optimizer.safetensors, trainer_state.json with SHA-256 of each file), and
// checkpoints/final -> the last step directory's name in `latest`.
#pragma once

#include <map>
#include <string>

#include "model/gpt2.h"
#include "train/config.h"

namespace dpo {

struct RunOptions {
  std::string resume;          // checkpoint directory, or "latest" (out_dir/checkpoints/latest)
  bool plain_progress = false;  // never draw the live terminal line
  bool quiet = false;           // no progress output at all
};

struct RunSummary {
  int64_t steps = 0;
  std::string final_checkpoint;
  std::map<std::string, double> last_log;  // the last metrics.jsonl record
  std::map<std::string, double> eval;      // eval_* metrics at the end (DPO with eval_file)
  double seconds = 0;
};

RunSummary run_training(const TrainConfig& cfg, RunKind kind, const RunOptions& opt);

// Evaluates a policy checkpoint on cfg.eval_file (or train_file when eval_file is empty) against the reference:
// loss and reward metrics with the eval_ prefix.
std::map<std::string, double> run_evaluation(const TrainConfig& cfg, const std::string& checkpoint);

}  // namespace dpo
