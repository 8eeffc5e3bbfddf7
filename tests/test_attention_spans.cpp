// Attention under a batch layout's spans (kernels/batch_layout.h; contract in kernels/attention.h, "Attention under
// a batch layout's spans"): both CPU kernels (the reference, which saves the probabilities, and the blocked one,
// which saves the log-sum-exp) and the CPU backend's attention_forward_spans / attention_backward_spans.
//   - spans implied by a left/right-padding key mask give the key-mask form's results bitwise (real query slots);
//   - a packed row of three segments gives each segment's results as if it ran alone as its own row;
//   - a prefix_shared segment [prompt | chosen | dup | rejected]: chosen = [prompt | chosen] alone, rejected =
//     [prompt | rejected] alone, and the dup slot's output is the prompt's last output bitwise;
//   - finite differences in double through the forward, with holes;
//   - invalid spans are errors naming the row and slot, raised before anything is written;
//   - the blocked kernels' key tiles are exactly the tiles the spans reach (the work check).
// Inputs are seeded random values rounded to float (so float and double kernels read the same values); outputs are
// poisoned (NaN) before every "=" call; "+=" outputs start from random values. Sizes are not multiples of the
// blocked kernels' query block (32) or key tile (64), and one case uses GPT-2's head size (64).
//
// Why several checks are bitwise and not within a tolerance: each spans kernel runs its key-mask twin's arithmetic
// over the visible keys in ascending order, and every key it skips has probability exactly 0 in the other form
// (adding exact zeros changes no sum); a dot product is summed over channels in index order whatever tile or block
// holds it, and the backward's sums over queries run in ascending query order. A segment at offset a of a packed
// row therefore computes every value of the same segment alone at offset 0 with the same operations in the same
// order. (The build targets baseline x86-64 without -ffast-math, so the compiler may not reassociate these sums.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/batch_layout.h"
#include "runtime/backend.h"
#include "runtime/counting_backend.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace {

using namespace dpo::cpu;
using dpo::kSpanWidth;
using dpo::test::bitwise_equal;
using dpo::test::max_rel_err;
using dpo::test::numeric_grad;
using dpo::test::poison;
using dpo::test::randn;
using dpo::test::test_seed;
using dpo::test::ThreadCount;

enum class Kernel { Reference, Tiled };
const Kernel kKernels[] = {Kernel::Reference, Kernel::Tiled};
std::string kernel_name(Kernel k) { return k == Kernel::Reference ? "reference" : "tiled"; }

// Random values rounded to float, as T.
template <class T>
std::vector<T> randf(std::mt19937_64& g, size_t n) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(static_cast<float>(std::normal_distribution<double>(0.0, 1.0)(g)));
  return v;
}

// The shapes of one call.
struct Dims {
  int64_t B, T, C, NH;
  int64_t saved(Kernel k) const { return k == Kernel::Reference ? B * NH * T * T : B * NH * T; }
};

// What one forward + backward gives: out, the saved state (att or lse) and dqkv (started from dqkv0, +=).
template <class T>
struct Result {
  std::vector<T> out, saved, dqkv;
};

// The key-mask form (mask may be null) of kernel k.
template <class T>
Result<T> run_mask(Kernel k, const Dims& d, const std::vector<T>& qkv, const std::vector<T>& dout,
                   const std::vector<T>& dqkv0, const int32_t* mask) {
  Result<T> r{std::vector<T>(static_cast<size_t>(d.B * d.T * d.C)), std::vector<T>(static_cast<size_t>(d.saved(k))),
              dqkv0};
  poison(r.out), poison(r.saved);
  if (k == Kernel::Reference) {
    attention_forward(r.out.data(), r.saved.data(), qkv.data(), mask, d.B, d.T, d.C, d.NH);
    attention_backward(r.dqkv.data(), dout.data(), qkv.data(), r.saved.data(), d.B, d.T, d.C, d.NH);
  } else {
    attention_tiled_forward(r.out.data(), r.saved.data(), qkv.data(), mask, d.B, d.T, d.C, d.NH);
    attention_tiled_backward(r.dqkv.data(), dout.data(), qkv.data(), mask, r.saved.data(), d.B, d.T, d.C, d.NH);
  }
  return r;
}

// The spans form of kernel k.
template <class T>
Result<T> run_spans(Kernel k, const Dims& d, const std::vector<T>& qkv, const std::vector<T>& dout,
                    const std::vector<T>& dqkv0, const std::vector<int32_t>& span) {
  EXPECT_EQ(static_cast<int64_t>(span.size()), d.B * d.T * kSpanWidth);
  Result<T> r{std::vector<T>(static_cast<size_t>(d.B * d.T * d.C)), std::vector<T>(static_cast<size_t>(d.saved(k))),
              dqkv0};
  poison(r.out), poison(r.saved);
  if (k == Kernel::Reference) {
    attention_forward_spans(r.out.data(), r.saved.data(), qkv.data(), span.data(), d.B, d.T, d.C, d.NH);
    attention_backward_spans(r.dqkv.data(), dout.data(), qkv.data(), r.saved.data(), span.data(), d.B, d.T, d.C,
                             d.NH);
  } else {
    attention_tiled_forward_spans(r.out.data(), r.saved.data(), qkv.data(), span.data(), d.B, d.T, d.C, d.NH);
    attention_tiled_backward_spans(r.dqkv.data(), dout.data(), qkv.data(), span.data(), r.saved.data(), d.B, d.T,
                                   d.C, d.NH);
  }
  return r;
}

// --- span builders (kernels/batch_layout.h) ------------------------------------------------------------------------

void set_span(std::vector<int32_t>& span, int64_t slot, int64_t lo, int64_t hole_lo, int64_t hole_hi) {
  span[slot * kSpanWidth + dpo::kSpanLo] = static_cast<int32_t>(lo);
  span[slot * kSpanWidth + dpo::kSpanHoleLo] = static_cast<int32_t>(hole_lo);
  span[slot * kSpanWidth + dpo::kSpanHoleHi] = static_cast<int32_t>(hole_hi);
}

