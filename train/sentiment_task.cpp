#include "train/sentiment_task.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "runtime/error.h"

namespace dpo {

namespace {

// --- the lexicon ---------------------------------------------------------------------------------------------

const std::vector<std::string> kPositiveAdjectives = {"beautiful", "brilliant", "charming", "clever",
                                                      "excellent", "fresh",     "funny",    "good",
                                                      "great",     "gripping",  "lovely",   "moving",
                                                      "superb",    "wonderful"};
const std::vector<std::string> kNegativeAdjectives = {"awful", "bad",   "bland",   "boring",  "clumsy",
                                                      "dull",  "messy", "painful", "poor",    "silly",
                                                      "stale", "tedious", "terrible", "weak"};
const std::vector<std::string> kPositiveVerbs = {"adored", "enjoyed", "liked", "loved"};
const std::vector<std::string> kNegativeVerbs = {"disliked", "hated", "loathed", "regretted"};
const std::vector<std::string> kIntensifiers = {"quite", "really", "so", "truly", "very"};
const std::vector<std::string> kNeutralAdjectives = {"different", "familiar", "long",   "loud",
                                                     "quiet",     "serious",  "short",  "simple"};
const std::vector<std::string> kFillers = {"at first", "at times", "for me", "in places", "overall", "to me"};
const std::vector<std::string> kSubjects = {"the film",   "this movie", "the plot",  "the acting",
                                            "the cast",   "the ending", "the script", "the music",
                                            "the story",  "this show",  "the dialogue", "the pacing"};
const std::vector<std::string> kVerbs = {"was", "felt", "seemed", "is"};

std::vector<std::string> sorted_union(std::initializer_list<const std::vector<std::string>*> lists) {
  std::vector<std::string> out;
  for (const auto* l : lists) out.insert(out.end(), l->begin(), l->end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<std::string> split_words(std::string_view s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

const std::unordered_map<std::string, int>& sign_table() {
  static const std::unordered_map<std::string, int> table = [] {
    std::unordered_map<std::string, int> t;
    for (const auto& w : positive_words()) t[w] = +1;
    for (const auto& w : negative_words()) t[w] = -1;
    return t;
  }();
  return table;
}

bool contains(const std::vector<std::string>& v, std::string_view w) {
  return std::find(v.begin(), v.end(), w) != v.end();
}

// --- randomness ------------------------------------------------------------------------------------------------

// Independent streams for the different products of one seed.
enum Stream : uint64_t { kSftStream = 1, kTrainPromptStream = 2, kEvalPromptStream = 3, kOracleStream = 4 };

Rng stream_rng(uint64_t seed, Stream stream) {
  return Rng(seed ^ (0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(stream)));
}

template <class T>
const T& pick(Rng& rng, const std::vector<T>& v) {
  return v[rng.below(v.size())];
}

template <class T>
void shuffle(Rng& rng, std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

// n items from `set`, each used floor(n / |set|) or ceil(n / |set|) times: a run of freshly shuffled copies.
std::vector<std::string> balanced_draw(const std::vector<std::string>& set, int64_t n, Rng& rng) {
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(n));
  while (static_cast<int64_t>(out.size()) < n) {
    std::vector<std::string> cycle = set;
    shuffle(rng, cycle);
    for (const auto& p : cycle) {
      if (static_cast<int64_t>(out.size()) == n) break;
      out.push_back(p);
    }
  }
  return out;
}

void validate(const SentimentCorpusOptions& o) {
  if (o.n_train < 0) throw InputError("sentiment corpus: n_train must be >= 0 (got " + std::to_string(o.n_train) + ")");
  if (o.n_eval < 0) throw InputError("sentiment corpus: n_eval must be >= 0 (got " + std::to_string(o.n_eval) + ")");
  if (!(o.positive_fraction >= 0.0 && o.positive_fraction <= 1.0))
    throw InputError("sentiment corpus: positive_fraction must be in [0, 1] (got " +
                     std::to_string(o.positive_fraction) + ")");
}

int draw_polarity(Rng& rng, double positive_fraction) { return rng.uniform() < positive_fraction ? +1 : -1; }

// CLAUSE with net sign `polarity`: ["not "] [INTENSIFIER " "] ADJECTIVE.
std::string sample_clause(Rng& rng, int polarity) {
  const bool negated = rng.uniform() < 0.2;
  const int adj_sign = negated ? -polarity : polarity;
  std::string s;
  if (negated) s += "not ";
  if (rng.uniform() < 0.35) s += pick(rng, kIntensifiers) + " ";
  s += pick(rng, adj_sign > 0 ? kPositiveAdjectives : kNegativeAdjectives);
  return s;
}

// --- file output -----------------------------------------------------------------------------------------------

void write_atomically(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error("cannot create " + tmp + ": " + std::strerror(errno));
  bool ok = std::fwrite(content.data(), 1, content.size(), f) == content.size();
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  const int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    throw Error("writing " + tmp + " failed: " + std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw Error("renaming " + tmp + " to " + path + " failed: " + std::strerror(e));
  }
}

}  // namespace

// --- lexicon ---------------------------------------------------------------------------------------------------

const std::vector<std::string>& positive_words() {
  static const std::vector<std::string> w = sorted_union({&kPositiveAdjectives, &kPositiveVerbs});
  return w;
}
const std::vector<std::string>& negative_words() {
  static const std::vector<std::string> w = sorted_union({&kNegativeAdjectives, &kNegativeVerbs});
  return w;
}
const std::vector<std::string>& intensifiers() {
  static const std::vector<std::string> w = sorted_union({&kIntensifiers});
  return w;
}
const std::vector<std::string>& neutral_words() {
  static const std::vector<std::string> w = [] {
    std::vector<std::string> v = {"not", "and", "but", "i", "it"};
    for (const auto* list : {&kNeutralAdjectives, &kFillers, &kSubjects, &kVerbs})
      for (const auto& phrase : *list)
        for (auto& word : split_words(phrase)) v.push_back(word);
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
  }();
  return w;
}

// --- reward ----------------------------------------------------------------------------------------------------

double sentiment_reward(std::string_view completion) {
  const auto& signs = sign_table();
  int64_t total = 0;
  bool negation = false;  // a "not" is waiting for its sentiment word
  std::string word;
  auto finish_word = [&] {
    if (word.empty()) return;
    if (word == "not") {
      negation = true;
    } else if (auto it = signs.find(word); it != signs.end()) {
      total += negation ? -it->second : it->second;
      negation = false;
    } else if (!contains(kIntensifiers, word)) {
      negation = false;
    }
    word.clear();
  };
  for (char c : completion) {
    if (c >= 'a' && c <= 'z') {
      word += c;
    } else if (c >= 'A' && c <= 'Z') {
      word += static_cast<char>(c - 'A' + 'a');
    } else {
      finish_word();
    }
  }
  finish_word();
  return static_cast<double>(total);
}

bool is_grammatical_completion(std::string_view c) {
  if (c.size() < 4 || c.front() != ' ' || c.substr(c.size() - 2) != " .") return false;
  const std::string_view body = c.substr(1, c.size() - 3);
  // Single spaces only: no empty word, so no leading/trailing/double space.
  if (body.empty() || body.front() == ' ' || body.back() == ' ' || body.find("  ") != std::string_view::npos)
    return false;
  const std::vector<std::string> t = split_words(body);
  size_t i = 0;
  auto is_adj = [](const std::string& w) { return contains(kPositiveAdjectives, w) || contains(kNegativeAdjectives, w); };
  auto clause = [&]() {  // ["not"] [INTENSIFIER] ADJECTIVE
    if (i < t.size() && t[i] == "not") ++i;
    if (i < t.size() && contains(kIntensifiers, t[i])) ++i;
    if (i < t.size() && is_adj(t[i])) return ++i, true;
    return false;
  };
  if (!clause()) return false;
  if (i == t.size()) return true;
  if (t[i] == "and") {
    ++i;
    if (i + 3 == t.size() && t[i] == "i" && t[i + 2] == "it" &&
        (contains(kPositiveVerbs, t[i + 1]) || contains(kNegativeVerbs, t[i + 1])))
      return true;
    return clause() && i == t.size();
  }
  if (t[i] == "but") {
    ++i;
    if (i < t.size() && contains(kIntensifiers, t[i])) ++i;
    return i + 1 == t.size() && contains(kNeutralAdjectives, t[i]);
  }
  std::string rest;
  for (size_t k = i; k < t.size(); ++k) rest += (k > i ? " " : "") + t[k];
  return contains(kFillers, rest);
}

// --- prompts ---------------------------------------------------------------------------------------------------

namespace {
struct PromptTables {
  std::vector<std::string> all, train, eval;
};
const PromptTables& prompt_tables() {
  static const PromptTables t = [] {
    PromptTables p;
    for (size_t i = 0; i < kSubjects.size(); ++i)
      for (size_t j = 0; j < kVerbs.size(); ++j) {
        std::string s = kSubjects[i] + " " + kVerbs[j];
        p.all.push_back(s);
        ((i + j) % 5 == 0 ? p.eval : p.train).push_back(s);
      }
    return p;
  }();
  return t;
}
}  // namespace

const std::vector<std::string>& all_prompts() { return prompt_tables().all; }
const std::vector<std::string>& train_prompt_set() { return prompt_tables().train; }
const std::vector<std::string>& eval_prompt_set() { return prompt_tables().eval; }

// --- sampling --------------------------------------------------------------------------------------------------

std::string sample_completion(Rng& rng, int polarity) {
  DPO_ASSERT(polarity == 1 || polarity == -1, "polarity must be +1 or -1");
  std::string s = " " + sample_clause(rng, polarity);
  const double u = rng.uniform();
  if (u < 0.40) {
    // one clause
  } else if (u < 0.70) {
    s += " and ";
    if (rng.uniform() < 0.3)
      s += "i " + pick(rng, polarity > 0 ? kPositiveVerbs : kNegativeVerbs) + " it";
    else
      s += sample_clause(rng, polarity);
  } else if (u < 0.85) {
    s += " but ";
    if (rng.uniform() < 0.35) s += pick(rng, kIntensifiers) + " ";
    s += pick(rng, kNeutralAdjectives);
  } else {
    s += " " + pick(rng, kFillers);
  }
  s += " .";
  DPO_ASSERT(static_cast<int64_t>(s.size()) <= kMaxCompletionBytes, "completion longer than the limit: " + s);
  return s;
}

std::vector<std::pair<std::string, std::string>> make_sft_corpus(const SentimentCorpusOptions& opts) {
  validate(opts);
  Rng rng = stream_rng(opts.seed, kSftStream);
  const std::vector<std::string> prompts = balanced_draw(train_prompt_set(), opts.n_train, rng);
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(prompts.size());
  for (const auto& p : prompts) {
    const int polarity = draw_polarity(rng, opts.positive_fraction);
    out.emplace_back(p, sample_completion(rng, polarity));
  }
  return out;
}

std::vector<std::string> train_prompts(const SentimentCorpusOptions& opts) {
  validate(opts);
  Rng rng = stream_rng(opts.seed, kTrainPromptStream);
  return balanced_draw(train_prompt_set(), opts.n_train, rng);
}

std::vector<std::string> eval_prompts(const SentimentCorpusOptions& opts) {
  validate(opts);
  Rng rng = stream_rng(opts.seed, kEvalPromptStream);
  return balanced_draw(eval_prompt_set(), opts.n_eval, rng);
}

std::vector<PrefText> make_oracle_preferences(const SentimentCorpusOptions& opts) {
  validate(opts);
  Rng rng = stream_rng(opts.seed, kOracleStream);
  const std::vector<std::string> prompts = balanced_draw(train_prompt_set(), opts.n_train, rng);
  std::vector<PrefText> out;
  out.reserve(prompts.size());
  for (const auto& p : prompts) {
    std::string a, b;
    double ra = 0, rb = 0;
    do {  // two rewards differ with probability >= 0.3 per draw (|r| is 1 or 2), so this ends quickly
      a = sample_completion(rng, draw_polarity(rng, opts.positive_fraction));
      b = sample_completion(rng, draw_polarity(rng, opts.positive_fraction));
      ra = sentiment_reward(a);
      rb = sentiment_reward(b);
    } while (ra == rb);
    if (ra < rb) std::swap(a, b), std::swap(ra, rb);
    out.push_back(PrefText{p, a, b, ra, rb});
  }
  return out;
}

// --- JSONL -----------------------------------------------------------------------------------------------------

namespace {
// One JSONL line; strings that are not valid UTF-8 cannot be written as JSON and throw Error naming the record.
std::string jsonl_line(const nlohmann::ordered_json& j, const std::string& path, size_t index) {
  try {
    return j.dump() + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw Error("writing " + path + ": record " + std::to_string(index) + " cannot be written as JSON (" +
                e.what() + ")");
  }
}
}  // namespace

void write_sft_jsonl(const std::string& path, const std::vector<std::pair<std::string, std::string>>& corpus) {
  std::string content;
  for (size_t i = 0; i < corpus.size(); ++i) {
    nlohmann::ordered_json j;
    j["prompt"] = corpus[i].first;
    j["completion"] = corpus[i].second;
    content += jsonl_line(j, path, i);
  }
  write_atomically(path, content);
}

void write_preferences_jsonl(const std::string& path, const std::vector<PrefText>& pairs) {
  std::string content;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const PrefText& r = pairs[i];
    if (!std::isfinite(r.score_chosen) || !std::isfinite(r.score_rejected))
      throw Error("writing " + path + ": record " + std::to_string(i) + " has a non-finite score");
    nlohmann::ordered_json j;
    j["prompt"] = r.prompt;
    j["chosen"] = r.chosen;
    j["rejected"] = r.rejected;
    j["score_chosen"] = r.score_chosen;
    j["score_rejected"] = r.score_rejected;
    content += jsonl_line(j, path, i);
  }
  write_atomically(path, content);
}

}  // namespace dpo
