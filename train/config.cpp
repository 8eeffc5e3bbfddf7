#include "train/config.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <system_error>

#include "runtime/error.h"
#include "runtime/safetensors.h"

namespace dpo {

namespace {

// The documents of a YAML stream, as far as a config needs to know: where each of the first two starts. Counting
// through yaml-cpp's event parser, at most two documents, instead of YAML::LoadAll: yaml-cpp 0.7's LoadAll never
// returns on some malformed streams (", " is one: each call yields an empty document without consuming the ','),
// which the config fuzz target (tests/fuzz) found.
class DocumentStarts final : public YAML::EventHandler {
 public:
  std::vector<YAML::Mark> starts;
  void OnDocumentStart(const YAML::Mark& mark) override { starts.push_back(mark); }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
};

// The one document of a config file (a null node for an empty file). A second document, or a stream the parser
// cannot get past, is an InputError naming path:line.
YAML::Node load_single_document(const std::string& text, const std::string& path) {
  auto at = [&](const YAML::Mark& m) { return path + ":" + std::to_string(m.line + 1); };
  try {
    std::istringstream in(text);
    YAML::Parser parser(in);
    DocumentStarts docs;
    for (int i = 0; i < 2 && parser.HandleNextDocument(docs); ++i) {
    }
    if (docs.starts.size() > 1) {
      const YAML::Mark& a = docs.starts[0];
      const YAML::Mark& b = docs.starts[1];
      if (b.pos <= a.pos)  // no progress: the parser is stuck on a token no document can start with
        throw InputError(at(b) + ": not valid YAML: unexpected content (a config file is one mapping of key: value)");
      throw InputError(at(b) + ": a second YAML document (after '---'); a config file holds exactly one mapping");
    }
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw InputError(path + ":" + std::to_string(e.mark.line + 1) + ": not valid YAML: " + e.msg);
  }
}

enum class Kind { Int, Double, Bool, String, StringList, DoubleList };

struct Key {
  const char* name;
  Kind kind;
  const char* help;
  // Sets the field from a YAML node; throws std::string with the reason on a type error.
  std::function<void(TrainConfig&, const YAML::Node&)> set;
  std::function<YAML::Node(const TrainConfig&)> get;
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Int: return "an integer";
    case Kind::Double: return "a number";
    case Kind::Bool: return "true or false";
    case Kind::String: return "a string";
    case Kind::StringList: return "a string or a list of strings";
    case Kind::DoubleList: return "a number or a list of numbers";
  }
  return "?";
}

std::string scalar_of(const YAML::Node& n) {
  if (n.IsScalar()) return n.Scalar();
  std::stringstream s;
  s << n;
  return s.str();
}

int64_t as_int(const YAML::Node& n) {
  if (!n.IsScalar()) throw std::string("expected an integer");
  const std::string s = n.Scalar();
  try {
    size_t pos = 0;
    long long v = std::stoll(s, &pos, 10);
    if (pos != s.size()) throw 0;
    return v;
  } catch (...) {
    throw std::string("expected an integer, got '" + s + "'");
  }
}

double as_double(const YAML::Node& n) {
  if (!n.IsScalar()) throw std::string("expected a number");
  const std::string s = n.Scalar();
  try {
    size_t pos = 0;
    double v = std::stod(s, &pos);
    if (pos != s.size()) throw 0;
    return v;
  } catch (...) {
    throw std::string("expected a number, got '" + s + "'");
  }
}

bool as_bool(const YAML::Node& n) {
  if (n.IsScalar()) {
    const std::string s = n.Scalar();
    if (s == "true" || s == "True" || s == "yes" || s == "on") return true;
    if (s == "false" || s == "False" || s == "no" || s == "off") return false;
  }
  throw std::string("expected true or false, got '" + scalar_of(n) + "'");
}

std::string as_string(const YAML::Node& n) {
  if (n.IsNull()) return "";
  if (!n.IsScalar()) throw std::string("expected a string");
  return n.Scalar();
}

template <class T, class F>
std::vector<T> as_list(const YAML::Node& n, F one) {
  std::vector<T> out;
  if (n.IsSequence()) {
    for (const auto& e : n) out.push_back(one(e));
  } else {
    out.push_back(one(n));
  }
  return out;
}

#define INT_KEY(f, help)                                                                                 \
  Key {                                                                                                  \
    #f, Kind::Int, help, [](TrainConfig& c, const YAML::Node& n) { c.f = as_int(n); },                    \
        [](const TrainConfig& c) { return YAML::Node(c.f); }                                             \
  }
// Shortest text that reads back as the same double (0.1, not 0.10000000000000001).
YAML::Node double_node(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return YAML::Node(std::string(buf, r.ptr));
}

#define DOUBLE_KEY(f, help)                                                                              \
  Key {                                                                                                  \
    #f, Kind::Double, help, [](TrainConfig& c, const YAML::Node& n) { c.f = as_double(n); },              \
        [](const TrainConfig& c) { return double_node(c.f); }                                            \
  }
#define BOOL_KEY(f, help)                                                                                \
  Key {                                                                                                  \
    #f, Kind::Bool, help, [](TrainConfig& c, const YAML::Node& n) { c.f = as_bool(n); },                  \
        [](const TrainConfig& c) { return YAML::Node(c.f); }                                             \
  }
#define STRING_KEY(f, help)                                                                              \
  Key {                                                                                                  \
    #f, Kind::String, help, [](TrainConfig& c, const YAML::Node& n) { c.f = as_string(n); },              \
        [](const TrainConfig& c) { return YAML::Node(c.f); }                                             \
  }

const std::vector<Key>& keys() {
  static const std::vector<Key> k = {
      STRING_KEY(model, "policy initialisation: HF GPT-2 checkpoint directory (config.json + model.safetensors)"),
      STRING_KEY(ref_model, "reference model directory; empty = same as model"),
      STRING_KEY(train_file, "training data, JSONL (prompt/chosen/rejected or *_ids)"),
      STRING_KEY(eval_file, "evaluation data, JSONL; optional"),
      STRING_KEY(out_dir, "output directory: metrics.jsonl, checkpoints/, config.yaml"),
      STRING_KEY(tokenizer, "byte (ids 0-255 are bytes, 256 EOS), or the path of an HF tokenizer.json; unset: the model "
                            "directory's tokenizer.json when it has one, else byte"),
      INT_KEY(eos_token_id, "EOS appended to completions; -1 = the model's (config.json, else generation_config.json; "
                            "the first of a list); the byte tokenizer's text records use 256 unless this is set"),
      INT_KEY(pad_token_id, "the id that fills padding slots (never scored, so results do not depend on it); -1 = "
                            "the model's pad_token_id (config.json, else generation_config.json), else 0"),
      STRING_KEY(device, "cpu or cuda"),
      STRING_KEY(precision, "fp32, or bf16: bf16 weights and activations with fp32 master weights, gradients and "
                            "optimizer state (meant for cuda; on cpu it is emulated and slow)"),
      INT_KEY(seed, "seed for data order and sampling"),
      INT_KEY(num_threads, "CPU threads, 0 to 1024; 0 = OpenMP default"),
      INT_KEY(zero_stage, "0 or 1; 1 shards the AdamW moments across the ranks (ZeRO-1; same results)"),
      INT_KEY(logits_chunk_rows, "token rows per chunk of the LM head and log-softmax (a chunk holds at least one "
                                 "pair); logits memory is chunk x vocab, independent of the batch size"),
      INT_KEY(logits_chunk_bytes, "bytes of logits per chunk of the LM head (default 536870912 = 512 MiB): the rows "
                                  "are the fewer of logits_chunk_rows and this over one row's bytes (vocab x dtype "
                                  "size), at least one pair"),
      BOOL_KEY(gradient_checkpointing, "recompute each block's activations in the backward instead of keeping them "
                                        "(bitwise the same results; docs/training.md, \"Memory\")"),
      INT_KEY(gradient_checkpointing_interval, "with gradient_checkpointing: blocks per recomputed segment (1 to "
                                               "2^31 - 1, above n_layer: n_layer); one [B,T,C] input kept per "
                                               "segment, one segment's activations live at a time"),
      STRING_KEY(device_memory, "memory per device for the fit check before training, e.g. 80GiB or 24GB; unset: the "
                                "device's free memory on cuda, no check on cpu"),
      BOOL_KEY(allow_memory_overcommit, "start training even when the memory model (dpo plan) says the step does not "
                                        "fit device_memory or the device's free memory"),
      INT_KEY(max_length, "maximum prompt + completion tokens; unset: min(512, the model's n_positions)"),
      STRING_KEY(truncation, "trl1 (TRL 1.x: prompt + completion cut to max_length, records whose prompt has >= "
                             "max_length tokens dropped and counted) or legacy (prompt cut to max_prompt_length "
                             "first); unset: legacy if max_prompt_length is set, else trl1"),
      INT_KEY(max_prompt_length, "truncation: legacy only: maximum prompt tokens (< max_length); 0 = unset: 256, or "
                                 "max_length / 2 when 256 does not fit"),
      STRING_KEY(truncation_mode, "trl1: keep_start (TRL 1.x's only supported value); legacy: which end of a long "
                                  "prompt is kept, keep_end or keep_start; unset: keep_start (trl1), keep_end "
                                  "(legacy)"),
      BOOL_KEY(skip_malformed, "skip and count malformed records instead of stopping"),
      Key{"loss_type", Kind::StringList, "one loss or a list (TRL's names): sigmoid, ipo, hinge, robust, cdpo, sft, "
                                         "exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, "
                                         "sigmoid_norm, simpo, aot, aot_unpaired (these two sort the micro-batch: "
                                         "batch_layout padded, logits of the whole micro-batch in memory)",
          [](TrainConfig& c, const YAML::Node& n) { c.loss_type = as_list<std::string>(n, as_string); },
          [](const TrainConfig& c) { return YAML::Node(c.loss_type); }},
      Key{"loss_weights", Kind::DoubleList, "weights of the loss_type list; empty = 1 each",
          [](TrainConfig& c, const YAML::Node& n) { c.loss_weights = as_list<double>(n, as_double); },
          [](const TrainConfig& c) {
            YAML::Node n(YAML::NodeType::Sequence);
            for (double w : c.loss_weights) n.push_back(double_node(w));
            return n;
          }},
      DOUBLE_KEY(beta, "KL strength beta, in (0, 1e6]; IPO's tau"),
      DOUBLE_KEY(label_smoothing, "epsilon of robust / cdpo / exo_pair / simpo / aot / aot_unpaired, in [0, 0.5); "
                                  "exo_pair needs > 0 (its paper: 1e-3)"),
      BOOL_KEY(ipo_length_normalize, "IPO on per-token mean log-ratios, as TRL's ipo; false: the IPO paper's "
                                     "summed log-ratios"),
      DOUBLE_KEY(odpo_alpha, "ODPO offset alpha * log(score_chosen - score_rejected), in [0, 1e6]; 0 = off"),
      DOUBLE_KEY(rpo_alpha, "weight of an added SFT term (NLL of the chosen completion), in [0, 1e6]; 0 = off"),
      BOOL_KEY(reference_free, "drop the reference model terms"),
      DOUBLE_KEY(discopop_tau, "DiscoPOP temperature tau of loss discopop, in (0, 1e6]"),
      DOUBLE_KEY(simpo_gamma, "SimPO target reward margin gamma of loss simpo, in [-1e6, 1e6]"),
      STRING_KEY(f_divergence_type, "f-DPO regulariser: reverse_kl (standard DPO), forward_kl, js_divergence or "
                                    "alpha_divergence; not reverse_kl only with sigmoid, sigmoid_norm, hinge, ipo, "
                                    "exo_pair, robust, cdpo, discopop, sft"),
      DOUBLE_KEY(f_alpha_divergence_coef, "alpha of f_divergence_type alpha_divergence, in [-1e6, 1e6]"),
      BOOL_KEY(use_weighting, "WPO: each pair's loss times exp(mean per-token log p(y_t) - log sum_v p_v^2 of the "
                              "chosen + of the rejected completion), the weight detached (TRL's); not with aot"),
      DOUBLE_KEY(ld_alpha, "LD-DPO: log-probs sum the first min(len_chosen, len_rejected) completion tokens plus "
                           "ld_alpha times the rest (policy and reference), in (0, 1]; 1 = off (TRL's None); not "
                           "with sft / rpo_alpha"),
      BOOL_KEY(precompute_ref_log_probs, "compute reference log-probs once and cache them on disk"),
      STRING_KEY(ref_cache_dir, "reference log-prob cache; empty = $XDG_CACHE_HOME/dpo/ref or ~/.cache/dpo/ref"),
      BOOL_KEY(sync_ref_model, "TR-DPO: update the live reference from the policy after every "
                               "ref_model_sync_steps-th optimizer step; needs precompute_ref_log_probs: false and a "
                               "loss with a reference (not reference_free)"),
      DOUBLE_KEY(ref_model_mixup_alpha, "TR-DPO alpha, in [0, 1]: reference = alpha * policy + (1 - alpha) * "
                                        "reference at each sync; 1 = a hard copy"),
      INT_KEY(ref_model_sync_steps, "TR-DPO tau: optimizer steps between reference syncs (after steps tau, 2 tau, "
                                    "...), 1 to 2^31 - 1"),
      DOUBLE_KEY(learning_rate, "peak learning rate, in (0, 1]"),
      DOUBLE_KEY(weight_decay, "AdamW decoupled weight decay (not on biases and LayerNorm); >= 0 and "
                               "learning_rate * weight_decay <= 1"),
      DOUBLE_KEY(adam_beta1, "AdamW beta1 in [0, 1)"),
      DOUBLE_KEY(adam_beta2, "AdamW beta2 in [0, 1)"),
      DOUBLE_KEY(adam_epsilon, "AdamW epsilon, in [1e-30, 1]"),
      STRING_KEY(lr_scheduler_type, "transformers' schedules: constant (no warmup), constant_with_warmup, cosine "
                                    "or linear"),
      INT_KEY(warmup_steps, "linear warmup steps from lr 0 (transformers: step s < warmup_steps uses lr * s / "
                            "warmup_steps, so the first step's lr is 0)"),
      DOUBLE_KEY(max_grad_norm, "global gradient-norm clip, >= 0; 0 disables"),
      INT_KEY(per_device_train_batch_size, "pairs per micro-batch"),
      INT_KEY(per_device_eval_batch_size, "pairs per evaluation batch"),
      INT_KEY(gradient_accumulation_steps, "micro-batches per optimizer step"),
      STRING_KEY(attn_implementation, "eager (default) or flash: the flash attention kernels (device: cuda, "
                                      "precision: bf16 only; not yet run on a GPU, see docs/gpu-validation.md)"),
      STRING_KEY(batch_layout, "how pairs sit in a batch's rows: padded (one sequence per row), packed (whole pairs "
                               "packed into rows, no padding inside), prefix_shared (each prompt computed once for "
                               "both completions; pairs packed)"),
      INT_KEY(max_tokens_per_row, "packed / prefix_shared: slots per row; 0 = 2 * max_length"),
      INT_KEY(pad_to_multiple_of, "batch_layout padded: pad each training micro-batch's rows to a multiple of N "
                                  "tokens (at most n_positions), so lengths fall into fewer shapes (CUDA graphs); "
                                  "0 = pad to the longest row"),
      BOOL_KEY(cuda_graphs, "device: cuda: capture each micro-batch shape's forward, loss and backward as a CUDA "
                            "graph on its second occurrence and replay it from then on (bitwise the same results)"),
      INT_KEY(num_train_epochs, "passes over the training data"),
      INT_KEY(max_steps, "optimizer steps; -1 = from num_train_epochs"),
      INT_KEY(logging_steps, "log every N optimizer steps"),
      INT_KEY(eval_steps, "evaluate every N optimizer steps; 0 = at the end only"),
      INT_KEY(save_steps, "checkpoint every N optimizer steps; 0 = at the end only"),
      INT_KEY(save_total_limit, "keep at most N step checkpoints; 0 = all"),
      STRING_KEY(max_shard_size, "largest weights file of a saved checkpoint, as HF's max_shard_size (\"5GB\", "
                                 "\"500MB\", or bytes); larger models are saved in shards with "
                                 "model.safetensors.index.json"),
      STRING_KEY(profile_steps, "optimizer steps inside a CUDA profiler capture range (cudaProfilerStart/Stop, for "
                                "nsys --capture-range=cudaProfilerApi or ncu --profile-from-start off): \"A-B\" or "
                                "\"N\", 1-based; empty = off; device: cuda only"),
      INT_KEY(max_consecutive_skipped_steps, "stop with an error after N optimizer steps in a row were skipped "
                                             "(non-finite gradient norm or updated weights); 0 = never stop"),
  };
  return k;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

const Key* find_key(const std::string& name) {
  for (const auto& k : keys())
    if (name == k.name) return &k;
  return nullptr;
}

[[noreturn]] void unknown_key(const std::string& where, const std::string& name) {
  // Names users bring from other trainers.
  static const std::pair<const char*, const char*> aliases[] = {
      {"lr", "learning_rate"},           {"batch_size", "per_device_train_batch_size"},
      {"epochs", "num_train_epochs"},    {"grad_accum", "gradient_accumulation_steps"},
      {"warmup", "warmup_steps"},        {"loss", "loss_type"},
      {"eval_batch_size", "per_device_eval_batch_size"}, {"output_dir", "out_dir"}};
  for (const auto& [a, k] : aliases)
    if (name == a) throw InputError(where + ": unknown key '" + name + "' (did you mean '" + k + "'?)");
  std::string best;
  size_t best_d = 4;  // suggest only close matches
  for (const auto& k : keys()) {
    size_t d = edit_distance(name, k.name);
    bool prefix = std::string(k.name).find(name) != std::string::npos && name.size() >= 2;
    if (prefix) d = std::min<size_t>(d, 1);
    if (d < best_d) {
      best_d = d;
      best = k.name;
    }
  }
  throw InputError(where + ": unknown key '" + name + "'" + (best.empty() ? "" : " (did you mean '" + best + "'?)"));
}

void apply(TrainConfig& cfg, const std::string& where, const std::string& name, const YAML::Node& value) {
  const Key* k = find_key(name);
  if (!k) unknown_key(where, name);
  try {
    k->set(cfg, value);
  } catch (const std::string& why) {
    throw InputError(where + ": key '" + name + "': " + why + " (" + kind_name(k->kind) + ")");
  } catch (const YAML::Exception& e) {
    throw InputError(where + ": key '" + name + "': " + e.what());
  }
}

// A validation error about one key; load_train_config prefixes it with where the key was set.
class KeyError : public InputError {
 public:
  KeyError(const std::string& key, const std::string& what) : InputError("key '" + key + "': " + what), key_(key) {}
  const std::string& key() const { return key_; }

 private:
  std::string key_;
};

[[noreturn]] void bad(const std::string& key, const std::string& what) { throw KeyError(key, what); }

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

StepRange parse_profile_steps(const std::string& v) {
  if (v.empty()) return {};
  auto number = [&](const char* b, const char* e) {
    int64_t x = 0;
    const auto r = std::from_chars(b, e, x);
    if (b == e || r.ec != std::errc() || r.ptr != e || x < 1)
      bad("profile_steps", "must be \"A-B\" (optimizer steps, 1-based, A <= B) or \"N\", got '" + v + "'");
    return x;
  };
  const char* b = v.data();
  const char* e = b + v.size();
  const size_t dash = v.find('-');
  StepRange r;
  if (dash == std::string::npos) {
    r.first = r.last = number(b, e);
  } else {
    r.first = number(b, b + dash);
    r.last = number(b + dash + 1, e);
  }
  if (r.first > r.last)
    bad("profile_steps", "the range '" + v + "' is empty: its first step is after its last");
  return r;
}

void validate(const TrainConfig& c, RunKind kind) {
  // Integer keys: [lo, hi]; the upper bounds keep products of two counts inside int64 (config.h).
  auto range = [](const char* key, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi)
      bad(key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v));
  };
  // Real keys: finite and in [lo, hi] (lo excluded when open_lo).
  auto real = [](const char* key, double v, double lo, bool open_lo, double hi) {
    if (!std::isfinite(v)) bad(key, "must be a finite number, got " + num(v));
    if (!(open_lo ? v > lo : v >= lo) || !(v <= hi))
      bad(key, std::string("must be in ") + (open_lo ? "(" : "[") + num(lo) + ", " + num(hi) + "], got " + num(v));
  };
  if (c.model.empty()) bad("model", "is required (an HF GPT-2 checkpoint directory)");
  if (c.train_file.empty()) bad("train_file", "is required");
  if (c.out_dir.empty()) bad("out_dir", "is required");
  if (c.device != "cpu" && c.device != "cuda") bad("device", "must be cpu or cuda, got '" + c.device + "'");
  if (c.tokenizer.empty()) bad("tokenizer", "must be byte or the path of a tokenizer.json, got ''");
  range("eos_token_id", c.eos_token_id, -1, kMaxCount);
  range("pad_token_id", c.pad_token_id, -1, kMaxCount);
  (void)parse_shard_size(c.max_shard_size, "key 'max_shard_size'");  // throws naming the key
  if (c.precision != "fp32" && c.precision != "bf16")
    bad("precision", "must be fp32 or bf16, got '" + c.precision + "'");
  // seed: any integer (it is used as its 64-bit pattern).
  range("num_threads", c.num_threads, 0, kMaxThreads);
  range("logits_chunk_rows", c.logits_chunk_rows, 1, kMaxCount);
  range("logits_chunk_bytes", c.logits_chunk_bytes, 1, int64_t{1} << 50);
  range("gradient_checkpointing_interval", c.gradient_checkpointing_interval, 1, kMaxCount);
  if (!c.device_memory.empty()) parse_bytes(c.device_memory, "key 'device_memory'");  // InputError naming it
  if (c.zero_stage != 0 && c.zero_stage != 1)
    bad("zero_stage", "must be 0 or 1, got " + std::to_string(c.zero_stage));
  range("max_length", c.max_length, 1, kMaxBatch);
  range("max_prompt_length", c.max_prompt_length, 0, kMaxBatch);
  if (!c.truncation.empty() && c.truncation != "trl1" && c.truncation != "legacy")
    bad("truncation", "must be trl1 or legacy, got '" + c.truncation + "'");
  if (!c.truncation_mode.empty() && c.truncation_mode != "keep_end" && c.truncation_mode != "keep_start")
    bad("truncation_mode", "must be keep_start or keep_end, got '" + c.truncation_mode + "'");
  {
    TrainConfig r = c;  // what the trainer will use (resolve_truncation)
    resolve_truncation(r);
    if (r.truncation == "trl1") {
      if (c.max_prompt_length > 0)
        bad("max_prompt_length", "is " + std::to_string(c.max_prompt_length) +
                                     " but truncation is trl1, which has no prompt budget (TRL 1.x removed "
                                     "max_prompt_length: each prompt + completion is cut to max_length); remove "
                                     "max_prompt_length, or set truncation: legacy to cut the prompt to it first");
      if (r.truncation_mode == "keep_end")
        bad("truncation_mode", "keep_end is not supported with truncation: trl1 (TRL 1.x deprecates it: it cuts "
                               "the chosen and the rejected sequence's prompt by different amounts); use keep_start, "
                               "or truncation: legacy, where keep_end keeps the end of a prompt cut to "
                               "max_prompt_length");
    } else if (r.max_prompt_length >= c.max_length) {
      bad("max_prompt_length", "must be < max_length (" + std::to_string(c.max_length) + ") with truncation: "
                               "legacy, got " + std::to_string(r.max_prompt_length));
    }
  }
  // An AdamW step moves a weight by about learning_rate; above 1 a single step wipes out any trained weight.
  real("learning_rate", c.learning_rate, 0, true, 1);
  // Decoupled decay multiplies each weight by (1 - lr * weight_decay) per step: above 1 the sign flips, above 2
  // the weights grow geometrically until they overflow.
  real("weight_decay", c.weight_decay, 0, false, 1e30);
  if (c.learning_rate * c.weight_decay > 1)
    bad("weight_decay", "times learning_rate must be <= 1 (each step scales the weights by 1 - learning_rate * "
                        "weight_decay), got " + num(c.weight_decay) + " * " + num(c.learning_rate));
  if (!(c.adam_beta1 >= 0 && c.adam_beta1 < 1)) bad("adam_beta1", "must be in [0, 1), got " + num(c.adam_beta1));
  if (!(c.adam_beta2 >= 0 && c.adam_beta2 < 1)) bad("adam_beta2", "must be in [0, 1), got " + num(c.adam_beta2));
  // The CUDA update runs in float32 (the CPU one in double): below ~1.2e-38 epsilon is no longer a normal
  // float32 number and below ~1e-45 it rounds to 0, so that a weight whose gradients were all zero gets
  // 0/0 = NaN; 1e-30 keeps a wide margin. Above 1 AdamW no longer normalises the gradient (usually 1e-8).
  real("adam_epsilon", c.adam_epsilon, 1e-30, false, 1);
  if (c.lr_scheduler_type != "constant" && c.lr_scheduler_type != "constant_with_warmup" &&
      c.lr_scheduler_type != "cosine" && c.lr_scheduler_type != "linear")
    bad("lr_scheduler_type",
        "must be constant, constant_with_warmup, cosine or linear, got '" + c.lr_scheduler_type + "'");
  range("warmup_steps", c.warmup_steps, 0, kMaxCount);
  // transformers' "constant" ignores warmup_steps without a word; here that combination is refused instead.
  if (c.lr_scheduler_type == "constant" && c.warmup_steps > 0)
    bad("warmup_steps", "is " + std::to_string(c.warmup_steps) + " but lr_scheduler_type constant has no warmup "
                        "(as in transformers); set lr_scheduler_type: constant_with_warmup to warm up, or "
                        "warmup_steps: 0");
  real("max_grad_norm", c.max_grad_norm, 0, false, 1e30);
  range("per_device_train_batch_size", c.per_device_train_batch_size, 1, kMaxBatch);
  range("pad_to_multiple_of", c.pad_to_multiple_of, 0, int64_t{1} << 20);
  range("max_tokens_per_row", c.max_tokens_per_row, 0, int64_t{1} << 24);
  if (c.attn_implementation != "eager" && c.attn_implementation != "flash")
    bad("attn_implementation", "unknown value '" + c.attn_implementation + "'; valid: eager, flash");
  if (c.attn_implementation == "flash" && c.device != "cuda")
    bad("attn_implementation", "flash needs device: cuda (the flash kernels run on the GPU only), got device: " +
                                   c.device);
  if (c.attn_implementation == "flash" && c.precision != "bf16")
    bad("attn_implementation", "flash needs precision: bf16 (fp32 is the parity mode and runs the eager kernels), "
                               "got precision: " + c.precision);
  if (c.batch_layout != "padded" && c.batch_layout != "packed" && c.batch_layout != "prefix_shared")
    bad("batch_layout", "unknown value '" + c.batch_layout + "'; valid: padded, packed, prefix_shared");
  if (kind == RunKind::Sft && c.batch_layout != "padded")
    bad("batch_layout", "SFT runs take padded batches only, got '" + c.batch_layout + "'");
  range("per_device_eval_batch_size", c.per_device_eval_batch_size, 1, kMaxBatch);
  range("gradient_accumulation_steps", c.gradient_accumulation_steps, 1, kMaxBatch);
  range("num_train_epochs", c.num_train_epochs, 1, kMaxCount);
  if (c.max_steps != -1) range("max_steps", c.max_steps, 1, kMaxCount);
  range("logging_steps", c.logging_steps, 1, kMaxCount);
  range("eval_steps", c.eval_steps, 0, kMaxCount);
  range("save_steps", c.save_steps, 0, kMaxCount);
  range("save_total_limit", c.save_total_limit, 0, kMaxCount);
  range("max_consecutive_skipped_steps", c.max_consecutive_skipped_steps, 0, kMaxCount);
  parse_profile_steps(c.profile_steps);
  if (!c.profile_steps.empty() && c.device != "cuda")
    bad("profile_steps", "needs device: cuda (it opens a CUDA profiler capture range), got device: " + c.device);
  if (kind == RunKind::Sft && c.sync_ref_model)
    bad("sync_ref_model", "is a DPO option (TR-DPO); an SFT run has no reference model");
  if (kind == RunKind::Dpo) {
    // beta, odpo_alpha, rpo_alpha and the loss weights scale the loss and its gradient (in float32); 1e6 is far
    // above any useful value and keeps beta times a sequence's log-ratio and the gradient norms finite.
    real("beta", c.beta, 0, true, 1e6);
    if (!(c.label_smoothing >= 0 && c.label_smoothing < 0.5))
      bad("label_smoothing", "must be in [0, 0.5), got " + num(c.label_smoothing));
    real("odpo_alpha", c.odpo_alpha, 0, false, 1e6);
    real("rpo_alpha", c.rpo_alpha, 0, false, 1e6);
    if (c.loss_type.empty()) bad("loss_type", "needs at least one loss");
    if (!c.loss_weights.empty() && c.loss_weights.size() != c.loss_type.size())
      bad("loss_weights", "has " + std::to_string(c.loss_weights.size()) + " entries but loss_type has " +
                              std::to_string(c.loss_type.size()));
    for (double w : c.loss_weights) real("loss_weights", w, 0, false, 1e6);
    real("discopop_tau", c.discopop_tau, 0, true, 1e6);
    real("simpo_gamma", c.simpo_gamma, -1e6, false, 1e6);
    real("f_alpha_divergence_coef", c.f_alpha_divergence_coef, -1e6, false, 1e6);
    // aot, aot_unpaired take the unfused path (GPT2::sequence_logprobs), which takes padded batches only.
    for (const std::string& t : c.loss_type)
      if ((t == "aot" || t == "aot_unpaired") && c.batch_layout != "padded")
        bad("batch_layout", "must be padded with loss_type " + t + " (its loss sorts the whole micro-batch, which "
                            "is scored in one unchunked pass that takes padded batches only), got '" +
                                c.batch_layout + "'");
    // ld_alpha: 0, which TRL accepts, would make the tail tokens unscored slots here (weight 0), dropping them
    // from the completion lengths (ipo, sigmoid_norm) and logits/* that TRL counts them in.
    real("ld_alpha", c.ld_alpha, 0, true, 1);
    // TRL's sft term reads the unweighted per-token log-probs; this trainer has one (weighted) log-prob per
    // sequence, so the two would differ silently.
    if (c.ld_alpha != 1) {
      const bool sft = std::find(c.loss_type.begin(), c.loss_type.end(), "sft") != c.loss_type.end();
      if (sft || c.rpo_alpha > 0)
        bad("ld_alpha", "is " + num(c.ld_alpha) + " but " + (sft ? "loss_type lists sft" : "rpo_alpha is set") +
                            ": TRL's sft term takes the unweighted log-probs, which this trainer does not compute "
                            "beside the LD-weighted ones; use ld_alpha: 1 with sft / rpo_alpha");
    }
    real("ref_model_mixup_alpha", c.ref_model_mixup_alpha, 0, false, 1);
    range("ref_model_sync_steps", c.ref_model_sync_steps, 1, kMaxCount);
    // TRL refuses the same combination: the cached log-probs are those of the initial reference, stale after
    // the first sync.
    if (c.sync_ref_model && c.precompute_ref_log_probs)
      bad("sync_ref_model", "is true but precompute_ref_log_probs is true (its default here): the cached reference "
                            "log-probs would be stale after the first sync; set precompute_ref_log_probs: false "
                            "(a live reference) or sync_ref_model: false");
    // TRL refuses sync_ref_model wherever it has no reference model to update (a PEFT policy), and its DPOTrainer
    // has no reference-free mode (SimPO is CPOTrainer's, which has neither a reference nor this key). Here the
    // reference would be updated without ever entering the loss: refused rather than a silent no-op.
    if (c.sync_ref_model && c.reference_free)
      bad("sync_ref_model", "is true but reference_free is true: the loss uses no reference model, so there is "
                            "nothing to sync; set sync_ref_model: false or reference_free: false");
    if (c.f_divergence_type != "reverse_kl" && c.f_divergence_type != "forward_kl" &&
        c.f_divergence_type != "js_divergence" && c.f_divergence_type != "alpha_divergence")
      bad("f_divergence_type", "unknown value '" + c.f_divergence_type +
                                   "'; valid: reverse_kl, forward_kl, js_divergence, alpha_divergence");
  }
}

