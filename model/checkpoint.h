// HF-format checkpoints: a directory with config.json and the weights, model.safetensors or (sharded)
// model.safetensors.index.json and its shards (runtime/safetensors.h, SafetensorsDir). GPT-2 below; config.json's
// model_type llama, qwen2 or mistral selects the Llama family, whose keys and tensor names model/hf_llama.h
// describes (the functions here dispatch to it, so every caller loads and saves both architectures alike).
//
// Loading accepts what HF writes: tensor names with or without the "transformer." prefix, F32/F64/BF16/F16
// weights (converted to the model's dtype), the non-parameter buffers old checkpoints carry (h.<l>.attn.bias,
// h.<l>.attn.masked_bias: ignored and listed in LoadReport), and lm_head.weight when it equals wte (tied). Every
// other deviation -- a missing or unexpected tensor, a wrong shape, an unsupported dtype, an untied LM head, a
// config field missing, mistyped or inconsistent -- throws dpo::InputError naming the file and the field/tensor.
//
// Saving writes config.json and the weights (model.safetensors, or shards and their index when they exceed
// max_shard_bytes; F32, "transformer."-prefixed names as GPT2LMHeadModel's save_pretrained does, or the Llama
// family's HF names) so that transformers' from_pretrained loads it; each file is written atomically.
// What the loaded model's directory held beyond the weights is carried on (GPT2Config): config.json's
// bos_token_id/eos_token_id and every key the saver does not write itself, and generation_config.json byte for
// byte. A model made from scratch (`dpo init`) gets the ids its GPT2Config names, else vocab_size - 1.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/gpt2.h"
#include "runtime/safetensors.h"

namespace dpo {

inline constexpr const char* kGenerationConfigFile = "generation_config.json";

// Parses and validates a GPT-2 config.json.
GPT2Config load_gpt2_config(const std::string& path);
std::string gpt2_config_json(const GPT2Config& cfg);

struct LoadReport {
  std::vector<std::string> ignored;  // buffers that are not parameters
};

// The special-token ids a model's directory names: eos_token_id (an integer or a list, as Llama 3's files have it)
// and pad_token_id, from config.json (GPT2Config keeps them: bos/eos_token_id when an integer, other forms in
// hf_extra_json) and else from generation_config.json. Ids that are not integers in [0, vocab_size) throw
// InputError naming `dir`'s file and the field.
struct SpecialTokenIds {
  std::vector<int64_t> eos;  // empty: none named; several: the order of the file's list
  std::string eos_source;    // "config.json" or "generation_config.json" (empty when none)
  int64_t pad = -1;          // -1: none named
  std::string pad_source;
};
SpecialTokenIds special_token_ids(const GPT2Config& cfg, const std::string& dir);

// Loads weights into an existing model whose config matches the file's shapes. `path`: one .safetensors file, or a
// model directory with model.safetensors or model.safetensors.index.json and its shards (SafetensorsDir).
LoadReport load_gpt2_weights(GPT2& model, const std::string& path);

// config.json + the weights (either form, SafetensorsDir) from `dir`, and generation_config.json when present (a
// JSON object, else InputError naming it).
std::unique_ptr<GPT2> load_gpt2_checkpoint(Backend& backend, const std::string& dir, DType dtype,
                                           LoadReport* report = nullptr);

// The model's weights (host_weights: host, [num_parameters] F32) as the tensors a checkpoint stores: HF names and
// layouts ("transformer."-prefixed GPT-2 names, or the Llama family's, model/hf_llama.h), views of host_weights or
// copies. What load_gpt2_weights reads back.
std::vector<std::pair<std::string, Tensor>> hf_weight_tensors(const GPT2& model, const Tensor& host_weights);

// Creates `dir` if needed; writes config.json and the weights: model.safetensors, or shards of at most
// max_shard_bytes and their index when they do not fit in one (save_safetensors_dir). Returns the names written
// in `dir` (for its checksums.json).
std::vector<std::string> save_gpt2_checkpoint(const GPT2& model, const std::string& dir,
                                              int64_t max_shard_bytes = kDefaultMaxShardBytes);
// The same, with the weights taken from `host_weights` (host, [num_parameters], any floating dtype) instead of
// the model's master: for a model whose master weights are sharded (the trainer gathers them first).
std::vector<std::string> save_gpt2_checkpoint(const GPT2& model, const std::string& dir, const Tensor& host_weights,
                                              int64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace dpo
