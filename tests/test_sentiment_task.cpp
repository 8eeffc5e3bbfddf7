// The demo's synthetic sentiment language: the exact reward, the grammar, the corpus and its JSONL files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/error.h"
#include "train/sentiment_task.h"

namespace fs = std::filesystem;
using namespace dpo;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("dpo_sentiment_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::ifstream in(p);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

TEST(SentimentReward, HandComputedValues) {
  EXPECT_EQ(sentiment_reward(""), 0.0);
  EXPECT_EQ(sentiment_reward(" ."), 0.0);
  EXPECT_EQ(sentiment_reward(" great ."), 1.0);
  EXPECT_EQ(sentiment_reward(" awful ."), -1.0);
  EXPECT_EQ(sentiment_reward(" superb and i loved it ."), 2.0);
  EXPECT_EQ(sentiment_reward(" dull and i hated it ."), -2.0);
  EXPECT_EQ(sentiment_reward(" great but boring ."), 0.0);
  EXPECT_EQ(sentiment_reward(" really brilliant to me ."), 1.0);
  EXPECT_EQ(sentiment_reward(" dull but quite short ."), -1.0);
  EXPECT_EQ(sentiment_reward(" the plot was long and the cast was quiet ."), 0.0);
  EXPECT_EQ(sentiment_reward("great great great good"), 4.0);  // outside the grammar, still scored
}

TEST(SentimentReward, Negation) {
  EXPECT_EQ(sentiment_reward(" not great ."), -1.0);
  EXPECT_EQ(sentiment_reward(" not bad ."), 1.0);
  EXPECT_EQ(sentiment_reward(" not very good ."), -1.0);        // reaches across an intensifier
  EXPECT_EQ(sentiment_reward(" not really so funny ."), -1.0);  // and across several
  EXPECT_EQ(sentiment_reward(" not the plot , great ."), 1.0);  // lapses at a non-intensifier word
  EXPECT_EQ(sentiment_reward(" not not great ."), -1.0);        // the second "not" flips, the first lapses
  EXPECT_EQ(sentiment_reward(" not great and good ."), 0.0);    // flips only the next sentiment word
  EXPECT_EQ(sentiment_reward(" not dull and not weak ."), 2.0);
  EXPECT_EQ(sentiment_reward(" great and not ."), 1.0);        // a trailing "not" flips nothing
  EXPECT_EQ(sentiment_reward(" nothing great ."), 1.0);        // "nothing" is not "not"
}

TEST(SentimentReward, WordBoundariesPunctuationAndCase) {
  EXPECT_EQ(sentiment_reward("greatness"), 0.0);
  EXPECT_EQ(sentiment_reward("ungreat"), 0.0);
  EXPECT_EQ(sentiment_reward("dullard boringly"), 0.0);
  EXPECT_EQ(sentiment_reward("great."), 1.0);
  EXPECT_EQ(sentiment_reward("(great),awful!"), 0.0);
  EXPECT_EQ(sentiment_reward("great-ish"), 1.0);  // '-' separates words: "great" + "ish"
  EXPECT_EQ(sentiment_reward("GREAT Wonderful"), 2.0);
  EXPECT_EQ(sentiment_reward("great1"), 1.0);           // digits separate words
  EXPECT_EQ(sentiment_reward("gr\xC3\xA9" "at"), 0.0);  // non-ASCII bytes separate words: "gr", "at"
  EXPECT_EQ(sentiment_reward("NOT\tGreat\n"), -1.0);
}

TEST(SentimentLexicon, ListsAreDisjointSortedLowercase) {
  std::map<std::string, int> seen;
  for (const auto* list : {&positive_words(), &negative_words(), &intensifiers(), &neutral_words()}) {
    EXPECT_TRUE(std::is_sorted(list->begin(), list->end()));
    for (const auto& w : *list) {
      EXPECT_FALSE(w.empty());
      for (char c : w) EXPECT_TRUE(c >= 'a' && c <= 'z') << w;
      EXPECT_EQ(seen[w]++, 0) << w << " is in two lists";
    }
  }
  EXPECT_GE(positive_words().size(), 10u);
  EXPECT_GE(negative_words().size(), 10u);
  for (const auto& w : positive_words()) EXPECT_EQ(sentiment_reward(w), 1.0) << w;
  for (const auto& w : negative_words()) EXPECT_EQ(sentiment_reward(w), -1.0) << w;
  for (const auto& w : neutral_words()) EXPECT_EQ(sentiment_reward(w), 0.0) << w;
  for (const auto& w : intensifiers()) EXPECT_EQ(sentiment_reward(w), 0.0) << w;
}

TEST(SentimentPrompts, FixedSplitIsDisjointAndCoversEverything) {
  EXPECT_EQ(all_prompts().size(), 48u);
  EXPECT_EQ(train_prompt_set().size(), 39u);
  EXPECT_EQ(eval_prompt_set().size(), 9u);
  std::set<std::string> train(train_prompt_set().begin(), train_prompt_set().end());
  std::set<std::string> eval(eval_prompt_set().begin(), eval_prompt_set().end());
  std::set<std::string> all(all_prompts().begin(), all_prompts().end());
  EXPECT_EQ(all.size(), 48u);
  for (const auto& p : eval) EXPECT_EQ(train.count(p), 0u) << p;
  std::set<std::string> uni = train;
  uni.insert(eval.begin(), eval.end());
  EXPECT_EQ(uni, all);
  EXPECT_EQ(eval_prompt_set().front(), "the film was");  // (0 + 0) % 5 == 0
  for (const auto& p : all_prompts()) {
    EXPECT_LE(static_cast<int64_t>(p.size()), kMaxPromptBytes) << p;
    EXPECT_EQ(sentiment_reward(p), 0.0) << p;
    EXPECT_NE(p.back(), ' ');
  }
  // Every word of an eval prompt also occurs in some train prompt (only the combination is new).
  std::set<std::string> train_words;
  for (const auto& p : train) {
    std::istringstream ss(p);
    for (std::string w; ss >> w;) train_words.insert(w);
  }
  for (const auto& p : eval) {
    std::istringstream ss(p);
    for (std::string w; ss >> w;) EXPECT_EQ(train_words.count(w), 1u) << w;
  }
}

TEST(SentimentPrompts, TrainAndEvalDrawsAreDisjointBalancedDeterministic) {
  SentimentCorpusOptions o{100, 25, 7};
  const auto tr = train_prompts(o), ev = eval_prompts(o);
  ASSERT_EQ(tr.size(), 100u);
  ASSERT_EQ(ev.size(), 25u);
  std::set<std::string> trs(tr.begin(), tr.end()), evs(ev.begin(), ev.end());
  for (const auto& p : evs) EXPECT_EQ(trs.count(p), 0u) << p;
  std::map<std::string, int> counts;
  for (const auto& p : tr) ++counts[p];
  EXPECT_EQ(counts.size(), 39u);
  for (const auto& [p, c] : counts) EXPECT_TRUE(c == 2 || c == 3) << p << " " << c;  // 100 / 39
  std::map<std::string, int> ecounts;
  for (const auto& p : ev) ++ecounts[p];
  EXPECT_EQ(ecounts.size(), 9u);
  for (const auto& [p, c] : ecounts) EXPECT_TRUE(c == 2 || c == 3) << p << " " << c;  // 25 / 9
  EXPECT_EQ(train_prompts(o), tr);
  EXPECT_EQ(eval_prompts(o), ev);
  SentimentCorpusOptions o2 = o;
  o2.seed = 8;
  EXPECT_NE(train_prompts(o2), tr);
}

TEST(SentimentCorpus, DeterministicForASeedAndDifferentForAnother) {
  SentimentCorpusOptions o{500, 0, 42};
  const auto a = make_sft_corpus(o), b = make_sft_corpus(o);
  ASSERT_EQ(a.size(), 500u);
  EXPECT_EQ(a, b);
  o.seed = 43;
  const auto c = make_sft_corpus(o);
  ASSERT_EQ(c.size(), 500u);
  EXPECT_NE(a, c);
  int same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == c[i];
  EXPECT_LT(same, 50);
  // A pinned record: the Rng is portable, so this holds on every platform.
  o.seed = 0;
  o.n_train = 3;
  const auto pinned = make_sft_corpus(o);
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"the plot felt", " silly and i loathed it ."},
      {"the music was", " silly ."},
      {"this movie is", " quite funny and i loved it ."}};
  EXPECT_EQ(pinned, expected);
  EXPECT_EQ(make_sft_corpus(SentimentCorpusOptions{0, 0, 1}).size(), 0u);
}

