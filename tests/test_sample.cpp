// Sampling: the token picker against closed forms, batched generation against one-at-a-time generation, and the
// key/value-cache decoding against the full recompute (its oracle), token for token and logit for logit.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <utility>

#include "model/checkpoint.h"
#include "test_decode.h"
#include "test_util.h"
#include "train/sample.h"

namespace dpo {
namespace {

using test::expect_cache_matches_recompute;
using test::head64_config;
using test::mixed_prompts;
using test::option_sets;
using test::run;
using test::StepLogits;

TEST(Sample, GreedyAndDegenerateFiltersPickTheArgmax) {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f};
  Rng rng(1);
  SampleOptions g;
  g.temperature = 0;
  EXPECT_EQ(sample_token(logits.data(), 5, g, rng), 1);
  SampleOptions k1;
  k1.top_k = 1;
  SampleOptions p0;
  p0.top_p = 1e-9;
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(sample_token(logits.data(), 5, k1, rng), 1);
    EXPECT_EQ(sample_token(logits.data(), 5, p0, rng), 1);
  }
}

TEST(Sample, FrequenciesMatchTheTemperedSoftmax) {
  const std::vector<float> logits = {1.0f, 0.0f, -0.5f, 2.0f};
  for (double temp : {1.0, 0.5}) {
    SampleOptions o;
    o.temperature = temp;
    Rng rng(7);
    const int n = 40000;
    std::vector<int> count(4, 0);
    for (int i = 0; i < n; ++i) count[sample_token(logits.data(), 4, o, rng)]++;
    double z = 0;
    for (float l : logits) z += std::exp(l / temp);
    for (int v = 0; v < 4; ++v) {
      const double p = std::exp(logits[v] / temp) / z;
      const double sd = std::sqrt(n * p * (1 - p));
      EXPECT_NEAR(count[v], n * p, 5 * sd + 1) << "temperature " << temp << " token " << v;
    }
  }
}

TEST(Sample, TopKAndTopPRestrictTheSupportAndRenormalise) {
  // probabilities ~ [0.5, 0.3, 0.15, 0.05]
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  Rng rng(3);
  SampleOptions k2;
  k2.top_k = 2;
  SampleOptions p7;
  p7.top_p = 0.7;  // 0.5 < 0.7 <= 0.8: the first two tokens
  const int n = 20000;
  int k_first = 0, p_first = 0;
  for (int i = 0; i < n; ++i) {
    int a = sample_token(logits.data(), 4, k2, rng), b = sample_token(logits.data(), 4, p7, rng);
    ASSERT_LT(a, 2);
    ASSERT_LT(b, 2);
    k_first += a == 0;
    p_first += b == 0;
  }
  const double p = 0.5 / 0.8, sd = std::sqrt(n * p * (1 - p));
  EXPECT_NEAR(k_first, n * p, 5 * sd);
  EXPECT_NEAR(p_first, n * p, 5 * sd);
}

TEST(Sample, SeededAndOptionsValidated) {
  const std::vector<float> logits = {0.3f, 0.1f, 0.2f, 0.0f, -0.1f};
  Rng a(11), b(11);
  SampleOptions o;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(sample_token(logits.data(), 5, o, a), sample_token(logits.data(), 5, o, b));
  SampleOptions bad;
  bad.temperature = -1;
  EXPECT_THROW(validate(bad), InputError);
  bad = SampleOptions{};
  bad.top_p = 0;
  EXPECT_THROW(validate(bad), InputError);
  bad = SampleOptions{};
  bad.top_k = -2;
  EXPECT_THROW(validate(bad), InputError);
  bad = SampleOptions{};
  bad.max_new_tokens = 0;
  EXPECT_THROW(validate(bad), InputError);
}

TEST(Sample, BatchedGreedyGenerationEqualsOneAtATime) {
  // Right padding keeps every prompt's positions, so a batch of prompts of different lengths must generate
  // exactly what each prompt generates alone.
  auto be = make_cpu_backend();
  GPT2Config c;
  c.vocab_size = 29;
  c.max_seq_len = 24;
  c.n_embd = 16;
  c.n_head = 2;
  c.n_layer = 2;
  GPT2 m(*be, c, DType::F32);
  Rng init(5);
  m.init_random(init);
  for (int64_t i = 0; i < m.params().numel(); ++i) m.params().data<float>()[i] *= 20.0f;  // peaky logits
  SampleOptions o;
  o.temperature = 0;
  o.max_new_tokens = 9;
  o.eos_id = 28;
  const std::vector<std::vector<int32_t>> prompts = {{3, 4, 5}, {7}, {1, 2, 3, 4, 5, 6, 7, 8}};
  Rng r1(0), r2(0);
  auto batched = generate(m, prompts, o, r1);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = generate(m, {prompts[i]}, o, r2);
    EXPECT_EQ(batched[i], alone[0]) << "prompt " << i;
    EXPECT_LE(static_cast<int64_t>(batched[i].size()), o.max_new_tokens);
    for (size_t t = 0; t + 1 < batched[i].size(); ++t) EXPECT_NE(batched[i][t], o.eos_id);  // stops at EOS
  }
  // The context limit caps generation: prompt 8 + 9 new tokens < 24; a 20-token prompt gets at most 4.
  std::vector<int32_t> longp(20, 1);
  auto capped = generate(m, {longp}, o, r1);
  EXPECT_LE(capped[0].size(), 4u);
  EXPECT_THROW(generate(m, {std::vector<int32_t>(24, 1)}, o, r1), InputError);
  EXPECT_THROW(generate(m, {std::vector<int32_t>{}}, o, r1), InputError);
}

