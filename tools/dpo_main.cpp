// The `dpo` command line. Exit codes: 0 success, 1 internal or library failure, 2 bad usage or bad input
// (flags, configs, data, checkpoints), with a message naming the file, line or key.
#include <CLI/CLI.hpp>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <new>
#include <system_error>

#include <unistd.h>

#include "model/checkpoint.h"
#include "model/memory_plan.h"
#include "runtime/backend.h"
#include "runtime/comm.h"
#include "runtime/safetensors.h"
#include "train/bench.h"
#include "train/config.h"
#include "train/demo.h"
#include "train/hash.h"
#include "train/repro.h"
#include "train/run_control.h"
#include "train/sample.h"
#include "train/tokenizer.h"
#include "train/tokenizer_json.h"
#include "train/trainer.h"

namespace {

constexpr const char* kVersion = "0.1.0";

// Under mpirun/srun only rank 0 prints results (every rank computes them).
bool prints() { return dpo::launcher_rank() <= 0; }

// " (rank R)" when started by a launcher, for error messages.
std::string rank_tag() {
  const int r = dpo::launcher_rank();
  return r >= 0 && dpo::launcher_size() > 1 ? " (rank " + std::to_string(r) + ")" : "";
}

// A checkpoint directory named by `what` (a key or an argument) must be one before anything is loaded: a missing
// path, a file, a symlink loop or an unreadable path is an input error naming it, not a filesystem exception.
void check_checkpoint_dir(const std::string& dir, const std::string& what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw dpo::InputError(what + ": " + dir + ": cannot access: " + ec.message());
  if (!fs::exists(st)) throw dpo::InputError(what + ": " + dir + ": no such checkpoint directory");
  if (!fs::is_directory(st))
    throw dpo::InputError(what + ": " + dir +
                          ": not a directory (a checkpoint is a directory with config.json and model.safetensors)");
}

// "<out_dir>/checkpoints/latest", the file that names a run's newest step directory, stands for that directory
// wherever a checkpoint directory is expected (model, ref_model, eval, sample, info), so commands need not know
// the step count. Any other path is returned unchanged.
std::string resolve_latest(const std::string& path, const std::string& what, bool print) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  std::error_code ec;
  if (p.filename() != "latest" || !fs::is_regular_file(p, ec)) return path;
  std::ifstream f(p);
  std::string name;
  if (!(f >> name) || name.find('/') != std::string::npos || name == "." || name == "..")
    throw dpo::InputError(what + ": " + path + ": does not name a checkpoint directory of this run");
  const std::string dir = (p.parent_path() / name).string();
  if (print) std::fprintf(stderr, "%s: %s -> %s\n", what.c_str(), path.c_str(), dir.c_str());
  return dir;
}

// out_dir is created only once the inputs are loaded (run_training); what would stop its creation is checked
// here, before any work: an existing non-directory, or a nearest existing ancestor that is not a writable
// directory.
void check_out_dir(const std::string& out_dir, const std::string& what = "key 'out_dir'") {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::absolute(out_dir, ec);
  if (ec) throw dpo::InputError(what + ": " + out_dir + ": " + ec.message());
  bool self = true;
  for (; !p.empty(); p = p.parent_path(), self = false) {
    const fs::file_status st = fs::status(p, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)
      throw dpo::InputError(what + ": " + out_dir + ": cannot access " + p.string() + ": " + ec.message());
    if (!fs::exists(st)) {
      if (p == p.parent_path()) break;
      continue;
    }
    if (!fs::is_directory(st))
      throw dpo::InputError(what + ": " + out_dir + ": " + (self ? std::string("exists and") : p.string()) +
                            " is not a directory");
    if (::access(p.c_str(), W_OK | X_OK) != 0)
      throw dpo::InputError(what + ": " + out_dir + ": " + p.string() + " is not writable");
    return;
  }
}

// The model context that max_length must fit: the smallest n_positions of the checkpoints the run loads, given
// as (what, dir) pairs. Prints what fit_to_model changed.
void fit_config_to_dirs(dpo::TrainConfig& cfg, dpo::RunKind kind,
                        const std::vector<std::pair<std::string, std::string>>& dirs, bool print) {
  int64_t n_positions = 0;
  std::string smallest;
  for (const auto& [what, dir] : dirs) {
    check_checkpoint_dir(dir, what);
    const int64_t n = dpo::load_gpt2_config((std::filesystem::path(dir) / "config.json").string()).max_seq_len;
    if (smallest.empty() || n < n_positions) {
      n_positions = n;
      smallest = dir;
    }
  }
  for (const auto& note : dpo::fit_to_model(cfg, n_positions, smallest, kind))
    if (print) std::fprintf(stderr, "%s\n", note.c_str());
}

// The checkpoints of train and sft: the policy's start and the reference.
void fit_config_to_models(dpo::TrainConfig& cfg, dpo::RunKind kind, bool print) {
  std::vector<std::pair<std::string, std::string>> dirs = {{"key 'model'", cfg.model}};
  if (kind == dpo::RunKind::Dpo && !cfg.ref_model.empty()) dirs.push_back({"key 'ref_model'", cfg.ref_model});
  fit_config_to_dirs(cfg, kind, dirs, print);
}

