// Preference losses (train/loss.h): closed forms against independent long-double code, derivatives against central
// finite differences, stability at |beta*Delta| = 1e4, batch normalisation (the gradient-accumulation rule), and
// config validation.
//
// The long-double references use the naive formulas (log(1 + exp(x)), 1/(1 + exp(-x))): long double's exponent
// range (to ~1e4932) keeps them finite at |x| = 1e4, so they share no code or trick with the stable double
// implementation under test.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/pair_loss.h"
#include "test_pair_loss_util.h"
#include "runtime/backend.h"
#include "runtime/error.h"
#include "test_util.h"
#include "train/loss.h"

namespace dpo {
namespace {

using LD = long double;

using test::params_for;
constexpr double kInf = std::numeric_limits<double>::infinity();

LD ref_softplus(LD x) { return std::log(1.0L + std::exp(x)); }
LD ref_sigmoid(LD x) { return 1.0L / (1.0L + std::exp(-x)); }

// Expected pair loss and derivatives (w.r.t. policy_chosen, policy_rejected) for a single-term config.
struct Expected {
  LD loss, dc, dr;
};

Expected expected(LossType t, const LossConfig& cfg, const PairInput& in) {
  const LD beta = cfg.beta, eps = cfg.label_smoothing;
  const LD rc = cfg.reference_free ? 0.0L : (LD)in.ref_chosen;
  const LD rr = cfg.reference_free ? 0.0L : (LD)in.ref_rejected;
  LD c = (LD)in.policy_chosen - rc, r = (LD)in.policy_rejected - rr;
  LD D = c - r;
  LD z = beta * D;
  switch (t) {
    case LossType::Sigmoid: {
      LD off = 0;
      if (cfg.odpo_alpha > 0) off = (LD)cfg.odpo_alpha * std::log((LD)in.score_chosen - (LD)in.score_rejected);
      LD u = z - off;
      // -log(1/(1+e^-u)) = log(1+e^-u); d/du = -e^-u/(1+e^-u) = -(1 - sigma(u))
      LD g = -(1.0L - ref_sigmoid(u));
      return {ref_softplus(-u), g * beta, -g * beta};
    }
    case LossType::Cdpo: {
      LD loss = -(1 - eps) * std::log(ref_sigmoid(z)) - eps * std::log(ref_sigmoid(-z));
      if (std::fabs(z) > 50) loss = (1 - eps) * ref_softplus(-z) + eps * ref_softplus(z);  // log(sigma) underflows
      LD g = -(1 - eps) * (1 - ref_sigmoid(z)) + eps * (1 - ref_sigmoid(-z));
      return {loss, g * beta, -g * beta};
    }
    case LossType::Robust: {
      LD loss = (-(1 - eps) * -ref_softplus(-z) + eps * -ref_softplus(z)) / (1 - 2 * eps);
      LD g = (-(1 - eps) * (1 - ref_sigmoid(z)) - eps * (1 - ref_sigmoid(-z))) / (1 - 2 * eps);
      return {loss, g * beta, -g * beta};
    }
    case LossType::Ipo: {
      LD lc = 1, lr = 1;
      if (cfg.ipo_length_normalize) lc = (LD)in.len_chosen, lr = (LD)in.len_rejected;
      LD d = c / lc - r / lr - 1.0L / (2.0L * beta);
      return {d * d, 2 * d / lc, -2 * d / lr};
    }
    case LossType::Hinge: {
      if (z < 1) return {1 - z, -beta, beta};
      return {0, 0, 0};
    }
    case LossType::Sft:
      return {-(LD)in.policy_chosen / (LD)in.len_chosen, -1.0L / (LD)in.len_chosen, 0};
    default:  // the other types: tests/test_more_losses.cpp
      ADD_FAILURE() << "expected(): type " << static_cast<int>(t) << " is tested in test_more_losses";
      break;
  }
  return {0, 0, 0};
}

LossConfig single(LossType t, double beta = 0.1, double eps = 0.0) {
  LossConfig cfg;
  cfg.terms = {{t, 1.0}};
  cfg.beta = beta;
  cfg.label_smoothing = eps;
  return cfg;
}

PairInput pair(double pc, double pr, double rc, double rr, int64_t lc = 10, int64_t lr = 12) {
  PairInput p;
  p.policy_chosen = pc;
  p.policy_rejected = pr;
  p.ref_chosen = rc;
  p.ref_rejected = rr;
  p.len_chosen = lc;
  p.len_rejected = lr;
  return p;
}

// A pair with Delta = delta exactly representable around typical log-prob magnitudes.
PairInput pair_with_delta(double delta) { return pair(-40.0 + delta, -50.0, -42.0, -52.0); }

std::vector<PairInput> random_pairs(std::mt19937_64& g, size_t n) {
  std::uniform_real_distribution<double> lp(-200.0, -5.0), shift(-15.0, 15.0);
  std::uniform_int_distribution<int64_t> len(1, 300);
  std::vector<PairInput> v;
  for (size_t i = 0; i < n; ++i) {
    double rc = lp(g), rr = lp(g);
    PairInput p = pair(rc + shift(g), rr + shift(g), rc, rr, len(g), len(g));
    p.has_scores = true;
    p.score_rejected = std::uniform_real_distribution<double>(0, 5)(g);
    p.score_chosen = p.score_rejected + std::uniform_real_distribution<double>(0.01, 5)(g);
    v.push_back(p);
  }
  return v;
}

// Hand-picked points: Delta = 0, small, moderate, both signs; plus non-trivial refs.
std::vector<PairInput> hand_pairs() {
  return {pair(-10, -10, -10, -10), pair(-12.5, -20, -13, -19), pair(-30, -10, -25, -11),
          pair(-100, -140, -110, -120), pair(-3, -60, -4, -55), pair(-80, -20, -70, -40)};
}

void expect_close(double got, LD want, double rel, const std::string& what) {
  const double tol = rel * std::max(1.0, (double)std::fabs(want));
  EXPECT_NEAR(got, (double)want, tol) << what;
}

void check_closed_form(LossType t, const LossConfig& cfg, const std::vector<PairInput>& pairs) {
  for (size_t i = 0; i < pairs.size(); ++i) {
    const PairOutput o = pair_loss(cfg, pairs[i]);
    const Expected e = expected(t, cfg, pairs[i]);
    const std::string at = std::string(loss_type_name(t)) + " pair " + std::to_string(i);
    expect_close(o.loss, e.loss, 1e-12, at + " loss");
    expect_close(o.d_policy_chosen, e.dc, 1e-12, at + " d_chosen");
    expect_close(o.d_policy_rejected, e.dr, 1e-12, at + " d_rejected");
  }
}

// d loss / d (policy_chosen, policy_rejected) against central differences.
// Tolerance: h = 1e-6, loss O(1..100) and smooth at the test points (hinge points stay > 1e-3 from the kink), so
// truncation h^2 |f'''|/6 <~ 1e-11 and round-off eps |f| / h <~ 1e-8; relative to max(1, |grad|) 1e-6 leaves
// two orders of margin while still catching any wrong factor or sign.
void check_fd(const LossConfig& cfg, PairInput p) {
  std::vector<double> x = {p.policy_chosen, p.policy_rejected};
  auto f = [&] {
    PairInput q = p;
    q.policy_chosen = x[0];
    q.policy_rejected = x[1];
    return pair_loss(cfg, q).loss;
  };
  const std::vector<double> num = test::numeric_grad(x, f, 1e-6);
  const PairOutput o = pair_loss(cfg, p);
  EXPECT_LT(test::max_rel_err({o.d_policy_chosen, o.d_policy_rejected}, num), 1e-6)
      << "analytic " << o.d_policy_chosen << ", " << o.d_policy_rejected << " numeric " << num[0] << ", " << num[1];
}

// The message of a dpo::Error that is not an InputError: a violated precondition of the per-pair function
// (kernels/pair_loss.h), which the data loaders rule out, so reaching the loss with it is a caller bug.
template <class F>
std::string precondition_message(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return std::string("<InputError: ") + e.what() + ">";
  } catch (const Error& e) {
    return e.what();
  } catch (...) {
    return "<other exception>";
  }
  return "<no exception>";
}

template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  } catch (...) {
    return "<other exception>";
  }
  return "<no exception>";
}

// --- primitives ------------------------------------------------------------------------------------------------

