// `dpo repro overfit`: the IPO paper's argument that DPO overfits deterministic preferences. Derivations and
// thresholds: docs/reproductions.md.
//
// K disjoint pairs (w_k, l_k) of distinct sequences of the enumerable language (train/repro_optimum.cpp's: all V^L
// sequences, a tabular autoregressive reference), each always labelled the same way (the higher of a seeded reward
// wins). Policy: softmax over sequences from log pi_ref; every step is one epoch over all K pairs.
//
// Closed form: every pair starts at margin 0 and sees the same loss, and the gradient w.r.t. the winner's logit is
// minus that w.r.t. the loser's (the log-sum-exp terms cancel: d_chosen = -d_rejected), so Adam, acting per
// coordinate and symmetric in sign, moves every winner's logit by +x_t and every loser's by -x_t while the other
// sequences keep theirs. pi_x = pi_ref e^{+x} on the winners W, pi_ref e^{-x} on the losers, pi_ref elsewhere,
// normalised. IPO's optimum: margin 2x = 1/(2 beta). DPO has no optimum (the loss decreases in x forever), and as
// x -> infinity KL(pi_x || pi_ref) -> -log pi_ref(W): all mass on the winners, whatever beta is.
#include <sstream>

#include "runtime/error.h"
#include "runtime/rng.h"
#include "train/plot.h"
#include "train/repro_common.h"

namespace dpo::repro {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::vector<double> tilted(const std::vector<double>& ref_logp, const std::vector<int8_t>& side, double x) {
  std::vector<double> lp(ref_logp.size());
  for (size_t i = 0; i < lp.size(); ++i) lp[i] = ref_logp[i] + side[i] * x;
  return probs_of(log_softmax(lp));
}

}  // namespace