// Every slot padding: {t, t, t}.
std::vector<int32_t> padding_spans(int64_t B, int64_t T) {
  std::vector<int32_t> span(static_cast<size_t>(B * T * kSpanWidth));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) set_span(span, b * T + t, t, t, t);
  return span;
}

// The padded layout's spans for a key mask whose rows are left- or right-padded: real slot t: {first real slot, t,
// t}; padding: {t, t, t}.
std::vector<int32_t> spans_of_mask(const std::vector<int32_t>& mask, int64_t B, int64_t T) {
  auto span = padding_spans(B, T);
  for (int64_t b = 0; b < B; ++b) {
    int64_t first = 0;
    while (first < T && mask[b * T + first] == 0) ++first;
    for (int64_t t = first; t < T; ++t)
      if (mask[b * T + t] != 0) set_span(span, b * T + t, first, t, t);
  }
  return span;
}

// Row b of a packed batch: segments of the given lengths from slot `start` on, each attending causally within
// itself ({segment start, t, t}); the other slots keep their spans.
void pack_row(std::vector<int32_t>& span, int64_t T, int64_t b, int64_t start, const std::vector<int64_t>& lengths) {
  for (int64_t len : lengths) {
    for (int64_t t = start; t < start + len; ++t) set_span(span, b * T + t, start, t, t);
    start += len;
  }
  EXPECT_LE(start, T);
}

// One prefix_shared segment at slot a of row b: [prompt (P) | chosen (Ch) | dup | rejected (R)]. Prompt and chosen
// slots see [a, t]. The dup slot d = a + P + Ch sees the prompt without its last slot, then itself (its q, k, v are
// the prompt's last slot's): {a, a + P - 1, d}. A rejected slot sees the whole prompt and the rejected slots up to
// itself, the chosen and the dup being its hole: {a, a + P, d + 1}.
void prefix_shared_segment(std::vector<int32_t>& span, int64_t T, int64_t b, int64_t a, int64_t P, int64_t Ch,
                           int64_t R) {
  const int64_t d = a + P + Ch;
  for (int64_t t = a; t < d; ++t) set_span(span, b * T + t, a, t, t);
  set_span(span, b * T + d, a, a + P - 1, d);
  for (int64_t t = d + 1; t < d + 1 + R; ++t) set_span(span, b * T + t, a, a + P, d + 1);
  EXPECT_LE(d + 1 + R, T);
}

// --- slicing: slot ranges of a [B, T, W] array -------------------------------------------------------------------

// Slots [t0, t0 + n) of row b, W values each.
template <class T>
std::vector<T> slots(const std::vector<T>& v, int64_t T_, int64_t W, int64_t b, int64_t t0, int64_t n) {
  const auto first = v.begin() + (b * T_ + t0) * W;
  return {first, first + n * W};
}
template <class T>
void append(std::vector<T>& v, const std::vector<T>& w) {
  v.insert(v.end(), w.begin(), w.end());
}
// Query rows [t0, t0 + n) of row b of a saved log-sum-exp [B, NH, T], head by head.
template <class T>
std::vector<T> lse_rows(const std::vector<T>& lse, const Dims& d, int64_t b, int64_t t0, int64_t n) {
  std::vector<T> r;
  for (int64_t h = 0; h < d.NH; ++h) {
    const auto first = lse.begin() + ((b * d.NH + h) * d.T + t0);
    r.insert(r.end(), first, first + n);
  }
  return r;
}

// ============================================================================================== (a) key-mask spans

// Row 0 left-padded, row 1 right-padded, row 2 without padding, row 3 left-padded by more than a query block.
struct PadCase {
  Dims d;
  int64_t left, right, left2;
};
// T = 77: three query blocks, two key tiles, none full. T = 130 with hs = 64: past two key tiles.
const PadCase kPadCases[] = {{{4, 7, 12, 3}, 2, 1, 5}, {{4, 77, 128, 2}, 5, 9, 40}, {{4, 130, 192, 3}, 33, 40, 70}};

std::vector<int32_t> pad_mask(const PadCase& pc) {
  const int64_t T = pc.d.T;
  std::vector<int32_t> m(static_cast<size_t>(pc.d.B * T), 1);
  for (int64_t t = 0; t < pc.left; ++t) m[0 * T + t] = 0;
  for (int64_t t = T - pc.right; t < T; ++t) m[1 * T + t] = 0;
  for (int64_t t = 0; t < pc.left2; ++t) m[3 * T + t] = 0;
  return m;
}

// cpu::attention_keymask_spans (the library's form of spans_of_mask above, which the flash path of the CUDA backend
// mirrors on the device) writes exactly the spans this file's own construction gives, for every padding case, a
// row of padding only, and a null mask (every slot real: {0, t, t}).
TEST(AttentionSpans, KeymaskSpansAreThePaddedLayouts) {
  for (const PadCase& pc : kPadCases) {
    SCOPED_TRACE("T = " + std::to_string(pc.d.T));
    auto mask = pad_mask(pc);
    for (int64_t t = 0; t < pc.d.T; ++t) mask[2 * pc.d.T + t] = 0;  // row 2: padding only
    std::vector<int32_t> got(static_cast<size_t>(pc.d.B * pc.d.T * kSpanWidth), -7);
    attention_keymask_spans(got.data(), mask.data(), pc.d.B, pc.d.T);
    EXPECT_EQ(got, spans_of_mask(mask, pc.d.B, pc.d.T));
    std::fill(got.begin(), got.end(), -7);
    attention_keymask_spans(got.data(), nullptr, pc.d.B, pc.d.T);
    EXPECT_EQ(got, spans_of_mask(std::vector<int32_t>(mask.size(), 1), pc.d.B, pc.d.T));
  }
}

