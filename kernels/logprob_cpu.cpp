#include "kernels/logprob.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "runtime/error.h"

namespace dpo::cpu {

namespace {

// Runs serially before any output is written, so a bad target never throws inside an OpenMP region and never
// leaves a half-written result. (dpo::Error is thrown directly: dpo_kernels_cpu does not link dpo_runtime.)
template <class T>
void check_targets(const char* fn, const int32_t* targets, const T* weights, int64_t B, int64_t T_, int64_t V) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t i = b * T_ + t;
      if (weights[i] != T(0) && (targets[i] < 0 || targets[i] >= V)) {
        throw Error(std::string(fn) + ": target " + std::to_string(targets[i]) + " at (b=" + std::to_string(b) +
                    ", t=" + std::to_string(t) + ") is outside [0, V=" + std::to_string(V) +
                    ") and its weight is non-zero");
      }
    }
  }
}

// log(sum_v exp(x[v])) over x[0, V); with `sum` non-null also *sum = sum_v x[v], taken in the same pass as the
// exponentials (the forward's statistics, kernels/seq_stats.h).
template <class T>
double logsumexp(const T* x, int64_t V, double* sum = nullptr) {
  T mx = x[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, x[v]);
  const double m = static_cast<double>(mx);
  double s = 0.0;
  if (sum) {
    double xs = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      const double xv = static_cast<double>(x[v]);
      s += std::exp(xv - m);
      xs += xv;
    }
    *sum = xs;
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

}  // namespace

template <class T>
void logprob_forward(T* seq_logp, T* token_logp, T* seq_stats, const T* logits, const int32_t* targets,
                     const T* weights, int64_t B, int64_t T_, int64_t V, int64_t ld) {
  check_stride("logprob_forward", V, ld);
  check_targets("logprob_forward", targets, weights, B, T_, V);
  const int64_t BT = B * T_;
  std::vector<double> lp(BT);
  std::vector<double> row_sum(seq_stats ? BT : 0);  // sum of the row's logits, rows with weight != 0
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < BT; ++i) {
    if (weights[i] == T(0)) {
      lp[i] = 0.0;
      if (seq_stats) row_sum[i] = 0.0;
      continue;
    }
    const T* x = logits + i * ld;
    lp[i] = static_cast<double>(x[targets[i]]) - logsumexp(x, V, seq_stats ? &row_sum[i] : nullptr);
  }
  // The per-sequence sums run over t in order after the parallel loop: deterministic for any thread count.
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0, n = 0.0, xs = 0.0;
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t i = b * T_ + t;
      s += static_cast<double>(weights[i]) * lp[i];
      if (seq_stats && weights[i] != T(0)) {
        n += 1.0;
        xs += row_sum[i];
      }
    }
    seq_logp[b] = static_cast<T>(s);
    if (seq_stats) {
      T* st = seq_stats + b * kSeqStatsWidth;
      st[kSeqLogp] = static_cast<T>(s);
      st[kSeqTokens] = static_cast<T>(n);
      st[kSeqLogitSum] = static_cast<T>(xs);
    }
  }
  if (token_logp) {
    for (int64_t i = 0; i < BT; ++i) token_logp[i] = static_cast<T>(lp[i]);
  }
}

template <class T>
void logprob_backward(T* dlogits, const T* logits, const int32_t* targets, const T* weights, const T* dseq,
                      int64_t B, int64_t T_, int64_t V, int64_t ld) {
  check_stride("logprob_backward", V, ld);
  check_targets("logprob_backward", targets, weights, B, T_, V);
  const int64_t BT = B * T_;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < BT; ++i) {
    T* d = dlogits + i * ld;
    if (weights[i] == T(0)) {
      std::fill(d, d + V, T(0));
      continue;
    }
    // dlogits may alias logits: the log-sum-exp reads the whole row first, then each element is read before it
    // is overwritten.
    const T* x = logits + i * ld;
    const double lse = logsumexp(x, V);
    const double g = static_cast<double>(dseq[i / T_]) * static_cast<double>(weights[i]);
    const int64_t tgt = targets[i];
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(static_cast<double>(x[v]) - lse);
      d[v] = static_cast<T>(g * ((v == tgt ? 1.0 : 0.0) - p));
    }
  }
}

template void logprob_forward<float>(float*, float*, float*, const float*, const int32_t*, const float*, int64_t,
                                     int64_t, int64_t, int64_t);
template void logprob_forward<double>(double*, double*, double*, const double*, const int32_t*, const double*,
                                      int64_t, int64_t, int64_t, int64_t);
template void logprob_backward<float>(float*, const float*, const int32_t*, const float*, const float*, int64_t,
                                      int64_t, int64_t, int64_t);
template void logprob_backward<double>(double*, const double*, const int32_t*, const double*, const double*, int64_t,
                                       int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
