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
#include "kernels/common.h"
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

// --- backward -------------------------------------------------------------------------------------------------------
// Oracle: attention_tiled_backward[_spans]<float> on the same bf16-rounded inputs and a bf16 dout, with the lse of
// the oracle's forward, into a zeroed dqkv [B, T, 3C] (grouped-query inputs expanded as above, so the kernel's dk and
// dv of kv head j are the sums of the oracle's over the query heads of group j).
//
// Budgets, per element (u, eps as above; sums over the visible pairs (t, k) of one head, in double from the oracle's
// probabilities P = exp(s scale - lse), dP = dout_t . v_k, delta_t = sum_k P dP, dS = P (dP - delta_t)):
//   The kernel's dS differs from the exact one by at most
//     b_S = u |dS|                  (dS rounded to bf16 before its mma)
//         + u P E_t                 (delta from the bf16 out: |out~ - out| <= u (A + |out|) per dim (forward budget),
//                                    so |delta~ - delta| <= u E_t, E_t = sum_d |dout_t,d| (A_t,d + |out_t,d|))
//         + P (e_t |dP - delta| + eps (2D + 8) sum_d |dout_t,d| (|v_k,d| + |out_t,d|))
//                                   (fp32: P's relative error e_t = eps (2 D S_t + 2 T + 8 |lse| + 16) from the score
//                                    and the lse, as in the forward's lse budget; dP and delta reduced over D in fp32)
//   dq[t, d] = scale sum_k dS k_k,d:  budget scale sum_k (b_S + 4 T eps |dS|) |k_k,d|
//   dk[k, d] = scale sum_t dS q_t,d:  budget scale sum_t (b_S + 4 T eps |dS|) |q_t,d|
//   dv[k, d] = sum_t P dout_t,d:      budget sum_t (u + e_t + 4 T eps) P |dout_t,d|   (P rounded to bf16 for its mma)
//   each plus u |target| for the output rounding (target = the oracle's gradient, plus the old value under "+=").
//   The 4 T eps terms are the fp32 accumulations over at most T terms on both sides (kernel and oracle).
// A wrong mask or fragment index moves a gradient by a whole term (P |dout| or scale |dS| |q|) of a sum of at most
// T, against a budget of about u (1/256) of the sum of their magnitudes.
struct Grads {
  std::vector<uint16_t> dqkv, dq, dk, dv;  // bf16 bits: packed uses dqkv [B, T, 3C], grouped dq, dk, dv
};

// Zeroed (or `fill`) gradient arrays in the layout of `in`.
inline Grads make_grads(const Inputs& in, uint16_t fill) {
  Grads g;
  const size_t slots = static_cast<size_t>(in.B * in.T);
  if (in.packed) {
    g.dqkv.assign(slots * static_cast<size_t>(3 * in.C()), fill);
  } else {
    g.dq.assign(slots * static_cast<size_t>(in.C()), fill);
    g.dk.assign(slots * static_cast<size_t>(in.NKV * in.D), fill);
    g.dv.assign(g.dk.size(), fill);
  }
  return g;
}

// The bf16 value of gradient `which` (0 q, 1 k, 2 v) at slot s, head (query head for q, kv head for k and v), dim d.
inline float grad_at(const Inputs& in, const Grads& g, int which, int64_t s, int64_t head, int64_t d) {
  const int64_t C = in.C(), KV = in.NKV * in.D;
  if (in.packed) return from_bf16(g.dqkv[static_cast<size_t>(s * 3 * C + which * C + head * in.D + d)]);
  if (which == 0) return from_bf16(g.dq[static_cast<size_t>(s * C + head * in.D + d)]);
  const auto& v = which == 1 ? g.dk : g.dv;
  return from_bf16(v[static_cast<size_t>(s * KV + head * in.D + d)]);
}