void resolve_truncation(TrainConfig& c) {
  if (c.truncation.empty()) c.truncation = c.max_prompt_length > 0 ? "legacy" : "trl1";
  if (c.truncation_mode.empty()) c.truncation_mode = c.truncation == "legacy" ? "keep_end" : "keep_start";
  if (c.truncation == "legacy" && c.max_prompt_length == 0)
    c.max_prompt_length = 256 < c.max_length || c.max_length < 2 ? 256 : c.max_length / 2;
}

std::vector<std::string> fit_to_model(TrainConfig& c, int64_t n_positions, const std::string& model, RunKind kind) {
  std::vector<std::string> notes;
  resolve_truncation(c);
  if (c.truncation == "legacy" && !c.given.count("truncation") && c.given.count("max_prompt_length"))
    notes.push_back("truncation: legacy (max_prompt_length is set; TRL 1.x has no max_prompt_length: remove it for "
                    "TRL 1.x truncation, or set truncation: legacy to keep this rule without this note)");
  const std::string np = std::to_string(n_positions);
  if (c.given.count("max_length")) {
    if (c.max_length > n_positions)
      bad("max_length", std::to_string(c.max_length) + " exceeds the n_positions (" + np + ") of the model " + model +
                            "; set max_length to at most " + np + " (or leave it unset to follow the model)");
  } else if (c.max_length > n_positions) {
    c.max_length = n_positions;
    notes.push_back("max_length: " + np + " (the n_positions of " + model +
                    "; the default 512 does not fit; set max_length to choose)");
  }
  if (c.truncation == "legacy" && !c.given.count("max_prompt_length") && c.max_prompt_length >= c.max_length &&
      c.max_length >= 2) {
    c.max_prompt_length = c.max_length / 2;
    notes.push_back("max_prompt_length: " + std::to_string(c.max_prompt_length) +
                    " (half of max_length; the default 256 does not fit; set max_prompt_length to choose)");
  }
  validate(c, kind);
  return notes;
}

