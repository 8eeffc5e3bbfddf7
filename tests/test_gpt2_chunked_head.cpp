// The chunked LM head (GPT2::score, fused_forward + fused_backward) against two independent things: finite
// differences of a nonlinear pair loss in double, and the unfused path (sequence_logprobs + backward, itself
// checked against finite differences in test_gpt2_model and against HF in test_gpt2_hf_parity), with the head over
// all slots (HeadRows::All) and over the scored slots only (HeadRows::Scored, the default). Also: the logits buffer
// does not grow with the batch (all slots: whole units of T rows; scored slots: whole units of their scored rows),
// chunks hold whole pairs, and misuse is an error. tests/test_gpt2_head_compaction.cpp compares the two heads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "model/gpt2.h"
#include "train/loss.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

GPT2Config tiny_config() {
  GPT2Config c;
  c.vocab_size = 11;  // not a multiple of anything
  c.max_seq_len = 8;
  c.n_embd = 8;
  c.n_head = 2;
  c.n_layer = 1;
  return c;
}

using Inputs = test::PaddedBatch;

Inputs make_inputs(std::mt19937_64& g, const GPT2Config& c, int64_t B, int64_t T) {
  return test::make_padded_batch(g, c.vocab_size, B, T);
}

void randomize(GPT2& m, std::mt19937_64& g, double scale) { test::randomize_f64(m, g, scale); }

std::vector<double> vec(const Tensor& t) {
  return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
}

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }

// A DPO-like pair loss, sum over pairs of softplus(-beta * ((c - ref_c) - (r - ref_r))), with random references.
struct PairLoss {
  double beta = 0.7;
  std::vector<double> ref;  // [2P]
  int64_t P = 0;
  double value(const std::vector<double>& lp) const {
    double s = 0;
    for (int64_t q = 0; q < P; ++q) s += softplus(-beta * ((lp[q] - ref[q]) - (lp[P + q] - ref[P + q])));
    return s;
  }
  // d/dc and d/dr of pair q
  void grad(int64_t q, const std::vector<double>& lp, std::vector<double>& d) const {
    const double z = beta * ((lp[q] - ref[q]) - (lp[P + q] - ref[P + q]));
    const double s = -beta / (1.0 + std::exp(z));  // d softplus(-z)/dz * dz/dc
    d[q] = s;
    d[P + q] = -s;
  }
};

GPT2::LossHead pair_head(const PairLoss& L, std::vector<std::pair<int64_t, int64_t>>* calls = nullptr) {
  GPT2::LossHead h;
  h.pair_stride = L.P;
  h.grad = [&L, calls](int64_t u0, int64_t u1, const std::vector<double>& lp, std::vector<double>& d) {
    if (calls) calls->push_back({u0, u1});
    for (int64_t q = u0; q < u1; ++q) L.grad(q, lp, d);
  };
  return h;
}

TEST(Gpt2ChunkedHead, FusedGradientMatchesFiniteDifferencesOfAPairLoss) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  const int64_t P = 3, T = 6;
  Inputs in = make_inputs(g, cfg, 2 * P, T);
  PairLoss L;
  L.P = P;
  L.ref = test::randn<double>(g, static_cast<size_t>(2 * P), 2.0);
  m.set_logits_chunk_rows(2 * T);  // one pair per chunk: three chunks

  m.zero_grad();
  const std::vector<double> lp = m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, pair_head(L));
  m.fused_backward();
  const std::vector<double> analytic = vec(m.grads());

  std::vector<double> x = vec(m.params());
  double* p = m.params().data<double>();
  Tensor seq = Tensor::host({2 * P}, DType::F64);
  auto f = [&]() {
    std::copy(x.begin(), x.end(), p);
    m.score(in.tokens, in.keymask, in.targets, in.weights, seq);
    return L.value(vec(seq));
  };
  const std::vector<double> numeric = test::numeric_grad(x, f);
  for (const auto& s : m.specs()) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    std::vector<double> a(analytic.begin() + s.offset, analytic.begin() + s.offset + n);
    std::vector<double> b(numeric.begin() + s.offset, numeric.begin() + s.offset + n);
    // Double, h = 1e-6, |f| ~ 1: truncation ~1e-12, round-off ~1e-10 (as in test_gpt2_model).
    EXPECT_LT(test::max_rel_err(a, b), 1e-6) << s.name;
  }
  double norm = 0;
  for (double v : analytic) norm += v * v;
  EXPECT_GT(norm, 1e-4);
}

