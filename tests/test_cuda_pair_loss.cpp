// The CUDA preference loss (kernels/pair_loss.cuh, through CudaBackend::preference_loss) against the host
// function it shares with the CPU (pair_loss_eval of kernels/pair_loss.h, evaluated here on the host over the same
// fp32 inputs), for every loss type (TRL's exo_pair ... sigmoid_norm and simpo included) and f-divergence, ODPO
// offsets, reference-free, weighted sums of several terms (all fifteen types at once), and pair counts 0, 1, 7 and
// 1031 (not multiples of the kernel's 128 threads; 1031 > 8 x 128, so every thread handles several pairs).
// Outputs are poisoned with NaN before each call; the unused logit-sum column of the inputs is NaN (it must not be
// read); repeated calls must be bitwise equal; hand closed forms (TRL's values at known points) and extreme
// margins (|beta * Delta| = 1e4) check the device arithmetic directly. The per-sequence tensors are F32 whatever
// the activation dtype (grad_dtype(BF16) = F32), so the bf16 model path feeds this kernel the same F32 inputs.
// Without a GPU every test skips with the reason.
//
// Tolerances. The device evaluates the same double formulas as the host; they differ only by nvcc's FMA
// contraction and the device's exp / log1p (an ulp or so of double each), i.e. relative ~1e-15 of the
// intermediate values (|log-probs|, |margins| <= ~1e3 here), so 1e-12 * (1 + |value|) bounds the difference of
// the double results with three orders to spare. A float output is that double rounded once on each side: when
// the two doubles straddle a rounding boundary the floats differ by one ulp, 2^-23 |value| at most. Sums (double)
// are taken in a different order on each side: |error| <= P u sum|x_i| (Higham 3.1) ~ 1.2e-13 sum|x_i| for
// P = 1031, budget 1e-12 sum|x_i|. The accuracy count is exact (rewards are one subtraction and one product, so
// contraction cannot change them).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/pair_loss.h"
#include "test_pair_loss_util.h"
#include "kernels/seq_stats.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::params_for;

class CudaPairLoss : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    be_ = make_cuda_backend(0);
  }
  Backend& be() { return *be_; }
  std::unique_ptr<Backend> be_;
};


// Host inputs of P pairs in the log-prob forward's layout (kernels/seq_stats.h).
struct Inputs {
  int64_t P = 0;
  std::vector<float> stats, ref, offset;  // [2P, kSeqStatsWidth], [2P], [P]
};

Inputs random_inputs(std::mt19937_64& g, int64_t P) {
  std::uniform_real_distribution<double> lp(-300.0, -2.0), shift(-20.0, 20.0), gap(0.01, 8.0);
  std::uniform_int_distribution<int> len(1, 400);
  Inputs in;
  in.P = P;
  in.stats.assign(static_cast<size_t>(2 * P * kSeqStatsWidth), 0.0f);
  in.ref.resize(static_cast<size_t>(2 * P));
  in.offset.resize(static_cast<size_t>(P));
  for (int64_t r = 0; r < 2 * P; ++r) {
    const double ref = lp(g);
    in.ref[static_cast<size_t>(r)] = static_cast<float>(ref);
    float* row = &in.stats[static_cast<size_t>(r * kSeqStatsWidth)];
    row[kSeqLogp] = static_cast<float>(ref + shift(g));
    row[kSeqTokens] = static_cast<float>(len(g));
    row[kSeqLogitSum] = static_cast<float>(lp(g) * 40.0);  // metrics only (the kSumLogit* columns)
    // WPO's aligned log-prob sum: a per-token mean in [-3, -0.05] (log p - log sum p^2 <= 0).
    row[kSeqWpoLogp] = static_cast<float>(-row[kSeqTokens] * std::uniform_real_distribution<double>(0.05, 3.0)(g));
  }
  for (int64_t q = 0; q < P; ++q) in.offset[static_cast<size_t>(q)] = static_cast<float>(1.3 * std::log(gap(g)));
  return in;
}

Tensor host_f32(const std::vector<float>& v, Shape shape) {
  Tensor t = Tensor::host(std::move(shape), DType::F32);
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(float));
  return t;
}

// A device tensor whose every element is NaN (an output the kernel must overwrite).
Tensor poisoned(Backend& be, Shape shape, DType dt) {
  Tensor h = Tensor::host(shape, dt);
  if (h.nbytes() > 0) std::memset(h.raw(), 0xFF, static_cast<size_t>(h.nbytes()));  // NaN in F32 and F64
  Tensor d = be.empty(std::move(shape), dt);
  be.copy_from_host(d, h);
  return d;
}

