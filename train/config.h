// Run configuration: one YAML file plus `key=value` overrides from the command line, one flat namespace of keys
// with TRL's names where TRL has one. Every key is declared once (config.cpp, `kKeys`) with its type, default and
// one line of help; `dpo train --help-config` prints that table.
//
// Errors name the key and where it came from ("run.yaml:12: key 'beta': must be > 0, got -1",
// "override 'lr=x': unknown key 'lr' (did you mean 'learning_rate'?)") and are dpo::InputError (exit code 2):
// unknown keys, wrong types, out-of-range values, inconsistent combinations, a key given twice in one file, and
// a file holding more than one YAML document.
//
// Bounds (validate): every numeric key has one, chosen so that no accepted value can overflow or crash a run
// (docs/training.md lists them). Counts are at most kMaxCount (2^31 - 1), sizes of a micro-batch at most
// kMaxBatch, so that products of two of them never overflow 64-bit integers; `num_threads` is at most
// kMaxThreads; real-valued keys must be finite and lie in the range where the update stays finite
// (learning_rate in (0, 1], learning_rate * weight_decay <= 1, betas in [0, 1), adam_epsilon in [1e-30, 1],
// beta, odpo_alpha, rpo_alpha and loss_weights at most 1e6).
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "model/memory_plan.h"

namespace dpo {

struct TrainConfig {
  // model and data
  std::string model;       // policy initialisation: HF GPT-2 checkpoint directory
  std::string ref_model;   // reference model directory; empty = same as `model`
  std::string train_file;  // JSONL
  std::string eval_file;   // JSONL, optional
  std::string out_dir;
  std::string tokenizer = "byte";  // "byte" or a tokenizer.json path; when not given, <model>/tokenizer.json if present
  int64_t eos_token_id = -1;       // -1: the model's (config.json, else generation_config.json)
  // The id padding slots hold (never scored or attended to); -1: the model's pad_token_id (config.json, else
  // generation_config.json), else 0.
  int64_t pad_token_id = -1;
  std::string device = "cpu";
  std::string precision = "fp32";  // fp32 | bf16 (bf16 weights/activations, fp32 master weights and gradients)
  int64_t seed = 42;
  int64_t num_threads = 0;  // CPU threads; 0 = OpenMP default
  // data
  int64_t max_length = 512;  // unless given: min(512, the model's n_positions) (fit_to_model)
  // Truncation (docs/training.md, "Truncation"; resolve_truncation fills what is left empty):
  //   truncation "trl1": TRL 1.x, each prompt + completion cut to max_length (truncation_mode keep_start only),
  //                      records whose prompt alone has >= max_length tokens dropped and counted;
  //              "legacy": the prompt cut to max_prompt_length first (keep_end or keep_start), then completions.
  //   Empty: "legacy" when max_prompt_length > 0 (a key TRL 1.x does not have), else "trl1".
  std::string truncation;
  int64_t max_prompt_length = 0;  // legacy only; 0 = unset: 256, or max_length / 2 when 256 >= max_length
  std::string truncation_mode;    // empty: keep_start (trl1), keep_end (legacy)
  bool skip_malformed = false;
  // loss
  std::vector<std::string> loss_type = {"sigmoid"};
  std::vector<double> loss_weights;  // empty = 1 for each loss_type
  double beta = 0.1;
  double label_smoothing = 0.0;
  bool ipo_length_normalize = true;  // TRL's ipo (per-token mean log-ratios); false: the IPO paper's sums
  double odpo_alpha = 0.0;
  double rpo_alpha = 0.0;  // weight of an added SFT (NLL) term on the chosen completion; 0 = off
  bool reference_free = false;
  double discopop_tau = 0.05;                 // TRL's discopop_tau
  double simpo_gamma = 0.5;                   // TRL CPOConfig's simpo_gamma
  std::string f_divergence_type = "reverse_kl";  // TRL's f_divergence_type
  double f_alpha_divergence_coef = 0.5;       // TRL's f_alpha_divergence_coef
  bool use_weighting = false;  // WPO: pair losses weighted by the policy's length-normalised probabilities (TRL's)
  double ld_alpha = 1.0;  // LD-DPO: weight of the tokens past a pair's shared length, in (0, 1]; 1 = off (TRL: None)
  // reference log-probs
  bool precompute_ref_log_probs = true;
  std::string ref_cache_dir;  // empty = $XDG_CACHE_HOME/dpo/ref or ~/.cache/dpo/ref
  // TR-DPO (TRL's names and defaults): after every ref_model_sync_steps-th optimizer step, the live reference
  // becomes ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference (alpha 1: a hard copy).
  // Needs precompute_ref_log_probs: false and a loss with a reference (docs/training.md, "TR-DPO").
  bool sync_ref_model = false;
  double ref_model_mixup_alpha = 0.6;    // in [0, 1]
  int64_t ref_model_sync_steps = 512;    // >= 1
  // optimisation
  double learning_rate = 1e-6;
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  std::string lr_scheduler_type = "constant";  // transformers' names; "constant" has no warmup
  int64_t warmup_steps = 0;
  double max_grad_norm = 1.0;
  int64_t per_device_train_batch_size = 8;  // pairs per micro-batch
  int64_t per_device_eval_batch_size = 16;
  int64_t logits_chunk_rows = 2048;  // LM head + log-softmax rows per chunk (at least one pair); memory chunk x V
  int64_t logits_chunk_bytes = int64_t{512} << 20;  // and at most this many bytes of logits per chunk (GPT2.h)
  int64_t gradient_accumulation_steps = 1;
  // Activation recomputation (GPT2::set_gradient_checkpointing; TRL/HF's key name): the forward keeps one input
  // per segment of gradient_checkpointing_interval blocks and the backward recomputes the segment from it.
  bool gradient_checkpointing = false;
  int64_t gradient_checkpointing_interval = 1;
  // The fit check before training (docs/training.md, "Memory"): on cuda the memory model's total (dpo plan) against
  // the device's free memory, or against device_memory when given (e.g. "80GiB"; on cpu the check runs only then);
  // a step that cannot fit stops the run before it starts (InputError) unless allow_memory_overcommit is true.
  std::string device_memory;
  bool allow_memory_overcommit = false;
  // HF's key: eager (the backend's default kernels) | flash (the tensor-core flash kernels: device cuda, precision
  // bf16 only; Backend::set_attention_impl).
  std::string attn_implementation = "eager";
  std::string batch_layout = "padded";  // padded | packed | prefix_shared (kernels/batch_layout.h)
  int64_t max_tokens_per_row = 0;        // packed / prefix_shared rows; 0 = 2 * max_length
  int64_t pad_to_multiple_of = 0;  // pad each training micro-batch's rows to a multiple of this; 0 = to the longest
  bool cuda_graphs = true;         // device: cuda: replay each micro-batch shape's forward + loss + backward
  int64_t zero_stage = 0;  // 1: ZeRO-1, AdamW moments sharded across the data-parallel ranks
  int64_t num_train_epochs = 1;
  int64_t max_steps = -1;  // optimizer steps; -1 = from epochs
  // logging and checkpoints
  int64_t logging_steps = 10;
  int64_t eval_steps = 0;  // 0 = evaluate at the end only
  int64_t save_steps = 0;  // 0 = save at the end only
  int64_t save_total_limit = 0;  // keep at most this many step checkpoints; 0 = keep all
  std::string max_shard_size = "5GB";  // weights files of saved checkpoints, HF's max_shard_size (parse_shard_size)
  // profiling
  std::string profile_steps;  // "A-B" or "N": optimizer steps (1-based, inclusive) inside a CUDA profiler capture
                              // range (cudaProfilerStart/Stop; docs/profiling.md); empty = off. device: cuda only.
  // numerical guards
  int64_t max_consecutive_skipped_steps = 10;  // stop the run (an error) after this many skipped optimizer steps
                                               // in a row (non-finite gradient norm or update); 0 = never stop

