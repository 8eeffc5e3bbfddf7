// Data pipeline: byte tokenizer, strict UTF-8, JSONL preference / SFT loading and validation, EOS, truncation,
// batch layout (checked against hand-computed tensors and against the log-prob kernel), epoch order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/logprob.h"
#include "runtime/error.h"
#include "train/data.h"
#include "train/tokenizer.h"
#include "test_util.h"

namespace dpo {
namespace {

using Ids = std::vector<int32_t>;
constexpr int32_t kEos = ByteTokenizer::kEos;

// A file under the test temp dir, named after the current test (plus a suffix) so tests never share files.
std::string write_file(const std::string& content, const std::string& suffix = "") {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string path = ::testing::TempDir() + "dpo_test_data_" + info->test_suite_name() + "_" + info->name() +
                     suffix + ".jsonl";
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << content;
  f.close();
  EXPECT_TRUE(f.good()) << path;
  return path;
}

Ids bytes(const std::string& s) {
  Ids v;
  for (unsigned char c : s) v.push_back(c);
  return v;
}

Ids with_eos(Ids v) {
  v.push_back(kEos);
  return v;
}

// Runs f, expects InputError whose message contains every needle; returns the message.
template <class F>
std::string expect_input_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
  } catch (const InputError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected InputError, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected InputError, nothing thrown";
  return "";
}

const char* kGood = R"({"prompt": "Q", "chosen": "yes", "rejected": "no"})";

// A malformed record at line 2 (after a good one): throws naming path:2 and the field; with skip_malformed it is
// skipped and counted under `reason`.
void expect_malformed(const std::string& bad_line, const std::string& field, const std::string& reason,
                      const std::string& suffix) {
  SCOPED_TRACE(bad_line);
  const std::string path = write_file(std::string(kGood) + "\n" + bad_line + "\n", suffix);
  ByteTokenizer tok;
  DataOptions opt;
  std::vector<std::string> needles = {path + ":2:"};
  if (!field.empty()) needles.push_back("'" + field + "'");
  expect_input_error([&] { load_preferences(path, tok, opt, nullptr); }, needles);
  opt.skip_malformed = true;
  LoadStats st;
  auto data = load_preferences(path, tok, opt, &st);
  EXPECT_EQ(data.size(), 1u);
  EXPECT_EQ(st.read, 2);
  EXPECT_EQ(st.kept, 1);
  EXPECT_EQ(st.skipped, 1);
  EXPECT_EQ(st.skipped_by_reason.size(), 1u);
  EXPECT_EQ(st.skipped_by_reason[reason], 1) << "reason " << reason;
}

template <class W>
std::vector<double> weights_of(const Batch& b) {
  std::vector<double> out;
  const W* w = b.weights.data<W>();
  for (int64_t i = 0; i < b.weights.numel(); ++i) out.push_back(static_cast<double>(w[i]));
  return out;
}

std::vector<int32_t> ints_of(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return std::vector<int32_t>(p, p + t.numel());
}

// ---------------------------------------------------------------------------------------------- tokenizer

TEST(ByteTokenizer, RoundTripAsciiAndMultiByteUtf8) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 257);
  EXPECT_EQ(tok.eos_id(), 256);
  EXPECT_EQ(tok.name(), "byte");
  const std::string s = "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9D\x84\x9E!";  // é, €, 𝄞 (2, 3, 4 bytes)
  const Ids ids = tok.encode(s);
  ASSERT_EQ(ids.size(), s.size());
  EXPECT_EQ(ids[1], 0xC3);
  EXPECT_EQ(ids[2], 0xA9);
  EXPECT_EQ(ids[9], 0xAC);
  EXPECT_EQ(ids[11], 0xF0);
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < 256);
  EXPECT_EQ(tok.decode(ids), s);
  EXPECT_TRUE(tok.encode("").empty());
  // Every byte value survives, NUL included.
  std::string all;
  for (int c = 0; c < 256; ++c) all.push_back(static_cast<char>(c));
  EXPECT_EQ(tok.decode(tok.encode(all)), all);
}

TEST(ByteTokenizer, EosRendersNothingAndOutOfRangeThrows) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.decode({'h', kEos, 'i', kEos}), "hi");
  EXPECT_EQ(tok.decode(with_eos(tok.encode("abc"))), "abc");
  EXPECT_THROW(tok.decode({'a', 257}), Error);
  EXPECT_THROW(tok.decode({-1}), Error);
}

TEST(ByteTokenizer, MakeTokenizerByName) {
  auto tok = make_tokenizer("byte");
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->name(), "byte");
  EXPECT_EQ(tok->vocab_size(), 257);
  expect_input_error([] { make_tokenizer("gpt2-bpe"); }, {"gpt2-bpe"});
}

TEST(Utf8, AcceptsValidSequences) {
  for (const std::string s : {std::string(""), std::string("plain ascii"), std::string("\xC3\xA9"),
                              std::string("\xE2\x82\xAC"), std::string("\xF0\x9F\x98\x80"),
                              std::string("\xF4\x8F\xBF\xBF"),  // U+10FFFF
                              std::string("\xED\x9F\xBF"),      // U+D7FF, just below the surrogates
                              std::string("\xEE\x80\x80"),      // U+E000, just above them
                              std::string("\xC2\x80"),          // U+0080, smallest 2-byte
                              std::string("\xE0\xA0\x80"),      // U+0800, smallest 3-byte
                              std::string("\xF0\x90\x80\x80"),  // U+10000, smallest 4-byte
                              std::string("a\0b", 3)}) {
    EXPECT_TRUE(valid_utf8(s)) << ::testing::PrintToString(s);
    EXPECT_EQ(utf8_first_invalid(s), std::string_view::npos);
  }
}

TEST(Utf8, RejectsInvalidSequences) {
  for (const std::string s : {std::string("\xC0\x80"),          // overlong NUL
                              std::string("\xC1\xBF"),          // overlong
                              std::string("\xE0\x80\x80"),      // overlong 3-byte
                              std::string("\xF0\x80\x80\x80"),  // overlong 4-byte
                              std::string("\xED\xA0\x80"),      // surrogate U+D800
                              std::string("\xED\xBF\xBF"),      // surrogate U+DFFF
                              std::string("\xF4\x90\x80\x80"),  // U+110000
                              std::string("\xF5\x80\x80\x80"), std::string("\xFF"), std::string("\x80"),
                              std::string("\xE2\x82"),          // truncated euro sign
                              std::string("\xF0\x9F\x98"),      // truncated 4-byte
                              std::string("\xC3"),              // truncated 2-byte
                              std::string("\xE2\x28\xA1"),      // bad continuation
                              std::string("ok\xC3\xA9\xBF")}) {  // stray continuation after a valid char
    EXPECT_FALSE(valid_utf8(s)) << ::testing::PrintToString(s);
  }
  EXPECT_EQ(utf8_first_invalid("ab\xE2\x82"), 2u);
  EXPECT_EQ(utf8_first_invalid("\xC3\xA9x\xED\xA0\x80"), 3u);
}

// ---------------------------------------------------------------------------------------------- loading

TEST(LoadPreferences, TextForm) {
  const std::string path = write_file(
      R"({"prompt": "Hi", "chosen": " there", "rejected": "!"})"
      "\n"
      R"({"prompt": "caf\u00e9\n", "chosen": "\u20ac", "rejected": "x"})"
      "\n");
  ByteTokenizer tok;
  LoadStats st;
  auto d = load_preferences(path, tok, DataOptions{}, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].prompt, bytes("Hi"));
  EXPECT_EQ(d[0].chosen, with_eos(bytes(" there")));
  EXPECT_EQ(d[0].rejected, with_eos(bytes("!")));
  EXPECT_EQ(d[0].line, 1);
  EXPECT_FALSE(d[0].has_scores);
  EXPECT_EQ(d[1].prompt, bytes("caf\xC3\xA9\n"));  // JSON escapes decoded to UTF-8 bytes
  EXPECT_EQ(d[1].chosen, with_eos(bytes("\xE2\x82\xAC")));
  EXPECT_EQ(d[1].line, 2);
  EXPECT_EQ(st.read, 2);
  EXPECT_EQ(st.kept, 2);
  EXPECT_EQ(st.skipped, 0);
  EXPECT_EQ(st.truncated, 0);
}

