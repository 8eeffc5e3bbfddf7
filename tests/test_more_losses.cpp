// TRL 1.16's other preference losses (exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop,
// sigmoid_norm), CPO's simpo and the f-divergence scores, all evaluated by pair_loss_eval (kernels/pair_loss.h):
//   - closed forms: exact values at hand-picked points, and naive long-double formulas (written from the papers /
//     TRL's expressions, sharing no code or trick with the stable double implementation) at seeded random points;
//   - derivatives against central finite differences of the double loss;
//   - TRL's own numbers: tests/fixtures/trl_losses.json, written by tests/fixtures/gen_trl_losses.py from TRL
//     1.16.0's DPOTrainer._compute_loss and CPOTrainer.cpo_loss (no Python needed here);
//   - weighted sums with the existing losses;
//   - training on the IPO paper's 3-action bandit (tabular logits, Adam) through pair_loss_eval, with the fixed
//     points that are known in closed form;
//   - config validation (InputError naming the key);
//   - LD-DPO's ld_alpha (TRL's numbers on per-token log-probs through the batch weights, the reference cache key)
//     and the batch losses aot and aot_unpaired (TRL's numbers on whole micro-batches, a hand-worked sort, finite
//     differences, ties, the bandit, trainer runs).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/logprob.h"
#include "kernels/pair_loss.h"
#include "model/checkpoint.h"
#include "runtime/error.h"
#include "train/config.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"
#include "train/tokenizer.h"
#include "train/trainer.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

using LD = long double;

const std::vector<LossType> kNewTypes = {LossType::ExoPair,  LossType::NcaPair,  LossType::BcoPair,
                                         LossType::SppoHard, LossType::ApoZero,  LossType::ApoDown,
                                         LossType::Discopop, LossType::SigmoidNorm, LossType::Simpo};

LD lsig(LD x) { return -std::log1p(std::exp(-x)); }  // naive log sigmoid; long double keeps it finite here
LD sig(LD x) { return 1.0L / (1.0L + std::exp(-x)); }

struct Settings {
  double beta = 0.1, ls = 0.0, tau = 0.05, gamma = 0.5, alpha = 0.5;
  FDivergence f = FDivergence::ReverseKl;
  bool ref_free = false;
};

LossConfig config_of(std::vector<LossTerm> terms, const Settings& s) {
  LossConfig c;
  c.terms = std::move(terms);
  c.beta = s.beta;
  c.label_smoothing = s.ls;
  c.discopop_tau = s.tau;
  c.simpo_gamma = s.gamma;
  c.f_divergence = s.f;
  c.f_alpha_divergence_coef = s.alpha;
  c.reference_free = s.ref_free;
  return c;
}

