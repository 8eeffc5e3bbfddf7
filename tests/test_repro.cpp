// `dpo repro` (train/repro.h): the tabular gradients against finite differences, the closed forms against
// independent computations, every experiment at its default size with its criteria, and the command line.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "test_util.h"
#include "train/repro.h"

namespace dpo {
namespace {

using json = nlohmann::json;
using test::numeric_grad;
using test::poison;
using test::randn;
using test::test_seed;

PairLossParams one_term(LossType type, double beta, double eps = 0.0) {
  PairLossParams p;
  p.n_terms = 1;
  p.type[0] = type;
  p.weight[0] = 1.0;
  p.beta = beta;
  p.label_smoothing = eps;
  p.ipo_norm = IpoNorm::Summed;
  return p;
}

// Random weighted pairs over n items; every item in at least one pair (a chain through a random order first).
std::vector<WeightedPair> random_pairs(std::mt19937_64& g, int n, int extra) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), g);
  std::uniform_real_distribution<double> w(0.2, 2.0);
  std::uniform_int_distribution<int> item(0, n - 1);
  std::vector<WeightedPair> pairs;
  for (int i = 0; i + 1 < n; ++i) pairs.push_back({order[i], order[i + 1], w(g)});
  while (static_cast<int>(pairs.size()) < n - 1 + extra) {
    const int a = item(g), b = item(g);
    if (a != b) pairs.push_back({a, b, w(g)});
  }
  return pairs;
}

// ---------------------------------------------------------------------------------------------- gradients

// Central differences in double at h = 1e-6 carry ~1e-10 error for O(1) functions (tests/test_util.h), so 1e-7
// relative to the gradient's scale catches any wrong term while leaving room for the losses' curvature.
constexpr double kFdTol = 1e-7;

TEST(ReproGrad, LogSoftmaxBackwardMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  for (int n : {1, 3, 13}) {
    std::vector<double> logits = randn<double>(g, n, 2.0);
    const std::vector<double> c = randn<double>(g, n);  // f = sum c_i logp_i, sum c != 0: exercises the p_j term
    auto f = [&]() {
      const auto lp = log_softmax(logits);
      double s = 0;
      for (int i = 0; i < n; ++i) s += c[i] * lp[i];
      return s;
    };
    std::vector<double> grad(n, 0.5);  // accumulates: start from a known value
    log_softmax_backward(log_softmax(logits), c, grad);
    for (double& x : grad) x -= 0.5;
    const auto num = numeric_grad(logits, f);
    EXPECT_LT(test::max_rel_err(grad, num), kFdTol) << "n " << n;
  }
}

TEST(ReproGrad, PairObjectiveMatchesFiniteDifferences) {
  std::mt19937_64 g(test_seed());
  const int n = 11;
  const auto pairs = random_pairs(g, n, 9);
  const std::vector<double> ref = log_softmax(randn<double>(g, n));
  for (const PairLossParams& p : {one_term(LossType::Sigmoid, 0.3), one_term(LossType::Ipo, 0.7),
                                  one_term(LossType::Cdpo, 1.5, 0.1), one_term(LossType::Hinge, 0.2)}) {
    std::vector<double> logits = randn<double>(g, n, 1.5);
    std::vector<double> grad(n);
    poison(grad);
    const double loss = pair_objective(p, pairs, logits, ref, &grad);
    EXPECT_TRUE(std::isfinite(loss));
    EXPECT_EQ(loss, pair_objective(p, pairs, logits, ref, nullptr));
    const auto num = numeric_grad(logits, [&]() { return pair_objective(p, pairs, logits, ref, nullptr); });
    EXPECT_LT(test::max_rel_err(grad, num), kFdTol) << "loss type " << static_cast<int>(p.type[0]);
  }
}

// ---------------------------------------------------------------------------------------------- closed forms