TEST(LoadPreferences, TokenIdForm) {
  const std::string path = write_file(R"({"prompt_ids": [1, 2, 3], "chosen_ids": [4, 255], "rejected_ids": [0]})"
                                      "\n");
  ByteTokenizer tok;
  auto d = load_preferences(path, tok, DataOptions{}, nullptr);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].prompt, (Ids{1, 2, 3}));
  EXPECT_EQ(d[0].chosen, (Ids{4, 255, kEos}));
  EXPECT_EQ(d[0].rejected, (Ids{0, kEos}));
}

// Token-id records take the model's vocabulary and EOS (DataOptions::vocab_size, ids_eos_id), not the byte
// tokenizer's: GPT-2's 50257 ids with <|endoftext|> = 50256 appended; text records keep the tokenizer's EOS.
TEST(LoadPreferences, TokenIdsUseTheModelsVocabularyAndEos) {
  const std::string path = write_file(R"({"prompt_ids": [290, 50000], "chosen_ids": [7, 50255], "rejected_ids": [0]})"
                                      "\n" R"({"prompt": "Q", "chosen": "ab", "rejected": "c"})" "\n");
  ByteTokenizer tok;
  DataOptions opt;
  opt.vocab_size = 50257;
  opt.ids_eos_id = 50256;
  auto d = load_preferences(path, tok, opt, nullptr);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].prompt, (Ids{290, 50000}));
  EXPECT_EQ(d[0].chosen, (Ids{7, 50255, 50256}));
  EXPECT_EQ(d[0].rejected, (Ids{0, 50256}));
  EXPECT_EQ(d[1].chosen, with_eos(bytes("ab")));  // the byte tokenizer's text: its own EOS, 256
  // A completion already ending with the model's EOS does not get a second one.
  const std::string ends = write_file(R"({"prompt_ids": [1], "chosen_ids": [5, 50256], "rejected_ids": [50256, 3]})"
                                      "\n", "_ends");
  auto e = load_preferences(ends, tok, opt, nullptr);
  EXPECT_EQ(e[0].chosen, (Ids{5, 50256}));
  EXPECT_EQ(e[0].rejected, (Ids{50256, 3, 50256}));
  // The bound is the model's vocab_size: 50257 is one past it, named with file:line, field, index and id.
  const std::string bad = write_file(std::string(kGood) + "\n" +
                                     R"({"prompt_ids": [1], "chosen_ids": [2, 50257], "rejected_ids": [3]})" "\n",
                                     "_bad");
  expect_input_error([&] { load_preferences(bad, tok, opt, nullptr); },
                     {bad + ":2:", "'chosen_ids'", "index 1", "50257", "[0, 50257)"});
}

// A model smaller than the byte tokenizer: its token-id records load (ids below its vocab_size, its EOS), and a
// text record, whose byte EOS 256 it cannot hold, is refused naming file:line.
TEST(LoadPreferences, SmallModelVocabularyRefusesByteEosOfTextRecords) {
  ByteTokenizer tok;
  DataOptions opt;
  opt.vocab_size = 96;
  opt.ids_eos_id = 95;
  const std::string ids = write_file(R"({"prompt_ids": [1, 94], "chosen_ids": [3], "rejected_ids": [4]})" "\n");
  auto d = load_preferences(ids, tok, opt, nullptr);
  EXPECT_EQ(d[0].chosen, (Ids{3, 95}));
  const std::string text = write_file(R"({"prompt": "Q", "chosen": "A", "rejected": "B"})" "\n", "_text");
  expect_input_error([&] { load_preferences(text, tok, opt, nullptr); }, {text + ":1:", "EOS id 256", "[0, 96)"});
  // A byte of the text outside the model's vocabulary is refused too ('y' = 121 >= 96).
  const std::string high = write_file(std::string(kGood) + "\n", "_high");
  expect_input_error([&] { load_preferences(high, tok, opt, nullptr); }, {high + ":1:", "token id 121", "'chosen'"});
}

TEST(LoadPreferences, BlankLinesIgnoredLineNumbersPhysical) {
  const std::string path = write_file(std::string("\n") + kGood + "\n   \t\n\n" + kGood + "\n" +
                                      R"({"prompt": "a", "chosen": 1, "rejected": "b"})" + "\n\n");
  ByteTokenizer tok;
  expect_input_error([&] { load_preferences(path, tok, DataOptions{}, nullptr); }, {path + ":6:", "'chosen'"});
  DataOptions opt;
  opt.skip_malformed = true;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].line, 2);
  EXPECT_EQ(d[1].line, 5);
  EXPECT_EQ(st.read, 3);  // blank lines are not records
  EXPECT_EQ(st.kept + st.skipped, st.read);
}

TEST(LoadPreferences, CrlfAndByteOrderMark) {
  const std::string path = write_file(std::string("\xEF\xBB\xBF") + kGood + "\r\n" + kGood + "\r\n\r\n");
  ByteTokenizer tok;
  LoadStats st;
  auto d = load_preferences(path, tok, DataOptions{}, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].prompt, bytes("Q"));
  EXPECT_EQ(d[1].rejected, with_eos(bytes("no")));
  EXPECT_EQ(st.read, 2);
}

TEST(LoadPreferences, UnknownFieldsAllowedAndScoresParsed) {
  const std::string path = write_file(
      R"({"id": 7, "source": {"name": "x", "tags": [1, "y"]}, "prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 8.5, "score_rejected": -2})"
      "\n" +
      std::string(kGood) + "\n");
  ByteTokenizer tok;
  LoadStats st;
  auto d = load_preferences(path, tok, DataOptions{}, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_TRUE(d[0].has_scores);
  EXPECT_EQ(d[0].score_chosen, 8.5);
  EXPECT_EQ(d[0].score_rejected, -2.0);
  EXPECT_FALSE(d[1].has_scores);
  EXPECT_EQ(st.with_scores, 1);
}

TEST(LoadPreferencesMalformed, JsonAndShape) {
  expect_malformed(R"({"prompt": "a", "chosen": "b",)", "", "bad_json", "_a");
  expect_malformed(R"(["prompt", "chosen", "rejected"])", "", "not_object", "_b");
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c"} trailing)", "", "bad_json", "_c");
}

TEST(LoadPreferencesMalformed, FormsAndMissingFields) {
  expect_malformed(R"({"prompt": "a", "rejected": "b"})", "chosen", "missing_field", "_a");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [2]})", "rejected_ids", "missing_field", "_b");
  expect_malformed(R"({"prompt": "a", "chosen_ids": [1], "rejected_ids": [2]})", "chosen_ids", "mixed_forms", "_c");
  expect_malformed(R"({"question": "a", "answer": "b"})", "prompt", "no_form", "_d");
}

TEST(LoadPreferencesMalformed, WrongTypes) {
  expect_malformed(R"({"prompt": "a", "chosen": 5, "rejected": "b"})", "chosen", "wrong_type", "_a");
  expect_malformed(R"({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"})", "prompt",
                   "wrong_type", "_b");
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": null})", "rejected", "wrong_type", "_c");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": "12", "rejected_ids": [2]})", "chosen_ids", "wrong_type",
                   "_d");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [1.5], "rejected_ids": [2]})", "chosen_ids", "wrong_type",
                   "_e");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [true], "rejected_ids": [2]})", "chosen_ids", "wrong_type",
                   "_f");
}

TEST(LoadPreferencesMalformed, IdsOutOfRangeNameFieldAndIndex) {
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 257]})", "rejected_ids",
                   "id_out_of_range", "_a");
  expect_malformed(R"({"prompt_ids": [-1], "chosen_ids": [2], "rejected_ids": [3]})", "prompt_ids",
                   "id_out_of_range", "_b");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [18446744073709551615], "rejected_ids": [3]})",
                   "chosen_ids", "id_out_of_range", "_c");
  const std::string path = write_file(R"({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4, 999]})"
                                      "\n");
  ByteTokenizer tok;
  expect_input_error([&] { load_preferences(path, tok, DataOptions{}, nullptr); },
                     {path + ":1:", "'rejected_ids'", "index 2", "999"});
}

TEST(LoadPreferencesMalformed, EmptyPromptOrCompletion) {
  expect_malformed(R"({"prompt": "a", "chosen": "", "rejected": "b"})", "chosen", "empty_completion", "_a");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []})", "rejected_ids",
                   "empty_completion", "_b");
  // Only EOS is empty "before EOS".
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [256], "rejected_ids": [2]})", "chosen_ids",
                   "empty_completion", "_c");
  expect_malformed(R"({"prompt": "", "chosen": "a", "rejected": "b"})", "prompt", "empty_prompt", "_d");
}