TEST(SampleKvCache, FixtureModelGivesTheRecomputedTokensAndLogits) {
  auto be = make_cpu_backend();
  auto m = load_gpt2_checkpoint(*be, std::string(DPO_FIXTURE_DIR) + "/gpt2_tiny", DType::F32);
  ASSERT_EQ(m->config().max_seq_len, 24);
  std::mt19937_64 g(test::test_seed());
  const auto prompts = mixed_prompts(g, 96, {5, 1, 12, 3, 17, 9});
  uint64_t seed = 100;
  for (const auto& o : option_sets(20, 95)) {
    SCOPED_TRACE("temperature " + std::to_string(o.temperature) + " top_k " + std::to_string(o.top_k));
    expect_cache_matches_recompute(*m, prompts, o, ++seed);
  }
}

TEST(SampleKvCache, Head64ModelGivesTheRecomputedTokensAndLogits) {
  auto be = make_cpu_backend();
  GPT2 m(*be, head64_config(), DType::F32);
  Rng init(17);
  m.init_random(init);
  std::mt19937_64 g(test::test_seed());
  const auto prompts = mixed_prompts(g, 300, {7, 2, 30, 13, 1, 21, 4});
  uint64_t seed = 200;
  for (const auto& o : option_sets(25, 299)) {
    SCOPED_TRACE("temperature " + std::to_string(o.temperature) + " top_k " + std::to_string(o.top_k));
    expect_cache_matches_recompute(m, prompts, o, ++seed);
  }
}

TEST(SampleKvCache, EosAndContextLimitStopSequencesAsTheRecomputeDoes) {
  auto be = make_cpu_backend();
  GPT2 m(*be, head64_config(), DType::F32);
  Rng init(23);
  m.init_random(init);
  std::mt19937_64 g(test::test_seed());
  const auto prompts = mixed_prompts(g, 300, {3, 10, 36, 6});
  SampleOptions o;
  o.temperature = 0;
  o.max_new_tokens = 30;
  // The EOS id: the token the recompute's greedy run draws at step 2 of prompt 0, so that prompt stops there
  // while the others go on (a run with no EOS at all would not exercise the early exit).
  StepLogits scratch;
  const auto free_run = run(m, prompts, o, Decoding::FullRecompute, 1, &scratch);
  ASSERT_GE(free_run[0].size(), 3u);
  o.eos_id = free_run[0][2];
  StepLogits logits;
  const auto with_eos = run(m, prompts, o, Decoding::KvCache, 1, &logits);
  EXPECT_LE(with_eos[0].size(), 3u);
  EXPECT_EQ(with_eos[0].back(), o.eos_id);
  if (std::find(with_eos[2].begin(), with_eos[2].end(), o.eos_id) == with_eos[2].end())
    EXPECT_EQ(with_eos[2].size(), 4u) << "a 36-token prompt gets 40 - 36 new tokens";
  expect_cache_matches_recompute(m, prompts, o, 1);
  // Refusals exactly as the recompute: a prompt that fills the context, an empty prompt.
  Rng rng(0);
  EXPECT_THROW(generate(m, {std::vector<int32_t>(40, 1)}, o, rng), InputError);
  EXPECT_THROW(generate(m, {std::vector<int32_t>{}}, o, rng), InputError);
  // The cache is released after generation (and after a refusal).
  EXPECT_EQ(m.decode_batch(), 0);
}

TEST(SampleKvCache, DecodeStepsEqualTheFullForwardInF32AndTrackItInBf16) {
  auto be = make_cpu_backend();
  std::mt19937_64 g(test::test_seed());
  test::expect_forced_decode_matches(*be, g, 3.0);
}

TEST(SampleKvCache, DecodeApiRefusesGapsFullCachesAndBadIds) {
  auto be = make_cpu_backend();
  GPT2 m(*be, head64_config(), DType::F32);
  Rng init(3);
  m.init_random(init);
  Tensor tok = Tensor::host({2, 4}, DType::I32);
  EXPECT_THROW(m.decode_prefill(tok, {4, 2}, 41), InputError);  // beyond n_positions = 40
  EXPECT_THROW(m.decode_prefill(tok, {4, 5}, 8), Error);          // a length past the prompt
  EXPECT_THROW(m.decode_prefill(tok, {4, 2}, 3), Error);          // capacity below the prompt
  m.decode_prefill(tok, {4, 2}, 6);
  EXPECT_EQ(m.decode_filled(0), 4);
  EXPECT_EQ(m.decode_filled(1), 2);
  EXPECT_THROW(m.decode_step({1, 1}, {4, 3}), Error);   // sequence 1 would skip position 2
  EXPECT_THROW(m.decode_step({1, 1}, {6, 2}), Error);   // past the capacity
  EXPECT_THROW(m.decode_step({1, 300}, {4, 2}), InputError);  // id outside the vocabulary
  EXPECT_THROW(m.decode_step({1}, {4}), Error);         // one token for two sequences
  m.decode_step({1, 1}, {4, 2});
  EXPECT_EQ(m.decode_filled(1), 3);
  EXPECT_THROW(m.decode_select({1, 1}), Error);
  EXPECT_THROW(m.decode_select({0, 2}), Error);
  m.decode_select({1});
  EXPECT_EQ(m.decode_batch(), 1);
  EXPECT_EQ(m.decode_filled(0), 3);
  m.decode_end();
  EXPECT_EQ(m.decode_batch(), 0);
  EXPECT_THROW(m.decode_step({1}, {0}), Error);  // no cache
}

}  // namespace
}  // namespace dpo