LossConfig single(LossType t, Settings s = {}) {
  if (t == LossType::ExoPair && s.ls == 0) s.ls = 1e-3;
  if (t == LossType::Simpo) s.ref_free = true;
  return config_of({{t, 1.0}}, s);
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

// The f-divergence score (f-DPO, Wang et al. 2023, as TRL maps a log-ratio), naive long double.
LD score(const Settings& s, LD x) {
  switch (s.f) {
    case FDivergence::ReverseKl: return x;
    case FDivergence::ForwardKl: return 1 - std::exp(-x);
    case FDivergence::Js: return std::log(2.0L) + lsig(x);
    case FDivergence::Alpha: {
      const LD a = s.alpha;
      if (std::fabs(a - 1) < 1e-6L) return x;
      return (std::exp(std::min((a - 1) * x, 80.0L)) - 1) / (a - 1);
    }
  }
  return x;
}

// The term's loss from the formulas of the papers as TRL writes them (trl/trainer/dpo_trainer.py 1.16.0;
// trl/experimental/cpo/cpo_trainer.py for simpo), naive long double.
LD closed_form(LossType t, const Settings& s, const PairInput& in) {
  const LD beta = s.beta, eps = s.ls;
  const LD c = (LD)in.policy_chosen - (s.ref_free ? 0.0L : (LD)in.ref_chosen);
  const LD r = (LD)in.policy_rejected - (s.ref_free ? 0.0L : (LD)in.ref_rejected);
  const LD lc = (LD)in.len_chosen, lr = (LD)in.len_rejected;
  const LD z = beta * (score(s, c) - score(s, r));
  switch (t) {
    case LossType::ExoPair: {  // KL(softmax(z, 0) || (1 - eps, eps)), EXO (Ji et al. 2024) eq. 16
      const LD qw = sig(z), ql = sig(-z);
      return qw * (std::log(qw) - std::log(1 - eps)) + ql * (std::log(ql) - std::log(eps));
    }
    case LossType::NcaPair:  // NCA (Chen et al. 2024), pairwise
      return -lsig(beta * c) - 0.5L * lsig(-beta * c) - 0.5L * lsig(-beta * r);
    case LossType::BcoPair:
      return -lsig(beta * c) - lsig(-beta * r);
    case LossType::SppoHard: {  // SPPO (Wu et al. 2024) with hard probabilities 1 / 0
      const LD a = c - 0.5L / beta, b = r + 0.5L / beta;
      return a * a + b * b;
    }
    case LossType::ApoZero:  // APO (D'Oosterlinck et al. 2024) eq. 7
      return (1 - sig(beta * c)) + sig(beta * r);
    case LossType::ApoDown:  // eq. 8
      return sig(beta * c) + (1 - sig(beta * (c - r)));
    case LossType::Discopop: {  // DiscoPOP (Chris Lu et al. 2024) eq. 5, log-ratio modulated loss
      const LD m = sig(z / (LD)s.tau);
      return -lsig(z) * (1 - m) + std::exp(-z) * m;
    }
    case LossType::SigmoidNorm:
      return -lsig(beta * (score(s, c) / lc - score(s, r) / lr));
    case LossType::Simpo: {  // SimPO (Meng et al. 2024) eq. 6, CPO's conservative label smoothing
      const LD u = beta * ((LD)in.policy_chosen / lc - (LD)in.policy_rejected / lr) - (LD)s.gamma;
      return -(1 - eps) * lsig(u) - eps * lsig(-u);
    }
    default:
      ADD_FAILURE() << "closed_form: not a new loss type";
      return 0;
  }
}

// pair_loss_eval on a config (validated), as the trainer calls it.
PairLossOutput eval(const LossConfig& cfg, const PairInput& in) {
  return pair_loss_eval(pair_loss_params(cfg), pair_loss_input(cfg, in));
}

// Central finite differences of the double loss w.r.t. the two policy log-probs. The step is relative to the
// log-prob (h = 1e-7 * max(1, |x|), so h <= 2e-5 here): the truncation error h^2 |f3| / 6 (f3 the third
// derivative, at most beta^3 / tau^3 ~ 1e3 here) stays below 1e-7 and the rounding error about 1e-16 |f| / h
// below 1e-8 (|f| <= 1e3), so 1e-6 absolute plus 1e-6 relative separates a right derivative from a wrong one (a
// wrong sign or factor moves it by order 1e-2 or more at these points).
void expect_fd(const LossConfig& cfg, const PairInput& in, const std::string& at) {
  const PairLossOutput o = eval(cfg, in);
  for (int side = 0; side < 2; ++side) {
    PairInput a = in, b = in;
    double& xa = side == 0 ? a.policy_chosen : a.policy_rejected;
    double& xb = side == 0 ? b.policy_chosen : b.policy_rejected;
    const double h = 1e-7 * std::max(1.0, std::fabs(xa));
    xa += h;
    xb -= h;
    const double fd = (eval(cfg, a).loss - eval(cfg, b).loss) / (2 * h);
    const double got = side == 0 ? o.d_chosen : o.d_rejected;
    EXPECT_NEAR(got, fd, 1e-6 + 1e-6 * std::fabs(fd)) << at << (side == 0 ? " d_chosen" : " d_rejected");
  }
}

std::vector<PairInput> random_pairs(std::mt19937_64& g, size_t n, double spread) {
  std::uniform_real_distribution<double> lp(-200.0, -5.0), shift(-spread, spread);
  std::uniform_int_distribution<int64_t> len(1, 300);
  std::vector<PairInput> v;
  for (size_t i = 0; i < n; ++i) {
    const double rc = lp(g), rr = lp(g);
    v.push_back(pair(rc + shift(g), rr + shift(g), rc, rr, len(g), len(g)));
  }
  return v;
}

// --- closed forms --------------------------------------------------------------------------------------------

// Exact values where every log-ratio is 0 (or the SimPO margin is met exactly): s(0) = 1/2, log s(0) = -log 2.
TEST(MoreLosses, ExactValuesAtZeroLogRatio) {
  const double ln2 = std::log(2.0);
  const PairInput zero = pair(-30, -40, -30, -40, 7, 9);
  for (double beta : {0.1, 0.5, 2.0}) {
    Settings s;
    s.beta = beta;
    Settings exo = s;
    exo.ls = 0.05;
    EXPECT_NEAR(eval(single(LossType::ExoPair, exo), zero).loss, -ln2 - 0.5 * std::log(0.05 * 0.95), 1e-15);
    EXPECT_NEAR(eval(single(LossType::NcaPair, s), zero).loss, 2 * ln2, 1e-15);
    EXPECT_NEAR(eval(single(LossType::BcoPair, s), zero).loss, 2 * ln2, 1e-15);
    EXPECT_NEAR(eval(single(LossType::SppoHard, s), zero).loss, 0.5 / (beta * beta), 1e-12);
    EXPECT_NEAR(eval(single(LossType::ApoZero, s), zero).loss, 1.0, 1e-15);
    EXPECT_NEAR(eval(single(LossType::ApoDown, s), zero).loss, 1.0, 1e-15);
    EXPECT_NEAR(eval(single(LossType::Discopop, s), zero).loss, 0.5 * (ln2 + 1), 1e-15);
    EXPECT_NEAR(eval(single(LossType::SigmoidNorm, s), zero).loss, ln2, 1e-15);
    for (FDivergence f : {FDivergence::ForwardKl, FDivergence::Js, FDivergence::Alpha}) {
      Settings sf = s;
      sf.f = f;
      EXPECT_NEAR(eval(single(LossType::Sigmoid, sf), zero).loss, ln2, 1e-15) << f_divergence_name(f);
    }
    // SimPO: u = beta (pc/lc - pr/lr) - gamma = 0 with pc/lc = -1, pr/lr = -1 - gamma/beta (lengths 4, 8).
    Settings sp = s;
    sp.gamma = 0.75;
    const PairInput met = pair(-4.0, -8.0 * (1 + 0.75 / beta), 0, 0, 4, 8);
    EXPECT_NEAR(eval(single(LossType::Simpo, sp), met).loss, ln2, 1e-12);
  }
  // sppo_hard at its zero: c = 1/(2 beta), r = -1/(2 beta).
  Settings s;
  s.beta = 0.25;
  const PairOutput o = pair_loss(single(LossType::SppoHard, s), pair(-10 + 2.0, -20 - 2.0, -10, -20));
  EXPECT_EQ(o.loss, 0.0);
  EXPECT_EQ(o.d_policy_chosen, 0.0);
  EXPECT_EQ(o.d_policy_rejected, 0.0);
  // exo_pair at its minimum: s(z) = 1 - eps, i.e. z = log((1 - eps) / eps): loss and gradient 0.
  s.beta = 0.5;
  s.ls = 0.1;
  const double delta = std::log(0.9 / 0.1) / 0.5;
  const PairOutput e = pair_loss(single(LossType::ExoPair, s), pair(-50 + delta, -60, -50, -60));
  EXPECT_NEAR(e.loss, 0.0, 1e-15);
  EXPECT_NEAR(e.d_policy_chosen, 0.0, 1e-15);
}

TEST(MoreLosses, ClosedFormsAndFiniteDifferences) {
  std::mt19937_64 g(18);
  for (LossType t : kNewTypes)
    for (double beta : {0.05, 0.3, 1.5})
      for (FDivergence f : {FDivergence::ReverseKl, FDivergence::ForwardKl, FDivergence::Js, FDivergence::Alpha}) {
        if (f != FDivergence::ReverseKl && !uses_f_divergence(t)) continue;
        for (double alpha : {0.5, 1.7}) {
          if (alpha != 0.5 && f != FDivergence::Alpha) continue;
          Settings s;
          s.beta = beta;
          s.f = f;
          s.alpha = alpha;
          s.ls = (t == LossType::ExoPair || t == LossType::Simpo) ? 0.07 : 0.0;
          s.tau = 0.2;
          s.gamma = 0.4;
          s.ref_free = t == LossType::Simpo;
          const LossConfig cfg = single(t, s);
          // Log-ratios within +-4 (forward_kl's exp(-x) and the quadratic losses stay of order 1e2 at most).
          for (const PairInput& in : random_pairs(g, 12, 4.0)) {
            const std::string at = std::string(loss_type_name(t)) + " " + f_divergence_name(f) + " alpha " +
                                   std::to_string(alpha) + " beta " + std::to_string(beta) + " pc " +
                                   std::to_string(in.policy_chosen);
            const LD want = closed_form(t, s, in);
            // Double against long double: a few ulps per operation on values of order 1..1e3.
            EXPECT_NEAR(eval(cfg, in).loss, (double)want, 1e-12 * (1 + std::fabs((double)want))) << at;
            expect_fd(cfg, in, at);
          }
        }
      }
}

// The f-divergence versions of the existing losses (TRL maps the log-ratio for every loss it allows them with).
TEST(MoreLosses, FDivergenceOnExistingLossesFiniteDifferences) {
  std::mt19937_64 g(7);
  for (LossType t : {LossType::Sigmoid, LossType::Cdpo, LossType::Robust, LossType::Ipo, LossType::Hinge,
                     LossType::Sft})
    for (FDivergence f : {FDivergence::ForwardKl, FDivergence::Js, FDivergence::Alpha}) {
      Settings s;
      s.beta = 0.3;
      s.f = f;
      s.alpha = 0.3;
      s.ls = (t == LossType::Cdpo || t == LossType::Robust) ? 0.1 : 0.0;
      const LossConfig cfg = single(t, s);
      for (const PairInput& in : random_pairs(g, 10, 4.0)) {
        const std::string at = std::string(loss_type_name(t)) + " " + f_divergence_name(f);
        if (t == LossType::Hinge) {  // away from the kink only
          const double z = 0.3 * ((double)score(s, in.policy_chosen - in.ref_chosen) -
                                  (double)score(s, in.policy_rejected - in.ref_rejected));
          if (std::fabs(z - 1) < 1e-3) continue;
        }
        expect_fd(cfg, in, at);
      }
    }
}

// No overflow to NaN or inf where the value is finite: |beta * Delta| = 1e4 for the sigmoid-type losses.
TEST(MoreLosses, StableAtLargeMargins) {
  for (double d : {1e4, -1e4}) {
    const PairInput in = pair(-10 + d, -10, -10, -10, 3, 3);
    for (LossType t : {LossType::ExoPair, LossType::NcaPair, LossType::BcoPair, LossType::ApoZero,
                       LossType::ApoDown, LossType::Discopop, LossType::SigmoidNorm, LossType::Simpo}) {
      Settings s;
      s.beta = 1.0;
      s.gamma = 0.0;
      const PairOutput o = pair_loss(single(t, s), in);
      EXPECT_TRUE(std::isfinite(o.loss) && std::isfinite(o.d_policy_chosen) && std::isfinite(o.d_policy_rejected))
          << loss_type_name(t) << " delta " << d << ": " << o.loss << " " << o.d_policy_chosen;
    }
  }
  // discopop far on the wrong side: exp(-z) m is exp(-z - softplus(-z/tau)), not inf * 0.
  Settings s;
  s.beta = 1.0;
  const PairOutput o = pair_loss(single(LossType::Discopop, s), pair(-10 - 800, -10, -10, -10));
  EXPECT_NEAR(o.loss, 800.0, 1e-9);  // m = s(-16000) = 0: the logistic part, softplus(800) = 800
  EXPECT_NEAR(o.d_policy_chosen, -1.0, 1e-12);
  // forward_kl with an sft term at a log-ratio far below: dS/dx overflows, the sft gradient stays finite.
  Settings sf;
  sf.f = FDivergence::ForwardKl;
  const PairOutput f = pair_loss(single(LossType::Sft, sf), pair(-1000, -10, 0, 0, 4, 4));
  EXPECT_EQ(f.d_policy_chosen, -0.25);
  EXPECT_EQ(f.d_policy_rejected, 0.0);
}

// TRL clamps (alpha - 1) x at 80 before the exponential; above it the score is constant.
TEST(MoreLosses, AlphaDivergenceClampAndLimit) {
  const pair_math::Score a = pair_math::f_score(FDivergence::Alpha, 2.0, 100.0);
  EXPECT_EQ(a.value, std::expm1(80.0));
  EXPECT_EQ(a.deriv, 0.0);
  const pair_math::Score b = pair_math::f_score(FDivergence::Alpha, 1.0 + 1e-7, 3.0);  // |a - 1| < 1e-6: reverse KL
  EXPECT_EQ(b.value, 3.0);
  EXPECT_EQ(b.deriv, 1.0);
  const pair_math::Score c = pair_math::f_score(FDivergence::Alpha, 0.5, 2.0);
  EXPECT_NEAR(c.value, (std::exp(-1.0) - 1) / -0.5, 1e-15);
  EXPECT_NEAR(c.deriv, std::exp(-1.0), 1e-15);
}

// --- TRL's numbers -------------------------------------------------------------------------------------------

TEST(MoreLosses, MatchesTrlFixture) {
  const std::string path = std::string(DPO_FIXTURE_DIR) + "/trl_losses.json";
  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << path;
  const nlohmann::json doc = nlohmann::json::parse(f);
  ASSERT_EQ(doc.at("trl_version").get<std::string>(), "1.16.0");
  std::vector<std::string> covered;
  size_t n_cases = 0;
  for (const auto& c : doc.at("cases")) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    LossConfig cfg;
    cfg.terms = make_loss_terms(c.at("loss_type").get<std::vector<std::string>>(),
                                c.at("loss_weights").get<std::vector<double>>());
    cfg.beta = c.at("beta").get<double>();
    cfg.label_smoothing = c.at("label_smoothing").get<double>();
    cfg.f_divergence = parse_f_divergence(c.at("f_divergence_type").get<std::string>());
    cfg.f_alpha_divergence_coef = c.at("f_alpha_divergence_coef").get<double>();
    cfg.discopop_tau = c.at("discopop_tau").get<double>();
    cfg.simpo_gamma = c.at("simpo_gamma").get<double>();
    cfg.reference_free = cfg.terms.size() == 1 && cfg.terms[0].type == LossType::Simpo;
    for (const auto& t : cfg.terms) covered.push_back(loss_type_name(t.type));
    // float64 cases: TRL and this code differ by rounding only (different but equally exact expressions,
    // e.g. 1 - sigmoid(x) against sigmoid(-x)): 1e-10 relative to the value plus 1e-12.
    // exo_pair: TRL makes epsilon a float32 tensor (torch's default dtype), so its log eps and log(1 - eps) carry
    // float32 rounding, up to ulp(|log 1e-3|) / 2 = 4.8e-7 plus 6e-8 |d log eps / d eps| eps for eps itself;
    // they enter the loss with weights q_w + q_l = 1 and the derivative with beta q_w q_l <= beta / 4:
    // 1e-6 (1 + |value|).
    // float32 cases (the alpha-divergence, which TRL runs in float32 only): TRL's log-ratio pc - rc of log-probs
    // up to 200 carries float32 rounding of up to 2 ulp(200) = 3e-5, and the loss and derivatives move by at most
    // a few times that (their derivatives w.r.t. the log-ratio are at most order 1 at these points):
    // 2e-4 (1 + |value|).
    const bool f32 = c.at("dtype").get<std::string>() == "float32";
    const bool exo = std::any_of(cfg.terms.begin(), cfg.terms.end(),
                                 [](const LossTerm& t) { return t.type == LossType::ExoPair; });
    const auto tol = [f32, exo](double v) {
      return f32 ? 2e-4 * (1 + std::fabs(v)) : exo ? 1e-6 * (1 + std::fabs(v)) : 1e-12 + 1e-10 * std::fabs(v);
    };
    for (const auto& p : c.at("pairs")) {
      const PairInput in = pair(p.at("pc").get<double>(), p.at("pr").get<double>(), p.at("rc").get<double>(),
                                p.at("rr").get<double>(), p.at("lc").get<int64_t>(), p.at("lr").get<int64_t>());
      const PairOutput o = pair_loss(cfg, in);
      const double loss = p.at("loss").get<double>(), dc = p.at("d_pc").get<double>(), dr = p.at("d_pr").get<double>();
      EXPECT_NEAR(o.loss, loss, tol(loss)) << "pc " << in.policy_chosen;
      EXPECT_NEAR(o.d_policy_chosen, dc, tol(dc)) << "pc " << in.policy_chosen;
      EXPECT_NEAR(o.d_policy_rejected, dr, tol(dr)) << "pc " << in.policy_chosen;
    }
    ++n_cases;
  }
  EXPECT_GE(n_cases, 60u);
  // Every loss type both tools share is in the fixture (cdpo, aot, aot_unpaired: TRL has no cdpo; aot is refused).
  for (const char* t : {"sigmoid", "hinge", "ipo", "robust", "sft", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                        "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo"})
    EXPECT_NE(std::find(covered.begin(), covered.end(), t), covered.end()) << t;
}