template <class T>
void mask_spans_case(Kernel k, const PadCase& pc) {
  const Dims& d = pc.d;
  SCOPED_TRACE(kernel_name(k) + " T=" + std::to_string(d.T) + " C=" + std::to_string(d.C));
  std::mt19937_64 g(test_seed());
  const auto mask = pad_mask(pc);
  const auto span = spans_of_mask(mask, d.B, d.T);
  const int64_t C3 = 3 * d.C, hs = d.C / d.NH;
  const auto qkv = randf<T>(g, d.B * d.T * C3), dqkv0 = randf<T>(g, d.B * d.T * C3);
  auto dout = randf<T>(g, d.B * d.T * d.C);
  for (int64_t i = 0; i < d.B * d.T; ++i)  // the model's loss gives padding slots no gradient
    if (mask[i] == 0) std::fill_n(dout.begin() + i * d.C, d.C, T(0));

  const auto m = run_mask(k, d, qkv, dout, dqkv0, mask.data());
  const auto s = run_spans(k, d, qkv, dout, dqkv0, span);
  // Real query slots: out and the saved row (att row or lse) bitwise.
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t) {
      if (mask[b * d.T + t] == 0) continue;
      ASSERT_TRUE(bitwise_equal(slots(s.out, d.T, d.C, b, t, 1), slots(m.out, d.T, d.C, b, t, 1)))
          << "out b=" << b << " t=" << t;
      for (int64_t h = 0; h < d.NH; ++h) {
        const int64_t row = (b * d.NH + h) * d.T + t;
        if (k == Kernel::Reference) {
          ASSERT_EQ(std::memcmp(&s.saved[row * d.T], &m.saved[row * d.T], d.T * sizeof(T)), 0)
              << "att b=" << b << " h=" << h << " t=" << t;
        } else {
          ASSERT_EQ(std::memcmp(&s.saved[row], &m.saved[row], sizeof(T)), 0) << "lse b=" << b << " h=" << h << " t=" << t;
        }
      }
    }
  // The whole gradient bitwise (dout is 0 at padding).
  EXPECT_TRUE(bitwise_equal(s.dqkv, m.dqkv)) << "dqkv";
  // Padding slots see only themselves: out = their own value, exactly (one probability of exp(0) = 1).
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t) {
      if (mask[b * d.T + t] != 0) continue;
      for (int64_t c = 0; c < d.C; ++c)
        ASSERT_EQ(s.out[(b * d.T + t) * d.C + c], qkv[(b * d.T + t) * C3 + 2 * d.C + c]) << "b=" << b << " t=" << t;
    }
  // Not vacuous: with a non-zero dout at right padding, the key-mask form sends gradient into the real keys and
  // values through the padding queries, and the spans form does not.
  auto dout2 = dout;
  for (int64_t i = 0; i < d.B * d.T; ++i)
    if (mask[i] == 0) std::fill_n(dout2.begin() + i * d.C, d.C, T(1));
  const auto m2 = run_mask(k, d, qkv, dout2, dqkv0, mask.data());
  const auto s2 = run_spans(k, d, qkv, dout2, dqkv0, span);
  const int64_t real_last = d.T - pc.right - 1;  // row 1's last real slot
  EXPECT_FALSE(bitwise_equal(slots(s2.dqkv, d.T, C3, 1, real_last, 1), slots(m2.dqkv, d.T, C3, 1, real_last, 1)));
  (void)hs;
}

TEST(AttentionSpans, MaskImpliedSpansAreBitwiseTheKeyMaskForm) {
  for (Kernel k : kKernels)
    for (const auto& pc : kPadCases) {
      mask_spans_case<double>(k, pc);
      mask_spans_case<float>(k, pc);
    }
}

// ============================================================================================== (b) packed row

// Row 0: segments of 100, 60 and 70 slots and 10 slots of padding (T = 240); row 1: one segment of 41 and padding.
// Each segment alone is run as its own row of its length in the key-mask form without a mask (plain causal
// attention), an oracle that shares no span code. Bitwise: see the top of the file. (The brief's budget for double,
// 1e-12 relative, and any float budget are implied.)
template <class T>
void packed_case(Kernel k) {
  SCOPED_TRACE(kernel_name(k));
  std::mt19937_64 g(test_seed());
  const Dims d{2, 240, 128, 2};
  const int64_t C3 = 3 * d.C;
  const std::vector<std::vector<int64_t>> segs = {{100, 60, 70}, {41}};
  auto span = padding_spans(d.B, d.T);
  for (int64_t b = 0; b < d.B; ++b) pack_row(span, d.T, b, 0, segs[b]);
  const auto qkv = randf<T>(g, d.B * d.T * C3), dout = randf<T>(g, d.B * d.T * d.C),
             dqkv0 = randf<T>(g, d.B * d.T * C3);
  const auto packed = run_spans(k, d, qkv, dout, dqkv0, span);
  for (int64_t b = 0; b < d.B; ++b) {
    int64_t a = 0;
    for (int64_t len : segs[b]) {
      SCOPED_TRACE("row " + std::to_string(b) + " segment at " + std::to_string(a) + ", length " + std::to_string(len));
      const Dims one{1, len, d.C, d.NH};
      const auto alone = run_mask(k, one, slots(qkv, d.T, C3, b, a, len), slots(dout, d.T, d.C, b, a, len),
                                  slots(dqkv0, d.T, C3, b, a, len), nullptr);
      EXPECT_TRUE(bitwise_equal(slots(packed.out, d.T, d.C, b, a, len), alone.out)) << "out";
      EXPECT_TRUE(bitwise_equal(slots(packed.dqkv, d.T, C3, b, a, len), alone.dqkv)) << "dqkv";
      if (k == Kernel::Tiled) EXPECT_TRUE(bitwise_equal(lse_rows(packed.saved, d, b, a, len), alone.saved)) << "lse";
      a += len;
    }
  }
}

TEST(AttentionSpans, PackedSegmentsEqualEachSegmentAlone) {
  for (Kernel k : kKernels) {
    packed_case<double>(k);
    packed_case<float>(k);
  }
}

