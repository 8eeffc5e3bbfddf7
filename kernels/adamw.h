// Optimizer kernels: the AdamW update, the sum of squares behind the global gradient norm, and an in-place scale.
//
// adamw_update: one AdamW step over n elements, exactly torch.optim.AdamW (PyTorch 2.x, single-tensor path
// `_single_tensor_adam` with decoupled weight decay, amsgrad=False, maximize=False) in its order of operations:
//     g      = grad * grad_scale                      (grad_scale < 1 when the caller clips; grad is not modified)
//     param *= 1 - lr * weight_decay                  (param.mul_(1 - lr * weight_decay))
//     m      = lerp(m, g, 1 - beta1)                  (exp_avg.lerp_(grad, 1 - beta1), ATen's two-branch lerp)
//     v      = v * beta2 + (1 - beta2) * g * g        (exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2))
//     bc1    = 1 - beta1^step,  bc2 = 1 - beta2^step  (step is 1-based: the first update has step = 1)
//     denom  = sqrt(v) / sqrt(bc2) + eps              ((exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps))
//     param += (-lr / bc1) * m / denom                (param.addcdiv_(exp_avg, denom, value=-step_size))
//   i.e. param -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * param_old) with mhat = m/bc1, vhat = v/bc2
//   (decoupled weight decay, Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019).
//   param, m, v are read and written in place (+= style state, not "="); grad is read only. No two of param, grad,
//   m, v may alias. Elementwise, so the result does not depend on the thread count.
//   Precision: the CPU twin keeps m and v in the parameters' type T and does each element's arithmetic in T, as
//   ATen does (its opmath type is float for float and double for double): the step's scalars (1 - lr * wd,
//   -lr / bc1, sqrt(bc2), 1 - beta1, beta2, 1 - beta2, eps, grad_scale) are computed in double, as the Python
//   optimizer computes them, and converted to T once; then every operation above is one rounding in T, in the order
//   written, with no fused multiply-add (so a float run is the same on every x86-64 CPU; it differs from PyTorch's
//   float AdamW by float round-off only where ATen's vectorised kernels fuse a multiply-add, as its lerp does). The CUDA kernel keeps m and v in fp32
//   whatever the parameters' type, with fp32 arithmetic; it shares AdamWParams.
//
// adamw_update_segments: the same step over the segments segs[0, n_segs) of flat arrays of n elements, the
//   multi-tensor form (one call, one CUDA launch, for all of a model's parameters). Segment k covers elements
//   [offset, offset + numel) and is updated with p.weight_decay when its weight_decay flag is set, with 0 otherwise
//   (every other field of p is shared). Elements outside every segment are not read or written. Segments must have
//   offset >= 0, numel >= 0, offset + numel <= n, and be sorted by offset without overlap (gaps and empty segments
//   are allowed); anything else throws dpo::Error before any element is written. The result is bitwise that of one
//   adamw_update per segment on the same arrays (the op is elementwise), on the CPU and, for the CUDA kernels,
//   between cuda::adamw_update_segments and cuda::adamw_update.
//
// adamw_dry_run_segments: the numerical guard of adamw_update_segments, read only. It computes every value the
//   update with the same arguments would write (param, m and v of every segment element, rounded to T exactly as the
//   update rounds them: the two call one compiled block function, so the values are bitwise the same) and returns
//   AdamWCheck::NonFinite when any of them would be NaN or +-Inf, AllFinite otherwise. Nothing is written. A
//   non-finite input (param, grad, m or v) yields a non-finite output, and so do overflows: lr * update beyond the
//   type's range, v = (1 - beta2) * g^2 past it, g * grad_scale or any intermediate past it. The flag is an
//   OR over elements, so it does not depend on the thread count.
//   Why a separate read-only pass and not a flag from the update itself: a step that produced a non-finite value
//   must leave param, m and v bit-identical to before it, and AdamW cannot be undone in floating point; keeping a
//   copy of the three arrays would cost 3 writes + 3 reads per element against this pass's 4 reads, and an
//   element-wise "write only if finite" would leave the other elements of a rejected step updated. The caller runs
//   the dry run, decides (under ZeRO-1, with the other ranks, whose ranges differ), then runs the update.
//
// The device step (AdamW::step_async, train/optim.h): the same AdamW step with every per-step decision taken on the
//   device, so that the host enqueues a whole optimizer step without waiting and reads one small record after it.
//   Two small F64 arrays carry the step:
//     state  [adamw_state::kWidth]   what changes per step (lr, the bias corrections as the step's scalars) and the
//                                    clipping threshold, computed on the host in double by adamw_step_state (the
//                                    same doubles AdamWParams gives the ops above) and uploaded before the step;
//     record [adamw_record::kWidth]  the step's outcome, written on the device, read by the host once per step.
//   In order, per step:
//     sum of squares  record[kSumSquares] = sum_i grad[i]^2 (sum_squares' value and order; the caller may sum it
//                     over ranks in place);
//     adamw_prepare   norm = sqrt(record[kSumSquares]) (AdamWNormFrom::SumOfSquares) or record[kNorm] as the
//                     caller wrote it (AdamWNormFrom::Norm); a NaN/Inf norm sets kNormNonFinite (kNorm = NaN);
//                     otherwise grad_scale = max_grad_norm / (norm + 1e-6) when max_grad_norm > 0 and that is < 1
//                     (kClipped = 1), else 1 (torch.nn.utils.clip_grad_norm_); kNonFiniteRanks = 0. Double
//                     arithmetic, one IEEE operation at a time (no fused multiply-add), so both backends compute
//                     the same scale from the same norm.
//     adamw_check_segments  the dry run above, with grad_scale from the record, when the norm is finite: sets
//                     record[kNonFiniteRanks] to 1 when any new value would be non-finite (nothing else written;
//                     nothing read when the norm is not finite). Under data parallelism the ranks then sum
//                     kNonFiniteRanks in place, so that all agree.
//     adamw_apply_segments  ONE pass: when kNormNonFinite and kNonFiniteRanks are both 0, the update above (bitwise
//                     adamw_update_segments with the record's grad_scale) and, when a compute copy is given, copy[i]
//                     = bf16(param[i]) for every updated element (round to nearest even; the rounding of convert(),
//                     i.e. GPT2::sync_params); otherwise param, m, v and the copy are not written. With
//                     GradAfterStep::Zero the pass also sets grad[i] = 0 for every segment element, in both cases
//                     (the gradient was consumed either way).
//   No op here returns a value to the host or allocates after its first call: the host learns the outcome from the
//   record (skipped when kNormNonFinite or kNonFiniteRanks is non-zero).
//
// sum_squares: sum_i x[i]^2 accumulated in double. The input is cut into fixed chunks of kSumSquaresChunk
//   elements; each chunk is summed in a fixed order and the chunk sums are added in index order, so the result is
//   bitwise the same for every thread count. NaN/Inf propagate (the caller decides what a non-finite norm means).
//
// scale: x[i] *= s (in place), computed in double and rounded to T.
#pragma once
#include <cstdint>