// IPO's least-squares margins against a brute-force minimisation: plain gradient descent in double on the same
// objective (a convex quadratic; step 1 / (2 * (sum of weights) * 2) is below 2 / (largest Hessian eigenvalue),
// since that eigenvalue is at most 2 * 2 * max weighted degree), run until the gradient is below 1e-13.
TEST(ReproClosedForm, LeastSquaresMarginsMatchNumericMinimum) {
  std::mt19937_64 g(test_seed());
  const int n = 9;
  const auto pairs = random_pairs(g, n, 12);
  const double target = 1.0 / (2 * 0.37);
  std::vector<double> h_ls = least_squares_margins(n, pairs, target);
  poison(h_ls);
  h_ls = least_squares_margins(n, pairs, target);
  double wsum = 0;
  for (const auto& q : pairs) wsum += q.weight;
  std::vector<double> h(n, 0.0);
  const double lr = 1.0 / (4 * wsum);
  for (int it = 0; it < 2000000; ++it) {
    std::vector<double> gr(n, 0.0);
    double gmax = 0;
    for (const auto& q : pairs) {
      const double r = h[q.chosen] - h[q.rejected] - target;
      gr[q.chosen] += 2 * q.weight * r;
      gr[q.rejected] -= 2 * q.weight * r;
    }
    for (double v : gr) gmax = std::max(gmax, std::fabs(v));
    if (gmax < 1e-13) break;
    for (int i = 0; i < n; ++i) h[i] -= lr * gr[i];
  }
  // Identified up to a constant: compare every difference to item 0.
  for (int i = 1; i < n; ++i) EXPECT_NEAR(h_ls[i] - h_ls[0], h[i] - h[0], 1e-9) << "item " << i;
}

// The bandit's optimum from docs/reproductions.md: D1 gives both adjacent differences 1/(3 tau), D2 both 1/(2 tau).
TEST(ReproClosedForm, BanditOptimaAsDerived) {
  for (double tau : {0.1, 0.3, 1.0, 3.0}) {
    const auto d1 = least_squares_margins(3, {{0, 1, 1}, {1, 2, 1}, {0, 2, 1}}, 1 / (2 * tau));
    EXPECT_NEAR(d1[0] - d1[1], 1 / (3 * tau), 1e-12);
    EXPECT_NEAR(d1[1] - d1[2], 1 / (3 * tau), 1e-12);
    const auto d2 = least_squares_margins(3, {{0, 2, 1}, {1, 2, 1}}, 1 / (2 * tau));
    EXPECT_NEAR(d2[0] - d2[2], 1 / (2 * tau), 1e-12);
    EXPECT_NEAR(d2[1] - d2[2], 1 / (2 * tau), 1e-12);
    EXPECT_NEAR(d2[0] - d2[1], 0.0, 1e-12);
  }
}

// The Bradley-Terry fit is a stationary point of the log-likelihood (gradient computed here, independently) and
// a maximum (no random perturbation raises the likelihood).
TEST(ReproClosedForm, BradleyTerryFitIsStationary) {
  std::mt19937_64 g(test_seed());
  const int n = 10;
  // Both directions of every chain link: the win graph is strongly connected, so the maximum exists.
  auto pairs = random_pairs(g, n, 15);
  const size_t base = pairs.size();
  for (size_t i = 0; i < base; ++i) pairs.push_back({pairs[i].rejected, pairs[i].chosen, 0.3 * pairs[i].weight});
  const BradleyTerryFit fit = bradley_terry_fit(n, pairs);
  ASSERT_TRUE(fit.exists);
  auto loglik = [&](const std::vector<double>& s) {
    double ll = 0;
    for (const auto& q : pairs) ll += q.weight * std::log(1 / (1 + std::exp(-(s[q.chosen] - s[q.rejected]))));
    return ll;
  };
  std::vector<double> gr(n, 0.0);
  for (const auto& q : pairs) {
    const double z = fit.score[q.chosen] - fit.score[q.rejected];
    const double sm = 1 / (1 + std::exp(z));  // sigmoid(-z)
    gr[q.chosen] += q.weight * sm;
    gr[q.rejected] -= q.weight * sm;
  }
  for (int i = 0; i < n; ++i) EXPECT_LT(std::fabs(gr[i]), 1e-10) << "item " << i;
  const double ll = loglik(fit.score);
  for (int k = 0; k < 20; ++k) {
    std::vector<double> s = fit.score;
    const auto d = randn<double>(g, n, 1e-3);
    for (int i = 0; i < n; ++i) s[i] += d[i];
    EXPECT_LE(loglik(s), ll + 1e-15);
  }
}

