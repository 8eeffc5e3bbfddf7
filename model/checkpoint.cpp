#include "model/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "model/hf_llama.h"
#include "runtime/safetensors.h"

namespace dpo {

namespace {

using json = nlohmann::json;

int64_t get_int(const json& j, const std::string& path, const char* key, bool required, int64_t dflt) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) throw InputError(path + ": missing field '" + key + "'");
    return dflt;
  }
  const json& v = j[key];
  if (!v.is_number_integer()) throw InputError(path + ": field '" + key + "' must be an integer, got " + v.dump());
  return v.get<int64_t>();
}

}  // namespace

GPT2Config load_gpt2_config(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw InputError(path + ": cannot open");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    throw InputError(path + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw InputError(path + ": top level is not a JSON object");
  const bool llama = j.contains("model_type") && j["model_type"].is_string() &&
                     is_llama_model_type(j["model_type"].get<std::string>());
  if (j.contains("model_type") && j["model_type"] != "gpt2" && !llama)
    throw InputError(path + ": field 'model_type' is " + j["model_type"].dump() +
                     "; supported: \"gpt2\", \"llama\", \"qwen2\", \"mistral\"");
  GPT2Config c;
  if (llama) {
    c = llama_config_from_json(j, path);
  } else {
    c.vocab_size = get_int(j, path, "vocab_size", true, 0);
    c.max_seq_len = get_int(j, path, "n_positions", true, 0);
    c.n_embd = get_int(j, path, "n_embd", true, 0);
    c.n_layer = get_int(j, path, "n_layer", true, 0);
    c.n_head = get_int(j, path, "n_head", true, 0);
    if (j.contains("layer_norm_epsilon")) {
      if (!j["layer_norm_epsilon"].is_number())
        throw InputError(path + ": field 'layer_norm_epsilon' must be a number");
      c.ln_eps = j["layer_norm_epsilon"].get<double>();
    }
    if (j.contains("n_inner") && !j["n_inner"].is_null()) {
      int64_t inner = get_int(j, path, "n_inner", false, 0);
      if (inner != 4 * c.n_embd)
        throw InputError(path + ": field 'n_inner' is " + std::to_string(inner) + ", only 4*n_embd (" +
                         std::to_string(4 * c.n_embd) + ") is supported");
    }
    if (j.contains("activation_function")) {
      const json& a = j["activation_function"];
      if (!a.is_string() || (a != "gelu_new" && a != "gelu_pytorch_tanh"))
        throw InputError(path + ": field 'activation_function' is " + a.dump() +
                         ", only the tanh GELU (\"gelu_new\", \"gelu_pytorch_tanh\") is supported");
    }
    if (j.contains("tie_word_embeddings") && j["tie_word_embeddings"] != true)
      throw InputError(path + ": field 'tie_word_embeddings' must be true (the LM head is tied to wte)");
    for (const char* flag : {"scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"})
      if (j.contains(flag) && j[flag] == true)
        throw InputError(path + ": field '" + std::string(flag) + "' = true is not supported");
    if (j.contains("scale_attn_weights") && j["scale_attn_weights"] != true)
      throw InputError(path + ": field 'scale_attn_weights' must be true");
  }
  c.validate(path);
  // What the model does not compute with is kept for the checkpoints saved from it: integer special-token ids,
  // and every key the saver does not write itself (other forms of the ids, such as null, included).
  auto token_id = [&](const char* key) {
    return j.contains(key) && j[key].is_number_integer() && j[key].get<int64_t>() >= 0 ? j[key].get<int64_t>()
                                                                                       : int64_t{-1};
  };
  c.bos_token_id = token_id("bos_token_id");
  c.eos_token_id = token_id("eos_token_id");
  const json written = json::parse(gpt2_config_json(c));
  json extra = json::object();
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const bool other_id = (k == "bos_token_id" && c.bos_token_id < 0) || (k == "eos_token_id" && c.eos_token_id < 0);
    if ((!written.contains(k) || other_id) && k != "dtype") extra[k] = it.value();
  }
  // "dtype" (transformers 5's name for torch_dtype) describes the stored weights: the saver writes F32 and says
  // so in torch_dtype, so a loaded value is not carried on.
  if (!extra.empty()) c.hf_extra_json = extra.dump();
  return c;
}

