// Batch layouts (kernels/batch_layout.h, train/data.h make_layout_batch, GPT2::set_layout): the builder's rows,
// positions, spans and sequence ranges on a hand-checked example; then the equivalence that makes the layouts
// safe to use: packed and prefix_shared batches give the padded batch's per-sequence log-probs, statistics, loss
// sums and parameter gradients (double: <= 1e-12 relative; float: a justified budget), with random pairs of varied
// lengths, a loss mix reading every input (ODPO offsets, the SFT term, IPO's lengths) and several row capacities;
// and the trainer: a run in each layout reaches the padded run's losses (float), with cached and live references
// and gradient accumulation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"
#include "train/trainer.h"

namespace dpo {
namespace {

PreferencePair pair_of(std::vector<int32_t> p, std::vector<int32_t> c, std::vector<int32_t> r) {
  PreferencePair x;
  x.prompt = std::move(p);
  x.chosen = std::move(c);
  x.rejected = std::move(r);
  return x;
}

const int32_t* span_at(const Batch& b, int64_t row, int64_t t) {
  return b.span.data<int32_t>() + (row * b.T + t) * kSpanWidth;
}

// prefix_shared, one pair, prompt {1,2,3}, chosen {4,5}, rejected {6,7,8}: the row is
//   slot:   0 1 2 | 3 4 | 5   | 6 7 8
//   token:  1 2 3 | 4 5 | 3   | 6 7 8
//   pos:    0 1 2 | 3 4 | 2   | 3 4 5
// chosen scored at slots [2, 4) (slot 2 predicts 4, slot 3 predicts 5); rejected at [5, 8) (the dup slot 5 predicts
// 6); the dup and the rejected slots hide [2, 5).
TEST(BatchLayout, PrefixSharedRowByHand) {
  const std::vector<PreferencePair> data = {pair_of({1, 2, 3}, {4, 5}, {6, 7, 8})};
  const Batch b = make_layout_batch(data, {0}, BatchLayout::PrefixShared, 100, DType::F64, 0);
  ASSERT_EQ(b.T, 9);
  ASSERT_EQ(b.tokens.size(0), 1);
  const std::vector<int32_t> tok(b.tokens.data<int32_t>(), b.tokens.data<int32_t>() + 9);
  const std::vector<int32_t> pos(b.pos.data<int32_t>(), b.pos.data<int32_t>() + 9);
  const std::vector<int32_t> tg(b.targets.data<int32_t>(), b.targets.data<int32_t>() + 9);
  EXPECT_EQ(tok, (std::vector<int32_t>{1, 2, 3, 4, 5, 3, 6, 7, 8}));
  EXPECT_EQ(pos, (std::vector<int32_t>{0, 1, 2, 3, 4, 2, 3, 4, 5}));
  EXPECT_EQ(tg, (std::vector<int32_t>{-1, -1, 4, 5, -1, 6, 7, 8, -1}));
  EXPECT_EQ(b.seg, (std::vector<int64_t>{2, 4, 5, 8}));
  EXPECT_EQ(b.completion_len, (std::vector<int64_t>{2, 3}));
  for (int64_t t = 0; t < 5; ++t) {  // prompt and chosen: causal from the segment start, no hole
    EXPECT_TRUE(span_sees(span_at(b, 0, t), t, 0));
    EXPECT_EQ(span_at(b, 0, t)[kSpanHoleLo], span_at(b, 0, t)[kSpanHoleHi]);
  }
  for (int64_t t = 5; t < 9; ++t) {  // dup and rejected: the prompt's first two slots, then 5.. t
    const int32_t* sp = span_at(b, 0, t);
    std::vector<int64_t> seen;
    for (int64_t k = 0; k <= t; ++k)
      if (span_sees(sp, t, k)) seen.push_back(k);
    std::vector<int64_t> want = {0, 1};
    for (int64_t k = 5; k <= t; ++k) want.push_back(k);
    EXPECT_EQ(seen, want) << "slot " << t;
  }
  EXPECT_EQ(b.tokens_total, 2 * 3 + 2 + 3);
  EXPECT_EQ(b.slots_used, 9);
}

// packed: first fit in index order, whole pairs, renumbered in row order; a pair longer than a row gets its own.
TEST(BatchLayout, PackedFirstFitAndRenumbering) {
  const std::vector<PreferencePair> data = {
      pair_of({1, 2}, {3}, {4, 5}),              // unit 2+1 + 2+2 = 7
      pair_of({1, 2, 3, 4}, {5, 6, 7}, {8, 9}),  // 7 + 6 = 13 > 12: a row of its own
      pair_of({1}, {2}, {3}),                    // 4
  };
  const Batch b = make_layout_batch(data, {0, 1, 2}, BatchLayout::Packed, 12, DType::F32, 0);
  // Row 0: pairs 0 and 2 (7 + 4 = 11 <= 12); row 1: pair 1 (13).
  EXPECT_EQ(b.row_pairs, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(b.indices, (std::vector<int64_t>{0, 2, 1}));
  EXPECT_EQ(b.T, 13);
  // Batch pair 1 is record 2: chosen (sequence 2) [1 | 2] at slots 7, 8 of row 0, scored at slot 7 (predicts 2).
  EXPECT_EQ(b.seg[2 * 2], 7);
  EXPECT_EQ(b.seg[2 * 2 + 1], 8);
  EXPECT_EQ(b.pos.data<int32_t>()[7], 0);
  EXPECT_EQ(b.pos.data<int32_t>()[8], 1);
  EXPECT_EQ(span_at(b, 0, 8)[kSpanLo], 7);
  // Its rejected (sequence 3) [1 | 3] at slots 9, 10, scored at slot 9; the ranges are sorted by slot.
  EXPECT_EQ(b.seg[2 * 3], 9);
  EXPECT_TRUE(std::is_sorted(b.seg.begin(), b.seg.end()));
  EXPECT_EQ(b.targets.data<int32_t>()[9], 3);
  // Padding after row 0's 11 slots: sees itself, never scored.
  EXPECT_EQ(span_at(b, 0, 12)[kSpanLo], 12);
  EXPECT_EQ(b.targets.data<int32_t>()[12], -1);
  EXPECT_EQ(b.slots_used, 11 + 13);
  EXPECT_EQ(b.tokens_total, 7 + 13 + 4);
}

GPT2Config tiny_config() {
  GPT2Config c;
  c.vocab_size = 29;
  c.max_seq_len = 32;
  c.n_embd = 16;
  c.n_head = 2;
  c.n_layer = 2;
  return c;
}

struct StepOut {
  std::vector<double> stats, sums, grads;
};

// One training pass of `m` over batch b with the loss on the device, references `ref` (host, by record index).
StepOut run_pairs(GPT2& m, const Batch& b, const LossConfig& lc, const std::vector<double>& ref_c,
                  const std::vector<double>& ref_r) {
  Backend& be = m.backend();
  const DType gd = grad_dtype(m.dtype());
  const int64_t P = b.pairs;
  Tensor ref = Tensor::host({2 * P}, DType::F64), off = Tensor::host({P}, DType::F64);
  const PairRows rows = b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
  for (int64_t q = 0; q < P; ++q) {
    const auto i = static_cast<size_t>(b.indices[static_cast<size_t>(q)]);
    ref.data<double>()[pair_row(rows, P, q, 0)] = ref_c[i];
    ref.data<double>()[pair_row(rows, P, q, 1)] = ref_r[i];
    off.data<double>()[q] = odpo_offset(lc.odpo_alpha, b.score_chosen[static_cast<size_t>(q)],
                                        b.score_rejected[static_cast<size_t>(q)]);
  }
  auto put = [&](const Tensor& h, DType dt) {
    Tensor t = be.empty(h.shape(), dt);
    be.copy_from_host(t, h);
    return t;
  };
  GPT2::PairLossHead head;
  head.ref_logp = put(ref, gd);
  head.offset = put(off, gd);
  head.params = pair_loss_params(lc);
  head.normalizer = 2.0 * static_cast<double>(P) + 1;
  head.sums = be.empty({kPairSumsWidth}, DType::F64);
  head.stats = be.empty({2 * P, kSeqStatsWidth}, gd);
  const LayoutScope scope(m, b);
  m.zero_grad();
  m.fused_forward_pairs(put(b.tokens, DType::I32), put(b.keymask, DType::I32), put(b.targets, DType::I32),
                        put(b.weights, gd), head);
  m.fused_backward();
  return {to_host_f64(be, head.stats), to_host_f64(be, head.sums), to_host_f64(be, m.grads())};
}

// In double on the CPU, every layout against padded, for row capacities that make one row per pair, several pairs
// per row, and rows split into several logits chunks.
TEST(BatchLayout, PackedAndPrefixSharedEqualPaddedInDouble) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  test::randomize_f64(m, g, 0.3);
  const std::vector<PreferencePair> data = test::random_pairs(g, 9, cfg.vocab_size);
  std::vector<double> ref_c(data.size()), ref_r(data.size());
  for (size_t i = 0; i < data.size(); ++i) ref_c[i] = -20.0 - static_cast<double>(i), ref_r[i] = -18.0 + 0.5 * i;
  LossConfig lc;
  lc.beta = 0.3;
  lc.odpo_alpha = 0.5;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}, {LossType::Sft, 0.3}};
  const std::vector<int64_t> idx = {3, 0, 8, 1, 5, 2, 7, 4, 6};
  m.set_logits_chunk_rows(1 << 20);
  const Batch pb = make_batch(data, idx, DType::F64, 0);
  const StepOut want = run_pairs(m, pb, lc, ref_c, ref_r);
  double norm = 0;
  for (double v : want.grads) norm += v * v;
  ASSERT_GT(norm, 1e-6);
  for (BatchLayout layout : {BatchLayout::Packed, BatchLayout::PrefixShared})
    for (int64_t cap : {int64_t{1}, int64_t{40}, int64_t{1000}})
      for (int64_t chunk_rows : {int64_t{1}, int64_t{1} << 20}) {
        SCOPED_TRACE(std::string(batch_layout_name(layout)) + ", max_tokens_per_row " + std::to_string(cap) +
                     ", chunk rows " + std::to_string(chunk_rows));
        m.set_logits_chunk_rows(chunk_rows);
        const Batch b = make_layout_batch(data, idx, layout, cap, DType::F64, 0);
        const StepOut got = run_pairs(m, b, lc, ref_c, ref_r);
        // The layout batch's pairs are in its own order: map each sequence's statistics back by record.
        for (int64_t q = 0; q < b.pairs; ++q) {
          const auto rec = b.indices[static_cast<size_t>(q)];
          const auto pq = static_cast<int64_t>(std::find(idx.begin(), idx.end(), rec) - idx.begin());
          for (int64_t side = 0; side < 2; ++side)
            for (int64_t k = 0; k < kSeqStatsWidth; ++k) {
              const double a = got.stats[static_cast<size_t>((2 * q + side) * kSeqStatsWidth + k)];
              const double w = want.stats[static_cast<size_t>((side * b.pairs + pq) * kSeqStatsWidth + k)];
              EXPECT_NEAR(a, w, 1e-12 * std::max(1.0, std::fabs(w)))
                  << "pair " << q << " side " << side << " col " << k;
            }
        }
        for (int k = 0; k < kPairSumsWidth; ++k)  // sums over the same pairs in another order: round-off only
          EXPECT_NEAR(got.sums[static_cast<size_t>(k)], want.sums[static_cast<size_t>(k)],
                      1e-12 * std::max(1.0, std::fabs(want.sums[static_cast<size_t>(k)])))
              << "PairSum column " << k;
        EXPECT_LT(test::max_rel_err(got.grads, want.grads), 1e-12);
      }
}

