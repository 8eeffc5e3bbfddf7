// HF-format Llama-family checkpoints (model_type llama, qwen2, mistral): config.json keys and safetensors tensor
// names in and out, for model/checkpoint.h (which dispatches here on model_type).
//
// config.json: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
// num_key_value_heads (absent or null: num_attention_heads), max_position_embeddings, rms_norm_eps (default 1e-6),
// hidden_act "silu", rope_theta (default 10000) and the rope type, from transformers 5's rope_parameters object or
// the older rope_scaling object: "default" or "llama3" (factor, low_freq_factor, high_freq_factor,
// original_max_position_embeddings; other rope types are refused naming the key), head_dim (absent, null or
// hidden_size / num_attention_heads), tie_word_embeddings (default false). llama: attention_bias must be false
// (Llama's attention_bias also gives o_proj a bias, which this model does not have) and mlp_bias false; qwen2:
// q/k/v biases always, use_sliding_window false and no "sliding_attention" layer type; mistral: sliding_window null
// or absent. Every other deviation throws InputError naming the file and the key.
//
// Tensors: model.embed_tokens.weight, model.layers.<l>.{input_layernorm, post_attention_layernorm}.weight,
// model.layers.<l>.self_attn.{q,k,v,o}_proj.weight (and q/k/v_proj.bias with attention_bias),
// model.layers.<l>.mlp.{gate,up,down}_proj.weight, model.norm.weight, lm_head.weight (untied; a tied model's file
// may carry it when it equals the embedding). HF's Linear weights are [out, in]; the model's layout (model/gpt2.h)
// is [in, out] with q|k|v and gate|up concatenated: loading transposes and concatenates, saving splits and
// transposes back. Rotary inv_freq buffers of old checkpoints are ignored (listed in LoadReport).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "model/checkpoint.h"

namespace dpo {

bool is_llama_model_type(const std::string& model_type);

// The model settings of a Llama-family config.json (parsed object `j` of file `path`); validate() not yet run.
GPT2Config llama_config_from_json(const nlohmann::json& j, const std::string& path);
// The config.json object saved for a Llama-family model (without the special-token ids and extra keys, which
// gpt2_config_json adds for both architectures).
nlohmann::json llama_config_to_json(const GPT2Config& c);

// `weights`: one .safetensors file, or a model directory in either form (model.safetensors, or
// model.safetensors.index.json and its shards, as Llama checkpoints ship: SafetensorsDir).
LoadReport load_llama_weights(GPT2& model, const std::string& weights);
// The model's parameters (host_weights: host, [num_parameters] F32) as HF tensors, HF names and layouts.
std::vector<std::pair<std::string, Tensor>> llama_hf_tensors(const GPT2& model, const Tensor& host_weights);

}  // namespace dpo
