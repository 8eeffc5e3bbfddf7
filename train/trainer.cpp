#include "train/trainer.h"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <array>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <map>
#include <set>
#include <tuple>
#include <sstream>

#include "kernels/seq_stats.h"
#include "model/checkpoint.h"
#include "model/hf_llama.h"
#include "runtime/blas_info.h"
#include "runtime/comm.h"
#include "runtime/kernel_trace.h"
#include "runtime/safetensors.h"
#include "train/data.h"
#include "train/hash.h"
#include "train/loss.h"
#include "train/metrics.h"
#include "train/optim.h"
#include "train/reference.h"
#include "train/run_control.h"
#include "train/tokenizer.h"
#include "train/tokenizer_json.h"

#ifdef DPO_HAVE_CUDA
#include "runtime/cuda/nvtx.h"
// One NVTX range per training phase, so Nsight Systems shows the structure of a step (kernels add their own).
#define DPO_PHASE(name) DPO_NVTX_RANGE(name)
#else
#define DPO_PHASE(name) \
  do {                  \
  } while (0)
#endif

namespace dpo {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// device: cuda takes the GPU numbered by the process's rank on its node (runtime/comm.h, node_local_rank).
// attn_implementation is a setting of the backend (Backend::set_attention_impl), made before any model exists.
std::unique_ptr<Backend> make_device_backend(const TrainConfig& c, Communicator& comm);
std::unique_ptr<Backend> make_backend(const TrainConfig& c, Communicator& comm) {
  auto be = make_device_backend(c, comm);
  if (c.attn_implementation == "flash") {
    try {
      be->set_attention_impl(AttentionImpl::Flash);
    } catch (const Error& e) {
      throw InputError(std::string("key 'attn_implementation': ") + e.what());
    }
  }
  return be;
}
std::unique_ptr<Backend> make_device_backend(const TrainConfig& c, Communicator& comm) {
  if (c.device == "cuda") {
#ifdef DPO_HAVE_CUDA
    try {
      return make_cuda_backend(node_local_rank(comm));
    } catch (const InputError&) {
      throw;
    } catch (const Error& e) {
      throw InputError(std::string("key 'device': cuda: ") + e.what());
    }
#else
    (void)comm;
    throw InputError("key 'device': this build has no CUDA backend (nvcc was not found at configure time); use "
                     "device: cpu");
#endif
  }
  return make_cpu_backend(static_cast<int>(c.num_threads));
}

// The run's tokenizer: the key `tokenizer`, or, when the key is not given, the model directory's tokenizer.json if
// it has one, else the byte tokenizer.
std::unique_ptr<Tokenizer> run_tokenizer(const TrainConfig& c) {
  if (!c.given.count("tokenizer") && c.tokenizer == "byte") {
    std::error_code ec;
    const fs::path next_to_model = fs::path(c.model) / "tokenizer.json";
    if (fs::is_regular_file(next_to_model, ec)) return make_tokenizer(next_to_model.string());
  }
  return make_tokenizer(c.tokenizer);
}

// The tokenizer files every saved checkpoint carries, so that it is a complete HF model directory: the run's
// tokenizer.json (the key `tokenizer`'s file, saved under that name, or the model directory's) and, when they sit
// beside it, tokenizer_config.json, special_tokens_map.json and chat_template.jinja (the chat template is in
// tokenizer_config.json or, as newer transformers save it, in chat_template.jinja). Read once, when the run
// starts: every checkpoint of a run holds the same bytes. Pairs (name in the checkpoint, bytes); none for the byte
// tokenizer without a tokenizer.json next to the model.
std::vector<std::pair<std::string, std::string>> checkpoint_tokenizer_files(const TrainConfig& c) {
  std::error_code ec;
  fs::path source;
  if (c.tokenizer != "byte") source = c.tokenizer;
  else if (!c.given.count("tokenizer") && fs::is_regular_file(fs::path(c.model) / "tokenizer.json", ec))
    source = fs::path(c.model) / "tokenizer.json";
  if (source.empty()) return {};
  auto slurp = [](const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    std::ostringstream s;
    s << f.rdbuf();
    if (!f || f.bad()) throw InputError(p.string() + ": cannot read (it is copied into every checkpoint)");
    return s.str();
  };
  std::vector<std::pair<std::string, std::string>> out = {{"tokenizer.json", slurp(source)}};
  for (const char* companion : {"tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}) {
    const fs::path p = source.parent_path() / companion;
    if (fs::is_regular_file(p, ec)) out.emplace_back(companion, slurp(p));
  }
  return out;
}

// The model's side of the data options: its vocab_size bounds every id, and its EOS (the key eos_token_id, else
// config.json's, else generation_config.json's; the first of a list) ends token-id records' completions and, for
// a tokenizer.json, text records' too. The byte tokenizer's text records keep its own EOS, 256. Padding slots hold
// the key pad_token_id, else the model's pad_token_id, else 0. Returns a line for the run log saying where the EOS
// (and a pad id other than the default) came from.
std::string bind_model_ids(const TrainConfig& c, const GPT2& model, const std::string& dir, Tokenizer& tok,
                           DataOptions& d) {
  const int64_t V = model.config().vocab_size;
  d.vocab_size = V;
  const SpecialTokenIds ids = special_token_ids(model.config(), dir);
  int64_t eos = c.eos_token_id;
  std::string from = "the key eos_token_id";
  if (eos < 0 && !ids.eos.empty()) {
    eos = ids.eos[0];
    from = (fs::path(dir) / ids.eos_source).string() + " eos_token_id";
    if (ids.eos.size() > 1) {
      from += " (the first of " + std::to_string(ids.eos.size()) + ": [";
      for (size_t i = 0; i < ids.eos.size(); ++i) from += (i ? ", " : "") + std::to_string(ids.eos[i]);
      from += "]; the key eos_token_id picks another)";
    }
  }
  if (eos >= V)
    throw InputError("key 'eos_token_id': " + std::to_string(eos) + " is outside the model's vocabulary [0, " +
                     std::to_string(V) + ")");
  if (auto* json_tok = dynamic_cast<JsonTokenizer*>(&tok)) {
    if (eos < 0)
      throw InputError("key 'eos_token_id': " + tok.name() + " does not say which token ends a sequence and " +
                       dir + "'s config.json and generation_config.json name no eos_token_id; set the key");
    if (eos >= json_tok->vocab_size())
      throw InputError("key 'eos_token_id': " + std::to_string(eos) + " is not a token of " + tok.name() +
                       " (vocabulary [0, " + std::to_string(json_tok->vocab_size()) + "))");
    json_tok->set_eos_id(static_cast<int32_t>(eos));
  }
  d.ids_eos_id = static_cast<int32_t>(eos);
  // Padding: the key pad_token_id, else the model's, else 0 (never scored: results do not depend on it).
  const int64_t pad = c.pad_token_id >= 0 ? c.pad_token_id : ids.pad >= 0 ? ids.pad : 0;
  if (pad >= V)
    throw InputError("key 'pad_token_id': " + std::to_string(pad) + " is outside the model's vocabulary [0, " +
                     std::to_string(V) + ")");
  d.pad_id = static_cast<int32_t>(pad);
  const std::string pad_note =
      c.pad_token_id >= 0 ? "; pad: " + std::to_string(pad) + " from the key pad_token_id"
      : ids.pad >= 0      ? "; pad: " + std::to_string(pad) + " from " + (fs::path(dir) / ids.pad_source).string()
                          : "";
  if (eos < 0) return "eos: " + std::to_string(tok.eos_id()) + " (the " + tok.name() + " tokenizer's)" + pad_note;
  std::string line = "eos: " + std::to_string(eos) + " from " + from;
  if (dynamic_cast<const ByteTokenizer*>(&tok) && eos != tok.eos_id())
    line += "; text records end with the byte tokenizer's " + std::to_string(tok.eos_id());
  return line + pad_note;
}

DataOptions data_options(const TrainConfig& config) {
  TrainConfig c = config;
  resolve_truncation(c);  // a configuration built in code may leave the truncation keys empty
  DataOptions d;
  d.max_length = c.max_length;
  d.rule = c.truncation == "legacy" ? TruncationRule::Legacy : TruncationRule::Trl1;
  d.max_prompt_length = c.max_prompt_length;
  d.truncation = c.truncation_mode == "keep_end" ? TruncationMode::KeepEnd : TruncationMode::KeepStart;
  d.skip_malformed = c.skip_malformed;
  d.append_eos = true;
  d.require_score_gap = c.odpo_alpha > 0;  // ODPO: score errors name file:line
  return d;
}

// The settings part of the reference-cache key: everything besides the weights and the data file's bytes that
// changes the reference log-probs. The tokens themselves are also hashed into the key (train/reference.h), so a
// tokenisation setting left out here would still change it; precision, device and the batch size (padding changes
// the float rounding) change the arithmetic only.
// The batch layout of the config (batch_layout, max_tokens_per_row; 0 = twice max_length).
BatchShape batch_shape(const TrainConfig& c) {
  BatchShape b;
  b.layout = parse_batch_layout(c.batch_layout);
  b.max_tokens_per_row = c.max_tokens_per_row > 0 ? c.max_tokens_per_row : 2 * c.max_length;
  b.ld_alpha = c.ld_alpha;  // also recorded in the reference cache's key (cached_ref_logps)
  return b;
}

std::string data_settings(const TrainConfig& c) {
  const DataOptions d = data_options(c);  // the resolved truncation settings
  std::ostringstream s;
  s << "tokenizer=" << c.tokenizer << ";max_length=" << c.max_length;
  // The legacy rule keeps the key of the runs made before the truncation key existed (their caches stay valid).
  if (d.rule == TruncationRule::Legacy)
    s << ";max_prompt_length=" << d.max_prompt_length
      << ";truncation=" << (d.truncation == TruncationMode::KeepEnd ? "keep_end" : "keep_start");
  else
    s << ";truncation_rule=trl1;truncation=keep_start";
  s << ";skip_malformed=" << c.skip_malformed << ";append_eos=1"
    << ";precision=" << c.precision << ";device=" << c.device << ";batch_pairs=" << c.per_device_eval_batch_size;
  // With skip_malformed, ODPO's score check changes which records are kept (keys without ODPO unchanged).
  if (c.odpo_alpha > 0 && c.skip_malformed) s << ";require_score_gap=1";
  // Another layout rounds the reference's log-probs differently (keys of padded runs unchanged).
  const BatchShape shape = batch_shape(c);
  if (shape.layout != BatchLayout::Padded)
    s << ";batch_layout=" << batch_layout_name(shape.layout) << ";max_tokens_per_row=" << shape.max_tokens_per_row;
  return s.str();
}

// The run log's line for records dropped by truncation: trl1 (TRL 1.x) drops a record whose prompt alone fills
// max_length; never silently.
std::string dropped_note(int64_t dropped, int64_t max_length) {
  return "dropped " + std::to_string(dropped) + ": prompt alone has >= max_length (" + std::to_string(max_length) +
         ") tokens, no completion token would be left (truncation: trl1, as TRL 1.x)";
}

// A model directory (policy, reference, evaluated checkpoint) verified against its checksums.json, then loaded.
std::unique_ptr<GPT2> load_verified_model(Backend& be, const std::string& dir, DType dtype) {
  verify_checkpoint(dir, CheckpointUse::Model);
  return load_gpt2_checkpoint(be, dir, dtype);
}

DType model_dtype(const TrainConfig& c) { return c.precision == "bf16" ? DType::BF16 : DType::F32; }

LossConfig loss_config(const TrainConfig& c) {
  LossConfig l;
  l.terms = make_loss_terms(c.loss_type, c.loss_weights);
  if (c.rpo_alpha > 0) l.terms.push_back({LossType::Sft, c.rpo_alpha});
  l.beta = c.beta;
  l.label_smoothing = c.label_smoothing;
  l.ipo_length_normalize = c.ipo_length_normalize;
  l.odpo_alpha = c.odpo_alpha;
  l.reference_free = c.reference_free;
  l.discopop_tau = c.discopop_tau;
  l.simpo_gamma = c.simpo_gamma;
  l.f_divergence = parse_f_divergence(c.f_divergence_type);
  l.f_alpha_divergence_coef = c.f_alpha_divergence_coef;
  l.use_weighting = c.use_weighting;
  l.validate();
  return l;
}

OptimConfig optim_config(const TrainConfig& c) {
  OptimConfig o;
  o.lr = c.learning_rate;
  o.beta1 = c.adam_beta1;
  o.beta2 = c.adam_beta2;
  o.eps = c.adam_epsilon;
  o.weight_decay = c.weight_decay;
  o.max_grad_norm = c.max_grad_norm;
  o.warmup_steps = c.warmup_steps;
  o.schedule = parse_lr_schedule(c.lr_scheduler_type);
  o.validate();
  return o;
}

// Token ids are checked against the model's vocab_size where the data is loaded (DataOptions::vocab_size, set by
// bind_model_ids), so that token-id records may use every id of the model whatever the tokenizer's vocabulary.
// `ids_bound`: the data's ids lie below it (the policy's vocab_size), so a reference model must embed them all.
void check_fits(const TrainConfig& c, const GPT2& model, const std::string& which, int64_t ids_bound) {
  if (model.config().vocab_size < ids_bound)
    throw InputError(which + ": vocab_size " + std::to_string(model.config().vocab_size) +
                     " is smaller than the policy's " + std::to_string(ids_bound) + ", whose ids the data may hold");
  if (c.max_length > model.config().max_seq_len)
    throw InputError("key 'max_length': " + std::to_string(c.max_length) + " exceeds the model's n_positions (" +
                     std::to_string(model.config().max_seq_len) + ")");
}

// Keys that may differ between a run and the run it resumes (they do not change the computed weights).
// zero_stage only changes where the moments live (checkpoints always hold all of them).
const std::set<std::string> kResumeFreeKeys = {"out_dir",       "num_threads", "logging_steps", "eval_steps",
                                               "save_steps",    "save_total_limit", "ref_cache_dir", "eval_file",
                                               "per_device_eval_batch_size", "zero_stage", "profile_steps",
                                               "max_consecutive_skipped_steps", "gradient_checkpointing",
                                               "gradient_checkpointing_interval", "max_shard_size"};

void check_resume_config(const std::string& saved_yaml, const TrainConfig& now, const std::string& where) {
  YAML::Node a = YAML::Load(saved_yaml), b = YAML::Load(to_yaml(now));
  // Checkpoints written before the truncation key existed all used the legacy rule (recorded in their
  // max_prompt_length and truncation_mode).
  if (!a["truncation"]) a["truncation"] = "legacy";
  // Checkpoints written before the f-divergence, DiscoPOP, SimPO and TR-DPO keys existed ran with their defaults.
  const YAML::Node defaults = YAML::Load(to_yaml(TrainConfig{}));
  // pad_token_id: also absent from checkpoints written before it existed (they padded with 0).
  for (const char* k : {"discopop_tau", "simpo_gamma", "f_divergence_type", "f_alpha_divergence_coef",
                        "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "pad_token_id"})
    if (!a[k]) a[k] = defaults[k];
  std::vector<std::string> diff;
  for (auto it = b.begin(); it != b.end(); ++it) {
    const std::string k = it->first.as<std::string>();
    if (kResumeFreeKeys.count(k)) continue;
    YAML::Emitter ea, eb;
    ea << YAML::Flow << a[k];
    eb << YAML::Flow << it->second;
    if (std::string(ea.c_str()) != std::string(eb.c_str()))
      diff.push_back(k + " (checkpoint: " + ea.c_str() + ", now: " + eb.c_str() + ")");
  }
  if (!diff.empty()) {
    std::string m = where + ": cannot resume with a different configuration:";
    for (const auto& d : diff) m += "\n  " + d;
    throw InputError(m);
  }
}

// trainer_state.json's format; the files' SHA-256 are in checksums.json (train/hash.h), which covers it too.
constexpr const char* kCheckpointFormat = "dpo-checkpoint-2";

struct Position {
  int64_t step = 0;      // optimizer steps done
  int64_t epoch = 0;     // current epoch
  int64_t pos = 0;       // next index into this epoch's order
  // TRL's num_tokens: the real (non-padding) tokens of every training sequence seen so far, all ranks (a pair's
  // prompt counts in both of its rows); -1 after loading a checkpoint that did not record it (then recounted).
  int64_t num_tokens = 0;
  json cpu_kernels;      // read from a checkpoint: the kernel set that wrote it (null: a GPU run, or older)
};

// The live reference's weights in a checkpoint once TR-DPO (sync_ref_model) has updated it: part of the training
// state, in model.safetensors' format (HF names, F32; a BF16 reference's values are exact in F32).
constexpr const char* kRefModelFile = "ref_model.safetensors";

// m, v: all of the moments (host F32, [n_params]), gathered from the ranks' shards under ZeRO-1; weights: all of
// the master weights (host) when the model's are sharded, else undefined (taken from the model); ref_weights:
// the synced reference's weights (host, [n_params]), else undefined (no kRefModelFile).
void write_checkpoint(const std::string& out_dir, const GPT2& model, const AdamW& opt, const Tensor& m,
                      const Tensor& v, const Tensor& weights, const Position& p, const std::string& config_yaml,
                      const std::string& train_sha256, int64_t save_total_limit, const json& cpu_kernels,
                      int64_t max_shard_bytes,
                      const std::vector<std::pair<std::string, std::string>>& tokenizer_files,
                      const Tensor& ref_weights) {
  const fs::path root = fs::path(out_dir) / "checkpoints";
  const std::string name = "step-" + std::to_string(p.step);
  const fs::path final_dir = root / name;
  const fs::path tmp = root / ("." + name + ".tmp-" + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  // A write that fails (a full disk, ...) removes its staging directory before the error goes on.
  struct RemoveOnFailure {
    fs::path dir;
    bool armed = true;
    ~RemoveOnFailure() {
      std::error_code e;
      if (armed) fs::remove_all(dir, e);
    }
  } staging{tmp};
  fs::create_directories(tmp, ec);
  if (ec) throw Error("cannot create " + tmp.string() + ": " + ec.message());
  std::vector<std::string> files = weights.defined()
                                       ? save_gpt2_checkpoint(model, tmp.string(), weights, max_shard_bytes)
                                       : save_gpt2_checkpoint(model, tmp.string(), max_shard_bytes);
  for (const auto& [file, bytes] : tokenizer_files) {
    write_file_atomic((tmp / file).string(), bytes);
    files.push_back(file);
  }
  save_safetensors((tmp / "optimizer.safetensors").string(), {{"exp_avg", m}, {"exp_avg_sq", v}},
                   {{"optimizer", "adamw"}, {"step", std::to_string(opt.step_count())}});
  json st = {{"step", p.step},
             {"epoch", p.epoch},
             {"position", p.pos},
             {"optimizer_step", opt.step_count()},
             {"num_tokens", p.num_tokens},
             {"train_file_sha256", train_sha256},
             {"config", config_yaml},
             {"format", kCheckpointFormat}};
  if (!cpu_kernels.is_null()) st["cpu_kernels"] = cpu_kernels;  // optional: CPU runs only
  write_file_atomic((tmp / "trainer_state.json").string(), st.dump(2) + "\n");
  files.insert(files.end(), {"optimizer.safetensors", "trainer_state.json"});  // beside the model's and tokenizer's
  if (ref_weights.defined()) {
    // One file whatever max_shard_size says (save_safetensors_dir's names are the model's own), with the tensors
    // the model's weights have: HF names and layouts of either architecture, which load_gpt2_weights reads back.
    const Tensor rw = convert_host(ref_weights.reshape({ref_weights.numel()}), DType::F32, kRefModelFile);
    save_safetensors((tmp / kRefModelFile).string(), hf_weight_tensors(model, rw), {{"format", "pt"}});
    files.push_back(kRefModelFile);
  }
  write_checksums(tmp.string(), files);
  if (fs::exists(final_dir)) fs::remove_all(final_dir);
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error("cannot rename " + tmp.string() + " to " + final_dir.string() + ": " + ec.message());
  staging.armed = false;
  write_file_atomic((root / "latest").string(), name + "\n");
  if (save_total_limit > 0) {
    std::vector<std::pair<int64_t, fs::path>> steps;
    for (const auto& e : fs::directory_iterator(root)) {
      const std::string n = e.path().filename().string();
      if (e.is_directory() && n.rfind("step-", 0) == 0) steps.emplace_back(std::stoll(n.substr(5)), e.path());
    }
    std::sort(steps.begin(), steps.end());
    for (size_t i = 0; i + static_cast<size_t>(save_total_limit) < steps.size(); ++i) fs::remove_all(steps[i].second);
  }
}

std::string resolve_resume(const std::string& resume, const std::string& out_dir) {
  if (resume != "latest") return resume;
  const fs::path latest = fs::path(out_dir) / "checkpoints" / "latest";
  std::ifstream f(latest);
  std::string name;
  if (!f || !(f >> name)) throw InputError(latest.string() + ": no checkpoint to resume from");
  return (fs::path(out_dir) / "checkpoints" / name).string();
}

// Verifies every file against checksums.json and the training data against the hash the checkpoint recorded,
// loads weights and optimizer state; returns the position.
Position load_checkpoint(const std::string& dir, GPT2& model, AdamW& opt, const TrainConfig& cfg,
                         const std::string& train_sha256) {
  verify_checkpoint(dir, CheckpointUse::Resume);  // false (no checksums.json) fails below: no trainer_state.json
  const std::string state_path = (fs::path(dir) / "trainer_state.json").string();
  std::ifstream f(state_path);
  if (!f) throw InputError(state_path + ": cannot open (not a training checkpoint?)");
  json st;
  try {
    st = json::parse(f);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    throw InputError(state_path + ": not valid JSON: " + e.what());
  }
  if (!st.is_object() || !st.contains("format") || st["format"] != kCheckpointFormat)
    throw InputError(state_path + ": not a \"" + std::string(kCheckpointFormat) + "\" trainer state");
  for (const char* k : {"step", "epoch", "position", "optimizer_step", "train_file_sha256", "config"})
    if (!st.contains(k)) throw InputError(state_path + ": missing field '" + k + "'");
  check_resume_config(st["config"].get<std::string>(), cfg, state_path);
  if (st["train_file_sha256"] != train_sha256)
    throw InputError(cfg.train_file + ": contents changed since the checkpoint " + dir +
                     " was written (its SHA-256 differs from the one in trainer_state.json); resuming would continue "
                     "on other data. Restore the file, or start a new run from the checkpoint's weights with "
                     "model=" + dir);
  load_gpt2_weights(model, dir);  // either form of the weights
  SafetensorsFile of((fs::path(dir) / "optimizer.safetensors").string());
  Backend& be = model.backend();
  Tensor m = of.read_as("exp_avg", DType::F32), v = of.read_as("exp_avg_sq", DType::F32);
  const int64_t n = model.params().numel();
  if (m.numel() != n || v.numel() != n)
    throw InputError(of.path() + ": optimizer state size does not match the model");
  // This rank's range of the moments (all of them without ZeRO-1).
  const int64_t b = opt.shard_begin(), len = opt.shard_end() - opt.shard_begin();
  be.copy_from_host(opt.m(), m.reshape({n}).view(b, {len}));
  be.copy_from_host(opt.v(), v.reshape({n}).view(b, {len}));
  opt.set_step(st["optimizer_step"].get<int64_t>());
  Position p;
  p.step = st["step"].get<int64_t>();
  p.epoch = st["epoch"].get<int64_t>();
  p.pos = st["position"].get<int64_t>();
  p.num_tokens = st.contains("num_tokens") && st["num_tokens"].is_number_integer() ? st["num_tokens"].get<int64_t>()
                                                                                  : -1;
  if (st.contains("cpu_kernels") && st["cpu_kernels"].is_object()) p.cpu_kernels = st["cpu_kernels"];
  return p;
}

// TR-DPO on resume: loads the checkpoint's synced reference (kRefModelFile, verified with the rest of the
// checkpoint) into `ref`; returns whether it had one. A checkpoint at or past the first sync
// (ref_model_sync_steps) must have one.
bool load_synced_reference(const std::string& dir, GPT2& ref, const TrainConfig& cfg, int64_t step) {
  const fs::path path = fs::path(dir) / kRefModelFile;
  if (!fs::exists(path)) {
    if (step >= cfg.ref_model_sync_steps)
      throw InputError(path.string() + ": missing: the checkpoint is at step " + std::to_string(step) +
                       ", after the reference's first sync (sync_ref_model, ref_model_sync_steps " +
                       std::to_string(cfg.ref_model_sync_steps) + "), so the reference it trained against is part "
                       "of its state");
    return false;
  }
  load_gpt2_weights(ref, path.string());
  return true;
}

// num_tokens at position p, recounted from the data (for a checkpoint that did not record it): every epoch before
// p.epoch saw each item once, and p.epoch the first p.pos items of its order. item_tokens[i]: item i's tokens.
int64_t count_tokens_before(const std::vector<int64_t>& item_tokens, uint64_t seed, const Position& p) {
  int64_t all = 0;
  for (int64_t t : item_tokens) all += t;
  const int64_t n = static_cast<int64_t>(item_tokens.size());
  const std::vector<int64_t> order = epoch_order(n, seed, p.epoch);
  int64_t sum = p.epoch * all;
  for (int64_t i = 0; i < std::min(p.pos, n); ++i) sum += item_tokens[static_cast<size_t>(order[i])];
  return sum;
}

// TRL's num_tokens of a training checkpoint (its trainer_state.json), or -1 when it has none (an HF model
// directory, dpo init, a checkpoint that predates the field). Read after the checkpoint was verified.
int64_t checkpoint_num_tokens(const std::string& dir) {
  std::ifstream f(fs::path(dir) / "trainer_state.json");
  if (!f) return -1;
  const json st = json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (!st.is_object() || !st.contains("num_tokens") || !st["num_tokens"].is_number_integer()) return -1;
  return st["num_tokens"].get<int64_t>();
}

// Drops metrics records logged after `step` (they belong to the interrupted run's future), atomically.
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream f(path);
  if (!f) return;
  std::string line, kept;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    try {
      json j = json::parse(line);
      if (j.contains("step") && j["step"].get<int64_t>() > step) continue;
    } catch (const json::exception&) {
      continue;  // a line cut by a crash
    }
    kept += line + "\n";
  }
  write_file_atomic(path, kept);
}

// Sums of per-pair quantities over a logging window. lgc / lgr: the mean logit over the vocabulary, summed over
// the chosen / rejected completion tokens; tc / tr: those tokens (TRL's logits/* is their ratio).
struct Window {
  double pairs = 0, loss = 0, rc = 0, rr = 0, acc = 0, margin = 0, lpc = 0, lpr = 0, tokens = 0, lgc = 0, lgr = 0,
         tc = 0, tr = 0, seconds = 0;
  static constexpr int64_t kSums = 13;  // the fields that are summed over ranks (not seconds: rank 0's clock)
  Tensor sums() const {
    Tensor t = Tensor::host({kSums}, DType::F64);
    const std::array<double, kSums> v = {pairs, loss, rc, rr, acc, margin, lpc, lpr, tokens, lgc, lgr, tc, tr};
    std::copy(v.begin(), v.end(), t.data<double>());
    return t;
  }
  void set_sums(const Tensor& t) {
    const double* v = t.data<double>();
    pairs = v[0], loss = v[1], rc = v[2], rr = v[3], acc = v[4], margin = v[5], lpc = v[6], lpr = v[7], tokens = v[8];
    lgc = v[9], lgr = v[10], tc = v[11], tr = v[12];
  }
  // A preference batch of P pairs from its PairSum row (kernels/pair_loss.h; Backend::preference_loss), for
  // vocabulary size V.
  void add_pair_sums(const double* s, int64_t P, int64_t V) {
    pairs += static_cast<double>(P);
    loss += s[kSumLoss];
    rc += s[kSumRewardChosen];
    rr += s[kSumRewardRejected];
    acc += s[kSumAccuracy];
    margin += s[kSumMargin];
    lpc += s[kSumLogpChosen];
    lpr += s[kSumLogpRejected];
    lgc += s[kSumLogitChosen] / static_cast<double>(V);
    lgr += s[kSumLogitRejected] / static_cast<double>(V);
    tc += s[kSumTokensChosen];
    tr += s[kSumTokensRejected];
  }
  std::map<std::string, double> dpo_metrics(const std::string& prefix) const {
    const double n = std::max(pairs, 1.0);
    // TRL: 0 when there is no completion token (never the case with the data loaders' checks).
    auto per_token = [](double sum, double count) { return count > 0 ? sum / count : 0.0; };
    return {{prefix + "loss", loss / n},           {prefix + "rewards/chosen", rc / n},
            {prefix + "rewards/rejected", rr / n}, {prefix + "rewards/accuracies", acc / n},
            {prefix + "rewards/margins", margin / n}, {prefix + "logps/chosen", lpc / n},
            {prefix + "logps/rejected", lpr / n}, {prefix + "logits/chosen", per_token(lgc, tc)},
            {prefix + "logits/rejected", per_token(lgr, tr)}};
  }
};

// w += every rank's per-micro-batch sums, folded in global micro-batch order (rank order, then each rank's order):
// the same additions in the same order as one process doing every micro-batch, whatever the rank count.
void fold_window(Communicator& comm, Window& w, const std::vector<Window>& chunks) {
  Tensor acc = w.sums();
  std::vector<Tensor> terms;
  terms.reserve(chunks.size());
  for (const Window& c : chunks) terms.push_back(c.sums());
  comm.ordered_fold(acc, terms);
  w.set_sums(acc);
}

// fold_window for a training step, which also agrees on a stop: every rank adds its stop request (`signal`, 0 for
// none) in two extra elements of the same fold (counts of SIGINT and of other stop signals), so every rank sees
// the same requests after the same step. Returns the stop signal all ranks act on (SIGTERM if any rank got one,
// else SIGINT, else 0). The metrics' sums are unchanged: their elements fold exactly as in fold_window (the
// request's term adds +0.0 to them, an identity on these sums, which start at +0.0).
int fold_window_and_stop(Communicator& comm, Window& w, const std::vector<Window>& chunks, int signal) {
  constexpr int64_t k = Window::kSums;
  auto widen = [](const Tensor& t) {
    Tensor x = Tensor::host({k + 2}, DType::F64);
    std::fill(x.data<double>(), x.data<double>() + k + 2, 0.0);
    std::copy(t.data<double>(), t.data<double>() + k, x.data<double>());
    return x;
  };
  Tensor acc = widen(w.sums());
  std::vector<Tensor> terms;
  terms.reserve(chunks.size() + 1);
  for (const Window& c : chunks) terms.push_back(widen(c.sums()));
  if (signal != 0) {
    Tensor r = widen(Window{}.sums());
    r.data<double>()[signal == SIGINT ? k : k + 1] = 1.0;
    terms.push_back(r);
  }
  comm.ordered_fold(acc, terms);
  Tensor sums = Tensor::host({k}, DType::F64);
  std::copy(acc.data<double>(), acc.data<double>() + k, sums.data<double>());
  w.set_sums(sums);
  const double n_int = acc.data<double>()[k], n_other = acc.data<double>()[k + 1];
  return n_other > 0 ? SIGTERM : n_int > 0 ? SIGINT : 0;
}

// Contiguous shard [first, second) of n items for `rank` of `size`; the first n % size ranks get one more.
std::pair<int64_t, int64_t> shard(int64_t n, int size, int rank) {
  const int64_t base = n / size, extra = n % size, r = rank;
  const int64_t b = r * base + std::min(r, extra);
  return {b, b + base + (r < extra ? 1 : 0)};
}

// Rank 0's values, broadcast (a sum where the other ranks contribute zeros), must equal every rank's own values.
void check_same_on_all_ranks(Communicator& comm, const std::vector<double>& v, const std::string& what) {
  if (comm.size() == 1) return;
  std::vector<double> b(v.size(), 0.0);
  if (comm.rank() == 0) b = v;
  comm.allreduce_sum(b.data(), static_cast<int64_t>(b.size()));
  double bad = b == v ? 0.0 : 1.0;
  comm.allreduce_sum(&bad, 1);
  if (bad > 0)
    throw InputError(what + " differ between the ranks (every rank must see the same files and configuration)");
}

// Test hook (tests/test_mpi_failure.cpp): DPO_TEST_FAIL_RANK / DPO_TEST_FAIL_STEP / DPO_TEST_FAIL_MODE.
void test_fail_hook(int rank, int64_t step) {
  const char* r = std::getenv("DPO_TEST_FAIL_RANK");
  const char* s = std::getenv("DPO_TEST_FAIL_STEP");
  if (!r || !s || std::atoi(r) != rank || std::atoll(s) != step) return;
  const char* m = std::getenv("DPO_TEST_FAIL_MODE");
  if (m && std::string(m) == "kill") std::raise(SIGKILL);
  if (m && std::string(m) == "sigterm") {  // a stop request on this rank only; the step goes on
    std::raise(SIGTERM);
    return;
  }
  if (m && std::string(m) == "stop") {  // this rank stops responding (until SIGCONT or SIGKILL)
    std::raise(SIGSTOP);
    return;
  }
  throw Error("DPO_TEST_FAIL_RANK=" + std::string(r) + " DPO_TEST_FAIL_STEP=" + s +
              ": test hook failure on rank " + std::to_string(rank) + " in step " + std::to_string(step));
}

// The policy's training pass over one batch: the fused forward (chunked LM head; `grad` turns each chunk's
// log-probs into dL/dlog-prob, see GPT2::LossHead), then the rest of the backward. Returns the log-probs, and in
// `stats` (when non-null) the per-sequence statistics of the same pass.
std::vector<double> policy_train_pass(GPT2& m, const Batch& b, int64_t pair_stride,
                                      const decltype(GPT2::LossHead::grad)& grad,
                                      std::vector<double>* stats = nullptr) {
  Backend& be = m.backend();
  GPT2::LossHead head;
  head.pair_stride = pair_stride;
  head.grad = grad;
  head.host_weights = b.weights;  // the LM head's scored slots (HeadRows::Scored)
  std::vector<double> lp;
  {
    DPO_PHASE("forward + log-probs + LM-head backward");
    lp = m.fused_forward(to_backend(be, b.tokens), to_backend(be, b.keymask), to_backend(be, b.targets),
                         to_backend(be, b.weights), head, stats);
  }
  {
    DPO_PHASE("backward");
    m.fused_backward();
  }
  return lp;
}

// The reference's summed log-probs of batch b's rows on the backend's device ([2P] in the policy's per-sequence
// dtype `gd`): the cached values of its pairs (idx) uploaded, or a forward pass of the live reference model. An
// undefined tensor when the loss uses no reference.
// The order of a batch's per-sequence arrays (kernels/pair_loss.h PairRows).
PairRows pair_rows_of(const Batch& b) {
  return b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
}

// The cached reference log-probs of batch b's pairs as a host tensor [2P] of dtype gd, in the batch's order.
Tensor cached_ref_logps_host(DType gd, const Batch& b, const RefLogps& cached) {
  const int64_t P = b.pairs;
  const std::vector<int64_t>& idx = b.indices;  // the batch's pair order (packing may reorder the pairs)
  Tensor h = Tensor::host({2 * P}, gd);
  const PairRows rows = pair_rows_of(b);
  for (int64_t q = 0; q < P; ++q) {
    const double c = cached.chosen[static_cast<size_t>(idx[static_cast<size_t>(q)])];
    const double r = cached.rejected[static_cast<size_t>(idx[static_cast<size_t>(q)])];
    const int64_t ic = pair_row(rows, P, q, 0), ir = pair_row(rows, P, q, 1);
    if (gd == DType::F64) h.data<double>()[ic] = c, h.data<double>()[ir] = r;
    else h.data<float>()[ic] = static_cast<float>(c), h.data<float>()[ir] = static_cast<float>(r);
  }
  return h;
}

Tensor ref_logps_on_device(Backend& be, DType gd, const Batch& b, const RefLogps* cached, GPT2* live) {
  const int64_t P = b.pairs;
  if (cached) return to_backend(be, cached_ref_logps_host(gd, b, *cached));
  if (!live) return Tensor();
  DPO_ASSERT(grad_dtype(live->dtype()) == gd, "the reference model's dtype differs from the policy's");
  DPO_PHASE("forward + log-probs");
  Tensor seq = be.empty({2 * P}, gd);
  const LayoutScope scope(*live, b);
  live->score(to_backend(be, b.tokens), to_backend(be, b.keymask), to_backend(be, b.targets),
              to_backend(be, b.weights), seq, Tensor(), b.weights);
  return seq;
}

// ODPO's offsets of batch b's pairs as a host tensor ([P], dtype gd), or an undefined tensor when odpo_alpha is 0.
// The scores were checked when the data was loaded (score_chosen > score_rejected, DataOptions::require_score_gap).
Tensor odpo_offsets_host(DType gd, const Batch& b, const LossConfig& lc) {
  if (!(lc.odpo_alpha > 0)) return Tensor();
  DPO_ASSERT(b.has_scores, "ODPO (odpo_alpha > 0) needs per-pair scores; the data loaders refuse records without");
  Tensor h = Tensor::host({b.pairs}, gd);
  for (int64_t q = 0; q < b.pairs; ++q) {
    const double sc = b.score_chosen[static_cast<size_t>(q)], sr = b.score_rejected[static_cast<size_t>(q)];
    DPO_ASSERT(sc > sr, "ODPO needs score_chosen > score_rejected; the data loaders refuse such records");
    const double o = odpo_offset(lc.odpo_alpha, sc, sr);
    if (gd == DType::F64) h.data<double>()[q] = o;
    else h.data<float>()[q] = static_cast<float>(o);
  }
  return h;
}

// The same on the device.
Tensor odpo_offsets_on_device(Backend& be, DType gd, const Batch& b, const LossConfig& lc) {
  const Tensor h = odpo_offsets_host(gd, b, lc);
  return h.defined() ? to_backend(be, h) : Tensor();
}

// The loss of a micro-batch whose loss has batch terms (aot, aot_unpaired: train/loss.h batch_loss), on the host:
// each pair's inputs from the policy's per-sequence statistics `stats` [2P, kSeqStatsWidth] and the reference's
// log-probs `ref` [2P] (undefined: reference-free), in b's row order, and b's scores. Returns the PairSum row
// (kernels/pair_loss.h), as the device loss would add it up; with dseq non-null, sets it to the gradient w.r.t.
// the policy's log-probs (divided by `normalizer`), [2P] in b's row order.
std::vector<double> host_batch_loss(Backend& be, const Tensor& stats, const Tensor& ref, const Batch& b,
                                    const LossConfig& lc, double normalizer, std::vector<double>* dseq) {
  const int64_t P = b.pairs;
  const PairRows rows = pair_rows_of(b);
  const std::vector<double> st = to_host_f64(be, stats);
  const std::vector<double> rf = ref.defined() ? to_host_f64(be, ref) : std::vector<double>(2 * P, 0.0);
  std::vector<PairInput> in(static_cast<size_t>(P));
  std::vector<double> logit_sums(static_cast<size_t>(2 * P));
  for (int64_t q = 0; q < P; ++q) {
    const auto ic = static_cast<size_t>(pair_row(rows, P, q, 0)), ir = static_cast<size_t>(pair_row(rows, P, q, 1));
    PairInput& x = in[static_cast<size_t>(q)];
    x.policy_chosen = st[ic * kSeqStatsWidth + kSeqLogp];
    x.policy_rejected = st[ir * kSeqStatsWidth + kSeqLogp];
    x.len_chosen = static_cast<int64_t>(st[ic * kSeqStatsWidth + kSeqTokens]);
    x.len_rejected = static_cast<int64_t>(st[ir * kSeqStatsWidth + kSeqTokens]);
    x.ref_chosen = rf[ic];
    x.ref_rejected = rf[ir];
    x.wpo_chosen = st[ic * kSeqStatsWidth + kSeqWpoLogp];
    x.wpo_rejected = st[ir * kSeqStatsWidth + kSeqWpoLogp];
    x.has_scores = b.has_scores;
    if (b.has_scores) {
      x.score_chosen = b.score_chosen[static_cast<size_t>(q)];
      x.score_rejected = b.score_rejected[static_cast<size_t>(q)];
    }
    logit_sums[static_cast<size_t>(q)] = st[ic * kSeqStatsWidth + kSeqLogitSum];
    logit_sums[static_cast<size_t>(P + q)] = st[ir * kSeqStatsWidth + kSeqLogitSum];
  }
  const BatchLoss bl = batch_loss(lc, in, normalizer);
  if (dseq) {
    dseq->assign(static_cast<size_t>(2 * P), 0.0);
    for (int64_t q = 0; q < P; ++q) {
      (*dseq)[static_cast<size_t>(pair_row(rows, P, q, 0))] = bl.d_policy_chosen[static_cast<size_t>(q)];
      (*dseq)[static_cast<size_t>(pair_row(rows, P, q, 1))] = bl.d_policy_rejected[static_cast<size_t>(q)];
    }
  }
  return pair_sums_row(bl, in, logit_sums);
}

// Batches of batch_pairs pairs, contiguous runs of batches per rank; sums folded in batch order. num_tokens: the
// training tokens so far, reported as eval_num_tokens (TRL); < 0 leaves it out.
std::map<std::string, double> evaluate(Communicator& comm, GPT2& policy, GPT2* live_ref, const RefLogps* cached,
                                       const std::vector<PreferencePair>& data, const LossConfig& lc,
                                       int64_t batch_pairs, int64_t num_tokens, const BatchShape& shape) {
  const int64_t n = static_cast<int64_t>(data.size());
  const auto [c0, c1] = shard((n + batch_pairs - 1) / batch_pairs, comm.size(), comm.rank());
  std::vector<Window> chunks;
  for (int64_t c = c0; c < c1; ++c) {
    std::vector<int64_t> idx;
    for (int64_t i = c * batch_pairs; i < std::min(n, (c + 1) * batch_pairs); ++i) idx.push_back(i);
    const DType gd = grad_dtype(policy.dtype());
    Batch b = shape.make(data, idx, gd);
    Backend& be = policy.backend();
    const int64_t P = b.pairs;
    const Tensor ref = ref_logps_on_device(be, gd, b, cached, live_ref);
    Tensor seq = be.empty({2 * P}, gd), stats = be.empty({2 * P, kSeqStatsWidth}, gd);
    {
      DPO_PHASE("forward + log-probs");
      const LayoutScope scope(policy, b);
      policy.score(to_backend(be, b.tokens), to_backend(be, b.keymask), to_backend(be, b.targets),
                   to_backend(be, b.weights), seq, stats, b.weights);
    }
    std::vector<double> s;
    if (has_batch_terms(lc)) {  // aot, aot_unpaired: over the whole eval batch, on the host
      s = host_batch_loss(be, stats, ref, b, lc, 1.0, nullptr);
    } else {
      Tensor dseq = be.empty({2 * P}, gd), sums = be.empty({kPairSumsWidth}, DType::F64);
      PairLossParams params = pair_loss_params(lc);
      params.rows = pair_rows_of(b);
      be.preference_loss(Backend::PairLossOutputs{dseq, Tensor(), sums}, stats, ref,
                         odpo_offsets_on_device(be, gd, b, lc), params, 1.0);
      s = to_host_f64(be, sums);
    }
    Window cw;
    cw.add_pair_sums(s.data(), P, policy.config().vocab_size);
    chunks.push_back(cw);
  }
  Window w;
  fold_window(comm, w, chunks);
  auto m = w.dpo_metrics("eval_");
  if (num_tokens >= 0) m["eval_num_tokens"] = static_cast<double>(num_tokens);
  return m;
}

std::string fmt(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.4g", v);
  return b;
}

// The fit check before training (TrainConfig::device_memory, allow_memory_overcommit; docs/training.md,
// "Memory"): the memory model's total per device against device_memory when given, else the device's free memory
// plus what this backend's tensors already hold (CUDA; the CPU backend reports none: no check). Every rank
// checks its own device and all stop when one does not fit (each would otherwise wait for the others).
void check_memory_fit(const TrainConfig& cfg, Backend& be, Communicator& comm) {
  int64_t available = -1;
  std::string source;
  if (!cfg.device_memory.empty()) {
    available = parse_bytes(cfg.device_memory, "key 'device_memory'");
    source = "key 'device_memory'";
  } else {
    const Backend::MemoryInfo mi = be.memory_info();
    if (mi.free >= 0) {
      available = mi.free + std::max<int64_t>(mi.live, 0);
      source = "the free memory of " + be.device().str() + " (cudaMemGetInfo)";
    }
  }
  std::string why;
  if (available >= 0) {
    const GPT2Config model = load_gpt2_config((fs::path(cfg.model) / "config.json").string());
    why = memory_fit_error(plan_memory(memory_plan_input(cfg, model, comm.size())), available, source,
                           "allow_memory_overcommit: true starts the run anyway");
  }
  if (cfg.allow_memory_overcommit) return;
  double bad = why.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(&bad, 1);
  if (!why.empty()) throw InputError("memory fit check: " + why);
  if (bad > 0)
    throw InputError("the memory model says another rank's training step does not fit its device (see its "
                     "message); allow_memory_overcommit: true starts the run anyway");
}

}  // namespace

RunSummary run_training(const TrainConfig& cfg, RunKind kind, const RunOptions& ro) {
  const auto t0 = std::chrono::steady_clock::now();
  validate(cfg, kind);
  std::unique_ptr<Communicator> own_comm;
  if (!ro.comm) own_comm = make_communicator();
  // selects this rank's GPU first (device: cuda)
  std::unique_ptr<Backend> inner_be = make_backend(cfg, ro.comm ? *ro.comm : *own_comm);
  std::unique_ptr<Backend> be = ro.wrap_backend ? ro.wrap_backend(*inner_be) : nullptr;  // (tests)
  if (!be) be = std::move(inner_be);
  // Device tensors (gradients, ZeRO-1 gathers) go through NCCL on a GPU with several ranks (or DPO_FORCE_NCCL=1);
  // host data (metrics) through the host communicator it wraps.
  if (own_comm && be->device().kind == DeviceKind::CUDA) {
    DeviceCommOptions dco;
    dco.cuda_stream = be->native_stream();
    own_comm = make_device_communicator(std::move(own_comm), be->device(), dco);
  }
  Communicator& comm = ro.comm ? *ro.comm : *own_comm;
  const int n_ranks = comm.size(), me = comm.rank();
  const bool lead = me == 0;  // rank 0 alone writes out_dir and prints
  auto tok = run_tokenizer(cfg);
  DataOptions dopt = data_options(cfg);
  const int64_t max_shard_bytes = parse_shard_size(cfg.max_shard_size, "key 'max_shard_size'");
  const auto tokenizer_files =
      lead ? checkpoint_tokenizer_files(cfg) : std::vector<std::pair<std::string, std::string>>{};
  std::unique_ptr<Progress> progress;
  auto say = [&](const std::string& s) {
    if (ro.quiet || !lead) return;
    if (progress) progress->message(s);
    else std::fprintf(stderr, "%s\n", s.c_str());
  };

  std::error_code ec;
  // SIGINT/SIGTERM from here on: finish the step, checkpoint, stop (docs/training.md, "How a run stops").
  StopSignals stop_signals;
  StopSignals::clear();
  // One writer per out_dir: rank 0 (the only rank that writes it) holds its lock from before the first write to
  // the end of the run, then removes what killed writers of earlier runs left behind. An out_dir that exists (a
  // resume, a rerun) is locked now, before its checkpoints are read; a new one is created and locked only once
  // every input has been loaded and checked (below), so that a run stopped by bad input leaves no empty out_dir.
  std::unique_ptr<OutDirLock> out_lock;
  auto lock_out_dir = [&] {
    out_lock = std::make_unique<OutDirLock>(cfg.out_dir);
    for (const std::string& f : remove_stale_temporaries(cfg.out_dir))
      say("removed a temporary file of an interrupted earlier run: " + f);
  };
  if (lead && fs::is_directory(cfg.out_dir)) lock_out_dir();
  // A finished or interrupted run is never overwritten by accident: continuing it needs --resume.
  if (ro.resume.empty() && fs::exists(fs::path(cfg.out_dir) / "checkpoints" / "latest"))
    throw InputError("key 'out_dir': " + cfg.out_dir +
                     " already holds checkpoints of a run; pass --resume latest to continue it, or choose another "
                     "out_dir");
  const std::string config_yaml = to_yaml(cfg);
  // The CPU backend's GEMM kernels (runtime/blas_info.h): in the log's header and every checkpoint's trainer state.
  const KernelSet kernels = current_kernel_set();
  const bool on_cpu = be->device().kind == DeviceKind::CPU;
  const json cpu_kernels = on_cpu ? kernels.to_json() : json();
  if (on_cpu) say("cpu kernels: " + kernels.summary());

  if (kind == RunKind::Dpo) check_memory_fit(cfg, *be, comm);  // before any model is loaded
  auto policy = load_verified_model(*be, cfg.model, model_dtype(cfg));
  say("tokenizer: " + tok->name() + "; " + bind_model_ids(cfg, *policy, cfg.model, *tok, dopt));
  check_fits(cfg, *policy, cfg.model, dopt.vocab_size);
  policy->set_logits_chunk_rows(cfg.logits_chunk_rows);
  policy->set_logits_chunk_bytes(cfg.logits_chunk_bytes);
  policy->set_gradient_checkpointing(cfg.gradient_checkpointing ? cfg.gradient_checkpointing_interval : 0);

  // Data (every rank loads all of it: the epoch order is computed identically everywhere)
  LoadStats stats;
  std::vector<PreferencePair> pairs;
  std::vector<SftExample> sft;
  if (kind == RunKind::Dpo) pairs = load_preferences(cfg.train_file, *tok, dopt, &stats);
  else sft = load_sft(cfg.train_file, *tok, dopt, &stats);
  say("data: " + cfg.train_file + ": " + std::to_string(stats.kept) + " records (" + std::to_string(stats.truncated) +
      " truncated, " + std::to_string(stats.dropped) + " dropped, " + std::to_string(stats.skipped) + " skipped)");
  if (stats.dropped > 0) say("  " + dropped_note(stats.dropped, cfg.max_length));
  for (const auto& [why, n] : stats.skipped_by_reason) say("  skipped " + std::to_string(n) + ": " + why);
  const int64_t N = kind == RunKind::Dpo ? static_cast<int64_t>(pairs.size()) : static_cast<int64_t>(sft.size());
  const std::string train_sha256 = sha256_file(cfg.train_file);  // recorded in checkpoints, checked on resume

  std::vector<PreferencePair> eval_pairs;
  if (kind == RunKind::Dpo && !cfg.eval_file.empty()) {
    LoadStats es;
    eval_pairs = load_preferences(cfg.eval_file, *tok, dopt, &es);
    say("data: " + cfg.eval_file + ": " + std::to_string(es.kept) + " evaluation records (" +
        std::to_string(es.truncated) + " truncated, " + std::to_string(es.dropped) + " dropped)");
    if (es.dropped > 0) say("  " + dropped_note(es.dropped, cfg.max_length));
  }
  check_same_on_all_ranks(comm,
                          {static_cast<double>(N), static_cast<double>(eval_pairs.size()),
                           static_cast<double>(policy->params().numel())},
                          "the number of training records, evaluation records or model parameters");

  BatchShape shape = kind == RunKind::Dpo ? batch_shape(cfg) : BatchShape{};
  shape.pad_id = dopt.pad_id;
  // Reference
  LossConfig lc;
  std::unique_ptr<GPT2> ref;
  RefLogps ref_train, ref_eval;
  const bool use_ref = kind == RunKind::Dpo && !cfg.reference_free;
  const bool cached = use_ref && cfg.precompute_ref_log_probs;
  if (kind == RunKind::Dpo) lc = loss_config(cfg);
  if (use_ref) {
    const std::string ref_dir = cfg.ref_model.empty() ? cfg.model : cfg.ref_model;
    // The usual reference is the policy's own starting directory, verified a moment ago: not hashed twice.
    std::error_code same_ec;
    ref = fs::equivalent(ref_dir, cfg.model, same_ec) ? load_gpt2_checkpoint(*be, ref_dir, model_dtype(cfg))
                                                      : load_verified_model(*be, ref_dir, model_dtype(cfg));
    check_fits(cfg, *ref, ref_dir, dopt.vocab_size);
    if (cfg.sync_ref_model) {  // TR-DPO mixes parameter by parameter
      const GPT2Config& a = policy->config();
      const GPT2Config& r = ref->config();
      auto dims = [](const GPT2Config& c) {
        return "model_type " + c.model_type + ", n_layer " + std::to_string(c.n_layer) + ", n_head " +
               std::to_string(c.n_head) + ", n_embd " + std::to_string(c.n_embd) + ", vocab_size " +
               std::to_string(c.vocab_size) + ", n_positions " + std::to_string(c.max_seq_len) + ", " +
               std::to_string(c.num_parameters()) + " parameters";
      };
      if (a.arch != r.arch || a.n_layer != r.n_layer || a.n_head != r.n_head || a.n_embd != r.n_embd ||
          a.vocab_size != r.vocab_size || a.max_seq_len != r.max_seq_len || a.num_parameters() != r.num_parameters())
        throw InputError("key 'sync_ref_model': the reference model " + ref_dir + " (" + dims(r) +
                         ") and the policy " + cfg.model + " (" + dims(a) + ") differ in shape; the reference "
                         "update mixes the two parameter by parameter, so they must have the same architecture");
    }
    ref->set_logits_chunk_rows(cfg.logits_chunk_rows);
    ref->set_logits_chunk_bytes(cfg.logits_chunk_bytes);
    // Forward only (cached or live): its gradient and master buffers are freed and its activations take the
    // forward-only arrangement, bitwise the same log-probs (model/gpt2.h). DPO_TEST_TRAIN_MODE_REFERENCE=1 (tests)
    // keeps it a training-mode model, for the equality test against that arrangement.
    const char* train_mode_ref = std::getenv("DPO_TEST_TRAIN_MODE_REFERENCE");
    if (train_mode_ref && std::string(train_mode_ref) == "1")
      ref->set_gradient_checkpointing(cfg.gradient_checkpointing ? cfg.gradient_checkpointing_interval : 0);
    else
      ref->set_mode(GPT2::ModelMode::ForwardOnly);
    if (cached) {
      const std::string cache_dir = cfg.ref_cache_dir.empty() ? default_ref_cache_dir() : cfg.ref_cache_dir;
      auto one = [&](const std::vector<PreferencePair>& d, const std::string& path) {
        RefCacheResult r = cached_ref_logps(*ref, d, path, data_settings(cfg), cache_dir,
                                            cfg.per_device_eval_batch_size, shape);
        const char* what = r.status == RefCacheResult::Status::Hit    ? "reused"
                           : r.status == RefCacheResult::Status::Miss ? "computed"
                                                                      : "recomputed (stale cache)";
        if (r.status == RefCacheResult::Status::Stale)
          say("warning: reference log-prob cache " + r.path + " not used: " + r.reason + "; recomputing it");
        say(std::string("reference log-probs for ") + path + ": " + what + " -> " + r.path);
        return r.logps;
      };
      // Rank 0 computes and writes the cache; the others wait, then read it (or, where the cache directory is
      // not shared with rank 0, compute their own copy: the cache file is written atomically either way).
      auto both = [&]() {
        ref_train = one(pairs, cfg.train_file);
        if (!eval_pairs.empty()) ref_eval = one(eval_pairs, cfg.eval_file);
      };
      if (lead) both();
      {
        CollectiveTimeoutPause computing;  // rank 0's reference pass may take longer than the collective timeout
        comm.barrier();
      }
      if (!lead) both();
      ref.reset();  // no longer needed: frees its memory
    }
  }

  // Optimizer and schedule. A step is per_step pairs (SFT: examples) whatever the rank count, cut into micro-batches
  // ("chunks") of per_device_train_batch_size; each rank runs a contiguous run of the step's chunks.
  const int64_t mb = cfg.per_device_train_batch_size;
  const int64_t per_step = mb * cfg.gradient_accumulation_steps;
  const int64_t steps_per_epoch = (N + per_step - 1) / per_step;
  const int64_t total = cfg.max_steps > 0 ? cfg.max_steps : steps_per_epoch * cfg.num_train_epochs;
  AdamW opt(*be, policy->specs(), policy->params().numel(), DType::F32, optim_config(cfg), total);
  const int64_t n_params = policy->params().numel();
  // ZeRO-1 (docs/distributed.md): rank r owns [r*S, (r+1)*S) of the flat vector (cut at n_params), S = ceil(n/R):
  // its AdamW moments, and the update of those parameters; an all-gather then gives every rank all of them.
  const bool zero = cfg.zero_stage == 1 && n_ranks > 1;
  const int64_t zS = (n_params + n_ranks - 1) / n_ranks;
  Tensor zfull, zshard;  // all-gather buffers [R*S] and [S]
  // The numerical guard's verdict must be the same on every rank (under ZeRO-1 each dry-runs only its own range):
  // one small all-reduce per step with a finite gradient norm, counting the ranks that found a non-finite value.
  if (n_ranks > 1)
    opt.set_finite_agreement([&comm](AdamWCheck mine) {
      double bad = mine == AdamWCheck::NonFinite ? 1.0 : 0.0;
      comm.allreduce_sum(&bad, 1);
      return bad > 0 ? AdamWCheck::NonFinite : AdamWCheck::AllFinite;
    });
  if (zero) {
    opt.set_shard(std::min(n_params, me * zS), std::min(n_params, (me + 1) * zS));
    zfull = be->zeros({n_ranks * zS}, DType::F32);
    zshard = be->zeros({zS}, DType::F32);
  }
  // How ZeRO-1 reduces the gradient. "fold" (the default off NCCL): the ordered fold of the whole gradient, then
  // each rank updates its range: bit-identical to one process. "scatter" (NCCL; DPO_ZERO_REDUCE_SCATTER=1 forces
  // it elsewhere, for tests): each rank sums its own micro-batches, a reduce-scatter leaves it only its range's
  // sum (half the bytes of an all-reduce), and the clipping norm comes from an all-reduce of the ranges' sums of
  // squares; equal to one process up to float reduction order.
  const char* force_scatter = std::getenv("DPO_ZERO_REDUCE_SCATTER");
  const bool zero_scatter =
      zero && (comm.name() == "nccl" || (force_scatter && *force_scatter && std::string(force_scatter) != "0"));
  // Overlap (NCCL without ZeRO-1; DPO_OVERLAP_ALLREDUCE=1 forces it elsewhere, for tests): during the backward
  // pass of a rank's last micro-batch of the step, each bucket of parameters (GPT2::grad_buckets) is added into
  // the step gradient and its all-reduce started as soon as the backward has produced it, on the communicator's
  // own stream; the reduction then only waits for the last buckets. Accumulation micro-batches start nothing.
  // Each rank sums its micro-batches first, so the result equals one process up to float reduction order.
  const char* force_overlap = std::getenv("DPO_OVERLAP_ALLREDUCE");
  const bool overlap = !zero && n_ranks > 1 &&
                       (comm.name() == "nccl" || (force_overlap && *force_overlap && std::string(force_overlap) != "0"));
  if (overlap) say("gradient all-reduce: " + std::to_string(policy->grad_buckets().size()) +
                   " buckets, overlapped with the backward pass");
  if (zero) say(std::string("ZeRO-1: AdamW moments sharded over ") + std::to_string(n_ranks) + " ranks, gradients by " +
                (zero_scatter ? "reduce-scatter" : "ordered fold"));
  // dst [n_params] = the ranks' ranges gathered; own_range is this rank's [shard_end - shard_begin]. full [R*S]
  // and shard [S] are all-gather buffers of dst's dtype (F32 by default).
  auto gather_ranges = [&](const Tensor& dst, const Tensor& own_range, const Tensor& full = Tensor(),
                           const Tensor& shard = Tensor()) {
    const Tensor& f = full.defined() ? full : zfull;
    const Tensor& s = shard.defined() ? shard : zshard;
    const int64_t len = opt.shard_end() - opt.shard_begin();
    if (len > 0) be->copy(s.view(0, {len}), own_range);
    comm.all_gather(f, s);
    be->copy(dst, f.view(0, {n_params}));
  };
  // All of the moments as host F32 [n_params] (collective under ZeRO-1).
  auto full_moments = [&]() {
    std::pair<Tensor, Tensor> mv{Tensor::host({n_params}, DType::F32), Tensor::host({n_params}, DType::F32)};
    if (zero) {
      Tensor tmp = be->empty({n_params}, DType::F32);
      gather_ranges(tmp, opt.m());
      be->copy_to_host(mv.first, tmp);
      gather_ranges(tmp, opt.v());
      be->copy_to_host(mv.second, tmp);
    } else {
      be->copy_to_host(mv.first, opt.m());
      be->copy_to_host(mv.second, opt.v());
    }
    return mv;
  };
  // The policy's full master weights as host F32 [n_params] (collective when they are sharded: ZeRO-1 in bf16).
  auto policy_weights_host = [&]() {
    Tensor host = Tensor::host({n_params}, DType::F32);
    if (policy->master_sharded()) {
      Tensor tmp = be->empty({n_params}, DType::F32);
      gather_ranges(tmp, policy->master_params());
      be->copy_to_host(host, tmp);
    } else {
      be->copy_to_host(host, policy->master_params());
    }
    return host;
  };
  if (n_ranks > 1 && on_cpu) {
    const std::vector<std::string> sets = kernel_sets_across_ranks(comm, kernels.id());  // collective
    std::string list;
    for (const auto& k : sets) list += "\n  " + k;
    if (!sets.empty())
      say("warning: the ranks run different CPU GEMM kernels (results are not bit-identical to a run on one kernel "
          "set; docs/performance.md, \"BLAS kernels\"):" + list);
  }
  if (n_ranks > 1) {
    say("data parallel: " + std::to_string(n_ranks) + " ranks (" + comm.name() + "), " + std::to_string(per_step) +
        " pairs per step in micro-batches of " + std::to_string(mb));
    if (cfg.gradient_accumulation_steps % n_ranks != 0)
      say("warning: gradient_accumulation_steps (" + std::to_string(cfg.gradient_accumulation_steps) +
          ") is not a multiple of the " + std::to_string(n_ranks) +
          " ranks: some ranks run fewer micro-batches per step (or none) and wait for the others");
  }

  Position p;
  bool ref_synced = false;  // TR-DPO: the live reference differs from the one loaded (it belongs in checkpoints)
  if (!ro.resume.empty()) {
    const std::string dir = resolve_resume(ro.resume, cfg.out_dir);
    p = load_checkpoint(dir, *policy, opt, cfg, train_sha256);  // on every rank
    if (cfg.sync_ref_model) ref_synced = load_synced_reference(dir, *ref, cfg, p.step);
    if (p.num_tokens < 0) {  // a checkpoint without num_tokens: recount the training tokens before it
      std::vector<int64_t> item_tokens;
      for (const auto& x : pairs)
        item_tokens.push_back(static_cast<int64_t>(2 * x.prompt.size() + x.chosen.size() + x.rejected.size()));
      for (const auto& x : sft) item_tokens.push_back(static_cast<int64_t>(x.prompt.size() + x.completion.size()));
      p.num_tokens = count_tokens_before(item_tokens, static_cast<uint64_t>(cfg.seed), p);
    }
    say("resumed from " + dir + " at step " + std::to_string(p.step));
    if (on_cpu && p.cpu_kernels.is_object() && p.cpu_kernels.value("id", "") != kernels.id())
      say("warning: the checkpoint was written with CPU GEMM kernels " + p.cpu_kernels.value("id", "?") +
          ", this run has " + kernels.id() + ": the resumed run rounds differently, so it is not bit-identical to "
          "an uninterrupted one (docs/performance.md, \"BLAS kernels\")");
  }
  // ZeRO-1 in bf16: each rank keeps only its range of the F32 master weights (after any resume, which loads all
  // of them); after each update the ranks' bf16 compute copies of their ranges are all-gathered.
  Tensor zfull16, zshard16;
  if (zero && policy->dtype() == DType::BF16) {
    policy->shard_master(opt.shard_begin(), opt.shard_end());
    zfull16 = be->zeros({n_ranks * zS}, DType::BF16);
    zshard16 = be->zeros({zS}, DType::BF16);
  }
  const std::string metrics_path = (fs::path(cfg.out_dir) / "metrics.jsonl").string();
  std::unique_ptr<MetricsLog> log;
  if (lead) {
    // Only now, with the config, models, data and any checkpoint to resume from loaded and checked: a run
    // stopped by bad input leaves no empty out_dir behind.
    fs::create_directories(cfg.out_dir, ec);
    if (ec) throw InputError("key 'out_dir': cannot create " + cfg.out_dir + ": " + ec.message());
    if (!out_lock) lock_out_dir();
    write_file_atomic((fs::path(cfg.out_dir) / "config.yaml").string(), config_yaml);
    if (!ro.resume.empty()) truncate_metrics(metrics_path, p.step);
    log = std::make_unique<MetricsLog>(metrics_path, !ro.resume.empty());
  }
  if (!ro.quiet && lead)
    progress = std::make_unique<Progress>(kind == RunKind::Dpo ? "dpo" : "sft", total, ro.plain_progress);

  RunSummary sum;
  std::vector<int64_t> order = epoch_order(N, static_cast<uint64_t>(cfg.seed), p.epoch);
  Window w;
  double w_grad_norm = 0, w_lr = 0;
  // Skipped optimizer steps (AdamW::StepInfo::skipped): in the logging window, in a row (this process's run: a
  // resume starts the count again), and in all.
  int64_t w_skipped = 0, skipped_in_a_row = 0, skipped_total = 0, steps_run = 0;
  int64_t last_saved = -1;
  std::map<std::string, double> eval_metrics;
  auto run_eval = [&]() {
    if (eval_pairs.empty()) return;
    DPO_PHASE("evaluation");
    eval_metrics = evaluate(comm, *policy, cached ? nullptr : ref.get(), cached ? &ref_eval : nullptr, eval_pairs,
                            lc, cfg.per_device_eval_batch_size, p.num_tokens, shape);
    if (log) log->write(p.step, eval_metrics);
    say("eval step " + std::to_string(p.step) + ": loss " + fmt(eval_metrics["eval_loss"]) + ", accuracy " +
        fmt(eval_metrics["eval_rewards/accuracies"]) + ", margin " + fmt(eval_metrics["eval_rewards/margins"]));
  };
  auto save = [&]() {
    DPO_PHASE("checkpoint");
    const auto [m, v] = full_moments();
    Tensor weights;  // the gathered master weights when they are sharded (collective)
    if (policy->master_sharded()) weights = policy_weights_host();
    Tensor ref_weights;  // the synced reference, in its own dtype (the same on every rank)
    if (lead && ref_synced) {
      ref_weights = Tensor::host({n_params}, ref->dtype());
      be->copy_to_host(ref_weights, ref->params());
    }
    if (lead) write_checkpoint(cfg.out_dir, *policy, opt, m, v, weights, p, config_yaml, train_sha256,
                                cfg.save_total_limit, cpu_kernels, max_shard_bytes, tokenizer_files, ref_weights);
    CollectiveTimeoutPause writing;  // the others wait for rank 0's disk, however slow
    comm.barrier();  // no rank runs ahead of a checkpoint it might be asked to resume from
    last_saved = p.step;
  };

  // The step's gradient is the left fold g_0 + g_1 + ... over its micro-batches in order, each g_k computed from
  // zeroed gradients: rank 0 folds its own micro-batches into `grad` as it goes, the other ranks keep theirs in
  // `stash`, and ordered_fold continues the fold across ranks. One process and R processes therefore do the
  // same float additions in the same order (docs/distributed.md). The NCCL paths (overlap, reduce-scatter) give
  // that up: every rank folds its own micro-batches into `grad` and the ranks' sums are reduced.
  Tensor grad = be->empty({n_params}, DType::F32);
  std::vector<Tensor> pool;  // stash buffers, kept across steps (ranks > 0)
  Tensor mb_sums;  // [micro-batches of this rank in a step, kPairSumsWidth] F64: each one's PairSum row

  // CUDA graphs (cuda_graphs, docs/training.md): a DPO micro-batch's forward, loss and backward depend on the
  // host only through its shape (pairs, padded length) and the step's pair count, so each such key runs eagerly
  // the first time (which sizes the model's buffers), is captured the second time and replayed from then on. The
  // graph reads its inputs from, and writes its sums to, device tensors of its own, filled before each replay.
  // The CPU backend's "graph" is the function itself (Backend::capture); DPO_TEST_GRAPHS_ON_CPU=1 runs this path
  // on the CPU so that tests can compare it with the plain one.
  struct MicroGraph {
    Tensor tokens, keymask, targets, weights, ref, offset, sums;
    std::unique_ptr<Backend::Graph> graph;
    int64_t generation = -1;  // policy->buffers_generation() at capture
    int64_t runs = 0;
  };
  std::map<std::tuple<int64_t, int64_t, double>, MicroGraph> micro_graphs;
  const char* graphs_env = std::getenv("DPO_TEST_GRAPHS_ON_CPU");
  bool use_graphs = kind == RunKind::Dpo && cfg.cuda_graphs && !overlap &&
                    (!on_cpu || (graphs_env && std::string(graphs_env) == "1"));
  if (kind == RunKind::Dpo && cfg.cuda_graphs && !on_cpu && overlap)
    say("cuda_graphs: off in this run (the gradient all-reduce overlaps the backward pass, which a graph cannot "
        "hold)");
  // Runs `work` for graph entry e: replay, capture then replay, or eagerly (see above).
  auto run_micro = [&](MicroGraph& e, const std::function<void()>& work) {
    const int64_t gen = policy->buffers_generation();
    if (use_graphs && e.graph && e.generation == gen) {
      e.graph->replay();
    } else if (use_graphs && e.runs >= 1) {
      e.graph.reset();
      std::unique_ptr<Backend::Graph> g;
      try {
        g = be->capture(work);
      } catch (const GraphCaptureError& err) {
        // Nothing ran: run the work eagerly, and every later micro-batch too.
        say(std::string("warning: ") + err.what() + "; cuda_graphs is off for the rest of this run");
        use_graphs = false;
        for (auto& kv : micro_graphs) kv.second.graph.reset();
        work();
        return;
      }
      // The first run of this shape sized every buffer, and they never shrink, so the capture cannot have
      // allocated one; if it did, that memory belongs to the graph and nothing here may use it safely.
      if (policy->buffers_generation() != gen)
        throw Error("CUDA graph capture: the model reallocated its buffers while being captured (a bug); set "
                    "cuda_graphs: false to run without graphs");
      e.graph = std::move(g);
      e.generation = gen;
      e.graph->replay();
    } else {
      work();
    }
    ++e.runs;
  };

  // profile_steps: a CUDA profiler capture range (cudaProfilerStart/Stop) around those optimizer steps only, so that
  // Nsight sees steady-state steps (docs/profiling.md). The device is idle at both ends, so the range holds exactly
  // the steps' work; evaluation and checkpoints after the last step fall outside it.
  const StepRange profile = parse_profile_steps(cfg.profile_steps);
  bool capturing = false;
  if (!profile.empty()) {
    say("profile_steps: CUDA profiler capture range over steps " + std::to_string(profile.first) + "-" +
        std::to_string(profile.last) +
        (profile.first > total ? " (after the run's last step " + std::to_string(total) + ": nothing is captured)"
                               : ""));
  }

  int stop_sig = 0;  // the agreed stop request of the last step (SIGINT, SIGTERM; 0: none)
  while (p.step < total) {
    if (p.pos >= N) {
      ++p.epoch;
      p.pos = 0;
      order = epoch_order(N, static_cast<uint64_t>(cfg.seed), p.epoch);
    }
    if (!capturing && profile.contains(p.step + 1)) {
      be->synchronize();
      profiler_capture_start();
      capturing = true;
    }
    const auto ts = std::chrono::steady_clock::now();
    const int64_t step_items = std::min(per_step, N - p.pos);
    // Plain variables, not a structured binding: lambdas below capture them (C++20 allows capturing bindings, but
    // clang before 16 does not implement it, and the fuzzing build uses clang).
    // This rank's micro-batches: a contiguous run, the runs balanced by tokens across the ranks (balanced_cuts), so
    // with varied lengths the slowest rank does not set the pace. The micro-batches themselves (mb pairs each, in
    // order) and the fold order do not depend on the rank count, so the results do not either.
    const int64_t n_micro_step = (step_items + mb - 1) / mb;
    std::pair<int64_t, int64_t> micro = shard(n_micro_step, n_ranks, me);
    if (n_ranks > 1 && kind == RunKind::Dpo) {
      std::vector<int64_t> costs;
      for (int64_t c = 0; c < n_micro_step; ++c) {
        const std::vector<int64_t> ids(order.begin() + p.pos + c * mb,
                                       order.begin() + p.pos + std::min(step_items, (c + 1) * mb));
        costs.push_back(micro_batch_cost(pairs, ids, shape.layout));
      }
      const std::vector<int64_t> cuts = balanced_cuts(costs, n_ranks);
      micro = {cuts[static_cast<size_t>(me)], cuts[static_cast<size_t>(me) + 1]};
    }
    const int64_t c0 = micro.first, c1 = micro.second;
    be->fill_zero(grad);
    std::vector<Tensor> stash;
    std::vector<Window> chunks;
    // DPO: this rank's micro-batches in the step; their PairSum rows wait in mb_sums, read with the step's record.
    int64_t dpo_rows = 0;
    std::vector<std::pair<int64_t, int64_t>> dpo_pairs_tokens;  // (pairs, tokens) of each
    std::vector<double> readback;
    bool overlapped = false;  // this step's all-reduce was started during the last micro-batch's backward
    // Before micro-batch c's training pass: with overlap, on this rank's last micro-batch, fold the earlier ones
    // (rank 0 has them in grad already; the others' are in stash) and hook the bucketed all-reduce.
    auto begin_micro_batch = [&](int64_t c) {
      if (!overlap || c != c1 - 1) return;  // (with overlap, earlier micro-batches are already summed in grad)
      policy->set_grad_ready_hook([&](int64_t off, int64_t n) {
        const Tensor g = grad.view(off, {n});
        be->residual_forward(g, g, policy->grads().view(off, {n}));
        comm.allreduce_sum_async(g);
      });
      overlapped = true;
    };
    auto accumulate = [&]() {
      if (overlapped) {  // the hook added this micro-batch's gradient bucket by bucket
        policy->set_grad_ready_hook({});
        return;
      }
      // Rank 0 folds in place; so does every rank when its micro-batches are summed before the reduction anyway
      // (overlap, reduce-scatter: the NCCL paths), which saves the stash's gradient-sized copies.
      if (lead || overlap || zero_scatter) {
        be->residual_forward(grad, grad, policy->grads());
        return;
      }
      if (pool.size() <= stash.size()) pool.push_back(be->empty({n_params}, DType::F32));
      be->copy(pool[stash.size()], policy->grads());
      stash.push_back(pool[stash.size()]);
    };
    auto chunk_idx = [&](int64_t c) {
      return std::vector<int64_t>(order.begin() + p.pos + c * mb,
                                  order.begin() + p.pos + std::min(step_items, (c + 1) * mb));
    };
    double sft_norm_tokens = 0;
    if (kind == RunKind::Sft) {
      // Normaliser: completion tokens in the whole optimizer step (all ranks' micro-batches).
      for (int64_t i = 0; i < step_items; ++i)
        sft_norm_tokens += static_cast<double>(sft[static_cast<size_t>(order[p.pos + i])].completion.size());
      for (int64_t c = c0; c < c1; ++c) {
        std::vector<int64_t> idx = chunk_idx(c);
        Batch b = make_sft_batch(sft, idx, DType::F32, dopt.pad_id);
        policy->zero_grad();
        begin_micro_batch(c);
        const std::vector<double> lp = policy_train_pass(
            *policy, b, 0, [&](int64_t s0, int64_t s1, const std::vector<double>&, std::vector<double>& d) {
              for (int64_t s = s0; s < s1; ++s) d[static_cast<size_t>(s)] = -1.0 / sft_norm_tokens;
            });
        Window cw;
        for (double v : lp) cw.loss -= v;
        accumulate();
        cw.tokens += static_cast<double>(b.tokens_total);
        chunks.push_back(cw);
      }
    } else {
      const double normalizer = static_cast<double>(step_items);
      const DType gd = grad_dtype(policy->dtype());
      const PairLossParams lp = pair_loss_params(lc);
      // Each micro-batch's PairSum row stays on the device until the step's reduction, which reads them all in
      // one copy (the loss, its gradients and the metrics never leave the device inside a step).
      const int64_t n_micro = c1 - c0;
      // One more row than micro-batches: the optimizer's step record is copied behind them, so that one read
      // brings both to the host.
      if (n_micro > 0 && (!mb_sums.defined() || mb_sums.size(0) < n_micro + 1))
        mb_sums = be->empty({n_micro + 1, kPairSumsWidth}, DType::F64);
      std::vector<std::pair<int64_t, int64_t>> mb_pairs_tokens;
      for (int64_t c = c0; c < c1; ++c) {
        std::vector<int64_t> idx = chunk_idx(c);
        Batch b = shape.make(pairs, idx, DType::F32);
        if (cfg.pad_to_multiple_of > 1 && b.layout == BatchLayout::Padded) {
          const int64_t m = cfg.pad_to_multiple_of;
          pad_batch_columns(b, std::min((b.T + m - 1) / m * m, policy->config().max_seq_len), dopt.pad_id);
        }
        policy->zero_grad();
        const Tensor row_sums = mb_sums.view((c - c0) * kPairSumsWidth, {kPairSumsWidth});
        GPT2::PairLossHead head;
        head.params = lp;
        head.normalizer = normalizer;
        begin_micro_batch(c);
        if (has_batch_terms(lc)) {
          // aot, aot_unpaired: a pair's loss depends on the whole micro-batch, so the unfused path: every
          // sequence's log-prob first (the micro-batch's logits kept), the loss on the host, then the backward
          // from dL/dlogp. Padded batches only (config validation).
          const int64_t P = b.pairs;
          const Tensor ref_dev = ref_logps_on_device(*be, gd, b, cached ? &ref_train : nullptr,
                                                     use_ref && !cached ? ref.get() : nullptr);
          Tensor seq = be->empty({2 * P}, gd), stats = be->empty({2 * P, kSeqStatsWidth}, gd);
          {
            DPO_PHASE("forward + log-probs");
            policy->sequence_logprobs(to_backend(*be, b.tokens), to_backend(*be, b.keymask),
                                      to_backend(*be, b.targets), to_backend(*be, b.weights), seq, Tensor(), stats);
          }
          std::vector<double> dseq;
          const std::vector<double> row = host_batch_loss(*be, stats, ref_dev, b, lc, normalizer, &dseq);
          Tensor row_h = Tensor::host({kPairSumsWidth}, DType::F64), dseq_h = Tensor::host({2 * P}, gd);
          std::copy(row.begin(), row.end(), row_h.data<double>());
          for (int64_t i = 0; i < 2 * P; ++i) {
            if (gd == DType::F64) dseq_h.data<double>()[i] = dseq[static_cast<size_t>(i)];
            else dseq_h.data<float>()[i] = static_cast<float>(dseq[static_cast<size_t>(i)]);
          }
          be->copy_from_host(row_sums, row_h);
          {
            DPO_PHASE("backward");
            policy->backward(to_backend(*be, dseq_h));
          }
        } else if (use_graphs && b.layout == BatchLayout::Padded) {
          MicroGraph& e = micro_graphs[{b.pairs, b.T, normalizer}];
          if (!e.sums.defined()) {
            e.tokens = be->empty(b.tokens.shape(), DType::I32);
            e.keymask = be->empty(b.keymask.shape(), DType::I32);
            e.targets = be->empty(b.targets.shape(), DType::I32);
            e.weights = be->empty(b.weights.shape(), gd);
            e.sums = be->empty({kPairSumsWidth}, DType::F64);
            if (use_ref) e.ref = be->empty({2 * b.pairs}, gd);
            if (lc.odpo_alpha > 0) e.offset = be->empty({b.pairs}, gd);
          }
          be->copy_from_host(e.tokens, b.tokens);
          be->copy_from_host(e.keymask, b.keymask);
          be->copy_from_host(e.targets, b.targets);
          be->copy_from_host(e.weights, b.weights);
          if (cached) {
            be->copy_from_host(e.ref, cached_ref_logps_host(gd, b, ref_train));
          } else if (use_ref) {
            DPO_PHASE("forward + log-probs");
            ref->score(e.tokens, e.keymask, e.targets, e.weights, e.ref, Tensor(), b.weights);  // not captured
          }
          if (e.offset.defined()) be->copy_from_host(e.offset, odpo_offsets_host(gd, b, lc));
          head.ref_logp = e.ref;
          head.offset = e.offset;
          head.sums = e.sums;
          MicroGraph* ep = &e;
          {
            DPO_PHASE("forward + log-probs + loss + LM-head backward + backward");
            run_micro(e, [&policy, ep, head] {
              policy->fused_forward_pairs(ep->tokens, ep->keymask, ep->targets, ep->weights, head);
              policy->fused_backward();
            });
          }
          be->copy(row_sums, head.sums);  // head.sums keeps the entry's tensor alive even if the map was cleared
        } else {
          head.ref_logp = ref_logps_on_device(*be, gd, b, cached ? &ref_train : nullptr,
                                              use_ref && !cached ? ref.get() : nullptr);
          head.offset = odpo_offsets_on_device(*be, gd, b, lc);
          head.sums = row_sums;
          head.host_weights = b.weights;  // the LM head's scored slots (the graph path above runs over every slot)
          const LayoutScope scope(*policy, b);
          {
            DPO_PHASE("forward + log-probs + loss + LM-head backward");
            policy->fused_forward_pairs(to_backend(*be, b.tokens), to_backend(*be, b.keymask),
                                        to_backend(*be, b.targets), to_backend(*be, b.weights), head);
          }
          {
            DPO_PHASE("backward");
            policy->fused_backward();
          }
        }
        accumulate();
        mb_pairs_tokens.emplace_back(b.pairs, b.tokens_total);
      }
      dpo_rows = n_micro;
      dpo_pairs_tokens = std::move(mb_pairs_tokens);
    }
    test_fail_hook(me, p.step + 1);
    // The reductions: one per optimizer step (none per micro-batch).
    {
      DPO_PHASE("gradient reduction");
      if (overlap) {
        // A rank without a micro-batch in this step starts the same buckets, in the same order, on zeros.
        if (!overlapped)
          for (const auto& [off, n] : policy->grad_buckets()) comm.allreduce_sum_async(grad.view(off, {n}));
        comm.finish_async();
      } else if (zero_scatter) {
        be->copy(zfull.view(0, {n_params}), grad);  // grad: this rank's micro-batches, summed
        if (n_ranks * zS > n_params) be->fill_zero(zfull.view(n_params, {n_ranks * zS - n_params}));
        comm.reduce_scatter_sum(zshard, zfull);  // zshard[0, len): the summed gradient of this rank's range
      } else {
        comm.ordered_fold(grad, stash);
      }
    }
    AdamW::StepInfo info = [&] {
      DPO_PHASE("optimizer");
      // AdamW updates the F32 master weights (params() itself in fp32) on the device: the norm, the clipping and
      // the skip decision are taken there, and the host reads the step's record once (finish_step).
      const Tensor& master = policy->master_params();
      const int64_t b = opt.shard_begin(), len = opt.shard_end() - opt.shard_begin();
      // This rank's range of the summed gradient, and the global norm (the same number on every rank, so all
      // ranks skip a non-finite step together).
      Tensor g_range = zero_scatter ? zshard.view(0, {len}) : grad.view(b, {len});
      const AdamW::NormSource norm =
          zero_scatter ? AdamW::NormSource::shard_sums([&comm](const Tensor& ss) { comm.allreduce_sum(ss); })
                       : AdamW::NormSource::of_grads(grad);
      AdamW::StepOutputs out;
      // The update writes this rank's range of the BF16 compute copy itself (what sync_params would write), when
      // the master it updates is that range: the sharded master, or the whole master of an unsharded run.
      const bool own_copy = policy->dtype() == DType::BF16 && (policy->master_sharded() || !zero);
      if (own_copy) out.compute_copy = policy->params().view(b, {len});
      // Without ZeRO the step reads all of `grad`, and zeroes it for the next step's accumulation.
      if (!zero) out.grad_after = GradAfterStep::Zero;
      opt.step_owned_async(policy->master_sharded() ? master : master.view(b, {len}), g_range, norm, out);
      AdamW::StepInfo si;
      if (dpo_rows > 0) {
        // The step's one wait: the micro-batches' metric sums and the optimizer's record, in one copy.
        const Tensor& rec = opt.step_record();
        DPO_ASSERT(rec.numel() <= kPairSumsWidth, "the optimizer's step record does not fit a metrics row");
        be->copy(mb_sums.view(dpo_rows * kPairSumsWidth, {rec.numel()}), rec);
        readback = to_host_f64(*be, mb_sums.view(0, {dpo_rows * kPairSumsWidth + rec.numel()}));
        si = opt.finish_step(readback.data() + dpo_rows * kPairSumsWidth);
      } else {
        si = opt.finish_step();
      }
      if (si.skipped) return si;
      if (policy->master_sharded()) {
        gather_ranges(policy->params(), policy->params().view(b, {len}), zfull16, zshard16);
      } else if (zero) {
        gather_ranges(master, master.view(b, {len}));
        if (!own_copy) policy->sync_params();
      }
      return si;
    }();
    for (int64_t i = 0; i < dpo_rows; ++i) {
      Window cw;
      cw.add_pair_sums(readback.data() + i * kPairSumsWidth, dpo_pairs_tokens[static_cast<size_t>(i)].first,
                       policy->config().vocab_size);
      cw.tokens += static_cast<double>(dpo_pairs_tokens[static_cast<size_t>(i)].second);
      chunks.push_back(cw);
    }
    {
      DPO_PHASE("metrics");
      // With the metrics, every rank's stop request: all ranks stop after the same step.
      const double tokens_before = w.tokens;
      stop_sig = fold_window_and_stop(comm, w, chunks, StopSignals::pending());
      // Exact: token counts are integers far below 2^53, so the window's sums of them are too.
      p.num_tokens += static_cast<int64_t>(w.tokens - tokens_before);
    }
    if (kind == RunKind::Sft) w.pairs += sft_norm_tokens;  // SFT's loss is per completion token
    if (ro.on_step) ro.on_step(p.step + 1);
    ++steps_run;
    if (info.skipped) {
      ++w_skipped;
      ++skipped_in_a_row;
      ++skipped_total;
      say("step " + std::to_string(p.step + 1) + ": " + skip_reason_text(info.skip_reason) +
          "; update skipped (weights, optimizer state and optimizer step unchanged)");
    } else {
      skipped_in_a_row = 0;
    }
    p.pos += step_items;
    ++p.step;
    if (capturing && p.step >= profile.last) {
      be->synchronize();
      profiler_capture_stop();
      capturing = false;
    }
    w.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
    w_grad_norm = info.grad_norm;
    w_lr = info.lr;
    // TR-DPO (sync_ref_model): the reference update at TRL's moment, SyncRefModelCallback.on_step_end: after the
    // optimizer step, when transformers' global_step (p.step: steps done, a skipped one included) is a multiple of
    // ref_model_sync_steps, so before this step's logging, evaluation and checkpoint. Every rank mixes the same
    // full weights into the same reference, so the references stay identical without an exchange (besides
    // ZeRO-1's gather of a sharded master). One host round-trip of both models' weights per sync.
    if (cfg.sync_ref_model && ref_sync_due(p.step, cfg.ref_model_sync_steps)) {
      DPO_PHASE("reference sync");
      sync_reference(*ref, policy_weights_host(), cfg.ref_model_mixup_alpha);
      ref_synced = true;
    }

    const double tps = w.seconds > 0 ? w.tokens / w.seconds : 0;
    if (progress) {
      const double n = std::max(w.pairs, 1.0);
      progress->update(p.step, w.loss / n, kind == RunKind::Dpo ? w.acc / n : std::nan(""), tps, cfg.logging_steps);
    }
    if (p.step % cfg.logging_steps == 0 || p.step == total) {
      std::map<std::string, double> m;
      if (kind == RunKind::Dpo) m = w.dpo_metrics("");
      else m = {{"loss", w.loss / std::max(w.pairs, 1.0)}};
      m["grad_norm"] = w_grad_norm;
      m["learning_rate"] = w_lr;
      m["epoch"] = static_cast<double>(p.epoch) + static_cast<double>(p.pos) / static_cast<double>(N);
      m["tokens_per_second"] = tps;
      m["num_tokens"] = static_cast<double>(p.num_tokens);
      if (w_skipped > 0) m["skipped_steps"] = static_cast<double>(w_skipped);  // skipped steps in this window
      if (log) log->write(p.step, m);
      sum.last_log = m;
      w = Window{};
      w_skipped = 0;
    }
    // A run that keeps skipping is not training: stop it (nothing of the skipped steps was applied, so the last
    // checkpoint, if any, holds the last good state). The verdicts are the same on every rank, so all stop here.
    if (cfg.max_consecutive_skipped_steps > 0 && skipped_in_a_row >= cfg.max_consecutive_skipped_steps)
      throw InputError("training stopped: " + std::to_string(skipped_in_a_row) +
                       " optimizer steps in a row were skipped (steps " +
                       std::to_string(p.step - skipped_in_a_row + 1) + "-" + std::to_string(p.step) + ", the last: " +
                       skip_reason_text(info.skip_reason) + "; max_consecutive_skipped_steps: " +
                       std::to_string(cfg.max_consecutive_skipped_steps) + "). Lower learning_rate, set " +
                       "max_grad_norm, or check the data and the initial weights. No state of a skipped step was kept; " +
                       (last_saved >= 0 ? "the last checkpoint is step-" + std::to_string(last_saved)
                                        : std::string("no checkpoint was written")));
    if (cfg.eval_steps > 0 && p.step % cfg.eval_steps == 0 && p.step < total) run_eval();
    if (cfg.save_steps > 0 && p.step % cfg.save_steps == 0) save();
    if (stop_sig != 0 && p.step < total) break;  // (a request in the last step just lets the run end)
  }
  if (capturing) {  // the run ended inside the range
    be->synchronize();
    profiler_capture_stop();
  }
  if (progress) progress->finish();
  if (stop_sig != 0 && p.step < total) {
    // A stop request: the step is complete on every rank; checkpoint it and return (no final evaluation).
    if (last_saved != p.step) save();
    const std::string ckpt =
        (fs::path(cfg.out_dir) / "checkpoints" / ("step-" + std::to_string(p.step))).string();
    say(std::string("stopped on ") + (stop_sig == SIGINT ? "SIGINT" : "SIGTERM") + " after step " +
        std::to_string(p.step) + " of " + std::to_string(total) + "; checkpoint " + ckpt +
        "\nto continue this run, with the same configuration (under mpirun or srun: the same launcher and rank "
        "count):\n  " + resume_command(kind == RunKind::Dpo ? "train" : "sft", ckpt) + "\nexit status " +
        std::to_string(stop_exit_code(stop_sig)));
    sum.steps = p.step;
    sum.final_checkpoint = ckpt;
    sum.stop_signal = stop_sig;
    sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return sum;
  }
  if (steps_run > 0 && skipped_total == steps_run)
    throw InputError("training failed: every one of the run's " + std::to_string(steps_run) +
                     " optimizer steps was skipped (non-finite gradient norm or updated weights), so the weights "
                     "never changed; lower learning_rate, set max_grad_norm, or check the data and the initial "
                     "weights (no final checkpoint was written)");
  run_eval();
  if (last_saved != p.step) save();
  sum.steps = p.step;
  sum.final_checkpoint = (fs::path(cfg.out_dir) / "checkpoints" / ("step-" + std::to_string(p.step))).string();
  sum.eval = eval_metrics;
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sum;
}

std::map<std::string, double> run_evaluation(const TrainConfig& cfg, const std::string& checkpoint,
                                             Communicator* comm_in, EvalReport* report) {
  std::unique_ptr<Communicator> own_comm;
  if (!comm_in) own_comm = make_communicator();
  Communicator& comm = comm_in ? *comm_in : *own_comm;
  auto be = make_backend(cfg, comm);
  auto tok = run_tokenizer(cfg);
  auto policy = load_verified_model(*be, checkpoint, model_dtype(cfg));
  policy->set_mode(GPT2::ModelMode::ForwardOnly);  // scored only
  DataOptions dopt = data_options(cfg);
  bind_model_ids(cfg, *policy, checkpoint, *tok, dopt);
  check_fits(cfg, *policy, checkpoint, dopt.vocab_size);
  policy->set_logits_chunk_rows(cfg.logits_chunk_rows);
  policy->set_logits_chunk_bytes(cfg.logits_chunk_bytes);
  const std::string path = cfg.eval_file.empty() ? cfg.train_file : cfg.eval_file;
  LoadStats st;
  auto data = load_preferences(path, *tok, dopt, &st);
  check_same_on_all_ranks(comm, {static_cast<double>(data.size())}, "the number of evaluation records");
  LossConfig lc = loss_config(cfg);
  std::unique_ptr<GPT2> ref;
  if (!cfg.reference_free) {
    const std::string ref_dir = cfg.ref_model.empty() ? cfg.model : cfg.ref_model;
    ref = load_verified_model(*be, ref_dir, model_dtype(cfg));
    ref->set_mode(GPT2::ModelMode::ForwardOnly);
    check_fits(cfg, *ref, ref_dir, dopt.vocab_size);
    ref->set_logits_chunk_rows(cfg.logits_chunk_rows);
    ref->set_logits_chunk_bytes(cfg.logits_chunk_bytes);
  }
  const auto t0 = std::chrono::steady_clock::now();
  // eval_num_tokens: the training tokens the checkpoint's run had seen (TRL reports the trainer's count), when
  // its trainer_state.json records them.
  BatchShape shape = batch_shape(cfg);
  shape.pad_id = dopt.pad_id;
  auto metrics = evaluate(comm, *policy, ref.get(), nullptr, data, lc, cfg.per_device_eval_batch_size,
                          checkpoint_num_tokens(checkpoint), shape);
  if (report) {
    report->pairs = static_cast<int64_t>(data.size());
    report->truncated = st.truncated;
    report->dropped = st.dropped;
    report->skipped = st.skipped;
    report->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return metrics;
}

}  // namespace dpo