TEST(LoadPreferencesMalformed, ScoresBothOrNeither) {
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1})", "score_rejected",
                   "scores", "_a");
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_rejected": 1})", "score_chosen",
                   "scores", "_b");
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": "9", "score_rejected": 1})",
                   "score_chosen", "wrong_type", "_c");
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1e999, "score_rejected": 1})",
                   "", "bad_json", "_d");  // number overflow: refused by the JSON parser
}

TEST(LoadPreferencesMalformed, DuplicateKeysAreRefused) {
  // JSON leaves a repeated key's meaning open (nlohmann-json would keep the last value): refused at any depth.
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"})", "chosen", "duplicate_key",
                   "_a");
  expect_malformed(R"({"prompt": "a", "chosen": "b", "rejected": "c", "meta": {"x": 1, "x": 2}})", "x",
                   "duplicate_key", "_b");
  expect_malformed(R"({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "prompt_ids": [1]})", "prompt_ids",
                   "duplicate_key", "_c");
  // The same key in two sibling objects, or in an object and its parent, is not a duplicate.
  const std::string path = write_file(
      R"({"prompt": "a", "chosen": "b", "rejected": "c", "m": [{"x": 1}, {"x": 2}], "n": {"prompt": {"prompt": 0}}})"
      "\n");
  ByteTokenizer tok;
  EXPECT_EQ(load_preferences(path, tok, DataOptions{}, nullptr).size(), 1u);
}

TEST(LoadPreferencesMalformed, OdpoScoreGapNamesFileLine) {
  ByteTokenizer tok;
  DataOptions opt;
  opt.require_score_gap = true;
  const std::string ok = R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 2, "score_rejected": 1})";
  auto check = [&](const std::string& bad_line, const std::string& needle, const std::string& suffix) {
    SCOPED_TRACE(bad_line);
    const std::string path = write_file(ok + "\n" + bad_line + "\n", suffix);
    expect_input_error([&] { load_preferences(path, tok, opt, nullptr); }, {path + ":2:", "ODPO", needle});
    DataOptions skip = opt;
    skip.skip_malformed = true;
    LoadStats st;
    EXPECT_EQ(load_preferences(path, tok, skip, &st).size(), 1u);
    EXPECT_EQ(st.skipped_by_reason["scores"], 1);
  };
  check(kGood, "neither", "_none");
  check(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1, "score_rejected": 1})",
        "score_chosen 1, score_rejected 1", "_equal");
  check(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 0.5, "score_rejected": 2})",
        "score_chosen > score_rejected", "_less");
  // The smallest gap above zero is accepted; without the option records need no scores at all.
  const std::string tiny = write_file(
      R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1.0000000000000002, "score_rejected": 1})"
      "\n",
      "_tiny");
  EXPECT_EQ(load_preferences(tiny, tok, opt, nullptr).size(), 1u);
  const std::string none = write_file(std::string(kGood) + "\n", "_off");
  EXPECT_EQ(load_preferences(none, tok, DataOptions{}, nullptr).size(), 1u);
}

TEST(LoadPreferencesMalformed, InvalidUtf8NamesField) {
  expect_malformed("{\"prompt\": \"a\", \"chosen\": \"b\xED\xA0\x80\", \"rejected\": \"c\"}", "chosen",
                   "invalid_utf8", "_a");
  expect_malformed("{\"prompt\": \"\xC0\x80\", \"chosen\": \"b\", \"rejected\": \"c\"}", "prompt", "invalid_utf8",
                   "_b");
  expect_malformed("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\xE2\x82\"}", "rejected",
                   "invalid_utf8", "_c");
  // A lone surrogate written as a JSON escape is refused by the JSON parser.
  expect_malformed(R"({"prompt": "a", "chosen": "\ud800", "rejected": "c"})", "", "bad_json", "_d");
}

TEST(LoadPreferences, SkipMalformedCountsEveryLineByReason) {
  const std::string path = write_file(std::string(kGood) + "\n" +                                      // kept
                                      "not json\n" +                                                  // bad_json
                                      R"({"prompt": "a", "rejected": "b"})" + "\n" +                    // missing
                                      "\n" + kGood + "\n" +                                             // kept
                                      R"({"prompt_ids": [1], "chosen_ids": [300], "rejected_ids": [2]})" + "\n" +
                                      R"({"prompt": "a", "chosen": "b"})" + "\n" +                      // missing
                                      "42\n" +                                                          // not_object
                                      kGood + "\n");                                                    // kept
  ByteTokenizer tok;
  DataOptions opt;
  opt.skip_malformed = true;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  EXPECT_EQ(d.size(), 3u);
  EXPECT_EQ(st.read, 8);
  EXPECT_EQ(st.kept, 3);
  EXPECT_EQ(st.skipped, 5);
  EXPECT_EQ(st.read, st.kept + st.skipped);
  const std::map<std::string, int64_t> expect = {
      {"bad_json", 1}, {"missing_field", 2}, {"id_out_of_range", 1}, {"not_object", 1}};
  EXPECT_EQ(st.skipped_by_reason, expect);
  int64_t sum = 0;
  for (const auto& [r, n] : st.skipped_by_reason) sum += n;
  EXPECT_EQ(sum, st.skipped);
  EXPECT_EQ(d[0].line, 1);
  EXPECT_EQ(d[1].line, 5);
  EXPECT_EQ(d[2].line, 9);
}

TEST(LoadPreferences, EmptyOrAllSkippedFileRejected) {
  ByteTokenizer tok;
  const std::string empty = write_file("", "_empty");
  expect_input_error([&] { load_preferences(empty, tok, DataOptions{}, nullptr); }, {empty, "no usable records"});
  const std::string blank = write_file("\n  \n\n", "_blank");
  expect_input_error([&] { load_preferences(blank, tok, DataOptions{}, nullptr); }, {blank, "no usable records"});
  const std::string allbad = write_file("x\n[1]\n", "_allbad");
  DataOptions opt;
  opt.skip_malformed = true;
  LoadStats st;
  expect_input_error([&] { load_preferences(allbad, tok, opt, &st); }, {allbad, "no usable records", "bad_json"});
  EXPECT_EQ(st.read, 2);
  EXPECT_EQ(st.skipped, 2);
}

TEST(LoadPreferences, MissingFileNamed) {
  ByteTokenizer tok;
  const std::string path = ::testing::TempDir() + "dpo_test_data_definitely_missing.jsonl";
  expect_input_error([&] { load_preferences(path, tok, DataOptions{}, nullptr); }, {path});
  expect_input_error([&] { load_preferences(::testing::TempDir(), tok, DataOptions{}, nullptr); }, {"directory"});
}

TEST(LoadPreferences, EosAppendedOnceNeverDoubledNeverOnPrompt) {
  const std::string path = write_file(
      R"({"prompt_ids": [5, 256], "chosen_ids": [1, 2, 256], "rejected_ids": [3]})"
      "\n"
      R"({"prompt_ids": [5], "chosen_ids": [256, 7], "rejected_ids": [3, 256]})"
      "\n");
  ByteTokenizer tok;
  auto d = load_preferences(path, tok, DataOptions{}, nullptr);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].prompt, (Ids{5, 256}));           // prompt untouched, even ending in EOS
  EXPECT_EQ(d[0].chosen, (Ids{1, 2, 256}));        // already ends with EOS: not doubled
  EXPECT_EQ(d[0].rejected, (Ids{3, 256}));         // appended
  EXPECT_EQ(d[1].chosen, (Ids{256, 7, 256}));      // an inner EOS is kept, one appended at the end
  EXPECT_EQ(d[1].rejected, (Ids{3, 256}));
  DataOptions noeos;
  noeos.append_eos = false;
  auto n = load_preferences(path, tok, noeos, nullptr);
  EXPECT_EQ(n[0].chosen, (Ids{1, 2, 256}));
  EXPECT_EQ(n[0].rejected, (Ids{3}));
}

// ---------------------------------------------------------------------------------------------- truncation

std::string ids_json(int32_t first, int64_t n) {
  std::string s = "[";
  for (int64_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(first + i);
  return s + "]";
}

std::string record(int64_t np, int64_t nc, int64_t nr) {
  return R"({"prompt_ids": )" + ids_json(100, np) + R"(, "chosen_ids": )" + ids_json(1, nc) +
         R"(, "rejected_ids": )" + ids_json(50, nr) + "}\n";
}

Ids range_ids(int32_t first, int64_t n) {
  Ids v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), first);
  return v;
}

