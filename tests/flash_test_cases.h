// Inputs, span layouts, the CPU oracle and the error budgets shared by the flash attention tests: the host emulation
// (tests/test_flash_emulation.cpp) and the GPU kernel (tests/test_cuda_flash.cpp) are checked by the same code.
//
// Oracle: the blocked CPU kernel (kernels/attention.h, attention_tiled_forward / attention_tiled_forward_spans) in
// float, on the bf16-rounded inputs the kernel reads, in GPT-2's packed form qkv [B, T, 3C]; for grouped-query inputs
// the kv heads are expanded into that form (query head h gets kv head h / (n_head / n_kv_head)).
//
// Budgets, per element (u = 2^-8, the unit roundoff of bf16's 8-bit significand; eps = FLT_EPSILON):
//   out[t, d]: the kernel rounds each probability p to bf16 before P.V (|p~ - p| <= u p) but sums l from the
//     unrounded p, so out moves by at most u * A[t, d], A = sum_k p_k |v_k,d| (the probability-weighted mean of |v|,
//     computed here in double from the oracle's lse); the bf16 output rounding adds u |out|. The fp32 parts of both
//     sides (scores reduced over D: at most D eps sum_i |q_i k_i| <= D eps S each, S = scale |q_t| max_k |k_k|; sums
//     over at most T keys) add eps (2 D S + 2 T + 8) max|v|.
//   lse[t]: no bf16 rounding on this path; the two fp32 computations differ by at most eps (2 D S + 2 T + 4 |lse|).
// A wrong mask or a wrong fragment index moves an output by about p_k |v_k - out| (a key of a row of n keys: ~1/n)
// and lse by about p_k, far above the lse budget at these sizes.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/batch_layout.h"
#include "kernels/flash_attention.h"

namespace dpo::flash_test {

inline uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One call's inputs: the kernel's bf16 arrays and the oracle's packed float qkv.
struct Inputs {
  int64_t B = 0, T = 0, NH = 0, NKV = 0, D = 0;
  bool packed = true;                 // q, k, v inside one qkv array (GPT-2) or three arrays (grouped-query)
  std::vector<uint16_t> qkv, q, k, v;  // bf16 bits: packed uses qkv, grouped uses q, k, v
  std::vector<float> ref_qkv;          // [B, T, 3 NH D], exactly the values the kernel reads
  std::vector<int32_t> span;           // [B, T, 3] or empty (causal)
  int64_t C() const { return NH * D; }
};

inline std::vector<uint16_t> rand_bf16(std::mt19937_64& g, int64_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = to_bf16(d(g));
  return v;
}

inline Inputs packed_inputs(std::mt19937_64& g, int64_t B, int64_t T, int64_t NH, int64_t D) {
  Inputs in;
  in.B = B, in.T = T, in.NH = NH, in.NKV = NH, in.D = D, in.packed = true;
  in.qkv = rand_bf16(g, B * T * 3 * NH * D);
  in.ref_qkv.resize(in.qkv.size());
  for (size_t i = 0; i < in.qkv.size(); ++i) in.ref_qkv[i] = from_bf16(in.qkv[i]);
  return in;
}

inline Inputs grouped_inputs(std::mt19937_64& g, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t D) {
  Inputs in;
  in.B = B, in.T = T, in.NH = NH, in.NKV = NKV, in.D = D, in.packed = false;
  in.q = rand_bf16(g, B * T * NH * D);
  in.k = rand_bf16(g, B * T * NKV * D);
  in.v = rand_bf16(g, B * T * NKV * D);
  const int64_t C = NH * D, group = NH / NKV;
  in.ref_qkv.resize(static_cast<size_t>(B * T * 3 * C));
  for (int64_t s = 0; s < B * T; ++s)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t d = 0; d < D; ++d) {
        float* row = in.ref_qkv.data() + s * 3 * C + h * D + d;
        row[0] = from_bf16(in.q[static_cast<size_t>((s * NH + h) * D + d)]);
        row[C] = from_bf16(in.k[static_cast<size_t>((s * NKV + h / group) * D + d)]);
        row[2 * C] = from_bf16(in.v[static_cast<size_t>((s * NKV + h / group) * D + d)]);
      }
  return in;
}