namespace dpo {

// Hyper-parameters of one AdamW update (shared by the CPU twin and the CUDA kernel).
struct AdamWParams {
  double lr = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double grad_scale = 1.0;  // grads are multiplied by this first (gradient clipping); grad itself is not modified
  int64_t step = 1;         // 1-based step number, for the bias corrections
};

// What adamw_dry_run_segments found: every value the update would write is finite, or at least one is not.
enum class AdamWCheck { AllFinite, NonFinite };

// One segment of a flat parameter array for adamw_update_segments.
struct AdamWSegment {
  int64_t offset = 0;         // first element
  int64_t numel = 0;          // number of elements (0: an empty segment, skipped)
  bool weight_decay = false;  // true: AdamWParams::weight_decay applies to this segment; false: no decay
};

// The step state (F64 [kWidth]); the host fills it with adamw_step_state. Decay factors, step size and bias
// correction are AdamWParams' scalars computed in double exactly as the ops above compute them.
namespace adamw_state {
constexpr int kLr = 0;            // the step's learning rate (for the record of what ran; the kernels use the next)
constexpr int kStep = 1;          // the 1-based bias-correction step, as a double (exact below 2^53)
constexpr int kDecay = 2;         // 1 - lr * weight_decay   (segments flagged weight_decay)
constexpr int kDecayOff = 3;      // 1 - lr * 0              (the other segments)
constexpr int kNegStepSize = 4;   // -(lr / (1 - beta1^step))
constexpr int kBc2Sqrt = 5;       // sqrt(1 - beta2^step)
constexpr int kW1 = 6;            // 1 - beta1 (the lerp weight)
constexpr int kOneMinusW1 = 7;    // 1 - (1 - beta1) (the CUDA kernel's second lerp branch)
constexpr int kBeta2 = 8;
constexpr int kW2 = 9;            // 1 - beta2
constexpr int kEps = 10;
constexpr int kMaxGradNorm = 11;  // <= 0: no clipping
constexpr int kWidth = 12;
}  // namespace adamw_state

// The step record (F64 [kWidth]), written on the device by the device step's ops.
namespace adamw_record {
constexpr int kSumSquares = 0;     // sum of the squared gradient (input of adamw_prepare with SumOfSquares)
constexpr int kNorm = 1;           // global gradient norm before clipping; NaN when not finite
constexpr int kGradScale = 2;      // the factor the update multiplies gradients by (1 when not clipped)
constexpr int kClipped = 3;        // 1 when grad_scale < 1
constexpr int kNormNonFinite = 4;  // 1 when the norm was NaN or Inf (the step is skipped)
constexpr int kNonFiniteRanks = 5; // ranks whose dry run found a non-finite new value (> 0: the step is skipped)
constexpr int kWidth = 6;
}  // namespace adamw_record

// Where adamw_prepare takes the norm from.
enum class AdamWNormFrom { SumOfSquares, Norm };
// What adamw_apply_segments does with the gradient it read.
enum class GradAfterStep { Keep, Zero };

// state[0, adamw_state::kWidth) for AdamWParams p (p.grad_scale is not part of the state) and the clipping
// threshold. Host code; the one place the step's scalars are computed.
void adamw_step_state(const AdamWParams& p, double max_grad_norm, double* state);

// Throws dpo::Error naming `fn` and the first bad segment unless segs[0, n_segs) are valid segments of an array of
// n elements (see adamw_update_segments above). Shared by the CPU twin and the CUDA launcher.
void check_adamw_segments(const AdamWSegment* segs, int64_t n_segs, int64_t n, const char* fn);

}  // namespace dpo

namespace dpo::cpu {

constexpr int64_t kSumSquaresChunk = 4096;

template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWParams& p);

template <class T>
void adamw_update_segments(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWSegment* segs, int64_t n_segs,
                           const AdamWParams& p);

template <class T>
AdamWCheck adamw_dry_run_segments(const T* param, const T* grad, const T* m, const T* v, int64_t n,
                                  const AdamWSegment* segs, int64_t n_segs, const AdamWParams& p);

// The device step's ops on the host (see "The device step" above). record and state as described there.
void adamw_prepare(double* record, const double* state, AdamWNormFrom from);

template <class T>
void adamw_check_segments(const T* param, const T* grad, const T* m, const T* v, int64_t n, const AdamWSegment* segs,
                          int64_t n_segs, const double* state, double* record);

// copy: n bf16 values (raw uint16_t bits) or nullptr.
template <class T>
void adamw_apply_segments(T* param, T* grad, T* m, T* v, uint16_t* copy, int64_t n, const AdamWSegment* segs,
                          int64_t n_segs, const double* state, const double* record, GradAfterStep after);

template <class T>
double sum_squares(const T* x, int64_t n);

template <class T>
void scale(T* x, int64_t n, double s);

}  // namespace dpo::cpu