TEST(LegacyTruncation, PromptCutKeepEndAndKeepStart) {
  // prompt 10, chosen 3+EOS, rejected 2+EOS: L = 14 > 10 -> prompt cut to 5, then 5 + 4 fits.
  const std::string path = write_file(record(10, 3, 2));
  ByteTokenizer tok;
  DataOptions opt;
  opt.rule = TruncationRule::Legacy;
  opt.truncation = TruncationMode::KeepEnd;  // the legacy rule's default
  opt.max_length = 10;
  opt.max_prompt_length = 5;
  LoadStats st;
  auto end = load_preferences(path, tok, opt, &st);
  EXPECT_EQ(end[0].prompt, range_ids(105, 5));  // the last 5 tokens
  EXPECT_EQ(end[0].chosen, with_eos(range_ids(1, 3)));
  EXPECT_EQ(end[0].rejected, with_eos(range_ids(50, 2)));
  EXPECT_EQ(st.truncated, 1);
  opt.truncation = TruncationMode::KeepStart;
  auto start = load_preferences(path, tok, opt, &st);
  EXPECT_EQ(start[0].prompt, range_ids(100, 5));  // the first 5 tokens
  EXPECT_EQ(start[0].chosen, with_eos(range_ids(1, 3)));
  EXPECT_EQ(st.truncated, 1);
}

TEST(LegacyTruncation, LongPromptKeptWhenRecordFits) {
  const std::string path = write_file(record(8, 3, 3));  // L = 8 + 4 = 12 <= 20
  ByteTokenizer tok;
  DataOptions opt;
  opt.rule = TruncationRule::Legacy;
  opt.truncation = TruncationMode::KeepEnd;  // the legacy rule's default
  opt.max_length = 20;
  opt.max_prompt_length = 5;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  EXPECT_EQ(d[0].prompt, range_ids(100, 8));
  EXPECT_EQ(st.truncated, 0);
}

TEST(LegacyTruncation, CompletionsCutIdenticallyKeepingStart) {
  // prompt 3 (<= max_prompt 4, not cut); chosen 10+EOS, rejected 7+EOS; L = 14 > 8 -> completions cut to 5.
  const std::string path = write_file(record(3, 10, 7) + record(3, 10, 2));
  ByteTokenizer tok;
  DataOptions opt;
  opt.rule = TruncationRule::Legacy;
  opt.truncation = TruncationMode::KeepEnd;  // the legacy rule's default
  opt.max_length = 8;
  opt.max_prompt_length = 4;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].prompt, range_ids(100, 3));
  EXPECT_EQ(d[0].chosen, range_ids(1, 5));  // EOS cut off
  EXPECT_EQ(d[0].rejected, range_ids(50, 5));
  EXPECT_EQ(d[0].prompt.size() + d[0].chosen.size(), 8u);
  // A completion that already fits is not cut.
  EXPECT_EQ(d[1].chosen, range_ids(1, 5));
  EXPECT_EQ(d[1].rejected, with_eos(range_ids(50, 2)));
  EXPECT_EQ(st.truncated, 2);
}

TEST(LegacyTruncation, PromptThenCompletions) {
  // prompt 10 -> last 3; then 3 + 11 > 8 -> completions cut to 5.
  const std::string path = write_file(record(10, 10, 10));
  ByteTokenizer tok;
  DataOptions opt;
  opt.rule = TruncationRule::Legacy;
  opt.truncation = TruncationMode::KeepEnd;  // the legacy rule's default
  opt.max_length = 8;
  opt.max_prompt_length = 3;
  opt.truncation = TruncationMode::KeepEnd;
  auto d = load_preferences(path, tok, opt, nullptr);
  EXPECT_EQ(d[0].prompt, range_ids(107, 3));
  EXPECT_EQ(d[0].chosen, range_ids(1, 5));
  EXPECT_EQ(d[0].rejected, range_ids(50, 5));
  // Every kept pair fits max_length.
  EXPECT_LE(d[0].prompt.size() + std::max(d[0].chosen.size(), d[0].rejected.size()), 8u);
}

TEST(LegacyTruncation, OptionsValidated) {
  const std::string path = write_file(std::string(kGood) + "\n");
  ByteTokenizer tok;
  DataOptions opt;
  opt.rule = TruncationRule::Legacy;
  opt.max_length = 128;
  opt.max_prompt_length = 128;
  expect_input_error([&] { load_preferences(path, tok, opt, nullptr); }, {"max_prompt_length", "max_length"});
  opt.max_prompt_length = 256;
  expect_input_error([&] { opt.validate(); }, {"max_prompt_length"});
  opt.max_length = 0;
  opt.max_prompt_length = 0;
  expect_input_error([&] { opt.validate(); }, {"max_length"});
  opt.max_length = 10;
  opt.max_prompt_length = -1;
  expect_input_error([&] { opt.validate(); }, {"max_prompt_length"});
  opt.max_prompt_length = 9;
  EXPECT_NO_THROW(opt.validate());
  opt.truncation = TruncationMode::KeepEnd;
  EXPECT_NO_THROW(opt.validate());
}

// TRL 1.x (v1.9.0 DPOTrainer): a record is kept iff len(prompt_ids) < max_length; each of prompt + chosen and
// prompt + rejected is then sliced to its first max_length tokens. Expected values below are written from that
// rule (ids are consecutive, so each kept range is named by its first id and length).
// The loss runs on the device and cannot report a bad pair (kernels/pair_loss.h), so the checks it made before
// are the loader's: with require_score_gap (ODPO) a score difference that overflows is refused naming file:line,
// like a missing or non-positive one (OdpoScoreGapNamesFileLine).
TEST(LoadPreferencesMalformed, OdpoScoreDifferenceMustBeFinite) {
  ByteTokenizer tok;
  DataOptions opt;
  opt.require_score_gap = true;
  const std::string path = write_file(
      std::string(R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 2, "score_rejected": 1})") +
      "\n" + R"({"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1e308, "score_rejected": -1e308})" +
      "\n");
  expect_input_error([&] { load_preferences(path, tok, opt, nullptr); },
                     {path + ":2:", "ODPO", "finite score_chosen - score_rejected", "'score_chosen'"});
  DataOptions skip = opt;
  skip.skip_malformed = true;
  LoadStats st;
  EXPECT_EQ(load_preferences(path, tok, skip, &st).size(), 1u);
  EXPECT_EQ(st.skipped_by_reason["scores"], 1);
  // Without ODPO the scores are only parsed (finite each), never subtracted: the record is kept.
  EXPECT_EQ(load_preferences(path, tok, DataOptions{}, nullptr).size(), 2u);
}

TEST(Trl1Truncation, IsTheDefault) {
  const DataOptions opt;
  EXPECT_EQ(opt.rule, TruncationRule::Trl1);
  EXPECT_EQ(opt.truncation, TruncationMode::KeepStart);
}

TEST(Trl1Truncation, PromptOfMaxLengthMinusOneKeptWithOneCompletionToken) {
  // max_length 10: prompt 9 -> kept; prompt + chosen (4 + EOS) sliced to 10 tokens: 1 completion token.
  const std::string path = write_file(record(9, 4, 2));
  ByteTokenizer tok;
  DataOptions opt;
  opt.max_length = 10;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].prompt, range_ids(100, 9));  // the prompt is never cut
  EXPECT_EQ(d[0].chosen, range_ids(1, 1));
  EXPECT_EQ(d[0].rejected, range_ids(50, 1));
  EXPECT_EQ(st.truncated, 1);
  EXPECT_EQ(st.dropped, 0);
}

TEST(Trl1Truncation, PromptOfMaxLengthDroppedAndCounted) {
  // Line 1: prompt 10 = max_length -> dropped; line 2: prompt 9 -> kept; line 3: prompt 25 -> dropped;
  // line 4 (blank) counts nowhere; line 5: short record, untouched.
  const std::string path = write_file(record(10, 2, 2) + record(9, 2, 2) + record(25, 1, 1) + "\n" + record(3, 2, 2));
  ByteTokenizer tok;
  DataOptions opt;
  opt.max_length = 10;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].line, 2);
  EXPECT_EQ(d[1].line, 5);
  EXPECT_EQ(d[1].chosen, with_eos(range_ids(1, 2)));
  EXPECT_EQ(st.read, 4);
  EXPECT_EQ(st.kept, 2);
  EXPECT_EQ(st.dropped, 2);
  EXPECT_EQ(st.skipped, 0);
  EXPECT_EQ(st.truncated, 1);  // line 2's completions (2 + EOS each) cut to 1 token
  EXPECT_EQ(st.read, st.kept + st.skipped + st.dropped);
  // SFT records follow the same rule.
  const std::string sft =
      write_file(R"({"prompt_ids": )" + ids_json(100, 10) + R"(, "completion_ids": [1]})" "\n" +
                     R"({"prompt_ids": )" + ids_json(100, 9) + R"(, "completion_ids": [1, 2]})" "\n",
                 "_sft");
  auto e = load_sft(sft, tok, opt, &st);
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0].completion, (Ids{1}));
  EXPECT_EQ(st.dropped, 1);
  EXPECT_EQ(st.truncated, 1);
}