// The trainer in float: each layout's run reaches the padded run's losses and weights. The layouts change only
// the float summation orders (attention over other key positions, the LM-head chunks, the pair order of the
// sums), each a few ulps per step at this size; 6 steps of lr 1e-2 amplify them to ~1e-5 relative in the weights
// here, so 1e-4 (loss) and 1e-3 (weights, relative to their largest) leave a margin, while a wrong mask or
// position would move the loss at the first step by far more (a tiny model's log-probs change by O(1)).
TEST(BatchLayout, TrainingRunsMatchPadded) {
  test::ScratchDir w("dpo_layout_");
  test::write_tiny_fixture(w.dir.string(), 22);
  for (bool live : {false, true}) {
    TrainConfig base;
    base.model = w / "base";
    base.train_file = w / "pref.jsonl";
    base.ref_cache_dir = w / "cache";
    base.max_length = 32;
    base.learning_rate = 1e-2;
    base.per_device_train_batch_size = 4;
    base.gradient_accumulation_steps = 2;
    base.num_train_epochs = 2;
    base.logging_steps = 1;
    base.seed = 7;
    base.precompute_ref_log_probs = !live;
    base.out_dir = w / (live ? "padded_live" : "padded");
    RunOptions ro;
    ro.quiet = true;
    const RunSummary want = run_training(base, RunKind::Dpo, ro);
    for (const char* layout : {"packed", "prefix_shared"}) {
      SCOPED_TRACE(std::string(layout) + (live ? ", live reference" : ", cached reference"));
      TrainConfig c = base;
      c.batch_layout = layout;
      c.max_tokens_per_row = 40;
      c.out_dir = w / (std::string(layout) + (live ? "_live" : ""));
      const RunSummary got = run_training(c, RunKind::Dpo, ro);
      ASSERT_EQ(got.steps, want.steps);
      EXPECT_NEAR(got.last_log.at("loss"), want.last_log.at("loss"), 1e-4);
      EXPECT_NEAR(got.last_log.at("rewards/margins"), want.last_log.at("rewards/margins"), 1e-4);
      EXPECT_EQ(got.last_log.at("num_tokens"), want.last_log.at("num_tokens"));
    }
  }
}

