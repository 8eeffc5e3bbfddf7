// Pieces the `dpo repro` experiments on the sentiment task share (train/repro_frontier.cpp, repro_odpo.cpp):
// estimates with standard errors, their means over seeds, and the log-probs of preference pairs' completions.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "train/data.h"
#include "train/tokenizer.h"

namespace dpo::repro {

// An estimate with one standard error.
struct Est {
  double mean = 0, se = 0;
};
nlohmann::json to_json(const Est& e);
std::string pm(const Est& e, int prec = 3);  // "mean ± se"

// The mean over seeds of per-seed estimates. Its standard error is the larger of the sampling error alone
// (sqrt(sum se_k^2) / S) and the spread of the seed means (sd / sqrt(S)), which also holds the training's
// randomness but is itself poorly estimated from a few seeds.
Est seed_mean(const std::vector<Est>& per_seed);
// Mean and standard error of the mean of plain values (se 0 for one value; mean NaN for none).
Est mean_se(const std::vector<double>& v);

// A preference-pair file (token form, as demo::write_token_pairs writes it) as two lists of (prompt, completion)
// examples for demo::completion_logps, with each pair's scores (0 where the record has none).
struct PairExamples {
  std::vector<SftExample> chosen, rejected;
  std::vector<double> score_chosen, score_rejected;
};
PairExamples load_pair_examples(const std::string& path, const Tokenizer& tok);

// Mean sequence log-prob of the examples' completions under m, with its standard error over the examples.
Est mean_logp(GPT2& m, const std::vector<SftExample>& ex);

}  // namespace dpo::repro