std::string gpt2_config_json(const GPT2Config& c) {
  json j = c.arch == Arch::Llama ? llama_config_to_json(c) : json{
      {"architectures", {"GPT2LMHeadModel"}},
      {"model_type", "gpt2"},
      {"vocab_size", c.vocab_size},
      {"n_positions", c.max_seq_len},
      {"n_ctx", c.max_seq_len},
      {"n_embd", c.n_embd},
      {"n_layer", c.n_layer},
      {"n_head", c.n_head},
      {"n_inner", nullptr},
      {"activation_function", "gelu_new"},
      {"layer_norm_epsilon", c.ln_eps},
      {"resid_pdrop", 0.0},
      {"embd_pdrop", 0.0},
      {"attn_pdrop", 0.0},
      {"initializer_range", 0.02},
      {"scale_attn_weights", true},
      {"scale_attn_by_inverse_layer_idx", false},
      {"reorder_and_upcast_attn", false},
      {"tie_word_embeddings", true},
      {"torch_dtype", "float32"},
  };
  // The ids of the loaded config.json; else GPT-2's convention, its last id as <|endoftext|> for both (HF's
  // default, 50256, is outside smaller vocabularies).
  json extra = c.hf_extra_json.empty() ? json::object() : json::parse(c.hf_extra_json);
  j["bos_token_id"] = c.bos_token_id >= 0 ? json(c.bos_token_id)
                      : extra.contains("bos_token_id") ? extra["bos_token_id"] : json(c.vocab_size - 1);
  j["eos_token_id"] = c.eos_token_id >= 0 ? json(c.eos_token_id)
                      : extra.contains("eos_token_id") ? extra["eos_token_id"] : json(c.vocab_size - 1);
  for (auto it = extra.begin(); it != extra.end(); ++it)
    if (!j.contains(it.key())) j[it.key()] = it.value();
  return j.dump(2) + "\n";
}

SpecialTokenIds special_token_ids(const GPT2Config& c, const std::string& dir) {
  json config = c.hf_extra_json.empty() ? json::object() : json::parse(c.hf_extra_json);
  if (c.eos_token_id >= 0) config["eos_token_id"] = c.eos_token_id;
  json gen = json::object();
  if (!c.generation_config.empty()) gen = json::parse(c.generation_config);
  // Reads `key` of `j` (from `file`): an id, a list of ids, or null / absent (nothing).
  auto ids = [&](const json& j, const char* file, const char* key) {
    std::vector<int64_t> out;
    if (!j.contains(key) || j[key].is_null()) return out;
    const json& v = j[key];
    const json list = v.is_array() ? v : json::array({v});
    for (const json& e : list) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= c.vocab_size)
        throw InputError((std::filesystem::path(dir) / file).string() + ": field '" + key + "' is " + v.dump() +
                         "; expected a token id, or a list of them, in [0, vocab_size = " +
                         std::to_string(c.vocab_size) + ")");
      out.push_back(e.get<int64_t>());
    }
    return out;
  };
  SpecialTokenIds r;
  for (const auto& [j, file] : {std::pair<const json&, const char*>{config, "config.json"},
                                std::pair<const json&, const char*>{gen, kGenerationConfigFile}}) {
    if (r.eos.empty()) {
      r.eos = ids(j, file, "eos_token_id");
      if (!r.eos.empty()) r.eos_source = file;
    }
    if (r.pad < 0) {
      const auto p = ids(j, file, "pad_token_id");
      if (!p.empty()) r.pad = p[0], r.pad_source = file;
    }
  }
  return r;
}

LoadReport load_gpt2_weights(GPT2& model, const std::string& weights) {
  if (model.config().arch == Arch::Llama) return load_llama_weights(model, weights);
  const SafetensorsDir file = SafetensorsDir::open(weights);
  const std::string& path = file.path();  // the single file or the index: what messages name
  LoadReport report;
  // Map stored names to parameter names.
  std::map<std::string, const SafetensorsEntry*> by_param;
  const SafetensorsEntry* lm_head = nullptr;
  std::set<std::string> known;
  for (const auto& s : model.specs()) known.insert(s.name);
  for (const auto& e : file.entries()) {
    std::string n = e.name;
    if (n.rfind("transformer.", 0) == 0) n = n.substr(12);
    if (n == "lm_head.weight") {
      lm_head = &e;
      continue;
    }
    if (n.rfind("h.", 0) == 0 && (n.size() > 10) &&
        (n.compare(n.size() - 10, 10, ".attn.bias") == 0 || n.find(".attn.masked_bias") != std::string::npos)) {
      report.ignored.push_back(e.name);
      continue;
    }
    if (!known.count(n))
      throw InputError(path + ": unexpected tensor '" + e.name + "' (not a GPT-2 parameter)");
    if (by_param.count(n)) throw InputError(path + ": tensor '" + n + "' appears twice (with and without prefix)");
    by_param[n] = &e;
  }
  for (const auto& s : model.specs()) {
    auto it = by_param.find(s.name);
    if (it == by_param.end()) throw InputError(path + ": missing tensor '" + s.name + "'");
    const SafetensorsEntry& e = *it->second;
    if (e.shape != s.shape)
      throw InputError(path + ": tensor '" + e.name + "' has shape " + shape_str(e.shape) + ", config expects " +
                       shape_str(s.shape));
    if (e.dtype != DType::F32 && e.dtype != DType::F64 && e.dtype != DType::BF16 && e.dtype != DType::F16)
      throw InputError(path + ": tensor '" + e.name + "' has dtype " + dtype_name(e.dtype) +
                       "; weights must be F32, F64, BF16 or F16");
    Tensor host = file.read_as(e.name, DType::F64);
    model.assign_param(s.name, host);
  }
  if (lm_head) {
    if (lm_head->shape != model.spec("wte.weight").shape)
      throw InputError(path + ": tensor '" + lm_head->name + "' has shape " + shape_str(lm_head->shape) +
                       ", expected the tied wte shape");
    Tensor a = file.read_as(lm_head->name, DType::F64);
    Tensor b = file.read_as(by_param.at("wte.weight")->name, DType::F64);
    if (std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.nbytes())) != 0)
      throw InputError(path + ": tensor '" + lm_head->name +
                       "' differs from wte.weight; only a tied LM head is supported");
  }
  return report;
}