// Two items: the fit is the log odds of the counts, s_a - s_b = log(n_ab / n_ba).
TEST(ReproClosedForm, BradleyTerryTwoItemsIsLogOdds) {
  const BradleyTerryFit fit = bradley_terry_fit(2, {{0, 1, 7.0}, {1, 0, 3.0}});
  ASSERT_TRUE(fit.exists);
  EXPECT_NEAR(fit.score[0] - fit.score[1], std::log(7.0 / 3.0), 1e-12);
}

// An item that only ever wins has no finite maximum-likelihood score.
TEST(ReproClosedForm, BradleyTerryFitRefusedWithoutStrongConnectivity) {
  EXPECT_FALSE(bradley_terry_fit(3, {{0, 1, 1}, {1, 2, 1}, {2, 1, 1}}).exists);  // 0 never loses
  EXPECT_TRUE(bradley_terry_fit(3, {{0, 1, 1}, {1, 2, 1}, {2, 0, 1}}).exists);   // a cycle
}

TEST(ReproClosedForm, DistancesOnKnownDistributions) {
  EXPECT_DOUBLE_EQ(total_variation({0.5, 0.5, 0}, {0, 0.5, 0.5}), 0.5);
  EXPECT_NEAR(kl_divergence({0.5, 0.5}, {0.25, 0.75}), 0.5 * std::log(2.0) + 0.5 * std::log(2.0 / 3.0), 1e-15);
  EXPECT_EQ(kl_divergence({1.0, 0.0}, {0.5, 0.5}), std::log(2.0));  // 0 log 0 = 0
}

// Best-of-N against brute force: every ordered N-tuple of draws from q enumerated, its probability given to the
// draws of highest reward in equal shares (ties broken uniformly). Sums of at most 6^4 products in double: 1e-13.
std::vector<double> best_of_n_brute_force(const std::vector<double>& q, const std::vector<double>& r, int n) {
  const size_t K = q.size();
  std::vector<double> out(K, 0.0);
  std::vector<size_t> draw(static_cast<size_t>(n), 0);
  while (true) {
    double p = 1, best = -INFINITY;
    for (size_t d : draw) p *= q[d], best = std::max(best, r[d]);
    int ties = 0;
    for (size_t d : draw) ties += r[d] == best ? 1 : 0;
    for (size_t d : draw)
      if (r[d] == best) out[d] += p / ties;
    size_t i = 0;
    while (i < draw.size() && ++draw[i] == K) draw[i++] = 0;
    if (i == draw.size()) break;
  }
  return out;
}