TEST(Trl1Truncation, AllDroppedIsAnErrorThatSaysWhy) {
  const std::string path = write_file(record(10, 2, 2) + record(12, 2, 2));
  ByteTokenizer tok;
  DataOptions opt;
  opt.max_length = 10;
  expect_input_error([&] { load_preferences(path, tok, opt, nullptr); },
                     {path, "no usable records", "2 dropped", "max_length (10)", "truncation: legacy"});
}

TEST(Trl1Truncation, ChosenAndRejectedCutIndependentlyKeepingTheirStart) {
  // max_length 12, prompt 5: each completion keeps at most 7 tokens. chosen 10 + EOS -> first 7 (EOS lost);
  // rejected 3 + EOS = 4 -> untouched (the legacy rule would not cut it either, but it cuts the prompt first).
  const std::string path = write_file(record(5, 10, 3) + record(5, 6, 6) + record(5, 3, 10));
  ByteTokenizer tok;
  DataOptions opt;
  opt.max_length = 12;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].prompt, range_ids(100, 5));
  EXPECT_EQ(d[0].chosen, range_ids(1, 7));
  EXPECT_EQ(d[0].rejected, with_eos(range_ids(50, 3)));
  // 6 + EOS = 7 tokens fit exactly: nothing cut, EOS kept.
  EXPECT_EQ(d[1].chosen, with_eos(range_ids(1, 6)));
  EXPECT_EQ(d[1].rejected, with_eos(range_ids(50, 6)));
  EXPECT_EQ(d[2].chosen, with_eos(range_ids(1, 3)));
  EXPECT_EQ(d[2].rejected, range_ids(50, 7));
  EXPECT_EQ(st.truncated, 2);
  for (const auto& p : d) {
    EXPECT_LE(p.prompt.size() + p.chosen.size(), 12u);
    EXPECT_LE(p.prompt.size() + p.rejected.size(), 12u);
  }
}

TEST(Trl1Truncation, DiffersFromLegacyOnALongPrompt) {
  // prompt 8, chosen 6 + EOS, max_length 10. trl1: prompt whole, chosen cut to 10 - 8 = 2. legacy
  // (max_prompt_length 4): 8 + 7 > 10, so the prompt is cut to its last (keep_end) or first (keep_start) 4 tokens,
  // then 4 + 7 > 10 still, so the completions are cut to 6 (EOS lost).
  const std::string path = write_file(record(8, 6, 1));
  ByteTokenizer tok;
  DataOptions trl1;
  trl1.max_length = 10;
  auto a = load_preferences(path, tok, trl1, nullptr);
  EXPECT_EQ(a[0].prompt, range_ids(100, 8));
  EXPECT_EQ(a[0].chosen, range_ids(1, 2));
  DataOptions legacy = trl1;
  legacy.rule = TruncationRule::Legacy;
  legacy.max_prompt_length = 4;
  legacy.truncation = TruncationMode::KeepEnd;
  auto b = load_preferences(path, tok, legacy, nullptr);
  EXPECT_EQ(b[0].prompt, range_ids(104, 4));
  EXPECT_EQ(b[0].chosen, range_ids(1, 6));
  legacy.truncation = TruncationMode::KeepStart;
  auto c = load_preferences(path, tok, legacy, nullptr);
  EXPECT_EQ(c[0].prompt, range_ids(100, 4));
  EXPECT_EQ(c[0].chosen, range_ids(1, 6));
}

TEST(Trl1Truncation, KeepEndRefused) {
  const std::string path = write_file(std::string(kGood) + "\n");
  ByteTokenizer tok;
  DataOptions opt;
  opt.truncation = TruncationMode::KeepEnd;
  expect_input_error([&] { load_preferences(path, tok, opt, nullptr); }, {"keep_end", "trl1"});
  opt.max_prompt_length = 100000;  // not used by trl1: no error about it
  opt.truncation = TruncationMode::KeepStart;
  EXPECT_NO_THROW(opt.validate());
}

// ---------------------------------------------------------------------------------------------- batching

std::vector<PreferencePair> two_pairs() {
  std::vector<PreferencePair> d(2);
  d[0].prompt = {10, 11};
  d[0].chosen = {20, kEos};
  d[0].rejected = {30, 31, kEos};
  d[1].prompt = {12, 13, 14};
  d[1].chosen = {21, 22, kEos};
  d[1].rejected = {32, kEos};
  return d;
}

template <class W>
void check_two_pair_layout(DType dt) {
  const auto d = two_pairs();
  const Batch b = make_batch(d, {0, 1}, dt, /*pad_id=*/7);
  EXPECT_EQ(b.pairs, 2);
  EXPECT_EQ(b.T, 6);
  EXPECT_EQ(b.tokens.shape(), (Shape{4, 6}));
  EXPECT_EQ(b.weights.shape(), (Shape{4, 6}));
  EXPECT_EQ(b.weights.dtype(), dt);
  // rows: chosen 0, chosen 1, rejected 0, rejected 1
  const Ids tokens = {10, 11, 20, kEos, 7, 7,      //
                      12, 13, 14, 21, 22, kEos,    //
                      10, 11, 30, 31, kEos, 7,     //
                      12, 13, 14, 32, kEos, 7};
  const Ids keymask = {1, 1, 1, 1, 0, 0,  //
                       1, 1, 1, 1, 1, 1,  //
                       1, 1, 1, 1, 1, 0,  //
                       1, 1, 1, 1, 1, 0};
  const Ids targets = {11, 20, kEos, -1, -1, -1,   //
                       13, 14, 21, 22, kEos, -1,   //
                       11, 30, 31, kEos, -1, -1,   //
                       13, 14, 32, kEos, -1, -1};
  const std::vector<double> weights = {0, 1, 1, 0, 0, 0,  //
                                       0, 0, 1, 1, 1, 0,  //
                                       0, 1, 1, 1, 0, 0,  //
                                       0, 0, 1, 1, 0, 0};
  EXPECT_EQ(ints_of(b.tokens), tokens);
  EXPECT_EQ(ints_of(b.keymask), keymask);
  EXPECT_EQ(ints_of(b.targets), targets);
  EXPECT_EQ(weights_of<W>(b), weights);
  EXPECT_EQ(b.completion_len, (std::vector<int64_t>{2, 3, 3, 2}));
  EXPECT_EQ(b.tokens_total, 4 + 6 + 5 + 5);
  EXPECT_FALSE(b.has_scores);
  EXPECT_TRUE(b.score_chosen.empty());
}

TEST(Batch, TwoPairLayoutByHandF32) { check_two_pair_layout<float>(DType::F32); }
TEST(Batch, TwoPairLayoutByHandF64) { check_two_pair_layout<double>(DType::F64); }

