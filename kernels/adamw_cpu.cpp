#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "runtime/error.h"

namespace dpo {

// dpo::Error is thrown directly: dpo_kernels_cpu does not link dpo_runtime (no DPO_ASSERT here).
void check_adamw_segments(const AdamWSegment* segs, int64_t n_segs, int64_t n, const char* fn) {
  const std::string f(fn);
  if (n < 0) throw Error(f + ": the array size n must be >= 0, got " + std::to_string(n));
  if (n_segs < 0) throw Error(f + ": the segment count must be >= 0, got " + std::to_string(n_segs));
  if (n_segs > 0 && segs == nullptr) throw Error(f + ": " + std::to_string(n_segs) + " segments but no table");
  int64_t end = 0;  // end of the previous segment
  for (int64_t k = 0; k < n_segs; ++k) {
    const AdamWSegment& s = segs[k];
    const std::string which = f + ": segment " + std::to_string(k) + " (offset " + std::to_string(s.offset) +
                              ", numel " + std::to_string(s.numel) + ")";
    if (s.offset < 0 || s.numel < 0) throw Error(which + " has a negative offset or size");
    if (s.offset > n - s.numel) throw Error(which + " ends past the array's " + std::to_string(n) + " elements");
    if (s.offset < end)
      throw Error(which + " starts before the end of segment " + std::to_string(k - 1) + " (" + std::to_string(end) +
                  "): segments must be sorted by offset and must not overlap");
    end = s.offset + s.numel;
  }
}

void adamw_step_state(const AdamWParams& p, double max_grad_norm, double* st) {
  namespace S = adamw_state;
  const double bias_correction1 = 1.0 - std::pow(p.beta1, static_cast<double>(p.step));
  const double bias_correction2 = 1.0 - std::pow(p.beta2, static_cast<double>(p.step));
  const double w1 = 1.0 - p.beta1;
  st[S::kLr] = p.lr;
  st[S::kStep] = static_cast<double>(p.step);
  st[S::kDecay] = 1.0 - p.lr * p.weight_decay;
  st[S::kDecayOff] = 1.0 - p.lr * 0.0;
  st[S::kNegStepSize] = -(p.lr / bias_correction1);
  st[S::kBc2Sqrt] = std::sqrt(bias_correction2);
  st[S::kW1] = w1;
  st[S::kOneMinusW1] = 1.0 - w1;
  st[S::kBeta2] = p.beta2;
  st[S::kW2] = 1.0 - p.beta2;
  st[S::kEps] = p.eps;
  st[S::kMaxGradNorm] = max_grad_norm;
}

}  // namespace dpo

