// The batch-layout forms of the encoder and the log-prob ops (kernels/batch_layout.h: per-slot positions `pos`,
// per-sequence slot ranges `seg`) on the CPU: kernels/encoder.h (encoder_forward_pos / encoder_backward_pos) and
// kernels/logprob.h (logprob_forward_segments / logprob_backward_segments), directly and through CpuBackend.
//   - the padded layout (pos[b,t] = t, seg[s] = [s*T, (s+1)*T)) gives bitwise the results of the padded ops, in F32,
//     F64 and BF16 (the contract: one arithmetic, the same orders);
//   - a packed batch (several sequences per row, ranges that do not start at a row start, slots in no range, an
//     empty range) gives, for each sequence, bitwise what the padded op gives for that sequence alone in a batch of
//     its own (the per-sequence sums run over the same slots in the same order);
//   - finite differences in double for both backwards; "+=" backwards run twice give twice the gradient;
//   - bad positions and bad ranges throw dpo::Error naming the slot or the range before anything is written.
// Inputs are seeded random (test_seed), outputs poisoned with NaN before each call, sizes odd.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/encoder.h"
#include "kernels/logprob.h"
#include "kernels/seq_stats.h"
#include "runtime/backend.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::bitwise_equal;
using test::dot;
using test::max_rel_err;
using test::numeric_grad;
using test::poison;
using test::randn;
using test::test_seed;

// Central differences in double (h = 1e-6): truncation and round-off are both ~1e-10 relative for these O(1)
// losses; 1e-7 leaves a 1000x margin while a wrong factor or a term added to the wrong sequence is O(1).
constexpr double kGradTol = 1e-7;

std::vector<int32_t> random_ids(std::mt19937_64& g, size_t n, int32_t lo, int32_t hi) {
  std::uniform_int_distribution<int32_t> d(lo, hi - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// --- host tensors in any dtype -----------------------------------------------------------------------------------

template <class T>
Tensor host_of(const std::vector<T>& v, Shape shape) {
  Tensor t = Tensor::host(std::move(shape), dtype_of<T>());
  EXPECT_EQ(t.numel(), static_cast<int64_t>(v.size()));
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return t;
}
// A tensor of dtype `dt` (F32, F64 or BF16, rounded once for BF16) holding v.
Tensor floats_of(const std::vector<double>& v, Shape shape, DType dt) {
  Tensor t = host_of(v, std::move(shape));
  return dt == DType::F64 ? t : convert_host(t, dt, "test input");
}
// A tensor of `shape` and dtype `dt` whose bytes are all 0xFF (NaN in F32, F64 and BF16).
Tensor poisoned(Shape shape, DType dt) {
  Tensor t = Tensor::host(std::move(shape), dt);
  std::memset(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()));
  return t;
}
std::vector<uint8_t> bytes_of(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.raw());
  return {p, p + t.nbytes()};
}
std::vector<double> doubles_of(const Tensor& t) {
  const Tensor d = t.dtype() == DType::F64 ? t : convert_host(t, DType::F64, "test output");
  const double* p = d.data<double>();
  return {p, p + d.numel()};
}
Tensor clone(const Tensor& t) {
  Tensor c = Tensor::host(t.shape(), t.dtype());
  std::memcpy(c.raw(), t.raw(), static_cast<size_t>(t.nbytes()));
  return c;
}

const char* name_of(DType dt) { return dtype_name(dt); }

// The padded layout's positions and ranges.
std::vector<int32_t> padded_pos(int64_t B, int64_t T) {
  std::vector<int32_t> p(static_cast<size_t>(B * T));
  for (int64_t i = 0; i < B * T; ++i) p[i] = static_cast<int32_t>(i % T);
  return p;
}
std::vector<int32_t> padded_seg(int64_t B, int64_t T) {
  std::vector<int32_t> s(static_cast<size_t>(2 * B));
  for (int64_t b = 0; b < B; ++b) {
    s[2 * b] = static_cast<int32_t>(b * T);
    s[2 * b + 1] = static_cast<int32_t>((b + 1) * T);
  }
  return s;
}

// ============================================================================================== encoder

