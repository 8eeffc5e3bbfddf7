// The optimizer: AdamW with decoupled weight decay, global-norm gradient clipping and a learning-rate schedule.
//
// Semantics follow what an HF/TRL DPO run does with torch.optim.AdamW + torch.nn.utils.clip_grad_norm_ +
// transformers' schedulers (transformers/optimization.py, the lr_lambda functions LambdaLR evaluates; the same from
// transformers 4.x through 5.x), with the differences listed after the schedule:
//   - The schedule: 0-based optimizer step s of a run of T steps with W = warmup_steps uses lr * f(s), transformers'
//     lr_lambda(current_step = s): LambdaLR is evaluated with current_step 0 for the first update and advanced by
//     scheduler.step() after each one.
//       constant              f = 1 (warmup_steps is not used: transformers' get_constant_schedule)
//       constant_with_warmup  s < W: s / W, else 1                      (get_constant_schedule_with_warmup)
//       linear                s < W: s / W, else max(0, (T - s) / max(1, T - W))  (get_linear_schedule_with_warmup)
//       cosine                s < W: s / W, else max(0, 0.5 (1 + cos(pi p))), p = (s - W) / max(1, T - W)
//                             (get_cosine_schedule_with_warmup, num_cycles 0.5)
//     So with warmup the first update uses lr 0 (AdamW still advances its moments and bias correction, as
//     torch.optim.AdamW does with lr 0) and step W is the first at the full lr. min_lr_ratio = m > 0 maps the decay
//     factor f to m + (1 - m) f (transformers' "cosine_with_min_lr" with min_lr_rate = m; for linear the same map,
//     which transformers has no scheduler for); the warmup still starts at 0.
//   - The gradient norm is accumulated in double (PyTorch: in the gradients' dtype). Clipping multiplies the
//     gradients by min(1, max_grad_norm / (norm + 1e-6)) as clip_grad_norm_ does, but through the kernel's
//     grad_scale: the gradient tensor itself is left untouched.
//   - A non-finite gradient norm (NaN or Inf anywhere in the gradients) skips the step: parameters, moments and
//     the step counter are left as they were and StepInfo reports grad_norm = NaN, skipped = true, skip_reason =
//     NonFiniteGradNorm. Whether to stop, skip the batch or count it is the caller's decision (PyTorch would write
//     NaN into every parameter).
//   - So does an update that would write a non-finite value (skip_reason = NonFiniteUpdate): before updating,
//     the backend's read-only dry run (adamw_dry_run_segments, kernels/adamw.h) computes every new parameter and
//     moment with the update's own element function and reports whether any is NaN or Inf (a learning rate
//     that overflows the weights, v = (1 - beta2) g^2 past the float range, a non-finite weight or moment
//     already in the state). Only when all are finite does the update run, so a rejected step leaves parameters,
//     moments and step_count() bit-identical, at the price of one extra read of the four arrays per step (cheaper
//     than keeping a copy of the state to roll back to; AdamW itself cannot be undone in floating point).
//   - The step runs on the backend's device without the host waiting (step_async, then finish_step): the norm, the
//     clipping factor and the non-finite flag are computed there before any weight is written, and one pass
//     (Backend::adamw_apply_segments) then clips through grad_scale, updates, writes the BF16 compute copy and
//     zeroes the gradient, or writes nothing of the step when the flag is set. What changes per step (lr, bias
//     corrections) reaches the kernels as a small device "step state" the host uploads before the step (one
//     stream-ordered copy, no wait); the outcome comes back in one small device record that finish_step reads
//     once (the step's only wait). The synchronous step() / step_shard() / step_owned() are step_async +
//     finish_step. Arithmetic and results are those of the ops in kernels/adamw.h ("The device step").
//
// Configuration keys (HF TrainingArguments names): learning_rate, adam_beta1, adam_beta2, adam_epsilon,
// weight_decay, max_grad_norm, warmup_steps, lr_scheduler_type, min_lr_ratio.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "runtime/backend.h"

namespace dpo {

// transformers' lr_scheduler_type names; Constant ignores warmup_steps (see the top of this file).
enum class LrSchedule { Constant, ConstantWithWarmup, Cosine, Linear };

// Why AdamW::step left everything as it was (see the top of this file).
enum class SkipReason { None, NonFiniteGradNorm, NonFiniteUpdate };
// "non-finite gradient norm", "non-finite updated weights or moments" ("" for None): for log lines.
const char* skip_reason_text(SkipReason r);

// "constant", "constant_with_warmup", "cosine", "linear". Anything else: InputError naming the key
// lr_scheduler_type, the value and the valid list.
LrSchedule parse_lr_schedule(const std::string& name);
const char* lr_schedule_name(LrSchedule s);

struct OptimConfig {
  double lr = 5e-7;            // learning_rate
  double beta1 = 0.9;          // adam_beta1
  double beta2 = 0.999;        // adam_beta2
  double eps = 1e-8;           // adam_epsilon
  double weight_decay = 0.0;   // weight_decay (decoupled; never applied to biases and LayerNorm parameters)
  double max_grad_norm = 1.0;  // max_grad_norm; <= 0 disables clipping
  int64_t warmup_steps = 0;    // warmup_steps
  LrSchedule schedule = LrSchedule::Constant;  // lr_scheduler_type
  double min_lr_ratio = 0.0;   // min_lr_ratio: the decay ends at min_lr_ratio * lr