// --- combinations --------------------------------------------------------------------------------------------

TEST(MoreLosses, WeightedSumOfEveryTypeEqualsSumOfSingles) {
  std::mt19937_64 g(3);
  Settings s;
  s.beta = 0.2;
  s.ls = 0.05;
  s.tau = 0.3;
  s.gamma = 0.6;
  std::vector<LossTerm> all;
  for (int t = 0; t < kNumLossTypes; ++t) all.push_back({static_cast<LossType>(t), 0.1 + 0.13 * t});
  ASSERT_EQ(all.size(), static_cast<size_t>(kMaxLossTerms));
  const LossConfig cfg = config_of(all, s);
  const PairLossParams params = pair_loss_params(cfg);
  for (const PairInput& in : random_pairs(g, 20, 5.0)) {
    const PairLossOutput o = pair_loss_eval(params, pair_loss_input(cfg, in));
    double loss = 0, dc = 0, dr = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      LossConfig one = config_of({{all[i].type, 1.0}}, s);
      if (all[i].type != LossType::Robust && all[i].type != LossType::Cdpo && all[i].type != LossType::ExoPair &&
          all[i].type != LossType::Simpo)
        one.label_smoothing = 0;
      PairLossParams p1 = params;  // the same settings, one term
      p1.n_terms = 1;
      p1.type[0] = all[i].type;
      p1.weight[0] = 1.0;
      const PairLossOutput t = pair_loss_eval(p1, pair_loss_input(one, in));
      EXPECT_EQ(o.term[i], t.loss) << loss_type_name(all[i].type);
      loss += all[i].weight * t.loss;
      dc += all[i].weight * t.d_chosen;
      dr += all[i].weight * t.d_rejected;
    }
    EXPECT_NEAR(o.loss, loss, 1e-12 * (1 + std::fabs(loss)));
    EXPECT_NEAR(o.d_chosen, dc, 1e-12 * (1 + std::fabs(dc)));
    EXPECT_NEAR(o.d_rejected, dr, 1e-12 * (1 + std::fabs(dr)));
  }
  // The batch sums carry one term column per listed type.
  const BatchLoss b = batch_loss(cfg, random_pairs(g, 5, 5.0), 5.0);
  EXPECT_EQ(b.term_loss_sum.size(), all.size());
}

TEST(MoreLosses, MpoStyleCombinationFiniteDifferences) {
  std::mt19937_64 g(11);
  Settings s;
  s.beta = 0.1;
  s.f = FDivergence::Js;
  const LossConfig js_mix = config_of({{LossType::Sigmoid, 0.8}, {LossType::SigmoidNorm, 0.5},
                                       {LossType::Discopop, 0.2}, {LossType::Sft, 1.0}}, s);
  s.f = FDivergence::ReverseKl;
  const LossConfig mpo = config_of({{LossType::Sigmoid, 0.8}, {LossType::BcoPair, 0.2}, {LossType::Sft, 1.0}}, s);
  for (const PairInput& in : random_pairs(g, 10, 5.0)) {
    expect_fd(js_mix, in, "js mix");
    expect_fd(mpo, in, "mpo");
  }
}

// --- the IPO paper's bandit ----------------------------------------------------------------------------------

// Three actions with tabular logits theta (policy softmax(theta)), a uniform reference, one-token "completions"
// (length 1, so per-token and summed forms agree): a pair (w, l) has policy log-probs log pi(w), log pi(l). The
// gradient of the mean pair loss w.r.t. theta is sum over pairs of d_chosen (e_w - pi) + d_rejected (e_l - pi)
// (the log-softmax backward), / pairs. Adam (lr 0.05, betas 0.9 / 0.999, eps 1e-8), `steps` full-batch steps.
struct Bandit {
  std::array<double, 3> theta{0, 0, 0};
  double first_loss = 0, last_loss = 0;
  bool finite = true;
  std::array<double, 3> probs() const {
    const double m = std::max({theta[0], theta[1], theta[2]});
    std::array<double, 3> p;
    double z = 0;
    for (int i = 0; i < 3; ++i) z += p[i] = std::exp(theta[i] - m);
    for (double& x : p) x /= z;
    return p;
  }
};

Bandit train_bandit(const LossConfig& cfg, const std::vector<std::pair<int, int>>& data, int steps) {
  Bandit b;
  const PairLossParams params = pair_loss_params(cfg);
  std::array<double, 3> m{}, v{};
  const double lr = 0.05, b1 = 0.9, b2 = 0.999;
  const double log_ref = -std::log(3.0);
  for (int step = 1; step <= steps; ++step) {
    const std::array<double, 3> p = b.probs();
    std::array<double, 3> grad{};
    double loss = 0;
    for (auto [w, l] : data) {
      PairLossInput in;
      in.policy_chosen = std::log(p[w]);
      in.policy_rejected = std::log(p[l]);
      in.ref_chosen = in.ref_rejected = log_ref;
      in.len_chosen = in.len_rejected = 1;
      const PairLossOutput o = pair_loss_eval(params, in);
      loss += o.loss / data.size();
      for (int i = 0; i < 3; ++i)
        grad[i] += (o.d_chosen * ((i == w) - p[i]) + o.d_rejected * ((i == l) - p[i])) / data.size();
    }
    if (step == 1) b.first_loss = loss;
    b.last_loss = loss;
    for (int i = 0; i < 3; ++i) {
      if (!std::isfinite(grad[i]) || !std::isfinite(loss)) b.finite = false;
      m[i] = b1 * m[i] + (1 - b1) * grad[i];
      v[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i];
      const double mh = m[i] / (1 - std::pow(b1, step)), vh = v[i] / (1 - std::pow(b2, step));
      b.theta[i] -= lr * mh / (std::sqrt(vh) + 1e-8);
    }
  }
  return b;
}

// The full order a > b > c (actions 0, 1, 2) as three pairs, the IPO paper's example.
const std::vector<std::pair<int, int>> kOrder = {{0, 1}, {1, 2}, {0, 2}};