// Params over `base` pointers (host arrays for the emulation, device copies for the GPU): qkv or q, k, v as in `in`.
inline flash::Params params_for(const Inputs& in, const uint16_t* qkv, const uint16_t* q, const uint16_t* k,
                                const uint16_t* v, uint16_t* out, float* lse, const int32_t* span) {
  flash::Params p;
  const int64_t C = in.C();
  if (in.packed) {
    p.q = qkv, p.k = qkv + C, p.v = qkv + 2 * C;
    p.q_stride = p.k_stride = p.v_stride = 3 * C;
  } else {
    p.q = q, p.k = k, p.v = v;
    p.q_stride = C, p.k_stride = p.v_stride = in.NKV * in.D;
  }
  p.out = out, p.lse = lse, p.span = span;
  p.B = in.B, p.T = in.T, p.n_head = in.NH, p.n_kv_head = in.NKV, p.head_dim = in.D, p.out_stride = C;
  return p;
}

// Slot `to` of row b gets the q, k and v of slot `from` (every head), in the kernel's arrays and the oracle's.
inline void copy_slot(Inputs& in, int64_t b, int64_t from, int64_t to) {
  const int64_t C = in.C(), KV = in.NKV * in.D;
  const auto copy = [&](auto& v, int64_t w) {
    std::copy_n(v.begin() + (b * in.T + from) * w, w, v.begin() + (b * in.T + to) * w);
  };
  copy(in.ref_qkv, 3 * C);
  if (in.packed) {
    copy(in.qkv, 3 * C);
  } else {
    copy(in.q, C);
    copy(in.k, KV);
    copy(in.v, KV);
  }
}

// --- span layouts (kernels/batch_layout.h) --------------------------------------------------------------------------
inline void set_span(std::vector<int32_t>& s, int64_t slot, int64_t lo, int64_t hl, int64_t hh) {
  s[static_cast<size_t>(slot * kSpanWidth + kSpanLo)] = static_cast<int32_t>(lo);
  s[static_cast<size_t>(slot * kSpanWidth + kSpanHoleLo)] = static_cast<int32_t>(hl);
  s[static_cast<size_t>(slot * kSpanWidth + kSpanHoleHi)] = static_cast<int32_t>(hh);
}
// Every slot padding ({t, t, t}: itself only).
inline std::vector<int32_t> padding_spans(int64_t B, int64_t T) {
  std::vector<int32_t> s(static_cast<size_t>(B * T * kSpanWidth));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) set_span(s, b * T + t, t, t, t);
  return s;
}
// Segments of the given lengths from `start` of row b, each causal within itself.
inline void pack_row(std::vector<int32_t>& s, int64_t T, int64_t b, int64_t start, const std::vector<int64_t>& lens) {
  for (int64_t len : lens) {
    for (int64_t t = start; t < start + len; ++t) set_span(s, b * T + t, start, t, t);
    start += len;
  }
}
// A prefix_shared segment at slot a of row b: [prompt P | chosen Ch | dup | rejected R]; returns the dup slot.
inline int64_t prefix_shared_segment(std::vector<int32_t>& s, int64_t T, int64_t b, int64_t a, int64_t P, int64_t Ch,
                                     int64_t R) {
  const int64_t d = a + P + Ch;
  for (int64_t t = a; t < d; ++t) set_span(s, b * T + t, a, t, t);
  set_span(s, b * T + d, a, a + P - 1, d);
  for (int64_t t = d + 1; t < d + 1 + R; ++t) set_span(s, b * T + t, a, a + P, d + 1);
  return d;
}
// Row 0 left-padded by 7 slots, row 1 right-padded after `real1` slots (B = 2).
inline std::vector<int32_t> padded_spans(int64_t T, int64_t real1) {
  auto s = padding_spans(2, T);
  for (int64_t t = std::min<int64_t>(7, T - 1); t < T; ++t) set_span(s, t, std::min<int64_t>(7, T - 1), t, t);
  pack_row(s, T, 1, 0, {real1});
  return s;
}