TEST(Loss, StablePrimitivesMatchNaiveLongDouble) {
  for (double x : {-1e4, -700.0, -50.0, -20.0, -1.0, -1e-8, 0.0, 1e-8, 0.5, 3.0, 37.0, 50.0, 710.0, 1e4}) {
    const LD sp = ref_softplus(x);
    EXPECT_TRUE(std::isfinite(softplus(x))) << x;
    // Naive log(1+e^x) in long double loses relative accuracy only where softplus < 1e-9 (x < -20); compare
    // absolutely there.
    if (x < -20)
      EXPECT_NEAR(softplus(x), (double)sp, 1e-18) << x;
    else
      EXPECT_NEAR(softplus(x), (double)sp, 1e-15 * std::max(1.0, (double)sp)) << x;
    EXPECT_NEAR(log_sigmoid(x), (double)-ref_softplus(-x), 1e-15 * std::max(1.0, std::fabs(x))) << x;
    EXPECT_NEAR(sigmoid(x), (double)ref_sigmoid(x), 4e-16) << x;  // a few ulps of 1
  }
  EXPECT_EQ(sigmoid(-1e4), 0.0);
  EXPECT_EQ(sigmoid(1e4), 1.0);
  EXPECT_DOUBLE_EQ(softplus(0), std::log(2.0));
}

// --- sigmoid (DPO) ---------------------------------------------------------------------------------------------

TEST(Loss, SigmoidMatchesClosedForm) {
  std::mt19937_64 g(test::test_seed());
  for (double beta : {0.1, 0.5, 2.0}) {
    check_closed_form(LossType::Sigmoid, single(LossType::Sigmoid, beta), hand_pairs());
    check_closed_form(LossType::Sigmoid, single(LossType::Sigmoid, beta), random_pairs(g, 20));
  }
}

TEST(Loss, SigmoidAtZeroIsLog2WithGradientHalfBeta) {
  for (double beta : {0.1, 1.0, 3.0}) {
    const PairOutput o = pair_loss(single(LossType::Sigmoid, beta), pair(-7, -9, -7, -9));
    EXPECT_DOUBLE_EQ(o.loss, std::log(2.0));
    EXPECT_DOUBLE_EQ(o.d_policy_chosen, -beta / 2);
    EXPECT_DOUBLE_EQ(o.d_policy_rejected, beta / 2);
  }
}

TEST(Loss, SigmoidStableAtExtremeMargins) {
  const LossConfig cfg = single(LossType::Sigmoid, 1.0);
  // beta*Delta = +1e4: loss -> 0, gradient -> 0.
  PairOutput hi = pair_loss(cfg, pair(0, -1e4, 0, 0));
  EXPECT_TRUE(std::isfinite(hi.loss) && std::isfinite(hi.d_policy_chosen) && std::isfinite(hi.d_policy_rejected));
  EXPECT_EQ(hi.loss, 0.0);
  EXPECT_EQ(hi.d_policy_chosen, 0.0);
  // beta*Delta = -1e4: loss -> |beta*Delta|, gradient -> -beta / +beta.
  PairOutput lo = pair_loss(cfg, pair(-1e4, 0, 0, 0));
  EXPECT_TRUE(std::isfinite(lo.loss) && std::isfinite(lo.d_policy_chosen) && std::isfinite(lo.d_policy_rejected));
  EXPECT_DOUBLE_EQ(lo.loss, 1e4);
  EXPECT_DOUBLE_EQ(lo.d_policy_chosen, -1.0);
  EXPECT_DOUBLE_EQ(lo.d_policy_rejected, 1.0);
  // Same with a small beta and a huge Delta.
  PairOutput lo2 = pair_loss(single(LossType::Sigmoid, 0.1), pair(-1e5, 0, 0, 0));
  EXPECT_NEAR(lo2.loss, 1e4, 1e-9);
  EXPECT_DOUBLE_EQ(lo2.d_policy_chosen, -0.1);
}

// --- cdpo / robust ---------------------------------------------------------------------------------------------

TEST(Loss, CdpoMatchesClosedForm) {
  std::mt19937_64 g(test::test_seed());
  for (double eps : {0.0, 0.1, 0.3, 0.49})
    for (double beta : {0.1, 1.0}) {
      check_closed_form(LossType::Cdpo, single(LossType::Cdpo, beta, eps), hand_pairs());
      check_closed_form(LossType::Cdpo, single(LossType::Cdpo, beta, eps), random_pairs(g, 10));
    }
}

TEST(Loss, RobustMatchesClosedForm) {
  std::mt19937_64 g(test::test_seed());
  for (double eps : {0.0, 0.1, 0.3, 0.45})
    for (double beta : {0.1, 1.0}) {
      check_closed_form(LossType::Robust, single(LossType::Robust, beta, eps), hand_pairs());
      check_closed_form(LossType::Robust, single(LossType::Robust, beta, eps), random_pairs(g, 10));
    }
}

TEST(Loss, CdpoAndRobustWithZeroEpsilonEqualSigmoid) {
  std::mt19937_64 g(test::test_seed());
  auto pairs = random_pairs(g, 30);
  for (auto p : hand_pairs()) pairs.push_back(p);
  for (const auto& p : pairs) {
    const PairOutput s = pair_loss(single(LossType::Sigmoid, 0.2), p);
    for (LossType t : {LossType::Cdpo, LossType::Robust}) {
      const PairOutput o = pair_loss(single(t, 0.2, 0.0), p);
      EXPECT_DOUBLE_EQ(o.loss, s.loss);
      EXPECT_DOUBLE_EQ(o.d_policy_chosen, s.d_policy_chosen);
      EXPECT_DOUBLE_EQ(o.d_policy_rejected, s.d_policy_rejected);
    }
  }
}

TEST(Loss, CdpoAndRobustStableAtExtremeMargins) {
  const double eps = 0.2, beta = 1.0;
  for (double z : {-1e4, 1e4}) {
    const PairInput p = z > 0 ? pair(0, -z, 0, 0) : pair(z, 0, 0, 0);
    const PairOutput c = pair_loss(single(LossType::Cdpo, beta, eps), p);
    const PairOutput r = pair_loss(single(LossType::Robust, beta, eps), p);
    for (double v : {c.loss, c.d_policy_chosen, c.d_policy_rejected, r.loss, r.d_policy_chosen, r.d_policy_rejected})
      EXPECT_TRUE(std::isfinite(v)) << z;
    // Asymptotes: cdpo -> (1-eps) max(-z,0) + eps max(z,0); robust -> [(1-eps) max(-z,0) - eps max(z,0)]/(1-2eps).
    EXPECT_DOUBLE_EQ(c.loss, (1 - eps) * std::max(-z, 0.0) + eps * std::max(z, 0.0));
    EXPECT_DOUBLE_EQ(r.loss, ((1 - eps) * std::max(-z, 0.0) - eps * std::max(z, 0.0)) / (1 - 2 * eps));
    EXPECT_DOUBLE_EQ(c.d_policy_chosen, z > 0 ? eps * beta : -(1 - eps) * beta);
    EXPECT_DOUBLE_EQ(r.d_policy_chosen, z > 0 ? -eps * beta / (1 - 2 * eps) : -(1 - eps) * beta / (1 - 2 * eps));
  }
}

TEST(Loss, CdpoIsMinimisedAtTheSmoothedOptimum) {
  // d/dz [-(1-eps) log s(z) - eps log s(-z)] = 0 at s(z) = 1 - eps, i.e. z* = log((1-eps)/eps).
  const double eps = 0.1, beta = 0.5;
  const double delta = std::log((1 - eps) / eps) / beta;
  const PairOutput o = pair_loss(single(LossType::Cdpo, beta, eps), pair_with_delta(delta));
  EXPECT_NEAR(o.d_policy_chosen, 0.0, 1e-14);
  EXPECT_NEAR(o.d_policy_rejected, 0.0, 1e-14);
}

// --- ipo -------------------------------------------------------------------------------------------------------

TEST(Loss, IpoMatchesClosedForm) {
  std::mt19937_64 g(test::test_seed());
  for (bool norm : {false, true})
    for (double beta : {0.05, 0.1, 1.0}) {
      LossConfig cfg = single(LossType::Ipo, beta);
      cfg.ipo_length_normalize = norm;
      check_closed_form(LossType::Ipo, cfg, hand_pairs());
      check_closed_form(LossType::Ipo, cfg, random_pairs(g, 20));
    }
}

// The IPO paper's form (ipo_length_normalize: false): summed log-ratios.
TEST(Loss, IpoSumFormMinimumAtHalfInverseBeta) {
  for (double beta : {0.1, 0.25, 2.0}) {
    LossConfig cfg = single(LossType::Ipo, beta);
    cfg.ipo_length_normalize = false;
    const double target = 1.0 / (2 * beta);
    const PairOutput at = pair_loss(cfg, pair_with_delta(target));
    EXPECT_NEAR(at.loss, 0.0, 1e-24);
    EXPECT_NEAR(at.d_policy_chosen, 0.0, 1e-12);
    for (double off : {-0.5, 0.5}) {
      const PairOutput o = pair_loss(cfg, pair_with_delta(target + off));
      EXPECT_NEAR(o.loss, off * off, 1e-12);
      EXPECT_GT(o.loss, at.loss);
      EXPECT_NEAR(o.d_policy_chosen, 2 * off, 1e-12);  // pushes Delta back towards 1/(2 beta)
    }
  }
}