// pos[b,t] = t through the backend: bitwise encoder_forward / encoder_backward, in F32, F64 and BF16 (F32 gradients).
TEST(LayoutEncoder, PaddedPositionsAreBitwiseThePaddedOpInEveryDtype) {
  std::mt19937_64 g(test_seed());
  auto be = make_cpu_backend();
  const int64_t B = 3, T = 13, C = 37, V = 29, P = 17;  // P > T: rows t >= T of dwpe get nothing either way
  const auto tok = random_ids(g, B * T, 0, V);
  const Tensor tokens = host_of(tok, {B, T}), pos = host_of(padded_pos(B, T), {B, T});
  for (DType A : {DType::F32, DType::F64, DType::BF16}) {
    SCOPED_TRACE(name_of(A));
    const DType G = A == DType::BF16 ? DType::F32 : A;
    const Tensor wte = floats_of(randn<double>(g, V * C), {V, C}, A);
    const Tensor wpe = floats_of(randn<double>(g, P * C), {P, C}, A);
    Tensor out_ref = poisoned({B, T, C}, A), out = poisoned({B, T, C}, A);
    be->encoder_forward(out_ref, tokens, wte, wpe);
    be->encoder_forward_pos(out, tokens, pos, wte, wpe);
    EXPECT_EQ(bytes_of(out), bytes_of(out_ref)) << "forward";

    const Tensor dout = floats_of(randn<double>(g, B * T * C), {B, T, C}, A);
    const Tensor dwte0 = floats_of(randn<double>(g, V * C), {V, C}, G);
    const Tensor dwpe0 = floats_of(randn<double>(g, P * C), {P, C}, G);
    Tensor dwte_ref = clone(dwte0), dwpe_ref = clone(dwpe0), dwte = clone(dwte0), dwpe = clone(dwpe0);
    be->encoder_backward(dwte_ref, dwpe_ref, dout, tokens);
    be->encoder_backward_pos(dwte, dwpe, dout, tokens, pos);
    EXPECT_EQ(bytes_of(dwte), bytes_of(dwte_ref)) << "dwte";
    EXPECT_EQ(bytes_of(dwpe), bytes_of(dwpe_ref)) << "dwpe";
  }
}

// A packed batch: positions restart per sequence, one row continues a prompt's positions (prefix sharing) and
// padding slots sit at position 0. Forward: every element is exactly wte[tok] + wpe[pos]. Backward: finite
// differences of L = <out, G> in double, with rows of wpe that no slot uses (their gradient must be exactly 0).
TEST(LayoutEncoder, PackedPositionsForwardIsExactAndBackwardMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  const int64_t B = 2, T = 11, C = 5, V = 7, P = 14;
  // row 0: sequences of 4, 5 and 2 tokens; row 1: a prompt of 3, a completion at 3..6, a second completion that
  // restarts at 3 (prefix sharing), then two padding slots.
  const std::vector<int32_t> pos = {0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, 3, 4, 0, 0, 0};
  const auto tok = random_ids(g, B * T, 0, 3);  // few distinct tokens: rows of dwte sum many slots
  auto wte = randn<double>(g, V * C), wpe = randn<double>(g, P * C), G = randn<double>(g, B * T * C);
  std::vector<double> out(B * T * C);
  poison(out);
  cpu::encoder_forward_pos(out.data(), tok.data(), pos.data(), wte.data(), wpe.data(), B, T, C, P);
  for (int64_t i = 0; i < B * T; ++i)
    for (int64_t c = 0; c < C; ++c)
      ASSERT_EQ(out[i * C + c], wte[tok[i] * C + c] + wpe[pos[i] * C + c]) << "slot " << i << " c=" << c;

  auto L = [&] {
    cpu::encoder_forward_pos(out.data(), tok.data(), pos.data(), wte.data(), wpe.data(), B, T, C, P);
    return dot(out, G);
  };
  // "+=" from random starting values, twice: the gradient is (buffer - start) / 2.
  const auto dwte0 = randn<double>(g, V * C), dwpe0 = randn<double>(g, P * C);
  std::vector<double> dwte = dwte0, dwpe = dwpe0;
  for (int rep = 0; rep < 2; ++rep)
    cpu::encoder_backward_pos(dwte.data(), dwpe.data(), G.data(), tok.data(), pos.data(), B, T, C, P);
  std::vector<double> gwte(dwte.size()), gwpe(dwpe.size());
  for (size_t i = 0; i < dwte.size(); ++i) gwte[i] = (dwte[i] - dwte0[i]) / 2;
  for (size_t i = 0; i < dwpe.size(); ++i) gwpe[i] = (dwpe[i] - dwpe0[i]) / 2;
  EXPECT_LT(max_rel_err(gwte, numeric_grad(wte, L)), kGradTol) << "dwte";
  EXPECT_LT(max_rel_err(gwpe, numeric_grad(wpe, L)), kGradTol) << "dwpe";
  for (int64_t p = 6; p < P; ++p)
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(dwpe[p * C + c], dwpe0[p * C + c]) << "unused position " << p;
}

