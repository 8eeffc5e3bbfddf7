// `dpo repro` (train/repro.h): the tabular gradients against finite differences, the closed forms against
// independent computations, every experiment at its default size with its criteria, and the command line.
#include <gtest/gtest.h>

#include <fstream>
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
  for (const char* n : {"ipo-bandit", "optimum", "overfit", "frontier"}) EXPECT_NE(r.out.find(n), std::string::npos);
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
           {"repro nonsense --out o", "unknown experiment 'nonsense'; valid: ipo-bandit, optimum, overfit, frontier"},
           {"repro frontier --out o", "'frontier' is not implemented yet"},
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