  // Throws InputError "<key>: must be ..., got <value>" for: learning_rate not finite or <= 0; adam_beta1 or
  // adam_beta2 outside [0, 1); adam_epsilon not finite or <= 0; weight_decay not finite or < 0; learning_rate *
  // weight_decay >= 1 (the decay factor 1 - lr*wd would not be positive); max_grad_norm NaN or Inf;
  // warmup_steps < 0; min_lr_ratio outside [0, 1].
  void validate() const;
};

// The learning rate of 0-based optimizer step `step` of a run of `total_steps` steps (see the top of this file).
double lr_at(const OptimConfig& cfg, int64_t step, int64_t total_steps);

// sqrt(sum of squares of every gradient), accumulated in double; NaN/Inf propagate.
double global_grad_norm(Backend& backend, const Tensor& grads);

// Where the global gradient norm of an asynchronous AdamW step comes from (AdamW::step_owned_async).
struct AdamWNormSource {
  enum class Kind { OfGrads, ShardSums, Given };
  Kind kind = Kind::OfGrads;
  Tensor grads;                               // OfGrads: the whole gradient [n_params] (the norm is over all of it)
  std::function<void(const Tensor&)> reduce;  // ShardSums: sums a device F64 [1] over ranks in place (collective)
  double norm = 0.0;                          // Given: the norm, computed by the caller on the host
  // The norm of all of `grads`.
  static AdamWNormSource of_grads(const Tensor& grads) { return {Kind::OfGrads, grads, {}, 0.0}; }
  // sqrt of `reduce` applied to the sum of squares of this rank's gradient range (ZeRO-1 with reduce-scatter:
  // the ranks' ranges tile the gradient, so the sum over ranks is the whole gradient's).
  static AdamWNormSource shard_sums(std::function<void(const Tensor&)> reduce) {
    return {Kind::ShardSums, Tensor(), std::move(reduce), 0.0};
  }
  // A norm the host already has (one upload of it; the synchronous step_shard / step_owned).
  static AdamWNormSource given(double norm) { return {Kind::Given, Tensor(), {}, norm}; }
};
// Optional outputs of an asynchronous AdamW step.
struct AdamWStepOutputs {
  // BF16 [shard_end - shard_begin]: the updated parameters of this rank's range rounded to BF16 (what
  // GPT2::sync_params would write), written by the update's own pass; not written when the step is skipped.
  // Needs F32 parameters.
  Tensor compute_copy;
  // Zero: the gradient range the step read is zeroed by the same pass (also when the step is skipped).
  GradAfterStep grad_after = GradAfterStep::Keep;
};

class AdamW {
 public:
  // `specs` must tile [0, n_params) of the flat parameter vector (any order, no gaps, no overlap); params and
  // grads passed to step() are flat [n_params] tensors of `dtype` in that layout. cfg is validated here.
  // The moments m and v are flat [n_params] zero-initialised tensors of `dtype` for F32/F64 parameters and F32 for
  // BF16/F16 ones (the CUDA kernel keeps fp32 moments; the CPU kernels take F32 or F64 only).
  AdamW(Backend& backend, const std::vector<ParamSpec>& specs, int64_t n_params, DType dtype, OptimConfig cfg,
        int64_t total_steps);

  struct StepInfo {
    double grad_norm = 0.0;  // global norm before clipping; NaN when it was not finite (then skipped = true)
    double lr = 0.0;         // the learning rate used (or that would have been used, when skipped)
    bool clipped = false;    // the gradients were scaled down (max_grad_norm / (norm + 1e-6) < 1)
    bool skipped = false;    // nothing was updated and step_count() did not advance (skip_reason says why)
    SkipReason skip_reason = SkipReason::None;
  };