TEST(ReproClosedForm, BestOfNMatchesEnumerationWithTies) {
  std::mt19937_64 g(test_seed());
  std::uniform_real_distribution<double> u(0.05, 1.0);
  // Rewards with ties (two values shared by two items each), an unsorted order, and an item of probability 0 that
  // holds the highest reward (it can never be drawn, so it gets 0).
  const std::vector<double> r = {1.0, -2.0, 1.0, 0.5, -2.0, 3.0};
  std::vector<double> q(6);
  double s = 0;
  for (int i = 0; i < 5; ++i) s += q[i] = u(g);
  for (int i = 0; i < 5; ++i) q[i] /= s;
  q[5] = 0.0;
  for (int n : {1, 2, 3, 4}) {
    std::vector<double> pi = best_of_n_distribution(q, r, n);
    const std::vector<double> ref = best_of_n_brute_force(q, r, n);
    double total = 0;
    for (size_t i = 0; i < q.size(); ++i) {
      EXPECT_NEAR(pi[i], ref[i], 1e-13) << "N " << n << " item " << i;
      total += pi[i];
    }
    EXPECT_NEAR(total, 1.0, 1e-13);
    EXPECT_EQ(pi[5], 0.0);
    const double kl = kl_divergence(pi, q);
    EXPECT_NEAR(kl, kl_divergence(ref, q), 1e-12) << "N " << n;
    // Ties make it strictly smaller than the no-tie value (equal at N = 1: both 0).
    if (n == 1) EXPECT_NEAR(kl, 0.0, 1e-15);
    else EXPECT_LT(kl, best_of_n_kl_bound(n) - 1e-3) << "N " << n;
  }
}

// Without ties on M equally likely items, best-of-N puts (k^N - (k-1)^N) / M^N on the k-th smallest: its KL tends to
// the continuous value log N - (N-1)/N from below as M grows (a Riemann sum of the integral; error O(log M / M)).
TEST(ReproClosedForm, BestOfNWithoutTiesApproachesLogNMinusOne) {
  EXPECT_DOUBLE_EQ(best_of_n_kl_bound(1), 0.0);
  EXPECT_NEAR(best_of_n_kl_bound(4), std::log(4.0) - 0.75, 1e-15);
  std::mt19937_64 g(test_seed());
  const int M = 2000;
  std::vector<double> q(M, 1.0 / M), r(M);
  for (int i = 0; i < M; ++i) r[i] = i;
  std::shuffle(r.begin(), r.end(), g);
  for (int n : {2, 4, 16}) {
    const double kl = kl_divergence(best_of_n_distribution(q, r, n), q);
    EXPECT_LE(kl, best_of_n_kl_bound(n));
    EXPECT_GT(kl, best_of_n_kl_bound(n) - 0.01) << "N " << n;
  }
  EXPECT_THROW(best_of_n_distribution({0.5, 0.4}, {0, 1}, 2), Error);  // not a distribution
  EXPECT_THROW(best_of_n_distribution({0.5, 0.5}, {0, 1}, 0), Error);
}

// ---------------------------------------------------------------------------------------------- Student's t

// Closed forms independent of the continued fraction: I_x(1, 1) = x, I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b,
// and the symmetry I_x(a, b) = 1 - I_{1-x}(b, a). The fraction converges to ~1e-15; 1e-12 leaves room for the
// lgamma and exp of the prefactor.
TEST(ReproStats, IncompleteBetaClosedForms) {
  std::mt19937_64 g(test_seed());
  std::uniform_real_distribution<double> u(0.01, 0.99), ab(0.3, 12.0);
  for (int i = 0; i < 50; ++i) {
    const double x = u(g), a = ab(g), b = ab(g);
    EXPECT_NEAR(incomplete_beta(1, 1, x), x, 1e-12);
    EXPECT_NEAR(incomplete_beta(a, 1, x), std::pow(x, a), 1e-12) << a << " " << x;
    EXPECT_NEAR(incomplete_beta(1, b, x), 1 - std::pow(1 - x, b), 1e-12) << b << " " << x;
    EXPECT_NEAR(incomplete_beta(a, b, x), 1 - incomplete_beta(b, a, 1 - x), 1e-12) << a << " " << b << " " << x;
  }
  EXPECT_EQ(incomplete_beta(2, 3, 0), 0.0);
  EXPECT_EQ(incomplete_beta(2, 3, 1), 1.0);
  EXPECT_THROW(incomplete_beta(0, 1, 0.5), Error);
  EXPECT_THROW(incomplete_beta(1, 1, 1.5), Error);
}

