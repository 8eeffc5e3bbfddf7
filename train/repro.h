// `dpo repro NAME`: small, exact reproductions of claims of the DPO and IPO papers, each with pass/fail criteria
// fixed from theory (docs/reproductions.md has the setups, the derivations and the measured numbers).
//
//   ipo-bandit  IPO paper (Azar et al. 2023, arXiv 2310.12036) section 5.1: a three-action bandit with a tabular
//               softmax policy; IPO reaches its least-squares optimum, DPO's log-ratio differences grow without
//               bound and the never-preferred action collapses; conservative DPO's two-action fixed point.
//   optimum     DPO paper (Rafailov et al. 2023, arXiv 2305.18290), the closed form: on every sequence of length L
//               over V tokens, DPO trained on Bradley-Terry pairs reaches the Bradley-Terry maximum-likelihood fit
//               of those pairs, which approaches pi_ref exp(r / beta) / Z as the pairs grow; IPO's least-squares
//               optimum alongside.
//   overfit     IPO paper's argument: deterministic preferences, many epochs; DPO's KL(policy || reference) keeps
//               rising toward the collapse limit whatever beta is, IPO's settles at its optimum's value.
//   frontier    DPO paper figure 2 (left) on the built-in sentiment task (train/demo.h): reward against
//               KL(policy || SFT) for DPO over betas and seeds, Preferred-FT, Best-of-N from the SFT policy and DPO
//               with the SFT term (RPO), with grammaticality and the chosen / rejected log-prob curves.
//   odpo        ODPO paper (Amini et al. 2024, arXiv 2402.10571) on the same task: pairs carrying their ground-truth
//               score gaps, ODPO's offset alpha * log(gap) over a small alpha grid against DPO (alpha 0) at one beta
//               and several seeds; the offset raises the margins of large-gap pairs relative to gap-1 pairs; reward
//               and KL with confidence intervals and paired t-tests, reported.
//
// ipo-bandit, optimum and overfit are exact: double arithmetic on the host, tabular policies, enumeration. frontier
// and odpo train GPT-2 models on the CPU backend and estimate by sampling (standard errors reported). Every
// experiment is offline and seeded (the same seed gives the same numbers at one thread count), writes
// DIR/report.json, DIR/report.md and PNG plots, prints one PASS/FAIL line per criterion with the measured number
// beside the threshold, and run_repro returns 0 when every criterion passes, 1 otherwise.
// In the exact experiments every per-pair loss and its derivatives come from pair_loss_eval (kernels/pair_loss.h);
// the optimizer is the product's AdamW (train/optim.h) on a host F64 tensor of the policy's logits.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/pair_loss.h"
#include "train/demo.h"

