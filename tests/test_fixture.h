// Shared test fixtures: a padded token batch for model tests, and the tiny on-disk training fixture (model and
// JSONL files) that the trainer tests, the MPI tests and the bf16 training test share.
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "model/gpt2.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "train/data.h"

namespace dpo::test {

// Host tensors for a batch of B rows of T tokens: row b is right-padded by b % 3 positions (tokens 0, keymask 0);
// the targets are the next tokens, and the completion weights (F64) are 1 from t = 2 on where the next token is
// real, else 0 with target -1.
struct PaddedBatch {
  Tensor tokens, keymask, targets, weights;
  int64_t B, T;
};

inline PaddedBatch make_padded_batch(std::mt19937_64& g, int64_t vocab, int64_t B, int64_t T) {
  PaddedBatch in{Tensor::host({B, T}, DType::I32), Tensor::host({B, T}, DType::I32), Tensor::host({B, T}, DType::I32),
                 Tensor::host({B, T}, DType::F64), B, T};
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = T - b % 3;
    for (int64_t t = 0; t < T; ++t) {
      in.tokens.data<int32_t>()[b * T + t] = t < len ? tok(g) : 0;
      in.keymask.data<int32_t>()[b * T + t] = t < len ? 1 : 0;
    }
    for (int64_t t = 0; t < T; ++t) {
      const bool real_next = t + 1 < len;
      in.targets.data<int32_t>()[b * T + t] = real_next ? in.tokens.data<int32_t>()[b * T + t + 1] : -1;
      in.weights.data<double>()[b * T + t] = (real_next && t >= 2) ? 1.0 : 0.0;
    }
  }
  return in;
}

// N(0, scale) in every parameter of a host F64 model (large enough, e.g. 0.3, that every nonlinearity is away
// from its linear regime).
inline void randomize_f64(GPT2& m, std::mt19937_64& g, double scale) {
  std::normal_distribution<double> d(0.0, scale);
  double* p = m.params().data<double>();
  for (int64_t i = 0; i < m.params().numel(); ++i) p[i] = d(g);
}

// All weights of a checkpoint directory's model.safetensors, tensor by tensor in file order, as doubles.
inline std::vector<double> checkpoint_weights(const std::string& dir) {
  SafetensorsFile f(dir + "/model.safetensors");
  std::vector<double> out;
  for (const auto& e : f.entries()) {
    Tensor t = f.read_as(e.name, DType::F64);
    out.insert(out.end(), t.data<double>(), t.data<double>() + t.numel());
  }
  return out;
}

// A tiny GPT-2 (byte vocabulary, 2 layers, width 16, seeded) in dir/base, preference pairs in dir/pref.jsonl
// (n_pairs), evaluation pairs in dir/eval.jsonl (9), SFT examples in dir/sft.jsonl (n_pairs).
inline void write_tiny_fixture(const std::string& dir, int n_pairs) {
  auto be = make_cpu_backend(1);
  GPT2Config c;
  c.vocab_size = 257;
  c.max_seq_len = 40;
  c.n_embd = 16;
  c.n_head = 2;
  c.n_layer = 2;
  GPT2 m(*be, c, DType::F32);
  Rng rng(3);
  m.init_random(rng);
  save_gpt2_checkpoint(m, dir + "/base");
  const char* good[] = {"great", "fine", "superb", "lovely"};
  const char* bad[] = {"awful", "dull", "weak", "bad"};
  std::ofstream pref(dir + "/pref.jsonl"), sft(dir + "/sft.jsonl"), ev(dir + "/eval.jsonl");
  for (int i = 0; i < n_pairs; ++i) {
    nlohmann::json j = {{"prompt", "review " + std::to_string(i % 5) + ":"},
                        {"chosen", std::string(" ") + good[i % 4] + (i % 3 ? " film" : "")},
                        {"rejected", std::string(" ") + bad[(i + 1) % 4]}};
    pref << j.dump() << "\n";
    const char* word = i % 2 ? good[i % 4] : bad[i % 4];
    nlohmann::json s = {{"prompt", "review:"}, {"completion", std::string(" ") + word}};
    sft << s.dump() << "\n";
  }
  for (int i = 0; i < 9; ++i) {
    nlohmann::json j = {{"prompt", "opinion " + std::to_string(i % 3) + ":"},
                        {"chosen", std::string(" ") + good[(i + 2) % 4] + " show"},
                        {"rejected", std::string(" ") + bad[i % 4] + (i % 2 ? " plot" : "")}};
    ev << j.dump() << "\n";
  }
}

// n preference pairs of random tokens in [0, vocab): prompts of 1..max_prompt tokens, completions of
// 1..max_completion, each with scores (score_chosen > score_rejected, for ODPO).
inline std::vector<PreferencePair> random_pairs(std::mt19937_64& g, int64_t n, int32_t vocab, int max_prompt = 9,
                                                int max_completion = 7) {
  std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
  std::uniform_int_distribution<int> plen(1, max_prompt), clen(1, max_completion);
  std::vector<PreferencePair> d(static_cast<size_t>(n));
  for (auto& x : d) {
    for (int i = plen(g); i > 0; --i) x.prompt.push_back(tok(g));
    for (int i = clen(g); i > 0; --i) x.chosen.push_back(tok(g));
    for (int i = clen(g); i > 0; --i) x.rejected.push_back(tok(g));
    x.has_scores = true;
    x.score_rejected = 0.25;
    x.score_chosen = 0.25 + std::uniform_real_distribution<double>(0.1, 3.0)(g);
  }
  return d;
}

}  // namespace dpo::test