// Float, few distinct positions and tokens (each row of dwpe / dwte sums ~40 slots): any change of order with the
// thread count changes the bits.
TEST(LayoutEncoder, PositionBackwardIsBitwiseDeterministicAcrossThreadCounts) {
  std::mt19937_64 g(test_seed());
  const int64_t B = 4, T = 41, C = 70, V = 5, P = 4;
  const auto tok = random_ids(g, B * T, 0, V), pos = random_ids(g, B * T, 0, P);
  const auto dout = randn<float>(g, B * T * C), R = randn<float>(g, V * C), Rp = randn<float>(g, P * C);
  auto run = [&](int threads) {
    test::ThreadCount tc(threads);
    std::vector<float> dwte = R, dwpe = Rp;
    cpu::encoder_backward_pos(dwte.data(), dwpe.data(), dout.data(), tok.data(), pos.data(), B, T, C, P);
    dwte.insert(dwte.end(), dwpe.begin(), dwpe.end());
    return dwte;
  };
  const auto ref = run(1);
  EXPECT_TRUE(bitwise_equal(run(2), ref));
  EXPECT_TRUE(bitwise_equal(run(3), ref));
}

TEST(LayoutEncoder, PositionOutsideTheTableThrowsNamingTheSlotBeforeWriting) {
  std::mt19937_64 g(test_seed());
  auto be = make_cpu_backend();
  const int64_t B = 2, T = 5, C = 3, V = 4, P = 6;
  const Tensor tokens = host_of(random_ids(g, B * T, 0, V), {B, T});
  const Tensor wte = floats_of(randn<double>(g, V * C), {V, C}, DType::F32);
  const Tensor wpe = floats_of(randn<double>(g, P * C), {P, C}, DType::F32);
  for (int32_t bad : {-1, static_cast<int32_t>(P), std::numeric_limits<int32_t>::max()}) {
    std::vector<int32_t> p = padded_pos(B, T);
    p[1 * T + 3] = bad;  // slot (b=1, t=3)
    const Tensor pos = host_of(p, {B, T});
    Tensor out = poisoned({B, T, C}, DType::F32);
    const auto before = bytes_of(out);
    try {
      be->encoder_forward_pos(out, tokens, pos, wte, wpe);
      ADD_FAILURE() << "forward accepted position " << bad;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("b=1, t=3"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
    }
    EXPECT_EQ(bytes_of(out), before) << "the forward wrote before throwing";
    Tensor dwte = floats_of(randn<double>(g, V * C), {V, C}, DType::F32);
    Tensor dwpe = floats_of(randn<double>(g, P * C), {P, C}, DType::F32);
    const auto dwte_before = bytes_of(dwte), dwpe_before = bytes_of(dwpe);
    EXPECT_THROW(be->encoder_backward_pos(dwte, dwpe, floats_of(randn<double>(g, B * T * C), {B, T, C}, DType::F32),
                                          tokens, pos),
                 Error);
    EXPECT_EQ(bytes_of(dwte), dwte_before) << "the backward wrote before throwing";
    EXPECT_EQ(bytes_of(dwpe), dwpe_before) << "the backward wrote before throwing";
  }
  // Boundary checks: pos must be I32 [B,T].
  Tensor out = poisoned({B, T, C}, DType::F32);
  EXPECT_THROW(be->encoder_forward_pos(out, tokens, host_of(padded_pos(B, T), {B * T}), wte, wpe), Error);
  EXPECT_THROW(be->encoder_forward_pos(out, tokens, floats_of(std::vector<double>(B * T, 0.0), {B, T}, DType::F32),
                                       wte, wpe),
               Error);
}

// ============================================================================================== log-probs

// Logits in rows at different levels, weight-0 prompt slots with garbage targets, non-unit weights.
struct LogprobInputs {
  int64_t B, T, V;
  std::vector<double> logits, weights;
  std::vector<int32_t> targets;
};

LogprobInputs make_inputs(std::mt19937_64& g, int64_t B, int64_t T, int64_t V) {
  LogprobInputs in{B, T, V, randn<double>(g, B * T * V, 2.0), std::vector<double>(B * T, 1.0), {}};
  std::uniform_int_distribution<int> shift(-5, 5);
  for (int64_t r = 0; r < B * T; ++r) {
    const double s = r == 3 ? 40.0 : shift(g);
    for (int64_t v = 0; v < V; ++v) in.logits[r * V + v] += s;
  }
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  std::uniform_int_distribution<int> coin(0, 5);
  in.targets.resize(B * T);
  for (int64_t r = 0; r < B * T; ++r) {
    const int c = coin(g);
    in.weights[r] = c == 0 ? 0.0 : (c == 1 ? 0.5 : 1.0);
    in.targets[r] = in.weights[r] != 0.0 ? tok(g) : (r % 2 ? -1 : static_cast<int32_t>(V + 3));
  }
  return in;
}

// The padded ranges through the backend: bitwise logprob_forward / logprob_backward in F32, F64 and BF16, with and
// without a padded row stride, with every optional output; the backward also in place.
TEST(LayoutLogprob, PaddedRangesAreBitwiseThePaddedOpInEveryDtype) {
  std::mt19937_64 g(test_seed());
  auto be = make_cpu_backend();
  const int64_t B = 3, T = 9, V = 45;
  for (DType A : {DType::F32, DType::F64, DType::BF16}) {
    for (int64_t ld : {V, int64_t{64}}) {
      SCOPED_TRACE(std::string(name_of(A)) + " ld=" + std::to_string(ld));
      const DType G = A == DType::BF16 ? DType::F32 : A;
      const auto in = make_inputs(g, B, T, V);
      std::vector<double> lg(B * T * ld, std::numeric_limits<double>::quiet_NaN());  // padding: NaN, never read
      for (int64_t r = 0; r < B * T; ++r)
        for (int64_t v = 0; v < V; ++v) lg[r * ld + v] = in.logits[r * V + v];
      const Tensor logits = floats_of(lg, {B, T, ld}, A), targets = host_of(in.targets, {B, T});
      const Tensor weights = floats_of(in.weights, {B, T}, G), seg = host_of(padded_seg(B, T), {B, 2});
      Backend::LogprobOutputs ref{poisoned({B}, G), poisoned({B, T}, G), poisoned({B, kSeqStatsWidth}, G)};
      Backend::LogprobOutputs got{poisoned({B}, G), poisoned({B, T}, G), poisoned({B, kSeqStatsWidth}, G)};
      be->logprob_forward(ref, logits, targets, weights, V);
      be->logprob_forward_segments(got, logits, targets, weights, seg, V);
      EXPECT_EQ(bytes_of(got.seq_logp), bytes_of(ref.seq_logp)) << "seq_logp";
      EXPECT_EQ(bytes_of(got.token_logp), bytes_of(ref.token_logp)) << "token_logp";
      EXPECT_EQ(bytes_of(got.seq_stats), bytes_of(ref.seq_stats)) << "seq_stats";
      Tensor only = poisoned({B}, G);
      be->logprob_forward_segments(Backend::LogprobOutputs{only, Tensor(), Tensor()}, logits, targets, weights, seg, V);
      EXPECT_EQ(bytes_of(only), bytes_of(ref.seq_logp)) << "seq_logp without the optional outputs";

      std::vector<double> dseq_v = randn<double>(g, B);
      const Tensor dseq = floats_of(dseq_v, {B}, G);
      Tensor d_ref = floats_of(lg, {B, T, ld}, A), d_got = floats_of(lg, {B, T, ld}, A);  // padding must stay NaN
      be->logprob_backward(d_ref, logits, targets, weights, dseq, V);
      be->logprob_backward_segments(d_got, logits, targets, weights, seg, dseq, V);
      EXPECT_EQ(bytes_of(d_got), bytes_of(d_ref)) << "dlogits";
      Tensor inplace = clone(logits);
      be->logprob_backward_segments(inplace, inplace, targets, weights, seg, dseq, V);
      EXPECT_EQ(bytes_of(inplace), bytes_of(d_ref)) << "dlogits in place";
    }
  }
}

// A packed batch of B = 3 rows of T = 11 slots:
//   row 0: slot 0 in no range, sequences [1, 4) and [4, 9), slots 9, 10 in no range
//   row 1: an empty sequence [11, 11), a sequence [11, 17) starting at the row start, slots 17..21 in no range
//   row 2: sequences [22, 25), [25, 26) (one slot) and [27, 33) ending at the batch end; slot 26 in no range
// Slots in no range get non-zero weights and out-of-range targets: they must be ignored (no throw, logits not read:
// NaN there). Each sequence's outputs are bitwise those of the padded op on that sequence alone (B = 1), dlogits of
// slots in no range are 0.
const std::vector<int32_t> kPackedSeg = {1, 4, 4, 9, 11, 11, 11, 17, 22, 25, 25, 26, 27, 33};
constexpr int64_t kPackedB = 3, kPackedT = 11;

std::vector<bool> in_some_range(const std::vector<int32_t>& seg, int64_t BT) {
  std::vector<bool> in(BT, false);
  for (size_t s = 0; s + 1 < seg.size(); s += 2)
    for (int32_t i = seg[s]; i < seg[s + 1]; ++i) in[i] = true;
  return in;
}

template <class F>
void packed_case(std::mt19937_64& g) {
  const int64_t B = kPackedB, T = kPackedT, V = 23, BT = B * T, S = static_cast<int64_t>(kPackedSeg.size() / 2);
  auto in = make_inputs(g, B, T, V);
  const auto owned = in_some_range(kPackedSeg, BT);
  for (int64_t i = 0; i < BT; ++i)
    if (!owned[i]) {
      in.weights[i] = 1.0;
      in.targets[i] = static_cast<int32_t>(V + 100);
      for (int64_t v = 0; v < V; ++v) in.logits[i * V + v] = std::numeric_limits<double>::quiet_NaN();
    }
  const std::vector<F> logits(in.logits.begin(), in.logits.end()), weights(in.weights.begin(), in.weights.end());
  std::vector<F> seq(S), tok(BT), stats(S * kSeqStatsWidth);
  poison(seq);
  poison(tok);
  poison(stats);
  cpu::logprob_forward_segments<F>(seq.data(), tok.data(), stats.data(), logits.data(), in.targets.data(),
                                   weights.data(), kPackedSeg.data(), S, B, T, V, V);
  const auto dseq = randn<F>(g, S);
  std::vector<F> dl(BT * V);
  poison(dl);
  cpu::logprob_backward_segments<F>(dl.data(), logits.data(), in.targets.data(), weights.data(), kPackedSeg.data(),
                                    dseq.data(), S, B, T, V, V);
  for (int64_t s = 0; s < S; ++s) {
    SCOPED_TRACE("sequence " + std::to_string(s));
    const int64_t lo = kPackedSeg[2 * s], n = kPackedSeg[2 * s + 1] - lo;
    std::vector<F> a_seq(1), a_tok(n), a_stats(kSeqStatsWidth), a_dl(n * V);
    poison(a_seq);
    poison(a_stats);
    cpu::logprob_forward<F>(a_seq.data(), a_tok.data(), a_stats.data(), logits.data() + lo * V,
                            in.targets.data() + lo, weights.data() + lo, 1, n, V, V);
    cpu::logprob_backward<F>(a_dl.data(), logits.data() + lo * V, in.targets.data() + lo, weights.data() + lo,
                             dseq.data() + s, 1, n, V, V);
    EXPECT_TRUE(bitwise_equal(std::vector<F>{seq[s]}, a_seq)) << "seq_logp " << seq[s] << " vs " << a_seq[0];
    EXPECT_TRUE(bitwise_equal(std::vector<F>(stats.begin() + s * kSeqStatsWidth,
                                             stats.begin() + (s + 1) * kSeqStatsWidth),
                              a_stats))
        << "seq_stats";
    EXPECT_TRUE(bitwise_equal(std::vector<F>(tok.begin() + lo, tok.begin() + lo + n), a_tok)) << "token_logp";
    EXPECT_TRUE(bitwise_equal(std::vector<F>(dl.begin() + lo * V, dl.begin() + (lo + n) * V), a_dl)) << "dlogits";
    if (n == 0) {
      EXPECT_EQ(seq[s], F(0));
      EXPECT_EQ(stats[s * kSeqStatsWidth + kSeqTokens], F(0));
    }
  }
  for (int64_t i = 0; i < BT; ++i) {
    if (owned[i]) continue;
    EXPECT_EQ(tok[i], F(0)) << "token_logp of slot " << i << " (in no range)";
    for (int64_t v = 0; v < V; ++v) ASSERT_EQ(dl[i * V + v], F(0)) << "dlogits of slot " << i << " (in no range)";
  }
}

TEST(LayoutLogprob, PackedSequencesAreBitwiseEachSequenceAlone) {
  std::mt19937_64 g(test_seed());
  packed_case<float>(g);
  packed_case<double>(g);
}

// The same packed batch through the backend in BF16: the BF16 path is the F32 path on the same (bf16-exact) values,
// dlogits rounded once, so each output equals the F32 op's output (rounded for dlogits) bitwise.
TEST(LayoutLogprob, PackedBf16IsTheF32OpRoundedOnce) {
  std::mt19937_64 g(test_seed());
  auto be = make_cpu_backend();
  const int64_t B = kPackedB, T = kPackedT, V = 23, S = static_cast<int64_t>(kPackedSeg.size() / 2);
  const auto in = make_inputs(g, B, T, V);
  const Tensor lg16 = floats_of(in.logits, {B, T, V}, DType::BF16);
  const Tensor lg32 = convert_host(lg16, DType::F32, "bf16-exact logits");
  const Tensor targets = host_of(in.targets, {B, T}), weights = floats_of(in.weights, {B, T}, DType::F32);
  const Tensor seg = host_of(kPackedSeg, {S, 2}), dseq = floats_of(randn<double>(g, S), {S}, DType::F32);
  Backend::LogprobOutputs a{poisoned({S}, DType::F32), poisoned({B, T}, DType::F32),
                            poisoned({S, kSeqStatsWidth}, DType::F32)};
  Backend::LogprobOutputs b{poisoned({S}, DType::F32), poisoned({B, T}, DType::F32),
                            poisoned({S, kSeqStatsWidth}, DType::F32)};
  be->logprob_forward_segments(a, lg16, targets, weights, seg, V);
  be->logprob_forward_segments(b, lg32, targets, weights, seg, V);
  EXPECT_EQ(bytes_of(a.seq_logp), bytes_of(b.seq_logp));
  EXPECT_EQ(bytes_of(a.token_logp), bytes_of(b.token_logp));
  EXPECT_EQ(bytes_of(a.seq_stats), bytes_of(b.seq_stats));
  Tensor d16 = poisoned({B, T, V}, DType::BF16), d32 = poisoned({B, T, V}, DType::F32);
  be->logprob_backward_segments(d16, lg16, targets, weights, seg, dseq, V);
  be->logprob_backward_segments(d32, lg32, targets, weights, seg, dseq, V);
  EXPECT_EQ(bytes_of(d16), bytes_of(convert_host(d32, DType::BF16, "rounded reference")));
}

// L = sum_s c_s * seq_logp_s over a packed batch in double; the backward with dseq = c is dL/dlogits.
TEST(LayoutLogprob, SegmentBackwardMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  const int64_t B = 2, T = 9, V = 6, BT = B * T;
  const std::vector<int32_t> seg = {0, 3, 4, 8, 8, 9, 11, 16};  // [8, 9) crosses no row boundary: row 0's last slot
  const int64_t S = static_cast<int64_t>(seg.size() / 2);
  auto in = make_inputs(g, B, T, V);
  const auto c = randn<double>(g, S);
  std::vector<double> seq(S), dl(BT * V);
  auto L = [&] {
    cpu::logprob_forward_segments<double>(seq.data(), nullptr, nullptr, in.logits.data(), in.targets.data(),
                                          in.weights.data(), seg.data(), S, B, T, V, V);
    double l = 0.0;
    for (int64_t s = 0; s < S; ++s) l += c[s] * seq[s];
    return l;
  };
  cpu::logprob_backward_segments<double>(dl.data(), in.logits.data(), in.targets.data(), in.weights.data(), seg.data(),
                                         c.data(), S, B, T, V, V);
  EXPECT_LT(max_rel_err(dl, numeric_grad(in.logits, L)), kGradTol);
}

// Every invalid range set throws dpo::Error naming the sequence, with the outputs untouched; so does a bad target
// inside a range (but not one outside every range, see the packed test).
TEST(LayoutLogprob, BadRangesAndTargetsThrowNamingTheRangeBeforeWriting) {
  std::mt19937_64 g(test_seed());
  auto be = make_cpu_backend();
  const int64_t B = 2, T = 5, V = 8;
  auto in = make_inputs(g, B, T, V);
  for (auto& w : in.weights) w = 1.0;
  for (auto& t : in.targets) t = 1;
  const Tensor logits = floats_of(in.logits, {B, T, V}, DType::F32);
  const Tensor weights = floats_of(in.weights, {B, T}, DType::F32);
  const Tensor targets = host_of(in.targets, {B, T});
  struct Bad {
    std::vector<int32_t> seg;
    const char* what;  // expected in the message
  };
  const std::vector<Bad> cases = {
      {{0, 3, -1, 4}, "sequence 1"},   // starts before 0
      {{0, 3, 4, 11}, "sequence 1"},   // ends after B*T = 10
      {{4, 3}, "sequence 0"},          // ends before it starts
      {{0, 4, 3, 6}, "sequence 1"},    // overlaps the previous one
      {{5, 7, 0, 2}, "sequence 1"},    // not sorted
  };
  for (const auto& bc : cases) {
    const int64_t S = static_cast<int64_t>(bc.seg.size() / 2);
    SCOPED_TRACE(bc.what);
    const Tensor seg = host_of(bc.seg, {S, 2});
    Backend::LogprobOutputs out{poisoned({S}, DType::F32), poisoned({B, T}, DType::F32),
                                poisoned({S, kSeqStatsWidth}, DType::F32)};
    const auto before = bytes_of(out.seq_logp), before_tok = bytes_of(out.token_logp);
    try {
      be->logprob_forward_segments(out, logits, targets, weights, seg, V);
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bc.what), std::string::npos) << e.what();
    }
    EXPECT_EQ(bytes_of(out.seq_logp), before);
    EXPECT_EQ(bytes_of(out.token_logp), before_tok);
    Tensor dl = poisoned({B, T, V}, DType::F32);
    const auto dl_before = bytes_of(dl);
    EXPECT_THROW(be->logprob_backward_segments(dl, logits, targets, weights, seg,
                                               floats_of(std::vector<double>(S, 1.0), {S}, DType::F32), V),
                 Error);
    EXPECT_EQ(bytes_of(dl), dl_before);
  }
  // A bad target inside a range throws, naming the slot; outside every range it is ignored.
  auto tg = in.targets;
  tg[7] = static_cast<int32_t>(V);  // slot (b=1, t=2)
  const Tensor bad_targets = host_of(tg, {B, T});
  Tensor seq = poisoned({1}, DType::F32);
  try {
    be->logprob_forward_segments(Backend::LogprobOutputs{seq, Tensor(), Tensor()}, logits, bad_targets, weights,
                                 host_of(std::vector<int32_t>{6, 9}, {1, 2}), V);
    ADD_FAILURE() << "accepted a bad target in a range";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("b=1, t=2"), std::string::npos) << e.what();
  }
  be->logprob_forward_segments(Backend::LogprobOutputs{seq, Tensor(), Tensor()}, logits, bad_targets, weights,
                               host_of(std::vector<int32_t>{0, 7}, {1, 2}), V);
  EXPECT_TRUE(std::isfinite(doubles_of(seq)[0]));
  // Boundary checks: seg must be I32 [S,2]; seq_logp / dseq must be [S].
  EXPECT_THROW(be->logprob_forward_segments(Backend::LogprobOutputs{seq, Tensor(), Tensor()}, logits, targets,
                                            weights, host_of(std::vector<int32_t>{0, 3, 4}, {3}), V),
               Error);
  EXPECT_THROW(be->logprob_forward_segments(Backend::LogprobOutputs{poisoned({2}, DType::F32), Tensor(), Tensor()},
                                            logits, targets, weights, host_of(std::vector<int32_t>{0, 3}, {1, 2}), V),
               Error);
  EXPECT_THROW(be->logprob_forward_segments(Backend::LogprobOutputs{seq, Tensor(), Tensor()}, logits, targets,
                                            weights, floats_of({0.0, 3.0}, {1, 2}, DType::F32), V),
               Error);
  Tensor dl = poisoned({B, T, V}, DType::F32);
  EXPECT_THROW(be->logprob_backward_segments(dl, logits, targets, weights, host_of(std::vector<int32_t>{0, 3}, {1, 2}),
                                             floats_of({1.0, 1.0}, {2}, DType::F32), V),
               Error);
}

}  // namespace
}  // namespace dpo
