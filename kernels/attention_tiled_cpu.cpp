// The blocked CPU attention (kernels/attention.h, "Blocked attention"): the same function as the reference
// attention_forward / attention_backward, computed in T's own arithmetic with vectorisable inner loops, saving only
// the per-row log-sum-exp for the backward, which recomputes the probabilities block by block.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "kernels/attention.h"
#include "kernels/attention_keys.h"

namespace dpo::cpu {

namespace {

// Query rows per block: a block's scores against all its keys (kQ x T values) stay in a per-thread buffer (64 KiB
// at T = 512 in float), so the softmax is exact in two passes and needs no rescaling.
constexpr int64_t kQ = kAttentionTiledQueries;
// Keys per tile: a tile of keys (or values) is transposed into a [hs, kK] buffer so that a query's kK scores are one
// multiply-add per channel over a contiguous vector of kK lanes (vectorised, no horizontal sums).
constexpr int64_t kK = kAttentionTiledKeys;

// R[i * ld + s] = dot(a_i, b_s) for rows i in [0, nr) and keys s in [0, ns), where a_i = a + i * a_stride and
// b_s = bm + s * b_stride are vectors of hs elements. tile: hs * kK scratch. Each dot is summed over channels in
// index order, so a value does not depend on the block or the thread that computes it.
template <class T>
void block_dots(T* R, int64_t ld, const T* a, int64_t a_stride, int64_t nr, const T* bm, int64_t b_stride, int64_t ns,
                int64_t hs, T* tile) {
  for (int64_t s0 = 0; s0 < ns; s0 += kK) {
    const int64_t nk = std::min(kK, ns - s0);
    for (int64_t d = 0; d < hs; ++d) {
      T* td = tile + d * kK;
      for (int64_t j = 0; j < nk; ++j) td[j] = bm[(s0 + j) * b_stride + d];
      for (int64_t j = nk; j < kK; ++j) td[j] = T(0);  // a short last tile: full-width loops below, zero lanes
    }
    for (int64_t i = 0; i < nr; ++i) {
      const T* ai = a + i * a_stride;
      T acc[kK];
#pragma omp simd
      for (int64_t j = 0; j < kK; ++j) acc[j] = T(0);
      for (int64_t d = 0; d < hs; ++d) {
        const T x = ai[d];
        const T* td = tile + d * kK;
#pragma omp simd
        for (int64_t j = 0; j < kK; ++j) acc[j] += x * td[j];
      }
      T* r = R + i * ld + s0;
      for (int64_t j = 0; j < nk; ++j) r[j] = acc[j];
    }
  }
}

// y[0, n) += a * x[0, n)
template <class T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The visibility rule of one row: its key mask (or none) or its spans [T, kSpanWidth] (exactly one is used).
struct RowRule {
  const int32_t* mask;
  const int32_t* span;
  QueryKeys keys(int64_t t) const {
    return span ? QueryKeys::from_span(span + t * kSpanWidth, t) : QueryKeys::from_mask(mask, t);
  }
};

template <class T>
void forward_impl(T* out, T* lse, const T* qkv, const int32_t* keymask, const int32_t* span, int64_t B, int64_t T_,
                  int64_t C, int64_t NH) {
  const int64_t C3 = 3 * C, hs = C / NH, nqb = (T_ + kQ - 1) / kQ;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hs)));
  const T inf = std::numeric_limits<T>::infinity();
#pragma omp parallel
  {
    std::vector<T> S(static_cast<size_t>(kQ * T_)), tile(static_cast<size_t>(hs * kK)), o(static_cast<size_t>(hs));
    std::vector<int64_t> tiles(static_cast<size_t>((T_ + kK - 1) / kK));
    // Blocks near the end of a sequence see more keys: dynamic scheduling balances them. Every block's values
    // are computed by one thread in a fixed order, so the result does not depend on the thread count.
#pragma omp for schedule(dynamic)
    for (int64_t job = 0; job < B * NH * nqb; ++job) {
      const int64_t qb = job % nqb, h = (job / nqb) % NH, b = job / (nqb * NH);
      const int64_t t0 = qb * kQ, t1 = std::min(T_, t0 + kQ), nr = t1 - t0;
      const RowRule rule{keymask ? keymask + b * T_ : nullptr, span ? span + b * T_ * kSpanWidth : nullptr};
      const T* base = qkv + b * T_ * C3 + h * hs;
      // Scores of the block's rows against the keys of its tiles only (a dot does not depend on its tile).
      const int64_t ntiles = attention_tiled_key_tiles(tiles.data(), rule.span, t0, t1);
      for (int64_t j = 0; j < ntiles; ++j) {
        const int64_t s0 = tiles[static_cast<size_t>(j)] * kK;
        block_dots(S.data() + s0, T_, base + t0 * C3, C3, nr, base + C + s0 * C3, C3, std::min(kK, t1 - s0), hs,
                   tile.data());
      }
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t t = t0 + i;
        const QueryKeys keys = rule.keys(t);
        T* srow = S.data() + i * T_;
        T* orow = out + (b * T_ + t) * C + h * hs;
        T mx = -inf;
        keys.for_each([&](int64_t s) { mx = std::max(mx, srow[s] * scale); });
        if (mx == -inf) {  // no visible key (key mask: left padding): out = 0, and lse = +inf makes every probability 0
          std::fill(orow, orow + hs, T(0));
          lse[(b * NH + h) * T_ + t] = inf;
          continue;
        }
        T sum = 0;
        keys.for_each([&](int64_t s) {
          const T e = std::exp(srow[s] * scale - mx);
          srow[s] = e;
          sum += e;
        });
        lse[(b * NH + h) * T_ + t] = mx + std::log(sum);
        const T inv = T(1) / sum;
        std::fill(o.begin(), o.end(), T(0));
        keys.for_each([&](int64_t s) {
          if (srow[s] != T(0)) axpy(o.data(), srow[s] * inv, base + s * C3 + 2 * C, hs);
        });
        std::copy(o.begin(), o.end(), orow);
      }
    }
  }
}