namespace dpo::cpu {

namespace {

// The scalars of one step: the step state's doubles (adamw_step_state computes them as torch.optim.AdamW does in
// Python, _single_tensor_adam), converted to the arithmetic type A once, as ATen converts a Python scalar to a float
// tensor's opmath type (float for float, double for double) before the elementwise kernel runs. `decayed` picks the
// weight-decay factor of a segment flagged weight_decay.
template <class A>
struct Scalars {
  A decay, neg_step_size, bias_correction2_sqrt, w1, one, w2, beta2, eps, gs;
  bool small_w1;  // ATen's lerp branch, uniform over the tensor: |1 - beta1| < 0.5
  Scalars(const double* st, double grad_scale, bool decayed) {
    namespace S = adamw_state;
    decay = static_cast<A>(decayed ? st[S::kDecay] : st[S::kDecayOff]);
    neg_step_size = static_cast<A>(st[S::kNegStepSize]);
    bias_correction2_sqrt = static_cast<A>(st[S::kBc2Sqrt]);
    w1 = static_cast<A>(st[S::kW1]);
    one = A(1);
    w2 = static_cast<A>(st[S::kW2]);
    beta2 = static_cast<A>(st[S::kBeta2]);
    eps = static_cast<A>(st[S::kEps]);
    gs = static_cast<A>(grad_scale);
    small_w1 = std::fabs(st[S::kW1]) < 0.5;
  }
  explicit Scalars(const AdamWParams& p) : Scalars(state_of(p).data(), p.grad_scale, true) {}
  static std::array<double, adamw_state::kWidth> state_of(const AdamWParams& p) {
    std::array<double, adamw_state::kWidth> st{};
    adamw_step_state(p, 0.0, st.data());
    return st;
  }
};

// Elements per block: the block's new values go to three stack buffers of this size (in L1) before they are
// stored (update) or tested (dry run).
constexpr int64_t kAdamWBlock = 512;

// The new values of elements [0, n) (n <= kAdamWBlock), in T's own arithmetic (float for float, double for
// double), in torch.optim.AdamW's order of operations (kernels/adamw.h). The update and the dry run both call this
// one function, never inlined, so the values the dry run tests are bitwise those the update stores: one piece of
// machine code computes them. The outputs are distinct buffers (restrict), so the loop vectorises; the lerp branch
// is uniform, so each branch is its own loop. No fused multiply-add: the baseline x86-64 target has none, and the
// file does not enable one, so every operation is one IEEE rounding whatever the CPU.
template <class T>
__attribute__((noinline)) void adamw_block(const T* __restrict param, const T* __restrict grad,
                                           const T* __restrict m, const T* __restrict v, int64_t n,
                                           const Scalars<T>& s, T* __restrict x_out, T* __restrict m_out,
                                           T* __restrict v_out) {
  const T decay = s.decay, nss = s.neg_step_size, bc2s = s.bias_correction2_sqrt, w1 = s.w1, one = s.one,
          w2 = s.w2, beta2 = s.beta2, eps = s.eps, gs = s.gs;
  // ATen's lerp (aten/src/ATen/native/Lerp.h): two branches so that weight 0 and weight 1 both give exact ends.
  if (s.small_w1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T g = grad[i] * gs;                       // grad.mul_(clip_coef), clipping's own float multiply
      const T x = param[i] * decay;                   // param.mul_(1 - lr * weight_decay)
      const T mi = m[i] + w1 * (g - m[i]);            // exp_avg.lerp_(grad, 1 - beta1)
      const T vi = v[i] * beta2 + w2 * g * g;         // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2)
      const T denom = std::sqrt(vi) / bc2s + eps;     // (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
      x_out[i] = x + nss * mi / denom;                // param.addcdiv_(exp_avg, denom, value=-step_size)
      m_out[i] = mi;
      v_out[i] = vi;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T g = grad[i] * gs;
      const T x = param[i] * decay;
      const T mi = g - (g - m[i]) * (one - w1);
      const T vi = v[i] * beta2 + w2 * g * g;
      const T denom = std::sqrt(vi) / bc2s + eps;
      x_out[i] = x + nss * mi / denom;
      m_out[i] = mi;
      v_out[i] = vi;
    }
  }
}

// 1 when any of a[0, n) is NaN or +-Inf: x - x is 0 for every finite x and NaN otherwise (exact: the build does
// not use -ffast-math), written so that the OR vectorises.
template <class T>
inline int any_non_finite(const T* __restrict a, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const T d = a[i] - a[i];
    bad |= d != d ? 1 : 0;
  }
  return bad;
}

// float -> bf16 bits, round to nearest even, NaN stays NaN (quiet): the rounding of convert() to BF16 on the CPU
// backend (convert_host, runtime/safetensors.cpp), which GPT2::sync_params uses.
inline uint16_t to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

enum class Pass { Update, DryRun };

// One pass over [0, n): the update (writes param, m, v; with `copy`, also copy[i] = bf16(new param); with zero_grad,
// grad[i] = 0 after the block has read it) or the dry run (writes nothing; returns 1 when any new value would be
// non-finite). Blocks are independent, so the result does not depend on the thread count.
template <class T, Pass P>
int adamw_pass(T* param, const T* grad, T* m, T* v, int64_t n, const Scalars<T>& s, uint16_t* copy = nullptr,
               T* zero_grad = nullptr) {
  const int64_t nblk = (n + kAdamWBlock - 1) / kAdamWBlock;
  int bad = 0;
#pragma omp parallel reduction(| : bad) if (n > 65536)
  {
    alignas(64) T xb[kAdamWBlock], mb[kAdamWBlock], vb[kAdamWBlock];
#pragma omp for schedule(static)
    for (int64_t k = 0; k < nblk; ++k) {
      const int64_t lo = k * kAdamWBlock, len = std::min(kAdamWBlock, n - lo);
      adamw_block<T>(param + lo, grad + lo, m + lo, v + lo, len, s, xb, mb, vb);
      if constexpr (P == Pass::Update) {
        std::memcpy(param + lo, xb, static_cast<size_t>(len) * sizeof(T));
        std::memcpy(m + lo, mb, static_cast<size_t>(len) * sizeof(T));
        std::memcpy(v + lo, vb, static_cast<size_t>(len) * sizeof(T));
        if (copy != nullptr)
          for (int64_t i = 0; i < len; ++i) copy[lo + i] = to_bf16_bits(static_cast<float>(xb[i]));
        if (zero_grad != nullptr) std::fill(zero_grad + lo, zero_grad + lo + len, T(0));
      } else {
        bad |= any_non_finite(xb, len) | any_non_finite(mb, len) | any_non_finite(vb, len);
      }
    }
  }
  return bad;
}

