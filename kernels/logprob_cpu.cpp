#include "kernels/logprob.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "runtime/error.h"

namespace dpo::cpu {

namespace {

// Runs serially before any output is written, so a bad target never throws inside an OpenMP region and never
// leaves a half-written result. (dpo::Error is thrown directly: dpo_kernels_cpu does not link dpo_runtime.) Only
// the slots of a sequence (owner >= 0) are scored, so only their targets are checked.
template <class T>
void check_targets(const char* fn, const int32_t* targets, const T* weights, const std::vector<int64_t>& owner,
                   int64_t T_, int64_t V) {
  const int64_t BT = static_cast<int64_t>(owner.size());
  for (int64_t i = 0; i < BT; ++i) {
    if (owner[i] >= 0 && weights[i] != T(0) && (targets[i] < 0 || targets[i] >= V)) {
      throw Error(std::string(fn) + ": target " + std::to_string(targets[i]) + " at (b=" + std::to_string(i / T_) +
                  ", t=" + std::to_string(i % T_) + ") is outside [0, V=" + std::to_string(V) +
                  ") and its weight is non-zero");
    }
  }
}

// The sequence of every slot (-1: in no range), after checking the ranges seg[S,2] (kernels/logprob.h): each
// 0 <= lo <= hi <= B*T, and hi of one range <= lo of the next.
std::vector<int64_t> slot_owners(const char* fn, const int32_t* seg, int64_t S, int64_t BT) {
  std::vector<int64_t> owner(static_cast<size_t>(BT), -1);
  int64_t prev_hi = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t lo = seg[2 * s], hi = seg[2 * s + 1];
    if (lo < 0 || hi < lo || hi > BT)
      throw Error(std::string(fn) + ": sequence " + std::to_string(s) + " has the slot range [" + std::to_string(lo) +
                  ", " + std::to_string(hi) + "), not a range inside [0, B*T=" + std::to_string(BT) + ")");
    if (lo < prev_hi)
      throw Error(std::string(fn) + ": sequence " + std::to_string(s) + "'s slot range [" + std::to_string(lo) +
                  ", " + std::to_string(hi) + ") starts before the end " + std::to_string(prev_hi) +
                  " of the previous range (ranges must be sorted and must not overlap)");
    prev_hi = hi;
    for (int64_t i = lo; i < hi; ++i) owner[i] = s;
  }
  return owner;
}

// The padded layout's ranges: sequence b is row b, [b*T, (b+1)*T).
std::vector<int32_t> row_ranges(const char* fn, int64_t B, int64_t T_) {
  if (B * T_ > INT32_MAX)
    throw Error(std::string(fn) + ": B*T = " + std::to_string(B * T_) + " slots exceed the int32 slot range");
  std::vector<int32_t> seg(static_cast<size_t>(2 * B));
  for (int64_t b = 0; b < B; ++b) {
    seg[2 * b] = static_cast<int32_t>(b * T_);
    seg[2 * b + 1] = static_cast<int32_t>((b + 1) * T_);
  }
  return seg;
}

// log(sum_v exp(x[v])) over x[0, V); with `sum` non-null also *sum = sum_v x[v] and *log_sum_sq = log sum_v p[v]^2
// (p = softmax(x)), taken in the same pass as the exponentials (the forward's statistics, kernels/seq_stats.h).
template <class T>
double logsumexp(const T* x, int64_t V, double* sum = nullptr, double* log_sum_sq = nullptr) {
  T mx = x[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, x[v]);
  const double m = static_cast<double>(mx);
  double s = 0.0;
  if (sum) {
    double xs = 0.0, s2 = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      const double xv = static_cast<double>(x[v]);
      const double e = std::exp(xv - m);
      s += e;
      s2 += e * e;
      xs += xv;
    }
    *sum = xs;
    *log_sum_sq = std::log(s2) - 2.0 * std::log(s);
  } else {
    for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(x[v]) - m);
  }
  return m + std::log(s);
}

void check_stride(const char* fn, int64_t V, int64_t ld) {
  if (V < 1 || ld < V)
    throw Error(std::string(fn) + ": needs 1 <= V <= row stride, got V=" + std::to_string(V) + ", row stride " +
                std::to_string(ld));
}

// The forward over checked ranges (owner: slot -> sequence or -1). Slots in no range and slots with weight 0 get
// lp = 0 and their logits are never read.
template <class T>
void forward_impl(T* seq_logp, T* token_logp, T* seq_stats, const T* logits, const int32_t* targets,
                  const T* weights, const int32_t* seg, int64_t S, const std::vector<int64_t>& owner, int64_t V,
                  int64_t ld) {
  const int64_t BT = static_cast<int64_t>(owner.size());
  std::vector<double> lp(BT);
  std::vector<double> row_sum(seq_stats ? BT : 0);  // sum of the row's logits, scored rows with weight != 0
  std::vector<double> row_lss(seq_stats ? BT : 0);  // log sum_v p^2 of those rows
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < BT; ++i) {
    if (owner[i] < 0 || weights[i] == T(0)) {
      lp[i] = 0.0;
      if (seq_stats) row_sum[i] = row_lss[i] = 0.0;
      continue;
    }
    const T* x = logits + i * ld;
    lp[i] = static_cast<double>(x[targets[i]]) -
            logsumexp(x, V, seq_stats ? &row_sum[i] : nullptr, seq_stats ? &row_lss[i] : nullptr);
  }
  // The per-sequence sums run over the sequence's slots in order after the parallel loop: deterministic for any
  // thread count.
  for (int64_t s = 0; s < S; ++s) {
    double acc = 0.0, n = 0.0, xs = 0.0, wpo = 0.0;
    for (int64_t i = seg[2 * s]; i < seg[2 * s + 1]; ++i) {
      acc += static_cast<double>(weights[i]) * lp[i];
      if (seq_stats && weights[i] != T(0)) {
        n += 1.0;
        xs += row_sum[i];
        wpo += lp[i] - row_lss[i];
      }
    }
    seq_logp[s] = static_cast<T>(acc);
    if (seq_stats) {
      T* st = seq_stats + s * kSeqStatsWidth;
      st[kSeqLogp] = static_cast<T>(acc);
      st[kSeqTokens] = static_cast<T>(n);
      st[kSeqLogitSum] = static_cast<T>(xs);
      st[kSeqWpoLogp] = static_cast<T>(wpo);
    }
  }
  if (token_logp) {
    for (int64_t i = 0; i < BT; ++i) token_logp[i] = static_cast<T>(lp[i]);
  }
}