// --- oracle and comparison ----------------------------------------------------------------------------------------
struct Result {
  std::vector<float> out, lse;  // [B, T, C], [B, NH, T]
};

inline Result oracle(const Inputs& in) {
  Result r;
  r.out.assign(static_cast<size_t>(in.B * in.T * in.C()), NAN);
  r.lse.assign(static_cast<size_t>(in.B * in.NH * in.T), NAN);
  if (in.span.empty())
    cpu::attention_tiled_forward<float>(r.out.data(), r.lse.data(), in.ref_qkv.data(), nullptr, in.B, in.T, in.C(),
                                        in.NH);
  else
    cpu::attention_tiled_forward_spans<float>(r.out.data(), r.lse.data(), in.ref_qkv.data(), in.span.data(), in.B,
                                              in.T, in.C(), in.NH);
  return r;
}

inline bool sees(const Inputs& in, int64_t b, int64_t t, int64_t k) {
  if (in.span.empty()) return k <= t;
  return span_sees(in.span.data() + (b * in.T + t) * kSpanWidth, t, k);
}

// Checks got (out as bf16 bits, lse) against the oracle within the budgets of the file comment; `slack` multiplies
// the fp32 part (the GPU's tensor cores may sum in another order). Stops after a few reported failures.
inline void expect_within_budget(const Inputs& in, const Result& ref, const std::vector<uint16_t>& got_out,
                                 const std::vector<float>& got_lse, double slack = 1.0) {
  const int64_t B = in.B, T = in.T, NH = in.NH, D = in.D, C = in.C(), C3 = 3 * C;
  const double u = std::ldexp(1.0, -8), eps = FLT_EPSILON, scale = 1.0 / std::sqrt(static_cast<double>(D));
  int failures = 0;
  std::vector<double> A(static_cast<size_t>(D)), p(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const float* base = in.ref_qkv.data() + b * T * C3 + h * D;
      double max_v = 0.0, max_knorm = 0.0;
      for (int64_t k = 0; k < T; ++k) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          n2 += double(base[k * C3 + C + d]) * base[k * C3 + C + d];
          max_v = std::max(max_v, std::fabs(double(base[k * C3 + 2 * C + d])));
        }
        max_knorm = std::max(max_knorm, std::sqrt(n2));
      }
      for (int64_t t = 0; t < T && failures < 8; ++t) {
        double qn2 = 0.0;
        for (int64_t d = 0; d < D; ++d) qn2 += double(base[t * C3 + d]) * base[t * C3 + d];
        const double S = scale * std::sqrt(qn2) * max_knorm;
        const double l_ref = ref.lse[static_cast<size_t>((b * NH + h) * T + t)];
        const double l_got = got_lse[static_cast<size_t>((b * NH + h) * T + t)];
        const double tol_l = slack * eps * (2 * D * S + 2 * T + 4 * std::fabs(l_ref));
        if (!(std::fabs(l_got - l_ref) <= tol_l)) {
          ADD_FAILURE() << "lse b=" << b << " h=" << h << " t=" << t << ": got " << l_got << ", oracle " << l_ref
                        << ", budget " << tol_l;
          ++failures;
        }
        // A[d] = sum_k p_k |v_k,d| with the oracle's probabilities.
        std::fill(A.begin(), A.end(), 0.0);
        for (int64_t k = 0; k <= t; ++k) {
          if (!sees(in, b, t, k)) continue;
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += double(base[t * C3 + d]) * base[k * C3 + C + d];
          const double pk = std::exp(s * scale - l_ref);
          for (int64_t d = 0; d < D; ++d) A[static_cast<size_t>(d)] += pk * std::fabs(double(base[k * C3 + 2 * C + d]));
        }
        for (int64_t d = 0; d < D && failures < 8; ++d) {
          const size_t i = static_cast<size_t>((b * T + t) * C + h * D + d);
          const double r = ref.out[i], g = from_bf16(got_out[i]);
          const double tol = u * (A[static_cast<size_t>(d)] + std::fabs(r)) +
                             slack * eps * (2 * D * S + 2 * T + 8) * max_v;
          if (!(std::fabs(g - r) <= tol)) {
            ADD_FAILURE() << "out b=" << b << " t=" << t << " h=" << h << " d=" << d << ": got " << g << ", oracle "
                          << r << ", budget " << tol;
            ++failures;
          }
        }
      }
    }
}

