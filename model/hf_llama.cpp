#include "model/hf_llama.h"

#include <cstring>
#include <map>
#include <set>

#include "runtime/safetensors.h"

namespace dpo {

namespace {

using json = nlohmann::json;

int64_t int_key(const json& j, const std::string& path, const char* key, bool required, int64_t dflt) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) throw InputError(path + ": missing field '" + key + "'");
    return dflt;
  }
  const json& v = j[key];
  if (!v.is_number_integer()) throw InputError(path + ": field '" + key + "' must be an integer, got " + v.dump());
  return v.get<int64_t>();
}

double num_key(const json& j, const std::string& path, const std::string& key, double dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number()) throw InputError(path + ": field '" + key + "' must be a number, got " + j[key].dump());
  return j[key].get<double>();
}

bool bool_key(const json& j, const std::string& path, const char* key, bool dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_boolean()) throw InputError(path + ": field '" + key + "' must be true or false, got " + j[key].dump());
  return j[key].get<bool>();
}

// rope_parameters (transformers 5) or rope_scaling (older files): the rope type and, for llama3, its factors.
void read_rope(const json& j, const std::string& path, GPT2Config& c) {
  c.rope_theta = num_key(j, path, "rope_theta", 10000.0);
  const char* key = j.contains("rope_parameters") && !j["rope_parameters"].is_null() ? "rope_parameters"
                    : j.contains("rope_scaling") && !j["rope_scaling"].is_null() ? "rope_scaling"
                                                                                 : nullptr;
  if (!key) return;
  const json& r = j[key];
  auto field = [&](const std::string& sub) { return path + ": field '" + key + (sub.empty() ? "" : "." + sub) + "'"; };
  if (!r.is_object()) throw InputError(field("") + " must be an object, got " + r.dump());
  if (r.contains("rope_theta")) {
    if (!r["rope_theta"].is_number()) throw InputError(field("rope_theta") + " must be a number");
    c.rope_theta = r["rope_theta"].get<double>();
  }
  std::string type = "default", type_key = "rope_type";
  for (const char* k : {"rope_type", "type"})
    if (r.contains(k) && !r[k].is_null()) {
      if (!r[k].is_string()) throw InputError(field(k) + " must be a string, got " + r[k].dump());
      type = r[k].get<std::string>();
      type_key = k;
      break;
    }
  if (type == "default") return;
  if (type != "llama3")
    throw InputError(field(type_key) + " is \"" + type + "\"; only \"default\" and \"llama3\" are supported");
  auto need = [&](const char* k) {
    if (!r.contains(k) || !r[k].is_number()) throw InputError(field(k) + " must be a number (rope_type llama3)");
    return r[k].get<double>();
  };
  c.rope_scaling.factor = need("factor");
  c.rope_scaling.low_freq_factor = need("low_freq_factor");
  c.rope_scaling.high_freq_factor = need("high_freq_factor");
  // HF falls back to max_position_embeddings (modeling_rope_utils standardize_rope_params).
  if (r.contains("original_max_position_embeddings")) {
    if (!r["original_max_position_embeddings"].is_number_integer())
      throw InputError(field("original_max_position_embeddings") + " must be an integer");
    c.rope_scaling.original_max_position_embeddings = r["original_max_position_embeddings"].get<int64_t>();
  } else {
    c.rope_scaling.original_max_position_embeddings = c.max_seq_len;
  }
  if (!(c.rope_scaling.factor > 0)) throw InputError(field("factor") + " must be positive");
}

const char* architecture_name(const std::string& model_type) {
  if (model_type == "qwen2") return "Qwen2ForCausalLM";
  if (model_type == "mistral") return "MistralForCausalLM";
  return "LlamaForCausalLM";
}

}  // namespace

bool is_llama_model_type(const std::string& t) { return t == "llama" || t == "qwen2" || t == "mistral"; }