// Fused (any chunk size) == unfused with the same per-sequence gradients, pair layout and single layout.
void expect_fused_matches_unfused(int64_t pair_stride, int64_t B, int64_t T, int64_t chunk_rows,
                                  int64_t expect_chunks, HeadRows head_rows) {
  SCOPED_TRACE("pair_stride=" + std::to_string(pair_stride) + " B=" + std::to_string(B) +
               " chunk_rows=" + std::to_string(chunk_rows) +
               (head_rows == HeadRows::All ? " all slots" : " scored slots"));
  std::mt19937_64 g(test::test_seed() + static_cast<uint64_t>(chunk_rows));
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  Inputs in = make_inputs(g, cfg, B, T);
  PairLoss L;
  L.P = pair_stride;
  L.ref = test::randn<double>(g, static_cast<size_t>(B), 2.0);
  const std::vector<double> dsingle = test::randn<double>(g, static_cast<size_t>(B), 1.0);

  // Unfused: all log-probs first, then the loss gradient of the whole batch, then backward.
  Tensor seq = Tensor::host({B}, DType::F64);
  m.zero_grad();
  m.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, seq);
  const std::vector<double> lp_ref = vec(seq);
  Tensor dseq = Tensor::host({B}, DType::F64);
  std::vector<double> d(static_cast<size_t>(B));
  if (pair_stride > 0)
    for (int64_t q = 0; q < pair_stride; ++q) L.grad(q, lp_ref, d);
  else
    d = dsingle;
  std::copy(d.begin(), d.end(), dseq.data<double>());
  m.backward(dseq);
  const std::vector<double> g_ref = vec(m.grads());

  m.set_logits_chunk_rows(chunk_rows);
  m.set_head_rows(head_rows);
  std::vector<std::pair<int64_t, int64_t>> calls;
  GPT2::LossHead head;
  if (pair_stride > 0) {
    head = pair_head(L, &calls);
  } else {
    head.grad = [&](int64_t u0, int64_t u1, const std::vector<double>&, std::vector<double>& out) {
      calls.push_back({u0, u1});
      for (int64_t s = u0; s < u1; ++s) out[s] = dsingle[s];
    };
  }
  std::fill(m.grads().data<double>(), m.grads().data<double>() + m.grads().numel(),
            std::numeric_limits<double>::quiet_NaN());  // zero_grad must clear a poisoned buffer
  m.zero_grad();
  const std::vector<double> lp = m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, head);
  m.fused_backward();
  const std::vector<double> g_fused = vec(m.grads());

  // Chunks: in order, contiguous, covering every unit once.
  ASSERT_EQ(static_cast<int64_t>(calls.size()), expect_chunks);
  int64_t next = 0;
  for (auto [u0, u1] : calls) {
    EXPECT_EQ(u0, next);
    EXPECT_GT(u1, u0);
    next = u1;
  }
  EXPECT_EQ(next, pair_stride > 0 ? pair_stride : B);
  // The chunked GEMMs see the same rows; the log-probs agree to double round-off, and d wte sums its chunk
  // contributions in a different grouping, a few ulps of the largest gradient.
  EXPECT_LT(test::max_rel_err(lp, lp_ref), 1e-13);
  EXPECT_LT(test::max_rel_err(g_fused, g_ref), 1e-13);
  double norm = 0;
  for (double v : g_fused) norm += v * v;
  EXPECT_GT(norm, 1e-6);
}

