// `dpo repro ipo-bandit`: the IPO paper's bandit (Azar et al. 2023, section 5.1). Derivations and thresholds:
// docs/reproductions.md.
//
// Actions a, b, c are the one-token completions of a fixed prompt. The policy is softmax(theta) over them, theta
// starting at 0, so pi starts at pi_ref = uniform and the log-ratio difference of a pair (y, y') is exactly
// theta_y - theta_y' (log pi_ref and the log-sum-exp cancel). One-token completions make IPO's per-token and summed
// forms the same loss; the summed form (the paper's) is used.
#include <map>
#include <sstream>

#include "runtime/error.h"
#include "runtime/rng.h"
#include "train/plot.h"
#include "train/repro_common.h"

namespace dpo::repro {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int kBatch = 9;
const char* kActionNames[] = {"a", "b", "c"};

struct Dataset {
  std::string name;
  std::vector<WeightedPair> pairs;  // weights 1 (one of each)
};

// The batch stream: independent seeded random permutations of the dataset, concatenated; each batch is the next 9
// pairs. So every pair appears floor(9/|D|) or ceil(9/|D|) times in a batch: D1 (3 pairs) gives each pair exactly 3
// times (the full-data gradient), D2 (2 pairs) 4 or 5 times. D2's least-squares system is consistent (both targets
// reachable at once), so every D2 batch has the same IPO minimiser as the data set: no batch moves the optimum.
class BatchStream {
 public:
  BatchStream(const Dataset& d, uint64_t seed) : d_(d), rng_(seed) {}
  std::vector<WeightedPair> next() {
    std::map<std::pair<int32_t, int32_t>, int> count;
    for (int k = 0; k < kBatch; ++k) {
      if (pos_ == order_.size()) refill();
      const WeightedPair& q = d_.pairs[order_[pos_++]];
      ++count[{q.chosen, q.rejected}];
    }
    std::vector<WeightedPair> out;
    for (const auto& [key, c] : count) out.push_back({key.first, key.second, static_cast<double>(c) / kBatch});
    return out;
  }

 private:
  void refill() {
    order_.resize(d_.pairs.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng_.below(i)]);
    pos_ = 0;
  }
  const Dataset& d_;
  Rng rng_;
  std::vector<size_t> order_;
  size_t pos_ = 0;
};

PairLossParams loss_params(LossType type, double beta, double eps) {
  PairLossParams p;
  p.n_terms = 1;
  p.type[0] = type;
  p.weight[0] = 1.0;
  p.beta = beta;
  p.label_smoothing = eps;
  p.ipo_norm = IpoNorm::Summed;
  return p;
}

struct Trace {
  std::vector<double> step;                     // recorded steps
  std::vector<std::vector<double>> diff;        // [pair][record]: theta_chosen - theta_rejected
  std::vector<std::vector<double>> prob;        // [action][record]
  std::vector<double> loss;                     // mean loss over the data set's pairs
  std::vector<double> final_diff, diff_at_80;   // per pair
  std::vector<double> max_dev_last10;           // per pair: max over the last 10% of steps of |d - target| (if set)
  std::vector<double> final_prob;
};

