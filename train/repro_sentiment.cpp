// The pieces the sentiment-task experiments share (train/repro_sentiment.h).
#include "train/repro_sentiment.h"

#include <algorithm>
#include <cmath>

#include "train/demo.h"
#include "train/repro_common.h"

namespace dpo::repro {

nlohmann::json to_json(const Est& e) { return {{"mean", e.mean}, {"se", e.se}}; }
std::string pm(const Est& e, int prec) { return fmt(e.mean, prec) + " ± " + fmt(e.se, 2); }

Est seed_mean(const std::vector<Est>& per_seed) {
  Est out;
  const double S = static_cast<double>(per_seed.size());
  double se2 = 0;
  for (const Est& e : per_seed) out.mean += e.mean / S, se2 += e.se * e.se;
  double var = 0;
  for (const Est& e : per_seed) var += (e.mean - out.mean) * (e.mean - out.mean);
  const double between = per_seed.size() > 1 ? std::sqrt(var / (S - 1) / S) : 0.0;
  out.se = std::max(std::sqrt(se2) / S, between);
  return out;
}

Est mean_se(const std::vector<double>& v) {
  Est e;
  const double n = static_cast<double>(v.size());
  if (v.empty()) return {NAN, 0.0};
  for (double x : v) e.mean += x / n;
  double var = 0;
  for (double x : v) var += (x - e.mean) * (x - e.mean);
  e.se = v.size() > 1 ? std::sqrt(var / (n - 1) / n) : 0.0;
  return e;
}

PairExamples load_pair_examples(const std::string& path, const Tokenizer& tok) {
  DataOptions d;
  d.max_length = 80;  // the task's sequences: prompt <= 24 bytes, completion <= 48 bytes + EOS
  PairExamples h;
  for (const PreferencePair& p : load_preferences(path, tok, d, nullptr)) {
    SftExample c, r;
    c.prompt = r.prompt = p.prompt;
    c.completion = p.chosen;
    r.completion = p.rejected;
    h.chosen.push_back(std::move(c));
    h.rejected.push_back(std::move(r));
    h.score_chosen.push_back(p.has_scores ? p.score_chosen : 0.0);
    h.score_rejected.push_back(p.has_scores ? p.score_rejected : 0.0);
  }
  return h;
}

Est mean_logp(GPT2& m, const std::vector<SftExample>& ex) { return mean_se(demo::completion_logps(m, ex, 64)); }

}  // namespace dpo::repro
