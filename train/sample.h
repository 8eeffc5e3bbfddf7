// Sampling completions from a GPT-2: temperature, top-k, top-p (nucleus), seeded.
//
// Batches are right-padded, so every prompt keeps positions 0..len-1 exactly as when run alone (causal attention
// never lets a real token see the padding after it). Each new token costs one full forward of the batch (no KV
// cache): fine for the small models and short completions of evaluation and the demo, not a serving path.
#pragma once

#include <cstdint>
#include <vector>

#include "model/gpt2.h"
#include "runtime/rng.h"

namespace dpo {

struct SampleOptions {
  double temperature = 1.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  int64_t max_new_tokens = 64;
  int32_t eos_id = -1;  // generation of a row stops after it emits eos_id; -1 = never
};

// Throws InputError naming the option (temperature < 0, top_k < 0, top_p outside (0, 1], max_new_tokens <= 0).
void validate(const SampleOptions& opt);

// One completion per prompt (the EOS, when emitted, is the last token of its completion). Prompts must be
// non-empty and leave room in the context: prompt length + max_new_tokens is capped at n_positions.
std::vector<std::vector<int32_t>> generate(GPT2& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const SampleOptions& opt, Rng& rng);

// Picks one token id from a row of logits [V] under the options (exposed for tests).
int32_t sample_token(const float* logits, int64_t V, const SampleOptions& opt, Rng& rng);

}  // namespace dpo