// ============================================================================================== (c) prefix_shared

// Row 0: two prefix_shared segments (two pairs packed in one row), then padding; P, Ch, R chosen so that segment
// boundaries and holes fall inside query blocks and key tiles. Oracles: [prompt | chosen] and [prompt | rejected]
// each as a row of their own in the key-mask form without a mask. The dup slot's q, k, v are the prompt's last
// slot's (its token and position are), so its output must be the prompt's last output bitwise.
struct PairSeg {
  int64_t a, P, Ch, R;
};

template <class T>
void prefix_shared_case(Kernel k) {
  SCOPED_TRACE(kernel_name(k));
  std::mt19937_64 g(test_seed());
  const Dims d{1, 211, 128, 2};
  const int64_t C3 = 3 * d.C;
  const PairSeg pairs[] = {{0, 45, 30, 37}, {113, 20, 51, 16}};  // 45+30+1+37 = 113; 113+20+51+1+16 = 201 <= 211
  auto span = padding_spans(d.B, d.T);
  auto qkv = randf<T>(g, d.B * d.T * C3);
  for (const auto& p : pairs) {
    prefix_shared_segment(span, d.T, 0, p.a, p.P, p.Ch, p.R);
    const int64_t dup = p.a + p.P + p.Ch;
    std::copy_n(qkv.begin() + (p.a + p.P - 1) * C3, C3, qkv.begin() + dup * C3);
  }
  const auto dout = randf<T>(g, d.B * d.T * d.C), dqkv0 = randf<T>(g, d.B * d.T * C3);
  const auto seg = run_spans(k, d, qkv, dout, dqkv0, span);
  for (const auto& p : pairs) {
    SCOPED_TRACE("segment at " + std::to_string(p.a));
    const int64_t dup = p.a + p.P + p.Ch, rej = dup + 1;
    // [prompt | chosen] alone: every output of the prompt and the chosen.
    const int64_t n1 = p.P + p.Ch;
    const auto pc = run_mask(k, Dims{1, n1, d.C, d.NH}, slots(qkv, d.T, C3, 0, p.a, n1),
                             slots(dout, d.T, d.C, 0, p.a, n1), slots(dqkv0, d.T, C3, 0, p.a, n1), nullptr);
    EXPECT_TRUE(bitwise_equal(slots(seg.out, d.T, d.C, 0, p.a, n1), pc.out)) << "prompt and chosen";
    // [prompt | rejected] alone: the rejected outputs.
    auto pr_qkv = slots(qkv, d.T, C3, 0, p.a, p.P), pr_dout = slots(dout, d.T, d.C, 0, p.a, p.P),
         pr_d0 = slots(dqkv0, d.T, C3, 0, p.a, p.P);
    append(pr_qkv, slots(qkv, d.T, C3, 0, rej, p.R));
    append(pr_dout, slots(dout, d.T, d.C, 0, rej, p.R));
    append(pr_d0, slots(dqkv0, d.T, C3, 0, rej, p.R));
    const auto pr = run_mask(k, Dims{1, p.P + p.R, d.C, d.NH}, pr_qkv, pr_dout, pr_d0, nullptr);
    EXPECT_TRUE(bitwise_equal(slots(seg.out, d.T, d.C, 0, rej, p.R), slots(pr.out, p.P + p.R, d.C, 0, p.P, p.R)))
        << "rejected";
    // The dup slot: the prompt's last output, bitwise.
    EXPECT_TRUE(bitwise_equal(slots(seg.out, d.T, d.C, 0, dup, 1), slots(seg.out, d.T, d.C, 0, p.a + p.P - 1, 1)))
        << "dup";
    // Gradients of the chosen and rejected slots (queries, keys and values): each seen only by queries of its own
    // completion, so exactly those of the run alone. The prompt's gradients mix both completions (and the dup).
    EXPECT_TRUE(bitwise_equal(slots(seg.dqkv, d.T, C3, 0, p.a + p.P, p.Ch), slots(pc.dqkv, n1, C3, 0, p.P, p.Ch)))
        << "chosen dqkv";
    EXPECT_TRUE(bitwise_equal(slots(seg.dqkv, d.T, C3, 0, rej, p.R), slots(pr.dqkv, p.P + p.R, C3, 0, p.P, p.R)))
        << "rejected dqkv";
  }
}

TEST(AttentionSpans, PrefixSharedSegmentIsTwoSequencesAndDupIsThePromptsLastSlot) {
  for (Kernel k : kKernels) {
    prefix_shared_case<double>(k);
    prefix_shared_case<float>(k);
  }
}