// The t distribution's closed forms at 1 (Cauchy), 2 and 3 degrees of freedom, and table quantiles.
TEST(ReproStats, StudentTAgainstClosedForms) {
  const double pi = std::acos(-1.0);
  for (double t : {-30.0, -4.0, -1.3, -0.2, 0.0, 0.7, 2.5, 9.0, 100.0}) {
    EXPECT_NEAR(student_t_cdf(t, 1), 0.5 + std::atan(t) / pi, 1e-12) << t;
    EXPECT_NEAR(student_t_cdf(t, 2), 0.5 + t / (2 * std::sqrt(2 + t * t)), 1e-12) << t;
    const double s3 = std::sqrt(3.0);
    EXPECT_NEAR(student_t_cdf(t, 3), 0.5 + (t / (s3 * (1 + t * t / 3)) + std::atan(t / s3)) / pi, 1e-12) << t;
  }
  EXPECT_NEAR(student_t_quantile(0.975, 1), std::tan(pi * 0.475), 1e-9);  // 12.7062
  EXPECT_NEAR(student_t_quantile(0.975, 4), 2.776445, 1e-6);              // statistical tables
  EXPECT_NEAR(student_t_quantile(0.975, 9), 2.262157, 1e-6);
  EXPECT_NEAR(student_t_quantile(0.975, 1e7), 1.959964, 1e-5);  // the normal quantile in the limit
  EXPECT_NEAR(student_t_quantile(0.025, 4), -2.776445, 1e-6);
  EXPECT_THROW(student_t_quantile(1.0, 4), Error);
}

TEST(ReproStats, TTests) {
  // Paired: differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), se sd / 2, df 3.
  const TTest p = paired_t_test({1, 3, 5, 7}, {0, 1, 2, 3});
  const double se = std::sqrt(5.0 / 3.0) / 2;
  EXPECT_NEAR(p.diff, 2.5, 1e-15);
  EXPECT_NEAR(p.se, se, 1e-14);
  EXPECT_NEAR(p.t, 2.5 / se, 1e-12);
  EXPECT_EQ(p.df, 3);
  EXPECT_NEAR(p.p_two_sided, 2 * (1 - student_t_cdf(2.5 / se, 3)), 1e-15);
  EXPECT_NEAR(p.ci95_lo, 2.5 - student_t_quantile(0.975, 3) * se, 1e-12);
  // Welch with equal sizes and equal variances is the pooled two-sample test: df 2n - 2, se sqrt(2 s^2 / n).
  const TTest w = welch_t_test({1, 2, 3, 4, 5}, {3, 4, 5, 6, 7});
  EXPECT_NEAR(w.diff, -2, 1e-15);
  EXPECT_NEAR(w.df, 8, 1e-12);
  EXPECT_NEAR(w.se, std::sqrt(2 * 2.5 / 5), 1e-14);
  EXPECT_NEAR(w.t, -2, 1e-12);
  // Tables: t_{0.95, 8} = 1.860 and t_{0.975, 8} = 2.306, so |t| = 2 has a two-sided p between 0.05 and 0.10.
  EXPECT_GT(w.p_two_sided, 0.05);
  EXPECT_LT(w.p_two_sided, 0.10);
  // No spread: the difference is exact.
  EXPECT_EQ(paired_t_test({2, 3}, {1, 2}).p_two_sided, 0.0);
  EXPECT_EQ(paired_t_test({2, 3}, {2, 3}).p_two_sided, 1.0);
  EXPECT_THROW(paired_t_test({1}, {2}), Error);
}

// ---------------------------------------------------------------------------------------------- experiments

json read_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  return json::parse(f);
}

