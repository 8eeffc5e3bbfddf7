#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/attention_keys.h"
#include "runtime/error.h"

namespace dpo::cpu {

namespace {

// The reference forward for any visibility rule: keys_of(b, t) gives the QueryKeys of query slot t of row b.
template <class T, class KeysOf>
void forward_impl(T* out, T* att, const T* qkv, const KeysOf& keys_of, int64_t B, int64_t T_, int64_t C,
                  int64_t NH) {
  const int64_t C3 = 3 * C, hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  const int64_t rows = B * NH * T_;
#pragma omp parallel
  {
    std::vector<double> p(T_), acc(hs);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r % T_, h = (r / T_) % NH, b = r / (T_ * NH);
      const QueryKeys keys = keys_of(b, t);
      const T* q = qkv + (b * T_ + t) * C3 + h * hs;
      T* arow = att + r * T_;
      T* o = out + (b * T_ + t) * C + h * hs;

      double mx = -std::numeric_limits<double>::infinity();
      bool any = false;  // a query with no visible key (key mask: left padding) gets att = 0, out = 0
      keys.for_each([&](int64_t s) {
        const T* k = qkv + (b * T_ + s) * C3 + C + h * hs;
        double d = 0.0;
        for (int64_t i = 0; i < hs; ++i) d += static_cast<double>(q[i]) * static_cast<double>(k[i]);
        p[s] = d * scale;
        mx = std::max(mx, p[s]);
        any = true;
      });
      double sum = 0.0;
      keys.for_each([&](int64_t s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      });
      const double inv = any ? 1.0 / sum : 0.0;
      for (int64_t i = 0; i < hs; ++i) acc[i] = 0.0;
      std::fill(arow, arow + T_, T(0));
      keys.for_each([&](int64_t s) {
        p[s] *= inv;
        arow[s] = static_cast<T>(p[s]);
        if (p[s] == 0.0) return;
        const T* v = qkv + (b * T_ + s) * C3 + 2 * C + h * hs;
        for (int64_t i = 0; i < hs; ++i) acc[i] += p[s] * static_cast<double>(v[i]);
      });
      for (int64_t i = 0; i < hs; ++i) o[i] = static_cast<T>(acc[i]);
    }
  }
}

// The reference backward; keys_of(b, t) bounds the keys each query row visits (att is 0 at every other key).
template <class T, class KeysOf>
void backward_impl(T* dqkv, const T* dout, const T* qkv, const T* att, const KeysOf& keys_of, int64_t B, int64_t T_,
                   int64_t C, int64_t NH) {
  const int64_t C3 = 3 * C, hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  // One (b,h) per iteration owns disjoint channels of dqkv, and sums over t and s run in a fixed order inside
  // it, so the result does not depend on the thread count. Gradients are collected in local buffers and added
  // to dqkv once.
#pragma omp parallel
  {
    std::vector<double> dq(T_ * hs), dk(T_ * hs), dv(T_ * hs), datt(T_);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * NH; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      std::fill(dq.begin(), dq.end(), 0.0);
      std::fill(dk.begin(), dk.end(), 0.0);
      std::fill(dv.begin(), dv.end(), 0.0);
      for (int64_t t = 0; t < T_; ++t) {
        const QueryKeys keys = keys_of(b, t);
        const T* arow = att + (bh * T_ + t) * T_;
        const T* q = qkv + (b * T_ + t) * C3 + h * hs;
        const T* d = dout + (b * T_ + t) * C + h * hs;
        // Probabilities that are exactly 0 (future, masked, or a row with no visible key) contribute nothing.
        double dot = 0.0;
        keys.for_each([&](int64_t s) {
          const double a = static_cast<double>(arow[s]);
          if (a == 0.0) return;
          const T* v = qkv + (b * T_ + s) * C3 + 2 * C + h * hs;
          double g = 0.0;
          for (int64_t i = 0; i < hs; ++i) {
            g += static_cast<double>(d[i]) * static_cast<double>(v[i]);
            dv[s * hs + i] += a * static_cast<double>(d[i]);
          }
          datt[s] = g;
          dot += a * g;
        });
        keys.for_each([&](int64_t s) {
          const double a = static_cast<double>(arow[s]);
          if (a == 0.0) return;
          const double dpre = a * (datt[s] - dot) * scale;
          const T* k = qkv + (b * T_ + s) * C3 + C + h * hs;
          for (int64_t i = 0; i < hs; ++i) {
            dq[t * hs + i] += dpre * static_cast<double>(k[i]);
            dk[s * hs + i] += dpre * static_cast<double>(q[i]);
          }
        });
      }
      for (int64_t t = 0; t < T_; ++t) {
        T* g = dqkv + (b * T_ + t) * C3 + h * hs;
        for (int64_t i = 0; i < hs; ++i) {
          g[i] += static_cast<T>(dq[t * hs + i]);
          g[C + i] += static_cast<T>(dk[t * hs + i]);
          g[2 * C + i] += static_cast<T>(dv[t * hs + i]);
        }
      }
    }
  }
}

}  // namespace