struct DeviceResult {
  std::vector<double> dseq, pair_loss, sums;
};

DeviceResult run_device(Backend& be, const Inputs& in, const PairLossParams& p, double normalizer, bool with_ref,
                        bool with_offset, bool with_pair_loss = true) {
  const int64_t P = in.P;
  const Tensor stats = to_backend(be, host_f32(in.stats, {2 * P, kSeqStatsWidth}));
  const Tensor ref = with_ref ? to_backend(be, host_f32(in.ref, {2 * P})) : Tensor();
  const Tensor offset = with_offset ? to_backend(be, host_f32(in.offset, {P})) : Tensor();
  const Tensor dseq = poisoned(be, {2 * P}, DType::F32);
  const Tensor loss = with_pair_loss ? poisoned(be, {P}, DType::F32) : Tensor();
  const Tensor sums = poisoned(be, {kPairSumsWidth}, DType::F64);
  be.preference_loss({dseq, loss, sums}, stats, ref, offset, p, normalizer);
  DeviceResult r;
  r.dseq = to_host_f64(be, dseq);
  if (with_pair_loss) r.pair_loss = to_host_f64(be, loss);
  r.sums = to_host_f64(be, sums);
  return r;
}

// The host function over the same fp32 inputs: per-pair outputs rounded to float as the kernel stores them (kept
// in double here, with the unrounded value for the budget), sums in pair order plus the sums of magnitudes.
struct HostResult {
  std::vector<double> dseq, dseq_exact, pair_loss, loss_exact;
  double sums[kPairSumsWidth] = {}, mags[kPairSumsWidth] = {};
};

HostResult run_host(const Inputs& in, const PairLossParams& p, double normalizer, bool with_ref, bool with_offset) {
  const int64_t P = in.P;
  HostResult h;
  h.dseq.resize(static_cast<size_t>(2 * P));
  h.dseq_exact.resize(static_cast<size_t>(2 * P));
  h.pair_loss.resize(static_cast<size_t>(P));
  h.loss_exact.resize(static_cast<size_t>(P));
  for (int64_t q = 0; q < P; ++q) {
    const PairLossInput x = pair_input_at(in.stats.data(), with_ref ? in.ref.data() : nullptr,
                                          with_offset ? in.offset.data() : nullptr, P, q);
    const PairLossOutput o = pair_loss_eval(p, x);
    const auto c = static_cast<size_t>(q), r = static_cast<size_t>(P + q);
    h.dseq_exact[c] = o.d_chosen / normalizer;
    h.dseq_exact[r] = o.d_rejected / normalizer;
    h.dseq[c] = static_cast<float>(h.dseq_exact[c]);
    h.dseq[r] = static_cast<float>(h.dseq_exact[r]);
    h.loss_exact[c] = o.loss;
    h.pair_loss[c] = static_cast<float>(o.loss);
    pair_sums_add(h.sums, x, o);
    double one[kPairSumsWidth] = {};
    pair_sums_add(one, x, o);
    for (int k = 0; k < kPairSumsWidth; ++k) h.mags[k] += std::fabs(one[k]);
  }
  return h;
}