// Each experiment at its default size (a few seconds each on 2 cores): exit 0, every criterion PASS, the report
// files present and consistent.
void run_and_check(const std::string& name, const std::vector<std::string>& pngs) {
  test::ScratchDir dir("repro_");
  ReproOptions opt;
  opt.name = name;
  opt.out_dir = dir / "out";
  opt.seed = 1;
  const int rc = run_repro(opt);
  const json r = read_json(dir / "out/report.json");
  EXPECT_EQ(r["experiment"], name);
  ASSERT_TRUE(r["criteria"].is_array());
  EXPECT_GT(r["criteria"].size(), 0u);
  for (const auto& c : r["criteria"]) EXPECT_TRUE(c["pass"].get<bool>()) << c.dump();
  EXPECT_EQ(rc, 0);
  EXPECT_TRUE(r["passed"].get<bool>());
  EXPECT_TRUE(std::filesystem::file_size(dir / "out/report.md") > 0);
  for (const auto& p : pngs) EXPECT_TRUE(std::filesystem::exists(dir / ("out/" + p))) << p;
  // A second run into the same directory is refused (the report would be overwritten).
  EXPECT_THROW(run_repro(opt), InputError);
}

TEST(ReproExperiments, IpoBandit) {
  run_and_check("ipo-bandit", {"differences_D1.png", "differences_D2.png", "probabilities_D1.png", "loss_D1.png",
                               "cdpo.png"});
}
TEST(ReproExperiments, Optimum) { run_and_check("optimum", {"tv_vs_pairs.png", "dpo_loss.png"}); }
TEST(ReproExperiments, Overfit) { run_and_check("overfit", {"kl_vs_epochs.png"}); }

// frontier at a tiny size (a barely trained model, so oracle pairs): the report is complete and every criterion is
// computed; whether they pass at this size is not asserted.
TEST(ReproExperiments, FrontierTinyReportIsWellFormed) {
  test::ScratchDir dir("repro_");
  FrontierSizes z;
  z.pipeline = {1, 32, 2, 400, 1, 40, 9, 3, 10, 1};
  z.betas = {0.1, 1.0};
  z.rpo_betas = {0.1};
  z.seeds = 2;
  z.best_of_n = {1, 2, 4};
  z.bon_samples_per_prompt = 6;
  z.bootstrap = 20;
  z.oracle_pairs = true;
  ReproOptions opt;
  opt.name = "frontier";
  opt.out_dir = dir / "out";
  opt.frontier_sizes = &z;
  const int rc = run_repro(opt);
  EXPECT_TRUE(rc == 0 || rc == 1);
  const json r = read_json(dir / "out/report.json");
  EXPECT_EQ(r["experiment"], "frontier");
  EXPECT_EQ(r["passed"].get<bool>(), rc == 0);
  // One criterion each: dominance, 2 Best-of-N bounds, 2 Best-of-N increases, 2 per RPO beta, 2 log-prob falls.
  ASSERT_EQ(r["criteria"].size(), 1u + 2 + 2 + 2 + 2);
  for (const auto& c : r["criteria"]) {
    EXPECT_TRUE(c["measured"].is_number() || c["measured"].is_null()) << c.dump();
    EXPECT_TRUE(c["threshold"].is_number()) << c.dump();
    EXPECT_TRUE(c["pass"].is_boolean());
  }
  // The Best-of-N bounds hold by construction (the exact KL of a tie-breaking best-of-N), even at this size.
  for (const auto& c : r["criteria"])
    if (c["id"].get<std::string>().find("KL <= log N") != std::string::npos) EXPECT_TRUE(c["pass"].get<bool>());
  const json& res = r["results"];
  ASSERT_EQ(res["dpo"].size(), 2u);
  ASSERT_EQ(res["rpo"].size(), 1u);
  ASSERT_EQ(res["best_of_n"].size(), 3u);
  for (const json* list : {&res["dpo"], &res["rpo"]})
    for (const auto& p : *list) {
      ASSERT_EQ(p["runs"].size(), 2u);
      for (const char* k : {"reward", "kl", "grammatical", "heldout_logp_chosen", "heldout_logp_rejected"}) {
        EXPECT_TRUE(std::isfinite(p[k]["mean"].get<double>())) << k << " " << p.dump();
        EXPECT_GE(p[k]["se"].get<double>(), 0.0) << k;
      }
      // Each DPO / RPO run logged both log-prob curves.
      for (const auto& run : p["runs"]) {
        std::ifstream f(run["dir"].get<std::string>() + "/metrics.jsonl");
        std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        EXPECT_NE(all.find("logps/chosen"), std::string::npos);
        EXPECT_NE(all.find("logps/rejected"), std::string::npos);
      }
    }
  EXPECT_EQ(res["preferred_ft"]["runs"].size(), 2u);
  EXPECT_NEAR(res["best_of_n"][0]["kl"]["mean"].get<double>(), 0.0, 1e-15);  // N = 1 is the SFT policy
  for (const char* png : {"reward_vs_kl.png", "logps.png", "grammatical_vs_beta.png"})
    EXPECT_GT(std::filesystem::file_size(dir / (std::string("out/") + png)), 0u) << png;
  std::ifstream md(dir / "out/report.md");
  std::string text((std::istreambuf_iterator<char>(md)), std::istreambuf_iterator<char>());
  for (const char* s : {"| DPO | 0.1 |", "| RPO | 0.1 |", "| Preferred-FT |", "| Best-of-N | 4 |", "## Criteria"})
    EXPECT_NE(text.find(s), std::string::npos) << s;
}