// Trains one tabular policy over n_actions with Adam on batches of the stream; records every `every` steps.
Trace train(Backend& backend, const Dataset& d, int n_actions, const PairLossParams& p, int64_t steps,
            uint64_t seed, const std::vector<double>& target) {
  const OptimConfig cfg = paper_adam();
  TabularAdam adam(backend, n_actions, cfg, steps);
  BatchStream stream(d, seed);
  std::vector<double> theta(n_actions, 0.0), ref(n_actions, -std::log(static_cast<double>(n_actions))), grad;
  std::vector<WeightedPair> all = d.pairs;
  for (auto& q : all) q.weight = 1.0 / static_cast<double>(all.size());
  const size_t np = d.pairs.size();
  Trace t;
  t.diff.assign(np, {});
  t.prob.assign(n_actions, {});
  t.max_dev_last10.assign(np, 0.0);
  const int64_t every = std::max<int64_t>(1, steps / 250);
  auto record = [&](int64_t s) {
    t.step.push_back(static_cast<double>(s));
    for (size_t k = 0; k < np; ++k) t.diff[k].push_back(theta[d.pairs[k].chosen] - theta[d.pairs[k].rejected]);
    const std::vector<double> pr = probs_of(log_softmax(theta));
    for (int a = 0; a < n_actions; ++a) t.prob[a].push_back(pr[a]);
    t.loss.push_back(pair_objective(p, all, theta, ref, nullptr));
  };
  record(0);
  for (int64_t s = 1; s <= steps; ++s) {
    pair_objective(p, stream.next(), theta, ref, &grad);
    adam.step(theta, grad);
    if (s % every == 0 || s == steps) record(s);
    if (s == steps * 8 / 10) {
      t.diff_at_80.resize(np);
      for (size_t k = 0; k < np; ++k) t.diff_at_80[k] = theta[d.pairs[k].chosen] - theta[d.pairs[k].rejected];
    }
    if (!target.empty() && s > steps * 9 / 10)
      for (size_t k = 0; k < np; ++k)
        t.max_dev_last10[k] =
            std::max(t.max_dev_last10[k], std::fabs(theta[d.pairs[k].chosen] - theta[d.pairs[k].rejected] - target[k]));
  }
  t.final_diff.resize(np);
  for (size_t k = 0; k < np; ++k) t.final_diff[k] = theta[d.pairs[k].chosen] - theta[d.pairs[k].rejected];
  t.final_prob = probs_of(log_softmax(theta));
  return t;
}

std::string pair_name(const WeightedPair& q) {
  return std::string(kActionNames[q.chosen]) + "-" + kActionNames[q.rejected];
}

std::string tau_str(double tau) { return fmt(tau, 3); }

}  // namespace