  // Not a key: the keys set by the config file or an override (load_train_config), so that defaults which
  // follow the model (max_length, max_prompt_length) are told apart from values the user chose.
  std::set<std::string> given;
};

constexpr int64_t kMaxCount = 2147483647;  // steps, epochs, intervals, logits_chunk_rows: 2^31 - 1
constexpr int64_t kMaxBatch = 1 << 24;     // per-device batch sizes, gradient_accumulation_steps, lengths
constexpr int64_t kMaxThreads = 1024;      // num_threads (OpenMP crashes creating ~1e5 threads)

// The optimizer steps of `profile_steps`, 1-based and inclusive; first > last (empty) when the key is off.
struct StepRange {
  int64_t first = 1, last = 0;
  bool empty() const { return first > last; }
  bool contains(int64_t step) const { return step >= first && step <= last; }
};
// Parses "A-B" (1 <= A <= B) or "N" (the range N-N); "" is the empty range. InputError naming the key otherwise.
StepRange parse_profile_steps(const std::string& value);

enum class RunKind { Dpo, Sft };

// Loads `path` (may be empty: defaults only), applies `overrides` ("key=value", value parsed as YAML so lists
// work: "loss_type=[sigmoid,sft]"), validates for `kind`. Throws InputError naming the key and its source.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides, RunKind kind);

// Checks ranges and combinations; throws InputError naming the key.
void validate(const TrainConfig& cfg, RunKind kind);

// Fills the truncation keys left empty or unset (see TrainConfig): truncation, truncation_mode and, under legacy,
// max_prompt_length (256, or max_length / 2 when 256 does not fit below max_length). load_train_config and
// fit_to_model call it; a configuration built in code may be passed as it is (the trainer resolves a copy).
// Values it cannot resolve are left for validate() to report.
void resolve_truncation(TrainConfig& cfg);

// Fits the length keys to a model of `n_positions` (the smallest of the policy's and the reference's), read from
// `model` (named in messages): max_length, when not given, becomes min(its default 512, n_positions), and
// under truncation: legacy, max_prompt_length, when not given and its default 256 is not below max_length,
// max_length / 2 (load_train_config applies the same rule to a given max_length). A given max_length above
// n_positions throws InputError naming the key to set. Returns one line per value changed or chosen for the user
// (also: truncation: legacy chosen because max_prompt_length is set), for the run's log.
std::vector<std::string> fit_to_model(TrainConfig& cfg, int64_t n_positions, const std::string& model, RunKind kind);

// The memory model's input (model/memory_plan.h) for one training step of `cfg` with the policy `model`, per
// device over `ranks` data-parallel ranks: the largest micro-batch the data can make (padded rows of max_length
// rounded up to pad_to_multiple_of; a layout's rows of max_tokens_per_row), the reference as the run keeps it, the
// attention state and the CUDA allowance of the run's device. `dpo plan` and the trainer's fit check share it.
MemoryPlanInput memory_plan_input(const TrainConfig& cfg, const GPT2Config& model, int64_t ranks);

// The effective configuration as YAML (written to <out_dir>/config.yaml) and as a key table for --help-config.
std::string to_yaml(const TrainConfig& cfg);
std::string config_help();

}  // namespace dpo