int cmd_info(const std::string& dir_arg) {
  const std::string dir = resolve_latest(dir_arg, "checkpoint", true);
  check_checkpoint_dir(dir, "checkpoint");
  auto be = dpo::make_cpu_backend();
  dpo::LoadReport report;
  const bool verified = dpo::verify_checkpoint(dir, dpo::CheckpointUse::Model);
  auto model = dpo::load_gpt2_checkpoint(*be, dir, dpo::DType::F32, &report);
  const auto& c = model->config();
  std::printf("checkpoint   %s\n", dir.c_str());
  std::printf("model        %s\n", c.model_type.c_str());
  if (c.arch == dpo::Arch::Llama) {
    std::printf("kv_heads     %lld\n", static_cast<long long>(c.kv_heads()));
    std::printf("intermediate %lld\n", static_cast<long long>(c.mlp_width()));
    std::printf("rope_theta   %g%s\n", c.rope_theta, c.rope_scaling.enabled() ? " (llama3 scaling)" : "");
    std::printf("tied head    %s\n", c.tied_head() ? "yes" : "no");
  }
  std::printf("n_layer      %lld\n", static_cast<long long>(c.n_layer));
  std::printf("n_head       %lld\n", static_cast<long long>(c.n_head));
  std::printf("n_embd       %lld\n", static_cast<long long>(c.n_embd));
  std::printf("vocab_size   %lld\n", static_cast<long long>(c.vocab_size));
  std::printf("n_positions  %lld\n", static_cast<long long>(c.max_seq_len));
  std::printf("parameters   %lld\n", static_cast<long long>(c.num_parameters()));
  for (const auto& n : report.ignored) std::printf("ignored      %s (buffer, not a parameter)\n", n.c_str());
  std::printf("checksums    %s\n", verified ? "verified (checksums.json)" : "none (external checkpoint, not verified)");
  return 0;
}

// --arch and the Llama-family flags of `dpo init` (tools/dpo_main.cpp main()).
struct InitArch {
  std::string arch = "gpt2";
  double rms_norm_eps = 1e-6;
  double rope_factor = 0;  // --rope-scaling-factor: Llama 3's rope_type llama3 when > 0
  std::string tie = "true";
};

int cmd_init(const std::string& out, dpo::GPT2Config cfg, uint64_t seed, const InitArch& ia) {
  if (ia.arch != "gpt2") {
    cfg.arch = dpo::Arch::Llama;
    cfg.model_type = ia.arch;
    cfg.ln_eps = ia.rms_norm_eps;
    cfg.rope_scaling.factor = ia.rope_factor;
    if (ia.tie != "true" && ia.tie != "false")
      throw dpo::InputError("--tie-word-embeddings: expected true or false, got '" + ia.tie + "'");
    cfg.tie_word_embeddings = ia.tie == "true";
    cfg.attention_bias = ia.arch == "qwen2";  // Qwen2's q/k/v biases
  }
  cfg.validate("dpo init");
  // config.json names the special-token ids of the tokenizer the model is made for: the byte tokenizer's EOS
  // (256) for both, as GPT-2 uses <|endoftext|> (a smaller vocabulary, which that tokenizer cannot use, keeps
  // GPT-2's convention of the last id).
  const int64_t eos = dpo::make_tokenizer("byte")->eos_id();
  if (eos < cfg.vocab_size) cfg.bos_token_id = cfg.eos_token_id = eos;
  {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::file_status st = fs::status(out, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)
      throw dpo::InputError("--out " + out + ": cannot access: " + ec.message());
    if (fs::exists(st) && !fs::is_directory(st))
      throw dpo::InputError("--out " + out + ": exists and is not a directory (init writes a checkpoint directory)");
  }
  auto be = dpo::make_cpu_backend();
  std::unique_ptr<dpo::GPT2> made;
  try {
    made = std::make_unique<dpo::GPT2>(*be, cfg, dpo::DType::F32);
  } catch (const std::bad_alloc&) {
    throw dpo::InputError("dpo init: a model of " + std::to_string(cfg.num_parameters()) +
                          " parameters does not fit in this machine's memory (--n-layer, --n-embd, --vocab-size, "
                          "--n-positions)");
  }
  dpo::GPT2& model = *made;
  dpo::Rng rng(seed);
  model.init_random(rng);
  dpo::write_checksums(out, dpo::save_gpt2_checkpoint(model, out));  // the weights may be sharded (over 5 GB)
  std::printf("wrote %s (%s, %lld parameters, seed %llu)\n", out.c_str(), cfg.model_type.c_str(),
              static_cast<long long>(cfg.num_parameters()), static_cast<unsigned long long>(seed));
  return 0;
}

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string resume;
  bool plain = false;
  bool help_config = false;
};

void add_train_args(CLI::App* sub, TrainArgs& a, bool resume) {
  sub->add_option("--config,-c", a.config, "YAML config file (keys: --help-config)");
  sub->add_option("overrides", a.overrides, "key=value overrides applied after the config file");
  if (resume) sub->add_option("--resume", a.resume, "checkpoint directory to continue from, or 'latest'");
  sub->add_flag("--plain", a.plain, "plain progress lines even on a terminal");
  sub->add_flag("--help-config", a.help_config, "list every config key with its default and exit");
}

void print_metrics(const std::map<std::string, double>& m) {
  for (const auto& [k, v] : m) std::printf("  %-28s %.6g\n", k.c_str(), v);
}

