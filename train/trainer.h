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

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "model/gpt2.h"
#include "train/config.h"

namespace dpo {

class Communicator;  // runtime/comm.h

struct RunOptions {
  std::string resume;          // checkpoint directory, or "latest" (out_dir/checkpoints/latest)
  bool plain_progress = false;  // never draw the live terminal line
  bool quiet = false;           // no progress output at all
  // The ranks of a data-parallel run (docs/distributed.md). nullptr: make_communicator(), i.e. MPI when started
  // by mpirun/srun with several processes, else a single process. Not owned.
  Communicator* comm = nullptr;
  // Tests (tests/test_host_sync.cpp): wraps the run's backend (e.g. in a CountingBackend); the wrapper forwards to
  // `inner`, which outlives it. Unset: the backend itself.
  std::function<std::unique_ptr<Backend>(Backend& inner)> wrap_backend;
  // Tests: called after each optimizer step's metrics are folded, before anything is logged or saved, with the
  // 1-based step number.
  std::function<void(int64_t step)> on_step;
};

struct RunSummary {
  int64_t steps = 0;
  std::string final_checkpoint;
  std::map<std::string, double> last_log;  // the last metrics.jsonl record
  std::map<std::string, double> eval;      // eval_* metrics at the end (DPO with eval_file)
  double seconds = 0;
  // Non-zero when the run stopped early on SIGINT or SIGTERM (train/run_control.h): the signal number. `steps`
  // and final_checkpoint are then those of the checkpoint written at the stop; `dpo` exits 128 + stop_signal.
  int stop_signal = 0;
};

// Under several ranks every rank calls this with the same configuration and data; rank 0 alone writes out_dir
// (config.yaml, metrics.jsonl, checkpoints) and prints progress. Every rank returns the same RunSummary (except
// `seconds` and tokens_per_second). Test hook: DPO_TEST_FAIL_RANK=r DPO_TEST_FAIL_STEP=s [DPO_TEST_FAIL_MODE=kill]
// makes rank r throw (or SIGKILL itself) in optimizer step s, after its micro-batches and before the gradient
// reduction (tests/test_mpi_failure.cpp).
RunSummary run_training(const TrainConfig& cfg, RunKind kind, const RunOptions& opt);

// What run_evaluation evaluated on, besides the metrics.
struct EvalReport {
  int64_t pairs = 0;      // preference pairs evaluated
  int64_t truncated = 0;  // of those, pairs truncated to max_length
  int64_t dropped = 0;    // records dropped by truncation (truncation: trl1, prompt alone >= max_length)
  int64_t skipped = 0;    // records skipped (skip_malformed)
  double seconds = 0;     // the evaluation loop (the models and the data loaded)
};

// Evaluates a policy checkpoint on cfg.eval_file (or train_file when eval_file is empty) against the reference
// (ref_model, else model; none with reference_free): loss and reward metrics with the eval_ prefix.
// Sharded by pair over the ranks of `comm` (nullptr: make_communicator()); every rank returns the same metrics.
std::map<std::string, double> run_evaluation(const TrainConfig& cfg, const std::string& checkpoint,
                                             Communicator* comm = nullptr, EvalReport* report = nullptr);

}  // namespace dpo