// The backward over checked ranges: rows in no range or with weight 0 are set to 0.
template <class T>
void backward_impl(T* dlogits, const T* logits, const int32_t* targets, const T* weights, const T* dseq,
                   const std::vector<int64_t>& owner, int64_t V, int64_t ld) {
  const int64_t BT = static_cast<int64_t>(owner.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < BT; ++i) {
    T* d = dlogits + i * ld;
    if (owner[i] < 0 || weights[i] == T(0)) {
      std::fill(d, d + V, T(0));
      continue;
    }
    // dlogits may alias logits: the log-sum-exp reads the whole row first, then each element is read before it
    // is overwritten.
    const T* x = logits + i * ld;
    const double lse = logsumexp(x, V);
    const double g = static_cast<double>(dseq[owner[i]]) * static_cast<double>(weights[i]);
    const int64_t tgt = targets[i];
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(static_cast<double>(x[v]) - lse);
      d[v] = static_cast<T>(g * ((v == tgt ? 1.0 : 0.0) - p));
    }
  }
}

}  // namespace

template <class T>
void logprob_forward_segments(T* seq_logp, T* token_logp, T* seq_stats, const T* logits, const int32_t* targets,
                              const T* weights, const int32_t* seg, int64_t S, int64_t B, int64_t T_, int64_t V,
                              int64_t ld) {
  const char* fn = "logprob_forward_segments";
  check_stride(fn, V, ld);
  const int64_t BT = B * T_;
  const std::vector<int64_t> owner = slot_owners(fn, seg, S, BT);
  check_targets(fn, targets, weights, owner, T_, V);
  forward_impl(seq_logp, token_logp, seq_stats, logits, targets, weights, seg, S, owner, V, ld);
}

template <class T>
void logprob_backward_segments(T* dlogits, const T* logits, const int32_t* targets, const T* weights,
                               const int32_t* seg, const T* dseq, int64_t S, int64_t B, int64_t T_, int64_t V,
                               int64_t ld) {
  const char* fn = "logprob_backward_segments";
  check_stride(fn, V, ld);
  const std::vector<int64_t> owner = slot_owners(fn, seg, S, B * T_);
  check_targets(fn, targets, weights, owner, T_, V);
  backward_impl(dlogits, logits, targets, weights, dseq, owner, V, ld);
}

template <class T>
void logprob_forward(T* seq_logp, T* token_logp, T* seq_stats, const T* logits, const int32_t* targets,
                     const T* weights, int64_t B, int64_t T_, int64_t V, int64_t ld) {
  const char* fn = "logprob_forward";
  check_stride(fn, V, ld);
  const std::vector<int32_t> seg = row_ranges(fn, B, T_);
  const std::vector<int64_t> owner = slot_owners(fn, seg.data(), B, B * T_);
  check_targets(fn, targets, weights, owner, T_, V);
  forward_impl(seq_logp, token_logp, seq_stats, logits, targets, weights, seg.data(), B, owner, V, ld);
}

template <class T>
void logprob_backward(T* dlogits, const T* logits, const int32_t* targets, const T* weights, const T* dseq,
                      int64_t B, int64_t T_, int64_t V, int64_t ld) {
  const char* fn = "logprob_backward";
  check_stride(fn, V, ld);
  const std::vector<int32_t> seg = row_ranges(fn, B, T_);
  const std::vector<int64_t> owner = slot_owners(fn, seg.data(), B, B * T_);
  check_targets(fn, targets, weights, owner, T_, V);
  backward_impl(dlogits, logits, targets, weights, dseq, owner, V, ld);
}

template void logprob_forward<float>(float*, float*, float*, const float*, const int32_t*, const float*, int64_t,
                                     int64_t, int64_t, int64_t);
template void logprob_forward<double>(double*, double*, double*, const double*, const int32_t*, const double*,
                                      int64_t, int64_t, int64_t, int64_t);
template void logprob_backward<float>(float*, const float*, const int32_t*, const float*, const float*, int64_t,
                                      int64_t, int64_t, int64_t);
template void logprob_backward<double>(double*, const double*, const int32_t*, const double*, const double*, int64_t,
                                       int64_t, int64_t, int64_t);
template void logprob_forward_segments<float>(float*, float*, float*, const float*, const int32_t*, const float*,
                                              const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t);
template void logprob_forward_segments<double>(double*, double*, double*, const double*, const int32_t*,
                                               const double*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                               int64_t);
template void logprob_backward_segments<float>(float*, const float*, const int32_t*, const float*, const int32_t*,
                                               const float*, int64_t, int64_t, int64_t, int64_t, int64_t);
template void logprob_backward_segments<double>(double*, const double*, const int32_t*, const double*,
                                                const int32_t*, const double*, int64_t, int64_t, int64_t, int64_t,
                                                int64_t);

}  // namespace dpo::cpu