void expect_float_close(const std::vector<double>& got, const std::vector<double>& exact, const std::string& what) {
  ASSERT_EQ(got.size(), exact.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = std::ldexp(std::fabs(exact[i]), -23) + 1e-12 * (1.0 + std::fabs(exact[i]));
    if (!(std::fabs(got[i] - exact[i]) <= tol) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " outside the budget; first at " << first
                     << ": got " << (got.empty() ? 0.0 : got[first]) << ", want "
                     << (exact.empty() ? 0.0 : exact[first]);
}

void compare(const DeviceResult& d, const HostResult& h, int64_t P, bool with_pair_loss) {
  expect_float_close(d.dseq, h.dseq_exact, "dseq");
  if (with_pair_loss) expect_float_close(d.pair_loss, h.loss_exact, "pair_loss");
  ASSERT_EQ(d.sums.size(), static_cast<size_t>(kPairSumsWidth));
  for (int k = 0; k < kPairSumsWidth; ++k) {
    if (k == kSumAccuracy) {
      EXPECT_EQ(d.sums[k], h.sums[k]) << "accuracy count, P = " << P;
      continue;
    }
    EXPECT_NEAR(d.sums[k], h.sums[k], 1e-12 * h.mags[k] + 1e-300) << "sum column " << k << ", P = " << P;
  }
}

// p with one more setting changed by `f`.
template <class F>
PairLossParams with(PairLossParams p, F f) {
  f(p);
  return p;
}

struct Case {
  std::string name;
  PairLossParams p;
  bool with_offset;
};

std::vector<Case> every_loss() {
  return {
      {"sigmoid", params_for({{LossType::Sigmoid, 1.0}}, 0.1), false},
      {"odpo", params_for({{LossType::Sigmoid, 1.0}}, 0.1), true},
      {"cdpo", params_for({{LossType::Cdpo, 1.0}}, 0.3, 0.2), false},
      {"robust", params_for({{LossType::Robust, 1.0}}, 0.5, 0.15), false},
      {"hinge", params_for({{LossType::Hinge, 1.0}}, 0.05), false},
      {"ipo_per_token", params_for({{LossType::Ipo, 1.0}}, 0.1, 0.0, IpoNorm::PerToken), false},
      {"ipo_summed", params_for({{LossType::Ipo, 1.0}}, 0.1, 0.0, IpoNorm::Summed), false},
      {"sft", params_for({{LossType::Sft, 1.0}}, 0.1), false},
      {"rpo", params_for({{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.5}}, 0.1), true},
      {"reference_free", params_for({{LossType::Cdpo, 1.0}, {LossType::Ipo, 0.2}}, 0.2, 0.1, IpoNorm::PerToken,
                                    RefMode::ReferenceFree),
       false},
      {"exo_pair", params_for({{LossType::ExoPair, 1.0}}, 0.1, 1e-3), false},
      {"nca_pair", params_for({{LossType::NcaPair, 1.0}}, 0.2), false},
      {"bco_pair", params_for({{LossType::BcoPair, 1.0}}, 0.2), false},
      {"sppo_hard", params_for({{LossType::SppoHard, 1.0}}, 0.5), false},
      {"apo_zero", params_for({{LossType::ApoZero, 1.0}}, 0.1), false},
      {"apo_down", params_for({{LossType::ApoDown, 1.0}}, 0.1), false},
      {"discopop", with(params_for({{LossType::Discopop, 1.0}}, 0.05), [](PairLossParams& p) { p.discopop_tau = 0.3; }),
       false},
      {"sigmoid_norm", params_for({{LossType::SigmoidNorm, 1.0}}, 0.5), false},
      {"simpo", with(params_for({{LossType::Simpo, 1.0}}, 2.0, 0.1, IpoNorm::PerToken, RefMode::ReferenceFree),
                     [](PairLossParams& p) { p.simpo_gamma = 1.2; }),
       false},
      {"forward_kl", with(params_for({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}}, 0.1),
                          [](PairLossParams& p) { p.f_div = FDivergence::ForwardKl; }),
       true},
      {"js_divergence",
       with(params_for({{LossType::SigmoidNorm, 1.0}, {LossType::Discopop, 0.5}, {LossType::ExoPair, 0.3}}, 0.2, 0.05),
            [](PairLossParams& p) { p.f_div = FDivergence::Js; }),
       false},
      {"alpha_divergence",
       with(params_for({{LossType::Robust, 1.0}, {LossType::Hinge, 0.5}, {LossType::Sft, 0.2}}, 0.1, 0.1),
            [](PairLossParams& p) {
              p.f_div = FDivergence::Alpha;
              p.f_alpha = 0.6;
            }),
       false},
      {"wpo", with(params_for({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}, {LossType::Sft, 0.3}}, 0.1),
                   [](PairLossParams& p) { p.weighting = PairWeighting::Wpo; }),
       true},
      {"all_six_weighted",
       params_for({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.25}, {LossType::Hinge, 0.5}, {LossType::Robust, 0.3},
                   {LossType::Cdpo, 2.0}, {LossType::Sft, 0.7}},
                  0.2, 0.15),
       true},
      {"all_fifteen_weighted",
       params_for({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.05}, {LossType::Hinge, 0.5}, {LossType::Robust, 0.3},
                   {LossType::Cdpo, 2.0}, {LossType::Sft, 0.7}, {LossType::ExoPair, 0.4}, {LossType::NcaPair, 0.6},
                   {LossType::BcoPair, 0.2}, {LossType::SppoHard, 0.01}, {LossType::ApoZero, 1.5},
                   {LossType::ApoDown, 0.8}, {LossType::Discopop, 0.9}, {LossType::SigmoidNorm, 1.1},
                   {LossType::Simpo, 0.35}},
                  0.2, 0.15),
       true},
  };
}