GPT2Config llama_config_from_json(const json& j, const std::string& path) {
  GPT2Config c;
  c.arch = Arch::Llama;
  c.model_type = j["model_type"].get<std::string>();
  c.vocab_size = int_key(j, path, "vocab_size", true, 0);
  c.n_embd = int_key(j, path, "hidden_size", true, 0);
  c.intermediate_size = int_key(j, path, "intermediate_size", true, 0);
  c.n_layer = int_key(j, path, "num_hidden_layers", true, 0);
  c.n_head = int_key(j, path, "num_attention_heads", true, 0);
  c.n_kv_head = int_key(j, path, "num_key_value_heads", false, c.n_head);
  c.max_seq_len = int_key(j, path, "max_position_embeddings", true, 0);
  c.ln_eps = num_key(j, path, "rms_norm_eps", 1e-6);
  if (c.n_kv_head <= 0)
    throw InputError(path + ": field 'num_key_value_heads' must be positive, got " + std::to_string(c.n_kv_head));
  if (c.intermediate_size <= 0)
    throw InputError(path + ": field 'intermediate_size' must be positive, got " + std::to_string(c.intermediate_size));
  if (c.n_head > 0 && j.contains("head_dim") && !j["head_dim"].is_null()) {
    const int64_t hd = int_key(j, path, "head_dim", false, 0);
    if (hd != c.n_embd / c.n_head)
      throw InputError(path + ": field 'head_dim' is " + std::to_string(hd) +
                       "; only hidden_size / num_attention_heads (" + std::to_string(c.n_embd / c.n_head) +
                       ") is supported");
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    throw InputError(path + ": field 'hidden_act' is " + j["hidden_act"].dump() + ", only \"silu\" is supported");
  read_rope(j, path, c);
  c.tie_word_embeddings = bool_key(j, path, "tie_word_embeddings", false);
  if (bool_key(j, path, "mlp_bias", false)) throw InputError(path + ": field 'mlp_bias' = true is not supported");
  if (c.model_type == "qwen2") {
    c.attention_bias = true;  // Qwen2Attention: q/k/v biases always, o_proj none
    if (bool_key(j, path, "use_sliding_window", false))
      throw InputError(path + ": field 'use_sliding_window' = true is not supported (full attention only)");
    if (j.contains("layer_types") && j["layer_types"].is_array())
      for (const json& t : j["layer_types"])
        if (t != "full_attention")
          throw InputError(path + ": field 'layer_types' holds " + t.dump() + "; only \"full_attention\" is supported");
  } else {
    if (bool_key(j, path, "attention_bias", false))
      throw InputError(path + ": field 'attention_bias' = true is not supported (it gives o_proj a bias too)");
    if (c.model_type == "mistral" && j.contains("sliding_window") && !j["sliding_window"].is_null())
      throw InputError(path + ": field 'sliding_window' is " + j["sliding_window"].dump() +
                       "; only null (full attention) is supported");
  }
  return c;
}

json llama_config_to_json(const GPT2Config& c) {
  json rope = {{"rope_type", c.rope_scaling.enabled() ? "llama3" : "default"}, {"rope_theta", c.rope_theta}};
  if (c.rope_scaling.enabled()) {
    rope["factor"] = c.rope_scaling.factor;
    rope["low_freq_factor"] = c.rope_scaling.low_freq_factor;
    rope["high_freq_factor"] = c.rope_scaling.high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
  }
  json j = {
      {"architectures", {architecture_name(c.model_type)}},
      {"model_type", c.model_type},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.n_embd},
      {"intermediate_size", c.mlp_width()},
      {"num_hidden_layers", c.n_layer},
      {"num_attention_heads", c.n_head},
      {"num_key_value_heads", c.kv_heads()},
      {"max_position_embeddings", c.max_seq_len},
      {"rms_norm_eps", c.ln_eps},
      {"hidden_act", "silu"},
      {"rope_theta", c.rope_theta},
      {"rope_parameters", rope},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"attention_dropout", 0.0},
      {"initializer_range", 0.02},
      {"torch_dtype", "float32"},
  };
  if (c.model_type == "qwen2") {
    j["use_sliding_window"] = false;
  } else {
    j["head_dim"] = c.head_dim();
    if (c.model_type == "llama") {
      j["attention_bias"] = false;
      j["mlp_bias"] = false;
    } else {
      j["sliding_window"] = nullptr;
    }
  }
  return j;
}