// The prompt's gradient with the spans is the sum of the two alone runs' prompt gradients (each completion's
// queries and the dup's), up to summation order: in double, ~T roundings of 1.1e-16 on O(1..10) values; 1e-12.
TEST(AttentionSpans, PrefixSharedPromptGradientIsTheSumOfBothCompletions) {
  std::mt19937_64 g(test_seed());
  const Dims d{1, 60, 48, 3};
  const int64_t C3 = 3 * d.C;
  const PairSeg p{0, 17, 21, 19};  // dup = 38, rejected [39, 58), slots 58, 59 padding
  auto span = padding_spans(d.B, d.T);
  prefix_shared_segment(span, d.T, 0, p.a, p.P, p.Ch, p.R);
  auto qkv = randf<double>(g, d.B * d.T * C3);
  const int64_t dup = p.P + p.Ch, rej = dup + 1;
  std::copy_n(qkv.begin() + (p.P - 1) * C3, C3, qkv.begin() + dup * C3);
  const auto dout = randf<double>(g, d.B * d.T * d.C);
  const std::vector<double> zero(static_cast<size_t>(d.B * d.T * C3), 0.0);
  for (Kernel k : kKernels) {
    SCOPED_TRACE(kernel_name(k));
    const auto seg = run_spans(k, d, qkv, dout, zero, span);
    // Alone: [prompt | chosen] with the prompt's dout; [prompt | rejected] with dout 0 on the prompt; and the dup
    // query as the prompt's last query of a third run [prompt] with dout only there.
    const int64_t n1 = p.P + p.Ch, n2 = p.P + p.R;
    const auto pc = run_mask(k, Dims{1, n1, d.C, d.NH}, slots(qkv, d.T, C3, 0, 0, n1),
                             slots(dout, d.T, d.C, 0, 0, n1), std::vector<double>(n1 * C3, 0.0), nullptr);
    auto pr_qkv = slots(qkv, d.T, C3, 0, 0, p.P);
    append(pr_qkv, slots(qkv, d.T, C3, 0, rej, p.R));
    std::vector<double> pr_dout(static_cast<size_t>(p.P * d.C), 0.0);
    append(pr_dout, slots(dout, d.T, d.C, 0, rej, p.R));
    const auto pr = run_mask(k, Dims{1, n2, d.C, d.NH}, pr_qkv, pr_dout, std::vector<double>(n2 * C3, 0.0), nullptr);
    std::vector<double> dup_dout(static_cast<size_t>(p.P * d.C), 0.0);
    std::copy_n(dout.begin() + dup * d.C, d.C, dup_dout.begin() + (p.P - 1) * d.C);
    const auto pd = run_mask(k, Dims{1, p.P, d.C, d.NH}, slots(qkv, d.T, C3, 0, 0, p.P), dup_dout,
                             std::vector<double>(p.P * C3, 0.0), nullptr);
    // Prompt slots [0, P - 1): all three; the prompt's last slot: the dup's share lands on the dup slot itself
    // (its own k, v), so the last prompt slot + the dup slot together equal the three runs' last slot.
    std::vector<double> want(static_cast<size_t>(p.P * C3)), got = slots(seg.dqkv, d.T, C3, 0, 0, p.P);
    for (size_t i = 0; i < want.size(); ++i) want[i] = pc.dqkv[i] + pr.dqkv[i] + pd.dqkv[i];
    for (int64_t c = 0; c < C3; ++c) got[(p.P - 1) * C3 + c] += seg.dqkv[dup * C3 + c];
    EXPECT_LT(max_rel_err(got, want), 1e-12);
  }
}

// ============================================================================================== (d) finite differences

// Central differences in double through each spans forward (L = sum out * G), against its spans backward (+=).
// Row 0: a prefix_shared segment (holes, a dup slot) then padding; row 1: two packed segments then padding. Budget
// as in tests/test_kernels_cpu.cpp: h = 1e-6, truncation and round-off ~1e-10 relative, asserted 1e-7.
TEST(AttentionSpans, GradCheckWithHoles) {
  std::mt19937_64 g(test_seed());
  const Dims d{2, 13, 12, 3};
  const int64_t C3 = 3 * d.C;
  auto span = padding_spans(d.B, d.T);
  prefix_shared_segment(span, d.T, 0, 0, 3, 3, 4);  // dup = 6, rejected [7, 11), slots 11, 12 padding
  pack_row(span, d.T, 1, 0, {5, 6});                 // slots 11, 12 padding
  auto qkv = randn<double>(g, d.B * d.T * C3);
  const auto G = randn<double>(g, d.B * d.T * d.C), R = randn<double>(g, qkv.size());
  for (Kernel k : kKernels) {
    SCOPED_TRACE(kernel_name(k));
    std::vector<double> out(static_cast<size_t>(d.B * d.T * d.C)), saved(static_cast<size_t>(d.saved(k)));
    const auto L = [&] {
      if (k == Kernel::Reference)
        attention_forward_spans(out.data(), saved.data(), qkv.data(), span.data(), d.B, d.T, d.C, d.NH);
      else
        attention_tiled_forward_spans(out.data(), saved.data(), qkv.data(), span.data(), d.B, d.T, d.C, d.NH);
      return dpo::test::dot(out, G);
    };
    L();
    auto buf = R;
    if (k == Kernel::Reference)
      attention_backward_spans(buf.data(), G.data(), qkv.data(), saved.data(), span.data(), d.B, d.T, d.C, d.NH);
    else
      attention_tiled_backward_spans(buf.data(), G.data(), qkv.data(), span.data(), saved.data(), d.B, d.T, d.C,
                                     d.NH);
    std::vector<double> analytic(buf.size());
    for (size_t i = 0; i < buf.size(); ++i) analytic[i] = buf[i] - R[i];
    EXPECT_LT(max_rel_err(analytic, numeric_grad(qkv, L)), 1e-7);
    // From zero, a second backward into the same buffer adds the same gradient again: exactly twice (x + x is exact).
    std::vector<double> z(buf.size(), 0.0);
    for (int call = 0; call < 2; ++call) {
      if (k == Kernel::Reference)
        attention_backward_spans(z.data(), G.data(), qkv.data(), saved.data(), span.data(), d.B, d.T, d.C, d.NH);
      else
        attention_tiled_backward_spans(z.data(), G.data(), qkv.data(), span.data(), saved.data(), d.B, d.T, d.C,
                                       d.NH);
      if (call == 0) buf = z;
    }
    for (size_t i = 0; i < z.size(); ++i) ASSERT_EQ(z[i], 2.0 * buf[i]) << "i=" << i;
  }
}

// Bitwise the same at any thread count (one value, one thread, a fixed order).
TEST(AttentionSpans, BitwiseDeterministicAcrossThreadCounts) {
  std::mt19937_64 g(test_seed());
  const Dims d{2, 150, 128, 2};
  const int64_t C3 = 3 * d.C;
  auto span = padding_spans(d.B, d.T);
  prefix_shared_segment(span, d.T, 0, 0, 40, 50, 33);
  pack_row(span, d.T, 1, 0, {70, 3, 66});
  const auto qkv = randf<float>(g, d.B * d.T * C3), dout = randf<float>(g, d.B * d.T * d.C);
  const std::vector<float> zero(qkv.size(), 0.f);
  for (Kernel k : kKernels) {
    SCOPED_TRACE(kernel_name(k));
    const auto run = [&](int threads) {
      ThreadCount tc(threads);
      const auto r = run_spans(k, d, qkv, dout, zero, span);
      auto all = r.out;
      append(all, r.saved);
      append(all, r.dqkv);
      return all;
    };
    const auto ref = run(1);
    EXPECT_TRUE(bitwise_equal(run(2), ref));
    EXPECT_TRUE(bitwise_equal(run(3), ref));
  }
}