TEST(MoreLosses, EveryLossTrainsOnTheBandit) {
  for (int t = 0; t < kNumLossTypes; ++t) {
    const auto type = static_cast<LossType>(t);
    for (FDivergence f : {FDivergence::ReverseKl, FDivergence::ForwardKl, FDivergence::Js, FDivergence::Alpha}) {
      if (f != FDivergence::ReverseKl && !uses_f_divergence(type)) continue;
      if (type == LossType::Sft) continue;  // no preference in it: it only raises the chosen actions
      if (is_batch_term(type)) continue;    // 0 per pair: Aot.TrainsOnTheBandit trains them through batch_loss
      Settings s;
      s.beta = 0.5;
      s.f = f;
      s.ls = (type == LossType::Robust || type == LossType::Cdpo || type == LossType::ExoPair) ? 0.1 : 0.0;
      // DiscoPOP with tau = 1: at TRL's tau = 0.05 the uniform start sits on the loss's bump at z = 0 and descends
      // to the wrong side (DiscopopBumpAtZero below).
      s.tau = 1.0;
      const Bandit b = train_bandit(single(type, s), kOrder, 300);
      const auto p = b.probs();
      SCOPED_TRACE(std::string(loss_type_name(type)) + " " + f_divergence_name(f));
      EXPECT_TRUE(b.finite);
      for (double th : b.theta) EXPECT_LT(std::fabs(th), 50.0);  // 300 steps of at most ~lr each: no blow-up
      EXPECT_LE(b.last_loss, b.first_loss + 1e-12);
      EXPECT_GT(p[0], p[2]);  // the preference is learned: best above worst
    }
  }
}

// DiscoPOP is not convex: with a small tau its mixing weight m = s(z / tau) switches from the logistic part
// (log 2 just below z = 0) to the exponential one (1 just above). At z = 0 (m = 1/2, e^-z m = 1/2) the slope is
// d/dz = -s(0)(1 - m) - log 2 m(1 - m)/tau + (1/2)((1 - m)/tau - 1) = -3/4 + (1 - log 2) / (4 tau), positive for
// tau < (1 - log 2) / 3 = 0.102: the loss rises through z = 0 (0.7843... at TRL's tau = 0.05). From the uniform
// start (every z = 0) the bandit therefore moves the wrong way, to the local minimum below 0; it stays finite and
// its loss falls. This is the loss as its paper and TRL define it, not a fault of the optimiser.
TEST(MoreLosses, DiscopopBumpAtZero) {
  for (double tau : {0.05, 0.2, 1.0}) {
    Settings s;
    s.beta = 0.5;
    s.tau = tau;
    const PairOutput o = pair_loss(single(LossType::Discopop, s), pair(-20, -30, -20, -30));
    const double slope = -0.75 + (1 - std::log(2.0)) / (4 * tau);
    EXPECT_NEAR(o.d_policy_chosen, 0.5 * slope, 1e-14) << tau;
    EXPECT_NEAR(o.d_policy_rejected, -0.5 * slope, 1e-14) << tau;
  }
  Settings s;
  s.beta = 0.5;
  const Bandit b = train_bandit(single(LossType::Discopop, s), kOrder, 300);
  EXPECT_TRUE(b.finite);
  EXPECT_LT(b.last_loss, b.first_loss);
  const auto p = b.probs();
  EXPECT_LT(p[0], p[2]);
}

// Fixed points known in closed form.
TEST(MoreLosses, BanditFixedPoints) {
  const double log3 = std::log(3.0);
  // IPO on the full order: least squares over the three pairs of (h - 1/(2 tau)), h = theta_w - theta_l, gives
  // theta_a - theta_b = theta_b - theta_c = 1/(3 tau) (Azar et al. 2023, section 5.1).
  {
    Settings s;
    s.beta = 0.5;
    const Bandit b = train_bandit(single(LossType::Ipo, s), kOrder, 2000);
    EXPECT_NEAR(b.theta[0] - b.theta[1], 1 / (3 * 0.5), 1e-3);
    EXPECT_NEAR(b.theta[1] - b.theta[2], 1 / (3 * 0.5), 1e-3);
  }
  // One pair a > b, c unrated.
  const std::vector<std::pair<int, int>> one = {{0, 1}};
  // exo_pair: s(beta (h_a - h_b)) = 1 - eps, the target distribution (Ji et al. 2024).
  {
    Settings s;
    s.beta = 0.5;
    s.ls = 0.1;
    const Bandit b = train_bandit(single(LossType::ExoPair, s), one, 2000);
    EXPECT_NEAR(0.5 * (b.theta[0] - b.theta[1]), std::log(0.9 / 0.1), 1e-3);
  }
  // sppo_hard with beta = 1: log-ratios +-1/2 are reachable (e^{1/2} + e^{-1/2} < 3), so the loss reaches 0 at
  // pi_a = e^{1/2} / 3, pi_b = e^{-1/2} / 3.
  {
    Settings s;
    s.beta = 1.0;
    const Bandit b = train_bandit(single(LossType::SppoHard, s), one, 2000);
    const auto p = b.probs();
    EXPECT_NEAR(std::log(p[0]) + log3, 0.5, 1e-3);
    EXPECT_NEAR(std::log(p[1]) + log3, -0.5, 1e-3);
    EXPECT_NEAR(b.last_loss, 0.0, 1e-6);
  }
  // nca_pair with beta = 1: d/dh_a [-log s(h_a) - log s(-h_a)/2] = 0 at e^{h_a} = 2, so pi_a -> 2/3, while the
  // rejected term keeps pushing pi_b -> 0 (no finite theta_b): only pi_a's limit is checked, loosely.
  {
    Settings s;
    s.beta = 1.0;
    const Bandit b = train_bandit(single(LossType::NcaPair, s), one, 3000);
    EXPECT_NEAR(b.probs()[0], 2.0 / 3.0, 0.02);
  }
}