namespace {

// Refuses what yaml-cpp accepts silently: a key given twice in one mapping (yaml-cpp keeps both and a lookup sees
// only the first) and, below, a second document.
void check_no_duplicate_keys(const YAML::Node& map, const std::string& path) {
  std::map<std::string, int> first_line;
  for (auto it = map.begin(); it != map.end(); ++it) {
    const std::string name = it->first.IsScalar() ? it->first.Scalar() : scalar_of(it->first);
    const int line = it->first.Mark().line + 1;
    auto [pos, fresh] = first_line.emplace(name, line);
    if (!fresh)
      throw InputError(path + ":" + std::to_string(line) + ": key '" + name + "' is given twice (first at line " +
                       std::to_string(pos->second) + ")");
  }
}

}  // namespace

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides, RunKind kind) {
  TrainConfig cfg;
  std::map<std::string, std::string> where_set;  // key -> "path:line" or "override 'k=v'", for validation errors
  if (!path.empty()) {
    std::error_code ec;
    const auto st = std::filesystem::status(path, ec);
    if (ec && ec != std::errc::no_such_file_or_directory)
      throw InputError(path + ": cannot open config file: " + ec.message());
    if (!std::filesystem::exists(st)) throw InputError(path + ": cannot open config file (no such file)");
    if (std::filesystem::is_directory(st))
      throw InputError(path + ": cannot open config file (a directory; --config takes a YAML file)");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw InputError(path + ": cannot open config file");
    std::ostringstream text_stream;
    text_stream << in.rdbuf();
    if (in.bad()) throw InputError(path + ": read error");
    const std::string text = text_stream.str();
    const YAML::Node root = load_single_document(text, path);
    if (!root.IsNull() && !root.IsMap()) throw InputError(path + ": the config must be a mapping of key: value");
    if (root.IsMap()) check_no_duplicate_keys(root, path);
    for (auto it = root.begin(); it != root.end(); ++it) {
      const std::string where = path + ":" + std::to_string(it->first.Mark().line + 1);
      // A key must be a plain name: a mapping or a sequence as a key (`{a: 1}: 2`, found by the config fuzz
      // target) would otherwise escape as yaml-cpp's conversion error.
      if (!it->first.IsScalar()) throw InputError(where + ": a key must be a plain name, not a mapping or a list");
      const std::string name = it->first.Scalar();
      try {
        apply(cfg, where, name, it->second);
      } catch (const YAML::Exception& e) {  // a conversion the key's own checks did not expect
        throw InputError(where + ": key '" + name + "': " + e.msg);
      }
      cfg.given.insert(name);
      where_set[name] = where;
    }
  }
  for (const std::string& o : overrides) {
    const std::string where = "override '" + o + "'";
    const size_t eq = o.find('=');
    if (eq == std::string::npos || eq == 0) throw InputError(where + ": expected key=value");
    YAML::Node value;
    try {
      value = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      throw InputError(where + ": value is not valid YAML: " + e.msg);
    }
    const std::string name = o.substr(0, eq);
    apply(cfg, where, name, value);
    cfg.given.insert(name);
    where_set[name] = where;
  }
  // Under legacy, a max_length chosen below the default prompt budget brings the prompt budget along (half of it).
  resolve_truncation(cfg);
  try {
    validate(cfg, kind);
  } catch (const KeyError& e) {
    auto it = where_set.find(e.key());
    throw InputError((it != where_set.end() ? it->second : path.empty() ? std::string("config") : path) + ": " +
                     e.what());
  }
  return cfg;
}