// TRL's ipo (trl/trainer/dpo_trainer.py, v1.9): chosen_avg = chosen_logratio / n_chosen, rejected_avg likewise,
// loss = (chosen_avg - rejected_avg - 1/(2 beta))^2, n = the completion token count. It is the default.
TEST(Loss, IpoDefaultIsTrlLengthNormalised) {
  EXPECT_TRUE(LossConfig{}.ipo_length_normalize);
  const LossConfig cfg = single(LossType::Ipo, 0.25);  // the default, nothing set
  std::mt19937_64 g(test::test_seed());
  for (const PairInput& p : random_pairs(g, 30)) {
    // Written from TRL's expression, in long double.
    const LD chosen_avg = ((LD)p.policy_chosen - (LD)p.ref_chosen) / (LD)p.len_chosen;
    const LD rejected_avg = ((LD)p.policy_rejected - (LD)p.ref_rejected) / (LD)p.len_rejected;
    const LD d = chosen_avg - rejected_avg - 1.0L / (2.0L * 0.25L);
    const PairOutput o = pair_loss(cfg, p);
    // Relative 1e-12: a few double roundings of terms of size <= ~1e3 (|d| up to ~200 / 1 token, squared).
    expect_close(o.loss, d * d, 1e-12, "loss");
    expect_close(o.d_policy_chosen, 2 * d / (LD)p.len_chosen, 1e-12, "d_policy_chosen");
    expect_close(o.d_policy_rejected, -2 * d / (LD)p.len_rejected, 1e-12, "d_policy_rejected");
  }
  // The minimum sits where the per-token mean margin is 1/(2 beta) = 2, whatever the summed margin: lengths 4 and
  // 8, chosen log-ratio 4 (mean 1), rejected log-ratio -8 (mean -1).
  const PairOutput at = pair_loss(cfg, pair(-16, -28, -20, -20, 4, 8));
  EXPECT_EQ(at.loss, 0.0);
  EXPECT_EQ(at.d_policy_chosen, 0.0);
  // The same summed margin 12 under the paper's form is far from its minimum 2: (12 - 2)^2.
  LossConfig sum = cfg;
  sum.ipo_length_normalize = false;
  EXPECT_DOUBLE_EQ(pair_loss(sum, pair(-16, -28, -20, -20, 4, 8)).loss, 100.0);
}

TEST(Loss, IpoLengthNormalisedUsesPerTokenMeans) {
  LossConfig cfg = single(LossType::Ipo, 0.1);
  cfg.ipo_length_normalize = true;
  // c = (-20 - -30)/5 = 2, r = (-40 - -36)/4 = -1, mean Delta = 3; target 5 -> loss 4, d/dpc = 2*(-2)/5, d/dpr = -2*(-2)/4
  const PairOutput o = pair_loss(cfg, pair(-20, -40, -30, -36, 5, 4));
  EXPECT_DOUBLE_EQ(o.loss, 4.0);
  EXPECT_DOUBLE_EQ(o.d_policy_chosen, -0.8);
  EXPECT_DOUBLE_EQ(o.d_policy_rejected, 1.0);
  // Rewards stay beta * summed log-ratio (TRL), not length-normalised.
  EXPECT_DOUBLE_EQ(o.reward_chosen, 0.1 * 10);
  EXPECT_DOUBLE_EQ(o.reward_rejected, 0.1 * -4);
  // Non-positive lengths are refused by the data loaders (tests/test_data.cpp, LossPreconditions); reaching the
  // loss with one is a caller bug, asserted on the host (the device function assumes lengths > 0).
  for (const PairInput& bad : {pair(-20, -40, -30, -36, 0, 4), pair(-20, -40, -30, -36, 5, -1)}) {
    const std::string msg = precondition_message([&] { pair_loss(cfg, bad); });
    EXPECT_NE(msg.find("completion lengths must be > 0"), std::string::npos) << msg;
  }
  // Without normalisation lengths are irrelevant.
  cfg.ipo_length_normalize = false;
  EXPECT_NO_THROW(pair_loss(cfg, pair(-20, -40, -30, -36, 0, 0)));
}

// --- hinge -----------------------------------------------------------------------------------------------------

TEST(Loss, HingeMatchesClosedForm) {
  std::mt19937_64 g(test::test_seed());
  for (double beta : {0.1, 0.5, 2.0}) {
    check_closed_form(LossType::Hinge, single(LossType::Hinge, beta), hand_pairs());
    check_closed_form(LossType::Hinge, single(LossType::Hinge, beta), random_pairs(g, 20));
  }
}

TEST(Loss, HingeZeroBeyondMarginAndSubgradientAtKink) {
  const double beta = 0.5;  // margin: beta*Delta = 1 <=> Delta = 2 (exact in binary)
  const LossConfig cfg = single(LossType::Hinge, beta);
  for (double delta : {2.0, 2.5, 10.0, 1e4}) {
    const PairOutput o = pair_loss(cfg, pair_with_delta(delta));
    EXPECT_EQ(o.loss, 0.0) << delta;
    EXPECT_EQ(o.d_policy_chosen, 0.0) << delta;  // at the kink (delta == 2) the subgradient 0 is chosen
    EXPECT_EQ(o.d_policy_rejected, 0.0) << delta;
  }
  for (double delta : {1.5, 0.0, -3.0, -1e4}) {
    const PairOutput o = pair_loss(cfg, pair_with_delta(delta));
    EXPECT_DOUBLE_EQ(o.loss, 1 - beta * delta) << delta;
    EXPECT_EQ(o.d_policy_chosen, -beta) << delta;
    EXPECT_EQ(o.d_policy_rejected, beta) << delta;
  }
}

// --- sft -------------------------------------------------------------------------------------------------------

TEST(Loss, SftIsMeanNllOfChosen) {
  const LossConfig cfg = single(LossType::Sft, 0.1);
  const PairOutput o = pair_loss(cfg, pair(-30, -5, -1000, 7, 12, 3));
  EXPECT_DOUBLE_EQ(o.loss, 2.5);
  EXPECT_DOUBLE_EQ(o.d_policy_chosen, -1.0 / 12);
  EXPECT_EQ(o.d_policy_rejected, 0.0);
  // Independent of beta, refs and the rejected completion.
  const PairOutput o2 = pair_loss(single(LossType::Sft, 3.0), pair(-30, -900, 4, -2, 12, 77));
  EXPECT_DOUBLE_EQ(o2.loss, o.loss);
  EXPECT_DOUBLE_EQ(o2.d_policy_chosen, o.d_policy_chosen);
  std::mt19937_64 g(test::test_seed());
  check_closed_form(LossType::Sft, cfg, random_pairs(g, 20));
  // A chosen length of 0: the loaders refuse it; the host asserts it (see IpoLengthNormalisedUsesPerTokenMeans).
  EXPECT_NE(precondition_message([&] { pair_loss(cfg, pair(-30, -5, 0, 0, 0, 3)); }).find("completion lengths"),
            std::string::npos);
  // The rejected length is not used by sft.
  EXPECT_NO_THROW(pair_loss(cfg, pair(-30, -5, 0, 0, 3, 0)));
}

// --- ODPO ------------------------------------------------------------------------------------------------------

TEST(Loss, OdpoOffsetShiftsTheSigmoidArgument) {
  std::mt19937_64 g(test::test_seed());
  for (double alpha : {0.5, 1.0, 2.0}) {
    LossConfig cfg = single(LossType::Sigmoid, 0.1);
    cfg.odpo_alpha = alpha;
    check_closed_form(LossType::Sigmoid, cfg, random_pairs(g, 20));
    // Shift: loss(Delta, gap) == plain sigmoid loss at Delta - alpha*log(gap)/beta.
    PairInput p = pair_with_delta(4.0);
    p.has_scores = true;
    p.score_chosen = 7.0;
    p.score_rejected = 7.0 - std::exp(1.0);  // log(gap) = 1
    const PairOutput o = pair_loss(cfg, p);
    const PairOutput plain = pair_loss(single(LossType::Sigmoid, 0.1), pair_with_delta(4.0 - alpha / 0.1));
    EXPECT_NEAR(o.loss, plain.loss, 1e-12);
    EXPECT_NEAR(o.d_policy_chosen, plain.d_policy_chosen, 1e-14);
    // A larger score gap demands a larger margin: the loss grows.
    p.score_rejected = 7.0 - 10.0;
    EXPECT_GT(pair_loss(cfg, p).loss, o.loss);
    // Rewards are unaffected by the offset.
    EXPECT_DOUBLE_EQ(o.reward_chosen, 0.1 * (p.policy_chosen - p.ref_chosen));
    EXPECT_DOUBLE_EQ(o.reward_rejected, 0.1 * (p.policy_rejected - p.ref_rejected));
  }
  // gap == 1 -> offset 0 -> plain DPO.
  LossConfig cfg = single(LossType::Sigmoid, 0.1);
  cfg.odpo_alpha = 1.0;
  PairInput p = pair_with_delta(3.0);
  p.has_scores = true;
  p.score_chosen = 2.0;
  p.score_rejected = 1.0;
  EXPECT_DOUBLE_EQ(pair_loss(cfg, p).loss, pair_loss(single(LossType::Sigmoid, 0.1), p).loss);
}