int cmd_train(const TrainArgs& a, dpo::RunKind kind) {
  if (a.help_config) {
    std::fputs(dpo::config_help().c_str(), stdout);
    return 0;
  }
  dpo::TrainConfig cfg = dpo::load_train_config(a.config, a.overrides, kind);
  cfg.model = resolve_latest(cfg.model, "key 'model'", prints());
  if (!cfg.ref_model.empty()) cfg.ref_model = resolve_latest(cfg.ref_model, "key 'ref_model'", prints());
  fit_config_to_models(cfg, kind, prints());
  if (prints()) check_out_dir(cfg.out_dir);  // rank 0 writes out_dir
  if (!a.resume.empty() && a.resume != "latest") check_checkpoint_dir(a.resume, "--resume");
  dpo::RunOptions ro;
  ro.resume = a.resume;
  ro.plain_progress = a.plain;
  dpo::RunSummary s = dpo::run_training(cfg, kind, ro);
  if (s.stop_signal != 0) return dpo::stop_exit_code(s.stop_signal);  // the message is printed by the trainer
  if (!prints()) return 0;
  std::printf("done: %lld steps in %.1f s; checkpoint %s\n", static_cast<long long>(s.steps), s.seconds,
              s.final_checkpoint.c_str());
  print_metrics(s.last_log);
  print_metrics(s.eval);
  return 0;
}

struct PlanArgs {
  TrainArgs t;
  std::string device_memory;  // empty: the config's device_memory, else 80GiB
  int64_t ranks = 1;
  bool json = false;
};

// dpo plan: the memory model (model/memory_plan.h) of one training step of the config, per device. Exit 0 when
// it fits --device-memory, 1 when it does not, 2 for a bad config or flag.
int cmd_plan(const PlanArgs& a) {
  dpo::TrainConfig cfg = dpo::load_train_config(a.t.config, a.t.overrides, dpo::RunKind::Dpo);
  cfg.model = resolve_latest(cfg.model, "key 'model'", false);
  fit_config_to_models(cfg, dpo::RunKind::Dpo, false);
  const int64_t device_bytes =
      !a.device_memory.empty()   ? dpo::parse_bytes(a.device_memory, "--device-memory")
      : !cfg.device_memory.empty() ? dpo::parse_bytes(cfg.device_memory, "key 'device_memory'")
                                   : dpo::parse_bytes("80GiB", "--device-memory");
  if (a.ranks < 1) throw dpo::InputError("--ranks must be >= 1, got " + std::to_string(a.ranks));
  const dpo::MemoryPlanInput in = dpo::memory_plan_input(
      cfg, dpo::load_gpt2_config((std::filesystem::path(cfg.model) / "config.json").string()), a.ranks);
  const dpo::MemoryPlan plan = dpo::plan_memory(in);
  const bool fits = plan.total <= device_bytes;
  const dpo::MemoryTerm& big = plan.largest();
  if (a.json) {
    nlohmann::json j;
    j["terms"] = nlohmann::json::array();
    for (const auto& t : plan.terms) j["terms"].push_back({{"name", t.name}, {"bytes", t.bytes}, {"note", t.note}});
    j["total_bytes"] = plan.total;
    j["activation_bytes"] = plan.activations;
    j["device_memory_bytes"] = device_bytes;
    j["fits"] = fits;
    j["largest"] = big.name;
    j["reduce_largest"] = dpo::memory_term_remedy(big.name);
    j["micro_batch"] = {{"pairs", in.pairs}, {"rows", in.rows}, {"T", in.T}};
    std::printf("%s\n", j.dump(2).c_str());
    return fits ? 0 : 1;
  }
  std::printf("memory plan per device: %s, %lld layers, width %lld, %s, micro-batch %lld pairs = %lld rows x %lld "
              "slots, gradient_checkpointing %s, reference %s, %lld rank(s)%s\n",
              cfg.model.c_str(), static_cast<long long>(in.model.n_layer), static_cast<long long>(in.model.n_embd),
              cfg.precision.c_str(), static_cast<long long>(in.pairs), static_cast<long long>(in.rows),
              static_cast<long long>(in.T),
              in.checkpoint_interval > 0 ? ("interval " + std::to_string(in.checkpoint_interval)).c_str() : "off",
              in.reference == dpo::ReferencePlan::Live ? "live" : in.reference == dpo::ReferencePlan::Cached
                                                                      ? "cached"
                                                                      : "none",
              static_cast<long long>(a.ranks), in.zero1 ? ", ZeRO-1" : "");
  for (const auto& t : plan.terms)
    std::printf("  %-40s %12s  %s\n", t.name.c_str(), dpo::format_bytes(t.bytes).c_str(), t.note.c_str());
  std::printf("  %-40s %12s\n", "total", dpo::format_bytes(plan.total).c_str());
  if (fits)
    std::printf("fits in %s (%s left)\n", dpo::format_bytes(device_bytes).c_str(),
                dpo::format_bytes(device_bytes - plan.total).c_str());
  else
    std::printf("does not fit in %s (%s over); the largest term is '%s' (%s): %s\n",
                dpo::format_bytes(device_bytes).c_str(), dpo::format_bytes(plan.total - device_bytes).c_str(),
                big.name.c_str(), dpo::format_bytes(big.bytes).c_str(), dpo::memory_term_remedy(big.name).c_str());
  return fits ? 0 : 1;
}

struct EvalArgs {
  TrainArgs t;
  std::string checkpoint;
  std::string eval_file;  // --eval-file
  std::string ref_model;  // --ref-model
  std::string out_dir;    // --out-dir
};

// Whether `key` is set at the top level of the YAML file `path` (false when there is none or it does not parse:
// load_train_config then reports the file's error).
bool config_sets(const std::string& path, const std::string& key) {
  if (path.empty()) return false;
  try {
    const YAML::Node root = YAML::LoadFile(path);
    return root.IsMap() && root[key] && !root[key].IsNull();
  } catch (const std::exception&) {
    return false;
  }
}

bool override_sets(const std::vector<std::string>& ov, const std::string& key) {
  for (const auto& o : ov)
    if (o.rfind(key + "=", 0) == 0) return true;
  return false;
}