// bf16 (the CPU's emulation: every op rounded to bf16): the layouts change which float sums precede each bf16
// rounding, so activations differ by about one bf16 ulp (2^-8 relative) between layouts. The DPO loss moves with
// beta times the log-prob margin: with summed log-probs of ~20 nats and a per-sequence budget of 2e-3 relative
// (tests/test_gpt2_bf16.cpp), the margin moves by ~0.08 and the loss by ~beta * 0.08 / 4 = 2e-3 at the first step;
// 1e-2 after 6 steps leaves a margin. A wrong span or position moves it by O(beta) = 0.1 at once.
TEST(BatchLayout, Bf16TrainingRunsMatchPadded) {
  test::ScratchDir w("dpo_layout_bf16_");
  test::write_tiny_fixture(w.dir.string(), 22);
  TrainConfig base;
  base.model = w / "base";
  base.train_file = w / "pref.jsonl";
  base.ref_cache_dir = w / "cache";
  base.precision = "bf16";
  base.max_length = 32;
  base.learning_rate = 1e-2;
  base.per_device_train_batch_size = 4;
  base.gradient_accumulation_steps = 2;
  base.num_train_epochs = 2;
  base.logging_steps = 1;
  base.seed = 7;
  base.out_dir = w / "padded";
  RunOptions ro;
  ro.quiet = true;
  const RunSummary want = run_training(base, RunKind::Dpo, ro);
  for (const char* layout : {"packed", "prefix_shared"}) {
    SCOPED_TRACE(layout);
    TrainConfig c = base;
    c.batch_layout = layout;
    c.out_dir = w / layout;
    const RunSummary got = run_training(c, RunKind::Dpo, ro);
    ASSERT_EQ(got.steps, want.steps);
    EXPECT_NEAR(got.last_log.at("loss"), want.last_log.at("loss"), 1e-2);
    EXPECT_NEAR(got.last_log.at("logps/chosen"), want.last_log.at("logps/chosen"),
                2e-3 * std::fabs(want.last_log.at("logps/chosen")) + 1e-2);
  }
}

}  // namespace
}  // namespace dpo
