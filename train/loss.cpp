#include "train/loss.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "runtime/error.h"

namespace dpo {

namespace {

struct NamedType {
  const char* name;
  LossType type;
};
// Canonical names first, in enum order (loss_type_name reads the first match); aliases after.
constexpr NamedType kNames[] = {
    {"sigmoid", LossType::Sigmoid},        {"ipo", LossType::Ipo},
    {"hinge", LossType::Hinge},            {"robust", LossType::Robust},
    {"cdpo", LossType::Cdpo},              {"sft", LossType::Sft},
    {"exo_pair", LossType::ExoPair},       {"nca_pair", LossType::NcaPair},
    {"bco_pair", LossType::BcoPair},       {"sppo_hard", LossType::SppoHard},
    {"apo_zero", LossType::ApoZero},       {"apo_down", LossType::ApoDown},
    {"discopop", LossType::Discopop},      {"sigmoid_norm", LossType::SigmoidNorm},
    {"simpo", LossType::Simpo},            {"aot", LossType::Aot},
    {"aot_unpaired", LossType::AotUnpaired}, {"dpo", LossType::Sigmoid},
};
constexpr int kNumCanonical = kNumLossTypes;
static_assert(sizeof(kNames) / sizeof(kNames[0]) == kNumCanonical + 1, "one canonical name per LossType");

struct NamedFDiv {
  const char* name;
  FDivergence f;
};
constexpr NamedFDiv kFDivNames[] = {{"reverse_kl", FDivergence::ReverseKl},
                                    {"forward_kl", FDivergence::ForwardKl},
                                    {"js_divergence", FDivergence::Js},
                                    {"alpha_divergence", FDivergence::Alpha}};

std::string fmt(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

[[noreturn]] void input_error(const std::string& where, const std::string& key, const std::string& what) {
  throw InputError((where.empty() ? std::string() : where + ": ") + key + " " + what);
}

bool has_term(const LossConfig& cfg, LossType t) {
  return std::any_of(cfg.terms.begin(), cfg.terms.end(), [t](const LossTerm& x) { return x.type == t; });
}

// Whether a term divides by the chosen / rejected completion length (the preconditions of kernels/pair_loss.h).
bool uses_len_chosen(const LossConfig& cfg) {
  return cfg.use_weighting || std::any_of(cfg.terms.begin(), cfg.terms.end(), [&cfg](const LossTerm& x) {
    return x.type == LossType::Sft || x.type == LossType::SigmoidNorm || x.type == LossType::Simpo ||
           (x.type == LossType::Ipo && cfg.ipo_length_normalize);
  });
}
bool uses_len_rejected(const LossConfig& cfg) {
  return cfg.use_weighting || std::any_of(cfg.terms.begin(), cfg.terms.end(), [&cfg](const LossTerm& x) {
    return x.type == LossType::SigmoidNorm || x.type == LossType::Simpo ||
           (x.type == LossType::Ipo && cfg.ipo_length_normalize);
  });
}

// Evaluates the pair with the shared per-pair function (kernels/pair_loss.h) without validating cfg. term_losses,
// when non-null, receives the unweighted term losses in cfg.terms order.
PairOutput evaluate(const LossConfig& cfg, const PairLossParams& params, const PairInput& in, double* term_losses) {
  const PairLossOutput o = pair_loss_eval(params, pair_loss_input(cfg, in));
  if (term_losses)
    for (size_t i = 0; i < cfg.terms.size(); ++i) term_losses[i] = o.term[i];
  PairOutput out;
  out.loss = o.loss;
  out.d_policy_chosen = o.d_chosen;
  out.d_policy_rejected = o.d_rejected;
  out.reward_chosen = o.reward_chosen;
  out.reward_rejected = o.reward_rejected;
  return out;
}

// The config's parameters without validating it (callers validate once per call).
PairLossParams params_of(const LossConfig& cfg) {
  DPO_ASSERT(cfg.terms.size() <= static_cast<size_t>(kMaxLossTerms), "loss: more terms than loss types");
  PairLossParams p;
  p.n_terms = static_cast<int32_t>(cfg.terms.size());
  for (size_t i = 0; i < cfg.terms.size(); ++i) {
    p.type[i] = cfg.terms[i].type;
    p.weight[i] = cfg.terms[i].weight;
  }
  p.beta = cfg.beta;
  p.label_smoothing = cfg.label_smoothing;
  p.ipo_norm = cfg.ipo_length_normalize ? IpoNorm::PerToken : IpoNorm::Summed;
  p.ref = cfg.reference_free ? RefMode::ReferenceFree : RefMode::WithReference;
  p.discopop_tau = cfg.discopop_tau;
  p.simpo_gamma = cfg.simpo_gamma;
  p.f_div = cfg.f_divergence;
  p.f_alpha = cfg.f_alpha_divergence_coef;
  p.weighting = cfg.use_weighting ? PairWeighting::Wpo : PairWeighting::None;
  return p;
}

// The pairs' indices sorted by v ascending: a stable sort (ties in pair order) under a total order that puts NaN
// last, so that a NaN log-prob cannot break the sort's ordering requirement (it gives a NaN loss instead).
std::vector<size_t> ascending(const std::vector<double>& v) {
  std::vector<size_t> o(v.size());
  for (size_t i = 0; i < o.size(); ++i) o[i] = i;
  std::stable_sort(o.begin(), o.end(), [&v](size_t a, size_t b) {
    const bool na = std::isnan(v[a]), nb = std::isnan(v[b]);
    if (na || nb) return !na && nb;
    return v[a] < v[b];
  });
  return o;
}

// Adds batch term t (aot, aot_unpaired; formulas in train/loss.h) of the micro-batch `pairs` to b: its value to
// loss_sum (weighted) and term_loss_sum[t] (unweighted), its derivatives (weighted, / normalizer) to b's per-pair
// derivatives.
void add_batch_term(const LossConfig& cfg, const LossTerm& term, const std::vector<PairInput>& pairs,
                    double normalizer, BatchLoss& b, size_t t) {
  const size_t P = pairs.size();
  const bool ref = !cfg.reference_free;
  std::vector<double> lhs(P), rhs(P);  // the two sorted sequences: aot x, y; aot_unpaired c, r
  for (size_t q = 0; q < P; ++q) {
    const PairInput& in = pairs[q];
    const double rc = ref ? in.ref_chosen : 0.0, rr = ref ? in.ref_rejected : 0.0;
    if (term.type == LossType::Aot) {
      lhs[q] = in.policy_chosen - in.policy_rejected;
      rhs[q] = rc - rr;
    } else {
      lhs[q] = in.policy_chosen - rc;
      rhs[q] = in.policy_rejected - rr;
    }
  }
  const std::vector<size_t> ol = ascending(lhs), orr = ascending(rhs);
  const double beta = cfg.beta, eps = cfg.label_smoothing, w = term.weight;
  double sum = 0;
  for (size_t k = 0; k < P; ++k) {
    const double z = beta * (lhs[ol[k]] - rhs[orr[k]]);
    sum += (1 - eps) * pair_math::softplus(-z) + eps * pair_math::softplus(z);
    const double dd = beta * (-(1 - eps) * pair_math::sigmoid(-z) + eps * pair_math::sigmoid(z)) * w / normalizer;
    if (term.type == LossType::Aot) {
      // d/dx of rank k's pair; x = policy_chosen - policy_rejected. The reference's y carries no gradient.
      b.d_policy_chosen[ol[k]] += dd;
      b.d_policy_rejected[ol[k]] -= dd;
    } else {
      b.d_policy_chosen[ol[k]] += dd;
      b.d_policy_rejected[orr[k]] -= dd;
    }
  }
  b.term_loss_sum[t] += sum;
  b.loss_sum += w * sum;
}

}  // namespace

double softplus(double x) { return pair_math::softplus(x); }

double log_sigmoid(double x) { return -softplus(-x); }

double sigmoid(double x) { return pair_math::sigmoid(x); }

LossType parse_loss_type(const std::string& name) {
  for (const auto& n : kNames)
    if (name == n.name) return n.type;
  std::string valid;
  for (int i = 0; i < kNumCanonical; ++i) valid += std::string(i ? ", " : "") + kNames[i].name;
  throw InputError("loss_type: unknown value '" + name + "'; valid: " + valid);
}

const char* loss_type_name(LossType type) {
  for (int i = 0; i < kNumCanonical; ++i)
    if (kNames[i].type == type) return kNames[i].name;
  return "?";
}

FDivergence parse_f_divergence(const std::string& name) {
  for (const auto& n : kFDivNames)
    if (name == n.name) return n.f;
  std::string valid;
  for (const auto& n : kFDivNames) valid += std::string(valid.empty() ? "" : ", ") + n.name;
  throw InputError("f_divergence_type: unknown value '" + name + "'; valid: " + valid);
}

const char* f_divergence_name(FDivergence f) {
  for (const auto& n : kFDivNames)
    if (n.f == f) return n.name;
  return "?";
}

std::vector<LossTerm> make_loss_terms(const std::vector<std::string>& types, const std::vector<double>& weights) {
  if (!weights.empty() && weights.size() != types.size())
    throw InputError("loss_weights: " + std::to_string(weights.size()) + " weights for " +
                     std::to_string(types.size()) + " loss types (give one weight per loss_type entry)");
  std::vector<LossTerm> terms;
  for (size_t i = 0; i < types.size(); ++i) terms.push_back({parse_loss_type(types[i]), weights.empty() ? 1.0 : weights[i]});
  return terms;
}

void LossConfig::validate(const std::string& where) const {
  if (!std::isfinite(beta) || !(beta > 0)) input_error(where, "beta", "must be finite and > 0, got " + fmt(beta));
  if (!std::isfinite(label_smoothing) || !(label_smoothing >= 0) || !(label_smoothing < 0.5))
    input_error(where, "label_smoothing", "must be in [0, 0.5), got " + fmt(label_smoothing));
  if (terms.empty()) input_error(where, "loss_type", "must name at least one loss");
  bool any_positive = false;
  for (size_t i = 0; i < terms.size(); ++i) {
    for (size_t j = 0; j < i; ++j)
      if (terms[j].type == terms[i].type)
        input_error(where, "loss_type", std::string("lists '") + loss_type_name(terms[i].type) +
                                            "' twice (merge the weights instead)");
    const double w = terms[i].weight;
    if (!std::isfinite(w) || !(w >= 0))
      input_error(where, "loss_weights", std::string("must be finite and >= 0, got ") + fmt(w) + " for '" +
                                             loss_type_name(terms[i].type) + "'");
    if (w > 0) any_positive = true;
  }
  if (!any_positive) input_error(where, "loss_weights", "are all 0; at least one must be > 0");
  if (label_smoothing > 0 && !has_term(*this, LossType::Robust) && !has_term(*this, LossType::Cdpo) &&
      !has_term(*this, LossType::ExoPair) && !has_term(*this, LossType::Simpo) && !has_term(*this, LossType::Aot) &&
      !has_term(*this, LossType::AotUnpaired))
    input_error(where, "label_smoothing",
                "is " + fmt(label_smoothing) + " but only the robust, cdpo, exo_pair, simpo, aot and aot_unpaired "
                "losses use it (a smoothed 'sigmoid' is 'cdpo' here)");
  if (label_smoothing == 0 && has_term(*this, LossType::ExoPair))
    input_error(where, "label_smoothing",
                "must be > 0 with the exo_pair loss (its target distribution is (1 - eps, eps) and it takes log "
                "eps; TRL refuses 0 too; the EXO paper recommends 1e-3)");
  if (!std::isfinite(discopop_tau) || !(discopop_tau > 0))
    input_error(where, "discopop_tau", "must be finite and > 0, got " + fmt(discopop_tau));
  if (!std::isfinite(simpo_gamma)) input_error(where, "simpo_gamma", "must be finite, got " + fmt(simpo_gamma));
  if (!std::isfinite(f_alpha_divergence_coef))
    input_error(where, "f_alpha_divergence_coef", "must be finite, got " + fmt(f_alpha_divergence_coef));
  if (f_divergence != FDivergence::ReverseKl)
    for (const LossTerm& t : terms)
      if (!uses_f_divergence(t.type))
        input_error(where, "f_divergence_type",
                    std::string("is ") + f_divergence_name(f_divergence) + " but the loss '" + loss_type_name(t.type) +
                        "' has no f-divergence form (TRL allows a non-default f_divergence_type only with sigmoid, "
                        "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft; cdpo here too)");
  const bool only_ref_free_losses = std::all_of(terms.begin(), terms.end(), [](const LossTerm& t) {
    return t.type == LossType::Simpo || t.type == LossType::Sft;
  });
  if (has_term(*this, LossType::Simpo) && only_ref_free_losses && !reference_free)
    input_error(where, "reference_free",
                "must be true when the losses are simpo (and sft) only: SimPO uses no reference model, which would "
                "be loaded and run for nothing but the reward metrics");
  if (use_weighting && has_batch_terms(*this))
    input_error(where, "use_weighting",
                "is true but loss_type lists aot or aot_unpaired: they sort the micro-batch, which would misalign "
                "WPO's per-pair weights (TRL refuses the combination too)");
  if (!std::isfinite(odpo_alpha) || !(odpo_alpha >= 0))
    input_error(where, "odpo_alpha", "must be finite and >= 0, got " + fmt(odpo_alpha));
  if (odpo_alpha > 0 && !has_term(*this, LossType::Sigmoid))
    input_error(where, "odpo_alpha", "is " + fmt(odpo_alpha) + " but the ODPO offset applies only to the sigmoid loss, "
                                     "which is not in loss_type");
}

bool has_batch_terms(const LossConfig& cfg) {
  return std::any_of(cfg.terms.begin(), cfg.terms.end(), [](const LossTerm& t) { return is_batch_term(t.type); });
}

PairOutput pair_loss(const LossConfig& cfg, const PairInput& in) {
  cfg.validate();
  return evaluate(cfg, params_of(cfg), in, nullptr);
}

PairLossParams pair_loss_params(const LossConfig& cfg) {
  cfg.validate();
  return params_of(cfg);
}

PairLossInput pair_loss_input(const LossConfig& cfg, const PairInput& in) {
  PairLossInput x;
  x.policy_chosen = in.policy_chosen;
  x.policy_rejected = in.policy_rejected;
  x.ref_chosen = in.ref_chosen;
  x.ref_rejected = in.ref_rejected;
  x.len_chosen = static_cast<double>(in.len_chosen);
  x.len_rejected = static_cast<double>(in.len_rejected);
  x.wpo_chosen = in.wpo_chosen;
  x.wpo_rejected = in.wpo_rejected;
  if (cfg.odpo_alpha > 0) {
    const double gap = in.score_chosen - in.score_rejected;
    DPO_ASSERT(in.has_scores && gap > 0 && std::isfinite(gap),
               "pair loss: ODPO (odpo_alpha > 0) needs per-pair scores with score_chosen > score_rejected, got " +
                   (in.has_scores ? "score_chosen " + fmt(in.score_chosen) + ", score_rejected " +
                                        fmt(in.score_rejected)
                                  : std::string("no scores")) +
                   "; the data loaders refuse such records (DataOptions::require_score_gap)");
    x.offset = odpo_offset(cfg.odpo_alpha, in.score_chosen, in.score_rejected);
  }
  DPO_ASSERT((!uses_len_chosen(cfg) || in.len_chosen > 0) && (!uses_len_rejected(cfg) || in.len_rejected > 0),
             "pair loss: completion lengths must be > 0 where the loss uses them, got len_chosen " +
                 std::to_string(in.len_chosen) + ", len_rejected " + std::to_string(in.len_rejected) +
                 "; the data loaders refuse empty completions and make_batch counts >= 1 completion token per row");
  return x;
}

BatchLoss batch_loss(const LossConfig& cfg, const std::vector<PairInput>& pairs, double normalizer) {
  cfg.validate();
  DPO_ASSERT(std::isfinite(normalizer) && normalizer > 0, "batch_loss: normalizer must be finite and > 0, got " + fmt(normalizer));
  BatchLoss b;
  b.pairs = static_cast<int64_t>(pairs.size());
  b.term_loss_sum.assign(cfg.terms.size(), 0.0);
  b.d_policy_chosen.resize(pairs.size());
  b.d_policy_rejected.resize(pairs.size());
  const PairLossParams params = params_of(cfg);
  std::vector<double> terms(cfg.terms.size());
  for (size_t i = 0; i < pairs.size(); ++i) {
    const PairOutput o = evaluate(cfg, params, pairs[i], terms.data());
    b.loss_sum += o.loss;
    for (size_t t = 0; t < terms.size(); ++t) b.term_loss_sum[t] += terms[t];
    b.d_policy_chosen[i] = o.d_policy_chosen / normalizer;
    b.d_policy_rejected[i] = o.d_policy_rejected / normalizer;
    b.reward_chosen_sum += o.reward_chosen;
    b.reward_rejected_sum += o.reward_rejected;
    if (o.reward_chosen > o.reward_rejected) b.accuracy_sum += 1;
    b.margin_sum += o.reward_chosen - o.reward_rejected;
    b.logps_chosen_sum += pairs[i].policy_chosen;
    b.logps_rejected_sum += pairs[i].policy_rejected;
  }
  for (size_t t = 0; t < cfg.terms.size(); ++t)
    if (is_batch_term(cfg.terms[t].type)) add_batch_term(cfg, cfg.terms[t], pairs, normalizer, b, t);
  return b;
}

std::vector<double> pair_sums_row(const BatchLoss& bl, const std::vector<PairInput>& pairs,
                                  const std::vector<double>& logit_sums) {
  const size_t P = pairs.size();
  DPO_ASSERT(logit_sums.size() == 2 * P, "pair_sums_row: logit_sums must have 2P entries");
  DPO_ASSERT(bl.term_loss_sum.size() <= static_cast<size_t>(kMaxLossTerms), "pair_sums_row: too many terms");
  std::vector<double> row(kPairSumsWidth, 0.0);
  row[kSumLoss] = bl.loss_sum;
  row[kSumRewardChosen] = bl.reward_chosen_sum;
  row[kSumRewardRejected] = bl.reward_rejected_sum;
  row[kSumAccuracy] = bl.accuracy_sum;
  row[kSumMargin] = bl.margin_sum;
  row[kSumLogpChosen] = bl.logps_chosen_sum;
  row[kSumLogpRejected] = bl.logps_rejected_sum;
  for (size_t t = 0; t < bl.term_loss_sum.size(); ++t) row[kSumTerm + t] = bl.term_loss_sum[t];
  for (size_t q = 0; q < P; ++q) {
    row[kSumTokensChosen] += static_cast<double>(pairs[q].len_chosen);
    row[kSumTokensRejected] += static_cast<double>(pairs[q].len_rejected);
    row[kSumLogitChosen] += logit_sums[q];
    row[kSumLogitRejected] += logit_sums[P + q];
  }
  return row;
}

void pair_chunk_grads(const LossConfig& cfg, const std::vector<PairInput>& pairs, int64_t q0, int64_t q1,
                      const std::vector<double>& logp, double normalizer, std::vector<double>& dseq) {
  const auto P = static_cast<int64_t>(pairs.size());
  DPO_ASSERT(!has_batch_terms(cfg), "pair_chunk_grads: aot / aot_unpaired need the whole batch (batch_loss)");
  DPO_ASSERT(0 <= q0 && q0 <= q1 && q1 <= P, "pair_chunk_grads: pairs [q0, q1) out of range");
  DPO_ASSERT(static_cast<int64_t>(logp.size()) == 2 * P && static_cast<int64_t>(dseq.size()) == 2 * P,
             "pair_chunk_grads: logp and dseq must have 2P entries");
  std::vector<PairInput> part(pairs.begin() + q0, pairs.begin() + q1);
  for (int64_t q = q0; q < q1; ++q) {
    part[static_cast<size_t>(q - q0)].policy_chosen = logp[static_cast<size_t>(q)];
    part[static_cast<size_t>(q - q0)].policy_rejected = logp[static_cast<size_t>(P + q)];
  }
  const BatchLoss bl = batch_loss(cfg, part, normalizer);
  for (int64_t q = q0; q < q1; ++q) {
    dseq[static_cast<size_t>(q)] = bl.d_policy_chosen[static_cast<size_t>(q - q0)];
    dseq[static_cast<size_t>(P + q)] = bl.d_policy_rejected[static_cast<size_t>(q - q0)];
  }
}

}  // namespace dpo