// BackwardParams over `base` pointers laid out as `in` (dout and out [B, T, C]; the gradients as make_grads).
inline flash::BackwardParams backward_params_for(const Inputs& in, const uint16_t* qkv, const uint16_t* q,
                                                 const uint16_t* k, const uint16_t* v, const uint16_t* out,
                                                 const uint16_t* dout, const float* lse, const int32_t* span,
                                                 uint16_t* dqkv, uint16_t* dq, uint16_t* dk, uint16_t* dv, float* delta,
                                                 GradWrite write) {
  const flash::Params f = params_for(in, qkv, q, k, v, nullptr, nullptr, span);
  flash::BackwardParams p;
  p.q = f.q, p.k = f.k, p.v = f.v, p.out = out, p.dout = dout, p.lse = lse, p.span = span, p.delta = delta;
  p.write = write;
  p.B = in.B, p.T = in.T, p.n_head = in.NH, p.n_kv_head = in.NKV, p.head_dim = in.D;
  p.q_stride = f.q_stride, p.k_stride = f.k_stride, p.v_stride = f.v_stride;
  p.out_stride = p.dout_stride = in.C();
  const int64_t C = in.C();
  if (in.packed) {
    p.dq = dqkv, p.dk = dqkv + C, p.dv = dqkv + 2 * C;
    p.dq_stride = p.dk_stride = p.dv_stride = 3 * C;
  } else {
    p.dq = dq, p.dk = dk, p.dv = dv;
    p.dq_stride = C, p.dk_stride = p.dv_stride = in.NKV * in.D;
  }
  return p;
}

// The oracle's dqkv [B, T, 3C] for dout (float, the bf16 values) with the oracle forward's lse.
inline std::vector<float> backward_oracle(const Inputs& in, const std::vector<float>& dout, const Result& fwd) {
  std::vector<float> dqkv(static_cast<size_t>(in.B * in.T * 3 * in.C()), 0.0f);
  if (in.span.empty())
    cpu::attention_tiled_backward<float>(dqkv.data(), dout.data(), in.ref_qkv.data(), nullptr, fwd.lse.data(), in.B,
                                         in.T, in.C(), in.NH);
  else
    cpu::attention_tiled_backward_spans<float>(dqkv.data(), dout.data(), in.ref_qkv.data(), in.span.data(),
                                               fwd.lse.data(), in.B, in.T, in.C(), in.NH);
  return dqkv;
}