TEST(Gpt2ChunkedHead, FusedMatchesUnfusedForEveryChunking) {
  const int64_t T = 7;
  // Pair layout, 5 pairs: a pair per chunk (rows < one pair), 2 pairs per chunk (uneven last), all in one.
  expect_fused_matches_unfused(5, 10, T, 1, 5, HeadRows::All);
  expect_fused_matches_unfused(5, 10, T, 4 * T + 3, 3, HeadRows::All);
  expect_fused_matches_unfused(5, 10, T, 1 << 20, 1, HeadRows::All);
  // One sequence per unit (SFT): 3 sequences per chunk over 7.
  expect_fused_matches_unfused(0, 7, T, 3 * T, 3, HeadRows::All);
  // Scored slots: make_padded_batch scores T - 3 - b % 3 slots of sequence b (4, 3, 2, 4, ...), so the pairs
  // (q, q + 5) have 6, 7, 5, 6, 7 scored rows and chunks fill up to chunk_rows of those: 13 -> {6 7} {5 6} {7},
  // 31 -> all five (31 rows); one sequence per unit: 6 -> {4} {3 2} {4} {3 2} {4}, 21 -> {4 3 2 4 3 2} {4}.
  expect_fused_matches_unfused(5, 10, T, 1, 5, HeadRows::Scored);
  expect_fused_matches_unfused(5, 10, T, 13, 3, HeadRows::Scored);
  expect_fused_matches_unfused(5, 10, T, 31, 1, HeadRows::Scored);
  expect_fused_matches_unfused(0, 7, T, 6, 5, HeadRows::Scored);
  expect_fused_matches_unfused(0, 7, T, 3 * T, 2, HeadRows::Scored);
}

