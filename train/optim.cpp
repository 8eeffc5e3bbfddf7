#include "train/optim.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <sstream>

namespace dpo {

namespace {

std::string num(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

[[noreturn]] void bad(const char* key, const std::string& what, const std::string& got) {
  throw InputError(std::string(key) + ": must be " + what + ", got " + got);
}

}  // namespace

LrSchedule parse_lr_schedule(const std::string& name) {
  if (name == "constant") return LrSchedule::Constant;
  if (name == "constant_with_warmup") return LrSchedule::ConstantWithWarmup;
  if (name == "cosine") return LrSchedule::Cosine;
  if (name == "linear") return LrSchedule::Linear;
  throw InputError("lr_scheduler_type: unknown value '" + name +
                   "' (valid: constant, constant_with_warmup, cosine, linear)");
}

const char* lr_schedule_name(LrSchedule s) {
  switch (s) {
    case LrSchedule::Constant: return "constant";
    case LrSchedule::ConstantWithWarmup: return "constant_with_warmup";
    case LrSchedule::Cosine: return "cosine";
    case LrSchedule::Linear: return "linear";
  }
  return "?";
}

const char* skip_reason_text(SkipReason r) {
  switch (r) {
    case SkipReason::None: return "";
    case SkipReason::NonFiniteGradNorm: return "non-finite gradient norm";
    case SkipReason::NonFiniteUpdate: return "non-finite updated weights or moments";
  }
  return "?";
}

void OptimConfig::validate() const {
  if (!std::isfinite(lr) || !(lr > 0)) bad("learning_rate", "a finite number > 0", num(lr));
  if (!(beta1 >= 0 && beta1 < 1)) bad("adam_beta1", "in [0, 1)", num(beta1));
  if (!(beta2 >= 0 && beta2 < 1)) bad("adam_beta2", "in [0, 1)", num(beta2));
  if (!std::isfinite(eps) || !(eps > 0)) bad("adam_epsilon", "a finite number > 0", num(eps));
  if (!std::isfinite(weight_decay) || !(weight_decay >= 0)) bad("weight_decay", "a finite number >= 0", num(weight_decay));
  if (!(lr * weight_decay < 1))
    bad("weight_decay", "such that learning_rate * weight_decay < 1 (learning_rate " + num(lr) + ")",
        num(weight_decay));
  if (!std::isfinite(max_grad_norm)) bad("max_grad_norm", "a finite number (<= 0 disables clipping)", num(max_grad_norm));
  if (warmup_steps < 0) bad("warmup_steps", ">= 0", std::to_string(warmup_steps));
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1)) bad("min_lr_ratio", "in [0, 1]", num(min_lr_ratio));
}

double lr_at(const OptimConfig& cfg, int64_t step, int64_t total_steps) {
  DPO_ASSERT(step >= 0, "lr_at: step must be >= 0, got " + std::to_string(step));
  DPO_ASSERT(total_steps >= 0, "lr_at: total_steps must be >= 0, got " + std::to_string(total_steps));
  // transformers' lr_lambda(current_step = step), written out in optim.h; the same float arithmetic order.
  if (cfg.schedule == LrSchedule::Constant) return cfg.lr;
  const int64_t W = cfg.warmup_steps;
  if (step < W) return cfg.lr * (static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, W)));
  if (cfg.schedule == LrSchedule::ConstantWithWarmup) return cfg.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - W));
  double f;
  if (cfg.schedule == LrSchedule::Cosine) {
    const double progress = static_cast<double>(step - W) / span;
    f = std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
  } else {
    f = std::max(0.0, static_cast<double>(total_steps - step) / span);
  }
  // cosine_with_min_lr's map (exact for m = 0: f * 1 + 0 == f).
  const double m = cfg.min_lr_ratio;
  return cfg.lr * std::max(0.0, f * (1 - m) + m);
}

double global_grad_norm(Backend& backend, const Tensor& grads) { return std::sqrt(backend.sum_squares(grads)); }