namespace dpo {

// Sizes of `frontier`. frontier_sizes(false) is the default run, frontier_sizes(true) the --full one; tests pass
// smaller ones through ReproOptions::frontier_sizes.
struct FrontierSizes {
  demo::Sizes pipeline = demo::kDemoSizes;  // SFT model, SFT corpus, pair prompts, evaluation samples, DPO epochs
  std::vector<double> betas;                // DPO's betas (each > 0)
  std::vector<double> rpo_betas;            // RPO's betas: a subset of `betas` (equal-beta comparisons)
  int64_t seeds = 3;                        // DPO / RPO / Preferred-FT runs per setting (training order, sampling)
  double rpo_sft_weight = 1.0;              // weight of the sft term in loss_type [sigmoid, sft]
  std::vector<int64_t> best_of_n;           // N values, increasing, the first >= 1
  int64_t bon_samples_per_prompt = 128;     // SFT samples per held-out prompt for Best-of-N
  int64_t bootstrap = 200;                  // bootstrap resamples for Best-of-N's standard errors
  int64_t logging_steps = 2;                // metrics.jsonl interval of the DPO / RPO runs (the log-prob curves)
  // Tests only: preference pairs drawn from the grammar (make_oracle_preferences) instead of labelled SFT samples,
  // for sizes at which the SFT model spells no sentiment word yet and every sampled pair is a tie.
  bool oracle_pairs = false;
};
FrontierSizes frontier_sizes(bool full);

// Sizes of `odpo`. odpo_sizes(false) is the default run, odpo_sizes(true) the --full one; tests pass smaller ones
// through ReproOptions::odpo_sizes.
struct OdpoSizes {
  demo::Sizes pipeline = demo::kDemoSizes;  // SFT model, SFT corpus, pair prompts, evaluation samples, DPO epochs
  double beta = 0.1;                        // the one beta every run shares (ODPO against DPO at matched beta)
  std::vector<double> alphas;               // increasing, the first 0 (DPO); offset alpha * log(score gap)
  int64_t seeds = 5;                        // runs per alpha (training order, evaluation samples; paired across alphas)
  bool oracle_pairs = false;                // tests only: pairs from the grammar (as FrontierSizes::oracle_pairs)
};
OdpoSizes odpo_sizes(bool full);

struct ReproOptions {
  std::string name;     // an experiment of repro_experiments()
  std::string out_dir;  // created if missing; must not already hold a report.json
  bool full = false;    // the paper-sized version (more steps, more pairs)
  uint64_t seed = 1;
  int64_t num_threads = 0;  // CPU backend threads (0 = OpenMP default); the exact experiments do not depend on it
  const FrontierSizes* frontier_sizes = nullptr;  // tests: frontier's sizes instead of frontier_sizes(full)
  const OdpoSizes* odpo_sizes = nullptr;          // tests: odpo's sizes instead of odpo_sizes(full)
};

struct ReproExperiment {
  std::string name, summary;
  bool implemented = true;
};
// The experiments `dpo repro --list` prints, in order.
const std::vector<ReproExperiment>& repro_experiments();

// Runs one experiment. Returns 0 when every criterion passed, 1 when one failed. InputError for an unknown or
// unimplemented name (naming it and the valid names) and for an out_dir that cannot be created or already holds a
// report.json.
int run_repro(const ReproOptions& opt);

// ---- the math the experiments share (exposed for tests) ----------------------------------------------------------

// One preference pair over the items of a tabular policy (actions or whole sequences), with a weight (its count
// divided by the number of pairs, so that a weighted sum is a mean over pairs).
struct WeightedPair {
  int32_t chosen = 0, rejected = 0;
  double weight = 1.0;
};

// log softmax(logits), stable (max subtracted first).
std::vector<double> log_softmax(const std::vector<double>& logits);
// Backward of log_softmax: dlogits[j] += dlogp[j] - p[j] * sum_i dlogp[i], p = exp(logp)
// (d logp_i / d logits_j = [i == j] - p_j). Accumulates (+=) into dlogits, which must have logp's size.
void log_softmax_backward(const std::vector<double>& logp, const std::vector<double>& dlogp,
                          std::vector<double>& dlogits);

// The policy pi = softmax(logits) over n items, the reference by its log-probs ref_logp (n), a weighted pair set:
// returns sum_q weight_q * pair_loss_eval(params, pair q).loss, with every sequence of length 1 (one item is one
// completion, so a per-token IPO equals the summed one). With grad non-null, sets *grad (resized to n) to the
// gradient of that sum w.r.t. the logits (pair_loss_eval's d_chosen / d_rejected through log_softmax_backward).
double pair_objective(const PairLossParams& params, const std::vector<WeightedPair>& pairs,
                      const std::vector<double>& logits, const std::vector<double>& ref_logp,
                      std::vector<double>* grad);

// Least-squares margins: h minimising sum_q w_q (h[chosen_q] - h[rejected_q] - target)^2 (IPO's population
// objective on a finite pair set with target 1/(2 tau)). Items in no pair get 0; h is unique up to a constant per
// connected component of the pair graph, fixed by making each component's mean 0. Normal equations (a weighted graph
// Laplacian) solved in double. Error if a weight is not finite and > 0.
std::vector<double> least_squares_margins(int64_t n_items, const std::vector<WeightedPair>& pairs, double target);

// The Bradley-Terry maximum-likelihood scores of a weighted pair set: s maximising
// sum_q w_q log sigmoid(s[chosen_q] - s[rejected_q]), by Newton's method in double (the log-likelihood is concave;
// its Hessian is a weighted Laplacian). The maximum exists iff every connected component of the pair graph is
// strongly connected as a directed graph (rejected -> chosen edges): otherwise some group of items only ever wins
// against the rest and the likelihood rises forever. Items in no pair get 0; each component's mean is 0.
struct BradleyTerryFit {
  std::vector<double> score;
  bool exists = false;        // the strong-connectivity condition above
  int iterations = 0;         // Newton steps taken
  double grad_max = 0;        // max |gradient of the log-likelihood| at the returned scores
};
BradleyTerryFit bradley_terry_fit(int64_t n_items, const std::vector<WeightedPair>& pairs);

// Exact distances between distributions given by their probabilities (same size): total variation
// 0.5 * sum |p - q|, and KL(p || q) = sum p log(p / q) over p > 0.
double total_variation(const std::vector<double>& p, const std::vector<double>& q);
double kl_divergence(const std::vector<double>& p, const std::vector<double>& q);

// Best-of-N: draw N completions from a base distribution q over items (probabilities `prob`, rewards `reward`),
// keep one of highest reward, ties broken uniformly at random. Returns that policy's probabilities over the items:
//   pi_N(y) = q(y) * (F(v)^N - F(v-)^N) / p(v),  v = reward(y),
// p(v) = q(reward = v), F(v) = q(reward <= v), F(v-) = F(v) - p(v) (docs/reproductions.md derives it). Items of
// probability 0 get 0. Error unless n >= 1, the sizes match, and the probabilities are finite, >= 0 and sum to 1
// within 1e-9.
std::vector<double> best_of_n_distribution(const std::vector<double>& prob, const std::vector<double>& reward,
                                           int64_t n);
// log N - (N - 1) / N: KL(best-of-N || q) when no two items tie in reward, the upper bound with ties.
double best_of_n_kl_bound(int64_t n);

// Student's t, for the confidence intervals and tests over seeds of the sampled experiments (frontier, odpo).
// incomplete_beta(a, b, x): the regularised incomplete beta function I_x(a, b) (a, b > 0, x in [0, 1]), by its
// continued fraction. student_t_cdf: P(T <= t) for T ~ t(df), df > 0 (not necessarily an integer);
// student_t_quantile: its inverse for p in (0, 1), by bisection to 1e-12.
double incomplete_beta(double a, double b, double x);
double student_t_cdf(double t, double df);
double student_t_quantile(double p, double df);

// A two-sided t-test of a mean difference: diff, its standard error, t = diff / se, the degrees of freedom, the
// two-sided p-value and the 95% confidence interval diff -/+ t_{0.975, df} se. With se = 0 the difference is taken
// as exact (p 1 when it is 0, else 0).
struct TTest {
  double diff = 0, se = 0, t = 0, df = 0, p_two_sided = 1, ci95_lo = 0, ci95_hi = 0;
};
// Paired: the differences a_i - b_i (equal sizes >= 2), df = n - 1. Welch: two independent samples (sizes >= 2)
// with unequal variances, Welch-Satterthwaite df.
TTest paired_t_test(const std::vector<double>& a, const std::vector<double>& b);
TTest welch_t_test(const std::vector<double>& a, const std::vector<double>& b);

}  // namespace dpo