template <class T>
void backward_impl(T* dqkv, const T* dout, const T* qkv, const int32_t* keymask, const int32_t* span, const T* lse,
                   int64_t B, int64_t T_, int64_t C, int64_t NH) {
  const int64_t C3 = 3 * C, hs = C / NH;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hs)));
  const T inf = std::numeric_limits<T>::infinity();
  // One (b, h) per iteration: it owns channels [h*hs, (h+1)*hs) of q, k and v in dqkv, and its sums run in a fixed
  // order inside it, so the result does not depend on the thread count. dk and dv collect over all query blocks
  // and are added to dqkv once.
#pragma omp parallel
  {
    std::vector<T> P(static_cast<size_t>(kQ * T_)), dP(static_cast<size_t>(kQ * T_)),
        tile(static_cast<size_t>(hs * kK)), dq(static_cast<size_t>(hs)), dk(static_cast<size_t>(T_ * hs)),
        dv(static_cast<size_t>(T_ * hs));
    std::vector<int64_t> tiles(static_cast<size_t>((T_ + kK - 1) / kK));
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * NH; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      const RowRule rule{keymask ? keymask + b * T_ : nullptr, span ? span + b * T_ * kSpanWidth : nullptr};
      const T* base = qkv + b * T_ * C3 + h * hs;
      const T* dbase = dout + b * T_ * C + h * hs;
      const T* lrow = lse + bh * T_;
      std::fill(dk.begin(), dk.end(), T(0));
      std::fill(dv.begin(), dv.end(), T(0));
      for (int64_t t0 = 0; t0 < T_; t0 += kQ) {
        const int64_t t1 = std::min(T_, t0 + kQ), nr = t1 - t0;
        const int64_t ntiles = attention_tiled_key_tiles(tiles.data(), rule.span, t0, t1);
        // f(s0, s1) for the key range [s0, s1) of every visited tile, ascending.
        const auto for_tiles = [&](auto&& f) {
          for (int64_t j = 0; j < ntiles; ++j) {
            const int64_t s0 = tiles[static_cast<size_t>(j)] * kK;
            f(s0, std::min(t1, s0 + kK));
          }
        };
        // Probabilities recomputed from the saved log-sum-exp (0 for invisible keys and rows without any), and
        // dP[i, s] = dout_t . v_s, on the visited tiles; every entry (i, s <= t) of a visited tile is written below.
        for_tiles([&](int64_t s0, int64_t s1) {
          block_dots(P.data() + s0, T_, base + t0 * C3, C3, nr, base + C + s0 * C3, C3, s1 - s0, hs, tile.data());
          block_dots(dP.data() + s0, T_, dbase + t0 * C, C, nr, base + 2 * C + s0 * C3, C3, s1 - s0, hs,
                     tile.data());
        });
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t t = t0 + i;
          const QueryKeys keys = rule.keys(t);
          T* prow = P.data() + i * T_;
          T* grow = dP.data() + i * T_;
          const T l = lrow[t];
          if (l == inf) {
            for_tiles([&](int64_t s0, int64_t s1) {
              for (int64_t s = s0; s < std::min(s1, t + 1); ++s) prow[s] = grow[s] = T(0);
            });
            continue;
          }
          T dot = 0;  // D_t = sum_s P[t, s] dP[t, s]
          for_tiles([&](int64_t s0, int64_t s1) {
            for (int64_t s = s0; s < std::min(s1, t + 1); ++s) {
              prow[s] = keys.sees(s) ? std::exp(prow[s] * scale - l) : T(0);
              dot += prow[s] * grow[s];
            }
          });
          // dS[t, s] = P (dP - D) / sqrt(hs), in place of dP; dq_t = sum_s dS[t, s] k_s
          std::fill(dq.begin(), dq.end(), T(0));
          for_tiles([&](int64_t s0, int64_t s1) {
            for (int64_t s = s0; s < std::min(s1, t + 1); ++s) {
              grow[s] = prow[s] == T(0) ? T(0) : prow[s] * (grow[s] - dot) * scale;
              if (grow[s] != T(0)) axpy(dq.data(), grow[s], base + s * C3 + C, hs);
            }
          });
          T* g = dqkv + (b * T_ + t) * C3 + h * hs;
#pragma omp simd
          for (int64_t c = 0; c < hs; ++c) g[c] += dq[static_cast<size_t>(c)];
        }
        // dk_s += sum_t dS[t, s] q_t and dv_s += sum_t P[t, s] dout_t, over the block's rows in order.
        for_tiles([&](int64_t s0, int64_t s1) {
          for (int64_t s = s0; s < s1; ++s) {
            T* dks = dk.data() + s * hs;
            T* dvs = dv.data() + s * hs;
            for (int64_t i = std::max<int64_t>(0, s - t0); i < nr; ++i) {
              const T ps = P[static_cast<size_t>(i * T_ + s)], gs = dP[static_cast<size_t>(i * T_ + s)];
              if (ps == T(0)) continue;
              axpy(dks, gs, base + (t0 + i) * C3, hs);
              axpy(dvs, ps, dbase + (t0 + i) * C, hs);
            }
          }
        });
      }
      for (int64_t s = 0; s < T_; ++s) {
        T* g = dqkv + (b * T_ + s) * C3 + h * hs;
        const T* dks = dk.data() + s * hs;
        const T* dvs = dv.data() + s * hs;
#pragma omp simd
        for (int64_t c = 0; c < hs; ++c) {
          g[C + c] += dks[c];
          g[2 * C + c] += dvs[c];
        }
      }
    }
  }
}

}  // namespace