// --- configuration -------------------------------------------------------------------------------------------

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(MoreLosses, NamesRoundTripAsTrl) {
  const std::vector<std::pair<const char*, LossType>> names = {
      {"exo_pair", LossType::ExoPair},   {"nca_pair", LossType::NcaPair},     {"bco_pair", LossType::BcoPair},
      {"sppo_hard", LossType::SppoHard}, {"apo_zero", LossType::ApoZero},     {"apo_down", LossType::ApoDown},
      {"discopop", LossType::Discopop},  {"sigmoid_norm", LossType::SigmoidNorm}, {"simpo", LossType::Simpo}};
  for (const auto& [n, t] : names) {
    EXPECT_EQ(parse_loss_type(n), t);
    EXPECT_STREQ(loss_type_name(t), n);
  }
  for (const char* f : {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"})
    EXPECT_STREQ(f_divergence_name(parse_f_divergence(f)), f);
  const std::string e = error_of([] { parse_f_divergence("kl"); });
  EXPECT_NE(e.find("f_divergence_type"), std::string::npos) << e;
  EXPECT_NE(e.find("js_divergence"), std::string::npos) << e;
  const std::string u = error_of([] { parse_loss_type("exo"); });
  EXPECT_NE(u.find("sigmoid_norm"), std::string::npos) << u;
}

TEST(MoreLosses, BatchLossNamesAsTrl) {
  EXPECT_EQ(parse_loss_type("aot"), LossType::Aot);
  EXPECT_EQ(parse_loss_type("aot_unpaired"), LossType::AotUnpaired);
  EXPECT_STREQ(loss_type_name(LossType::Aot), "aot");
  EXPECT_STREQ(loss_type_name(LossType::AotUnpaired), "aot_unpaired");
  EXPECT_TRUE(is_batch_term(LossType::Aot) && is_batch_term(LossType::AotUnpaired));
  EXPECT_FALSE(is_batch_term(LossType::Sigmoid));
}

TEST(MoreLosses, Validation) {
  Settings s;
  // exo_pair needs label smoothing > 0 (TRL refuses 0 too).
  LossConfig exo = config_of({{LossType::ExoPair, 1.0}}, s);
  EXPECT_NE(error_of([&] { exo.validate(); }).find("label_smoothing"), std::string::npos);
  exo.label_smoothing = 1e-3;
  EXPECT_NO_THROW(exo.validate());
  // label_smoothing with a loss that ignores it.
  Settings ls = s;
  ls.ls = 0.1;
  EXPECT_NE(error_of([&] { config_of({{LossType::NcaPair, 1.0}}, ls).validate(); }).find("label_smoothing"),
            std::string::npos);
  Settings simpo_ls = ls;
  simpo_ls.ref_free = true;
  EXPECT_NO_THROW(config_of({{LossType::Simpo, 1.0}}, simpo_ls).validate());
  // discopop_tau.
  for (double tau : {0.0, -1.0, std::nan("")}) {
    Settings st = s;
    st.tau = tau;
    EXPECT_NE(error_of([&] { config_of({{LossType::Discopop, 1.0}}, st).validate(); }).find("discopop_tau"),
              std::string::npos);
  }
  Settings sg = s;
  sg.gamma = INFINITY;
  sg.ref_free = true;
  EXPECT_NE(error_of([&] { config_of({{LossType::Simpo, 1.0}}, sg).validate(); }).find("simpo_gamma"),
            std::string::npos);
  Settings sa = s;
  sa.alpha = NAN;
  EXPECT_NE(error_of([&] { config_of({{LossType::Sigmoid, 1.0}}, sa).validate(); }).find("f_alpha_divergence_coef"),
            std::string::npos);
  // f-divergences only with the losses TRL allows them for.
  for (LossType t : {LossType::NcaPair, LossType::BcoPair, LossType::SppoHard, LossType::ApoZero,
                     LossType::ApoDown, LossType::Simpo}) {
    Settings sf = s;
    sf.f = FDivergence::Js;
    sf.ref_free = t == LossType::Simpo;
    const std::string e = error_of([&] { config_of({{LossType::Sigmoid, 1.0}, {t, 1.0}}, sf).validate(); });
    EXPECT_NE(e.find("f_divergence_type"), std::string::npos) << loss_type_name(t) << ": " << e;
    EXPECT_NE(e.find(loss_type_name(t)), std::string::npos) << e;
  }
  Settings sf = s;
  sf.f = FDivergence::ForwardKl;
  EXPECT_NO_THROW(config_of({{LossType::Sigmoid, 1.0}, {LossType::SigmoidNorm, 1.0}, {LossType::Discopop, 1.0},
                             {LossType::Ipo, 1.0}, {LossType::Hinge, 1.0}, {LossType::Sft, 1.0}}, sf)
                      .validate());
  // simpo never reads the reference: a simpo(+sft)-only list must say reference_free.
  const std::string r = error_of([&] { config_of({{LossType::Simpo, 1.0}, {LossType::Sft, 0.5}}, s).validate(); });
  EXPECT_NE(r.find("reference_free"), std::string::npos) << r;
  EXPECT_NO_THROW(config_of({{LossType::Simpo, 1.0}, {LossType::Sigmoid, 0.5}}, s).validate());
  // Every type at once fits kMaxLossTerms.
  std::vector<LossTerm> all;
  for (int t = 0; t < kNumLossTypes; ++t) all.push_back({static_cast<LossType>(t), 1.0});
  Settings se = s;
  se.ls = 0.1;
  EXPECT_NO_THROW(config_of(all, se).validate());
}

TEST(MoreLosses, SimpoIgnoresTheReference) {
  Settings s;
  s.beta = 2.0;
  s.gamma = 0.5;
  s.ref_free = true;
  const LossConfig free = config_of({{LossType::Simpo, 1.0}}, s);
  s.ref_free = false;
  const LossConfig with_ref = config_of({{LossType::Simpo, 1.0}, {LossType::Sigmoid, 0.0}}, s);
  const PairInput a = pair(-30, -45, -20, -60, 10, 15), b = pair(-30, -45, 0, 0, 10, 15);
  EXPECT_EQ(eval(free, a).loss, eval(free, b).loss);
  EXPECT_EQ(eval(with_ref, a).term[0], eval(free, a).loss);
}

// --- LD-DPO (ld_alpha) -------------------------------------------------------------------------------------------

// TRL's numbers on per-token log-probs: each pair becomes a one-pair batch (make_batch, then apply_ld_alpha), each
// sequence's log-prob the weighted sum of the given token log-probs over its scored slots in order (what the
// log-prob kernel computes, kernels/logprob.h), for the policy and the reference alike, and its lengths the scored
// slot counts (kSeqTokens). The derivative w.r.t. a policy token log-prob is the sequence's dL/dlogp times the
// token's weight (the kernel's backward). TRL ran the reference live, applying ld_alpha to it as to the policy.
TEST(LdAlpha, MatchesTrlFixture) {
  const std::string path = std::string(DPO_FIXTURE_DIR) + "/trl_losses.json";
  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << path;
  const nlohmann::json doc = nlohmann::json::parse(f);
  size_t n_cases = 0;
  for (const auto& c : doc.at("ld_cases")) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    LossConfig cfg;
    cfg.terms = make_loss_terms(c.at("loss_type").get<std::vector<std::string>>(),
                                c.at("loss_weights").get<std::vector<double>>());
    cfg.beta = c.at("beta").get<double>();
    const double alpha = c.at("ld_alpha").get<double>();
    bool saw_tail = false;
    for (const auto& p : c.at("pairs")) {
      const auto tc = p.at("policy_chosen").get<std::vector<double>>();
      const auto tr = p.at("policy_rejected").get<std::vector<double>>();
      const auto uc = p.at("ref_chosen").get<std::vector<double>>();
      const auto ur = p.at("ref_rejected").get<std::vector<double>>();
      PreferencePair pp;
      pp.prompt = {1, 2};
      pp.chosen.assign(tc.size(), 5);
      pp.rejected.assign(tr.size(), 6);
      Batch b = make_batch({pp}, {0}, DType::F64, 0);
      apply_ld_alpha(b, alpha);
      const double* w = b.weights.data<double>();
      std::vector<std::vector<double>> wts(2);  // the scored slots' weights of each row, in order
      for (int row = 0; row < 2; ++row)
        for (int64_t t = 0; t < b.T; ++t)
          if (w[row * b.T + t] != 0) wts[static_cast<size_t>(row)].push_back(w[row * b.T + t]);
      ASSERT_EQ(wts[0].size(), tc.size());
      ASSERT_EQ(wts[1].size(), tr.size());
      auto dot = [](const std::vector<double>& a, const std::vector<double>& x) {
        double s = 0;
        for (size_t i = 0; i < a.size(); ++i) s += a[i] * x[i];
        return s;
      };
      const PairInput in = pair(dot(wts[0], tc), dot(wts[1], tr), dot(wts[0], uc), dot(wts[1], ur),
                                static_cast<int64_t>(tc.size()), static_cast<int64_t>(tr.size()));
      const PairOutput o = pair_loss(cfg, in);
      // float64 on both sides, sums of at most 11 terms: 1e-12 absolute plus 1e-10 relative.
      const auto tol = [](double v) { return 1e-12 + 1e-10 * std::fabs(v); };
      const double loss = p.at("loss").get<double>();
      EXPECT_NEAR(o.loss, loss, tol(loss));
      const auto gc = p.at("d_policy_chosen").get<std::vector<double>>();
      const auto gr = p.at("d_policy_rejected").get<std::vector<double>>();
      for (size_t k = 0; k < gc.size(); ++k) EXPECT_NEAR(o.d_policy_chosen * wts[0][k], gc[k], tol(gc[k])) << k;
      for (size_t k = 0; k < gr.size(); ++k) EXPECT_NEAR(o.d_policy_rejected * wts[1][k], gr[k], tol(gr[k])) << k;
      saw_tail = saw_tail || tc.size() != tr.size();
    }
    EXPECT_TRUE(saw_tail);
    ++n_cases;
  }
  EXPECT_GE(n_cases, 5u);
}

TrainConfig minimal_train_config() {
  TrainConfig c;
  c.model = "m";
  c.train_file = "t.jsonl";
  c.out_dir = "o";
  return c;
}

TEST(LdAlpha, ConfigBoundsAndCombinations) {
  for (double a : {0.0, -0.1, 1.5, std::nan("")}) {
    TrainConfig c = minimal_train_config();
    c.ld_alpha = a;
    const std::string e = error_of([&] { validate(c, RunKind::Dpo); });
    EXPECT_NE(e.find("ld_alpha"), std::string::npos) << a << ": " << e;
  }
  TrainConfig ok = minimal_train_config();
  ok.ld_alpha = 0.5;
  EXPECT_NO_THROW(validate(ok, RunKind::Dpo));
  TrainConfig sft = ok;
  sft.loss_type = {"sigmoid", "sft"};
  EXPECT_NE(error_of([&] { validate(sft, RunKind::Dpo); }).find("ld_alpha"), std::string::npos);
  TrainConfig rpo = ok;
  rpo.rpo_alpha = 0.5;
  const std::string e = error_of([&] { validate(rpo, RunKind::Dpo); });
  EXPECT_NE(e.find("rpo_alpha"), std::string::npos) << e;
  rpo.ld_alpha = 1.0;
  EXPECT_NO_THROW(validate(rpo, RunKind::Dpo));
}

// The reference cache records ld_alpha: a cache written without it (or with another value) is not reused.
TEST(LdAlpha, ReferenceCacheKeyRecordsIt) {
  test::ScratchDir w("dpo_ld_cache_");
  test::write_tiny_fixture(w.dir.string(), 10);
  auto be = make_cpu_backend(1);
  auto ref = load_gpt2_checkpoint(*be, w / "base", DType::F32);
  auto tok = make_tokenizer("byte");
  DataOptions d;
  d.max_length = 32;
  const auto pairs = load_preferences(w / "pref.jsonl", *tok, d, nullptr);
  const std::string data = w / "pref.jsonl", cache = w / "cache";
  BatchShape plain, ld;
  ld.ld_alpha = 0.5;
  const auto r0 = cached_ref_logps(*ref, pairs, data, "s", cache, 4, plain);
  EXPECT_EQ(r0.status, RefCacheResult::Status::Miss);
  const auto r1 = cached_ref_logps(*ref, pairs, data, "s", cache, 4, ld);
  EXPECT_EQ(r1.status, RefCacheResult::Status::Miss);
  EXPECT_NE(r0.path, r1.path);
  EXPECT_EQ(cached_ref_logps(*ref, pairs, data, "s", cache, 4, ld).status, RefCacheResult::Status::Hit);
  ld.ld_alpha = 0.25;
  EXPECT_EQ(cached_ref_logps(*ref, pairs, data, "s", cache, 4, ld).status, RefCacheResult::Status::Miss);
  // The LD-weighted values differ from the plain ones only where a pair's completions differ in length.
  bool differ = false;
  for (size_t i = 0; i < pairs.size(); ++i) {
    if (pairs[i].chosen.size() == pairs[i].rejected.size()) {
      EXPECT_EQ(r0.logps.chosen[i], r1.logps.chosen[i]) << i;
      EXPECT_EQ(r0.logps.rejected[i], r1.logps.rejected[i]) << i;
    }
    differ = differ || r0.logps.chosen[i] != r1.logps.chosen[i] || r0.logps.rejected[i] != r1.logps.rejected[i];
  }
  EXPECT_TRUE(differ);
}

// --- AOT (aot, aot_unpaired): batch terms ----------------------------------------------------------------------

LossConfig aot_config(std::vector<LossTerm> terms, double beta, double ls = 0.0, bool ref_free = false) {
  Settings s;
  s.beta = beta;
  s.ls = ls;
  s.ref_free = ref_free;
  return config_of(std::move(terms), s);
}

TEST(Aot, MatchesTrlFixture) {
  const std::string path = std::string(DPO_FIXTURE_DIR) + "/trl_losses.json";
  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << path;
  const nlohmann::json doc = nlohmann::json::parse(f);
  std::vector<std::string> covered;
  for (const auto& c : doc.at("batch_cases")) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    LossConfig cfg;
    cfg.terms = make_loss_terms(c.at("loss_type").get<std::vector<std::string>>(),
                                c.at("loss_weights").get<std::vector<double>>());
    cfg.beta = c.at("beta").get<double>();
    cfg.label_smoothing = c.at("label_smoothing").get<double>();
    for (const auto& t : cfg.terms) covered.push_back(loss_type_name(t.type));
    for (const auto& b : c.at("batches")) {
      const auto pc = b.at("pc").get<std::vector<double>>(), pr = b.at("pr").get<std::vector<double>>();
      const auto rc = b.at("rc").get<std::vector<double>>(), rr = b.at("rr").get<std::vector<double>>();
      const auto lc = b.at("lc").get<std::vector<int64_t>>(), lr = b.at("lr").get<std::vector<int64_t>>();
      std::vector<PairInput> in;
      for (size_t q = 0; q < pc.size(); ++q) in.push_back(pair(pc[q], pr[q], rc[q], rr[q], lc[q], lr[q]));
      const auto P = static_cast<double>(in.size());
      // TRL's loss is the batch mean: normalizer P gives its value and derivatives.
      const BatchLoss bl = batch_loss(cfg, in, P);
      // float64 on both sides; the log-ratios of log-probs up to 200 carry ~1e-14 of rounding: 1e-12 + 1e-10 |v|.
      const auto tol = [](double v) { return 1e-12 + 1e-10 * std::fabs(v); };
      const double loss = b.at("loss").get<double>();
      EXPECT_NEAR(bl.loss_sum / P, loss, tol(loss));
      const auto dc = b.at("d_pc").get<std::vector<double>>(), dr = b.at("d_pr").get<std::vector<double>>();
      for (size_t q = 0; q < in.size(); ++q) {
        EXPECT_NEAR(bl.d_policy_chosen[q], dc[q], tol(dc[q])) << q;
        EXPECT_NEAR(bl.d_policy_rejected[q], dr[q], tol(dr[q])) << q;
      }
    }
  }
  for (const char* t : {"aot", "aot_unpaired"})
    EXPECT_NE(std::find(covered.begin(), covered.end(), t), covered.end()) << t;
}