TEST(SentimentCorpus, CompletionsAreShortAsciiGrammaticalAndPolar) {
  const auto corpus = make_sft_corpus(SentimentCorpusOptions{4000, 0, 3});
  std::set<std::string> train(train_prompt_set().begin(), train_prompt_set().end());
  std::set<std::string> distinct;
  std::map<int, int> by_reward;
  double total_len = 0;
  for (const auto& [p, c] : corpus) {
    EXPECT_EQ(train.count(p), 1u) << p;
    EXPECT_LE(static_cast<int64_t>(c.size()), kMaxCompletionBytes) << c;
    EXPECT_GE(c.size(), 4u);
    for (char ch : c) EXPECT_TRUE((ch >= 'a' && ch <= 'z') || ch == ' ' || ch == '.') << c;
    EXPECT_EQ(c.front(), ' ');
    EXPECT_EQ(c.substr(c.size() - 2), " .");
    EXPECT_TRUE(is_grammatical_completion(c)) << c;
    const double r = sentiment_reward(c);
    EXPECT_TRUE(r == 1 || r == 2 || r == -1 || r == -2) << c << " " << r;
    ++by_reward[static_cast<int>(r)];
    distinct.insert(c);
    total_len += c.size();
  }
  // Varied enough to be a language, small enough to learn.
  EXPECT_GT(distinct.size(), 1000u);
  const double mean_len = total_len / corpus.size();
  EXPECT_GT(mean_len, 12);
  EXPECT_LT(mean_len, 30);
  // |r| = 2 comes only from "and" clauses (30% of completions).
  const double two = (by_reward[2] + by_reward[-2]) / static_cast<double>(corpus.size());
  EXPECT_NEAR(two, 0.30, 0.04);
}