// The loss on the device (fused_forward_pairs: Backend::preference_loss per chunk of pairs) against the host
// callback running train/loss.cpp's per-pair gradients (pair_chunk_grads) on the same model: in double the two use
// the same per-pair function on the same inputs, so the gradients are bitwise equal, and the sums accumulated
// chunk by chunk equal batch_loss's over the whole batch bitwise (the CPU adds pair by pair in order).
TEST(Gpt2ChunkedHead, DeviceLossHeadMatchesTheHostCallbackBitwise) {
  const int64_t T = 7, P = 5;
  LossConfig lc;
  lc.beta = 0.3;
  lc.label_smoothing = 0.1;
  lc.odpo_alpha = 0.4;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}, {LossType::Robust, 0.5}, {LossType::Sft, 0.3}};
  for (int64_t chunk_rows : {int64_t{1}, 4 * T + 3, int64_t{1} << 20}) {
    SCOPED_TRACE("chunk_rows=" + std::to_string(chunk_rows));
    std::mt19937_64 g(test::test_seed() + static_cast<uint64_t>(chunk_rows));
    auto be = make_cpu_backend();
    const GPT2Config cfg = tiny_config();
    GPT2 m(*be, cfg, DType::F64);
    randomize(m, g, 0.3);
    m.set_logits_chunk_rows(chunk_rows);
    Inputs in = make_inputs(g, cfg, 2 * P, T);
    const std::vector<double> ref = test::randn<double>(g, static_cast<size_t>(2 * P), 2.0);
    std::vector<PairInput> pairs(static_cast<size_t>(P));
    Tensor ref_t = Tensor::host({2 * P}, DType::F64), off_t = Tensor::host({P}, DType::F64);
    for (int64_t q = 0; q < P; ++q) {
      PairInput& x = pairs[static_cast<size_t>(q)];
      x.ref_chosen = ref[q];
      x.ref_rejected = ref[P + q];
      int64_t lc_n = 0, lr_n = 0;
      for (int64_t t = 0; t < T; ++t) {
        lc_n += in.weights.data<double>()[q * T + t] != 0;
        lr_n += in.weights.data<double>()[(P + q) * T + t] != 0;
      }
      x.len_chosen = lc_n;
      x.len_rejected = lr_n;
      x.has_scores = true;
      x.score_rejected = 0.5;
      x.score_chosen = 0.5 + 0.3 * static_cast<double>(q + 1);
      ref_t.data<double>()[q] = ref[q];
      ref_t.data<double>()[P + q] = ref[P + q];
      off_t.data<double>()[q] = pair_loss_input(lc, x).offset;
    }
    const double normalizer = 2 * P + 1;

    m.zero_grad();
    std::vector<double> host_stats;
    GPT2::LossHead host;
    host.pair_stride = P;
    host.grad = [&](int64_t q0, int64_t q1, const std::vector<double>& lp, std::vector<double>& d) {
      pair_chunk_grads(lc, pairs, q0, q1, lp, normalizer, d);
    };
    const std::vector<double> lp = m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, host, &host_stats);
    m.fused_backward();
    const std::vector<double> g_host = vec(m.grads());
    for (int64_t q = 0; q < P; ++q) {
      pairs[static_cast<size_t>(q)].policy_chosen = lp[q];
      pairs[static_cast<size_t>(q)].policy_rejected = lp[P + q];
    }
    const BatchLoss bl = batch_loss(lc, pairs, normalizer);

    GPT2::PairLossHead dev;
    dev.ref_logp = ref_t;
    dev.offset = off_t;
    dev.params = pair_loss_params(lc);
    dev.normalizer = normalizer;
    dev.sums = Tensor::host({kPairSumsWidth}, DType::F64);
    dev.stats = Tensor::host({2 * P, kSeqStatsWidth}, DType::F64);
    dev.pair_loss = Tensor::host({P}, DType::F64);
    for (const Tensor* t : {&dev.sums, &dev.stats, &dev.pair_loss})
      std::fill(t->data<double>(), t->data<double>() + t->numel(), std::numeric_limits<double>::quiet_NaN());
    std::fill(m.grads().data<double>(), m.grads().data<double>() + m.grads().numel(),
              std::numeric_limits<double>::quiet_NaN());
    m.zero_grad();
    m.fused_forward_pairs(in.tokens, in.keymask, in.targets, in.weights, dev);
    m.fused_backward();
    const std::vector<double> g_dev = vec(m.grads());

    ASSERT_EQ(g_dev.size(), g_host.size());
    for (size_t i = 0; i < g_dev.size(); ++i) ASSERT_EQ(g_dev[i], g_host[i]) << "gradient element " << i;
    EXPECT_EQ(vec(dev.stats), host_stats);
    const double* s = dev.sums.data<double>();
    EXPECT_EQ(s[kSumLoss], bl.loss_sum);
    EXPECT_EQ(s[kSumRewardChosen], bl.reward_chosen_sum);
    EXPECT_EQ(s[kSumRewardRejected], bl.reward_rejected_sum);
    EXPECT_EQ(s[kSumAccuracy], bl.accuracy_sum);
    EXPECT_EQ(s[kSumMargin], bl.margin_sum);
    EXPECT_EQ(s[kSumLogpChosen], bl.logps_chosen_sum);
    EXPECT_EQ(s[kSumLogpRejected], bl.logps_rejected_sum);
    for (size_t t = 0; t < lc.terms.size(); ++t) EXPECT_EQ(s[kSumTerm + t], bl.term_loss_sum[t]) << t;
    double tok_c = 0, tok_r = 0, lg_c = 0, lg_r = 0;
    for (int64_t q = 0; q < P; ++q) {
      tok_c += host_stats[q * kSeqStatsWidth + kSeqTokens];
      tok_r += host_stats[(P + q) * kSeqStatsWidth + kSeqTokens];
      lg_c += host_stats[q * kSeqStatsWidth + kSeqLogitSum];
      lg_r += host_stats[(P + q) * kSeqStatsWidth + kSeqLogitSum];
      EXPECT_EQ(dev.pair_loss.data<double>()[q], pair_loss(lc, pairs[static_cast<size_t>(q)]).loss) << q;
    }
    EXPECT_EQ(s[kSumTokensChosen], tok_c);
    EXPECT_EQ(s[kSumTokensRejected], tok_r);
    EXPECT_EQ(s[kSumLogitChosen], lg_c);
    EXPECT_EQ(s[kSumLogitRejected], lg_r);
    EXPECT_GT(tok_c, 0);
  }
}