// Random records through the loader and the batcher: prompt tokens are never weighted (chosen or rejected rows),
// weighted targets are exactly the completion in order, padding has keymask 0, target -1 and weight 0.
TEST(Batch, InvariantsOnRandomData) {
  std::mt19937_64 g(1234);
  std::string content;
  for (int i = 0; i < 40; ++i) {
    auto len = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
    auto rnd = [&](int n) {
      std::string s = "[";
      for (int k = 0; k < n; ++k) s += (k ? "," : "") + std::to_string(std::uniform_int_distribution<int>(0, 255)(g));
      return s + "]";
    };
    content += R"({"prompt_ids": )" + rnd(len(1, 30)) + R"(, "chosen_ids": )" + rnd(len(1, 20)) +
               R"(, "rejected_ids": )" + rnd(len(1, 20)) + "}\n";
  }
  const std::string path = write_file(content);
  ByteTokenizer tok;
  DataOptions opt;  // trl1: every prompt (<= 30 tokens) is below max_length, completions cut to fit
  opt.max_length = 32;
  LoadStats st;
  auto d = load_preferences(path, tok, opt, &st);
  ASSERT_EQ(d.size(), 40u);
  EXPECT_GT(st.truncated, 0);
  const std::vector<int64_t> idx = {3, 17, 0, 39, 22, 8};
  const Batch b = make_batch(d, idx, DType::F32, kEos);
  const int64_t P = b.pairs, T = b.T;
  ASSERT_EQ(P, 6);
  EXPECT_LE(T, opt.max_length);
  const auto tokens = ints_of(b.tokens), km = ints_of(b.keymask), tg = ints_of(b.targets);
  const auto w = weights_of<float>(b);
  int64_t total = 0;
  for (int64_t r = 0; r < 2 * P; ++r) {
    const PreferencePair& p = d[idx[r % P]];
    const Ids& comp = r < P ? p.chosen : p.rejected;
    const int64_t np = static_cast<int64_t>(p.prompt.size()), len = np + static_cast<int64_t>(comp.size());
    total += len;
    Ids weighted;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = r * T + t;
      EXPECT_EQ(km[i], t < len ? 1 : 0);
      if (t + 1 < np) EXPECT_EQ(w[i], 0.0) << "prompt target weighted, row " << r << " t " << t;
      if (t >= len) {
        EXPECT_EQ(tokens[i], kEos);  // pad
        EXPECT_EQ(tg[i], -1);
        EXPECT_EQ(w[i], 0.0);
      }
      if (w[i] != 0) weighted.push_back(tg[i]);
    }
    EXPECT_EQ(weighted, comp) << "row " << r;
    EXPECT_EQ(b.completion_len[r], static_cast<int64_t>(comp.size()));
  }
  EXPECT_EQ(b.tokens_total, total);
}

// The preconditions of the per-pair loss (kernels/pair_loss.h) hold for every batch of loaded data: every row has a
// completion length >= 1 (the loss divides by it for sft and length-normalised ipo) and, under require_score_gap,
// every pair's ODPO offset log(score_chosen - score_rejected) is finite. Random records, prompts up to and past
// max_length (dropped by trl1), both truncation rules, completions cut down to a single token.
TEST(Batch, LossPreconditionsHoldForLoadedData) {
  std::mt19937_64 g(4321);
  auto len = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
  auto rnd = [&](int n) {
    std::string s = "[";
    for (int k = 0; k < n; ++k) s += (k ? "," : "") + std::to_string(std::uniform_int_distribution<int>(0, 255)(g));
    return s + "]";
  };
  std::string content;
  for (int i = 0; i < 60; ++i) {
    const double lo = std::uniform_real_distribution<double>(-5, 5)(g);
    content += R"({"prompt_ids": )" + rnd(len(1, 20)) + R"(, "chosen_ids": )" + rnd(len(1, 12)) +
               R"(, "rejected_ids": )" + rnd(len(1, 12)) + R"(, "score_chosen": )" +
               std::to_string(lo + std::uniform_real_distribution<double>(1e-6, 3)(g)) + R"(, "score_rejected": )" +
               std::to_string(lo) + "}\n";
  }
  const std::string path = write_file(content);
  ByteTokenizer tok;
  for (TruncationRule rule : {TruncationRule::Trl1, TruncationRule::Legacy})
    for (int64_t max_length : {2, 5, 16, 64}) {
      DataOptions opt;
      opt.rule = rule;
      opt.max_length = max_length;
      opt.max_prompt_length = std::max<int64_t>(1, max_length / 2);
      opt.require_score_gap = true;
      if (rule == TruncationRule::Legacy && opt.max_prompt_length >= max_length) continue;
      LoadStats st;
      const auto d = load_preferences(path, tok, opt, &st);
      SCOPED_TRACE("max_length " + std::to_string(max_length));
      std::vector<int64_t> idx(d.size());
      std::iota(idx.begin(), idx.end(), 0);
      const Batch b = make_batch(d, idx, DType::F32, kEos);
      ASSERT_TRUE(b.has_scores);
      for (int64_t r = 0; r < 2 * b.pairs; ++r) EXPECT_GE(b.completion_len[static_cast<size_t>(r)], 1) << r;
      for (int64_t q = 0; q < b.pairs; ++q) {
        const double gap = b.score_chosen[static_cast<size_t>(q)] - b.score_rejected[static_cast<size_t>(q)];
        EXPECT_TRUE(gap > 0 && std::isfinite(std::log(gap))) << q;
      }
    }
}

// The batch fed to the CPU log-prob kernel gives, per row, the sum of log p(completion token | prefix),
// computed here directly from the logits without targets or weights.
TEST(Batch, MatchesLogprobKernelSemantics) {
  const auto d = two_pairs();
  const Batch b = make_batch(d, {1, 0}, DType::F64, 0);
  const int64_t R = 2 * b.pairs, T = b.T, V = 257;
  std::mt19937_64 g(99);
  std::normal_distribution<double> nd(0, 1);
  std::vector<double> logits(static_cast<size_t>(R * T * V));
  for (auto& x : logits) x = nd(g);
  std::vector<double> seq(static_cast<size_t>(R), NAN);
  cpu::logprob_forward<double>(seq.data(), nullptr, logits.data(), b.targets.data<int32_t>(),
                               b.weights.data<double>(), R, T, V);
  const std::vector<int64_t> idx = {1, 0};
  for (int64_t r = 0; r < R; ++r) {
    const PreferencePair& p = d[idx[r % 2]];
    const Ids& comp = r < 2 ? p.chosen : p.rejected;
    double expect = 0;
    for (size_t k = 0; k < comp.size(); ++k) {
      const int64_t t = static_cast<int64_t>(p.prompt.size() + k) - 1;  // position predicting comp[k]
      const double* l = logits.data() + (r * T + t) * V;
      double m = *std::max_element(l, l + V), s = 0;
      for (int64_t v = 0; v < V; ++v) s += std::exp(l[v] - m);
      expect += l[comp[k]] - m - std::log(s);
    }
    EXPECT_NEAR(seq[r], expect, 1e-12) << "row " << r;
  }
}

// ---------------------------------------------------------------------------------------------- LD-DPO weights

