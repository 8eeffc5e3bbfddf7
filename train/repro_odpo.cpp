// `dpo repro odpo`: ODPO (Amini et al. 2024, arXiv 2402.10571) against DPO on the built-in sentiment task
// (train/demo.h). Setup, derivation and the criteria's reasons: docs/reproductions.md.
//
// One SFT model and one set of labelled pairs (the demo's pipeline, seeded by --seed) are shared by every run. The
// pairs carry their ground-truth scores (sentiment_reward of each completion), so each pair has a score gap
// g = score_chosen - score_rejected >= 1 (the reward is integer-valued and ties are dropped). Per alpha of the grid
// and seed k (0..seeds-1) one run, loss_type sigmoid at one beta with odpo_alpha = alpha: the per-pair loss
// -log sigmoid(beta * Delta - alpha * log g) (kernels/pair_loss.h, odpo_offset); alpha = 0 is DPO. A seed changes
// the training order (TrainConfig::seed) and the evaluation's samples, and is the same for every alpha, so runs of
// equal seed are paired.
//
// Each run is evaluated as the demo does (reward, KL(policy || SFT), grammaticality, on samples from the held-out
// prompts) and by its implicit-reward margins beta * Delta on the training and the held-out pairs, grouped by the
// pairs' score gap: gap 1 (offset 0 at every alpha) against gap >= 2.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>

#include "model/checkpoint.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "train/demo.h"
#include "train/hash.h"
#include "train/plot.h"
#include "train/repro_common.h"
#include "train/repro_sentiment.h"
#include "train/sentiment_task.h"
#include "train/tokenizer.h"
#include "train/trainer.h"

