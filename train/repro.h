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
//
// Every experiment is offline, seeded and deterministic (double arithmetic on the host; the same seed gives the same
// numbers), writes DIR/report.json, DIR/report.md and PNG plots, prints one PASS/FAIL line per criterion with the
// measured number beside the threshold, and run_repro returns 0 when every criterion passes, 1 otherwise.
// Every per-pair loss and its derivatives come from pair_loss_eval (kernels/pair_loss.h); the optimizer is the
// product's AdamW (train/optim.h) on a host F64 tensor of the policy's logits.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/pair_loss.h"

namespace dpo {

struct ReproOptions {
  std::string name;     // an experiment of repro_experiments()
  std::string out_dir;  // created if missing; must not already hold a report.json
  bool full = false;    // the paper-sized version (more steps, more pairs)
  uint64_t seed = 1;
  int64_t num_threads = 0;  // CPU backend threads (0 = OpenMP default); the results do not depend on it
};

struct ReproExperiment {
  std::string name, summary;
  bool implemented = true;
};
// The experiments `dpo repro --list` prints, in order (frontier is listed, not implemented yet).
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

}  // namespace dpo