MemoryPlanInput memory_plan_input(const TrainConfig& cfg, const GPT2Config& model, int64_t ranks) {
  MemoryPlanInput in;
  in.model = model;
  in.dtype = cfg.precision == "bf16" ? DType::BF16 : DType::F32;
  in.pairs = cfg.per_device_train_batch_size;
  // The largest micro-batch the data can make: padded rows of max_length (rounded up to pad_to_multiple_of);
  // a layout's rows hold at most max_tokens_per_row slots, and a pair longer than that (at most 2 * max_length
  // slots) gets a row of its own: at most one row per pair.
  const bool padded = cfg.batch_layout == "padded";
  if (padded) {
    const int64_t m = std::max<int64_t>(cfg.pad_to_multiple_of, 1);
    in.rows = 2 * in.pairs;
    in.T = (cfg.max_length + m - 1) / m * m;
  } else {
    in.rows = in.pairs;
    in.T = std::max(cfg.max_tokens_per_row > 0 ? cfg.max_tokens_per_row : 2 * cfg.max_length, 2 * cfg.max_length);
  }
  in.pair_rows = padded;
  in.logits_chunk_rows = cfg.logits_chunk_rows;
  in.logits_chunk_bytes = cfg.logits_chunk_bytes;
  in.checkpoint_interval = cfg.gradient_checkpointing ? cfg.gradient_checkpointing_interval : 0;
  in.reference = cfg.reference_free             ? ReferencePlan::None
                 : cfg.precompute_ref_log_probs ? ReferencePlan::Cached
                                                : ReferencePlan::Live;
  in.ranks = ranks;
  in.zero1 = cfg.zero_stage == 1;
  const bool cuda = cfg.device == "cuda";
  // attn_implementation flash keeps the CPU blocked kernels' state on the GPU too (runtime/cuda/cuda_backend.h).
  in.attention = cuda && cfg.attn_implementation != "flash" ? AttentionSaved::Probabilities : AttentionSaved::RowStats;
  // An allowance for what the CUDA runtime and libraries hold outside our tensors (context, cuBLAS/cuDNN
  // workspaces, allocator rounding); not measured.
  in.device_reserve = cuda ? int64_t{1} << 30 : 0;
  in.f32_op_copies = !cuda;
  return in;
}

std::string to_yaml(const TrainConfig& cfg) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (const auto& k : keys()) out << YAML::Key << k.name << YAML::Value << k.get(cfg);
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::string config_help() {
  TrainConfig d;
  std::ostringstream s;
  s << "Configuration keys (YAML file and key=value overrides):\n";
  for (const auto& k : keys()) {
    YAML::Emitter e;
    e << YAML::Flow << k.get(d);
    s << "  " << k.name << std::string(k.name ? std::max<int>(1, 30 - static_cast<int>(std::string(k.name).size())) : 1, ' ')
      << k.help << "  [default: " << e.c_str() << "]\n";
  }
  return s.str();
}

}  // namespace dpo