void attention_keymask_spans(int32_t* span, const int32_t* keymask, int64_t B, int64_t T_) {
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* m = keymask ? keymask + b * T_ : nullptr;
    int64_t lo = 0;
    while (m && lo < T_ && m[lo] == 0) ++lo;
    for (int64_t t = 0; t < T_; ++t) {
      int32_t* sp = span + (b * T_ + t) * kSpanWidth;
      const bool real = m == nullptr || m[t] != 0;
      sp[kSpanLo] = static_cast<int32_t>(real ? lo : t);
      sp[kSpanHoleLo] = sp[kSpanHoleHi] = static_cast<int32_t>(t);
    }
  }
}

void check_attention_spans(const int32_t* span, int64_t B, int64_t T_, const char* fn) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) {
      const int32_t* sp = span + (b * T_ + t) * kSpanWidth;
      if (span_valid(sp, t)) continue;
      const int64_t lo = sp[kSpanLo], hl = sp[kSpanHoleLo], hh = sp[kSpanHoleHi];
      std::string why;
      if (lo < 0 || lo > t) why = "its first key " + std::to_string(lo) + " is not in [0, " + std::to_string(t) + "]";
      else if (hl > hh) why = "its hole ends before it begins";
      else if (hl <= t && t < hh) why = "the query lies inside its own hole";
      else why = "its hole is not inside [" + std::to_string(lo) + ", " + std::to_string(t) + ")";
      throw Error(std::string(fn) + ": span of row " + std::to_string(b) + ", slot " + std::to_string(t) + " = {" +
                  std::to_string(lo) + ", " + std::to_string(hl) + ", " + std::to_string(hh) +
                  "} is invalid: " + why + " (kernels/batch_layout.h)");
    }
}

template <class T>
void attention_forward(T* out, T* att, const T* qkv, const int32_t* keymask, int64_t B, int64_t T_, int64_t C,
                       int64_t NH) {
  const auto keys_of = [&](int64_t b, int64_t t) {
    return QueryKeys::from_mask(keymask ? keymask + b * T_ : nullptr, t);
  };
  forward_impl(out, att, qkv, keys_of, B, T_, C, NH);
}

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int64_t B, int64_t T_, int64_t C,
                        int64_t NH) {
  const auto keys_of = [](int64_t, int64_t t) { return QueryKeys::from_mask(nullptr, t); };
  backward_impl(dqkv, dout, qkv, att, keys_of, B, T_, C, NH);
}

template <class T>
void attention_forward_spans(T* out, T* att, const T* qkv, const int32_t* span, int64_t B, int64_t T_, int64_t C,
                             int64_t NH) {
  check_attention_spans(span, B, T_, "attention_forward_spans");
  const auto keys_of = [&](int64_t b, int64_t t) {
    return QueryKeys::from_span(span + (b * T_ + t) * kSpanWidth, t);
  };
  forward_impl(out, att, qkv, keys_of, B, T_, C, NH);
}

template <class T>
void attention_backward_spans(T* dqkv, const T* dout, const T* qkv, const T* att, const int32_t* span, int64_t B,
                              int64_t T_, int64_t C, int64_t NH) {
  check_attention_spans(span, B, T_, "attention_backward_spans");
  const auto keys_of = [&](int64_t b, int64_t t) {
    return QueryKeys::from_span(span + (b * T_ + t) * kSpanWidth, t);
  };
  backward_impl(dqkv, dout, qkv, att, keys_of, B, T_, C, NH);
}