// ============================================================================================== (e) bad spans

// Each invalid span is an Error naming the row, the slot and the values, and nothing is written.
TEST(AttentionSpans, InvalidSpansAreErrorsNamingTheSlot) {
  std::mt19937_64 g(test_seed());
  const Dims d{2, 9, 12, 3};
  const int64_t C3 = 3 * d.C;
  const auto qkv = randf<double>(g, d.B * d.T * C3), dout = randf<double>(g, d.B * d.T * d.C);
  struct Bad {
    int64_t lo, hl, hh;
    const char* why;
  };
  // Slot 5 of row 1.
  const Bad bads[] = {{6, 5, 5, "first key 6"},
                      {-1, 5, 5, "first key -1"},
                      {0, 3, 2, "hole ends before it begins"},
                      {0, 4, 6, "inside its own hole"},
                      {0, 5, 7, "inside its own hole"},
                      {2, 1, 3, "hole is not inside [2, 5)"},
                      {0, 6, 8, "hole is not inside [0, 5)"}};
  for (const auto& bad : bads) {
    SCOPED_TRACE(bad.why);
    auto span = padding_spans(d.B, d.T);
    pack_row(span, d.T, 0, 0, {9});
    pack_row(span, d.T, 1, 0, {9});
    set_span(span, 1 * d.T + 5, bad.lo, bad.hl, bad.hh);
    const std::string values =
        "{" + std::to_string(bad.lo) + ", " + std::to_string(bad.hl) + ", " + std::to_string(bad.hh) + "}";
    for (Kernel k : kKernels) {
      std::vector<double> out(static_cast<size_t>(d.B * d.T * d.C)), saved(static_cast<size_t>(d.saved(k))),
          dqkv(qkv.size(), 1.0);
      poison(out), poison(saved);
      const auto expect_error = [&](const auto& fn, const char* op) {
        try {
          fn();
          ADD_FAILURE() << op << " accepted " << values;
        } catch (const dpo::Error& e) {
          const std::string msg = e.what();
          EXPECT_NE(msg.find(op), std::string::npos) << msg;
          EXPECT_NE(msg.find("row 1, slot 5"), std::string::npos) << msg;
          EXPECT_NE(msg.find(values), std::string::npos) << msg;
          EXPECT_NE(msg.find(bad.why), std::string::npos) << msg;
        }
      };
      if (k == Kernel::Reference) {
        expect_error([&] { attention_forward_spans(out.data(), saved.data(), qkv.data(), span.data(), d.B, d.T, d.C, d.NH); },
                     "attention_forward_spans");
        expect_error([&] { attention_backward_spans(dqkv.data(), dout.data(), qkv.data(), saved.data(), span.data(), d.B,
                                                    d.T, d.C, d.NH); },
                     "attention_backward_spans");
      } else {
        expect_error([&] { attention_tiled_forward_spans(out.data(), saved.data(), qkv.data(), span.data(), d.B, d.T,
                                                         d.C, d.NH); },
                     "attention_tiled_forward_spans");
        expect_error([&] { attention_tiled_backward_spans(dqkv.data(), dout.data(), qkv.data(), span.data(),
                                                          saved.data(), d.B, d.T, d.C, d.NH); },
                     "attention_tiled_backward_spans");
      }
      for (double x : out) ASSERT_TRUE(std::isnan(x)) << "out written";
      for (double x : saved) ASSERT_TRUE(std::isnan(x)) << "saved state written";
      for (double x : dqkv) ASSERT_EQ(x, 1.0) << "dqkv written";
    }
  }
  // The valid edge cases are accepted: a hole right up to the query, an empty hole anywhere, lo = t.
  auto span = padding_spans(d.B, d.T);
  set_span(span, 5, 0, 1, 5);
  set_span(span, 6, 2, 100, 100);
  set_span(span, 7, 7, 7, 7);
  std::vector<double> out(static_cast<size_t>(d.B * d.T * d.C)), att(static_cast<size_t>(d.saved(Kernel::Reference)));
  EXPECT_NO_THROW(attention_forward_spans(out.data(), att.data(), qkv.data(), span.data(), d.B, d.T, d.C, d.NH));
}

// ============================================================================================== (f) work follows spans

// The minimal set: tile j is needed by the query block [t0, t1) when some query of the block sees some key of it.
std::vector<int64_t> needed_tiles(const std::vector<int32_t>& span, int64_t T, int64_t b, int64_t t0, int64_t t1) {
  std::vector<int64_t> r;
  for (int64_t j = 0; j * kAttentionTiledKeys < T; ++j) {
    bool needed = false;
    for (int64_t t = t0; t < t1 && !needed; ++t)
      for (int64_t s = j * kAttentionTiledKeys; s < std::min(T, (j + 1) * kAttentionTiledKeys) && !needed; ++s)
        needed = dpo::span_sees(&span[(b * T + t) * kSpanWidth], t, s);
    if (needed) r.push_back(j);
  }
  return r;
}

// Visited (query block, key tile) pairs of one row, through the kernels' own loop bounds.
int64_t visited_pairs(const std::vector<int32_t>& span, int64_t T, int64_t b, bool check_minimal) {
  std::vector<int64_t> tiles(static_cast<size_t>((T + kAttentionTiledKeys - 1) / kAttentionTiledKeys));
  int64_t total = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kAttentionTiledQueries) {
    const int64_t t1 = std::min(T, t0 + kAttentionTiledQueries);
    const int64_t n = attention_tiled_key_tiles(tiles.data(), &span[b * T * kSpanWidth], t0, t1);
    if (check_minimal) {
      EXPECT_EQ(std::vector<int64_t>(tiles.begin(), tiles.begin() + n), needed_tiles(span, T, b, t0, t1))
          << "row " << b << ", block [" << t0 << ", " << t1 << ")";
    }
    total += n;
  }
  return total;
}