// odpo at a tiny size (oracle pairs): the report is complete, every criterion and test is computed; whether the
// criteria pass at this size is not asserted (tests/test_slow_repro.cpp runs a trained configuration).
TEST(ReproExperiments, OdpoTinyReportIsWellFormed) {
  test::ScratchDir dir("repro_");
  OdpoSizes z;
  z.pipeline = {1, 32, 2, 400, 1, 40, 9, 3, 10, 1};
  z.alphas = {0.0, 0.5, 2.0};
  z.seeds = 2;
  z.oracle_pairs = true;
  ReproOptions opt;
  opt.name = "odpo";
  opt.out_dir = dir / "out";
  opt.odpo_sizes = &z;
  const int rc = run_repro(opt);
  EXPECT_TRUE(rc == 0 || rc == 1);
  const json r = read_json(dir / "out/report.json");
  EXPECT_EQ(r["experiment"], "odpo");
  EXPECT_EQ(r["passed"].get<bool>(), rc == 0);
  ASSERT_EQ(r["criteria"].size(), 2u);  // one per consecutive pair of alphas
  for (const auto& c : r["criteria"]) {
    EXPECT_TRUE(c["measured"].is_number()) << c.dump();
    EXPECT_TRUE(c["pass"].is_boolean());
  }
  const json& res = r["results"];
  ASSERT_EQ(res["alphas"].size(), 3u);
  // Oracle pairs hold both gap classes (rewards +-1 and +-2 give gaps 1..4).
  const json& gaps = r["settings"]["train_pairs_by_gap"];
  EXPECT_TRUE(gaps.contains("1")) << gaps.dump();
  EXPECT_TRUE(gaps.contains("2") || gaps.contains("3") || gaps.contains("4")) << gaps.dump();
  for (const auto& p : res["alphas"]) {
    ASSERT_EQ(p["runs"].size(), 2u);
    // Each run trained with its alpha (alpha 0: DPO): the config the trainer wrote back.
    for (const auto& run : p["runs"]) {
      std::ifstream f(run["dir"].get<std::string>() + "/config.yaml");
      std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      std::ostringstream want;
      want << "\nodpo_alpha: " << p["alpha"].get<double>() << "\n";
      EXPECT_NE(all.find(want.str()), std::string::npos) << want.str() << " in " << run["dir"];
    }
    for (const char* k : {"reward", "kl", "grammatical", "train_gap_spread", "heldout_gap_spread"}) {
      EXPECT_TRUE(std::isfinite(p[k]["mean"].get<double>())) << k << " " << p.dump();
      ASSERT_EQ(p[k]["ci95"].size(), 2u) << k;
      EXPECT_LE(p[k]["ci95"][0].get<double>(), p[k]["ci95"][1].get<double>()) << k;
    }
  }
  // Each alpha against DPO, paired over the 2 seeds (df 1).
  ASSERT_EQ(res["vs_dpo"].size(), 2u);
  for (const auto& t : res["vs_dpo"])
    for (const char* k : {"reward", "kl"}) {
      const double p = t[k]["p"].get<double>();
      EXPECT_TRUE(p >= 0 && p <= 1) << t.dump();
      EXPECT_EQ(t[k]["df"].get<double>(), 1.0);
    }
  for (const char* png : {"reward_vs_kl.png", "margin_by_gap.png", "gap_spread_vs_alpha.png"})
    EXPECT_GT(std::filesystem::file_size(dir / (std::string("out/") + png)), 0u) << png;
  std::ifstream md(dir / "out/report.md");
  std::string text((std::istreambuf_iterator<char>(md)), std::istreambuf_iterator<char>());
  for (const char* s : {"| 0 (DPO) |", "| 0.5 |", "paired t-test", "## Criteria"})
    EXPECT_NE(text.find(s), std::string::npos) << s;
}