int64_t attention_tiled_key_tiles(int64_t* tiles, const int32_t* span_row, int64_t t0, int64_t t1) {
  if (t1 <= t0) return 0;
  if (span_row == nullptr) {  // key mask form: every tile of the causal range [0, t1)
    const int64_t n = (t1 + kK - 1) / kK;
    for (int64_t j = 0; j < n; ++j) tiles[j] = j;
    return n;
  }
  // The visible ranges of the block's queries (up to two each), merged in ascending order; then the tiles they touch.
  std::pair<int64_t, int64_t> r[2 * kQ];  // [first, last] key
  int64_t nr = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const QueryKeys k = QueryKeys::from_span(span_row + t * kSpanWidth, t);
    if (k.lo < k.hole_lo) r[nr++] = {k.lo, std::min(k.hole_lo, t + 1) - 1};
    if (std::max(k.hole_hi, k.lo) <= t) r[nr++] = {std::max(k.hole_hi, k.lo), t};
  }
  std::sort(r, r + nr);
  int64_t n = 0;
  for (int64_t i = 0; i < nr; ++i) {
    for (int64_t j = r[i].first / kK; j <= r[i].second / kK; ++j)
      if (n == 0 || tiles[n - 1] < j) tiles[n++] = j;
  }
  return n;
}

template <class T>
void attention_tiled_forward(T* out, T* lse, const T* qkv, const int32_t* keymask, int64_t B, int64_t T_, int64_t C,
                             int64_t NH) {
  forward_impl(out, lse, qkv, keymask, nullptr, B, T_, C, NH);
}

template <class T>
void attention_tiled_backward(T* dqkv, const T* dout, const T* qkv, const int32_t* keymask, const T* lse, int64_t B,
                              int64_t T_, int64_t C, int64_t NH) {
  backward_impl(dqkv, dout, qkv, keymask, nullptr, lse, B, T_, C, NH);
}

template <class T>
void attention_tiled_forward_spans(T* out, T* lse, const T* qkv, const int32_t* span, int64_t B, int64_t T_,
                                   int64_t C, int64_t NH) {
  check_attention_spans(span, B, T_, "attention_tiled_forward_spans");
  forward_impl(out, lse, qkv, nullptr, span, B, T_, C, NH);
}

template <class T>
void attention_tiled_backward_spans(T* dqkv, const T* dout, const T* qkv, const int32_t* span, const T* lse,
                                    int64_t B, int64_t T_, int64_t C, int64_t NH) {
  check_attention_spans(span, B, T_, "attention_tiled_backward_spans");
  backward_impl(dqkv, dout, qkv, nullptr, span, lse, B, T_, C, NH);
}

template void attention_tiled_forward_spans<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t,
                                                   int64_t, int64_t);
template void attention_tiled_forward_spans<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t,
                                                    int64_t, int64_t);
template void attention_tiled_backward_spans<float>(float*, const float*, const float*, const int32_t*, const float*,
                                                    int64_t, int64_t, int64_t, int64_t);
template void attention_tiled_backward_spans<double>(double*, const double*, const double*, const int32_t*,
                                                     const double*, int64_t, int64_t, int64_t, int64_t);
template void attention_tiled_forward<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                                             int64_t);
template void attention_tiled_forward<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t,
                                              int64_t, int64_t);
template void attention_tiled_backward<float>(float*, const float*, const float*, const int32_t*, const float*,
                                              int64_t, int64_t, int64_t, int64_t);
template void attention_tiled_backward<double>(double*, const double*, const double*, const int32_t*, const double*,
                                               int64_t, int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