// Three pairs worked by hand. aot: x = pc - pr = (1, -2, 0.5), y = rc - rr = (0, 0.3, -1); sorted x (-2, 0.5, 1)
// (pairs 1, 2, 0), sorted y (-1, 0, 0.3): d = (-1, 0.5, 0.7), loss = sum softplus(-beta d); rank k's
// -beta s(-beta d_k) goes to pair (1, 2, 0)[k]. aot_unpaired: below.
TEST(Aot, HandWorkedSort) {
  const double beta = 0.5;
  auto l = [beta](double d) { return std::log1p(std::exp(-beta * d)); };
  auto g = [beta](double d) { return -beta / (1 + std::exp(beta * d)); };
  {
    // pair(pc, pr, rc, rr): x = pc - pr, y = rc - rr.
    const std::vector<PairInput> in = {pair(1, 0, 0, 0), pair(-2, 0, 0.3, 0), pair(0.5, 0, -1, 0)};
    const BatchLoss b = batch_loss(aot_config({{LossType::Aot, 1.0}}, beta), in, 1.0);
    EXPECT_NEAR(b.loss_sum, l(-1) + l(0.5) + l(0.7), 1e-15);
    EXPECT_NEAR(b.d_policy_chosen[1], g(-1), 1e-15);
    EXPECT_NEAR(b.d_policy_chosen[2], g(0.5), 1e-15);
    EXPECT_NEAR(b.d_policy_chosen[0], g(0.7), 1e-15);
    for (int q = 0; q < 3; ++q) EXPECT_EQ(b.d_policy_rejected[q], -b.d_policy_chosen[q]);
  }
  {
    // c = pc - rc = (1, -1.7, -0.5) (pairs sorted 1, 2, 0), r = pr - rr = (0, 0.3, -1) (sorted 2, 0, 1):
    // d = (-1.7 - -1, -0.5 - 0, 1 - 0.3) = (-0.7, -0.5, 0.7).
    const std::vector<PairInput> in = {pair(1, 0, 0, 0), pair(-1.7, 0.3, 0, 0), pair(-0.5, -1, 0, 0)};
    const BatchLoss b = batch_loss(aot_config({{LossType::AotUnpaired, 1.0}}, beta), in, 1.0);
    EXPECT_NEAR(b.loss_sum, l(-0.7) + l(-0.5) + l(0.7), 1e-15);
    EXPECT_NEAR(b.d_policy_chosen[1], g(-0.7), 1e-15);
    EXPECT_NEAR(b.d_policy_chosen[2], g(-0.5), 1e-15);
    EXPECT_NEAR(b.d_policy_chosen[0], g(0.7), 1e-15);
    EXPECT_NEAR(b.d_policy_rejected[2], -g(-0.7), 1e-15);
    EXPECT_NEAR(b.d_policy_rejected[0], -g(-0.5), 1e-15);
    EXPECT_NEAR(b.d_policy_rejected[1], -g(0.7), 1e-15);
  }
}

// One pair: aot and aot_unpaired are DPO's sigmoid loss (cdpo's with label smoothing).
TEST(Aot, OnePairIsDpo) {
  std::mt19937_64 g(11);
  for (const PairInput& in : random_pairs(g, 10, 5.0))
    for (LossType t : {LossType::Aot, LossType::AotUnpaired}) {
      const BatchLoss a = batch_loss(aot_config({{t, 1.0}}, 0.3, 0.1), {in}, 1.0);
      const BatchLoss c = batch_loss(aot_config({{LossType::Cdpo, 1.0}}, 0.3, 0.1), {in}, 1.0);
      EXPECT_NEAR(a.loss_sum, c.loss_sum, 1e-13 * (1 + std::fabs(c.loss_sum)));
      EXPECT_NEAR(a.d_policy_chosen[0], c.d_policy_chosen[0], 1e-13);
      EXPECT_NEAR(a.d_policy_rejected[0], c.d_policy_rejected[0], 1e-13);
    }
}

// The smallest gap between sorted values of the keys a batch term sorts (aot: x and y; aot_unpaired: c and r).
double min_sorted_gap(const std::vector<PairInput>& in) {
  double gap = INFINITY;
  std::vector<std::vector<double>> keys(4);
  for (const PairInput& p : in) {
    keys[0].push_back(p.policy_chosen - p.policy_rejected);
    keys[1].push_back(p.policy_chosen - p.ref_chosen);
    keys[2].push_back(p.policy_rejected - p.ref_rejected);
    keys[3].push_back(p.policy_chosen);
  }
  for (auto& k : keys) {
    std::sort(k.begin(), k.end());
    for (size_t i = 1; i < k.size(); ++i) gap = std::min(gap, k[i] - k[i - 1]);
  }
  return gap;
}

// Central finite differences of batch_loss's loss_sum w.r.t. every policy log-prob, in double, on random batches
// whose sorted keys are at least 1e-3 apart (so h = 1e-6 never reorders them, away from ties): truncation h^2 |f3|
// / 6 < 1e-12 (f3 the third derivative, order beta^3), rounding ~1e-16 |f| / h < 1e-9. With weights, label
// smoothing, per-pair terms beside them, reference-free.
TEST(Aot, FiniteDifferences) {
  std::mt19937_64 g(test::test_seed());
  const std::vector<LossConfig> cfgs = {
      aot_config({{LossType::Aot, 1.0}}, 0.4), aot_config({{LossType::AotUnpaired, 1.0}}, 0.4),
      aot_config({{LossType::Aot, 0.7}, {LossType::AotUnpaired, 0.3}}, 0.8, 0.2),
      aot_config({{LossType::Aot, 1.0}, {LossType::Sigmoid, 0.5}, {LossType::Ipo, 0.1}}, 0.2),
      aot_config({{LossType::AotUnpaired, 1.0}}, 0.3, 0.0, true)};
  for (const LossConfig& cfg : cfgs) {
    std::vector<PairInput> in;
    do in = random_pairs(g, 13, 4.0);
    while (min_sorted_gap(in) < 1e-3);
    const double normalizer = 17;
    const BatchLoss b = batch_loss(cfg, in, normalizer);
    for (size_t q = 0; q < in.size(); ++q)
      for (int side = 0; side < 2; ++side) {
        std::vector<PairInput> hi = in, lo = in;
        const double h = 1e-6;
        (side == 0 ? hi[q].policy_chosen : hi[q].policy_rejected) += h;
        (side == 0 ? lo[q].policy_chosen : lo[q].policy_rejected) -= h;
        const double fd =
            (batch_loss(cfg, hi, normalizer).loss_sum - batch_loss(cfg, lo, normalizer).loss_sum) / (2 * h);
        const double an = (side == 0 ? b.d_policy_chosen[q] : b.d_policy_rejected[q]) * normalizer;
        EXPECT_NEAR(an, fd, 1e-7 * (1 + std::fabs(fd))) << "pair " << q << " side " << side;
      }
  }
}

