// `dpo repro`: the driver (options, report files, PASS/FAIL lines) and the pieces the experiments share.
#include "train/repro.h"

#include <chrono>
#include <cstdio>
#include <sstream>

#include "runtime/error.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "train/repro_common.h"

namespace dpo {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace repro {

Criterion check(std::string id, std::string what, double measured, Criterion::Op op, double threshold) {
  Criterion c;
  c.id = std::move(id);
  c.what = std::move(what);
  c.measured = measured;
  c.threshold = threshold;
  c.op = op;
  // A NaN measurement fails every comparison.
  switch (op) {
    case Criterion::Op::LessEq: c.pass = measured <= threshold; break;
    case Criterion::Op::GreaterEq: c.pass = measured >= threshold; break;
    case Criterion::Op::Greater: c.pass = measured > threshold; break;
  }
  return c;
}

const char* op_text(Criterion::Op op) {
  switch (op) {
    case Criterion::Op::LessEq: return "<=";
    case Criterion::Op::GreaterEq: return ">=";
    case Criterion::Op::Greater: return ">";
  }
  return "?";
}

TabularAdam::TabularAdam(Backend& backend, int64_t n, const OptimConfig& cfg, int64_t total_steps)
    : params_(Tensor::host({n}, DType::F64)), grads_(Tensor::host({n}, DType::F64)) {
  ParamSpec spec;
  spec.name = "logits";
  spec.shape = {n};
  spec.offset = 0;
  spec.weight_decay = false;
  opt_ = std::make_unique<AdamW>(backend, std::vector<ParamSpec>{spec}, n, DType::F64, cfg, total_steps);
}

void TabularAdam::step(std::vector<double>& logits, const std::vector<double>& grad) {
  const int64_t n = params_.numel();
  DPO_ASSERT(static_cast<int64_t>(logits.size()) == n && static_cast<int64_t>(grad.size()) == n,
             "TabularAdam: size mismatch");
  std::copy(logits.begin(), logits.end(), params_.data<double>());
  std::copy(grad.begin(), grad.end(), grads_.data<double>());
  const AdamW::StepInfo info = opt_->step(params_, grads_);
  if (info.skipped) throw Error(std::string("repro: AdamW skipped a step: ") + skip_reason_text(info.skip_reason));
  std::copy(params_.data<double>(), params_.data<double>() + n, logits.begin());
}

OptimConfig paper_adam() {
  OptimConfig c;
  c.lr = 0.01;
  c.beta1 = 0.9;
  c.beta2 = 0.999;
  c.eps = 1e-8;
  c.weight_decay = 0.0;
  c.max_grad_norm = 0.0;  // no clipping
  c.warmup_steps = 0;
  c.schedule = LrSchedule::Constant;
  return c;
}

double adam_step_bound(const OptimConfig& c) {
  const double a = 1 - c.beta1, b = std::sqrt(1 - c.beta2);
  return a > b ? c.lr * a / b : c.lr;
}

std::string md_cell(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

std::string fmt(double v, int prec) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", prec, v);
  return buf;
}

int64_t SequenceSpace::size() const {
  int64_t n = 1;
  for (int64_t i = 0; i < L; ++i) n *= V;
  return n;
}

std::string SequenceSpace::spell(int64_t item) const {
  std::string s(static_cast<size_t>(L), 'a');
  for (int64_t t = L - 1; t >= 0; --t, item /= V) s[static_cast<size_t>(t)] = static_cast<char>('a' + item % V);
  return s;
}

std::vector<double> autoregressive_reference(const SequenceSpace& sp, double ref_scale, uint64_t seed) {
  // Prefix p of length t (base-V value u) has index (V^t - 1) / (V - 1) + u among all prefixes.
  int64_t n_prefix = 0, pw = 1;
  for (int64_t t = 0; t < sp.L; ++t, pw *= sp.V) n_prefix += pw;
  Rng rng(seed);
  std::vector<std::vector<double>> logp(static_cast<size_t>(n_prefix));
  for (auto& row : logp) {
    std::vector<double> logits(static_cast<size_t>(sp.V));
    for (double& x : logits) x = ref_scale * rng.normal();
    row = log_softmax(logits);
  }
  const int64_t n = sp.size();
  std::vector<double> out(static_cast<size_t>(n), 0.0);
  for (int64_t y = 0; y < n; ++y) {
    int64_t prefix_value = 0, start = 0, width = 1;
    for (int64_t t = 0; t < sp.L; ++t) {
      int64_t div = 1;
      for (int64_t k = t + 1; k < sp.L; ++k) div *= sp.V;
      const int64_t tok = (y / div) % sp.V;
      out[y] += logp[static_cast<size_t>(start + prefix_value)][static_cast<size_t>(tok)];
      prefix_value = prefix_value * sp.V + tok;
      start += width;
      width *= sp.V;
    }
  }
  return out;
}

std::vector<double> probs_of(const std::vector<double>& logp) {
  std::vector<double> p(logp.size());
  for (size_t i = 0; i < p.size(); ++i) p[i] = std::exp(logp[i]);
  return p;
}

}  // namespace repro

const std::vector<ReproExperiment>& repro_experiments() {
  static const std::vector<ReproExperiment> list = {
      {"ipo-bandit",
       "IPO paper 5.1: 3-action bandit, DPO vs IPO vs cDPO at tau 0.1..3; IPO's least-squares optimum, DPO's "
       "unbounded differences and collapse",
       true},
      {"optimum",
       "DPO paper's closed form: every sequence (V=4, L=3), DPO reaches the Bradley-Terry fit of its pairs, which "
       "nears pi_ref exp(r/beta)/Z as pairs grow; IPO's least-squares optimum",
       true},
      {"overfit",
       "IPO paper's argument: deterministic preferences, many epochs; DPO's KL to the reference keeps rising, "
       "IPO's settles",
       true},
      {"frontier",
       "DPO paper fig. 2: reward vs KL(policy || SFT) on the sentiment task; DPO over betas and seeds against "
       "Preferred-FT, Best-of-N and RPO; grammaticality and log-prob curves (minutes)",
       true},
      {"odpo",
       "ODPO paper: offset alpha * log(score gap) against DPO on the sentiment task, alpha 0..2, 5 seeds; margins "
       "by gap, reward and KL with confidence intervals and paired t-tests (minutes)",
       true},
  };
  return list;
}

int run_repro(const ReproOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  const ReproExperiment* exp = nullptr;
  std::string names;
  for (const ReproExperiment& e : repro_experiments()) {
    names += (names.empty() ? "" : ", ") + e.name;
    if (e.name == opt.name) exp = &e;
  }
  if (!exp) throw InputError("repro: unknown experiment '" + opt.name + "'; valid: " + names + " (dpo repro --list)");
  if (!exp->implemented)
    throw InputError("repro: experiment '" + opt.name +
                     "' is not implemented yet");
  if (opt.out_dir.empty()) throw InputError("--out is required");
  const fs::path out = opt.out_dir;
  if (fs::exists(out / "report.json"))
    throw InputError("--out: " + opt.out_dir + " already holds a report.json; choose a new directory");
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out))
    throw InputError("--out: cannot create directory " + opt.out_dir + (ec ? ": " + ec.message() : ""));

  auto backend = make_cpu_backend(static_cast<int>(opt.num_threads));
  std::fprintf(stderr, "[repro %s] running (%s size, seed %llu)\n", opt.name.c_str(), opt.full ? "full" : "default",
               static_cast<unsigned long long>(opt.seed));
  repro::ExperimentOutput res;
  if (opt.name == "ipo-bandit") res = repro::run_ipo_bandit(opt, *backend, out);
  else if (opt.name == "optimum") res = repro::run_optimum(opt, *backend, out);
  else if (opt.name == "overfit") res = repro::run_overfit(opt, *backend, out);
  else if (opt.name == "frontier") res = repro::run_frontier(opt, *backend, out);
  else res = repro::run_odpo(opt, *backend, out);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  bool all = true;
  json crit = json::array();
  std::ostringstream table;
  table << "| criterion | measured | | threshold | result | what |\n|---|---|---|---|---|---|\n";
  for (const repro::Criterion& c : res.criteria) {
    all = all && c.pass;
    crit.push_back({{"id", c.id},
                    {"what", c.what},
                    {"measured", c.measured},
                    {"op", repro::op_text(c.op)},
                    {"threshold", c.threshold},
                    {"pass", c.pass}});
    table << "| " << repro::md_cell(c.id) << " | " << repro::fmt(c.measured) << " | " << repro::op_text(c.op) << " | "
          << repro::fmt(c.threshold) << " | " << (c.pass ? "PASS" : "**FAIL**") << " | " << repro::md_cell(c.what)
          << " |\n";
    std::printf("%s  %s: %s %s %s  (%s)\n", c.pass ? "PASS" : "FAIL", c.id.c_str(), repro::fmt(c.measured).c_str(),
                repro::op_text(c.op), repro::fmt(c.threshold).c_str(), c.what.c_str());
  }
  all = all && !res.criteria.empty();
  int n_pass = 0;
  for (const auto& c : res.criteria) n_pass += c.pass ? 1 : 0;

  json report = {{"experiment", opt.name},
                 {"size", opt.full ? "full" : "default"},
                 {"seed", opt.seed},
                 {"settings", res.settings},
                 {"results", res.results},
                 {"criteria", crit},
                 {"passed", all},
                 {"criteria_passed", n_pass},
                 {"criteria_total", res.criteria.size()},
                 {"seconds", seconds}};
  // Sampled text (frontier) may hold invalid UTF-8 (a policy can emit any byte): JSON gets U+FFFD in its place.
  write_file_atomic((out / "report.json").string(),
                    report.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
  std::ostringstream md;
  md << "# dpo repro " << opt.name << "\n\n"
     << "Command: `dpo repro " << opt.name << " --out DIR" << (opt.full ? " --full" : "") << " --seed " << opt.seed
     << "`. " << n_pass << " of " << res.criteria.size() << " criteria passed; " << repro::fmt(seconds, 3)
     << " s.\n\n"
     << res.markdown << "\n## Criteria\n\n"
     << table.str();
  write_file_atomic((out / "report.md").string(), md.str());
  std::printf("%s: %d of %zu criteria passed (%s); report: %s\n", opt.name.c_str(), n_pass, res.criteria.size(),
              all ? "PASS" : "FAIL", (out / "report.md").string().c_str());
  return all ? 0 : 1;
}

}  // namespace dpo