TEST(Gpt2ChunkedHead, ScoreMatchesSequenceLogprobsAndKeepsNoBatchLogits) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  const int64_t T = 8, rows = 2 * T + 1;
  for (int64_t B : {1, 4, 16}) {
    GPT2 m(*be, cfg, DType::F64);
    randomize(m, g, 0.3);
    m.set_logits_chunk_rows(rows);
    m.set_head_rows(HeadRows::All);
    Inputs in = make_inputs(g, cfg, B, T);
    Tensor chunked = Tensor::host({B}, DType::F64), full = Tensor::host({B}, DType::F64);
    std::vector<double> poison(static_cast<size_t>(B));
    test::poison(poison);
    std::copy(poison.begin(), poison.end(), chunked.data<double>());
    m.score(in.tokens, in.keymask, in.targets, in.weights, chunked);
    // Two sequences per chunk: the buffer holds 2T rows, however many sequences the batch has. Rows are padded
    // to 64 elements (V = 11: ldv = 64).
    ASSERT_EQ(m.logits_stride(), 64);
    EXPECT_EQ(m.logits_buffer_numel(), std::min<int64_t>(B, 2) * T * 64) << "B=" << B;
    m.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, full);
    EXPECT_LT(test::max_rel_err(vec(chunked), vec(full)), 1e-13) << "B=" << B;
    // The unfused path does hold the batch's logits.
    EXPECT_EQ(m.logits_buffer_numel(), (std::min<int64_t>(B, 2) + B) * T * 64);
  }
  // Scored slots: sequence b has 5 - b % 3 of them (make_padded_batch, T = 8), chunks of whole sequences up to 17
  // rows: B = 1 -> {5}; B = 4 -> {5 4 3 5} (17); B = 16 -> 17 rows first, then fewer. The buffer holds the largest
  // chunk's scored rows, never more than `rows`.
  for (const auto& [B, want_rows] : {std::pair<int64_t, int64_t>{1, 5}, {4, 17}, {16, 17}}) {
    GPT2 m(*be, cfg, DType::F64);
    randomize(m, g, 0.3);
    m.set_logits_chunk_rows(rows);
    Inputs in = make_inputs(g, cfg, B, T);
    Tensor chunked = Tensor::host({B}, DType::F64), full = Tensor::host({B}, DType::F64);
    std::vector<double> poison(static_cast<size_t>(B));
    test::poison(poison);
    std::copy(poison.begin(), poison.end(), chunked.data<double>());
    m.score(in.tokens, in.keymask, in.targets, in.weights, chunked);
    EXPECT_EQ(m.logits_buffer_numel(), want_rows * 64) << "B=" << B;
    m.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, full);
    EXPECT_LT(test::max_rel_err(vec(chunked), vec(full)), 1e-13) << "B=" << B;
  }
}

TEST(Gpt2ChunkedHead, FusedBufferIsOnePairWhenChunkRowsIsSmall) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  const int64_t T = 5;
  for (HeadRows hr : {HeadRows::All, HeadRows::Scored})
    for (int64_t P : {1, 6}) {
      GPT2 m(*be, cfg, DType::F64);
      randomize(m, g, 0.3);
      m.set_logits_chunk_rows(1);
      m.set_head_rows(hr);
      Inputs in = make_inputs(g, cfg, 2 * P, T);
      PairLoss L;
      L.P = P;
      L.ref.assign(static_cast<size_t>(2 * P), 0.0);
      m.zero_grad();
      m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, pair_head(L));
      m.fused_backward();
      // Scored slots: sequence b scores 2 - b % 3 slots at T = 5 (2, 1, 0, ...): the largest pair (q, q + P) has
      // 2 + 1 = 3 of them with P = 1 and 2 + 2 = 4 with P = 6 (where pair 2 scores none: a chunk without rows).
      const int64_t rows = hr == HeadRows::All ? 2 * T : (P == 1 ? 3 : 4);
      EXPECT_EQ(m.logits_buffer_numel(), rows * m.logits_stride()) << "P=" << P;
    }
}