AdamW::AdamW(Backend& backend, const std::vector<ParamSpec>& specs, int64_t n_params, DType dtype, OptimConfig cfg,
             int64_t total_steps)
    : be_(&backend), cfg_(cfg), n_params_(n_params), dtype_(dtype), total_steps_(total_steps) {
  cfg_.validate();
  DPO_ASSERT(n_params > 0, "AdamW: n_params must be positive, got " + std::to_string(n_params));
  DPO_ASSERT(total_steps >= 0, "AdamW: total_steps must be >= 0, got " + std::to_string(total_steps));
  DPO_ASSERT(dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16 || dtype == DType::F16,
             std::string("AdamW: parameters must be floating, got ") + dtype_name(dtype));

  // Check that the segments tile [0, n_params), then merge neighbours with the same decay flag (fewer entries in
  // the backend's segment table; the update is elementwise, so merging changes no result).
  std::vector<const ParamSpec*> sorted;
  sorted.reserve(specs.size());
  for (const ParamSpec& s : specs) sorted.push_back(&s);
  std::sort(sorted.begin(), sorted.end(), [](const ParamSpec* a, const ParamSpec* b) { return a->offset < b->offset; });
  int64_t at = 0;
  for (const ParamSpec* s : sorted) {
    int64_t n = 1;
    for (int64_t d : s->shape) n *= d;
    DPO_ASSERT(s->offset == at, "AdamW: parameter '" + s->name + "' starts at " + std::to_string(s->offset) +
                                    ", expected " + std::to_string(at) + " (segments must tile the parameters)");
    if (n == 0) continue;
    if (!all_segs_.empty() && all_segs_.back().weight_decay == s->weight_decay) all_segs_.back().numel += n;
    else all_segs_.push_back({s->offset, n, s->weight_decay});
    at += n;
  }
  DPO_ASSERT(at == n_params, "AdamW: segments cover " + std::to_string(at) + " of " + std::to_string(n_params) +
                                 " parameters");

  // Half-precision parameters would keep fp32 moments (no CPU kernel takes them today; the backend says so).
  state_dtype_ = (dtype == DType::F32 || dtype == DType::F64) ? dtype : DType::F32;
  set_shard(0, n_params);
}

void AdamW::set_shard(int64_t begin, int64_t end) {
  DPO_ASSERT(!pending_, "AdamW::set_shard: a step is pending (call finish_step first)");
  DPO_ASSERT(0 <= begin && begin <= end && end <= n_params_,
             "AdamW::set_shard: [" + std::to_string(begin) + ", " + std::to_string(end) + ") is not within [0, " +
                 std::to_string(n_params_) + ")");
  shard_begin_ = begin;
  shard_end_ = end;
  segs_.clear();
  for (const AdamWSegment& s : all_segs_) {
    const int64_t lo = std::max(s.offset, begin), hi = std::min(s.offset + s.numel, end);
    if (lo < hi) segs_.push_back({lo - begin, hi - lo, s.weight_decay});
  }
  m_ = be_->zeros({end - begin}, state_dtype_);
  v_ = be_->zeros({end - begin}, state_dtype_);
}

void AdamW::set_step(int64_t step) {
  DPO_ASSERT(step >= 0, "AdamW::set_step: step must be >= 0, got " + std::to_string(step));
  DPO_ASSERT(!pending_, "AdamW::set_step: a step is pending (call finish_step first)");
  step_ = step;
}

void AdamW::set_finite_agreement(FiniteAgreement f) {
  DPO_ASSERT(!f || !device_agree_, "AdamW: a device agreement is already set (at most one agreement)");
  agree_ = std::move(f);
}

void AdamW::set_device_agreement(DeviceAgreement f) {
  DPO_ASSERT(!f || !agree_, "AdamW: a host agreement is already set (at most one agreement)");
  device_agree_ = std::move(f);
}

AdamW::StepInfo AdamW::step(const Tensor& params, const Tensor& grads) {
  step_async(params, grads);
  return finish_step();
}

AdamW::StepInfo AdamW::step_shard(const Tensor& params, const Tensor& grad_shard, double norm) {
  check_shape(params, {n_params_}, "AdamW params");
  return step_owned(params.view(shard_begin_, {shard_end_ - shard_begin_}), grad_shard, norm);
}

AdamW::StepInfo AdamW::step_owned(const Tensor& param_range, const Tensor& grad_shard, double norm) {
  step_owned_async(param_range, grad_shard, NormSource::given(norm));
  return finish_step();
}

void AdamW::step_async(const Tensor& params, const Tensor& grads, const StepOutputs& out) {
  check_shape(params, {n_params_}, "AdamW params");
  check_shape(grads, {n_params_}, "AdamW grads");
  check_dtype(grads, dtype_, "AdamW grads");
  const int64_t len = shard_end_ - shard_begin_;
  enqueue_step(params.view(shard_begin_, {len}), grads.view(shard_begin_, {len}), NormSource::of_grads(grads), out);
}

void AdamW::step_owned_async(const Tensor& param_range, const Tensor& grad_shard, const NormSource& norm,
                             const StepOutputs& out) {
  enqueue_step(param_range, grad_shard, norm, out);
}

