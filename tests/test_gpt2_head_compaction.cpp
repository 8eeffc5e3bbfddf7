// The LM head over the scored slots only (HeadRows::Scored, model/gpt2.h) against the head over every slot
// (HeadRows::All, itself checked against the unfused path and finite differences in test_gpt2_chunked_head), in
// double on the CPU, for padded batches (the host-callback head fused_forward, the device-loss head
// fused_forward_pairs, score) and for packed and prefix_shared batches, at several chunk sizes.
//
// Budgets. Per-sequence log-probs and statistics are the same double sums over the same rows in the same order
// (the left-out rows have weight 0 and add exact zeros), and each scored row's logits are the same dot products;
// they would be bitwise equal if the GEMM's per-row results did not depend on which other rows share the call
// (BLAS kernels may pick other code paths for other row counts), so the check is 1e-13 relative, a few hundred
// ulps of double. Gradients: d wte = sum over rows of dlogits^T ln_f sums fewer (zero) rows and in other chunk
// groups, and every parameter's gradient flows through it and through d(ln_f output), so round-off differs: 1e-13
// relative to the largest gradient (the chunked head's own budget against the unfused path). A wrong index, range
// or scatter changes a log-prob or a gradient at O(1) relative.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"

namespace dpo {
namespace {

constexpr double kTol = 1e-13;

GPT2Config tiny_config() {
  GPT2Config c;
  c.vocab_size = 29;  // not a multiple of anything
  c.max_seq_len = 32;
  c.n_embd = 16;
  c.n_head = 2;
  c.n_layer = 2;
  return c;
}

std::vector<double> vec(const Tensor& t) {
  return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
}

void poison(const Tensor& t) {
  std::fill(t.data<double>(), t.data<double>() + t.numel(), std::numeric_limits<double>::quiet_NaN());
}

// The pass of the host-callback head: a pair loss (softplus of the reference-free margin) or, without pairs, fixed
// random per-sequence gradients. Returns log-probs, statistics and gradients.
struct Out {
  std::vector<double> lp, stats, grads;
};
Out host_head_pass(GPT2& m, const test::PaddedBatch& in, int64_t pair_stride, const std::vector<double>& dsingle) {
  GPT2::LossHead head;
  head.pair_stride = pair_stride;
  head.grad = [&](int64_t u0, int64_t u1, const std::vector<double>& lp, std::vector<double>& d) {
    for (int64_t u = u0; u < u1; ++u) {
      if (pair_stride == 0) {
        d[u] = dsingle[u];
        continue;
      }
      const double z = 0.7 * (lp[u] - lp[u + pair_stride]);
      const double s = -0.7 / (1.0 + std::exp(z));
      d[u] = s;
      d[u + pair_stride] = -s;
    }
  };
  poison(m.grads());
  m.zero_grad();
  Out o;
  o.lp = m.fused_forward(in.tokens, in.keymask, in.targets, in.weights, head, &o.stats);
  m.fused_backward();
  o.grads = vec(m.grads());
  return o;
}

void expect_same(const Out& got, const Out& want) {
  EXPECT_LT(test::max_rel_err(got.lp, want.lp), kTol);
  EXPECT_LT(test::max_rel_err(got.stats, want.stats), kTol);
  EXPECT_LT(test::max_rel_err(got.grads, want.grads), kTol);
  double norm = 0;
  for (double v : want.grads) norm += v * v;
  EXPECT_GT(norm, 1e-6);
}

TEST(Gpt2HeadCompaction, PaddedHostCallbackHeadMatchesAllSlots) {
  const GPT2Config cfg = tiny_config();
  auto be = make_cpu_backend();
  for (int64_t pair_stride : {int64_t{5}, int64_t{0}}) {
    const int64_t B = pair_stride > 0 ? 2 * pair_stride : 7, T = 9;
    std::mt19937_64 g(test::test_seed() + static_cast<uint64_t>(pair_stride));
    GPT2 m(*be, cfg, DType::F64);
    test::randomize_f64(m, g, 0.3);
    const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, B, T);
    const std::vector<double> dsingle = test::randn<double>(g, static_cast<size_t>(B), 1.0);
    for (int64_t chunk_rows : {int64_t{1}, int64_t{13}, int64_t{1} << 20}) {
      SCOPED_TRACE("pair_stride " + std::to_string(pair_stride) + ", chunk rows " + std::to_string(chunk_rows));
      m.set_logits_chunk_rows(chunk_rows);
      m.set_head_rows(HeadRows::All);
      const Out want = host_head_pass(m, in, pair_stride, dsingle);
      m.set_head_rows(HeadRows::Scored);
      const Out got = host_head_pass(m, in, pair_stride, dsingle);
      expect_same(got, want);
      // The scored head's logits buffer holds at most max(chunk_rows, one unit's scored rows) rows, fewer than
      // the all-slot head's whole units of T rows.
      const int64_t unit = (pair_stride > 0 ? 2 : 1) * T;
      EXPECT_LE(m.logits_buffer_numel(), std::max(chunk_rows, unit) * m.logits_stride());
    }
  }
}

// Sequences without a scored slot (make_padded_batch at T = 5 scores 2 - b % 3 slots: none in rows 2 and 5, so
// pair 2 of 3 has none at all and, one pair per chunk, its chunk has no rows): log-prob and statistics 0, no
// gradient from them, the others unchanged.
TEST(Gpt2HeadCompaction, SequencesAndChunksWithoutScoredSlots) {
  const GPT2Config cfg = tiny_config();
  auto be = make_cpu_backend();
  std::mt19937_64 g(test::test_seed());
  GPT2 m(*be, cfg, DType::F64);
  test::randomize_f64(m, g, 0.3);
  const int64_t P = 3, T = 5;
  const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 2 * P, T);
  for (int64_t chunk_rows : {int64_t{1}, int64_t{1} << 20}) {
    SCOPED_TRACE("chunk rows " + std::to_string(chunk_rows));
    m.set_logits_chunk_rows(chunk_rows);
    m.set_head_rows(HeadRows::All);
    const Out want = host_head_pass(m, in, P, {});
    m.set_head_rows(HeadRows::Scored);
    const Out got = host_head_pass(m, in, P, {});
    expect_same(got, want);
    for (int64_t s : {2, 5}) {
      EXPECT_EQ(got.lp[static_cast<size_t>(s)], 0.0);
      for (int64_t k = 0; k < kSeqStatsWidth; ++k)
        EXPECT_EQ(got.stats[static_cast<size_t>(s * kSeqStatsWidth + k)], 0.0) << "sequence " << s << " col " << k;
    }
  }
}