namespace dpo {

OdpoSizes odpo_sizes(bool full) {
  OdpoSizes z;
  z.pipeline = demo::kDemoSizes;
  z.beta = 0.1;
  z.alphas = {0.0, 0.5, 1.0, 2.0};
  z.seeds = 5;
  if (full) {
    z.pipeline.pair_prompts = 2000;  // more pairs (the demo's 600 prompts give about 430)
    z.pipeline.eval_samples_per_prompt = 64;
    z.seeds = 10;
  }
  return z;
}

namespace repro {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Margins of one policy on a pair set: beta * Delta per pair, with Delta = (log pi(y_w) - log pi_sft(y_w)) -
// (log pi(y_l) - log pi_sft(y_l)), grouped by score gap.
struct Margins {
  std::map<int, double> by_gap;  // mean margin per integer gap
  double small = NAN, large = NAN;  // mean over gap-1 pairs, over gap >= 2 pairs
  double spread() const { return large - small; }  // D: what the offset is predicted to raise
  double accuracy = NAN;                            // fraction of pairs with Delta > 0
};

Margins margins_of(const std::vector<double>& pol_c, const std::vector<double>& pol_r,
                   const std::vector<double>& sft_c, const std::vector<double>& sft_r, const PairExamples& pairs,
                   double beta) {
  Margins m;
  std::map<int, std::pair<double, int64_t>> acc;
  double sum_small = 0, sum_large = 0, n_small = 0, n_large = 0, n_right = 0;
  for (size_t i = 0; i < pol_c.size(); ++i) {
    const double margin = beta * ((pol_c[i] - sft_c[i]) - (pol_r[i] - sft_r[i]));
    const int gap = static_cast<int>(std::lround(pairs.score_chosen[i] - pairs.score_rejected[i]));
    acc[gap].first += margin, acc[gap].second += 1;
    (gap <= 1 ? sum_small : sum_large) += margin;
    (gap <= 1 ? n_small : n_large) += 1;
    n_right += margin > 0 ? 1 : 0;
  }
  for (const auto& [g, s] : acc) m.by_gap[g] = s.first / static_cast<double>(s.second);
  if (n_small > 0) m.small = sum_small / n_small;
  if (n_large > 0) m.large = sum_large / n_large;
  if (!pol_c.empty()) m.accuracy = n_right / static_cast<double>(pol_c.size());
  return m;
}

struct RunOut {
  Est reward, kl, gram;
  Margins train, heldout;
  std::string dir;
  std::vector<std::string> samples;
};

struct AlphaPoint {
  double alpha = 0;
  std::vector<RunOut> runs;
  Est reward, kl, gram;       // seed means (seed_mean's standard error)
  Est d_train, d_heldout;     // the gap spread D over seeds (the pairs are fixed: the seed spread only)
  std::map<int, double> train_by_gap;  // seed mean of the per-gap mean margins
  std::vector<double> per_seed(Est RunOut::*f) const {
    std::vector<double> v;
    for (const RunOut& r : runs) v.push_back((r.*f).mean);
    return v;
  }
  std::vector<double> spreads(Margins RunOut::*f) const {
    std::vector<double> v;
    for (const RunOut& r : runs) v.push_back((r.*f).spread());
    return v;
  }
  void aggregate() {
    auto agg = [&](Est RunOut::*f) {
      std::vector<Est> v;
      for (const RunOut& r : runs) v.push_back(r.*f);
      return seed_mean(v);
    };
    reward = agg(&RunOut::reward), kl = agg(&RunOut::kl), gram = agg(&RunOut::gram);
    d_train = mean_se(spreads(&RunOut::train));
    d_heldout = mean_se(spreads(&RunOut::heldout));
    std::map<int, double> n;
    for (const RunOut& r : runs)
      for (const auto& [g, v] : r.train.by_gap) train_by_gap[g] += v, n[g] += 1;
    for (auto& [g, v] : train_by_gap) v /= n[g];
  }
};

// The 95% confidence interval of a seed mean: mean -/+ t_{0.975, S-1} se.
std::string ci95(const Est& e, int64_t seeds, int prec = 3) {
  if (seeds < 2) return fmt(e.mean, prec);
  const double q = student_t_quantile(0.975, static_cast<double>(seeds - 1));
  return fmt(e.mean, prec) + " [" + fmt(e.mean - q * e.se, prec) + ", " + fmt(e.mean + q * e.se, prec) + "]";
}
json ci_json(const Est& e, int64_t seeds) {
  json j = to_json(e);
  if (seeds >= 2) {
    const double q = student_t_quantile(0.975, static_cast<double>(seeds - 1));
    j["ci95"] = {e.mean - q * e.se, e.mean + q * e.se};
  }
  return j;
}
json ttest_json(const TTest& t) {
  return {{"diff", t.diff}, {"se", t.se},          {"t", t.t},
          {"df", t.df},     {"p", t.p_two_sided}, {"ci95", {t.ci95_lo, t.ci95_hi}}};
}
json margins_json(const Margins& m) {
  json g = json::object();
  for (const auto& [k, v] : m.by_gap) g[std::to_string(k)] = v;
  return {{"by_gap", g}, {"gap1", m.small}, {"gap_ge2", m.large}, {"spread", m.spread()}, {"accuracy", m.accuracy}};
}

}  // namespace

ExperimentOutput run_odpo(const ReproOptions& opt, Backend& backend, const fs::path& out) {
  const OdpoSizes z = opt.odpo_sizes ? *opt.odpo_sizes : odpo_sizes(opt.full);
  if (z.alphas.size() < 2 || z.alphas.front() != 0.0 || z.seeds < 1 || !(z.beta > 0) || !std::isfinite(z.beta))
    throw InputError("repro odpo: sizes need alphas starting at 0 (DPO) and at least one more, seeds >= 1, beta > 0");
  for (size_t i = 1; i < z.alphas.size(); ++i)
    if (!(z.alphas[i] > z.alphas[i - 1]) || !std::isfinite(z.alphas[i]))
      throw InputError("repro odpo: alphas must be finite and increasing");
  auto say = [](const std::string& s) { std::fprintf(stderr, "[repro odpo] %s\n", s.c_str()); };
  auto tag = [](double v) {
    std::ostringstream s;
    s << v;
    return s.str();
  };

  // (a)-(c): corpus, SFT, labelled pairs with their scores.
  demo::Prepared prep = demo::prepare(out.string(), z.pipeline, opt.seed, opt.num_threads, true, say);
  auto tok = make_tokenizer("byte");
  if (z.oracle_pairs) {
    SentimentCorpusOptions po;
    po.n_train = z.pipeline.pair_prompts;
    po.seed = opt.seed;
    auto pairs = make_oracle_preferences(po);
    po.n_train = z.pipeline.eval_pairs_prompts;
    po.seed = opt.seed + 1;
    auto eval = make_oracle_preferences(po);
    write_preferences_jsonl(prep.pairs_train, pairs);
    write_preferences_jsonl(prep.pairs_eval, eval);
    prep.n_train_pairs = static_cast<int64_t>(pairs.size());
    prep.n_eval_pairs = static_cast<int64_t>(eval.size());
    say("(c) oracle pairs instead of sampled ones (test sizes)");
  }
  if (prep.n_train_pairs == 0 || prep.n_eval_pairs == 0)
    throw Error("repro odpo: every sampled pair tied (the SFT model spells no sentiment word)");
  auto sft = load_gpt2_checkpoint(backend, prep.sft_checkpoint, DType::F32);
  const PairExamples train_pairs = load_pair_examples(prep.pairs_train, *tok);
  const PairExamples heldout = load_pair_examples(prep.pairs_eval, *tok);
  const std::vector<double> sft_tc = demo::completion_logps(*sft, train_pairs.chosen, 64),
                            sft_tr = demo::completion_logps(*sft, train_pairs.rejected, 64),
                            sft_hc = demo::completion_logps(*sft, heldout.chosen, 64),
                            sft_hr = demo::completion_logps(*sft, heldout.rejected, 64);
  std::map<int, int64_t> gap_count;
  for (size_t i = 0; i < train_pairs.chosen.size(); ++i)
    gap_count[static_cast<int>(std::lround(train_pairs.score_chosen[i] - train_pairs.score_rejected[i]))] += 1;
  const std::vector<std::string> eval_prompts_rep = demo::repeated_eval_prompts(z.pipeline.eval_samples_per_prompt);
  const demo::PolicyEval sft_eval = demo::evaluate_policy(*sft, *sft, *tok, eval_prompts_rep, opt.seed + 3);

  std::vector<AlphaPoint> points;
  for (double alpha : z.alphas) {
    AlphaPoint p;
    p.alpha = alpha;
    for (int64_t k = 0; k < z.seeds; ++k) {
      const std::string dir = (out / ("alpha_" + tag(alpha) + "_seed" + std::to_string(k))).string();
      TrainConfig c = demo::dpo_config(prep, dir, z.beta, z.pipeline.dpo_epochs);
      c.seed = static_cast<int64_t>(opt.seed) + 10 + k;  // the training order, equal across alphas
      c.odpo_alpha = alpha;
      RunOptions ro;
      ro.quiet = true;
      RunSummary r = run_training(c, RunKind::Dpo, ro);
      verify_checkpoint(r.final_checkpoint, CheckpointUse::Model);
      auto pol = load_gpt2_checkpoint(backend, r.final_checkpoint, DType::F32);
      const demo::PolicyEval e =
          demo::evaluate_policy(*pol, *sft, *tok, eval_prompts_rep, opt.seed + 20 + static_cast<uint64_t>(k));
      RunOut o;
      o.reward = {e.reward_mean, e.reward_sem};
      o.kl = {e.kl, e.kl_sem};
      o.gram = {e.grammatical, e.grammatical_sem};
      o.train = margins_of(demo::completion_logps(*pol, train_pairs.chosen, 64),
                           demo::completion_logps(*pol, train_pairs.rejected, 64), sft_tc, sft_tr, train_pairs, z.beta);
      o.heldout = margins_of(demo::completion_logps(*pol, heldout.chosen, 64),
                             demo::completion_logps(*pol, heldout.rejected, 64), sft_hc, sft_hr, heldout, z.beta);
      o.dir = dir;
      o.samples = e.examples;
      p.runs.push_back(o);
      say("alpha " + tag(alpha) + " seed " + std::to_string(k) + ": reward " + pm(o.reward) + ", KL " + pm(o.kl) +
          ", grammatical " + pm(o.gram) + ", training margins gap 1 " + fmt(o.train.small, 3) + ", gap >= 2 " +
          fmt(o.train.large, 3));
    }
    p.aggregate();
    points.push_back(std::move(p));
  }

  // ---- criteria (fixed from theory before the first run; docs/reproductions.md gives the reasons)
  ExperimentOutput res;
  using Op = Criterion::Op;
  for (size_t i = 1; i < points.size(); ++i)
    res.criteria.push_back(check(
        "alpha " + tag(points[i - 1].alpha) + "->" + tag(points[i].alpha) + " raises the gap spread",
        "training pairs: mean margin of gap >= 2 pairs minus that of gap-1 pairs (offset 0), seed means: "
        "larger alpha minus smaller",
        points[i].d_train.mean - points[i - 1].d_train.mean, Op::Greater, 0.0));

  // ---- reported, not asserted: each alpha against DPO at the same beta, paired by seed.
  const AlphaPoint& dpo0 = points.front();
  json tests = json::array();
  std::ostringstream ttab;
  ttab << "| alpha | reward - DPO's [95% CI] | t | p | KL - DPO's [95% CI] | t | p | grammatical - DPO's | p | "
          "D (training) - DPO's [95% CI] | t | p |\n"
       << "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  const bool can_test = z.seeds >= 2;
  for (size_t i = 1; i < points.size() && can_test; ++i) {
    const AlphaPoint& p = points[i];
    const TTest tr = paired_t_test(p.per_seed(&RunOut::reward), dpo0.per_seed(&RunOut::reward));
    const TTest tk = paired_t_test(p.per_seed(&RunOut::kl), dpo0.per_seed(&RunOut::kl));
    const TTest tg = paired_t_test(p.per_seed(&RunOut::gram), dpo0.per_seed(&RunOut::gram));
    const TTest td = paired_t_test(p.spreads(&RunOut::train), dpo0.spreads(&RunOut::train));
    tests.push_back({{"alpha", p.alpha},
                     {"reward", ttest_json(tr)},
                     {"kl", ttest_json(tk)},
                     {"grammatical", ttest_json(tg)},
                     {"train_gap_spread", ttest_json(td)}});
    auto cell = [&](const TTest& t) {
      return fmt(t.diff, 3) + " [" + fmt(t.ci95_lo, 3) + ", " + fmt(t.ci95_hi, 3) + "] | " + fmt(t.t, 3) + " | " +
             fmt(t.p_two_sided, 2);
    };
    ttab << "| " << tag(p.alpha) << " | " << cell(tr) << " | " << cell(tk) << " | " << fmt(tg.diff, 3) << " | "
         << fmt(tg.p_two_sided, 2) << " | " << cell(td) << " |\n";
  }

  // ---- plots
  {
    Chart c{"ODPO vs DPO (beta " + tag(z.beta) + "): reward against KL(policy || SFT)", "KL (nats per completion)",
            "mean reward", {}};
    for (const AlphaPoint& p : points) {
      Series s{"alpha " + tag(p.alpha) + (p.alpha == 0 ? " (DPO)" : "") + ", each seed", {}, {},
               Series::Style::Points};
      for (const RunOut& r : p.runs) s.x.push_back(r.kl.mean), s.y.push_back(r.reward.mean);
      c.series.push_back(s);
    }
    Series means{"seed mean per alpha", {}, {}, Series::Style::LinePoints};
    for (const AlphaPoint& p : points) means.x.push_back(p.kl.mean), means.y.push_back(p.reward.mean);
    c.series.push_back(means);
    c.series.push_back({"SFT", {0.0}, {sft_eval.reward_mean}, Series::Style::Points});
    c.width = 900;
    c.height = 600;
    write_png(c, (out / "reward_vs_kl.png").string());
  }
  {
    Chart c{"Training pairs: mean implicit-reward margin beta * Delta by score gap (seed means)", "score gap",
            "mean margin", {}};
    for (const AlphaPoint& p : points) {
      Series s{"alpha " + tag(p.alpha) + (p.alpha == 0 ? " (DPO)" : ""), {}, {}, Series::Style::LinePoints};
      for (const auto& [g, v] : p.train_by_gap) s.x.push_back(g), s.y.push_back(v);
      c.series.push_back(s);
    }
    write_png(c, (out / "margin_by_gap.png").string());
  }
  {
    Chart c{"Gap spread D (mean margin, gap >= 2 minus gap 1) against alpha", "alpha", "D", {}};
    Series tr{"training pairs", {}, {}, Series::Style::LinePoints};
    Series he{"held-out pairs", {}, {}, Series::Style::LinePoints};
    for (const AlphaPoint& p : points) {
      tr.x.push_back(p.alpha), tr.y.push_back(p.d_train.mean);
      he.x.push_back(p.alpha), he.y.push_back(p.d_heldout.mean);
    }
    c.series = {tr, he};
    write_png(c, (out / "gap_spread_vs_alpha.png").string());
  }

  // ---- report
  json jpoints = json::array();
  for (const AlphaPoint& p : points) {
    json runs = json::array();
    for (const RunOut& r : p.runs)
      runs.push_back({{"reward", to_json(r.reward)},
                      {"kl", to_json(r.kl)},
                      {"grammatical", to_json(r.gram)},
                      {"train_margins", margins_json(r.train)},
                      {"heldout_margins", margins_json(r.heldout)},
                      {"dir", r.dir},
                      {"samples", r.samples}});
    json by_gap = json::object();
    for (const auto& [g, v] : p.train_by_gap) by_gap[std::to_string(g)] = v;
    jpoints.push_back({{"alpha", p.alpha},
                       {"reward", ci_json(p.reward, z.seeds)},
                       {"kl", ci_json(p.kl, z.seeds)},
                       {"grammatical", ci_json(p.gram, z.seeds)},
                       {"train_gap_spread", ci_json(p.d_train, z.seeds)},
                       {"heldout_gap_spread", ci_json(p.d_heldout, z.seeds)},
                       {"train_margin_by_gap", by_gap},
                       {"runs", runs}});
  }
  json gaps = json::object();
  for (const auto& [g, n] : gap_count) gaps[std::to_string(g)] = n;
  res.settings = {{"model",
                   {{"n_layer", z.pipeline.n_layer}, {"n_embd", z.pipeline.n_embd}, {"n_head", z.pipeline.n_head}}},
                  {"sft_examples", z.pipeline.sft_examples},
                  {"sft_epochs", z.pipeline.sft_epochs},
                  {"pair_prompts", z.pipeline.pair_prompts},
                  {"train_pairs", prep.n_train_pairs},
                  {"heldout_pairs", prep.n_eval_pairs},
                  {"ties_dropped", prep.ties},
                  {"train_pairs_by_gap", gaps},
                  {"dpo_epochs", z.pipeline.dpo_epochs},
                  {"beta", z.beta},
                  {"alphas", z.alphas},
                  {"offset", "alpha * log(score_chosen - score_rejected) (kernels/pair_loss.h odpo_offset)"},
                  {"seeds", z.seeds},
                  {"eval_samples", eval_prompts_rep.size()},
                  {"test", "paired t-test over seeds (equal seeds share training order and evaluation samples), "
                           "two-sided, df = seeds - 1"},
                  {"oracle_pairs", z.oracle_pairs}};
  res.results = {{"sft", {{"reward", {{"mean", sft_eval.reward_mean}, {"se", sft_eval.reward_sem}}},
                          {"grammatical", sft_eval.grammatical}}},
                 {"alphas", jpoints},
                 {"vs_dpo", tests}};

  std::ostringstream md;
  md << "Sentiment task, byte-level GPT-2 (" << z.pipeline.n_layer << " layers, width " << z.pipeline.n_embd
     << "); one SFT model and " << prep.n_train_pairs << " training pairs (" << prep.n_eval_pairs
     << " held-out) with their ground-truth score gaps, shared by every run. Training pairs by gap:";
  for (const auto& [g, n] : gap_count) md << " " << g << ": " << n << ";";
  md << " loss -log sigmoid(beta Delta - alpha log gap), beta " << tag(z.beta) << ", " << z.seeds
     << " seeds per alpha (training order and evaluation samples, equal across alphas). Each policy is evaluated on "
     << eval_prompts_rep.size()
     << " samples from the held-out prompts. Reward, KL and grammatical: seed means with 95% confidence intervals "
        "(t with seeds - 1 degrees of freedom on the larger of the sampling error and the seed spread). D: mean "
        "margin beta Delta of gap >= 2 pairs minus that of gap-1 pairs (seed mean and 95% CI over seeds).\n\n"
     << "SFT: reward " << fmt(sft_eval.reward_mean, 3) << " ± " << fmt(sft_eval.reward_sem, 2) << ", grammatical "
     << fmt(sft_eval.grammatical, 3) << ".\n\n"
     << "| alpha | mean reward | KL | grammatical | D, training pairs | D, held-out pairs | "
        "margin by gap (training) |\n"
     << "|---|---|---|---|---|---|---|\n";
  for (const AlphaPoint& p : points) {
    md << "| " << tag(p.alpha) << (p.alpha == 0 ? " (DPO)" : "") << " | " << ci95(p.reward, z.seeds) << " | "
       << ci95(p.kl, z.seeds) << " | " << ci95(p.gram, z.seeds) << " | " << ci95(p.d_train, z.seeds) << " | "
       << ci95(p.d_heldout, z.seeds) << " |";
    for (const auto& [g, v] : p.train_by_gap) md << " " << g << ": " << fmt(v, 3);
    md << " |\n";
  }
  if (can_test)
    md << "\nEach alpha against DPO (alpha 0) at beta " << tag(z.beta)
       << ", paired t-test over seeds (two-sided, df " << z.seeds - 1 << "):\n\n"
       << ttab.str();
  md << "\nPlots: reward_vs_kl.png, margin_by_gap.png, gap_spread_vs_alpha.png.\n\nSamples, alpha "
     << tag(points.back().alpha) << " seed 0:\n\n";
  for (const std::string& s : points.back().runs.front().samples) md << "    " << s << "\n";
  res.markdown = md.str();
  return res;
}

}  // namespace repro
}  // namespace dpo
