// Pieces the `dpo repro` experiments share (train/repro*.cpp only; the public interface is train/repro.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "train/optim.h"
#include "train/repro.h"

namespace dpo::repro {

// One pass/fail criterion: `measured op threshold`, the claim in words.
struct Criterion {
  enum class Op { LessEq, GreaterEq, Greater };
  std::string id;    // short unique name, e.g. "D1 tau=0.1 ipo |d - d*|"
  std::string what;  // what it checks, one line
  double measured = 0, threshold = 0;
  Op op = Op::LessEq;
  bool pass = false;
};
Criterion check(std::string id, std::string what, double measured, Criterion::Op op, double threshold);
const char* op_text(Criterion::Op op);

struct ExperimentOutput {
  nlohmann::json settings = nlohmann::json::object();  // sizes, seeds, optimizer settings
  nlohmann::json results = nlohmann::json::object();   // the measured numbers
  std::string markdown;                                // report.md body (setup, tables, plot names)
  std::vector<Criterion> criteria;
};

// The product's AdamW (train/optim.h) on a host F64 vector of logits, no weight decay, no clipping.
class TabularAdam {
 public:
  TabularAdam(Backend& backend, int64_t n, const OptimConfig& cfg, int64_t total_steps);
  // One AdamW step: logits -= update(grad). Error if the optimizer skipped the step (a non-finite gradient).
  void step(std::vector<double>& logits, const std::vector<double>& grad);

 private:
  Tensor params_, grads_;
  std::unique_ptr<AdamW> opt_;
};

// Adam's settings of the IPO paper's bandit (section 5.1: Adam, learning rate 0.01), with torch's default moments.
OptimConfig paper_adam();
// Kingma & Ba (2015, section 2.1): one Adam step moves a parameter by at most lr (1 - beta1) / sqrt(1 - beta2)
// when 1 - beta1 > sqrt(1 - beta2) (else by at most lr). The jitter bound every tolerance here starts from.
double adam_step_bound(const OptimConfig& c);

std::string fmt(double v, int prec = 4);  // %.{prec}g
std::string md_cell(const std::string& s);  // '|' escaped for a Markdown table cell

// Per-experiment entry points (train/repro_bandit.cpp, repro_optimum.cpp, repro_overfit.cpp, repro_frontier.cpp,
// repro_odpo.cpp).
// `out` exists.
ExperimentOutput run_ipo_bandit(const ReproOptions& opt, Backend& backend, const std::filesystem::path& out);
ExperimentOutput run_optimum(const ReproOptions& opt, Backend& backend, const std::filesystem::path& out);
ExperimentOutput run_overfit(const ReproOptions& opt, Backend& backend, const std::filesystem::path& out);
ExperimentOutput run_frontier(const ReproOptions& opt, Backend& backend, const std::filesystem::path& out);
ExperimentOutput run_odpo(const ReproOptions& opt, Backend& backend, const std::filesystem::path& out);

// The sequence space of `optimum` and `overfit`: all V^L sequences of length L over V tokens, item i spelling
// its base-V digits (most significant first). The reference is a tabular autoregressive model: one logit vector
// over V per prefix (V^0 + ... + V^(L-1) prefixes), entries N(0, ref_scale^2) from `seed`.
struct SequenceSpace {
  int64_t V = 4, L = 3;
  int64_t size() const;
  std::string spell(int64_t item) const;  // tokens as letters a, b, c, ...
};
// log pi_ref(y) for every sequence y of the space (sums to 1 in probability).
std::vector<double> autoregressive_reference(const SequenceSpace& sp, double ref_scale, uint64_t seed);

std::vector<double> probs_of(const std::vector<double>& logp);  // exp, elementwise

}  // namespace dpo::repro