TEST(Gpt2HeadCompaction, PaddedDeviceLossHeadAndScoreMatchAllSlots) {
  const GPT2Config cfg = tiny_config();
  auto be = make_cpu_backend();
  std::mt19937_64 g(test::test_seed());
  GPT2 m(*be, cfg, DType::F64);
  test::randomize_f64(m, g, 0.3);
  const int64_t P = 4, T = 11;
  const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 2 * P, T);
  LossConfig lc;
  lc.beta = 0.3;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}, {LossType::Sft, 0.3}};
  Tensor ref = Tensor::host({2 * P}, DType::F64);
  const std::vector<double> r = test::randn<double>(g, static_cast<size_t>(2 * P), 2.0);
  std::copy(r.begin(), r.end(), ref.data<double>());
  struct DevOut {
    std::vector<double> stats, sums, pair_loss, grads, score_lp, score_stats;
  };
  auto run = [&](HeadRows hr, int64_t chunk_rows) {
    m.set_head_rows(hr);
    m.set_logits_chunk_rows(chunk_rows);
    GPT2::PairLossHead head;
    head.ref_logp = ref;
    head.params = pair_loss_params(lc);
    head.normalizer = 2.0 * P + 1;
    head.sums = Tensor::host({kPairSumsWidth}, DType::F64);
    head.stats = Tensor::host({2 * P, kSeqStatsWidth}, DType::F64);
    head.pair_loss = Tensor::host({P}, DType::F64);
    // The weights passed as host data explicitly (what the trainer does for a device batch).
    head.host_weights = Tensor::host({2 * P, T}, DType::F64);
    std::copy(in.weights.data<double>(), in.weights.data<double>() + in.weights.numel(),
              head.host_weights.data<double>());
    for (const Tensor* t : {&head.sums, &head.stats, &head.pair_loss}) poison(*t);
    poison(m.grads());
    m.zero_grad();
    m.fused_forward_pairs(in.tokens, in.keymask, in.targets, in.weights, head);
    m.fused_backward();
    DevOut o{vec(head.stats), vec(head.sums), vec(head.pair_loss), vec(m.grads()), {}, {}};
    Tensor seq = Tensor::host({2 * P}, DType::F64), st = Tensor::host({2 * P, kSeqStatsWidth}, DType::F64);
    poison(seq);
    poison(st);
    m.score(in.tokens, in.keymask, in.targets, in.weights, seq, st);
    o.score_lp = vec(seq);
    o.score_stats = vec(st);
    return o;
  };
  for (int64_t chunk_rows : {int64_t{1}, int64_t{17}, int64_t{1} << 20}) {
    SCOPED_TRACE("chunk rows " + std::to_string(chunk_rows));
    const DevOut want = run(HeadRows::All, chunk_rows), got = run(HeadRows::Scored, chunk_rows);
    EXPECT_LT(test::max_rel_err(got.stats, want.stats), kTol);
    EXPECT_LT(test::max_rel_err(got.sums, want.sums), kTol);
    EXPECT_LT(test::max_rel_err(got.pair_loss, want.pair_loss), kTol);
    EXPECT_LT(test::max_rel_err(got.grads, want.grads), kTol);
    EXPECT_LT(test::max_rel_err(got.score_lp, want.score_lp), kTol);
    EXPECT_LT(test::max_rel_err(got.score_stats, want.score_stats), kTol);
    EXPECT_GT(want.sums[kSumTokensChosen], 0);
  }
}