ExperimentOutput run_overfit(const ReproOptions& opt, Backend& backend, const fs::path& out) {
  SequenceSpace sp;
  const int64_t n = sp.size();
  const int64_t K = 8;
  const std::vector<double> betas = {0.1, 1.0};
  const int64_t epochs = opt.full ? 20000 : 2000;
  const OptimConfig cfg = paper_adam();
  const double delta = adam_step_bound(cfg);  // per-logit jitter bound about a minimiser

  const std::vector<double> ref_logp = autoregressive_reference(sp, 0.5, opt.seed * 104729 + 1);
  const std::vector<double> ref_p = probs_of(ref_logp);
  Rng rng(opt.seed * 104729 + 2);
  std::vector<int32_t> items(n);
  for (int64_t i = 0; i < n; ++i) items[i] = static_cast<int32_t>(i);
  for (int64_t i = n; i > 1; --i) std::swap(items[i - 1], items[rng.below(static_cast<uint64_t>(i))]);
  std::vector<double> reward(n);
  for (double& r : reward) r = rng.normal();
  std::vector<WeightedPair> pairs;
  std::vector<int8_t> side(n, 0);  // +1 winner, -1 loser, 0 in no pair
  double ref_w = 0;
  std::ostringstream pair_list;
  for (int64_t k = 0; k < K; ++k) {
    int32_t a = items[2 * k], b = items[2 * k + 1];
    if (reward[b] > reward[a]) std::swap(a, b);
    pairs.push_back({a, b, 1.0 / static_cast<double>(K)});
    side[a] = 1;
    side[b] = -1;
    ref_w += ref_p[a];
    pair_list << (k ? ", " : "") << sp.spell(a) << " > " << sp.spell(b);
  }
  const double kl_limit = -std::log(ref_w);

  ExperimentOutput res;
  res.settings = {{"V", sp.V},
                  {"L", sp.L},
                  {"pairs", K},
                  {"pair_list", pair_list.str()},
                  {"betas", betas},
                  {"epochs", epochs},
                  {"batch", "all pairs every step (one step = one epoch)"},
                  {"adam", {{"lr", cfg.lr}, {"beta1", cfg.beta1}, {"beta2", cfg.beta2}, {"eps", cfg.eps}}},
                  {"ipo_form", "summed (one sequence = one item)"},
                  {"kl_collapse_limit", kl_limit}};
  std::ostringstream md;
  md << n << " sequences (V = " << sp.V << ", L = " << sp.L << "), " << K << " disjoint deterministic pairs ("
     << pair_list.str() << "), reference mass on the winners " << fmt(ref_w) << ", so the collapse limit "
     << "KL = -log pi_ref(W) = " << fmt(kl_limit) << ". AdamW lr 0.01, every step an epoch over all pairs, " << epochs
     << " epochs. KL(policy || reference) by enumeration.\n\n"
     << "| beta | IPO optimum KL | IPO KL at 80% | IPO KL final | DPO KL at 80% | DPO KL final | DPO margin at 80% "
        "| DPO margin final |\n"
     << "|---|---|---|---|---|---|---|---|\n";
  json jruns = json::array();
  Chart kl_chart{"KL(policy || reference) against epochs", "epoch", "KL (nats)", {}};
  for (double beta : betas) {
    const double x_star = 1.0 / (4 * beta);
    const double kl_star = kl_divergence(tilted(ref_logp, side, x_star), ref_p);
    // IPO tolerance: the KL of pi_x anywhere within Adam's per-logit jitter bound of x*.
    const double kl_tol = std::max(std::fabs(kl_divergence(tilted(ref_logp, side, x_star + delta), ref_p) - kl_star),
                                   std::fabs(kl_divergence(tilted(ref_logp, side, x_star - delta), ref_p) - kl_star));
    json jb = {{"beta", beta}, {"ipo_optimum_kl", kl_star}, {"ipo_kl_tolerance", kl_tol}};
    double kl80[2] = {0, 0}, klend[2] = {0, 0}, margin80[2] = {0, 0}, margin_end[2] = {0, 0};
    auto mean_margin = [&](const std::vector<double>& theta) {
      double m = 0;
      for (const auto& q : pairs)
        m += (theta[q.chosen] - ref_logp[q.chosen]) - (theta[q.rejected] - ref_logp[q.rejected]);
      return m / static_cast<double>(K);
    };
    for (int li = 0; li < 2; ++li) {
      PairLossParams p;
      p.n_terms = 1;
      p.type[0] = li == 0 ? LossType::Ipo : LossType::Sigmoid;
      p.weight[0] = 1.0;
      p.beta = beta;
      p.ipo_norm = IpoNorm::Summed;
      TabularAdam adam(backend, n, cfg, epochs);
      std::vector<double> theta = ref_logp, grad;
      Series s{std::string(li == 0 ? "IPO" : "DPO") + " beta " + fmt(beta, 3), {}, {}, Series::Style::Line};
      const int64_t every = std::max<int64_t>(1, epochs / 250);
      for (int64_t e = 0; e <= epochs; ++e) {
        if (e > 0) {
          pair_objective(p, pairs, theta, ref_logp, &grad);
          adam.step(theta, grad);
        }
        const bool at80 = e == epochs * 8 / 10;
        if (e % every == 0 || at80 || e == epochs) {
          const double kl = kl_divergence(probs_of(log_softmax(theta)), ref_p);
          if (e % every == 0) {
            s.x.push_back(static_cast<double>(e));
            s.y.push_back(kl);
          }
          if (at80) kl80[li] = kl, margin80[li] = mean_margin(theta);
          if (e == epochs) klend[li] = kl;
        }
      }
      margin_end[li] = mean_margin(theta);
      kl_chart.series.push_back(s);
    }
    kl_chart.series.push_back({"IPO optimum, beta " + fmt(beta, 3), {0.0, static_cast<double>(epochs)},
                               {kl_star, kl_star}, Series::Style::Line});
    jb["ipo_kl_at_80pct"] = kl80[0];
    jb["ipo_kl_final"] = klend[0];
    jb["ipo_margin_final"] = margin_end[0];
    jb["dpo_kl_at_80pct"] = kl80[1];
    jb["dpo_kl_final"] = klend[1];
    jb["dpo_margin_final"] = margin_end[1];
    jb["dpo_margin_at_80pct"] = margin80[1];
    jruns.push_back(jb);
    md << "| " << fmt(beta, 3) << " | " << fmt(kl_star) << " | " << fmt(kl80[0]) << " | " << fmt(klend[0]) << " | "
       << fmt(kl80[1]) << " | " << fmt(klend[1]) << " | " << fmt(margin80[1]) << " | " << fmt(margin_end[1])
       << " |\n";
    const std::string tag = "beta=" + fmt(beta, 3);
    using Op = Criterion::Op;
    res.criteria.push_back(check(tag + " ipo |KL - KL*|", "IPO's final KL is its optimum's (tolerance: Adam's jitter "
                                 "bound on the logits)", std::fabs(klend[0] - kl_star), Op::LessEq, kl_tol));
    res.criteria.push_back(check(tag + " ipo |KL change| last 20%", "IPO's KL settles", std::fabs(klend[0] - kl80[0]),
                                 Op::LessEq, 2 * kl_tol));
    res.criteria.push_back(check(tag + " dpo KL change last 20%", "DPO's KL still increases over the last 20% of "
                                 "epochs", klend[1] - kl80[1], Op::Greater, 0.0));
    // The margin is what DPO's loss pushes without end; the KL follows it but, near the collapse limit, by amounts
    // that fall below double rounding (pi of the losers ~ e^-margin), so the margin's growth is checked as well.
    res.criteria.push_back(check(tag + " dpo margin change last 20%", "DPO's mean log-ratio margin still increases "
                                 "over the last 20% of epochs", margin_end[1] - margin80[1], Op::Greater, 0.0));
    res.criteria.push_back(check(tag + " dpo KL past midpoint", "DPO's KL is past the midpoint between IPO's optimum "
                                 "and the collapse limit -log pi_ref(W): (KL - KL*) / (limit - KL*)",
                                 (klend[1] - kl_star) / (kl_limit - kl_star), Op::GreaterEq, 0.5));
  }
  kl_chart.series.push_back({"collapse limit -log pi_ref(W)", {0.0, static_cast<double>(epochs)},
                             {kl_limit, kl_limit}, Series::Style::Line});
  write_png(kl_chart, (out / "kl_vs_epochs.png").string());
  md << "\nPlot: kl_vs_epochs.png.\n";
  res.results = {{"runs", jruns}, {"kl_collapse_limit", kl_limit}, {"ref_mass_winners", ref_w}};
  res.markdown = md.str();
  return res;
}

}  // namespace dpo::repro