// Same seed, same numbers (the timing field aside).
TEST(ReproExperiments, Deterministic) {
  test::ScratchDir dir("repro_");
  json r[2];
  for (int k = 0; k < 2; ++k) {
    ReproOptions opt;
    opt.name = "overfit";
    opt.out_dir = dir / ("out" + std::to_string(k));
    opt.num_threads = k + 1;
    run_repro(opt);
    r[k] = read_json(dir / ("out" + std::to_string(k) + "/report.json"));
    r[k].erase("seconds");
  }
  EXPECT_EQ(r[0].dump(), r[1].dump());
}

// ---------------------------------------------------------------------------------------------- command line

const std::string kDpo = std::string(DPO_BINARY_DIR) + "/dpo";

TEST(ReproCli, ListNamesEveryExperiment) {
  test::ScratchDir dir("repro_cli_");
  const auto r = test::run_cli(kDpo, dir.dir, "repro --list");
  EXPECT_EQ(r.code, 0) << r.err;
  for (const char* n : {"ipo-bandit", "optimum", "overfit", "frontier", "odpo"})
    EXPECT_NE(r.out.find(n), std::string::npos);
  EXPECT_EQ(r.out.find("not implemented"), std::string::npos) << r.out;
}

TEST(ReproCli, RunPrintsPassLinesAndExitsZero) {
  test::ScratchDir dir("repro_cli_");
  const auto r = test::run_cli(kDpo, dir.dir, "repro overfit --out out --seed 1");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("PASS  beta=0.1 dpo KL change last 20%"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("FAIL"), std::string::npos) << r.out;
  EXPECT_TRUE(std::filesystem::exists(dir / "out/report.md"));
  const auto again = test::run_cli(kDpo, dir.dir, "repro overfit --out out");
  EXPECT_EQ(again.code, 2);
  EXPECT_NE(again.err.find("already holds a report.json"), std::string::npos) << again.err;
}

TEST(ReproCli, BadInputsExitTwoWithAMessage) {
  test::ScratchDir dir("repro_cli_");
  struct Case {
    std::string args, message;
  };
  for (const Case& c : std::vector<Case>{
           {"repro nonsense --out o",
            "unknown experiment 'nonsense'; valid: ipo-bandit, optimum, overfit, frontier, odpo"},
           {"repro frontier --out o --seed x", "--seed"},
           {"repro odpo --out o --threads x", "--threads"},
           {"repro overfit", "--out is required"},
           {"repro", "an experiment name is required"},
           {"repro overfit --out o --seed x", "--seed"},
           {"repro overfit --out o --threads -1", "--threads"},
           {"repro overfit --out o --bogus", "--bogus"}}) {
    const auto r = test::run_cli(kDpo, dir.dir, c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.args << "\n" << r.err;
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "o"));  // nothing written on refusal
}

}  // namespace
}  // namespace dpo