// The (query block, key tile) pairs a block of kFlashBlockRows queries must visit: tiles holding a key that some
// query of the block sees, found by span_sees over every pair (not by the kernel's test). Summed over B * NH.
inline int64_t needed_tile_visits(const Inputs& in) {
  const int64_t T = in.T, R = flash::kFlashBlockRows, K = flash::kFlashTileKeys;
  int64_t n = 0;
  for (int64_t b = 0; b < in.B; ++b)
    for (int64_t t0 = 0; t0 < T; t0 += R)
      for (int64_t k0 = 0; k0 < T; k0 += K) {
        bool any = false;
        for (int64_t t = t0; t < std::min(T, t0 + R) && !any; ++t)
          for (int64_t k = k0; k < std::min(T, k0 + K) && !any; ++k) any = sees(in, b, t, k);
        n += any;
      }
  return n * in.NH;
}

// The dup slots and prompt-last slots of the prefix_shared case below: {row, dup slot, prompt's last slot}.
struct DupPair {
  int64_t b, dup, last;
};
inline std::vector<DupPair> prefix_shared_dups() { return {{0, 110, 69}, {0, 211, 180}, {1, 169, 104}}; }

// The named cases both tests run. `D` is 64 or 128.
struct NamedCase {
  std::string name;
  Inputs in;
};

inline std::vector<NamedCase> standard_cases(std::mt19937_64& g, int64_t D, bool long_t) {
  std::vector<NamedCase> cs;
  for (int64_t T : {1, 17, 64, 100, 257}) cs.push_back({"causal T=" + std::to_string(T), packed_inputs(g, 2, T, 3, D)});
  if (long_t) cs.push_back({"causal T=1024", packed_inputs(g, 1, 1024, 2, D)});
  cs.push_back({"grouped NH=4 NKV=2 T=100", grouped_inputs(g, 2, 100, 4, 2, D)});
  cs.push_back({"grouped NH=4 NKV=1 T=130", grouped_inputs(g, 2, 130, 4, 1, D)});
  {
    NamedCase c{"left/right padding T=100", packed_inputs(g, 2, 100, 3, D)};
    c.in.span = padded_spans(100, 81);
    cs.push_back(std::move(c));
  }
  {
    NamedCase c{"packed T=257", packed_inputs(g, 2, 257, 3, D)};
    c.in.span = padding_spans(2, 257);
    pack_row(c.in.span, 257, 0, 0, {70, 1, 100, 64});
    pack_row(c.in.span, 257, 1, 0, {130, 127});
    cs.push_back(std::move(c));
  }
  {
    NamedCase c{"prefix_shared T=257 grouped", grouped_inputs(g, 2, 257, 4, 2, D)};
    c.in.span = padding_spans(2, 257);
    prefix_shared_segment(c.in.span, 257, 0, 0, 70, 40, 50);
    prefix_shared_segment(c.in.span, 257, 0, 161, 20, 30, 40);
    prefix_shared_segment(c.in.span, 257, 1, 5, 100, 64, 80);
    for (const DupPair& dp : prefix_shared_dups()) copy_slot(c.in, dp.b, dp.last, dp.dup);  // dup = prompt's last
    cs.push_back(std::move(c));
  }
  return cs;
}

}  // namespace dpo::flash_test