// The loaders refuse ODPO records without ordered scores, naming file:line (tests/test_data.cpp,
// OdpoScoreGapNamesFileLine); the loss assumes them and asserts them on the host as a caller bug (dpo::Error).
TEST(Loss, OdpoNeedsOrderedScores) {
  LossConfig cfg = single(LossType::Sigmoid, 0.1);
  cfg.odpo_alpha = 1.0;
  PairInput p = pair_with_delta(1.0);
  EXPECT_NE(precondition_message([&] { pair_loss(cfg, p); }).find("no scores"), std::string::npos);
  p.has_scores = true;
  p.score_chosen = 1.0;
  p.score_rejected = 1.0;
  EXPECT_NE(precondition_message([&] { pair_loss(cfg, p); }).find("score_chosen > score_rejected"),
            std::string::npos);
  p.score_rejected = 2.0;
  EXPECT_NE(precondition_message([&] { pair_loss(cfg, p); }).find("require_score_gap"), std::string::npos);
  p.score_chosen = std::nan("");
  EXPECT_NE(precondition_message([&] { pair_loss(cfg, p); }).find("score_chosen"), std::string::npos);
  // With ODPO off, scores are not needed and are ignored.
  EXPECT_NO_THROW(pair_loss(single(LossType::Sigmoid, 0.1), p));
}

// --- reference-free, weighted sums ------------------------------------------------------------------------------

TEST(Loss, ReferenceFreeIgnoresRefs) {
  std::mt19937_64 g(test::test_seed());
  for (LossType t : {LossType::Sigmoid, LossType::Ipo, LossType::Hinge, LossType::Robust, LossType::Cdpo,
                     LossType::Sft}) {
    LossConfig cfg = single(t, 0.1, (t == LossType::Robust || t == LossType::Cdpo) ? 0.2 : 0.0);
    cfg.reference_free = true;
    check_closed_form(t, cfg, random_pairs(g, 5));
    PairInput a = pair(-20, -25, -3, -90), b = pair(-20, -25, 0, 0), c = pair(-20, -25, 55, 1e6);
    const PairOutput oa = pair_loss(cfg, a), ob = pair_loss(cfg, b), oc = pair_loss(cfg, c);
    EXPECT_EQ(oa.loss, ob.loss);
    EXPECT_EQ(oc.loss, ob.loss);
    EXPECT_EQ(oa.d_policy_chosen, ob.d_policy_chosen);
    EXPECT_EQ(oa.d_policy_rejected, ob.d_policy_rejected);
    EXPECT_DOUBLE_EQ(oa.reward_chosen, 0.1 * -20);
    EXPECT_DOUBLE_EQ(oa.reward_rejected, 0.1 * -25);
  }
}

TEST(Loss, WeightedSumEqualsSumOfParts) {
  std::mt19937_64 g(test::test_seed());
  LossConfig all;
  all.beta = 0.2;
  all.label_smoothing = 0.15;
  all.odpo_alpha = 0.5;
  all.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.25}, {LossType::Hinge, 0.5},
               {LossType::Robust, 0.3}, {LossType::Cdpo, 2.0},  {LossType::Sft, 0.7}};
  for (const auto& p : random_pairs(g, 20)) {
    const PairOutput o = pair_loss(all, p);
    double loss = 0, dc = 0, dr = 0;
    for (const auto& t : all.terms) {
      LossConfig one = all;
      one.terms = {{t.type, 1.0}};
      if (t.type != LossType::Robust && t.type != LossType::Cdpo) one.label_smoothing = 0;
      if (t.type != LossType::Sigmoid) one.odpo_alpha = 0;
      const PairOutput part = pair_loss(one, p);
      loss += t.weight * part.loss;
      dc += t.weight * part.d_policy_chosen;
      dr += t.weight * part.d_policy_rejected;
    }
    EXPECT_NEAR(o.loss, loss, 1e-12 * std::max(1.0, std::fabs(loss)));
    EXPECT_NEAR(o.d_policy_chosen, dc, 1e-12 * std::max(1.0, std::fabs(dc)));
    EXPECT_NEAR(o.d_policy_rejected, dr, 1e-12 * std::max(1.0, std::fabs(dr)));
  }
  // RPO = sigmoid + weighted sft, a zero weight contributes nothing.
  LossConfig rpo;
  rpo.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.0}};
  const PairInput p = pair(-20, -25, -21, -24);
  EXPECT_EQ(pair_loss(rpo, p).loss, pair_loss(single(LossType::Sigmoid), p).loss);
}

// --- derivatives -----------------------------------------------------------------------------------------------

TEST(Loss, DerivativesMatchFiniteDifferences) {
  std::mt19937_64 g(test::test_seed());
  const auto pairs = random_pairs(g, 25);
  for (LossType t : {LossType::Sigmoid, LossType::Ipo, LossType::Hinge, LossType::Robust, LossType::Cdpo,
                     LossType::Sft})
    for (double beta : {0.1, 0.7}) {
      LossConfig cfg = single(t, beta, (t == LossType::Robust || t == LossType::Cdpo) ? 0.25 : 0.0);
      for (const auto& p : pairs) {
        if (t == LossType::Hinge) {
          const double z = beta * ((p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected));
          if (std::fabs(z - 1) < 1e-3) continue;  // central differences straddle the kink
        }
        SCOPED_TRACE(std::string(loss_type_name(t)) + " beta " + std::to_string(beta));
        check_fd(cfg, p);
      }
    }
}

TEST(Loss, DerivativesOfVariantsMatchFiniteDifferences) {
  std::mt19937_64 g(test::test_seed());
  const auto pairs = random_pairs(g, 25);
  LossConfig odpo = single(LossType::Sigmoid, 0.3);
  odpo.odpo_alpha = 1.5;
  LossConfig ipo_norm = single(LossType::Ipo, 0.1);
  ipo_norm.ipo_length_normalize = true;
  LossConfig ipo_sum = single(LossType::Ipo, 0.1);
  ipo_sum.ipo_length_normalize = false;
  LossConfig ref_free = single(LossType::Robust, 0.2, 0.1);
  ref_free.reference_free = true;
  LossConfig mix;
  mix.beta = 0.15;
  mix.label_smoothing = 0.05;
  mix.odpo_alpha = 0.3;
  mix.ipo_length_normalize = true;
  mix.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.1}, {LossType::Cdpo, 0.5}, {LossType::Sft, 0.2}};
  for (const LossConfig* cfg : {&odpo, &ipo_norm, &ipo_sum, &ref_free, &mix})
    for (const auto& p : pairs) check_fd(*cfg, p);
}

// --- metrics and batches ---------------------------------------------------------------------------------------

TEST(Loss, MetricsFollowTrl) {
  const LossConfig cfg = single(LossType::Ipo, 0.5);
  std::vector<PairInput> pairs = {pair(-10, -20, -12, -18),   // c=2, r=-2: correct
                                  pair(-30, -20, -29, -21),   // c=-1, r=1: wrong
                                  pair(-15, -16, -14, -15)};  // c=-1, r=-1: tie, not counted
  const BatchLoss b = batch_loss(cfg, pairs, 3);
  EXPECT_EQ(b.pairs, 3);
  EXPECT_DOUBLE_EQ(b.reward_chosen_sum, 0.5 * (2 - 1 - 1));
  EXPECT_DOUBLE_EQ(b.reward_rejected_sum, 0.5 * (-2 + 1 - 1));
  EXPECT_EQ(b.accuracy_sum, 1.0);
  EXPECT_DOUBLE_EQ(b.margin_sum, 0.5 * (4 - 2 + 0));
  EXPECT_DOUBLE_EQ(b.logps_chosen_sum, -55);
  EXPECT_DOUBLE_EQ(b.logps_rejected_sum, -56);
  ASSERT_EQ(b.term_loss_sum.size(), 1u);
  EXPECT_DOUBLE_EQ(b.term_loss_sum[0], b.loss_sum);
  const PairOutput p0 = pair_loss(cfg, pairs[0]);
  EXPECT_DOUBLE_EQ(p0.reward_chosen, 1.0);
  EXPECT_DOUBLE_EQ(p0.reward_rejected, -1.0);
}