TEST_F(CudaPairLoss, EveryLossTypeMatchesTheHostFunction) {
  uint64_t seed = test::test_seed();
  for (const Case& c : every_loss())
    for (int64_t P : {1, 7, 1031}) {
      SCOPED_TRACE(c.name + ", P = " + std::to_string(P));
      std::mt19937_64 g(++seed);
      const Inputs in = random_inputs(g, P);
      const bool with_ref = c.p.ref == RefMode::WithReference;
      const double normalizer = static_cast<double>(2 * P + 5);
      const DeviceResult d = run_device(be(), in, c.p, normalizer, with_ref, c.with_offset);
      compare(d, run_host(in, c.p, normalizer, with_ref, c.with_offset), P, true);
    }
}

// The batch sums are in a fixed order (one block, fixed tree): two calls give the same bits; so do the per-pair
// outputs, and leaving out the optional per-pair loss changes nothing else.
TEST_F(CudaPairLoss, RepeatedCallsAreBitwiseEqual) {
  std::mt19937_64 g(test::test_seed());
  const Inputs in = random_inputs(g, 1031);
  const Case c = every_loss().back();
  const DeviceResult a = run_device(be(), in, c.p, 64.0, true, true);
  const DeviceResult b = run_device(be(), in, c.p, 64.0, true, true);
  const DeviceResult n = run_device(be(), in, c.p, 64.0, true, true, /*with_pair_loss=*/false);
  auto same = [](const std::vector<double>& x, const std::vector<double>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0;
  };
  EXPECT_TRUE(same(a.dseq, b.dseq));
  EXPECT_TRUE(same(a.pair_loss, b.pair_loss));
  EXPECT_TRUE(same(a.sums, b.sums));
  EXPECT_TRUE(same(a.dseq, n.dseq));
  EXPECT_TRUE(same(a.sums, n.sums));
}

// Pair ranges, as the chunked LM head calls it: ranges [0, a), [a, b), [b, P) with accumulate on the later two give
// the per-pair outputs of one whole-batch call bitwise (each pair is independent) and the same sums to the fixed
// budget of the sums (the grouping of the additions differs: three trees added in order); a range leaves the
// other pairs' entries as they were (poison).
TEST_F(CudaPairLoss, PairRangesAccumulateToTheWholeBatch) {
  std::mt19937_64 g(test::test_seed());
  const int64_t P = 700;
  const Inputs in = random_inputs(g, P);
  const Case c = every_loss().back();
  const DeviceResult whole = run_device(be(), in, c.p, 64.0, true, true);
  const Tensor stats = to_backend(be(), host_f32(in.stats, {2 * P, kSeqStatsWidth}));
  const Tensor ref = to_backend(be(), host_f32(in.ref, {2 * P}));
  const Tensor offset = to_backend(be(), host_f32(in.offset, {P}));
  const Tensor dseq = poisoned(be(), {2 * P}, DType::F32), loss = poisoned(be(), {P}, DType::F32);
  const Tensor sums = poisoned(be(), {kPairSumsWidth}, DType::F64);
  const int64_t cuts[4] = {0, 1, 300, P};
  for (int i = 0; i < 3; ++i) {
    Backend::PairLossOutputs o{dseq, loss, sums};
    o.accumulate = i > 0;
    be().preference_loss(o, stats, ref, offset, c.p, 64.0, cuts[i], cuts[i + 1]);
    if (i == 0) {
      const std::vector<double> d = to_host_f64(be(), dseq);
      EXPECT_TRUE(std::isnan(d[1]) && std::isnan(d[P + 1]) && std::isnan(d[P - 1])) << "pairs past the range";
      EXPECT_EQ(d[0], whole.dseq[0]);
    }
  }
  EXPECT_EQ(to_host_f64(be(), dseq), whole.dseq);
  EXPECT_EQ(to_host_f64(be(), loss), whole.pair_loss);
  const HostResult h = run_host(in, c.p, 64.0, true, true);
  const std::vector<double> s = to_host_f64(be(), sums);
  for (int k = 0; k < kPairSumsWidth; ++k)
    EXPECT_NEAR(s[k], whole.sums[k], 2e-12 * h.mags[k] + 1e-300) << "sum column " << k;
}