TEST(Gpt2ChunkedHead, AForgottenSequenceGetsNaNGradientsNotZero) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  Inputs in = make_inputs(g, cfg, 2, 6);
  GPT2::LossHead head;
  head.grad = [](int64_t u0, int64_t u1, const std::vector<double>&, std::vector<double>& d) {
    if (u0 == 0) d[0] = 1.0;  // sequence 1 is never set
  };
  m.set_logits_chunk_rows(1);
  m.zero_grad();
  m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, head);
  m.fused_backward();
  EXPECT_TRUE(std::isnan(m.grad("wte.weight").data<double>()[0]));
}

TEST(Gpt2ChunkedHead, GradReadyHookCoversEveryParameterOnceInBackwardOrder) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  GPT2Config cfg = tiny_config();
  cfg.n_layer = 3;
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  const auto buckets = m.grad_buckets();
  ASSERT_EQ(buckets.size(), static_cast<size_t>(cfg.n_layer + 2));
  // Tiling: sorted by offset they cover [0, n) without gaps or overlaps; the order is ln_f, layers high to low,
  // then the embeddings.
  auto sorted = buckets;
  std::sort(sorted.begin(), sorted.end());
  int64_t at = 0;
  for (const auto& [off, n] : sorted) {
    EXPECT_EQ(off, at);
    EXPECT_GT(n, 0);
    at = off + n;
  }
  EXPECT_EQ(at, m.params().numel());
  EXPECT_EQ(buckets.front().first, m.spec("ln_f.weight").offset);
  EXPECT_EQ(buckets[1].first, m.spec("h.2.ln_1.weight").offset);
  EXPECT_EQ(buckets.back().first, 0);
  // During a backward pass each range is final when the hook sees it: its gradient then equals the gradient at
  // the end of the pass (nothing is added to a range after its call).
  Inputs in = make_inputs(g, cfg, 4, 6);
  PairLoss L;
  L.P = 2;
  L.ref.assign(4, 0.0);
  for (int fused = 0; fused < 2; ++fused) {
    std::vector<std::pair<int64_t, int64_t>> seen;
    std::vector<std::vector<double>> at_call;
    m.set_grad_ready_hook([&](int64_t off, int64_t n) {
      seen.push_back({off, n});
      at_call.emplace_back(m.grads().data<double>() + off, m.grads().data<double>() + off + n);
    });
    m.zero_grad();
    if (fused) {
      m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, pair_head(L));
      m.fused_backward();
    } else {
      Tensor seq = Tensor::host({4}, DType::F64), d = Tensor::host({4}, DType::F64);
      m.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, seq);
      for (int i = 0; i < 4; ++i) d.data<double>()[i] = 0.3 * (i + 1);
      m.backward(d);
    }
    ASSERT_EQ(seen, buckets) << (fused ? "fused" : "unfused");
    for (size_t k = 0; k < seen.size(); ++k) {
      const auto [off, n] = seen[k];
      EXPECT_TRUE(test::bitwise_equal(at_call[k], std::vector<double>(m.grads().data<double>() + off,
                                                                      m.grads().data<double>() + off + n)))
          << "bucket " << k << " changed after its hook call";
    }
    m.set_grad_ready_hook({});
  }
}

TEST(Gpt2ChunkedHead, MisuseIsAnError) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  EXPECT_THROW(m.set_logits_chunk_rows(0), Error);
  EXPECT_THROW(m.fused_backward(), Error);
  Inputs in = make_inputs(g, cfg, 3, 6);
  GPT2::LossHead head;
  head.pair_stride = 2;  // 3 sequences cannot be 2 pairs
  head.grad = [](int64_t, int64_t, const std::vector<double>&, std::vector<double>&) {};
  EXPECT_THROW(m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, head), Error);
  GPT2::LossHead empty;
  EXPECT_THROW(m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, empty), Error);
  Tensor w32 = Tensor::host({3, 6}, DType::F32);
  Tensor seq = Tensor::host({3}, DType::F64);
  EXPECT_THROW(m.score(in.tokens, in.keymask, in.targets, w32, seq), Error);
  // score() leaves nothing for a backward pass.
  EXPECT_THROW(m.fused_backward(), Error);
}

}  // namespace
}  // namespace dpo