void AdamW::enqueue_step(const Tensor& param_range, const Tensor& grad_shard, const NormSource& norm,
                         const StepOutputs& out) {
  namespace R = adamw_record;
  DPO_ASSERT(!pending_, "AdamW: step_async called while the previous step is pending (call finish_step first)");
  const int64_t len = shard_end_ - shard_begin_;
  check_shape(param_range, {len}, "AdamW params (this shard's range)");
  check_dtype(param_range, dtype_, "AdamW params");
  check_shape(grad_shard, {len}, "AdamW grad shard");
  check_dtype(grad_shard, dtype_, "AdamW grad shard");
  if (norm.kind == NormSource::Kind::OfGrads) {
    check_shape(norm.grads, {n_params_}, "AdamW grads (for the norm)");
    check_dtype(norm.grads, dtype_, "AdamW grads (for the norm)");
  }
  DPO_ASSERT(norm.kind != NormSource::Kind::ShardSums || norm.reduce,
             "AdamW: NormSource::shard_sums needs a reduction over the ranks");
  if (out.compute_copy.defined()) {
    check_shape(out.compute_copy, {len}, "AdamW compute copy");
    check_dtype(out.compute_copy, DType::BF16, "AdamW compute copy");
  }
  if (!state_.defined()) {  // once: nothing of the step allocates after the first one
    state_ = be_->empty({adamw_state::kWidth}, DType::F64);
    record_ = be_->zeros({R::kWidth}, DType::F64);
    state_host_ = Tensor::host({adamw_state::kWidth}, DType::F64);
    record_host_ = Tensor::host({R::kWidth}, DType::F64);
  }

  // The step state: this step's lr and bias corrections, as the ops' scalars (kernels/adamw.h).
  StepInfo info;
  info.lr = lr_at(cfg_, step_, total_steps_);
  AdamWParams p;
  p.lr = info.lr;
  p.beta1 = cfg_.beta1;
  p.beta2 = cfg_.beta2;
  p.eps = cfg_.eps;
  p.weight_decay = cfg_.weight_decay;  // applied to the segments flagged weight_decay, 0 elsewhere
  p.step = step_ + 1;
  adamw_step_state(p, cfg_.max_grad_norm, state_host_.data<double>());
  be_->copy_from_host(state_, state_host_);

  // The norm, on the device.
  const Tensor ss = record_.view(R::kSumSquares, {1});
  switch (norm.kind) {
    case NormSource::Kind::OfGrads:
      be_->sum_squares_into(ss, norm.grads);
      be_->adamw_prepare(record_, state_, AdamWNormFrom::SumOfSquares);
      break;
    case NormSource::Kind::ShardSums:
      be_->sum_squares_into(ss, grad_shard);
      norm.reduce(ss);
      be_->adamw_prepare(record_, state_, AdamWNormFrom::SumOfSquares);
      break;
    case NormSource::Kind::Given: {
      double* h = record_host_.data<double>();
      std::fill(h, h + R::kWidth, 0.0);
      h[R::kNorm] = norm.norm;
      be_->copy_from_host(record_, record_host_);
      be_->adamw_prepare(record_, state_, AdamWNormFrom::Norm);
      break;
    }
  }

  // The guard: nothing is written unless every new value of every rank is finite (see the top of optim.h).
  if (len > 0) be_->adamw_check_segments(record_, state_, param_range, grad_shard, m_, v_, segs_);
  if (device_agree_) {
    device_agree_(record_.view(R::kNonFiniteRanks, {1}));
  } else if (agree_) {
    // The host agreement: the verdict must come back first (one wait), and is not asked for when the norm
    // already skips the step (the norm is the same on every rank).
    be_->copy_to_host(record_host_, record_);
    const double* h = record_host_.data<double>();
    if (h[R::kNormNonFinite] == 0.0) {
      const AdamWCheck mine = h[R::kNonFiniteRanks] != 0.0 ? AdamWCheck::NonFinite : AdamWCheck::AllFinite;
      const double all = agree_(mine) == AdamWCheck::NonFinite ? 1.0 : 0.0;
      if (all != h[R::kNonFiniteRanks]) {
        Tensor one = record_host_.view(R::kNonFiniteRanks, {1});
        one.data<double>()[0] = all;
        be_->copy_from_host(record_.view(R::kNonFiniteRanks, {1}), one);
      }
    }
  }
  if (len > 0)
    be_->adamw_apply_segments(record_, state_, param_range, grad_shard, m_, v_, segs_, out.compute_copy,
                              out.grad_after);
  pending_ = true;
  pending_info_ = info;
}

AdamW::StepInfo AdamW::finish_step() {
  DPO_ASSERT(pending_, "AdamW::finish_step: no step is pending");
  be_->copy_to_host(record_host_, record_);
  return finish_step(record_host_.data<double>());
}

AdamW::StepInfo AdamW::finish_step(const double* rec) {
  namespace R = adamw_record;
  DPO_ASSERT(pending_, "AdamW::finish_step: no step is pending");
  pending_ = false;
  StepInfo info = pending_info_;
  if (rec[R::kNormNonFinite] != 0.0) {
    info.grad_norm = std::numeric_limits<double>::quiet_NaN();
    info.skipped = true;
    info.skip_reason = SkipReason::NonFiniteGradNorm;
    return info;
  }
  info.grad_norm = rec[R::kNorm];
  info.clipped = rec[R::kClipped] != 0.0;
  if (rec[R::kNonFiniteRanks] != 0.0) {
    info.skipped = true;
    info.skip_reason = SkipReason::NonFiniteUpdate;
    return info;
  }
  ++step_;
  return info;
}

}  // namespace dpo