template <class T>
void attention_cache_store(T* kcache, T* vcache, const T* qkv, int64_t B, int64_t T_, int64_t Tc, int64_t C) {
  if (T_ > Tc)
    throw Error("attention_cache_store: " + std::to_string(T_) + " positions do not fit a cache of " +
                std::to_string(Tc));
  const int64_t C3 = 3 * C;
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T_; ++bt) {
    const int64_t b = bt / T_, t = bt % T_;
    const T* src = qkv + bt * C3;
    std::copy(src + C, src + 2 * C, kcache + (b * Tc + t) * C);
    std::copy(src + 2 * C, src + 3 * C, vcache + (b * Tc + t) * C);
  }
}

// The body of attention_forward for query t = pos[b], with keys and values read from the cache.
template <class T>
void attention_decode_forward(T* out, T* kcache, T* vcache, const T* qkv, const int32_t* pos, int64_t B, int64_t Tc,
                              int64_t C, int64_t NH) {
  for (int64_t b = 0; b < B; ++b)
    if (pos[b] < 0 || pos[b] >= Tc)
      throw Error("attention_decode_forward: position " + std::to_string(pos[b]) + " of sequence " +
                  std::to_string(b) + " is outside the cache's [0, " + std::to_string(Tc) + ")");
  const int64_t C3 = 3 * C, hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
#pragma omp parallel
  {
    std::vector<double> p(static_cast<size_t>(Tc)), acc(static_cast<size_t>(hs));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * NH; ++bh) {
      const int64_t b = bh / NH, h = bh % NH, t = pos[b];
      const T* q = qkv + b * C3 + h * hs;
      T* kc = kcache + b * Tc * C + h * hs;  // key of position s: kc + s * C
      T* vc = vcache + b * Tc * C + h * hs;
      // Each (b,h) writes only its own head's channels of position t, then reads them back.
      std::copy(q + C, q + C + hs, kc + t * C);
      std::copy(q + 2 * C, q + 2 * C + hs, vc + t * C);

      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t s = 0; s <= t; ++s) {
        const T* k = kc + s * C;
        double d = 0.0;
        for (int64_t i = 0; i < hs; ++i) d += static_cast<double>(q[i]) * static_cast<double>(k[i]);
        p[s] = d * scale;
        mx = std::max(mx, p[s]);
      }
      double sum = 0.0;
      for (int64_t s = 0; s <= t; ++s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      }
      const double inv = 1.0 / sum;
      for (int64_t i = 0; i < hs; ++i) acc[i] = 0.0;
      for (int64_t s = 0; s <= t; ++s) {
        p[s] *= inv;
        if (p[s] == 0.0) continue;
        const T* v = vc + s * C;
        for (int64_t i = 0; i < hs; ++i) acc[i] += p[s] * static_cast<double>(v[i]);
      }
      T* o = out + b * C + h * hs;
      for (int64_t i = 0; i < hs; ++i) o[i] = static_cast<T>(acc[i]);
    }
  }
}

template void attention_forward<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                                       int64_t);
template void attention_forward<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t, int64_t,
                                        int64_t);
template void attention_backward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t,
                                        int64_t);
template void attention_backward<double>(double*, const double*, const double*, const double*, int64_t, int64_t,
                                         int64_t, int64_t);

template void attention_forward_spans<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                                             int64_t);
template void attention_forward_spans<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t,
                                              int64_t, int64_t);
template void attention_backward_spans<float>(float*, const float*, const float*, const float*, const int32_t*,
                                              int64_t, int64_t, int64_t, int64_t);
template void attention_backward_spans<double>(double*, const double*, const double*, const double*, const int32_t*,
                                               int64_t, int64_t, int64_t, int64_t);

template void attention_cache_store<float>(float*, float*, const float*, int64_t, int64_t, int64_t, int64_t);
template void attention_cache_store<double>(double*, double*, const double*, int64_t, int64_t, int64_t, int64_t);
template void attention_decode_forward<float>(float*, float*, float*, const float*, const int32_t*, int64_t, int64_t,
                                              int64_t, int64_t);
template void attention_decode_forward<double>(double*, double*, double*, const double*, const int32_t*, int64_t,
                                               int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