  // Under ZeRO-1 each rank dry-runs only its own range, so the ranks must agree before any of them updates: `f`
  // gets this rank's verdict and returns the verdict of all ranks (NonFinite if any rank's is). It is a collective:
  // every step whose gradient norm is finite calls it exactly once on every rank (also with an empty range), and
  // it is not called when the norm already skipped the step (the norm is the same on every rank). Unset: this
  // rank's verdict is final (one process, or ranks that all hold the same full range).
  // With it, step_async reads the dry run's flag back (one wait inside the step) to call it; prefer
  // set_device_agreement, which keeps the step free of waits.
  using FiniteAgreement = std::function<AdamWCheck(AdamWCheck)>;
  void set_finite_agreement(FiniteAgreement f);
  // The same agreement on the device: `f` gets a device F64 [1] tensor holding this rank's count of non-finite dry
  // runs (0 or 1) and must replace it, in place, by the sum over ranks (e.g. Communicator::allreduce_sum on that
  // tensor). A collective called exactly once per step on every rank, also when the norm already skips the step
  // (the host does not know the norm then). At most one of the two agreements may be set.
  using DeviceAgreement = std::function<void(const Tensor&)>;
  void set_device_agreement(DeviceAgreement f);

  using NormSource = AdamWNormSource;
  using StepOutputs = AdamWStepOutputs;

  // step() without waiting for the device: enqueues the whole step (norm over all of `grads`, clipping, dry run,
  // agreement, update) and returns. finish_step() must be called before the next step_async and before
  // step_count(), m(), v(), set_step() or set_shard() are relied on; it reads the step's record (one copy to the
  // host) and advances step_count() when the step was applied. lr is lr_at(step_count()) as for step().
  void step_async(const Tensor& params, const Tensor& grads, const StepOutputs& out = {});
  // step_owned() without waiting: param_range and grad_shard are this rank's range [shard_end - shard_begin].
  void step_owned_async(const Tensor& param_range, const Tensor& grad_shard, const NormSource& norm,
                        const StepOutputs& out = {});
  StepInfo finish_step();
  bool step_pending() const { return pending_; }
  // The device record of the last step (adamw_record layout, kernels/adamw.h), for callers that read it with their
  // own per-step values instead of finish_step (then call finish_step(record_values) with what they read).
  const Tensor& step_record() const { return record_; }
  StepInfo finish_step(const double* record_values);

  // One optimizer step: lr = lr_at(cfg, step_count(), total_steps); global gradient norm over all of `grads`;
  // clipping; then one adamw_dry_run_segments and, when it (and the agreement, if set) finds every new value
  // finite, one adamw_update_segments call over all parameters (one launch each on the GPU), whose segments are
  // the runs of consecutive ParamSpecs with the same weight_decay flag (weight_decay = cfg.weight_decay or 0), with
  // bias-correction step step_count() + 1; then step_count() += 1.
  // grads is read only. step_async + finish_step.
  StepInfo step(const Tensor& params, const Tensor& grads);

  // ZeRO-1 (docs/distributed.md): from now on this optimizer owns [begin, end) of the flat vector only. Its
  // moments shrink to that range (zero-initialised; call before the first step or restore them after), and
  // step() updates only params[begin, end) (the clipping norm is still that of all of `grads`). The caller
  // gathers the other ranks' ranges afterwards. An empty range (begin == end) is allowed.
  void set_shard(int64_t begin, int64_t end);
  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_end() const { return shard_end_; }

  // step() for a caller that holds only its range's gradient (grad_shard [shard_end - shard_begin]) and has
  // computed the global gradient norm itself (e.g. from an all-reduce of per-shard sums of squares).
  StepInfo step_shard(const Tensor& params, const Tensor& grad_shard, double grad_norm);
  // step_shard for a caller that holds only its range of the parameters too (param_range [shard_end -
  // shard_begin]; e.g. sharded master weights).
  StepInfo step_owned(const Tensor& param_range, const Tensor& grad_shard, double grad_norm);

  int64_t step_count() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  const OptimConfig& config() const { return cfg_; }

  // State for checkpoints: the moments (flat, same layout as the parameters' [shard_begin, shard_end) range; write
  // into them to restore) and the number of steps taken (the next step uses bias correction set_step's value + 1
  // and lr_at(value)).
  const Tensor& m() const { return m_; }
  const Tensor& v() const { return v_; }
  void set_step(int64_t step);

 private:
  Backend* be_;
  OptimConfig cfg_;
  int64_t n_params_;
  DType dtype_;
  int64_t total_steps_;
  int64_t step_ = 0;
  std::vector<AdamWSegment> all_segs_;  // sorted, tiling [0, n_params); neighbours differ in weight_decay
  std::vector<AdamWSegment> segs_;      // all_segs_ cut to the shard, offsets relative to shard_begin_
  int64_t shard_begin_ = 0, shard_end_ = 0;
  DType state_dtype_;
  Tensor m_, v_;
  FiniteAgreement agree_;
  DeviceAgreement device_agree_;
  // The device step's state and record (kernels/adamw.h) and their host staging, allocated once.
  Tensor state_, record_, state_host_, record_host_;
  bool pending_ = false;
  StepInfo pending_info_;
  void enqueue_step(const Tensor& param_range, const Tensor& grad_shard, const NormSource& norm,
                    const StepOutputs& out);
};

}  // namespace dpo