// The reference that the run which wrote `checkpoint` used: its trainer_state.json's configuration (ref_model,
// else model). Empty when the checkpoint records none (an external model, `dpo init`). The checkpoint is verified
// against its checksums first, trainer_state.json included.
std::string recorded_reference(const std::string& checkpoint) {
  namespace fs = std::filesystem;
  dpo::verify_checkpoint(checkpoint, dpo::CheckpointUse::Model);
  const std::string state = (fs::path(checkpoint) / "trainer_state.json").string();
  std::error_code ec;
  if (!fs::is_regular_file(state, ec)) return "";
  nlohmann::json st;
  try {
    std::ifstream f(state);
    st = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw dpo::InputError(state + ": not valid JSON: " + e.what());
  }
  if (!st.is_object() || !st.contains("config") || !st["config"].is_string()) return "";
  YAML::Node c;
  try {
    c = YAML::Load(st["config"].get<std::string>());
  } catch (const YAML::Exception& e) {
    throw dpo::InputError(state + ": field 'config' is not valid YAML: " + e.what());
  }
  if (!c.IsMap()) return "";
  for (const char* key : {"ref_model", "model"})
    if (c[key] && c[key].IsScalar() && !c[key].Scalar().empty()) return c[key].Scalar();
  return "";
}

// `what` (a flag or key) must name a readable regular file.
void check_input_file(const std::string& path, const std::string& what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    throw dpo::InputError(what + ": " + path + ": cannot access: " + ec.message());
  if (!fs::exists(st)) throw dpo::InputError(what + ": " + path + ": no such file");
  if (!fs::is_regular_file(st)) throw dpo::InputError(what + ": " + path + ": not a regular file (JSONL expected)");
}

// `dpo eval CHECKPOINT [--eval-file FILE] [--ref-model DIR] [--out-dir DIR] [--config run.yaml] [key=value ...]`.
// Without --config the remaining keys take their defaults; with it, the run's configuration supplies the
// evaluation keys (eval_file, else train_file; ref_model, else model; the data and loss keys). The flags win over
// the configuration. The reference, when neither names one, is the one recorded in the checkpoint's
// trainer_state.json (TRL's reference: the model training started from). Nothing is written to --out-dir before
// the evaluation has run.
int cmd_eval(const EvalArgs& e) {
  namespace fs = std::filesystem;
  const TrainArgs& a = e.t;
  if (a.help_config) {
    std::fputs(dpo::config_help().c_str(), stdout);
    return 0;
  }
  const bool print = prints();
  // Evaluation needs no training file, model or out_dir keys: placeholders keep validation uniform where neither
  // the config file nor an override sets them (the config's out_dir is the training run's, never written here).
  const std::string kUnset = "(unset)";
  std::vector<std::string> ov = {"out_dir=."};
  const bool have_model = config_sets(a.config, "model") || override_sets(a.overrides, "model");
  const bool have_train_file = config_sets(a.config, "train_file") || override_sets(a.overrides, "train_file");
  if (!have_model) ov.push_back("model=" + kUnset);
  if (!have_train_file) ov.push_back("train_file=" + kUnset);
  ov.insert(ov.end(), a.overrides.begin(), a.overrides.end());
  dpo::TrainConfig cfg = dpo::load_train_config(a.config, ov, dpo::RunKind::Dpo);

  // Where the metrics go: --out-dir, or an explicit out_dir=DIR override (the same thing).
  std::string out_dir = e.out_dir;
  if (override_sets(a.overrides, "out_dir")) {
    if (!out_dir.empty() && out_dir != cfg.out_dir)
      throw dpo::InputError("--out-dir " + out_dir + " and the override out_dir=" + cfg.out_dir +
                            " name different directories; give one");
    out_dir = cfg.out_dir;
  }
  if (!e.out_dir.empty() || override_sets(a.overrides, "out_dir"))
    if (out_dir.empty()) throw dpo::InputError("--out-dir: empty directory name");

  const std::string policy = resolve_latest(e.checkpoint, "checkpoint", print);
  check_checkpoint_dir(policy, "checkpoint");

  // The evaluation data.
  std::string eval_file, eval_what;
  if (!e.eval_file.empty()) {
    eval_file = e.eval_file;
    eval_what = "--eval-file";
  } else if (!cfg.eval_file.empty()) {
    eval_file = cfg.eval_file;
    eval_what = "key 'eval_file'";
  } else if (have_train_file) {
    eval_file = cfg.train_file;
    eval_what = "key 'train_file'";
  } else {
    throw dpo::InputError("--eval-file: required (the preference pairs to evaluate on, JSONL), unless --config or "
                          "an override sets eval_file or train_file");
  }
  check_input_file(eval_file, eval_what);

  // The reference: --ref-model, ref_model, model, else the one the checkpoint's run recorded.
  std::string ref, ref_what;
  if (cfg.reference_free) {
    if (!e.ref_model.empty())
      throw dpo::InputError("--ref-model " + e.ref_model + ": reference_free is true, so no reference is used");
  } else if (!e.ref_model.empty()) {
    ref = e.ref_model;
    ref_what = "--ref-model";
  } else if (!cfg.ref_model.empty()) {
    ref = cfg.ref_model;
    ref_what = "key 'ref_model'";
  } else if (have_model) {
    ref = cfg.model;
    ref_what = "key 'model'";
  } else {
    ref = recorded_reference(policy);
    if (ref.empty())
      throw dpo::InputError("--ref-model: required: " + policy +
                            " records no reference (it has no trainer_state.json of a dpo run); pass --ref-model DIR "
                            "(the model training started from) or reference_free=true");
    ref_what = "the reference recorded in " + (fs::path(policy) / "trainer_state.json").string() +
               " (--ref-model to choose another)";
    if (print) std::fprintf(stderr, "reference: %s (recorded by the run that wrote %s)\n", ref.c_str(), policy.c_str());
  }
  if (!ref.empty()) {
    ref = resolve_latest(ref, ref_what, print);
    check_checkpoint_dir(ref, ref_what);
  }
  if (print && !out_dir.empty()) check_out_dir(out_dir, "--out-dir");

  cfg.eval_file = eval_file;
  cfg.ref_model = ref;
  if (!have_model && !ref.empty()) cfg.model = ref;  // not read (ref_model is set); no placeholder in messages
  std::vector<std::pair<std::string, std::string>> dirs = {{"checkpoint", policy}};
  if (!ref.empty()) dirs.push_back({ref_what, ref});
  fit_config_to_dirs(cfg, dpo::RunKind::Dpo, dirs, print);

  // One writer per out_dir, as for training runs: an existing --out-dir is locked before the evaluation (a busy
  // one fails at once), a new one as soon as it is created, after the evaluation.
  std::unique_ptr<dpo::OutDirLock> out_lock;
  std::error_code lock_ec;
  if (print && !out_dir.empty() && fs::is_directory(out_dir, lock_ec))
    out_lock = std::make_unique<dpo::OutDirLock>(out_dir, "--out-dir");
  const std::string eval_sha256 = out_dir.empty() ? "" : dpo::sha256_file(eval_file);
  dpo::EvalReport report;
  auto m = dpo::run_evaluation(cfg, policy, nullptr, &report);
  if (!print) return 0;
  if (report.dropped > 0)
    std::fprintf(stderr, "%s: dropped %lld records whose prompt alone has >= max_length (%lld) tokens (truncation: "
                 "trl1, as TRL 1.x); evaluated %lld pairs\n", eval_file.c_str(), static_cast<long long>(report.dropped),
                 static_cast<long long>(cfg.max_length), static_cast<long long>(report.pairs));
  print_metrics(m);
  if (out_dir.empty()) return 0;

  // TRL's trainer.evaluate() names: the eval_ metrics, eval_samples, eval_runtime, eval_samples_per_second.
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : m) j[k] = v;
  j["eval_samples"] = report.pairs;
  j["eval_runtime"] = report.seconds;
  j["eval_samples_per_second"] = report.seconds > 0 ? static_cast<double>(report.pairs) / report.seconds : 0.0;
  j["checkpoint"] = policy;
  j["eval_file"] = eval_file;
  j["eval_file_sha256"] = eval_sha256;
  j["ref_model"] = ref.empty() ? nlohmann::json(nullptr) : nlohmann::json(ref);
  j["reference_free"] = cfg.reference_free;
  j["eval_truncated"] = report.truncated;
  j["eval_dropped"] = report.dropped;
  j["eval_skipped"] = report.skipped;
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw dpo::InputError("--out-dir: " + out_dir + ": cannot create: " + ec.message());
  if (!out_lock) out_lock = std::make_unique<dpo::OutDirLock>(out_dir, "--out-dir");
  const std::string path = (fs::path(out_dir) / "eval_metrics.json").string();
  dpo::write_file_atomic(path, j.dump(2) + "\n");
  std::printf("wrote %s\n", path.c_str());
  return 0;
}