// two_pairs(): pair 0 has chosen 2, rejected 3 completion tokens (shared 2: the rejected's third is the tail), pair
// 1 chosen 3, rejected 2 (the chosen's third). Weights written out by hand.
TEST(LdAlpha, WeightsByHand) {
  const auto d = two_pairs();
  Batch b = make_batch(d, {0, 1}, DType::F64, 7);
  const std::vector<double> plain = weights_of<double>(b);
  apply_ld_alpha(b, 1.0);
  EXPECT_EQ(weights_of<double>(b), plain);  // 1: exactly nothing changes
  apply_ld_alpha(b, 0.25);
  const std::vector<double> weights = {0, 1, 1, 0,    0, 0,  //
                                       0, 0, 1, 1,    0.25, 0,  //
                                       0, 1, 1, 0.25, 0, 0,  //
                                       0, 0, 1, 1,    0, 0};
  EXPECT_EQ(weights_of<double>(b), weights);
  for (double a : {0.0, -0.5, 1.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    Batch c = make_batch(d, {0, 1}, DType::F32, 7);
    EXPECT_THROW(apply_ld_alpha(c, a), Error) << a;
  }
}

// The log-prob kernel's weighted sum over an LD-weighted batch is, for every sequence, the sum of its first
// min(len_chosen, len_rejected) completion token log-probs plus ld_alpha times the rest (TRL's shared_logps +
// ld_alpha * tail_logps), in every batch layout. Each scored slot's logits are drawn from a generator seeded by
// (record, side, token index), so every layout scores the same token log-probs; unscored slots hold NaN (never
// read). The expectation is computed here from those logits in long double, without the batch.
TEST(LdAlpha, KernelSumIsSharedPlusAlphaTailInEveryLayout) {
  std::mt19937_64 g(777);
  auto len = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
  auto ids = [&](int n) {
    Ids v(static_cast<size_t>(n));
    for (auto& x : v) x = std::uniform_int_distribution<int32_t>(0, 36)(g);
    return v;
  };
  std::vector<PreferencePair> d(9);
  for (auto& p : d) p.prompt = ids(len(1, 6)), p.chosen = ids(len(1, 11)), p.rejected = ids(len(1, 11));
  d[0].chosen = ids(4), d[0].rejected = ids(4);  // equal lengths: no tail
  d[1].chosen = ids(1), d[1].rejected = ids(9);
  const int64_t V = 37;
  const double alpha = 0.3;
  auto row_logits = [V](int64_t record, int side, int64_t k) {
    std::mt19937_64 r(static_cast<uint64_t>((record * 2 + side) * 4096 + k));
    std::normal_distribution<double> nd(0, 2);
    std::vector<double> l(static_cast<size_t>(V));
    for (auto& x : l) x = nd(r);
    return l;
  };
  const std::vector<int64_t> idx = {3, 0, 8, 1, 5, 2, 7, 4, 6, 3};  // record 3 twice
  // Expected per (record, side).
  auto expect = [&](int64_t record, int side) {
    const PreferencePair& p = d[static_cast<size_t>(record)];
    const Ids& comp = side == 0 ? p.chosen : p.rejected;
    const size_t n = std::min(p.chosen.size(), p.rejected.size());
    long double s = 0;
    for (size_t k = 0; k < comp.size(); ++k) {
      const std::vector<double> l = row_logits(record, side, static_cast<int64_t>(k));
      const double m = *std::max_element(l.begin(), l.end());
      long double z = 0;
      for (double x : l) z += std::exp(static_cast<long double>(x - m));
      const long double lp = l[static_cast<size_t>(comp[k])] - m - std::log(z);
      s += (k < n ? 1.0L : static_cast<long double>(alpha)) * lp;
    }
    return static_cast<double>(s);
  };
  for (BatchLayout layout : {BatchLayout::Padded, BatchLayout::Packed, BatchLayout::PrefixShared}) {
    SCOPED_TRACE(batch_layout_name(layout));
    Batch b = make_layout_batch(d, idx, layout, 40, DType::F64, kEos);
    apply_ld_alpha(b, alpha);
    const int64_t P = b.pairs, T = b.T, R = b.tokens.size(0);
    const bool padded = layout == BatchLayout::Padded;
    std::vector<double> logits(static_cast<size_t>(R * T * V), NAN);
    const double* w = b.weights.data<double>();
    std::vector<int32_t> seg;
    for (int64_t q = 0; q < P; ++q)
      for (int side = 0; side < 2; ++side) {
        int64_t lo = 0, hi = 0;
        if (padded) {
          lo = (side == 0 ? q : P + q) * T, hi = lo + T;
        } else {
          lo = b.seg[static_cast<size_t>(2 * (2 * q + side))], hi = b.seg[static_cast<size_t>(2 * (2 * q + side) + 1)];
        }
        int64_t k = 0;
        for (int64_t i = lo; i < hi; ++i) {
          if (w[i] == 0) continue;
          const std::vector<double> l = row_logits(b.indices[static_cast<size_t>(q)], side, k++);
          std::copy(l.begin(), l.end(), logits.begin() + i * V);
        }
      }
    for (int64_t x : b.seg) seg.push_back(static_cast<int32_t>(x));
    std::vector<double> seq(static_cast<size_t>(2 * P), NAN);
    if (padded)
      cpu::logprob_forward<double>(seq.data(), nullptr, logits.data(), b.targets.data<int32_t>(), w, R, T, V);
    else
      cpu::logprob_forward_segments<double>(seq.data(), nullptr, nullptr, logits.data(), b.targets.data<int32_t>(),
                                            w, seg.data(), 2 * P, R, T, V, V);
    for (int64_t q = 0; q < P; ++q)
      for (int side = 0; side < 2; ++side) {
        const int64_t at = padded ? side * P + q : 2 * q + side;
        const int64_t record = b.indices[static_cast<size_t>(q)];
        // A sum of at most 11 terms of size < 20, each exact to a few ulp in double: 1e-12.
        EXPECT_NEAR(seq[static_cast<size_t>(at)], expect(record, side), 1e-12) << "record " << record << " side " << side;
      }
  }
}

TEST(Batch, ScoresFollowIndices) {
  auto d = two_pairs();
  d[0].has_scores = d[1].has_scores = true;
  d[0].score_chosen = 1.5, d[0].score_rejected = 0.5;
  d[1].score_chosen = 9, d[1].score_rejected = 3;
  const Batch b = make_batch(d, {1, 0, 1}, DType::F32, 0);
  EXPECT_EQ(b.pairs, 3);
  EXPECT_TRUE(b.has_scores);
  EXPECT_EQ(b.score_chosen, (std::vector<double>{9, 1.5, 9}));
  EXPECT_EQ(b.score_rejected, (std::vector<double>{3, 0.5, 3}));
  EXPECT_EQ(b.completion_len, (std::vector<int64_t>{3, 2, 3, 2, 3, 2}));
  d[0].has_scores = false;
  const Batch m = make_batch(d, {0, 1}, DType::F32, 0);
  EXPECT_FALSE(m.has_scores);
  EXPECT_TRUE(m.score_chosen.empty());
}

TEST(Batch, RejectsBadArguments) {
  const auto d = two_pairs();
  EXPECT_THROW(make_batch(d, {}, DType::F32, 0), Error);
  EXPECT_THROW(make_batch(d, {0, 2}, DType::F32, 0), Error);
  EXPECT_THROW(make_batch(d, {-1}, DType::F32, 0), Error);
  EXPECT_THROW(make_batch(d, {0}, DType::I32, 0), Error);
  EXPECT_THROW(make_batch(d, {0}, DType::BF16, 0), Error);
  EXPECT_THROW(make_batch(d, {0}, DType::F32, -1), Error);
  auto e = d;
  e[1].prompt.clear();
  EXPECT_THROW(make_batch(e, {1}, DType::F32, 0), Error);
  EXPECT_NO_THROW(make_batch(e, {0}, DType::F32, 0));
}

// The pad id changes the padding slots' tokens and nothing else, in every layout (so results cannot depend on it:
// padding is never attended to, targeted or weighted).
TEST(Batch, PadIdFillsOnlyPaddingSlotsInEveryLayout) {
  std::mt19937_64 g(test::test_seed());
  std::uniform_int_distribution<int32_t> tok(0, 299);
  std::uniform_int_distribution<int> len(1, 11);
  std::vector<PreferencePair> d(7);
  for (auto& p : d) {
    for (int i = len(g); i > 0; --i) p.prompt.push_back(tok(g));
    for (int i = len(g); i > 0; --i) p.chosen.push_back(tok(g));
    for (int i = len(g); i > 0; --i) p.rejected.push_back(tok(g));
  }
  const std::vector<int64_t> idx = {3, 0, 6, 1, 5};
  for (BatchLayout l : {BatchLayout::Padded, BatchLayout::Packed, BatchLayout::PrefixShared}) {
    SCOPED_TRACE(batch_layout_name(l));
    const Batch a = make_layout_batch(d, idx, l, 23, DType::F64, 0);
    const Batch b = make_layout_batch(d, idx, l, 23, DType::F64, 299);
    ASSERT_EQ(a.tokens.numel(), b.tokens.numel());
    int64_t pads = 0;
    for (int64_t i = 0; i < a.tokens.numel(); ++i) {
      const bool pad = a.keymask.data<int32_t>()[i] == 0;
      pads += pad;
      EXPECT_EQ(b.tokens.data<int32_t>()[i], pad ? 299 : a.tokens.data<int32_t>()[i]) << i;
      if (pad) EXPECT_EQ(a.tokens.data<int32_t>()[i], 0) << i;
      EXPECT_EQ(a.keymask.data<int32_t>()[i], b.keymask.data<int32_t>()[i]);
      EXPECT_EQ(a.targets.data<int32_t>()[i], b.targets.data<int32_t>()[i]);
      EXPECT_EQ(a.weights.data<double>()[i], b.weights.data<double>()[i]);
    }
    EXPECT_GT(pads, 0);  // the lengths differ, so some slots are padding
  }
}

TEST(DataOptions, PadIdMustBeInTheVocabulary) {
  DataOptions o;
  o.vocab_size = 300;
  o.pad_id = 299;
  EXPECT_NO_THROW(o.validate());
  o.pad_id = 300;
  EXPECT_THROW(o.validate(), InputError);
  o.pad_id = -1;
  EXPECT_THROW(o.validate(), InputError);
}

// ---------------------------------------------------------------------------------------------- SFT

TEST(Sft, LoadBothFormsAndBatch) {
  const std::string path = write_file(
      R"({"prompt": "ab", "completion": "c"})"
      "\n"
      R"({"prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 256], "extra": 1})"
      "\n");
  ByteTokenizer tok;
  LoadStats st;
  auto d = load_sft(path, tok, DataOptions{}, &st);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].prompt, bytes("ab"));
  EXPECT_EQ(d[0].completion, with_eos(bytes("c")));
  EXPECT_EQ(d[1].completion, (Ids{4, 5, kEos}));
  EXPECT_EQ(d[1].line, 2);
  EXPECT_EQ(st.kept, 2);
  const Batch b = make_sft_batch(d, {0, 1}, DType::F32, 9);
  EXPECT_EQ(b.pairs, 2);
  EXPECT_EQ(b.T, 6);
  EXPECT_EQ(b.tokens.shape(), (Shape{2, 6}));
  EXPECT_EQ(ints_of(b.tokens), (Ids{'a', 'b', 'c', kEos, 9, 9, 1, 2, 3, 4, 5, kEos}));
  EXPECT_EQ(ints_of(b.keymask), (Ids{1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(ints_of(b.targets), (Ids{'b', 'c', kEos, -1, -1, -1, 2, 3, 4, 5, kEos, -1}));
  EXPECT_EQ(weights_of<float>(b), (std::vector<double>{0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0}));
  EXPECT_EQ(b.completion_len, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(b.tokens_total, 10);
}

TEST(Sft, ValidationAndTruncation) {
  ByteTokenizer tok;
  const std::string bad = write_file(R"({"prompt": "a", "completion": "b"})"
                                     "\n"
                                     R"({"prompt": "a", "chosen": "b"})"
                                     "\n",
                                     "_bad");
  expect_input_error([&] { load_sft(bad, tok, DataOptions{}, nullptr); }, {bad + ":2:", "'completion'"});
  const std::string mixed = write_file(R"({"prompt": "a", "completion_ids": [1]})"
                                       "\n",
                                       "_mixed");
  expect_input_error([&] { load_sft(mixed, tok, DataOptions{}, nullptr); }, {mixed + ":1:", "'completion_ids'"});
  const std::string empty = write_file(R"({"prompt": "a", "completion": ""})"
                                       "\n",
                                       "_empty");
  expect_input_error([&] { load_sft(empty, tok, DataOptions{}, nullptr); }, {empty + ":1:", "'completion'"});
  // Legacy: prompt 10, completion 6+EOS, max_length 8, max_prompt 3 -> prompt last 3, completion first 5.
  const std::string lng = write_file(R"({"prompt_ids": )" + ids_json(100, 10) + R"(, "completion_ids": )" +
                                         ids_json(1, 6) + "}\n",
                                     "_long");
  DataOptions opt;
  opt.rule = TruncationRule::Legacy;
  opt.truncation = TruncationMode::KeepEnd;
  opt.max_length = 8;
  opt.max_prompt_length = 3;
  LoadStats st;
  auto d = load_sft(lng, tok, opt, &st);
  EXPECT_EQ(d[0].prompt, range_ids(107, 3));
  EXPECT_EQ(d[0].completion, range_ids(1, 5));
  EXPECT_EQ(st.truncated, 1);
  opt.skip_malformed = true;
  auto s = load_sft(bad, tok, opt, &st);
  EXPECT_EQ(s.size(), 1u);
  EXPECT_EQ(st.skipped_by_reason["missing_field"], 1);
}

// ---------------------------------------------------------------------------------------------- epoch order

TEST(EpochOrder, IsPermutationAndDeterministic) {
  for (int64_t n : {0, 1, 2, 7, 100, 1001}) {
    auto a = epoch_order(n, 42, 3);
    ASSERT_EQ(static_cast<int64_t>(a.size()), n);
    auto s = a;
    std::sort(s.begin(), s.end());
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(s[i], i);
    EXPECT_EQ(epoch_order(n, 42, 3), a);
  }
  EXPECT_THROW(epoch_order(-1, 0, 0), Error);
}

TEST(EpochOrder, DiffersBetweenEpochsAndSeeds) {
  const auto base = epoch_order(100, 42, 0);
  EXPECT_NE(epoch_order(100, 42, 1), base);
  EXPECT_NE(epoch_order(100, 43, 0), base);
  EXPECT_NE(epoch_order(100, 0, 0), epoch_order(100, 0, 1));
  // (seed, epoch) is not a sum: (1, 0) and (0, 1) differ.
  EXPECT_NE(epoch_order(100, 1, 0), epoch_order(100, 0, 1));
  std::set<std::vector<int64_t>> seen;
  for (int64_t e = 0; e < 20; ++e) seen.insert(epoch_order(50, 7, e));
  EXPECT_EQ(seen.size(), 20u);
  // Not the identity.
  std::vector<int64_t> id(100);
  std::iota(id.begin(), id.end(), 0);
  EXPECT_NE(base, id);
}

// Pins the exact sequence: a resumed or multi-machine run must see the same order everywhere.
TEST(EpochOrder, GoldenValues) {
  EXPECT_EQ(epoch_order(10, 42, 0), (std::vector<int64_t>{7, 4, 0, 3, 5, 6, 1, 2, 9, 8}));
  EXPECT_EQ(epoch_order(10, 42, 1), (std::vector<int64_t>{6, 3, 1, 2, 7, 8, 5, 0, 4, 9}));
}

}  // namespace
}  // namespace dpo

namespace dpo {
namespace {

// balanced_cuts against a brute force over every contiguous partition: the same smallest maximum, cuts that are
// contiguous, cover everything and keep that maximum; a hand example.
TEST(BalancedCuts, SmallestMaximumAndDeterministic) {
  EXPECT_EQ(balanced_cuts({5, 1, 1, 1, 5, 1}, 2), (std::vector<int64_t>{0, 3, 6}));
  EXPECT_EQ(balanced_cuts({5, 1, 1, 1, 5, 1}, 3), (std::vector<int64_t>{0, 2, 4, 6}));
  EXPECT_EQ(balanced_cuts({}, 3), (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_EQ(balanced_cuts({4, 4}, 4), (std::vector<int64_t>{0, 1, 2, 2, 2}));
  std::mt19937_64 g(test::test_seed());
  std::uniform_int_distribution<int> len(0, 7), cost(0, 20), parts(1, 4);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int64_t> c(static_cast<size_t>(len(g)));
    for (auto& x : c) x = cost(g);
    const int k = parts(g);
    const auto n = static_cast<int64_t>(c.size());
    // Brute force: every way to place k - 1 cuts in [0, n].
    int64_t best = std::numeric_limits<int64_t>::max();
    std::vector<int64_t> cut(static_cast<size_t>(k + 1), 0);
    std::function<void(int, int64_t)> rec = [&](int j, int64_t from) {
      if (j == k) {
        cut[static_cast<size_t>(k)] = n;
        int64_t mx = 0;
        for (int r = 0; r < k; ++r) {
          int64_t s = 0;
          for (int64_t i = cut[static_cast<size_t>(r)]; i < cut[static_cast<size_t>(r) + 1]; ++i)
            s += c[static_cast<size_t>(i)];
          mx = std::max(mx, s);
        }
        best = std::min(best, mx);
        return;
      }
      for (int64_t x = from; x <= n; ++x) {
        cut[static_cast<size_t>(j)] = x;
        rec(j + 1, x);
      }
    };
    cut[0] = 0;
    rec(1, 0);
    const std::vector<int64_t> got = balanced_cuts(c, k);
    ASSERT_EQ(got.size(), static_cast<size_t>(k + 1));
    EXPECT_EQ(got.front(), 0);
    EXPECT_EQ(got.back(), n);
    int64_t mx = 0;
    for (int r = 0; r < k; ++r) {
      ASSERT_LE(got[static_cast<size_t>(r)], got[static_cast<size_t>(r) + 1]);
      int64_t s = 0;
      for (int64_t i = got[static_cast<size_t>(r)]; i < got[static_cast<size_t>(r) + 1]; ++i)
        s += c[static_cast<size_t>(i)];
      mx = std::max(mx, s);
    }
    EXPECT_EQ(mx, best) << "trial " << trial;
  }
  EXPECT_THROW(balanced_cuts({1, -1}, 2), Error);
}

TEST(BalancedCuts, MicroBatchCostFollowsTheLayout) {
  std::vector<PreferencePair> d(2);
  d[0].prompt = {1, 2, 3};
  d[0].chosen = {4};
  d[0].rejected = {5, 6};
  d[1].prompt = {1};
  d[1].chosen = {2, 3, 4, 5, 6, 7};
  d[1].rejected = {8};
  EXPECT_EQ(micro_batch_cost(d, {0, 1}, BatchLayout::Padded), 2 * 2 * 7);  // 4 rows of the longest, 7
  EXPECT_EQ(micro_batch_cost(d, {0, 1}, BatchLayout::Packed), (6 + 1 + 2) + (2 + 6 + 1));
  EXPECT_EQ(micro_batch_cost(d, {0, 1}, BatchLayout::PrefixShared), (3 + 1 + 1 + 2) + (1 + 6 + 1 + 1));
}

}  // namespace
}  // namespace dpo