TEST(AttentionSpans, BlockedKernelVisitsOnlyTheKeyTilesTheSpansReach) {
  // Rows: the packed row of the brief (segments 100, 60, 80); a prefix_shared row (holes inside tiles); a
  // left-padded row; padding only (every slot sees only itself); a prefix_shared segment whose chosen part (150
  // slots) makes the dup's and the rejected's hole cover the whole key tile [64, 128).
  const int64_t T = 240;
  auto span = padding_spans(5, T);
  pack_row(span, T, 0, 0, {100, 60, 80});
  prefix_shared_segment(span, T, 1, 0, 70, 60, 50);
  prefix_shared_segment(span, T, 1, 181, 20, 20, 10);
  std::vector<int32_t> mask(2 * T, 1);
  for (int64_t t = 0; t < 130; ++t) mask[T + t] = 0;
  const auto padded = spans_of_mask(mask, 2, T);
  std::copy(padded.begin() + T * kSpanWidth, padded.end(), span.begin() + 2 * T * kSpanWidth);
  prefix_shared_segment(span, T, 4, 0, 10, 150, 70);  // dup 160, rejected [161, 231)
  for (int64_t b = 0; b < 5; ++b) visited_pairs(span, T, b, /*check_minimal=*/true);
  // The blocks of the dup and the rejected ([160, 192) and on) skip tile 1: 1+1+2+2+3 (up to the chosen's end),
  // then tiles {0, 2}, {0, 2, 3}, {0, 2, 3}: 17 of the causal 20.
  EXPECT_EQ(visited_pairs(span, T, 4, false), 17);

  // The key-mask form (null spans) visits every tile of [0, t1): 1+1+2+2+3+3+4+4 = 20 pairs for T = 240.
  std::vector<int64_t> tiles(4);
  int64_t causal = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kAttentionTiledQueries)
    causal += attention_tiled_key_tiles(tiles.data(), nullptr, t0, std::min(T, t0 + kAttentionTiledQueries));
  EXPECT_EQ(causal, 20);
  // Segments 100, 60, 80: blocks [0,32) [32,64): tile 0; [64,96) [96,128): tiles 0, 1; [128,160): 1, 2;
  // [160,192): 2; [192,224) [224,240): 2, 3. 13 pairs instead of 20.
  EXPECT_EQ(visited_pairs(span, T, 0, false), 13);
  // 1-slot segments: one tile per block.
  auto ones = padding_spans(1, T);
  EXPECT_EQ(visited_pairs(ones, T, 0, true), (T + kAttentionTiledQueries - 1) / kAttentionTiledQueries);

  // At scale the work is ~ sum of len^2: 16 segments of 64 in a row of 1024 visit one tile per block (32 pairs),
  // where the causal triangle takes 1+1+2+2+...+16+16 = 272.
  const int64_t T2 = 1024;
  auto packed = padding_spans(1, T2);
  pack_row(packed, T2, 0, 0, std::vector<int64_t>(16, 64));
  EXPECT_EQ(visited_pairs(packed, T2, 0, true), T2 / kAttentionTiledQueries);
}

// ============================================================================================== the CPU backend

dpo::Tensor host_tensor(const std::vector<double>& v, dpo::Shape shape, dpo::DType dtype) {
  dpo::Tensor t = dpo::Tensor::host(std::move(shape), dpo::DType::F64);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(double));
  return dtype == dpo::DType::F64 ? t : dpo::convert_host(t, dtype, "test input");
}
dpo::Tensor host_i32(const std::vector<int32_t>& v, dpo::Shape shape) {
  dpo::Tensor t = dpo::Tensor::host(std::move(shape), dpo::DType::I32);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}
std::vector<double> as_f64(const dpo::Tensor& t) {
  const dpo::Tensor d = dpo::convert_host(t, dpo::DType::F64, "test output");
  return {d.data<double>(), d.data<double>() + d.numel()};
}