TEST(Loss, BatchGradientsAreDividedByTheNormalizer) {
  std::mt19937_64 g(test::test_seed());
  LossConfig cfg;
  cfg.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.5}};
  const auto pairs = random_pairs(g, 7);
  const double normalizer = 32;  // e.g. 7 pairs here out of a global step of 32
  const BatchLoss b = batch_loss(cfg, pairs, normalizer);
  ASSERT_EQ(b.d_policy_chosen.size(), pairs.size());
  ASSERT_EQ(b.d_policy_rejected.size(), pairs.size());
  double loss = 0, t0 = 0, t1 = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const PairOutput o = pair_loss(cfg, pairs[i]);
    loss += o.loss;
    EXPECT_DOUBLE_EQ(b.d_policy_chosen[i], o.d_policy_chosen / normalizer);
    EXPECT_DOUBLE_EQ(b.d_policy_rejected[i], o.d_policy_rejected / normalizer);
    t0 += pair_loss(single(LossType::Sigmoid), pairs[i]).loss;
    t1 += pair_loss(single(LossType::Sft), pairs[i]).loss;
  }
  EXPECT_DOUBLE_EQ(b.loss_sum, loss);  // sums are not normalised
  ASSERT_EQ(b.term_loss_sum.size(), 2u);
  EXPECT_DOUBLE_EQ(b.term_loss_sum[0], t0);
  EXPECT_DOUBLE_EQ(b.term_loss_sum[1], t1);
  // The batch gradient is the gradient of loss_sum / normalizer: check against finite differences of that.
  std::vector<double> x;
  for (const auto& p : pairs) x.push_back(p.policy_chosen), x.push_back(p.policy_rejected);
  auto f = [&] {
    auto q = pairs;
    for (size_t i = 0; i < q.size(); ++i) q[i].policy_chosen = x[2 * i], q[i].policy_rejected = x[2 * i + 1];
    return batch_loss(cfg, q, normalizer).loss_sum / normalizer;
  };
  const auto num = test::numeric_grad(x, f);
  std::vector<double> ana;
  for (size_t i = 0; i < pairs.size(); ++i) ana.push_back(b.d_policy_chosen[i]), ana.push_back(b.d_policy_rejected[i]);
  EXPECT_LT(test::max_rel_err(ana, num), 1e-6);
}

TEST(Loss, SplitBatchesWithGlobalNormalizerSumToOneBatch) {
  // Gradient accumulation: micro-batches of unequal size, each divided by the global pair count, must reproduce the
  // one-batch gradient and loss exactly (up to summation order). Dividing by the micro-batch size would not.
  std::mt19937_64 g(test::test_seed());
  LossConfig cfg;
  cfg.beta = 0.2;
  cfg.label_smoothing = 0.1;
  cfg.terms = {{LossType::Cdpo, 1.0}, {LossType::Ipo, 0.05}};
  const auto pairs = random_pairs(g, 11);
  const double n = static_cast<double>(pairs.size());
  const BatchLoss whole = batch_loss(cfg, pairs, n);
  const std::vector<PairInput> a(pairs.begin(), pairs.begin() + 3), b(pairs.begin() + 3, pairs.end());
  const BatchLoss ba = batch_loss(cfg, a, n), bb = batch_loss(cfg, b, n);
  EXPECT_EQ(ba.pairs + bb.pairs, whole.pairs);
  EXPECT_NEAR(ba.loss_sum + bb.loss_sum, whole.loss_sum, 1e-12 * std::fabs(whole.loss_sum));
  EXPECT_NEAR(ba.reward_chosen_sum + bb.reward_chosen_sum, whole.reward_chosen_sum, 1e-12 * std::max(1.0, std::fabs(whole.reward_chosen_sum)));
  EXPECT_NEAR(ba.margin_sum + bb.margin_sum, whole.margin_sum, 1e-12 * std::max(1.0, std::fabs(whole.margin_sum)));
  EXPECT_EQ(ba.accuracy_sum + bb.accuracy_sum, whole.accuracy_sum);
  std::vector<double> dc = ba.d_policy_chosen, dr = ba.d_policy_rejected;
  dc.insert(dc.end(), bb.d_policy_chosen.begin(), bb.d_policy_chosen.end());
  dr.insert(dr.end(), bb.d_policy_rejected.begin(), bb.d_policy_rejected.end());
  for (size_t i = 0; i < pairs.size(); ++i) {
    EXPECT_EQ(dc[i], whole.d_policy_chosen[i]);
    EXPECT_EQ(dr[i], whole.d_policy_rejected[i]);
  }
  // The per-micro-batch normaliser gives a different (wrong) accumulated gradient.
  const BatchLoss wrong = batch_loss(cfg, a, static_cast<double>(a.size()));
  EXPECT_NE(wrong.d_policy_chosen[0], whole.d_policy_chosen[0]);
  // An empty micro-batch (a rank with no pairs) contributes nothing.
  const BatchLoss empty = batch_loss(cfg, {}, n);
  EXPECT_EQ(empty.pairs, 0);
  EXPECT_EQ(empty.loss_sum, 0.0);
  EXPECT_TRUE(empty.d_policy_chosen.empty());
}

TEST(Loss, BatchRejectsBadNormalizer) {
  const std::vector<PairInput> pairs = {pair(-1, -2, -1, -2)};
  for (double n : {0.0, -1.0, std::nan(""), kInf}) {
    try {
      batch_loss(LossConfig{}, pairs, n);
      ADD_FAILURE() << "no exception for normalizer " << n;
    } catch (const InputError&) {
      ADD_FAILURE() << "a bad normalizer is a caller bug (Error), not InputError";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("normalizer"), std::string::npos);
    }
  }
}

// --- parsing and validation ------------------------------------------------------------------------------------

TEST(Loss, ParseLossTypeNamesAndErrors) {
  EXPECT_EQ(parse_loss_type("sigmoid"), LossType::Sigmoid);
  EXPECT_EQ(parse_loss_type("dpo"), LossType::Sigmoid);
  EXPECT_EQ(parse_loss_type("ipo"), LossType::Ipo);
  EXPECT_EQ(parse_loss_type("hinge"), LossType::Hinge);
  EXPECT_EQ(parse_loss_type("robust"), LossType::Robust);
  EXPECT_EQ(parse_loss_type("cdpo"), LossType::Cdpo);
  EXPECT_EQ(parse_loss_type("sft"), LossType::Sft);
  for (LossType t : {LossType::Sigmoid, LossType::Ipo, LossType::Hinge, LossType::Robust, LossType::Cdpo,
                     LossType::Sft})
    EXPECT_EQ(parse_loss_type(loss_type_name(t)), t);
  const std::string msg = error_message([] { parse_loss_type("sigmod"); });
  EXPECT_NE(msg.find("loss_type"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'sigmod'"), std::string::npos) << msg;
  for (const char* n : {"sigmoid", "ipo", "hinge", "robust", "cdpo", "sft"})
    EXPECT_NE(msg.find(n), std::string::npos) << msg;
  EXPECT_THROW(parse_loss_type(""), InputError);
  EXPECT_THROW(parse_loss_type("Sigmoid"), InputError);
}

TEST(Loss, MakeLossTerms) {
  const auto t = make_loss_terms({"sigmoid", "sft"}, {1.0, 0.5});
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].type, LossType::Sigmoid);
  EXPECT_EQ(t[1].type, LossType::Sft);
  EXPECT_EQ(t[1].weight, 0.5);
  const auto u = make_loss_terms({"ipo"}, {});
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].weight, 1.0);
  EXPECT_NE(error_message([] { make_loss_terms({"sigmoid", "sft"}, {1.0}); }).find("loss_weights"), std::string::npos);
  EXPECT_NE(error_message([] { make_loss_terms({"nope"}, {}); }).find("loss_type"), std::string::npos);
}

TEST(Loss, ValidateBetaAndLabelSmoothing) {
  EXPECT_NO_THROW(LossConfig{}.validate());
  for (double beta : {0.0, -0.1, std::nan(""), kInf}) {
    LossConfig c;
    c.beta = beta;
    EXPECT_NE(error_message([&] { c.validate(); }).find("beta"), std::string::npos) << beta;
    EXPECT_THROW(pair_loss(c, pair(-1, -2, -1, -2)), InputError);
    EXPECT_THROW(batch_loss(c, {}, 1), InputError);
  }
  for (double eps : {-0.01, 0.5, 0.7, std::nan("")}) {
    LossConfig c = single(LossType::Robust, 0.1, eps);
    EXPECT_NE(error_message([&] { c.validate(); }).find("label_smoothing"), std::string::npos) << eps;
  }
  EXPECT_NO_THROW(single(LossType::Robust, 0.1, 0.499).validate());
  EXPECT_NO_THROW(single(LossType::Cdpo, 0.1, 0.0).validate());
  // Smoothing that no term would use is rejected rather than silently ignored.
  EXPECT_NE(error_message([] { single(LossType::Sigmoid, 0.1, 0.1).validate(); }).find("label_smoothing"),
            std::string::npos);
  // The prefix names where the config came from.
  LossConfig c;
  c.beta = -1;
  EXPECT_EQ(error_message([&] { c.validate("train.yaml"); }).rfind("train.yaml: beta", 0), 0u);
}