TEST(SentimentCorpus, PositiveFractionWithinBinomialBound) {
  for (double f : {0.5, 0.2, 0.9, 0.0, 1.0}) {
    const int64_t n = 3000;
    const auto corpus = make_sft_corpus(SentimentCorpusOptions{n, 0, 11, f});
    int64_t pos = 0;
    for (const auto& pc : corpus) pos += sentiment_reward(pc.second) > 0;
    const double sd = std::sqrt(n * f * (1 - f));
    EXPECT_LE(std::fabs(pos - n * f), 5 * sd + 1e-9) << "fraction " << f << ": " << pos << " of " << n;
  }
}

TEST(SentimentCorpus, RejectsBadOptions) {
  EXPECT_THROW(make_sft_corpus(SentimentCorpusOptions{-1, 0, 0}), InputError);
  EXPECT_THROW(eval_prompts(SentimentCorpusOptions{0, -1, 0}), InputError);
  EXPECT_THROW(make_sft_corpus(SentimentCorpusOptions{10, 0, 0, 1.5}), InputError);
  EXPECT_THROW(make_sft_corpus(SentimentCorpusOptions{10, 0, 0, std::nan("")}), InputError);
  Rng rng(1);
  EXPECT_THROW(sample_completion(rng, 0), Error);
}