// The backend ops run the kernels: F64 bitwise against a direct kernel call; F32 and BF16 run (BF16 through the F32
// kernels, rounded once) and stay finite and near the F64 result; CountingBackend counts both ops.
TEST(AttentionSpansBackend, RunsTheKernelsForBothCpuAttentions) {
  std::mt19937_64 g(test_seed());
  const Dims d{2, 37, 48, 3};
  const int64_t C3 = 3 * d.C;
  auto span = padding_spans(d.B, d.T);
  prefix_shared_segment(span, d.T, 0, 0, 9, 10, 11);
  pack_row(span, d.T, 1, 0, {20, 15});
  const auto qkv = randf<double>(g, d.B * d.T * C3), dout = randf<double>(g, d.B * d.T * d.C),
             dqkv0 = randf<double>(g, d.B * d.T * C3);
  const dpo::Tensor sp = host_i32(span, {d.B, d.T, kSpanWidth});
  for (auto attention : {dpo::CpuAttention::Reference, dpo::CpuAttention::Tiled}) {
    const Kernel k = attention == dpo::CpuAttention::Reference ? Kernel::Reference : Kernel::Tiled;
    SCOPED_TRACE(kernel_name(k));
    auto cpu = dpo::make_cpu_backend(0, attention);
    dpo::CountingBackend be(*cpu);
    const auto want = run_spans(k, d, qkv, dout, dqkv0, span);
    std::vector<double> ref_out;
    for (dpo::DType dt : {dpo::DType::F64, dpo::DType::F32, dpo::DType::BF16}) {
      SCOPED_TRACE(dpo::dtype_name(dt));
      dpo::Tensor out = host_tensor(std::vector<double>(d.B * d.T * d.C, std::nan("")), {d.B, d.T, d.C}, dt);
      dpo::Tensor saved = be.empty(be.attention_saved_shape(d.B, d.T, d.NH), be.attention_saved_dtype(dt));
      dpo::Tensor dqkv = host_tensor(dqkv0, {d.B, d.T, C3}, dt);
      const dpo::Tensor q = host_tensor(qkv, {d.B, d.T, C3}, dt), dO = host_tensor(dout, {d.B, d.T, d.C}, dt);
      be.attention_forward_spans(out, saved, q, sp, d.NH);
      be.attention_backward_spans(dqkv, dO, q, out, saved, sp, d.NH);
      const auto got_out = as_f64(out), got_dqkv = as_f64(dqkv);
      if (dt == dpo::DType::F64) {
        EXPECT_TRUE(bitwise_equal(got_out, want.out));
        EXPECT_TRUE(bitwise_equal(got_dqkv, want.dqkv));
        if (k == Kernel::Reference) EXPECT_TRUE(bitwise_equal(as_f64(saved), want.saved));
      } else {
        // F32: kFloatTol-like chains (T + hs roundings of 6e-8): 1e-5. BF16: inputs rounded to 8 bits (qkv read
        // as BF16 values of the same random numbers) and outputs rounded once: a few 2^-8 relative; 5e-2 catches a
        // wrong span (an O(1) change of an output) but not BF16 noise.
        const double tol = dt == dpo::DType::F32 ? 1e-5 : 5e-2;
        EXPECT_LT(max_rel_err(got_out, want.out), tol) << "out";
        std::vector<double> gd(got_dqkv.size()), wd(got_dqkv.size());
        const auto d0 = as_f64(host_tensor(dqkv0, {d.B, d.T, C3}, dt));
        for (size_t i = 0; i < gd.size(); ++i) gd[i] = got_dqkv[i] - d0[i], wd[i] = want.dqkv[i] - dqkv0[i];
        EXPECT_LT(max_rel_err(gd, wd), dt == dpo::DType::F32 ? 1e-5 : 1e-1) << "dqkv";
      }
    }
    EXPECT_EQ(be.counts().ops - be.counts().allocations, 6);  // the two ops per dtype; empty() counts too
  }
}

// attn_implementation flash is the CUDA backend's: the CPU backend (and a counting backend over it) refuses it with an
// error naming the setting, keeps eager, and its saved state is unchanged.
TEST(AttentionSpansBackend, CpuBackendRefusesFlash) {
  auto cpu = dpo::make_cpu_backend(0, dpo::CpuAttention::Tiled);
  dpo::CountingBackend counted(*cpu);
  for (dpo::Backend* be : {cpu.get(), static_cast<dpo::Backend*>(&counted)}) {
    const dpo::Shape before = be->attention_saved_shape(2, 9, 3);
    EXPECT_NO_THROW(be->set_attention_impl(dpo::AttentionImpl::Eager));
    try {
      be->set_attention_impl(dpo::AttentionImpl::Flash);
      ADD_FAILURE() << "flash accepted on the CPU backend";
    } catch (const dpo::Error& e) {
      EXPECT_NE(std::string(e.what()).find("attn_implementation flash"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("cpu"), std::string::npos) << e.what();
    }
    EXPECT_EQ(be->attention_impl(), dpo::AttentionImpl::Eager);
    EXPECT_EQ(be->attention_saved_shape(2, 9, 3), before);
  }
}

// The backend checks the span tensor (dtype, shape) and every span, naming them; the blocked kernels' saved state
// says which form wrote it, and each backward refuses the other form's.
TEST(AttentionSpansBackend, ChecksSpansAndTheFormOfTheSavedState) {
  std::mt19937_64 g(test_seed());
  const Dims d{1, 10, 12, 3};
  const int64_t C3 = 3 * d.C;
  auto be = dpo::make_cpu_backend(0, dpo::CpuAttention::Tiled);
  auto span = padding_spans(d.B, d.T);
  pack_row(span, d.T, 0, 0, {4, 6});
  const dpo::Tensor q = host_tensor(randf<double>(g, d.B * d.T * C3), {d.B, d.T, C3}, dpo::DType::F32);
  const dpo::Tensor dO = host_tensor(randf<double>(g, d.B * d.T * d.C), {d.B, d.T, d.C}, dpo::DType::F32);
  dpo::Tensor out = be->empty({d.B, d.T, d.C}, dpo::DType::F32), dqkv = be->zeros({d.B, d.T, C3}, dpo::DType::F32);
  dpo::Tensor saved = be->empty(be->attention_saved_shape(d.B, d.T, d.NH), dpo::DType::F32);
  const auto expect_error = [](const auto& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const dpo::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { be->attention_forward_spans(out, saved, q, host_i32(span, {d.B, d.T * kSpanWidth}), d.NH); },
               "span");
  expect_error([&] { be->attention_forward_spans(out, saved, q, dpo::Tensor(), d.NH); }, "span");
  expect_error([&] { be->attention_forward_spans(out, saved, q, be->zeros({d.B, d.T, kSpanWidth}, dpo::DType::F32), d.NH); },
               "span");
  auto bad = span;
  set_span(bad, 7, 8, 8, 8);
  expect_error([&] { be->attention_forward_spans(out, saved, q, host_i32(bad, {d.B, d.T, kSpanWidth}), d.NH); },
               "row 0, slot 7");
  const dpo::Tensor sp = host_i32(span, {d.B, d.T, kSpanWidth});
  be->attention_forward_spans(out, saved, q, sp, d.NH);
  expect_error([&] { be->attention_backward(dqkv, dO, q, out, saved, d.NH); }, "attention_backward_spans");
  be->attention_forward(out, saved, q, dpo::Tensor(), d.NH);
  expect_error([&] { be->attention_backward_spans(dqkv, dO, q, out, saved, sp, d.NH); }, "attention_forward_spans");
}

}  // namespace