// The sort's tie rule: equal keys rank in pair order, so the result depends on the inputs only (bitwise the same
// on every call); the loss, a function of the sorted values, is the same under any order of the pairs, and the
// gradients follow the pairs (away from ties).
TEST(Aot, TiesAndPairOrder) {
  const LossConfig cfg = aot_config({{LossType::Aot, 1.0}, {LossType::AotUnpaired, 0.5}}, 0.3);
  // Pairs 0 and 2 tie on x = pc - pr (1.5) and on c = pc - rc (0.5) but differ in y and r.
  const std::vector<PairInput> tied = {pair(-1, -2.5, -1.5, -2), pair(-3, -3.2, -4, -4), pair(-2, -3.5, -2.5, -4.5)};
  const BatchLoss a = batch_loss(cfg, tied, 1.0), a2 = batch_loss(cfg, tied, 1.0);
  EXPECT_EQ(a.loss_sum, a2.loss_sum);
  EXPECT_EQ(a.d_policy_chosen, a2.d_policy_chosen);
  EXPECT_EQ(a.d_policy_rejected, a2.d_policy_rejected);
  const std::vector<PairInput> swapped = {tied[2], tied[1], tied[0]};
  EXPECT_NEAR(batch_loss(cfg, swapped, 1.0).loss_sum, a.loss_sum, 1e-15);
  // Tied pairs rank in pair order: aot's x ranks pair 1 (0.2) first, then pairs 0 and 2 (1.5 each), in that
  // order; sorted y = (0, 0.5, 2): so pair 0 takes d = 1.5 - 0.5 and pair 2 d = 1.5 - 2.
  const LossConfig only_aot = aot_config({{LossType::Aot, 1.0}}, 0.3);
  const BatchLoss t = batch_loss(only_aot, tied, 1.0);
  auto g = [](double d) { return -0.3 / (1 + std::exp(0.3 * d)); };
  EXPECT_NEAR(t.d_policy_chosen[0], g(1.0), 1e-15);
  EXPECT_NEAR(t.d_policy_chosen[2], g(-0.5), 1e-15);
  // Away from ties: a permutation of the pairs permutes the gradients.
  std::mt19937_64 r(5);
  std::vector<PairInput> in;
  do in = random_pairs(r, 9, 4.0);
  while (min_sorted_gap(in) < 1e-6);
  const std::vector<size_t> perm = {4, 0, 8, 2, 7, 1, 3, 6, 5};
  std::vector<PairInput> pin;
  for (size_t i : perm) pin.push_back(in[i]);
  const BatchLoss x = batch_loss(cfg, in, 3.0), y = batch_loss(cfg, pin, 3.0);
  EXPECT_NEAR(x.loss_sum, y.loss_sum, 1e-12);
  for (size_t k = 0; k < perm.size(); ++k) {
    EXPECT_EQ(y.d_policy_chosen[k], x.d_policy_chosen[perm[k]]);
    EXPECT_EQ(y.d_policy_rejected[k], x.d_policy_rejected[perm[k]]);
  }
  // A NaN log-prob gives a NaN loss, never a broken sort.
  std::vector<PairInput> nan = in;
  nan[3].policy_chosen = std::nan("");
  EXPECT_TRUE(std::isnan(batch_loss(cfg, nan, 1.0).loss_sum));
}

// pair_sums_row gives the device loss's PairSum row for per-pair losses (the backends add pair_sums_add pair by
// pair).
TEST(Aot, PairSumsRowMatchesPerPairSums) {
  std::mt19937_64 g(21);
  const LossConfig cfg = aot_config({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.2}}, 0.3);
  const std::vector<PairInput> in = random_pairs(g, 6, 4.0);
  std::vector<double> logits(12);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.5 * static_cast<double>(i) - 2;
  const std::vector<double> row = pair_sums_row(batch_loss(cfg, in, 1.0), in, logits);
  std::vector<double> expect(kPairSumsWidth, 0.0);
  const PairLossParams p = pair_loss_params(cfg);
  for (size_t q = 0; q < in.size(); ++q) {
    PairLossInput x = pair_loss_input(cfg, in[q]);
    x.logit_sum_chosen = logits[q];
    x.logit_sum_rejected = logits[6 + q];
    pair_sums_add(expect.data(), x, pair_loss_eval(p, x));
  }
  ASSERT_EQ(row.size(), expect.size());
  for (size_t k = 0; k < row.size(); ++k) EXPECT_NEAR(row[k], expect[k], 1e-12 * (1 + std::fabs(expect[k]))) << k;
}

// The 3-action bandit of the IPO paper, the three pairs of the full order as one micro-batch through batch_loss.
TEST(Aot, TrainsOnTheBandit) {
  for (LossType t : {LossType::Aot, LossType::AotUnpaired}) {
    SCOPED_TRACE(loss_type_name(t));
    const LossConfig cfg = aot_config({{t, 1.0}}, 0.5);
    Bandit b;
    std::array<double, 3> m{}, v{};
    double first = 0, last = 0;
    for (int step = 1; step <= 300; ++step) {
      const std::array<double, 3> p = b.probs();
      std::vector<PairInput> in;
      const double ref = -std::log(3.0);
      for (auto [w, l] : kOrder) in.push_back(pair(std::log(p[w]), std::log(p[l]), ref, ref, 1, 1));
      const BatchLoss bl = batch_loss(cfg, in, 3.0);
      (step == 1 ? first : last) = bl.loss_sum / 3;
      std::array<double, 3> grad{};
      for (size_t k = 0; k < kOrder.size(); ++k) {
        const auto [w, l] = kOrder[k];
        for (int i = 0; i < 3; ++i)
          grad[i] += bl.d_policy_chosen[k] * ((i == w) - p[i]) + bl.d_policy_rejected[k] * ((i == l) - p[i]);
      }
      for (int i = 0; i < 3; ++i) {
        m[i] = 0.9 * m[i] + 0.1 * grad[i];
        v[i] = 0.999 * v[i] + 0.001 * grad[i] * grad[i];
        const double mh = m[i] / (1 - std::pow(0.9, step)), vh = v[i] / (1 - std::pow(0.999, step));
        b.theta[i] -= 0.05 * mh / (std::sqrt(vh) + 1e-8);
      }
    }
    const auto p = b.probs();
    EXPECT_TRUE(std::isfinite(last));
    EXPECT_LT(last, first);
    EXPECT_GT(p[0], p[2]);
  }
}

RunOptions quiet_run() {
  RunOptions r;
  r.quiet = true;
  return r;
}

TrainConfig tiny_run(const test::ScratchDir& w, const std::string& out, const std::string& loss, int64_t mb) {
  TrainConfig c;
  c.model = w / "base";
  c.train_file = w / "pref.jsonl";
  c.out_dir = w / out;
  c.ref_cache_dir = w / "cache";
  c.max_length = 32;
  c.learning_rate = 1e-3;
  c.max_grad_norm = 0;
  c.per_device_train_batch_size = mb;
  c.gradient_accumulation_steps = 2;
  c.num_train_epochs = 1;
  c.logging_steps = 1;
  c.seed = 7;
  c.loss_type = {loss};
  return c;
}

// The trainer's batch-loss path (the whole micro-batch's log-probs, batch_loss on the host, the backward from
// dL/dlogp) against its fused per-pair path: with one pair per micro-batch aot and aot_unpaired are DPO's sigmoid,
// so the runs must end at the same weights up to float rounding (the paths sum the LM head's gradient in other
// orders); with four pairs per micro-batch they differ from sigmoid (the sort couples the pairs) and are
// deterministic (bitwise the same on a rerun).
TEST(Aot, TrainerRuns) {
  test::ScratchDir w("dpo_aot_run_");
  test::write_tiny_fixture(w.dir.string(), 12);
  const RunSummary sig = run_training(tiny_run(w, "sig", "sigmoid", 1), RunKind::Dpo, quiet_run());
  const auto w0 = test::checkpoint_weights(w / "base");
  const auto ws = test::checkpoint_weights(sig.final_checkpoint);
  for (const char* loss : {"aot", "aot_unpaired"}) {
    SCOPED_TRACE(loss);
    const RunSummary a = run_training(tiny_run(w, std::string(loss) + "1", loss, 1), RunKind::Dpo, quiet_run());
    const auto wa = test::checkpoint_weights(a.final_checkpoint);
    double diff = 0, move = 0;
    for (size_t i = 0; i < wa.size(); ++i) {
      diff = std::max(diff, std::fabs(wa[i] - ws[i]));
      move = std::max(move, std::fabs(ws[i] - w0[i]));
    }
    EXPECT_GT(move, 1e-4);
    EXPECT_LT(diff, 1e-3 * move);
    EXPECT_NEAR(a.last_log.at("loss"), sig.last_log.at("loss"), 1e-5);
    EXPECT_EQ(a.last_log.at("rewards/accuracies"), sig.last_log.at("rewards/accuracies"));
    const RunSummary b = run_training(tiny_run(w, std::string(loss) + "4", loss, 4), RunKind::Dpo, quiet_run());
    const RunSummary b2 = run_training(tiny_run(w, std::string(loss) + "4b", loss, 4), RunKind::Dpo, quiet_run());
    const RunSummary s4 = run_training(tiny_run(w, std::string(loss) + "s4", "sigmoid", 4), RunKind::Dpo, quiet_run());
    EXPECT_EQ(test::checkpoint_weights(b.final_checkpoint), test::checkpoint_weights(b2.final_checkpoint));
    EXPECT_TRUE(std::isfinite(b.last_log.at("loss")));
    EXPECT_NE(b.last_log.at("loss"), s4.last_log.at("loss"));
  }
  // A layout other than padded is refused, naming the key.
  TrainConfig packed = tiny_run(w, "packed", "aot", 4);
  packed.batch_layout = "packed";
  const std::string e = error_of([&] { validate(packed, RunKind::Dpo); });
  EXPECT_NE(e.find("batch_layout"), std::string::npos) << e;
}

