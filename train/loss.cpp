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
    {"sigmoid", LossType::Sigmoid}, {"ipo", LossType::Ipo},   {"hinge", LossType::Hinge},
    {"robust", LossType::Robust},   {"cdpo", LossType::Cdpo}, {"sft", LossType::Sft},
    {"dpo", LossType::Sigmoid},
};
constexpr int kNumCanonical = 6;

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

// Value and derivative w.r.t. its scalar argument of one loss term.
struct Scalar {
  double value;
  double deriv;
};

// Evaluates the pair without validating cfg. term_losses, when non-null, receives the unweighted term losses in
// cfg.terms order.
PairOutput evaluate(const LossConfig& cfg, const PairInput& in, double* term_losses) {
  const double ref_c = cfg.reference_free ? 0.0 : in.ref_chosen;
  const double ref_r = cfg.reference_free ? 0.0 : in.ref_rejected;
  const double c = in.policy_chosen - ref_c;
  const double r = in.policy_rejected - ref_r;
  const double delta = c - r;  // dDelta/dpolicy_chosen = 1, dDelta/dpolicy_rejected = -1
  const double beta = cfg.beta;
  const double eps = cfg.label_smoothing;

  PairOutput out;
  out.reward_chosen = beta * c;
  out.reward_rejected = beta * r;

  for (size_t i = 0; i < cfg.terms.size(); ++i) {
    const LossTerm& term = cfg.terms[i];
    double value = 0, d_c = 0, d_r = 0;  // term loss and its derivatives w.r.t. policy_chosen / policy_rejected
    switch (term.type) {
      case LossType::Sigmoid: {
        double offset = 0;
        if (cfg.odpo_alpha > 0) {
          if (!in.has_scores)
            throw InputError("ODPO (odpo_alpha > 0) needs per-pair scores; this pair has none");
          const double gap = in.score_chosen - in.score_rejected;
          if (!(gap > 0) || !std::isfinite(gap))
            throw InputError("ODPO needs score_chosen > score_rejected, got score_chosen " + fmt(in.score_chosen) +
                             ", score_rejected " + fmt(in.score_rejected));
          offset = cfg.odpo_alpha * std::log(gap);
        }
        const double z = beta * delta - offset;
        value = softplus(-z);              // -log s(z)
        const double dz = -sigmoid(-z);    // d/dz
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Cdpo: {
        const double z = beta * delta;
        value = (1 - eps) * softplus(-z) + eps * softplus(z);
        const double dz = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z);
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Robust: {
        const double z = beta * delta;
        const double k = 1.0 / (1 - 2 * eps);
        value = ((1 - eps) * softplus(-z) - eps * softplus(z)) * k;
        const double dz = (-(1 - eps) * sigmoid(-z) - eps * sigmoid(z)) * k;
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Ipo: {
        double dc_dp = 1, dr_dp = 1;  // derivative of c (r) w.r.t. the policy log-prob
        if (cfg.ipo_length_normalize) {
          if (in.len_chosen <= 0 || in.len_rejected <= 0)
            throw InputError("length-normalised IPO needs completion lengths > 0, got len_chosen " +
                             std::to_string(in.len_chosen) + ", len_rejected " + std::to_string(in.len_rejected));
          dc_dp = 1.0 / static_cast<double>(in.len_chosen);
          dr_dp = 1.0 / static_cast<double>(in.len_rejected);
        }
        const double d = c * dc_dp - r * dr_dp - 1.0 / (2 * beta);
        value = d * d;
        d_c = 2 * d * dc_dp;
        d_r = -2 * d * dr_dp;
        break;
      }
      case LossType::Hinge: {
        const double z = beta * delta;
        value = std::max(0.0, 1 - z);
        const double dz = z < 1 ? -1.0 : 0.0;  // subgradient 0 at the kink z == 1
        d_c = dz * beta;
        d_r = -dz * beta;
        break;
      }
      case LossType::Sft: {
        if (in.len_chosen <= 0)
          throw InputError("sft loss needs a chosen completion length > 0, got " + std::to_string(in.len_chosen));
        const double inv = 1.0 / static_cast<double>(in.len_chosen);
        value = -in.policy_chosen * inv;
        d_c = -inv;
        d_r = 0;
        break;
      }
    }
    if (term_losses) term_losses[i] = value;
    out.loss += term.weight * value;
    out.d_policy_chosen += term.weight * d_c;
    out.d_policy_rejected += term.weight * d_r;
  }
  return out;
}

}  // namespace

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }

double log_sigmoid(double x) { return -softplus(-x); }

double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

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
  if (label_smoothing > 0 && !has_term(*this, LossType::Robust) && !has_term(*this, LossType::Cdpo))
    input_error(where, "label_smoothing",
                "is " + fmt(label_smoothing) + " but only the robust and cdpo losses use it (TRL's smoothed "
                "'sigmoid' is 'cdpo' here)");
  if (!std::isfinite(odpo_alpha) || !(odpo_alpha >= 0))
    input_error(where, "odpo_alpha", "must be finite and >= 0, got " + fmt(odpo_alpha));
  if (odpo_alpha > 0 && !has_term(*this, LossType::Sigmoid))
    input_error(where, "odpo_alpha", "is " + fmt(odpo_alpha) + " but the ODPO offset applies only to the sigmoid loss, "
                                     "which is not in loss_type");
}

PairOutput pair_loss(const LossConfig& cfg, const PairInput& in) {
  cfg.validate();
  return evaluate(cfg, in, nullptr);
}

BatchLoss batch_loss(const LossConfig& cfg, const std::vector<PairInput>& pairs, double normalizer) {
  cfg.validate();
  DPO_ASSERT(std::isfinite(normalizer) && normalizer > 0, "batch_loss: normalizer must be finite and > 0, got " + fmt(normalizer));
  BatchLoss b;
  b.pairs = static_cast<int64_t>(pairs.size());
  b.term_loss_sum.assign(cfg.terms.size(), 0.0);
  b.d_policy_chosen.resize(pairs.size());
  b.d_policy_rejected.resize(pairs.size());
  std::vector<double> terms(cfg.terms.size());
  for (size_t i = 0; i < pairs.size(); ++i) {
    const PairOutput o = evaluate(cfg, pairs[i], terms.data());
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
  return b;
}

void pair_chunk_grads(const LossConfig& cfg, const std::vector<PairInput>& pairs, int64_t q0, int64_t q1,
                      const std::vector<double>& logp, double normalizer, std::vector<double>& dseq) {
  const auto P = static_cast<int64_t>(pairs.size());
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
