// The built-in demo task: a synthetic controlled-sentiment language in the spirit of the DPO paper's IMDb
// experiment (Rafailov et al. 2023, section 6.1), small enough for a tiny byte-level GPT-2 to learn on a CPU
// in seconds, with a ground-truth reward that is known exactly.
//
// The language (lowercase ASCII, words separated by single spaces):
//   prompt      SUBJECT " " VERB                       e.g. "the film was", "the dialogue seemed"
//               12 subjects x 4 verbs = 48 distinct prompts, 7..19 bytes. A fixed, seed-independent split
//               holds 9 of them out for evaluation (subject i, verb j is held out iff (i + j) % 5 == 0), so
//               every subject and every verb still occurs in training.
//   completion  " " CLAUSE [" and " CLAUSE2 | " but " NEUTRAL_CLAUSE | " " FILLER] " ."
//               CLAUSE        ["not "] [INTENSIFIER " "] ADJECTIVE
//               CLAUSE2       CLAUSE | "i " OPINION_VERB " it"
//               NEUTRAL_CLAUSE [INTENSIFIER " "] NEUTRAL_ADJECTIVE
//               e.g. " not very funny .", " superb and i loved it .", " dull but quite short .",
//                    " really brilliant to me ."
//               Completions start with a space (the prompt has none at its end) and end in " .";
//               6..48 bytes, mean about 19, 90% at most 29 (kMaxCompletionBytes bounds every one).
//
// The ground-truth reward, sentiment_reward(completion), exactly:
//   1. Words are the maximal runs of ASCII letters, case-folded to lowercase. Every other byte (space,
//      punctuation, digit, non-ASCII) separates words: "great." and "GREAT" are the word "great";
//      "greatness" is not "great"; "great-ish" is the two words "great" and "ish", so it counts.
//   2. Each word of positive_words() scores +1, each word of negative_words() scores -1; all others score 0.
//   3. Negation: the word "not" flips the sign of the next sentiment word if only intensifiers() lie between
//      them ("not great" = -1, "not very good" = -1, "not bad" = +1). If any other word comes first, or
//      the text ends, the negation lapses ("not the plot, great" = +1). A "not" never flips another "not"
//      ("not not great" = -1: the first "not" lapses at the second, which flips "great").
//   4. The reward is the sum: an integer-valued double, 0 for an empty string.
// The grammar makes every SFT completion's reward +1 or +2 (positive review) or -1 or -2 (negative review).
// Text outside the grammar (what a policy may drift to) is still scored by the same rule.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/rng.h"

namespace dpo {

inline constexpr int64_t kMaxPromptBytes = 24;      // every prompt is at most this long (19 in fact)
inline constexpr int64_t kMaxCompletionBytes = 48;  // every generated completion is at most this long

// The lexicon (each list sorted, lowercase letters only, no word in two lists).
const std::vector<std::string>& positive_words();   // adjectives + opinion verbs scoring +1
const std::vector<std::string>& negative_words();   // adjectives + opinion verbs scoring -1
const std::vector<std::string>& intensifiers();     // neutral words a negation may reach across
const std::vector<std::string>& neutral_words();    // every other word the grammar uses (incl. prompts)

// The exact ground-truth reward (see the top of this file).
double sentiment_reward(std::string_view completion);

// True iff `completion` is a string the completion grammar above can produce (exact spacing included).
bool is_grammatical_completion(std::string_view completion);

// The 48 prompts in a fixed order, and the fixed train (39) / eval (9) split of them.
const std::vector<std::string>& all_prompts();
const std::vector<std::string>& train_prompt_set();
const std::vector<std::string>& eval_prompt_set();

// One completion drawn from the grammar with the given polarity (+1: reward > 0, -1: reward < 0).
std::string sample_completion(Rng& rng, int polarity);

struct SentimentCorpusOptions {
  int64_t n_train = 0, n_eval = 0;
  uint64_t seed = 0;
  double positive_fraction = 0.5;  // probability that an SFT completion is a positive review
};

// n_train (prompt, completion) pairs: prompts from the train set (balanced: each used floor or ceil of
// n_train / 39 times, order shuffled), each completion positive with probability positive_fraction,
// else negative. Deterministic in the options. Throws InputError for n_train or n_eval < 0, or a fraction
// outside [0, 1] (all four generators check the options the same way).
std::vector<std::pair<std::string, std::string>> make_sft_corpus(const SentimentCorpusOptions& opts);

// n_train prompts from the train set / n_eval prompts from the eval set (balanced as above; disjoint sets),
// e.g. the prompts to sample preference pairs for and the held-out prompts to evaluate the policy on.
// Deterministic in the options and independent of make_sft_corpus's stream.
std::vector<std::string> train_prompts(const SentimentCorpusOptions& opts);
std::vector<std::string> eval_prompts(const SentimentCorpusOptions& opts);

// A preference record as text (what write_preferences_jsonl writes and load_preferences reads back).
struct PrefText {
  std::string prompt, chosen, rejected;
  double score_chosen = 0, score_rejected = 0;
};

// n_train oracle pairs straight from the grammar: for each train prompt two completions of different reward,
// the higher-reward one chosen, scores = sentiment_reward. For tests and as a no-sampling fallback; the demo
// proper labels pairs sampled from the SFT policy.
std::vector<PrefText> make_oracle_preferences(const SentimentCorpusOptions& opts);

// JSONL writers (one object per line, via nlohmann-json). Atomic: written to path + ".tmp.<pid>", flushed,
// fsynced and renamed over path; on failure the temporary is removed and dpo::Error names the file. A string
// that is not valid UTF-8, or a non-finite score, throws dpo::Error naming the record before anything is written.
//   SFT:          {"prompt": str, "completion": str}
//   preferences:  {"prompt", "chosen", "rejected": str, "score_chosen", "score_rejected": number}
void write_sft_jsonl(const std::string& path, const std::vector<std::pair<std::string, std::string>>& corpus);
void write_preferences_jsonl(const std::string& path, const std::vector<PrefText>& pairs);

}  // namespace dpo