// 1 when any element of [0, n) would get a non-finite value. Nothing is written (the casts only fit the shared
// pass's signature).
template <class T>
int adamw_dry_run(const T* param, const T* grad, const T* m, const T* v, int64_t n, const Scalars<T>& s) {
  return adamw_pass<T, Pass::DryRun>(const_cast<T*>(param), grad, const_cast<T*>(m), const_cast<T*>(v), n, s);
}

bool record_says_skip(const double* record) {
  return record[adamw_record::kNormNonFinite] != 0.0 || record[adamw_record::kNonFiniteRanks] != 0.0;
}

}  // namespace

template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWParams& p) {
  adamw_pass<T, Pass::Update>(param, grad, m, v, n, Scalars<T>(p));
}

// One adamw_update per segment: the per-segment results are bitwise those of separate calls by construction.
// (On the CPU a fused loop would buy nothing; the CUDA kernel is the one that fuses.)
template <class T>
void adamw_update_segments(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWSegment* segs, int64_t n_segs,
                           const AdamWParams& p) {
  check_adamw_segments(segs, n_segs, n, "adamw_update_segments");
  AdamWParams q = p;
  for (int64_t k = 0; k < n_segs; ++k) {
    const AdamWSegment& s = segs[k];
    if (s.numel == 0) continue;
    q.weight_decay = s.weight_decay ? p.weight_decay : 0.0;
    adamw_update<T>(param + s.offset, grad + s.offset, m + s.offset, v + s.offset, s.numel, q);
  }
}

template <class T>
AdamWCheck adamw_dry_run_segments(const T* param, const T* grad, const T* m, const T* v, int64_t n,
                                  const AdamWSegment* segs, int64_t n_segs, const AdamWParams& p) {
  check_adamw_segments(segs, n_segs, n, "adamw_dry_run_segments");
  AdamWParams q = p;
  int bad = 0;
  for (int64_t k = 0; k < n_segs && !bad; ++k) {  // a flagged segment decides the answer: the rest is not read
    const AdamWSegment& s = segs[k];
    if (s.numel == 0) continue;
    q.weight_decay = s.weight_decay ? p.weight_decay : 0.0;
    bad |= adamw_dry_run<T>(param + s.offset, grad + s.offset, m + s.offset, v + s.offset, s.numel, Scalars<T>(q));
  }
  return bad ? AdamWCheck::NonFinite : AdamWCheck::AllFinite;
}

// --- the device step, on the host ----------------------------------------------------------------------------------

void adamw_prepare(double* record, const double* state, AdamWNormFrom from) {
  namespace R = adamw_record;
  const double norm = from == AdamWNormFrom::SumOfSquares ? std::sqrt(record[R::kSumSquares]) : record[R::kNorm];
  record[R::kGradScale] = 1.0;
  record[R::kClipped] = 0.0;
  record[R::kNonFiniteRanks] = 0.0;
  if (!std::isfinite(norm)) {
    record[R::kNorm] = std::numeric_limits<double>::quiet_NaN();
    record[R::kNormNonFinite] = 1.0;
    return;
  }
  record[R::kNorm] = norm;
  record[R::kNormNonFinite] = 0.0;
  const double max_norm = state[adamw_state::kMaxGradNorm];
  if (max_norm > 0) {
    // torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1.
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
      record[R::kGradScale] = coef;
      record[R::kClipped] = 1.0;
    }
  }
}