// Packed and prefix_shared batches (chunks of whole rows, sequences interleaved) and their padded form: the
// device-loss head's statistics, sums and gradients, and score's log-probs, scored slots against all slots.
TEST(Gpt2HeadCompaction, LayoutBatchesMatchAllSlots) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  test::randomize_f64(m, g, 0.3);
  const std::vector<PreferencePair> data = test::random_pairs(g, 9, static_cast<int32_t>(cfg.vocab_size));
  const std::vector<int64_t> idx = {3, 0, 8, 1, 5, 2, 7, 4, 6};
  LossConfig lc;
  lc.beta = 0.3;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}, {LossType::Sft, 0.3}};
  auto run = [&](const Batch& b, HeadRows hr) {
    m.set_head_rows(hr);
    const int64_t P = b.pairs;
    GPT2::PairLossHead head;
    head.ref_logp = Tensor::host({2 * P}, DType::F64);
    for (int64_t i = 0; i < 2 * P; ++i) head.ref_logp.data<double>()[i] = -10.0 - 0.5 * static_cast<double>(i);
    head.params = pair_loss_params(lc);
    head.normalizer = 2.0 * P + 1;
    head.sums = Tensor::host({kPairSumsWidth}, DType::F64);
    head.stats = Tensor::host({2 * P, kSeqStatsWidth}, DType::F64);
    poison(head.sums);
    poison(head.stats);
    const LayoutScope scope(m, b);
    poison(m.grads());
    m.zero_grad();
    m.fused_forward_pairs(b.tokens, b.keymask, b.targets, b.weights, head);
    m.fused_backward();
    Out o{{}, vec(head.stats), vec(m.grads())};
    o.lp = vec(head.sums);
    Tensor seq = Tensor::host({2 * P}, DType::F64);
    poison(seq);
    m.score(b.tokens, b.keymask, b.targets, b.weights, seq);
    const std::vector<double> lp = vec(seq);
    o.lp.insert(o.lp.end(), lp.begin(), lp.end());  // the sums, then score's log-probs
    return o;
  };
  for (BatchLayout layout : {BatchLayout::Padded, BatchLayout::Packed, BatchLayout::PrefixShared})
    for (int64_t cap : {int64_t{1}, int64_t{40}, int64_t{1000}})
      for (int64_t chunk_rows : {int64_t{1}, int64_t{7}, int64_t{1} << 20}) {
        if (layout == BatchLayout::Padded && cap != 1) continue;
        SCOPED_TRACE(std::string(batch_layout_name(layout)) + ", max_tokens_per_row " + std::to_string(cap) +
                     ", chunk rows " + std::to_string(chunk_rows));
        m.set_logits_chunk_rows(chunk_rows);
        const Batch b = make_layout_batch(data, idx, layout, cap, DType::F64, 0);
        const Out want = run(b, HeadRows::All), got = run(b, HeadRows::Scored);
        expect_same(got, want);
      }
}

TEST(Gpt2HeadCompaction, BadHostWeightsAreAnError) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  test::randomize_f64(m, g, 0.3);
  const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 2, 6);
  Tensor seq = Tensor::host({2}, DType::F64);
  const Tensor short_rows = Tensor::host({2, 5}, DType::F64), ids = Tensor::host({2, 6}, DType::I32);
  EXPECT_THROW(m.score(in.tokens, in.keymask, in.targets, in.weights, seq, Tensor(), short_rows), Error);
  EXPECT_THROW(m.score(in.tokens, in.keymask, in.targets, in.weights, seq, Tensor(), ids), Error);
  m.set_head_rows(HeadRows::All);  // the all-slot head reads no host weights
  EXPECT_NO_THROW(m.score(in.tokens, in.keymask, in.targets, in.weights, seq, Tensor(), short_rows));
}

}  // namespace
}  // namespace dpo