ExperimentOutput run_ipo_bandit(const ReproOptions& opt, Backend& backend, const fs::path& out) {
  const std::vector<double> taus = {0.1, 0.3, 1.0, 3.0};
  const int64_t steps = opt.full ? 50000 : 10000;
  const double cdpo_eps = 0.1;
  const OptimConfig cfg = paper_adam();
  // Tolerance for a log-ratio difference: one Adam step moves each logit by at most adam_step_bound (0.0316 at
  // lr 0.01), a difference of two logits by at most twice that; once the iterates oscillate about the minimiser
  // they stay within one such step of it.
  const double tol = 2 * adam_step_bound(cfg);
  const double dpo_factor = 2.0;      // DPO's final difference at least twice IPO's optimum
  const double collapse_ratio = 0.1;  // DPO's pi(c) at most a tenth of IPO's optimal pi(c)

  const std::vector<Dataset> datasets = {{"D1", {{0, 1, 1}, {1, 2, 1}, {0, 2, 1}}}, {"D2", {{0, 2, 1}, {1, 2, 1}}}};
  ExperimentOutput res;
  res.settings = {{"actions", {"a", "b", "c"}},
                  {"datasets", {{"D1", "(a,b) (b,c) (a,c)"}, {"D2", "(a,c) (b,c)"}}},
                  {"taus", taus},
                  {"steps", steps},
                  {"batch", kBatch},
                  {"batch_draw", "consecutive 9 pairs of concatenated seeded random permutations of the data set"},
                  {"adam", {{"lr", cfg.lr}, {"beta1", cfg.beta1}, {"beta2", cfg.beta2}, {"eps", cfg.eps}}},
                  {"ipo_form", "summed (the paper's); equal to per-token for one-token completions"},
                  {"cdpo_label_smoothing", cdpo_eps},
                  {"tolerance_difference", tol},
                  {"dpo_factor", dpo_factor},
                  {"collapse_ratio", collapse_ratio}};
  std::ostringstream md;
  md << "Three actions a, b, c (one-token completions), tabular softmax policy starting at the uniform reference, "
        "Adam lr 0.01 (betas 0.9, 0.999), batches of 9 pairs (each pair of D1 exactly 3 times; D2's pairs 4 or 5 "
        "times), "
     << steps << " steps. IPO in the paper's summed form (the same as per-token here). Tolerance on a log-ratio "
     << "difference: " << fmt(tol) << " (twice Adam's step bound lr (1 - beta1) / sqrt(1 - beta2)).\n\n"
     << "| data | tau | pair | IPO optimum | IPO final | DPO final | IPO pi(c) optimum | IPO pi(c) | DPO pi(c) |\n"
     << "|---|---|---|---|---|---|---|---|---|\n";

  json jruns = json::array();
  uint64_t run_seed = opt.seed * 1000003ULL;
  for (size_t di = 0; di < datasets.size(); ++di) {
    const Dataset& d = datasets[di];
    std::vector<Chart> diff_charts, prob_charts, loss_charts;
    for (double tau : taus) {
      // IPO's least-squares optimum of the differences (target 1/(2 tau)), and the optimum's pi(c).
      const std::vector<double> h = least_squares_margins(3, d.pairs, 1.0 / (2 * tau));
      std::vector<double> target;
      for (const auto& q : d.pairs) target.push_back(h[q.chosen] - h[q.rejected]);
      const double pc_opt = probs_of(log_softmax(h))[2];
      ++run_seed;
      const Trace ipo = train(backend, d, 3, loss_params(LossType::Ipo, tau, 0), steps, run_seed, target);
      const Trace dpo = train(backend, d, 3, loss_params(LossType::Sigmoid, tau, 0), steps, run_seed, {});
      const std::string tag = d.name + " tau=" + tau_str(tau);

      double ipo_dev = 0, dpo_growth = 1e300, dpo_ratio = 1e300;
      json jp = json::array();
      for (size_t k = 0; k < d.pairs.size(); ++k) {
        ipo_dev = std::max(ipo_dev, ipo.max_dev_last10[k]);
        dpo_growth = std::min(dpo_growth, dpo.final_diff[k] - dpo.diff_at_80[k]);
        dpo_ratio = std::min(dpo_ratio, dpo.final_diff[k] / target[k]);
        jp.push_back({{"pair", pair_name(d.pairs[k])},
                      {"ipo_optimum", target[k]},
                      {"ipo_final", ipo.final_diff[k]},
                      {"ipo_max_dev_last10pct", ipo.max_dev_last10[k]},
                      {"dpo_final", dpo.final_diff[k]},
                      {"dpo_at_80pct", dpo.diff_at_80[k]}});
        md << "| " << d.name << " | " << tau_str(tau) << " | " << pair_name(d.pairs[k]) << " | " << fmt(target[k])
           << " | " << fmt(ipo.final_diff[k]) << " | " << fmt(dpo.final_diff[k]) << " | "
           << (k == 0 ? fmt(pc_opt) : "") << " | " << (k == 0 ? fmt(ipo.final_prob[2]) : "") << " | "
           << (k == 0 ? fmt(dpo.final_prob[2]) : "") << " |\n";
      }
      jruns.push_back({{"dataset", d.name},
                       {"tau", tau},
                       {"pairs", jp},
                       {"ipo_pi", ipo.final_prob},
                       {"dpo_pi", dpo.final_prob},
                       {"ipo_optimum_pi_c", pc_opt},
                       {"ipo_final_loss", ipo.loss.back()},
                       {"dpo_final_loss", dpo.loss.back()}});
      using Op = Criterion::Op;
      res.criteria.push_back(check(tag + " ipo max|d - d*|", "IPO's differences stay within tol of the least-squares "
                                   "optimum over the last 10% of steps", ipo_dev, Op::LessEq, tol));
      res.criteria.push_back(check(tag + " ipo log pi(c) - log pi*(c)", "IPO keeps the never-winning action c near "
                                   "its optimum's probability", std::log(ipo.final_prob[2]) - std::log(pc_opt),
                                   Op::GreaterEq, -tol));
      res.criteria.push_back(check(tag + " dpo growth last 20%", "DPO's differences still increase over the last 20% "
                                   "of steps (min over pairs)", dpo_growth, Op::Greater, 0.0));
      res.criteria.push_back(check(tag + " dpo d / ipo d*", "DPO's final differences exceed IPO's optimum by the "
                                   "factor (min over pairs)", dpo_ratio, Op::GreaterEq, dpo_factor));
      res.criteria.push_back(check(tag + " dpo pi(c) / ipo pi*(c)", "DPO collapses the never-winning action c",
                                   dpo.final_prob[2] / pc_opt, Op::LessEq, collapse_ratio));

      Chart dc{d.name + ", tau " + tau_str(tau) + ": log-ratio differences", "step", "theta_w - theta_l", {}};
      for (size_t k = 0; k < d.pairs.size(); ++k) {
        dc.series.push_back({"IPO " + pair_name(d.pairs[k]), ipo.step, ipo.diff[k], Series::Style::Line});
        dc.series.push_back({"DPO " + pair_name(d.pairs[k]), dpo.step, dpo.diff[k], Series::Style::Line});
        dc.series.push_back({"IPO optimum " + pair_name(d.pairs[k]), {ipo.step.front(), ipo.step.back()},
                             {target[k], target[k]}, Series::Style::Line});
      }
      diff_charts.push_back(dc);
      Chart pcht{d.name + ", tau " + tau_str(tau) + ": action probabilities", "step", "probability", {}};
      for (int a = 0; a < 3; ++a) {
        pcht.series.push_back({std::string("IPO pi(") + kActionNames[a] + ")", ipo.step, ipo.prob[a],
                               Series::Style::Line});
        pcht.series.push_back({std::string("DPO pi(") + kActionNames[a] + ")", dpo.step, dpo.prob[a],
                               Series::Style::Line});
      }
      prob_charts.push_back(pcht);
      Chart lc{d.name + ", tau " + tau_str(tau) + ": loss (mean over the data set)", "step", "loss", {}};
      lc.series.push_back({"IPO", ipo.step, ipo.loss, Series::Style::Line});
      lc.series.push_back({"DPO", dpo.step, dpo.loss, Series::Style::Line});
      lc.log_y = true;
      loss_charts.push_back(lc);
    }
    write_png_grid(diff_charts, 2, (out / ("differences_" + d.name + ".png")).string());
    write_png_grid(prob_charts, 2, (out / ("probabilities_" + d.name + ".png")).string());
    write_png_grid(loss_charts, 2, (out / ("loss_" + d.name + ".png")).string());
  }

  // Conservative DPO on two actions and the one pair (a, b): d/dh of -(1-e) log s(beta h) - e log s(-beta h) is 0
  // at s(beta h) = 1 - e, h = log((1 - e) / e) / beta.
  md << "\nConservative DPO (label smoothing " << fmt(cdpo_eps) << "), two actions, data {(a, b)}:\n\n"
     << "| tau | fixed point log((1-eps)/eps)/tau | final h | max \\|h - h*\\| over the last 10% |\n"
     << "|---|---|---|---|\n";
  const Dataset two{"two-action", {{0, 1, 1}}};
  std::vector<Chart> cdpo_charts;
  json jcdpo = json::array();
  for (double tau : taus) {
    const double hstar = std::log((1 - cdpo_eps) / cdpo_eps) / tau;
    ++run_seed;
    const Trace c = train(backend, two, 2, loss_params(LossType::Cdpo, tau, cdpo_eps), steps, run_seed, {hstar});
    md << "| " << tau_str(tau) << " | " << fmt(hstar) << " | " << fmt(c.final_diff[0]) << " | "
       << fmt(c.max_dev_last10[0]) << " |\n";
    jcdpo.push_back({{"tau", tau}, {"fixed_point", hstar}, {"final", c.final_diff[0]},
                     {"max_dev_last10pct", c.max_dev_last10[0]}});
    res.criteria.push_back(check("cdpo tau=" + tau_str(tau) + " max|h - h*|",
                                 "cDPO's difference stays within tol of log((1-eps)/eps)/beta over the last 10%",
                                 c.max_dev_last10[0], Criterion::Op::LessEq, tol));
    Chart ch{"cDPO, tau " + tau_str(tau) + ": theta_a - theta_b", "step", "h", {}};
    ch.series.push_back({"cDPO", c.step, c.diff[0], Series::Style::Line});
    ch.series.push_back({"fixed point", {c.step.front(), c.step.back()}, {hstar, hstar}, Series::Style::Line});
    cdpo_charts.push_back(ch);
  }
  write_png_grid(cdpo_charts, 2, (out / "cdpo.png").string());
  md << "\nPlots: differences_D1.png, differences_D2.png, probabilities_D1.png, probabilities_D2.png, loss_D1.png, "
        "loss_D2.png, cdpo.png.\n";
  res.results = {{"runs", jruns}, {"cdpo", jcdpo}};
  res.markdown = md.str();
  return res;
}

}  // namespace dpo::repro