namespace {

// One HF tensor's part of a parameter: our [rows, cols] parameter (InOut) receives HF's [out, in] tensor
// transposed into columns [col0, col0 + out); a 1-D parameter receives elements [col0, col0 + n).
struct Piece {
  std::string hf;  // HF name
  int64_t col0 = 0;
  int64_t out = 0;  // HF rows (or elements of a 1-D tensor)
  int64_t in = 0;   // HF columns (0: 1-D)
  bool transpose = true;
};

// The HF pieces of each parameter of `model`, in the model's spec order.
std::vector<std::pair<std::string, std::vector<Piece>>> pieces(const GPT2& model) {
  const GPT2Config& c = model.config();
  const int64_t C = c.n_embd, D = c.head_dim(), NH = c.n_head, KV = c.kv_heads(), I = c.mlp_width(),
                V = c.vocab_size;
  std::vector<std::pair<std::string, std::vector<Piece>>> r;
  for (const ParamSpec& s : model.specs()) {
    const std::string& n = s.name;
    std::vector<Piece> p;
    auto ends = [&](const std::string& suffix) {
      return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (n == "embed_tokens.weight") {
      p.push_back({"model.embed_tokens.weight", 0, V, C, false});
    } else if (n == "lm_head.weight") {
      p.push_back({"lm_head.weight", 0, V, C, false});
    } else if (n == "norm.weight" || ends("layernorm.weight")) {
      p.push_back({"model." + n, 0, C, 0, false});
    } else {
      const std::string layer = "model." + n.substr(0, n.find('.', std::string("layers.").size()) + 1);
      if (ends("self_attn.qkv_proj.weight")) {
        p.push_back({layer + "self_attn.q_proj.weight", 0, NH * D, C});
        p.push_back({layer + "self_attn.k_proj.weight", NH * D, KV * D, C});
        p.push_back({layer + "self_attn.v_proj.weight", (NH + KV) * D, KV * D, C});
      } else if (ends("self_attn.qkv_proj.bias")) {
        p.push_back({layer + "self_attn.q_proj.bias", 0, NH * D, 0, false});
        p.push_back({layer + "self_attn.k_proj.bias", NH * D, KV * D, 0, false});
        p.push_back({layer + "self_attn.v_proj.bias", (NH + KV) * D, KV * D, 0, false});
      } else if (ends("self_attn.o_proj.weight")) {
        p.push_back({layer + "self_attn.o_proj.weight", 0, C, NH * D});
      } else if (ends("mlp.gate_up_proj.weight")) {
        p.push_back({layer + "mlp.gate_proj.weight", 0, I, C});
        p.push_back({layer + "mlp.up_proj.weight", I, I, C});
      } else if (ends("mlp.down_proj.weight")) {
        p.push_back({layer + "mlp.down_proj.weight", 0, C, I});
      } else {
        throw Error("llama checkpoint: no HF name for parameter '" + n + "'");
      }
    }
    r.emplace_back(n, std::move(p));
  }
  return r;
}

Shape hf_shape(const Piece& p) { return p.in > 0 ? Shape{p.out, p.in} : Shape{p.out}; }

}  // namespace

LoadReport load_llama_weights(GPT2& model, const std::string& weights) {
  const SafetensorsDir file = SafetensorsDir::open(weights);
  const std::string& path = file.path();  // the single file or the index: what messages name
  LoadReport report;
  const auto plan = pieces(model);
  std::set<std::string> wanted;
  for (const auto& [name, ps] : plan)
    for (const Piece& p : ps) wanted.insert(p.hf);
  const SafetensorsEntry* tied_copy = nullptr;
  for (const auto& e : file.entries()) {
    if (wanted.count(e.name)) continue;
    if (e.name == "lm_head.weight" && model.config().tied_head()) {
      tied_copy = &e;
      continue;
    }
    if (e.name.find("rotary_emb.inv_freq") != std::string::npos) {
      report.ignored.push_back(e.name);
      continue;
    }
    throw InputError(path + ": unexpected tensor '" + e.name + "' (not a parameter of this " +
                     model.config().model_type + " model)");
  }
  for (const auto& [name, ps] : plan) {
    const ParamSpec& s = model.spec(name);
    Tensor host = Tensor::host(s.shape, DType::F64);
    double* dst = host.data<double>();
    const int64_t cols = s.shape.size() == 2 ? s.shape[1] : 0;
    for (const Piece& p : ps) {
      const SafetensorsEntry* e = file.find(p.hf);
      if (!e) throw InputError(path + ": missing tensor '" + p.hf + "'");
      if (e->shape != hf_shape(p))
        throw InputError(path + ": tensor '" + p.hf + "' has shape " + shape_str(e->shape) + ", config expects " +
                         shape_str(hf_shape(p)));
      if (e->dtype != DType::F32 && e->dtype != DType::F64 && e->dtype != DType::BF16 && e->dtype != DType::F16)
        throw InputError(path + ": tensor '" + p.hf + "' has dtype " + dtype_name(e->dtype) +
                         "; weights must be F32, F64, BF16 or F16");
      const Tensor t = file.read_as(p.hf, DType::F64);
      const double* src = t.data<double>();
      if (!p.transpose) {
        std::memcpy(dst + p.col0, src, static_cast<size_t>(t.numel()) * sizeof(double));
      } else {
        for (int64_t o = 0; o < p.out; ++o)
          for (int64_t i = 0; i < p.in; ++i) dst[i * cols + p.col0 + o] = src[o * p.in + i];
      }
    }
    model.assign_param(name, host);
  }
  if (tied_copy) {
    const std::string embed = "model.embed_tokens.weight";
    if (tied_copy->shape != file.find(embed)->shape)
      throw InputError(path + ": tensor 'lm_head.weight' has shape " + shape_str(tied_copy->shape) +
                       ", expected the tied embedding's shape");
    Tensor a = file.read_as("lm_head.weight", DType::F64), b = file.read_as(embed, DType::F64);
    if (std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.nbytes())) != 0)
      throw InputError(path + ": tensor 'lm_head.weight' differs from " + embed +
                       " but config.json says tie_word_embeddings = true");
  }
  return report;
}

std::vector<std::pair<std::string, Tensor>> llama_hf_tensors(const GPT2& model, const Tensor& host) {
  DPO_ASSERT(host.device().kind == DeviceKind::CPU && host.dtype() == DType::F32 &&
                 host.numel() == model.params().numel(),
             "llama_hf_tensors: host_weights must be a host F32 tensor of num_parameters elements");
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, ps] : pieces(model)) {
    const ParamSpec& s = model.spec(name);
    const float* src = host.data<float>() + s.offset;
    const int64_t cols = s.shape.size() == 2 ? s.shape[1] : 0;
    for (const Piece& p : ps) {
      Tensor t = Tensor::host(hf_shape(p), DType::F32);
      float* dst = t.data<float>();
      if (!p.transpose) {
        std::memcpy(dst, src + p.col0, static_cast<size_t>(t.numel()) * sizeof(float));
      } else {
        for (int64_t o = 0; o < p.out; ++o)
          for (int64_t i = 0; i < p.in; ++i) dst[o * p.in + i] = src[i * cols + p.col0 + o];
      }
      out.emplace_back(p.hf, std::move(t));
    }
  }
  return out;
}

}  // namespace dpo