TEST(Loss, ValidateTermsWeightsAndOdpo) {
  auto msg_of = [](const LossConfig& c) { return error_message([&] { c.validate(); }); };
  LossConfig c;
  c.terms.clear();
  EXPECT_NE(msg_of(c).find("loss_type"), std::string::npos);
  c.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sigmoid, 0.5}};
  EXPECT_NE(msg_of(c).find("loss_type"), std::string::npos);
  for (double w : {std::nan(""), kInf, -1.0}) {
    c.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, w}};
    EXPECT_NE(msg_of(c).find("loss_weights"), std::string::npos) << w;
  }
  c.terms = {{LossType::Sigmoid, 0.0}};
  EXPECT_NE(msg_of(c).find("loss_weights"), std::string::npos);
  c = LossConfig{};
  for (double a : {-1.0, std::nan(""), kInf}) {
    c.odpo_alpha = a;
    EXPECT_NE(msg_of(c).find("odpo_alpha"), std::string::npos) << a;
  }
  c = single(LossType::Ipo);
  c.odpo_alpha = 1.0;  // offset applies to sigmoid only
  EXPECT_NE(msg_of(c).find("odpo_alpha"), std::string::npos);
  c.terms.push_back({LossType::Sigmoid, 1.0});
  EXPECT_NO_THROW(c.validate());
}

TEST(Loss, PairChunkGradsEqualOneBatchLossOverAllPairs) {
  // Chunks of 1, 2 and the rest (uneven) of 7 pairs: each pair's gradient is bitwise what batch_loss gives for the
  // whole batch, written at q (chosen) and P + q (rejected); entries of other chunks are left alone.
  std::mt19937_64 g(test::test_seed());
  const std::vector<PairInput> in = random_pairs(g, 7);
  const int64_t P = 7;
  LossConfig c;
  c.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.3}};
  c.beta = 0.2;
  std::vector<double> logp(2 * P);
  for (int64_t q = 0; q < P; ++q) {
    logp[static_cast<size_t>(q)] = in[static_cast<size_t>(q)].policy_chosen;
    logp[static_cast<size_t>(P + q)] = in[static_cast<size_t>(q)].policy_rejected;
  }
  std::vector<PairInput> blanked = in;  // pair_chunk_grads must take the policy values from logp
  for (auto& x : blanked) x.policy_chosen = x.policy_rejected = std::nan("");
  const BatchLoss all = batch_loss(c, in, 11.0);
  std::vector<double> d(2 * P, -123.0);
  const int64_t cuts[] = {0, 1, 3, 7};
  for (int k = 0; k < 3; ++k) {
    pair_chunk_grads(c, blanked, cuts[k], cuts[k + 1], logp, 11.0, d);
    for (int64_t q = cuts[k + 1]; q < P; ++q) EXPECT_EQ(d[static_cast<size_t>(q)], -123.0) << "later chunk touched";
  }
  for (int64_t q = 0; q < P; ++q) {
    EXPECT_EQ(d[static_cast<size_t>(q)], all.d_policy_chosen[static_cast<size_t>(q)]) << q;
    EXPECT_EQ(d[static_cast<size_t>(P + q)], all.d_policy_rejected[static_cast<size_t>(q)]) << q;
  }
  EXPECT_THROW(pair_chunk_grads(c, blanked, 3, 8, logp, 11.0, d), Error);
}

// --- the backends' preference_loss (kernels/pair_loss.h) against TRL's formulas ------------------------------------
//
// The expected values are written from TRL's DPOTrainer.dpo_loss (trl/trainer/dpo_trainer.py) in long double with
// the naive functions, not from train/loss.cpp: with logits = (pc - rc) - (pr - rr) (the ref terms 0 when
// reference-free; for ipo each log-ratio divided by its completion length first),
//   sigmoid  -logsigmoid(beta logits) (1 - ls) - logsigmoid(-beta logits) ls        ("cdpo" here; ls = 0: "sigmoid")
//   robust   (-logsigmoid(beta logits) (1 - ls) + logsigmoid(-beta logits) ls) / (1 - 2 ls)
//   hinge    relu(1 - beta logits)
//   ipo      (logits - 1/(2 beta))^2
//   rpo      + rpo_alpha * nll, nll = -pc / len_chosen (the mean token NLL of the chosen completion)
//   ODPO     -logsigmoid(beta logits - offset) (Amini et al. 2024; TRL has no ODPO)
//   chosen_rewards = beta (pc - rc), rejected_rewards = beta (pr - rr)
// and the derivatives w.r.t. pc and pr by hand (d logits / d pc = 1, d / d pr = -1).

struct TrlPair {
  LD pc, pr, rc, rr, lc, lr, off;
};
struct TrlResult {
  LD loss = 0, dc = 0, dr = 0;
  LD term[kMaxLossTerms] = {};
};

LD ld_logsigmoid(LD x) { return -std::log1p(std::exp(-x)); }  // naive; long double's range keeps it finite here

TrlResult trl_formula(const PairLossParams& p, const TrlPair& x) {
  const bool ref_free = p.ref == RefMode::ReferenceFree;
  const LD crat = x.pc - (ref_free ? 0.0L : x.rc), rrat = x.pr - (ref_free ? 0.0L : x.rr);
  const LD beta = p.beta, ls = p.label_smoothing;
  const LD logits = crat - rrat;
  TrlResult r;
  for (int i = 0; i < p.n_terms; ++i) {
    LD v = 0, dl = 0, dc = 0, dr = 0;  // dl: d v / d logits (the non-ipo terms)
    switch (p.type[i]) {
      case LossType::Sigmoid:
        v = -ld_logsigmoid(beta * logits - x.off);
        dl = -beta * ref_sigmoid(-(beta * logits - x.off));
        break;
      case LossType::Cdpo:
        v = -ld_logsigmoid(beta * logits) * (1 - ls) - ld_logsigmoid(-beta * logits) * ls;
        dl = -beta * (1 - ls) * ref_sigmoid(-beta * logits) + beta * ls * ref_sigmoid(beta * logits);
        break;
      case LossType::Robust:
        v = (-ld_logsigmoid(beta * logits) * (1 - ls) + ld_logsigmoid(-beta * logits) * ls) / (1 - 2 * ls);
        dl = (-beta * (1 - ls) * ref_sigmoid(-beta * logits) - beta * ls * ref_sigmoid(beta * logits)) / (1 - 2 * ls);
        break;
      case LossType::Hinge:
        v = std::max(0.0L, 1 - beta * logits);
        dl = 1 - beta * logits > 0 ? -beta : 0.0L;
        break;
      case LossType::Ipo: {
        const LD nc = p.ipo_norm == IpoNorm::PerToken ? x.lc : 1.0L, nr = p.ipo_norm == IpoNorm::PerToken ? x.lr : 1.0L;
        const LD d = crat / nc - rrat / nr - 1 / (2 * beta);
        v = d * d;
        dc = 2 * d / nc;
        dr = -2 * d / nr;
        break;
      }
      case LossType::Sft:
        v = -x.pc / x.lc;
        dc = -1 / x.lc;
        break;
      default:  // the other types: tests/test_more_losses.cpp (against TRL's own numbers)
        ADD_FAILURE() << "trl_formula: type " << static_cast<int>(p.type[i]) << " is tested in test_more_losses";
        break;
    }
    if (p.type[i] != LossType::Ipo && p.type[i] != LossType::Sft) dc = dl, dr = -dl;
    r.term[i] = v;
    r.loss += p.weight[i] * v;
    r.dc += p.weight[i] * dc;
    r.dr += p.weight[i] * dr;
  }
  return r;
}


// A random preference batch in storage type F: stats [2P, kSeqStatsWidth] with the logit-sum column NaN (it must
// not be read), ref_logp [2P], offsets [P] (ODPO-like: alpha log(gap), gap in (0.01, 5)).
struct HostBatch {
  int64_t P;
  Tensor stats, ref, offset;
};
HostBatch random_batch(std::mt19937_64& g, int64_t P, DType dt) {
  std::uniform_real_distribution<double> lp(-200.0, -5.0), shift(-15.0, 15.0), gap(0.01, 5.0);
  std::uniform_int_distribution<int64_t> len(1, 300);
  HostBatch b{P, Tensor::host({2 * P, kSeqStatsWidth}, dt), Tensor::host({2 * P}, dt), Tensor::host({P}, dt)};
  auto set = [&](const Tensor& t, int64_t i, double v) {
    if (dt == DType::F32) t.data<float>()[i] = static_cast<float>(v);
    else t.data<double>()[i] = v;
  };
  for (int64_t row = 0; row < 2 * P; ++row) {
    const double ref = lp(g);
    set(b.ref, row, ref);
    set(b.stats, row * kSeqStatsWidth + kSeqLogp, ref + shift(g));
    set(b.stats, row * kSeqStatsWidth + kSeqTokens, static_cast<double>(len(g)));
    set(b.stats, row * kSeqStatsWidth + kSeqLogitSum, lp(g) * 40.0);  // metrics only (kSumLogit*)
  }
  for (int64_t q = 0; q < P; ++q) set(b.offset, q, 0.7 * std::log(gap(g)));
  return b;
}