// A rank or micro-batch without pairs: every sum is written, as 0.
TEST_F(CudaPairLoss, EmptyBatchWritesZeroSums) {
  const Inputs in;  // P = 0
  const DeviceResult d = run_device(be(), in, every_loss().front().p, 1.0, true, false);
  ASSERT_EQ(d.sums.size(), static_cast<size_t>(kPairSumsWidth));
  for (int k = 0; k < kPairSumsWidth; ++k) EXPECT_EQ(d.sums[k], 0.0) << k;
}

// Hand closed forms (TRL's formulas at known points) and extreme margins, evaluated by the kernel.
TEST_F(CudaPairLoss, ClosedFormsAndExtremeMargins) {
  // Pair 0: Delta = 0. Pair 1: Delta = +1e4 (beta 1). Pair 2: Delta = -1e4. Lengths 4 and 8.
  Inputs in;
  in.P = 3;
  const float pc[3] = {-7, 0, -1e4}, pr[3] = {-9, -1e4, 0}, rc[3] = {-7, 0, 0}, rr[3] = {-9, 0, 0};
  in.stats.assign(static_cast<size_t>(6 * kSeqStatsWidth), 0.0f);
  in.ref.resize(6);
  in.offset.assign(3, 0.0f);
  for (int q = 0; q < 3; ++q) {
    in.stats[static_cast<size_t>(q * kSeqStatsWidth + kSeqLogp)] = pc[q];
    in.stats[static_cast<size_t>((3 + q) * kSeqStatsWidth + kSeqLogp)] = pr[q];
    in.stats[static_cast<size_t>(q * kSeqStatsWidth + kSeqTokens)] = 4;
    in.stats[static_cast<size_t>((3 + q) * kSeqStatsWidth + kSeqTokens)] = 8;
    in.ref[static_cast<size_t>(q)] = rc[q];
    in.ref[static_cast<size_t>(3 + q)] = rr[q];
  }
  {
    // sigmoid, beta 1: -log s(0) = log 2, d = -beta/2, +beta/2; at +1e4: 0 and 0; at -1e4: 1e4, -1, +1.
    const DeviceResult d = run_device(be(), in, params_for({{LossType::Sigmoid, 1.0}}, 1.0), 1.0, true, false);
    EXPECT_NEAR(d.pair_loss[0], std::log(2.0), 1e-7);
    EXPECT_EQ(d.dseq[0], -0.5);
    EXPECT_EQ(d.dseq[3], 0.5);
    EXPECT_EQ(d.pair_loss[1], 0.0);
    EXPECT_EQ(d.dseq[1], 0.0);
    EXPECT_EQ(d.pair_loss[2], 1e4);
    EXPECT_EQ(d.dseq[2], -1.0);
    EXPECT_EQ(d.dseq[5], 1.0);
    EXPECT_EQ(d.sums[kSumAccuracy], 1.0);  // only pair 1 has reward_chosen > reward_rejected
    EXPECT_EQ(d.sums[kSumLogpChosen], -7.0 + 0.0 - 1e4);
  }
  {
    // hinge, beta 0.5: max(0, 1 - z): 1 at z = 0 (d = -beta), 0 beyond the margin, 1 + 5000 below.
    const DeviceResult d = run_device(be(), in, params_for({{LossType::Hinge, 1.0}}, 0.5), 2.0, true, false);
    EXPECT_EQ(d.pair_loss[0], 1.0);
    EXPECT_EQ(d.dseq[0], -0.25);  // -beta / normalizer
    EXPECT_EQ(d.pair_loss[1], 0.0);
    EXPECT_EQ(d.pair_loss[2], 5001.0);
  }
  {
    // sft: -pc / len_chosen; its gradient -1 / len_chosen on the chosen row only.
    const DeviceResult d = run_device(be(), in, params_for({{LossType::Sft, 1.0}}, 0.1), 1.0, true, false);
    EXPECT_EQ(d.pair_loss[0], 7.0 / 4.0);
    EXPECT_EQ(d.dseq[0], -0.25);
    EXPECT_EQ(d.dseq[3], 0.0);
  }
  {
    // Summed ipo, beta 0.25: (Delta - 2)^2 = 4 at Delta = 0, d = 2 (Delta - 2) = -4 / +4.
    const DeviceResult d =
        run_device(be(), in, params_for({{LossType::Ipo, 1.0}}, 0.25, 0.0, IpoNorm::Summed), 1.0, true, false);
    EXPECT_EQ(d.pair_loss[0], 4.0);
    EXPECT_EQ(d.dseq[0], -4.0);
    EXPECT_EQ(d.dseq[3], 4.0);
  }
  {
    // cdpo / robust at |z| = 1e4 stay finite (their asymptotes: TRL's formulas with log s(-|z|) ~ -|z|).
    for (LossType t : {LossType::Cdpo, LossType::Robust}) {
      const DeviceResult d = run_device(be(), in, params_for({{t, 1.0}}, 1.0, 0.2), 1.0, true, false);
      for (double v : d.pair_loss) EXPECT_TRUE(std::isfinite(v));
      for (double v : d.dseq) EXPECT_TRUE(std::isfinite(v));
      const double want = t == LossType::Cdpo ? 0.8 * 1e4 : 0.8 * 1e4 / 0.6;  // stored as float: 2^-24 relative
      EXPECT_NEAR(d.pair_loss[2], want, std::ldexp(want, -23)) << static_cast<int>(t);
    }
  }
  {
    // TRL's per-pair losses at log-ratios 0 (pair 0; s(0) = 1/2), and finite at |beta * Delta| = 1e4 (pairs 1, 2).
    // Pair 0's values are float-rounded doubles: 2^-24 relative.
    const double ln2 = std::log(2.0), eps = 0.1;
    const std::pair<LossType, double> at_zero[] = {
        {LossType::ExoPair, -ln2 - 0.5 * std::log(eps * (1 - eps))}, {LossType::NcaPair, 2 * ln2},
        {LossType::BcoPair, 2 * ln2}, {LossType::SppoHard, 0.5}, {LossType::ApoZero, 1.0}, {LossType::ApoDown, 1.0},
        {LossType::Discopop, 0.5 * (ln2 + 1)}, {LossType::SigmoidNorm, ln2}};
    for (const auto& [t, want] : at_zero) {
      const DeviceResult d = run_device(be(), in, params_for({{t, 1.0}}, 1.0, t == LossType::ExoPair ? eps : 0.0),
                                        1.0, true, false);
      EXPECT_NEAR(d.pair_loss[0], want, std::ldexp(want, -23)) << static_cast<int>(t);
      for (double v : d.pair_loss) EXPECT_TRUE(std::isfinite(v)) << static_cast<int>(t);
      for (double v : d.dseq) EXPECT_TRUE(std::isfinite(v)) << static_cast<int>(t);
    }
  }
}

