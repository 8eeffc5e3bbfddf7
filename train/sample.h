// Sampling completions from a GPT-2: temperature, top-k, top-p (nucleus), seeded.
//
// Every prompt keeps positions 0..len-1 exactly as when run alone. Two ways to get each new token's logits:
//   - KvCache (default): one forward of the right-padded prompts (the prefill, GPT2::decode_prefill), then one token
//     per sequence per step against the key/value cache (GPT2::decode_step), positions per sequence; sequences that
//     finish leave the batch (GPT2::decode_select).
//   - FullRecompute: one full forward of the right-padded batch per new token (causal attention never lets a real
//     token see the padding after it). The reference the cache is tested against.
// Both draw the same random numbers in the same order (rows in prompt order, one draw per sampled token), so with
// one seed they give the same tokens wherever their logits agree to rounding.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/gpt2.h"
#include "runtime/rng.h"

namespace dpo {

enum class Decoding {
  KvCache,        // prefill once, then one token per sequence per step against the key/value cache
  FullRecompute,  // a full forward of the whole batch for every new token
};

struct SampleOptions {
  double temperature = 1.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  int64_t max_new_tokens = 64;
  int32_t eos_id = -1;  // generation of a row stops after it emits eos_id; -1 = never
  Decoding decoding = Decoding::KvCache;
};

// Sees the logits each token is drawn from, before the draw: step (0-based), the prompt's index, logits[0, V).
using LogitsObserver = std::function<void(int64_t step, int64_t prompt, const float* logits, int64_t V)>;

// Throws InputError naming the option (temperature < 0, top_k < 0, top_p outside (0, 1], max_new_tokens <= 0).
void validate(const SampleOptions& opt);

// One completion per prompt (the EOS, when emitted, is the last token of its completion). Prompts must be
// non-empty and leave room in the context (InputError otherwise): prompt length + max_new_tokens is capped at
// n_positions, i.e. a completion stops when its sequence reaches n_positions. `observe` (optional) is called once
// per generated token.
std::vector<std::vector<int32_t>> generate(GPT2& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const SampleOptions& opt, Rng& rng, const LogitsObserver& observe = {});

// Picks one token id from a row of logits [V] under the options (exposed for tests).
int32_t sample_token(const float* logits, int64_t V, const SampleOptions& opt, Rng& rng);

}  // namespace dpo