std::unique_ptr<GPT2> load_gpt2_checkpoint(Backend& backend, const std::string& dir, DType dtype,
                                           LoadReport* report) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw InputError(dir + ": not a checkpoint directory");
  GPT2Config cfg = load_gpt2_config((fs::path(dir) / "config.json").string());
  const fs::path gen = fs::path(dir) / kGenerationConfigFile;
  std::error_code ec;
  if (fs::exists(gen, ec)) {
    std::ifstream f(gen, std::ios::binary);
    std::ostringstream bytes;
    bytes << f.rdbuf();
    if (!f || f.bad()) throw InputError(gen.string() + ": cannot read");
    cfg.generation_config = bytes.str();
    try {
      if (!json::parse(cfg.generation_config).is_object())
        throw InputError(gen.string() + ": top level is not a JSON object");
    } catch (const json::exception& e) {
      throw InputError(gen.string() + ": not valid JSON: " + e.what());
    }
  }
  auto model = std::make_unique<GPT2>(backend, cfg, dtype);
  LoadReport r = load_gpt2_weights(*model, dir);
  if (report) *report = std::move(r);
  return model;
}

std::vector<std::pair<std::string, Tensor>> hf_weight_tensors(const GPT2& model, const Tensor& host_weights) {
  DPO_ASSERT(host_weights.device().kind == DeviceKind::CPU && host_weights.dtype() == DType::F32 &&
                 host_weights.numel() == model.params().numel(),
             "hf_weight_tensors: host_weights must be a host F32 tensor of num_parameters elements");
  if (model.config().arch == Arch::Llama) return llama_hf_tensors(model, host_weights);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& s : model.specs())
    tensors.emplace_back("transformer." + s.name, host_weights.view(s.offset, s.shape));
  return tensors;
}

std::vector<std::string> save_gpt2_checkpoint(const GPT2& model, const std::string& dir, int64_t max_shard_bytes) {
  Tensor host = Tensor::host({model.params().numel()}, DType::F32);
  DPO_ASSERT(!model.master_sharded(), "save_gpt2_checkpoint: the master weights are sharded; gather them first");
  model.backend().copy_to_host(host, model.master_params());  // F32 master weights in BF16 mode
  return save_gpt2_checkpoint(model, dir, host, max_shard_bytes);
}

std::vector<std::string> save_gpt2_checkpoint(const GPT2& model, const std::string& dir, const Tensor& host_weights,
                                              int64_t max_shard_bytes) {
  namespace fs = std::filesystem;
  DPO_ASSERT(host_weights.device().kind == DeviceKind::CPU && host_weights.numel() == model.params().numel(),
             "save_gpt2_checkpoint: host_weights must be a host tensor of num_parameters elements");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error("cannot create directory " + dir + ": " + ec.message());
  Tensor host = host_weights.dtype() == DType::F32 ? host_weights.reshape({host_weights.numel()})
                                                   : convert_host(host_weights.reshape({host_weights.numel()}),
                                                                  DType::F32, "save_gpt2_checkpoint");
  std::vector<std::string> written =
      save_safetensors_dir(dir, hf_weight_tensors(model, host), {{"format", "pt"}}, max_shard_bytes);
  write_file_atomic((fs::path(dir) / "config.json").string(), gpt2_config_json(model.config()));
  written.push_back("config.json");
  if (!model.config().generation_config.empty()) {
    write_file_atomic((fs::path(dir) / kGenerationConfigFile).string(), model.config().generation_config);
    written.push_back(kGenerationConfigFile);
  }
  return written;
}

}  // namespace dpo