TEST(SentimentGrammar, AcceptsAndRejects) {
  for (const char* ok : {" great .", " not very funny .", " superb and i loved it .", " dull but quite short .",
                         " really brilliant to me .", " not really wonderful and not really wonderful .",
                         " weak in places .", " good and awful ."})
    EXPECT_TRUE(is_grammatical_completion(ok)) << ok;
  for (const char* bad : {"", " .", "great .", " great", " great.", " great  .", "  great .", " very not good .",
                          " great and .", " great but good .", " great overall to me .", " loved it .",
                          " great and i loved .", " greatness .", " great and i great it .", " short ."})
    EXPECT_FALSE(is_grammatical_completion(bad)) << bad;
  Rng rng(5);
  for (int i = 0; i < 2000; ++i) {
    const int pol = i % 2 ? 1 : -1;
    const std::string c = sample_completion(rng, pol);
    EXPECT_TRUE(is_grammatical_completion(c)) << c;
    EXPECT_EQ(sentiment_reward(c) > 0 ? 1 : -1, pol) << c;
  }
}

TEST(SentimentJsonl, SftFileParsesBackToExactlyTheRecords) {
  const fs::path dir = fresh_dir("sft");
  const auto corpus = make_sft_corpus(SentimentCorpusOptions{123, 0, 9});
  const fs::path p = dir / "sft.jsonl";
  write_sft_jsonl(p.string(), corpus);
  const auto rows = read_jsonl(p);
  ASSERT_EQ(rows.size(), corpus.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].size(), 2u);
    EXPECT_EQ(rows[i].at("prompt").get<std::string>(), corpus[i].first);
    EXPECT_EQ(rows[i].at("completion").get<std::string>(), corpus[i].second);
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);  // no temporary left
  // Overwrites atomically with fewer records; an empty corpus gives an empty file.
  write_sft_jsonl(p.string(), {});
  EXPECT_EQ(fs::file_size(p), 0u);
  fs::remove_all(dir);
}

TEST(SentimentJsonl, PreferencesFileParsesBackToExactlyTheRecords) {
  const fs::path dir = fresh_dir("pref");
  const auto pairs = make_oracle_preferences(SentimentCorpusOptions{200, 0, 4});
  ASSERT_EQ(pairs.size(), 200u);
  for (const auto& r : pairs) {
    EXPECT_GT(r.score_chosen, r.score_rejected);
    EXPECT_EQ(r.score_chosen, sentiment_reward(r.chosen));
    EXPECT_EQ(r.score_rejected, sentiment_reward(r.rejected));
  }
  std::vector<PrefText> recs = pairs;
  recs.push_back(PrefText{"quote \" and \\ back\nslash", "a\tb", "\xC3\xA9t\xC3\xA9", 0.25, -1e-3});
  const fs::path p = dir / "prefs.jsonl";
  write_preferences_jsonl(p.string(), recs);
  const auto rows = read_jsonl(p);
  ASSERT_EQ(rows.size(), recs.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].size(), 5u);
    EXPECT_EQ(rows[i].at("prompt").get<std::string>(), recs[i].prompt);
    EXPECT_EQ(rows[i].at("chosen").get<std::string>(), recs[i].chosen);
    EXPECT_EQ(rows[i].at("rejected").get<std::string>(), recs[i].rejected);
    EXPECT_EQ(rows[i].at("score_chosen").get<double>(), recs[i].score_chosen);
    EXPECT_EQ(rows[i].at("score_rejected").get<double>(), recs[i].score_rejected);
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  fs::remove_all(dir);
}

TEST(SentimentJsonl, FailuresThrowAndLeaveNothingBehind) {
  const fs::path dir = fresh_dir("fail");
  EXPECT_THROW(write_sft_jsonl((dir / "no_such_dir" / "x.jsonl").string(), {{"a", "b"}}), Error);
  EXPECT_THROW(write_preferences_jsonl((dir / "p.jsonl").string(), {PrefText{"a", "b", "c", NAN, 0}}), Error);
  EXPECT_THROW(write_sft_jsonl((dir / "bad.jsonl").string(), {{"a", "\xFF"}}), Error);  // not UTF-8
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 0);
  fs::remove_all(dir);
}
