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

template <class T>
double sum_squares(const T* x, int64_t n);

template <class T>
void scale(T* x, int64_t n, double s);

}  // namespace dpo::cpu