// --- WPO (use_weighting) ----------------------------------------------------------------------------------------

// TRL's numbers: per-token policy log-probs and TRL's log_sum_sq_probs (log sum_v p_v^2) per token; the pair's
// inputs are their sums (kSeqLogp, and kSeqWpoLogp = sum of lp - log sum p^2) and the token counts. The weight is a
// constant, so the derivative w.r.t. each token log-prob is the sequence's dL/dlogp (every token weighs 1).
TEST(Wpo, MatchesTrlFixture) {
  const std::string path = std::string(DPO_FIXTURE_DIR) + "/trl_losses.json";
  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << path;
  const nlohmann::json doc = nlohmann::json::parse(f);
  size_t n_cases = 0;
  for (const auto& c : doc.at("wpo_cases")) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    LossConfig cfg;
    cfg.terms = make_loss_terms(c.at("loss_type").get<std::vector<std::string>>(),
                                c.at("loss_weights").get<std::vector<double>>());
    cfg.beta = c.at("beta").get<double>();
    cfg.use_weighting = true;
    for (const auto& p : c.at("pairs")) {
      const auto tc = p.at("policy_chosen").get<std::vector<double>>();
      const auto tr = p.at("policy_rejected").get<std::vector<double>>();
      const auto sc = p.at("log_sum_sq_chosen").get<std::vector<double>>();
      const auto sr = p.at("log_sum_sq_rejected").get<std::vector<double>>();
      double pc = 0, pr = 0, ac = 0, ar = 0;
      for (size_t k = 0; k < tc.size(); ++k) pc += tc[k], ac += tc[k] - sc[k];
      for (size_t k = 0; k < tr.size(); ++k) pr += tr[k], ar += tr[k] - sr[k];
      PairInput in = pair(pc, pr, p.at("rc").get<double>(), p.at("rr").get<double>(),
                          static_cast<int64_t>(tc.size()), static_cast<int64_t>(tr.size()));
      in.wpo_chosen = ac;
      in.wpo_rejected = ar;
      const PairOutput o = pair_loss(cfg, in);
      // float64 on both sides: 1e-12 absolute plus 1e-10 relative.
      const auto tol = [](double v) { return 1e-12 + 1e-10 * std::fabs(v); };
      const double loss = p.at("loss").get<double>();
      EXPECT_NEAR(o.loss, loss, tol(loss));
      for (double g : p.at("d_policy_chosen").get<std::vector<double>>()) EXPECT_NEAR(o.d_policy_chosen, g, tol(g));
      for (double g : p.at("d_policy_rejected").get<std::vector<double>>()) EXPECT_NEAR(o.d_policy_rejected, g, tol(g));
      // Without the weighting the loss differs (the weight exp(mean aligned log-probs) is not 1 here).
      LossConfig plain = cfg;
      plain.use_weighting = false;
      EXPECT_NE(pair_loss(plain, in).loss, o.loss);
    }
    ++n_cases;
  }
  EXPECT_GE(n_cases, 3u);
}

// The statistic kSeqWpoLogp of the CPU log-prob forward against a direct long-double computation from the
// materialised logits: sum over the rows with a non-zero weight (unweighted: 0.5 and 2 count once) of
// log p(target) - log sum_v p_v^2. Rows with weight 0 hold NaN logits (never read). Double: 1e-12 relative to the
// row count; float: the CPU twin works in double and rounds once.
TEST(Wpo, CpuStatisticAgainstDirectComputation) {
  std::mt19937_64 g(test::test_seed());
  const int64_t B = 4, T = 6, V = 53;
  std::normal_distribution<double> nd(0, 3);
  std::vector<double> logits(static_cast<size_t>(B * T * V)), w(static_cast<size_t>(B * T), 1.0);
  std::vector<int32_t> tg(static_cast<size_t>(B * T));
  for (auto& x : logits) x = nd(g);
  for (int64_t i = 0; i < B * T; ++i) tg[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7 + 3) % V);
  for (int64_t b = 0; b < B; ++b) w[static_cast<size_t>(b * T)] = 0.0;  // the prompt's slot
  w[5] = 0.5, w[9] = 2.0, w[static_cast<size_t>(B * T - 1)] = 0.0;
  for (int64_t i = 0; i < B * T; ++i)
    if (w[static_cast<size_t>(i)] == 0)
      std::fill(logits.begin() + i * V, logits.begin() + (i + 1) * V, std::nan(""));
  std::vector<double> seq(static_cast<size_t>(B), NAN), stats(static_cast<size_t>(B * kSeqStatsWidth), NAN);
  cpu::logprob_forward<double>(seq.data(), nullptr, stats.data(), logits.data(), tg.data(), w.data(), B, T, V, V);
  std::vector<float> logits32(logits.begin(), logits.end()), w32(w.begin(), w.end());
  std::vector<float> seq32(static_cast<size_t>(B)), stats32(static_cast<size_t>(B * kSeqStatsWidth));
  cpu::logprob_forward<float>(seq32.data(), nullptr, stats32.data(), logits32.data(), tg.data(), w32.data(), B, T, V,
                              V);
  for (int64_t b = 0; b < B; ++b) {
    long double want = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      if (w[static_cast<size_t>(i)] == 0) continue;
      const double* x = logits.data() + i * V;
      long double z = 0, z2 = 0;
      for (int64_t v = 0; v < V; ++v) z += std::exp(static_cast<long double>(x[v]));
      for (int64_t v = 0; v < V; ++v) z2 += std::exp(2.0L * x[v]) / (z * z);
      want += (x[tg[static_cast<size_t>(i)]] - std::log(z)) - std::log(z2);
    }
    const double got = stats[static_cast<size_t>(b * kSeqStatsWidth + kSeqWpoLogp)];
    EXPECT_NEAR(got, static_cast<double>(want), 1e-12 * T * (1 + std::fabs(static_cast<double>(want)))) << b;
    EXPECT_NEAR(stats32[static_cast<size_t>(b * kSeqStatsWidth + kSeqWpoLogp)], got, 1e-6 * (1 + std::fabs(got)));
  }
}

TEST(Wpo, WeightMultipliesEveryTermAndIsDetached) {
  std::mt19937_64 g(31);
  LossConfig cfg = aot_config({{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.3}, {LossType::Sft, 0.2}}, 0.2);
  for (PairInput in : random_pairs(g, 8, 4.0)) {
    in.wpo_chosen = -0.7 * static_cast<double>(in.len_chosen);
    in.wpo_rejected = -1.9 * static_cast<double>(in.len_rejected);
    const PairOutput plain = pair_loss(cfg, in);
    LossConfig w = cfg;
    w.use_weighting = true;
    const PairOutput o = pair_loss(w, in);
    const double pw = std::exp(-0.7 - 1.9);
    EXPECT_NEAR(o.loss, pw * plain.loss, 1e-14 * (1 + std::fabs(plain.loss)));
    EXPECT_NEAR(o.d_policy_chosen, pw * plain.d_policy_chosen, 1e-15);
    EXPECT_NEAR(o.d_policy_rejected, pw * plain.d_policy_rejected, 1e-15);
    EXPECT_EQ(o.reward_chosen, plain.reward_chosen);  // metrics unchanged
  }
  LossConfig bad = aot_config({{LossType::Aot, 1.0}}, 0.1);
  bad.use_weighting = true;
  EXPECT_NE(error_of([&] { bad.validate(); }).find("use_weighting"), std::string::npos);
}

// A trainer run with use_weighting: the model's log-prob pass produces the statistic, the device loss (here the CPU
// backend's) reads it; the weighted run trains (finite, moves the weights) and differs from the plain one.
TEST(Wpo, TrainerRun) {
  test::ScratchDir w("dpo_wpo_run_");
  test::write_tiny_fixture(w.dir.string(), 12);
  TrainConfig a = tiny_run(w, "plain", "sigmoid", 4);
  TrainConfig b = tiny_run(w, "wpo", "sigmoid", 4);
  b.use_weighting = true;
  const RunSummary ra = run_training(a, RunKind::Dpo, quiet_run());
  const RunSummary rb = run_training(b, RunKind::Dpo, quiet_run());
  EXPECT_TRUE(std::isfinite(rb.last_log.at("loss")));
  // The weight is exp(mean aligned log-prob of chosen + rejected): exactly 1 for a uniform model (log p = log sum
  // p^2 = -log V), near 1 for the near-uniform tiny one, never exactly 1 here.
  EXPECT_NE(rb.last_log.at("loss"), ra.last_log.at("loss"));
  EXPECT_NE(test::checkpoint_weights(ra.final_checkpoint), test::checkpoint_weights(rb.final_checkpoint));
}

}  // namespace
}  // namespace dpo