// The budgets above, without the output rounding term, of the oracle's expanded gradients ([B, T, 3C] like its
// dqkv), from the oracle forward's out and lse. `slack` multiplies the fp32 parts, as in expect_within_budget.
inline std::vector<double> backward_budgets(const Inputs& in, const std::vector<float>& dout, const Result& fwd,
                                            double slack = 1.0) {
  const int64_t B = in.B, T = in.T, NH = in.NH, D = in.D, C = in.C(), C3 = 3 * C;
  const double u = std::ldexp(1.0, -8), eps = FLT_EPSILON, scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> bud(static_cast<size_t>(B * T * C3), 0.0);
  std::vector<double> A(static_cast<size_t>(D)), P(static_cast<size_t>(T)), dP(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const float* base = in.ref_qkv.data() + b * T * C3 + h * D;
      const float* gbase = dout.data() + b * T * C + h * D;
      const float* obase = fwd.out.data() + b * T * C + h * D;
      double* bb = bud.data() + b * T * C3 + h * D;
      double max_knorm = 0.0;
      for (int64_t k = 0; k < T; ++k) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) n2 += double(base[k * C3 + C + d]) * base[k * C3 + C + d];
        max_knorm = std::max(max_knorm, std::sqrt(n2));
      }
      for (int64_t t = 0; t < T; ++t) {
        const double l = fwd.lse[static_cast<size_t>((b * NH + h) * T + t)];
        if (std::isinf(l)) continue;
        double qn2 = 0.0;
        for (int64_t d = 0; d < D; ++d) qn2 += double(base[t * C3 + d]) * base[t * C3 + d];
        const double S = scale * std::sqrt(qn2) * max_knorm;
        const double e_t = slack * eps * (2 * D * S + 2 * T + 8 * std::fabs(l) + 16);
        std::fill(A.begin(), A.end(), 0.0);
        double delta = 0.0;
        for (int64_t k = 0; k <= t; ++k) {
          P[static_cast<size_t>(k)] = dP[static_cast<size_t>(k)] = 0.0;
          if (!sees(in, b, t, k)) continue;
          double s = 0.0, g = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            s += double(base[t * C3 + d]) * base[k * C3 + C + d];
            g += double(gbase[t * C + d]) * base[k * C3 + 2 * C + d];
          }
          const double pk = std::exp(s * scale - l);
          P[static_cast<size_t>(k)] = pk, dP[static_cast<size_t>(k)] = g;
          delta += pk * g;
          for (int64_t d = 0; d < D; ++d) A[static_cast<size_t>(d)] += pk * std::fabs(double(base[k * C3 + 2 * C + d]));
        }
        double E = 0.0, go = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          E += std::fabs(double(gbase[t * C + d])) * (A[static_cast<size_t>(d)] + std::fabs(double(obase[t * C + d])));
          go += std::fabs(double(gbase[t * C + d])) * std::fabs(double(obase[t * C + d]));
        }
        for (int64_t k = 0; k <= t; ++k) {
          const double pk = P[static_cast<size_t>(k)];
          if (pk == 0.0) continue;
          double gv = 0.0;
          for (int64_t d = 0; d < D; ++d)
            gv += std::fabs(double(gbase[t * C + d])) * std::fabs(double(base[k * C3 + 2 * C + d]));
          const double dpd = dP[static_cast<size_t>(k)] - delta, ds = pk * dpd;
          const double bS = u * std::fabs(ds) + u * pk * E +
                            pk * (e_t * std::fabs(dpd) + slack * eps * (2 * D + 8) * (gv + go)) +
                            slack * 4 * T * eps * std::fabs(ds);
          const double bV = (u + e_t + slack * 4 * T * eps) * pk;
          for (int64_t d = 0; d < D; ++d) {
            bb[t * C3 + d] += scale * bS * std::fabs(double(base[k * C3 + C + d]));
            bb[k * C3 + C + d] += scale * bS * std::fabs(double(base[t * C3 + d]));
            bb[k * C3 + 2 * C + d] += bV * std::fabs(double(gbase[t * C + d]));
          }
        }
      }
    }
  return bud;
}

// Checks got (bf16 gradients in the layout of `in`) against old + the oracle's gradient within the budgets above.
// old: the gradients' values before an Accumulate call (null: Overwrite, target = the oracle's gradient).
inline void expect_backward_within_budget(const Inputs& in, const std::vector<float>& dout, const Result& fwd,
                                          const std::vector<float>& ref, const Grads& got, const Grads* old,
                                          double slack = 1.0) {
  const int64_t B = in.B, T = in.T, NH = in.NH, D = in.D, C = in.C(), C3 = 3 * C, group = in.NH / in.NKV;
  const double u = std::ldexp(1.0, -8);
  const std::vector<double> bud = backward_budgets(in, dout, fwd, slack);
  // Compare: q per query head; k and v per kv head against the sums over its group.
  int failures = 0;
  const char* names[3] = {"dq", "dk", "dv"};
  for (int which = 0; which < 3 && failures < 8; ++which) {
    const int64_t heads = which == 0 ? NH : in.NKV, per = which == 0 ? 1 : group;
    for (int64_t s = 0; s < B * T && failures < 8; ++s)
      for (int64_t hh = 0; hh < heads && failures < 8; ++hh)
        for (int64_t d = 0; d < D && failures < 8; ++d) {
          double target = old ? grad_at(in, *old, which, s, hh, d) : 0.0, tol = 0.0;
          for (int64_t j = 0; j < per; ++j) {
            const size_t i = static_cast<size_t>(s * C3 + which * C + (hh * per + j) * D + d);
            target += ref[i];
            tol += bud[i];
          }
          tol += u * std::fabs(target);
          const double g = grad_at(in, got, which, s, hh, d);
          if (!(std::fabs(g - target) <= tol)) {
            ADD_FAILURE() << names[which] << " slot " << s << " (b=" << s / T << " t=" << s % T << ") head " << hh
                          << " d=" << d << ": got " << g << ", want " << target << ", budget " << tol;
            ++failures;
          }
        }
  }
}

}  // namespace dpo::flash_test