double at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F32 ? static_cast<double>(t.data<float>()[i]) : t.data<double>()[i];
}

TrlPair trl_pair(const HostBatch& b, int64_t q, bool with_offset) {
  const int64_t P = b.P, W = kSeqStatsWidth;
  return {at(b.stats, q * W + kSeqLogp), at(b.stats, (P + q) * W + kSeqLogp), at(b.ref, q), at(b.ref, P + q),
          at(b.stats, q * W + kSeqTokens), at(b.stats, (P + q) * W + kSeqTokens),
          with_offset ? at(b.offset, q) : 0.0L};
}

struct BackendRun {
  Tensor dseq, pair_loss, sums;
};
BackendRun run_preference_loss(Backend& be, const HostBatch& b, const PairLossParams& p, double normalizer,
                               bool with_ref, bool with_offset) {
  const DType dt = b.stats.dtype();
  BackendRun r{Tensor::host({2 * b.P}, dt), Tensor::host({b.P}, dt), Tensor::host({kPairSumsWidth}, DType::F64)};
  for (const Tensor* t : {&r.dseq, &r.pair_loss, &r.sums})  // poison: every output must be written
    std::memset(t->raw(), 0xFF, static_cast<size_t>(t->nbytes()));
  be.preference_loss({r.dseq, r.pair_loss, r.sums}, b.stats, with_ref ? b.ref : Tensor(),
                     with_offset ? b.offset : Tensor(), p, normalizer);
  return r;
}

// Every output of the CPU backend against TRL's formulas, for storage dtype dt.
// Tolerances: F64 storage: the double evaluation against long double, relative 1e-12 of max(1, |value|) (a few
// roundings of terms up to ~1e3, as the closed-form tests above); F32 storage: the inputs are the stored floats
// (widened exactly on both sides), so only the one rounding of each output to float adds 2^-24 relative (budget
// 2^-23). Sums (always double): 1e-12 of the sum of the magnitudes of the terms (P <= ~1e3 additions).
void check_against_trl(DType dt, const PairLossParams& p, int64_t P, bool with_offset, uint64_t seed) {
  std::mt19937_64 g(seed);
  const HostBatch b = random_batch(g, P, dt);
  auto be = make_cpu_backend(1);
  const double normalizer = static_cast<double>(2 * P + 3);
  const bool with_ref = p.ref == RefMode::WithReference;
  const BackendRun r = run_preference_loss(*be, b, p, normalizer, with_ref, with_offset);
  const double out_rel = dt == DType::F32 ? std::ldexp(1.0, -23) : 0.0;
  LD sums[kPairSumsWidth] = {}, mags[kPairSumsWidth] = {};
  auto add = [&](int k, LD v) { sums[k] += v, mags[k] += std::fabs(v); };
  for (int64_t q = 0; q < P; ++q) {
    const TrlPair x = trl_pair(b, q, with_offset);
    const TrlResult e = trl_formula(p, x);
    const std::string where = "pair " + std::to_string(q) + " of " + std::to_string(P);
    auto close = [&](double got, LD want, const std::string& what) {
      const double w = static_cast<double>(want);
      EXPECT_NEAR(got, w, 1e-12 * std::max(1.0, std::fabs(w)) + out_rel * std::fabs(w)) << where << " " << what;
    };
    close(at(r.pair_loss, q), e.loss, "loss");
    close(at(r.dseq, q), e.dc / normalizer, "dseq chosen");
    close(at(r.dseq, P + q), e.dr / normalizer, "dseq rejected");
    const LD rc = p.beta * (x.pc - (with_ref ? x.rc : 0.0L)), rr = p.beta * (x.pr - (with_ref ? x.rr : 0.0L));
    add(kSumLoss, e.loss);
    add(kSumRewardChosen, rc);
    add(kSumRewardRejected, rr);
    add(kSumAccuracy, rc > rr ? 1 : 0);
    add(kSumMargin, rc - rr);
    add(kSumLogpChosen, x.pc);
    add(kSumLogpRejected, x.pr);
    for (int i = 0; i < kMaxLossTerms; ++i) add(kSumTerm + i, e.term[i]);
    add(kSumTokensChosen, x.lc);
    add(kSumTokensRejected, x.lr);
    add(kSumLogitChosen, at(b.stats, q * kSeqStatsWidth + kSeqLogitSum));
    add(kSumLogitRejected, at(b.stats, (P + q) * kSeqStatsWidth + kSeqLogitSum));
  }
  const double* got = r.sums.data<double>();
  for (int k = 0; k < kPairSumsWidth; ++k) {
    if (k == kSumAccuracy) {
      EXPECT_EQ(got[k], static_cast<double>(sums[k])) << "accuracy count";
      continue;
    }
    EXPECT_NEAR(got[k], static_cast<double>(sums[k]), 1e-12 * static_cast<double>(mags[k]) + 1e-300)
        << "sum column " << k << " of P = " << P;
  }
}

TEST(PreferenceLossCpu, EveryLossTypeMatchesTrlFormulas) {
  const std::vector<PairLossParams> configs = {
      params_for({{LossType::Sigmoid, 1.0}}, 0.1),
      params_for({{LossType::Cdpo, 1.0}}, 0.3, 0.2),
      params_for({{LossType::Robust, 1.0}}, 0.5, 0.15),
      params_for({{LossType::Hinge, 1.0}}, 0.2),
      params_for({{LossType::Ipo, 1.0}}, 0.1, 0.0, IpoNorm::PerToken),
      params_for({{LossType::Ipo, 1.0}}, 0.1, 0.0, IpoNorm::Summed),
      params_for({{LossType::Sft, 1.0}}, 0.1),
      params_for({{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.5}}, 0.1),  // RPO
      params_for({{LossType::Robust, 1.0}}, 0.2, 0.1, IpoNorm::PerToken, RefMode::ReferenceFree),
      params_for({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.25}, {LossType::Hinge, 0.5}, {LossType::Robust, 0.3},
                  {LossType::Cdpo, 2.0}, {LossType::Sft, 0.7}},
                 0.2, 0.15),
  };
  uint64_t seed = test::test_seed();
  for (DType dt : {DType::F64, DType::F32})
    for (size_t c = 0; c < configs.size(); ++c)
      for (int64_t P : {1, 7, 1001}) {
        SCOPED_TRACE("config " + std::to_string(c) + " dtype " + dtype_name(dt) + " P " + std::to_string(P));
        check_against_trl(dt, configs[c], P, /*with_offset=*/false, ++seed);
      }
}

TEST(PreferenceLossCpu, OdpoOffsetsAndWeightedSumsMatchTrlFormulas) {
  const PairLossParams odpo = params_for({{LossType::Sigmoid, 1.0}}, 0.1);
  const PairLossParams mix = params_for({{LossType::Sigmoid, 0.8}, {LossType::Ipo, 0.1}, {LossType::Sft, 0.3}}, 0.25);
  const PairLossParams free_mix = params_for({{LossType::Sigmoid, 1.0}, {LossType::Hinge, 0.5}}, 0.15, 0.0,
                                             IpoNorm::PerToken, RefMode::ReferenceFree);
  uint64_t seed = test::test_seed();
  for (DType dt : {DType::F64, DType::F32})
    for (const PairLossParams* p : {&odpo, &mix, &free_mix})
      for (int64_t P : {1, 7, 1001}) check_against_trl(dt, *p, P, /*with_offset=*/true, ++seed);
}