struct SampleArgs {
  std::string checkpoint;
  std::vector<std::string> prompts;
  dpo::SampleOptions opt;
  uint64_t seed = 0;
  int64_t num = 1;
  std::string tokenizer;  // empty: the checkpoint's tokenizer.json when it has one, else byte
};

int cmd_sample(SampleArgs& a) {
  a.checkpoint = resolve_latest(a.checkpoint, "checkpoint", true);
  check_checkpoint_dir(a.checkpoint, "checkpoint");
  auto be = dpo::make_cpu_backend();
  dpo::verify_checkpoint(a.checkpoint, dpo::CheckpointUse::Model);
  auto model = dpo::load_gpt2_checkpoint(*be, a.checkpoint, dpo::DType::F32);
  const std::filesystem::path next_to_model = std::filesystem::path(a.checkpoint) / "tokenizer.json";
  std::error_code ec;
  auto tok = dpo::make_tokenizer(!a.tokenizer.empty() ? a.tokenizer
                                 : std::filesystem::is_regular_file(next_to_model, ec) ? next_to_model.string()
                                                                                        : "byte");
  if (auto* json_tok = dynamic_cast<dpo::JsonTokenizer*>(tok.get())) {
    // Generation stops at the model's EOS (the first of a list); without one it runs to --max-new-tokens.
    const dpo::SpecialTokenIds ids = dpo::special_token_ids(model->config(), a.checkpoint);
    if (!ids.eos.empty()) json_tok->set_eos_id(static_cast<int32_t>(ids.eos[0]));
  } else if (tok->vocab_size() > model->config().vocab_size) {
    throw dpo::InputError(a.checkpoint + ": vocab_size " + std::to_string(model->config().vocab_size) +
                          " is smaller than the byte tokenizer's " + std::to_string(tok->vocab_size()));
  }
  if (a.num <= 0) throw dpo::InputError("--num must be > 0");
  a.opt.eos_id = tok->eos_id();
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : a.prompts) {
    if (!dpo::valid_utf8(p)) throw dpo::InputError("prompt is not valid UTF-8");
    const std::vector<int32_t> ids = tok->encode(p);
    for (int32_t id : ids)
      if (id >= model->config().vocab_size)
        throw dpo::InputError("prompt: the " + tok->name() + " tokenizer made token id " + std::to_string(id) +
                              ", outside the vocabulary of " + a.checkpoint + " (vocab_size " +
                              std::to_string(model->config().vocab_size) + ")");
    for (int64_t i = 0; i < a.num; ++i) prompts.push_back(ids);
  }
  // generate() stops a completion when the context is full; say so when --max-new-tokens asks for more than
  // that (capped, not refused: every prompt still gets as many tokens as fit).
  const int64_t n_pos = model->config().max_seq_len;
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  if (!prompts.empty() && static_cast<int64_t>(longest) < n_pos &&
      a.opt.max_new_tokens > n_pos - static_cast<int64_t>(longest))
    std::fprintf(stderr,
                 "dpo sample: note: --max-new-tokens %lld is capped by the %lld-token context (n_positions of %s): "
                 "the longest prompt (%zu tokens) gets at most %lld new tokens\n",
                 static_cast<long long>(a.opt.max_new_tokens), static_cast<long long>(n_pos), a.checkpoint.c_str(),
                 longest, static_cast<long long>(n_pos - static_cast<int64_t>(longest)));
  dpo::Rng rng(a.seed);
  auto outs = dpo::generate(*model, prompts, a.opt, rng);
  // A model's vocabulary may be larger than its tokenizer's (padded, as Qwen2's; or the byte tokenizer named for
  // a bigger model): ids without a token render as nothing, as in HF's decode, and are counted.
  int64_t unrenderable = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    std::vector<int32_t> ids;
    for (int32_t t : outs[i]) {
      if (t == tok->eos_id()) continue;
      if (t >= tok->vocab_size()) ++unrenderable;
      else ids.push_back(t);
    }
    std::printf("%s%s\n", a.prompts[i / static_cast<size_t>(a.num)].c_str(), tok->decode(ids).c_str());
  }
  if (unrenderable > 0)
    std::fprintf(stderr, "dpo sample: note: %lld sampled ids are outside the vocabulary of the %s tokenizer (%lld ids) "
                 "and were left out of the text\n", static_cast<long long>(unrenderable), tok->name().c_str(),
                 static_cast<long long>(tok->vocab_size()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  dpo::install_terminate_handler();
  CLI::App app{"dpo: Direct Preference Optimization for GPT-2 models, in C++ and CUDA"};
  app.set_version_flag("--version", kVersion);
  app.require_subcommand(1);

  std::string info_dir;
  auto* info = app.add_subcommand("info", "Load and validate an HF-format GPT-2 checkpoint; print its shape");
  info->add_option("checkpoint", info_dir, "Directory with config.json and model.safetensors")->required();

  std::string init_out;
  dpo::GPT2Config cfg;
  uint64_t seed = 0;
  InitArch init_arch;
  auto* init = app.add_subcommand("init", "Write a randomly initialised GPT-2 or Llama-family checkpoint in HF format");
  init->add_option("--out", init_out, "Output directory")->required();
  init->add_option("--arch", init_arch.arch, "gpt2, or a Llama-family model_type: llama, qwen2 (q/k/v biases), mistral")
      ->check(CLI::IsMember({"gpt2", "llama", "qwen2", "mistral"}))
      ->capture_default_str();
  init->add_option("--n-layer,--num-hidden-layers", cfg.n_layer, "Transformer blocks")->capture_default_str();
  init->add_option("--n-head,--num-attention-heads", cfg.n_head, "Attention heads")->capture_default_str();
  init->add_option("--n-embd,--hidden-size", cfg.n_embd, "Width")->capture_default_str();
  init->add_option("--vocab-size", cfg.vocab_size, "Vocabulary size")->capture_default_str();
  init->add_option("--n-positions,--max-position-embeddings", cfg.max_seq_len, "Context length")
      ->capture_default_str();
  init->add_option("--num-key-value-heads", cfg.n_kv_head, "Llama family: key/value heads (0: --n-head)")
      ->capture_default_str();
  init->add_option("--intermediate-size", cfg.intermediate_size, "Llama family: SwiGLU width (0: 4 x width)")
      ->capture_default_str();
  init->add_option("--rope-theta", cfg.rope_theta, "Llama family: rotary base")->capture_default_str();
  init->add_option("--rms-norm-eps", init_arch.rms_norm_eps, "Llama family: RMSNorm epsilon")->capture_default_str();
  init->add_option("--tie-word-embeddings", init_arch.tie, "Llama family: LM head tied to the embedding (true/false)")
      ->capture_default_str();
  init->add_option("--rope-scaling-factor", init_arch.rope_factor,
                   "Llama family: Llama 3 rope scaling factor (0: none; low/high frequency factors 1/4, original "
                   "context 8192, as Llama 3.2)")
      ->capture_default_str();
  init->add_option("--seed", seed, "RNG seed")->capture_default_str();

  TrainArgs train_args, sft_args;
  auto* train = app.add_subcommand("train", "DPO-family training (TRL's per-pair loss types; --help-config lists them)");
  add_train_args(train, train_args, true);
  auto* sftc = app.add_subcommand("sft", "Supervised fine-tuning on {prompt, completion} JSONL");
  add_train_args(sftc, sft_args, true);
  EvalArgs ea;
  auto* evalc = app.add_subcommand("eval", "Evaluate a policy checkpoint on preference pairs (eval_* metrics)");
  evalc->add_option("checkpoint", ea.checkpoint, "policy checkpoint directory")->required();
  evalc->add_option("--eval-file", ea.eval_file,
                    "preference pairs to evaluate on, JSONL (default: the config's eval_file, else train_file)");
  evalc->add_option("--ref-model", ea.ref_model,
                    "reference model directory (default: the config's ref_model, else model, else the reference "
                    "recorded in the checkpoint's trainer_state.json)");
  evalc->add_option("--out-dir", ea.out_dir, "write <out-dir>/eval_metrics.json");
  add_train_args(evalc, ea.t, false);

  SampleArgs sa;
  auto* sample = app.add_subcommand("sample", "Sample completions from a checkpoint");
  sample->add_option("checkpoint", sa.checkpoint, "checkpoint directory")->required();
  sample->add_option("--prompt,-p", sa.prompts, "prompt text (repeatable)")->required();
  sample->add_option("--num,-n", sa.num, "samples per prompt")->capture_default_str();
  sample->add_option("--tokenizer", sa.tokenizer,
                     "byte or a tokenizer.json path; default: the checkpoint's tokenizer.json if present, else byte");
  sample->add_option("--temperature", sa.opt.temperature, "0 = greedy")->capture_default_str();
  sample->add_option("--top-k", sa.opt.top_k, "keep the k most likely tokens; 0 = off")->capture_default_str();
  sample->add_option("--top-p", sa.opt.top_p, "nucleus sampling mass; 1 = off")->capture_default_str();
  sample->add_option("--max-new-tokens", sa.opt.max_new_tokens, "tokens to generate")->capture_default_str();
  sample->add_option("--seed", sa.seed, "sampling seed")->capture_default_str();

  dpo::DemoOptions demo_opt;
  auto* demo = app.add_subcommand("demo", "Built-in offline task: SFT, preference pairs from a known reward, DPO, report");
  demo->add_option("--out,-o", demo_opt.out_dir, "output directory")->required();
  demo->add_option("--betas", demo_opt.betas, "DPO beta values (one DPO run each)")->delimiter(',')->capture_default_str();
  demo->add_option("--seed", demo_opt.seed, "seed for the corpus, initialisation and sampling")->capture_default_str();
  demo->add_option("--threads", demo_opt.num_threads, "CPU threads; 0 = OpenMP default")
      ->check(CLI::Range(int64_t{0}, dpo::kMaxThreads))  // the bound of the num_threads key
      ->capture_default_str();
  demo->add_flag("--plain", demo_opt.plain_progress, "plain progress lines even on a terminal");

  dpo::ReproOptions repro_opt;
  bool repro_list = false;
  auto* repro = app.add_subcommand(
      "repro",
      "Small reproductions of the DPO, IPO and ODPO papers' claims, with PASS/FAIL criteria from theory.\n"
      "Writes DIR/report.json, DIR/report.md and PNG plots and prints one PASS/FAIL line per criterion.\n"
      "Exit status: 0 when every criterion passes, 1 when one fails, 2 on bad input. docs/reproductions.md");
  repro->add_option("name", repro_opt.name,
                    "experiment: ipo-bandit, optimum, overfit, frontier, odpo (dpo repro --list)");
  repro->add_flag("--list", repro_list, "list the experiments, one line each, and exit");
  repro->add_option("--out,-o", repro_opt.out_dir, "output directory (must not hold a report.json)");
  repro->add_flag("--full", repro_opt.full,
                  "the paper-sized version (more steps / pairs / seeds; frontier, odpo: many times the default)");
  repro->add_option("--seed", repro_opt.seed, "seed for data, reference, reward and batches")->capture_default_str();
  repro->add_option("--threads", repro_opt.num_threads,
                    "CPU threads; 0 = OpenMP default (frontier's and odpo's numbers may change with it)")
      ->check(CLI::Range(int64_t{0}, dpo::kMaxThreads))
      ->capture_default_str();

  PlanArgs plan_args;
  auto* planc = app.add_subcommand("plan", "Predict the peak memory per device of a training step of a config; exit 0 "
                                           "when it fits --device-memory, 1 when not");
  planc->add_option("--config,-c", plan_args.t.config, "YAML config file (keys: dpo train --help-config)");
  planc->add_option("overrides", plan_args.t.overrides, "key=value overrides applied after the config file");
  planc->add_option("--device-memory", plan_args.device_memory,
                    "memory per device, e.g. 80GiB, 24GB; default: the config's device_memory, else 80GiB");
  planc->add_option("--ranks", plan_args.ranks, "data-parallel ranks (ZeRO-1's share with zero_stage: 1)")
      ->capture_default_str();
  planc->add_flag("--json", plan_args.json, "print the plan as JSON");

  dpo::BenchOptions bench_opt;
  std::string bench_json;
  auto* bench = app.add_subcommand("bench", "Time full DPO optimizer steps on a random-init GPT-2 and synthetic pairs");
  bench->add_option("--shape", bench_opt.shape, "tiny, small, gpt2-124m, gpt2-350m, llama-tiny, smollm-135m, smollm-360m, qwen2-0.5b or llama-1b")->capture_default_str();
  bench->add_option("--workload", bench_opt.workload, "hh (150/90/70), tldr (512/35/35), long (768/256/256), custom")
      ->capture_default_str();
  bench->add_option("--prompt-len", bench_opt.prompt_len, "custom workload: prompt tokens");
  bench->add_option("--chosen-len", bench_opt.chosen_len, "custom workload: chosen completion tokens");
  bench->add_option("--rejected-len", bench_opt.rejected_len, "custom workload: rejected completion tokens");
  bench->add_option("--pairs", bench_opt.pairs, "preference pairs per step")->capture_default_str();
  bench->add_option("--steps", bench_opt.steps, "timed optimizer steps")->capture_default_str();
  bench->add_option("--warmup", bench_opt.warmup, "untimed steps first")->capture_default_str();
  bench->add_option("--reference", bench_opt.reference, "precomputed (fixed log-probs) or live (reference forward)")
      ->capture_default_str();
  bench->add_option("--device", bench_opt.device, "cpu or cuda")->capture_default_str();
  bench->add_option("--threads", bench_opt.threads, "CPU threads; 0 = OpenMP default")
      ->check(CLI::Range(int64_t{0}, dpo::kMaxThreads))
      ->capture_default_str();
  bench->add_option("--peak-tflops", bench_opt.peak_tflops, "peak for MFU (default: 989 on cuda, none on cpu)");
  bench->add_option("--length-spread", bench_opt.length_spread,
                    "none (every pair the workload's exact lengths, default) or lognormal (lengths spread over a fixed "
                    "log-normal quantile table, sigma 0.4)");
  bench->add_option("--precision", bench_opt.precision, "fp32 (default) or bf16 (bf16 weights/activations, fp32 master)");
  bench->add_option("--logits-chunk-rows", bench_opt.logits_chunk_rows,
                    "token rows per chunk of the LM head and log-softmax (default 2048; at least one pair)");
  bench->add_option("--gradient-checkpointing", bench_opt.gradient_checkpointing,
                    "activation recomputation with N blocks per segment (as gradient_checkpointing_interval); 0 = off")
      ->capture_default_str();
  bench->add_option("--seed", bench_opt.seed, "seed for weights and tokens")->capture_default_str();
  bench->add_option("--json", bench_json, "write the results as JSON to this file");
  bench->add_option("--batch-layout", bench_opt.batch_layout,
                    "padded (default), packed or prefix_shared (as the training key batch_layout)")
      ->capture_default_str();
  bench->add_option("--max-tokens-per-row", bench_opt.max_tokens_per_row,
                    "packed / prefix_shared row length; 0 = twice the longest pair's padded row")
      ->capture_default_str();
  bench->add_option("--cuda-graphs", bench_opt.cuda_graphs,
                    "on (default) or off: capture the policy's forward, loss and backward as a CUDA graph and replay it "
                    "(as the training key cuda_graphs; --device cuda only)")
      ->transform(CLI::CheckedTransformer(std::map<std::string, bool>{{"on", true}, {"off", false}}))
      ->capture_default_str();
  bench->add_option("--head-compaction", bench_opt.head_compaction,
                    "on (default) or off: the LM head computes logits only for the scored (completion) slots, or for "
                    "every slot")
      ->transform(CLI::CheckedTransformer(std::map<std::string, bool>{{"on", true}, {"off", false}}))
      ->capture_default_str();
  bench->add_flag("--kernels", bench_opt.kernels,
                  "GPU time per kernel over the timed steps, from CUPTI activity records (--device cuda, CUDA build)");
  bench->add_option("--attn-implementation", bench_opt.attn_implementation,
                    "eager (default) or flash (the flash attention kernels; --device cuda --precision bf16), as the "
                    "training key attn_implementation")
      ->capture_default_str();
  bench->add_flag("--attention-only", bench_opt.attention_only,
                  "time causal attention alone (bf16; forward and forward+backward, eager and, on cuda, flash) "
                  "instead of DPO steps; --steps runs per measurement, median");
  bench->add_option("--seq-lens", bench_opt.seq_lens, "--attention-only: sequence lengths T, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  bench->add_option("--attn-batch", bench_opt.attn_batch, "--attention-only: batch size B")->capture_default_str();
  bench->add_option("--attn-heads", bench_opt.attn_heads, "--attention-only: heads H")->capture_default_str();
  bench->add_option("--attn-head-dim", bench_opt.attn_head_dim, "--attention-only: head dimension d")
      ->capture_default_str();

  // An unknown subcommand is named (CLI11 would only say that a subcommand is required).
  if (argc > 1 && argv[1][0] != '-') {
    const std::string name = argv[1];
    std::string known;
    bool found = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known += (known.empty() ? "" : ", ") + sub->get_name();
      found = found || sub->get_name() == name;
    }
    if (!found) {
      std::fprintf(stderr, "dpo: error: unknown subcommand '%s'; known: %s (dpo --help)\n", name.c_str(),
                   known.c_str());
      return 2;
    }
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  try {
    if (*info) return cmd_info(info_dir);
    if (*init) return cmd_init(init_out, cfg, seed, init_arch);
    if (*train) return cmd_train(train_args, dpo::RunKind::Dpo);
    if (*sftc) return cmd_train(sft_args, dpo::RunKind::Sft);
    if (*evalc) return cmd_eval(ea);
    if (*sample) return cmd_sample(sa);
    if (*planc) return cmd_plan(plan_args);
    if (*bench) {
      std::string cl;
      for (int i = 0; i < argc; ++i) cl += (i ? " " : "") + std::string(argv[i]);
      bench_opt.command_line = cl;
      bench_opt.json_path = bench_json;
      dpo::run_bench(bench_opt);
      return 0;
    }
    if (*repro) {
      if (repro_list) {
        for (const dpo::ReproExperiment& e : dpo::repro_experiments())
          std::printf("%-11s %s\n", e.name.c_str(), e.summary.c_str());
        return 0;
      }
      if (repro_opt.name.empty())
        throw dpo::InputError("repro: an experiment name is required (dpo repro --list names them)");
      return dpo::run_repro(repro_opt);
    }
    if (*demo) {
      dpo::run_demo(demo_opt);
      return 0;
    }
  } catch (const dpo::InputError& e) {
    std::fprintf(stderr, "dpo: error%s: %s\n", rank_tag().c_str(), e.what());
    dpo::abort_job_if_distributed(2);  // under MPI: end every rank now (the others may be waiting on this one)
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dpo: internal error%s: %s\n", rank_tag().c_str(), e.what());
    dpo::abort_job_if_distributed(1);
    return 1;
  }
  return 0;
}