// The argument checks run before any launch (dpo::Error naming the argument).
TEST_F(CudaPairLoss, RejectsBadArguments) {
  std::mt19937_64 g(test::test_seed());
  const Inputs in = random_inputs(g, 3);
  const Tensor stats = to_backend(be(), host_f32(in.stats, {6, kSeqStatsWidth}));
  const Tensor ref = to_backend(be(), host_f32(in.ref, {6}));
  const Tensor dseq = be().empty({6}, DType::F32), sums = be().empty({kPairSumsWidth}, DType::F64);
  const PairLossParams ok = params_for({{LossType::Sigmoid, 1.0}}, 0.1);
  auto msg = [&](const Backend::PairLossOutputs& o, const Tensor& s, const Tensor& r) {
    try {
      be().preference_loss(o, s, r, Tensor(), ok, 1.0);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<no exception>");
  };
  EXPECT_NE(msg({dseq, Tensor(), sums}, host_f32(in.stats, {6, kSeqStatsWidth}), ref).find("stats"),
            std::string::npos);  // a host tensor
  EXPECT_NE(msg({dseq, Tensor(), be().empty({kPairSumsWidth}, DType::F32)}, stats, ref).find("sums"),
            std::string::npos);
  EXPECT_NE(msg({dseq, Tensor(), sums}, stats, Tensor()).find("ref_logp"), std::string::npos);
  EXPECT_NE(msg({stats.reshape({6 * kSeqStatsWidth}), Tensor(), sums}, stats, ref).find("dseq"), std::string::npos);
  EXPECT_EQ(msg({dseq, Tensor(), sums}, stats, ref), "<no exception>");
}

}  // namespace
}  // namespace dpo
