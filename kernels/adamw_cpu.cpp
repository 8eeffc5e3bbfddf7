#include <cmath>
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

}  // namespace dpo

namespace dpo::cpu {

namespace {

// ATen's lerp (aten/src/ATen/native/Lerp.h): two branches so that weight 0 and weight 1 both give exact ends.
inline double lerp(double self, double end, double weight) {
  return std::fabs(weight) < 0.5 ? self + weight * (end - self) : end - (end - self) * (1.0 - weight);
}

// Scalars as torch.optim.AdamW computes them in Python (double): _single_tensor_adam.
struct Scalars {
  double decay, step_size, bias_correction2_sqrt, w1, w2, beta2, eps, gs;
  explicit Scalars(const AdamWParams& p) {
    decay = 1.0 - p.lr * p.weight_decay;
    const double bias_correction1 = 1.0 - std::pow(p.beta1, static_cast<double>(p.step));
    const double bias_correction2 = 1.0 - std::pow(p.beta2, static_cast<double>(p.step));
    step_size = p.lr / bias_correction1;
    bias_correction2_sqrt = std::sqrt(bias_correction2);
    w1 = 1.0 - p.beta1;
    w2 = 1.0 - p.beta2;
    beta2 = p.beta2;
    eps = p.eps;
    gs = p.grad_scale;
  }
};

// The new values of element i, rounded to T. The update writes them; the dry run only tests them. One function for
// both, so the dry run sees bitwise the values the update would store.
template <class T>
inline void adamw_values(const T* param, const T* grad, const T* m, const T* v, int64_t i, const Scalars& s, T& x_out,
                         T& m_out, T& v_out) {
  const double g = static_cast<double>(grad[i]) * s.gs;
  double x = static_cast<double>(param[i]) * s.decay;        // param.mul_(1 - lr * weight_decay)
  const double mi = lerp(static_cast<double>(m[i]), g, s.w1);  // exp_avg.lerp_(grad, 1 - beta1)
  double vi = static_cast<double>(v[i]) * s.beta2;             // exp_avg_sq.mul_(beta2)
  vi = vi + s.w2 * g * g;                                      //   .addcmul_(grad, grad, value=1 - beta2)
  const double denom = std::sqrt(vi) / s.bias_correction2_sqrt + s.eps;
  x = x + (-s.step_size) * mi / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  x_out = static_cast<T>(x);
  m_out = static_cast<T>(mi);
  v_out = static_cast<T>(vi);
}

// 1 when x is NaN or +-Inf. std::isfinite is exact here: the build does not use -ffast-math.
template <class T>
inline int non_finite(T x) {
  return std::isfinite(x) ? 0 : 1;
}

// 1 when any element of [0, n) would get a non-finite value (an OR reduced in the loop; the order is irrelevant).
template <class T>
int adamw_dry_run(const T* param, const T* grad, const T* m, const T* v, int64_t n, const AdamWParams& p) {
  const Scalars s(p);
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    T x, mi, vi;
    adamw_values(param, grad, m, v, i, s, x, mi, vi);
    bad |= non_finite(x) | non_finite(mi) | non_finite(vi);
  }
  return bad;
}

}  // namespace

template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, const AdamWParams& p) {
  const Scalars s(p);
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    T x, mi, vi;
    adamw_values(param, grad, m, v, i, s, x, mi, vi);
    param[i] = x;
    m[i] = mi;
    v[i] = vi;
  }
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
    bad |= adamw_dry_run<T>(param + s.offset, grad + s.offset, m + s.offset, v + s.offset, s.numel, q);
  }
  return bad ? AdamWCheck::NonFinite : AdamWCheck::AllFinite;
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
template double sum_squares<float>(const float*, int64_t);
template double sum_squares<double>(const double*, int64_t);
template void scale<float>(float*, int64_t, double);
template void scale<double>(double*, int64_t, double);

}  // namespace dpo::cpu