// One source: with F64 storage the backend's values are bitwise those of train/loss.cpp's batch_loss (the same
// per-pair function, the sums in the same pair order).
void check_bitwise_equal_to_host(const LossConfig& cfg, uint64_t seed) {
  std::mt19937_64 g(seed);
  const int64_t P = 37;
  const HostBatch b = random_batch(g, P, DType::F64);
  std::vector<PairInput> in(static_cast<size_t>(P));
  Tensor offsets = Tensor::host({P}, DType::F64);
  for (int64_t q = 0; q < P; ++q) {
    const TrlPair x = trl_pair(b, q, false);
    PairInput& v = in[static_cast<size_t>(q)];
    v = pair((double)x.pc, (double)x.pr, (double)x.rc, (double)x.rr, (int64_t)x.lc, (int64_t)x.lr);
    v.has_scores = true;
    v.score_rejected = 1.0;
    v.score_chosen = 1.0 + 0.01 * static_cast<double>(q + 1);
    offsets.data<double>()[q] = pair_loss_input(cfg, v).offset;
  }
  const double normalizer = 64;
  const BatchLoss host = batch_loss(cfg, in, normalizer);
  auto be = make_cpu_backend(1);
  HostBatch bo = b;
  bo.offset = offsets;
  const BackendRun r = run_preference_loss(*be, bo, pair_loss_params(cfg), normalizer, true, true);
  const double* s = r.sums.data<double>();
  EXPECT_EQ(s[kSumLoss], host.loss_sum);
  EXPECT_EQ(s[kSumRewardChosen], host.reward_chosen_sum);
  EXPECT_EQ(s[kSumRewardRejected], host.reward_rejected_sum);
  EXPECT_EQ(s[kSumAccuracy], host.accuracy_sum);
  EXPECT_EQ(s[kSumMargin], host.margin_sum);
  EXPECT_EQ(s[kSumLogpChosen], host.logps_chosen_sum);
  EXPECT_EQ(s[kSumLogpRejected], host.logps_rejected_sum);
  for (size_t t = 0; t < cfg.terms.size(); ++t) EXPECT_EQ(s[kSumTerm + t], host.term_loss_sum[t]) << t;
  for (size_t t = cfg.terms.size(); t < static_cast<size_t>(kMaxLossTerms); ++t) EXPECT_EQ(s[kSumTerm + t], 0.0);
  for (int64_t q = 0; q < P; ++q) {
    EXPECT_EQ(r.dseq.data<double>()[q], host.d_policy_chosen[static_cast<size_t>(q)]) << q;
    EXPECT_EQ(r.dseq.data<double>()[P + q], host.d_policy_rejected[static_cast<size_t>(q)]) << q;
    EXPECT_EQ(r.pair_loss.data<double>()[q], pair_loss(cfg, in[static_cast<size_t>(q)]).loss) << q;
  }
}

TEST(PreferenceLossCpu, BitwiseEqualToHostBatchLossInDouble) {
  uint64_t seed = test::test_seed();
  LossConfig cfg;
  cfg.beta = 0.2;
  cfg.label_smoothing = 0.1;
  cfg.odpo_alpha = 0.5;
  cfg.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.25}, {LossType::Cdpo, 0.5}, {LossType::Sft, 0.3}};
  check_bitwise_equal_to_host(cfg, ++seed);
  // Every loss type at once (the widest sums row), and an f-divergence with the losses TRL allows it for.
  LossConfig all = cfg;
  all.terms.clear();
  for (int t = 0; t < kNumLossTypes; ++t)  // the batch terms (aot, aot_unpaired) are host-only: batch_loss
    if (!is_batch_term(static_cast<LossType>(t))) all.terms.push_back({static_cast<LossType>(t), 0.1 + 0.05 * t});
  all.discopop_tau = 0.3;
  all.simpo_gamma = 0.8;
  check_bitwise_equal_to_host(all, ++seed);
  LossConfig js = cfg;
  js.terms = {{LossType::Sigmoid, 1.0}, {LossType::ExoPair, 0.5}, {LossType::SigmoidNorm, 0.7},
              {LossType::Discopop, 0.2}, {LossType::Ipo, 0.1}, {LossType::Sft, 0.3}};
  js.f_divergence = FDivergence::Js;
  check_bitwise_equal_to_host(js, ++seed);
}

// Pair ranges: ranges [0, a), [a, b), [b, P) with `accumulate` on the later two give bitwise the whole batch's
// outputs (the CPU adds pair by pair onto the running sums, so the order of the additions is unchanged), and a
// range writes only its own pairs' entries.
TEST(PreferenceLossCpu, PairRangesAccumulateToTheWholeBatch) {
  std::mt19937_64 g(test::test_seed());
  const PairLossParams p = params_for({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.3}, {LossType::Sft, 0.2}}, 0.2);
  auto be = make_cpu_backend(1);
  for (DType dt : {DType::F32, DType::F64}) {
    const int64_t P = 23;
    const HostBatch b = random_batch(g, P, dt);
    const BackendRun whole = run_preference_loss(*be, b, p, 41.0, true, true);
    BackendRun parts{Tensor::host({2 * P}, dt), Tensor::host({P}, dt), Tensor::host({kPairSumsWidth}, DType::F64)};
    for (const Tensor* t : {&parts.dseq, &parts.pair_loss, &parts.sums})
      std::memset(t->raw(), 0xFF, static_cast<size_t>(t->nbytes()));
    const int64_t cuts[4] = {0, 5, 17, P};
    for (int i = 0; i < 3; ++i) {
      Backend::PairLossOutputs o{parts.dseq, parts.pair_loss, parts.sums};
      o.accumulate = i > 0;
      be->preference_loss(o, b.stats, b.ref, b.offset, p, 41.0, cuts[i], cuts[i + 1]);
      // Pairs after the range are untouched (still the poison).
      for (int64_t q = cuts[i + 1]; q < P; ++q) {
        EXPECT_TRUE(std::isnan(at(parts.dseq, q)) && std::isnan(at(parts.dseq, P + q))) << q;
        EXPECT_TRUE(std::isnan(at(parts.pair_loss, q))) << q;
      }
    }
    EXPECT_EQ(std::memcmp(parts.dseq.raw(), whole.dseq.raw(), static_cast<size_t>(whole.dseq.nbytes())), 0);
    EXPECT_EQ(std::memcmp(parts.pair_loss.raw(), whole.pair_loss.raw(), static_cast<size_t>(whole.pair_loss.nbytes())), 0);
    for (int k = 0; k < kPairSumsWidth; ++k) EXPECT_EQ(parts.sums.data<double>()[k], whole.sums.data<double>()[k]) << k;
  }
}

TEST(PreferenceLossCpu, EmptyBatchWritesZeroSums) {
  auto be = make_cpu_backend(1);
  std::mt19937_64 g(test::test_seed());
  const HostBatch b = random_batch(g, 0, DType::F32);
  const BackendRun r = run_preference_loss(*be, b, params_for({{LossType::Sigmoid, 1.0}}, 0.1), 1.0, true, false);
  for (int k = 0; k < kPairSumsWidth; ++k) EXPECT_EQ(r.sums.data<double>()[k], 0.0) << k;
}

TEST(PreferenceLossCpu, RejectsBadArguments) {
  auto be = make_cpu_backend(1);
  std::mt19937_64 g(test::test_seed());
  const HostBatch b = random_batch(g, 3, DType::F32);
  const PairLossParams ok = params_for({{LossType::Sigmoid, 1.0}}, 0.1);
  Tensor dseq = Tensor::host({6}, DType::F32), sums = Tensor::host({kPairSumsWidth}, DType::F64);
  auto msg = [&](const Backend::PairLossOutputs& o, const Tensor& stats, const Tensor& ref, const PairLossParams& p,
                 double n) {
    try {
      be->preference_loss(o, stats, ref, Tensor(), p, n);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<no exception>");
  };
  PairLossParams none = ok;
  none.n_terms = 0;
  EXPECT_NE(msg({dseq, Tensor(), sums}, b.stats, b.ref, none, 1.0).find("n_terms"), std::string::npos);
  EXPECT_NE(msg({dseq, Tensor(), sums}, b.stats, b.ref, ok, 0.0).find("normalizer"), std::string::npos);
  EXPECT_NE(msg({dseq, Tensor(), sums}, b.stats, b.ref, ok, std::nan("")).find("normalizer"), std::string::npos);
  EXPECT_NE(msg({dseq, Tensor(), sums}, b.stats, Tensor(), ok, 1.0).find("ref_logp"), std::string::npos);
  EXPECT_NE(msg({dseq, Tensor(), Tensor::host({kPairSumsWidth}, DType::F32)}, b.stats, b.ref, ok, 1.0).find("sums"),
            std::string::npos);
  EXPECT_NE(msg({Tensor::host({5}, DType::F32), Tensor(), sums}, b.stats, b.ref, ok, 1.0).find("dseq"),
            std::string::npos);
  EXPECT_NE(msg({Tensor::host({6}, DType::F64), Tensor(), sums}, b.stats, b.ref, ok, 1.0).find("dseq"),
            std::string::npos);
  EXPECT_NE(msg({dseq, Tensor(), sums}, Tensor::host({5, kSeqStatsWidth}, DType::F32), b.ref, ok, 1.0).find("stats"),
            std::string::npos);
  EXPECT_EQ(msg({dseq, Tensor(), sums}, b.stats, b.ref, ok, 1.0), "<no exception>");
  for (const auto& [q0, q1] : {std::pair<int64_t, int64_t>{-1, 2}, {2, 1}, {0, 4}}) {
    std::string m = "<no exception>";
    try {
      be->preference_loss({dseq, Tensor(), sums}, b.stats, b.ref, Tensor(), ok, 1.0, q0, q1);
    } catch (const Error& e) {
      m = e.what();
    }
    EXPECT_NE(m.find("out of range"), std::string::npos) << q0 << " " << q1 << ": " << m;
  }
}

}  // namespace
}  // namespace dpo