template <class T>
void adamw_check_segments(const T* param, const T* grad, const T* m, const T* v, int64_t n, const AdamWSegment* segs,
                          int64_t n_segs, const double* state, double* record) {
  check_adamw_segments(segs, n_segs, n, "adamw_check_segments");
  if (record[adamw_record::kNormNonFinite] != 0.0) return;
  const double gs = record[adamw_record::kGradScale];
  int bad = 0;
  for (int64_t k = 0; k < n_segs && !bad; ++k) {  // a flagged segment decides the answer: the rest is not read
    const AdamWSegment& s = segs[k];
    if (s.numel == 0) continue;
    bad |= adamw_dry_run<T>(param + s.offset, grad + s.offset, m + s.offset, v + s.offset, s.numel,
                            Scalars<T>(state, gs, s.weight_decay));
  }
  if (bad) record[adamw_record::kNonFiniteRanks] = 1.0;
}

template <class T>
void adamw_apply_segments(T* param, T* grad, T* m, T* v, uint16_t* copy, int64_t n, const AdamWSegment* segs,
                          int64_t n_segs, const double* state, const double* record, GradAfterStep after) {
  check_adamw_segments(segs, n_segs, n, "adamw_apply_segments");
  const bool skip = record_says_skip(record);
  const double gs = record[adamw_record::kGradScale];
  for (int64_t k = 0; k < n_segs; ++k) {
    const AdamWSegment& s = segs[k];
    if (s.numel == 0) continue;
    if (skip) {
      if (after == GradAfterStep::Zero) std::fill(grad + s.offset, grad + s.offset + s.numel, T(0));
      continue;
    }
    adamw_pass<T, Pass::Update>(param + s.offset, grad + s.offset, m + s.offset, v + s.offset, s.numel,
                                Scalars<T>(state, gs, s.weight_decay), copy != nullptr ? copy + s.offset : nullptr,
                                after == GradAfterStep::Zero ? grad + s.offset : nullptr);
  }
}

template <class T>
double sum_squares(const T* x, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t chunks = (n + kSumSquaresChunk - 1) / kSumSquaresChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
  // Each chunk: 8 lanes in a fixed order (independent of threads), then the lanes in index order.
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kSumSquaresChunk;
    const int64_t hi = lo + kSumSquaresChunk < n ? lo + kSumSquaresChunk : n;
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
      for (int k = 0; k < 8; ++k) {
        const double e = static_cast<double>(x[i + k]);
        lane[k] += e * e;
      }
    for (int k = 0; i < hi; ++i, ++k) {
      const double e = static_cast<double>(x[i]);
      lane[k] += e * e;
    }
    partial[static_cast<size_t>(c)] =
        ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  double s = 0.0;
  for (double q : partial) s += q;
  return s;
}

template <class T>
void scale(T* x, int64_t n, double s) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(static_cast<double>(x[i]) * s);
}

template void adamw_update<float>(float*, const float*, float*, float*, int64_t, const AdamWParams&);
template void adamw_update<double>(double*, const double*, double*, double*, int64_t, const AdamWParams&);
template void adamw_update_segments<float>(float*, const float*, float*, float*, int64_t, const AdamWSegment*, int64_t,
                                          const AdamWParams&);
template void adamw_update_segments<double>(double*, const double*, double*, double*, int64_t, const AdamWSegment*,
                                           int64_t, const AdamWParams&);
template AdamWCheck adamw_dry_run_segments<float>(const float*, const float*, const float*, const float*, int64_t,
                                                   const AdamWSegment*, int64_t, const AdamWParams&);
template AdamWCheck adamw_dry_run_segments<double>(const double*, const double*, const double*, const double*, int64_t,
                                                    const AdamWSegment*, int64_t, const AdamWParams&);
template void adamw_check_segments<float>(const float*, const float*, const float*, const float*, int64_t,
                                          const AdamWSegment*, int64_t, const double*, double*);
template void adamw_check_segments<double>(const double*, const double*, const double*, const double*, int64_t,
                                           const AdamWSegment*, int64_t, const double*, double*);
template void adamw_apply_segments<float>(float*, float*, float*, float*, uint16_t*, int64_t, const AdamWSegment*,
                                          int64_t, const double*, const double*, GradAfterStep);
template void adamw_apply_segments<double>(double*, double*, double*, double*, uint16_t*, int64_t,
                                           const AdamWSegment*, int64_t, const double*, const double*, GradAfterStep);
template double sum_squares<float>(const float*, int64_t);
template double sum_squares<double>(const double*, int64_t);
template void scale<float>(float*, int64_t, double);
template void scale<double>(double*, int64_t, double);

}  // namespace dpo::cpu
