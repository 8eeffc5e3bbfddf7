// The tile code of the flash attention backward (contract: kernels/flash_attention.h, BackwardParams), written once
// over the warp policy of kernels/flash_tile.h (its header lists what a policy supplies and the fragment layouts):
// the GPU runs it in kernels/flash_attention.cu, the host emulation in kernels/flash_emulation.h.
//
// Three parts:
//   backward_delta_row  the preprocess: delta = sum_d dout * out of one (b, h, t), d ascending in fp32.
//   dkdv_block          one (key tile, kv head, b): warp w owns keys k0 + 16 w + [0, 16). For every query head of the
//                       group (ascending) and every query block the forward pairs with this key tile (ascending):
//                         S^T = K_w Q^T, P^T = exp(S^T scale - lse) on the visible pairs (0 elsewhere),
//                         dV_w += P^T dO, dP^T = V_w dO^T, dS^T = P^T (dP^T - delta), dK_w += dS^T Q;
//                       then dk = scale dK and dv = dV are written once.
//   dq_block            one (query block, head, b), as the forward's blocks: warp w owns queries t0 + 16 w + [0, 16);
//                       over the visited key tiles (ascending): S = Q K^T, P, dP = dO V^T, dS, dQ += dS K; then
//                       dq = scale dQ is written once.
// The products with a 16-row operand on the left and a 64-row shared tile on the right are the forward's two
// patterns: rows_dot_tile (left . tile^T, the tile's rows are the n dimension: ldmatrix without .trans, as K in the
// forward's Q K^T) and frags_times_tile (left . tile, the tile's rows are the k dimension: ldmatrix .trans, as V in
// the forward's P V). A C fragment of 16 rows x 16 columns becomes the A fragment of the next product register for
// register (pack_c_to_a), as P does in the forward.
//
// Shared memory of both passes: four tiles of 64 rows x (D + kSmemPad) bf16, K, V, Q, dO in that order (the dq pass
// keeps Q and dO of its block there for the whole block; the dk/dv pass keeps K and V), then, for the dk/dv pass,
// per query of the staged block: lse (fp32), delta (fp32) and the span (3 int32). 69 KiB at D = 128, so the
// launcher raises the kernels' dynamic shared-memory limit (kernels/flash_attention.cu).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/batch_layout.h"
#include "kernels/common.h"
#include "kernels/flash_attention.h"
#include "kernels/flash_tile.h"

#if defined(__CUDACC__)
#define DPO_FLASH_LOOP_KEEP _Pragma("unroll 1")
#else
#define DPO_FLASH_LOOP_KEEP
#endif

namespace dpo::flash {

static_assert(kBlockRows == kTileKeys, "the dk/dv pass pairs key tile j with the query blocks j, j + 1, ...");

constexpr int kDkvHalfQueries = 32;  // the dk/dv pass takes a staged query block in two halves

constexpr int64_t key_tiles(int64_t T) { return (T + kTileKeys - 1) / kTileKeys; }
constexpr int64_t backward_delta_rows(const BackwardParams& p) { return p.B * p.n_head * p.T; }
inline int64_t dkdv_grid_blocks(const BackwardParams& p) { return p.B * p.n_kv_head * key_tiles(p.T); }
inline int64_t dq_grid_blocks(const BackwardParams& p) { return p.B * p.n_head * query_blocks(p.T); }

template <int D>
constexpr int64_t bwd_tile_elems() {
  return int64_t{4} * kTileKeys * (D + kSmemPad);
}
// Per staged query: lse, delta (fp32) and the span (kSpanWidth int32).
constexpr int64_t kBwdAuxBytesPerQuery = 2 * 4 + kSpanWidth * 4;
template <int D>
constexpr int64_t bwd_smem_bytes() {
  return bwd_tile_elems<D>() * 2 + kBlockRows * kBwdAuxBytesPerQuery;
}

// --- preprocess -----------------------------------------------------------------------------------------------------

// delta[row] for row = (b * n_head + h) * T + t.
template <class W>
DPO_FLASH_FN void backward_delta_row(const BackwardParams& p, int64_t row) {
  const int64_t t = row % p.T, bh = row / p.T, b = bh / p.n_head, h = bh % p.n_head;
  const uint16_t* o = p.out + (b * p.T + t) * p.out_stride + h * p.head_dim;
  const uint16_t* g = p.dout + (b * p.T + t) * p.dout_stride + h * p.head_dim;
  float acc = 0.0f;
  for (int64_t d = 0; d < p.head_dim; d += 2) {
    const uint32_t x = W::load_u32(o + d), y = W::load_u32(g + d);
    acc += W::lo(x) * W::lo(y);
    acc += W::hi(x) * W::hi(y);
  }
  p.delta[row] = acc;
}

// --- warp products --------------------------------------------------------------------------------------------------

template <class W>
using Frag4 = typename W::template Regs<uint32_t, 4>;

// s (16 rows x 16 NP tile rows, 2 NP C fragments of 8 tile rows) = A . tile^T. load_a(kc, a) puts the A fragment
// of dims [16 kc, 16 kc + 16) into a; tile: 16 NP rows of D bf16 at row stride D + kSmemPad.
template <class W, int D, int NP, class LoadA>
DPO_FLASH_FN void rows_dot_tile(typename W::template Regs<float, 8 * NP>& s, LoadA&& load_a, const uint16_t* tile) {
  constexpr int S = D + kSmemPad;
  W::each([&](int lane) {
    DPO_FLASH_UNROLL
    for (int i = 0; i < 8 * NP; ++i) s(lane, i) = 0.0f;
  });
  DPO_FLASH_UNROLL
  for (int kc = 0; kc < D / 16; ++kc) {
    Frag4<W> a;
    load_a(kc, a);
    DPO_FLASH_UNROLL
    for (int np = 0; np < NP; ++np) {
      Frag4<W> kb;
      // matrix j = lane / 8: tile rows 16 np + 8 (j >> 1) + [0, 8), dims 16 kc + 8 (j & 1) + [0, 8)
      W::template ldmatrix_x4<false>(kb, 0, [&](int lane) {
        return tile + (16 * np + (lane & 7) + 8 * (lane >> 4)) * S + 16 * kc + 8 * ((lane >> 3) & 1);
      });
      W::mma(s, 4 * (2 * np), a, 0, kb, 0);
      W::mma(s, 4 * (2 * np + 1), a, 0, kb, 2);
    }
  }
}

// The A fragment of rows [r0, r0 + 16) and dims [16 kc, 16 kc + 16) of a shared tile (row stride D + kSmemPad):
// matrix j: rows r0 + 8 (j & 1) + [0, 8), dims 16 kc + 8 (j >> 1) + [0, 8).
template <class W, int D>
DPO_FLASH_FN void load_a_from_tile(Frag4<W>& a, const uint16_t* tile, int r0, int kc) {
  constexpr int S = D + kSmemPad;
  W::template ldmatrix_x4<false>(a, 0, [&](int lane) {
    return tile + (r0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + 16 * kc + 8 * (lane >> 4);
  });
}

// acc (16 rows x D, C fragments of 8 dims: dims [8 dn, 8 dn + 8) in [4 dn, 4 dn + 4)) += pa . tile, pa: 16 rows x
// 16 NP as NP A fragments of 16 columns (registers [4 kk, 4 kk + 4)); tile: 16 NP rows (the k dimension) of D bf16.
template <class W, int D, int NP>
DPO_FLASH_FN void frags_times_tile(typename W::template Regs<float, D / 2>& acc,
                                   const typename W::template Regs<uint32_t, 4 * NP>& pa, const uint16_t* tile) {
  constexpr int S = D + kSmemPad;
  DPO_FLASH_UNROLL
  for (int kk = 0; kk < NP; ++kk) {
    DPO_FLASH_UNROLL
    for (int dp = 0; dp < D / 16; ++dp) {
      Frag4<W> vb;
      // matrix j = lane / 8: tile rows 16 kk + 8 (j & 1) + [0, 8), dims 16 dp + 8 (j >> 1) + [0, 8)
      W::template ldmatrix_x4<true>(vb, 0, [&](int lane) {
        return tile + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + 16 * dp + 8 * (lane >> 4);
      });
      W::mma(acc, 4 * (2 * dp), pa, 4 * kk, vb, 0);
      W::mma(acc, 4 * (2 * dp + 1), pa, 4 * kk, vb, 2);
    }
  }
}

// C fragments of column chunks 2 kk and 2 kk + 1 -> the A fragment of columns [16 kk, 16 kk + 16), rounded to bf16
// (A reg 0: row g, columns 2c..; 1: row g + 8; 2: row g, columns 8 + 2c..; 3: row g + 8; as the forward's P).
template <class W, int NP>
DPO_FLASH_FN void pack_c_to_a(const typename W::template Regs<float, 8 * NP>& s,
                              typename W::template Regs<uint32_t, 4 * NP>& pa) {
  W::each([&](int lane) {
    DPO_FLASH_UNROLL
    for (int kk = 0; kk < NP; ++kk) {
      DPO_FLASH_UNROLL
      for (int j = 0; j < 4; ++j)
        pa(lane, 4 * kk + j) = W::pack_bf16x2(s(lane, 8 * kk + 2 * j), s(lane, 8 * kk + 2 * j + 1));
    }
  });
}

// Lane `lane`'s part of one output row: acc registers of row half rr (row g + 8 rr), dims 8 dn + 2 c + {0, 1}, times
// mul, into the bf16 row `row` (= or += per mode; += reads the old pair and adds it in fp32 before the one rounding).
template <class W, int D>
DPO_FLASH_FN void write_grad_row(uint16_t* row, const typename W::template Regs<float, D / 2>& acc, int lane, int rr,
                                 float mul, GradWrite mode) {
  const int c = lane & 3;
  DPO_FLASH_UNROLL
  for (int dn = 0; dn < D / 8; ++dn) {
    uint16_t* dst = row + 8 * dn + 2 * c;
    float x0 = acc(lane, 4 * dn + 2 * rr) * mul, x1 = acc(lane, 4 * dn + 2 * rr + 1) * mul;
    if (mode == GradWrite::Accumulate) {
      const uint32_t old = W::load_u32(dst);
      x0 = W::lo(old) + x0;
      x1 = W::hi(old) + x1;
    }
    W::store_u32(dst, W::pack_bf16x2(x0, x1));
  }
}

// Stages rows [r0, r0 + 64) (zeros from `limit` on) of a strided bf16 array into a shared tile; thread tid of the
// block's kThreads copies every kThreads-th 16-byte chunk.
template <class W, int D>
DPO_FLASH_FN void stage_tile(uint16_t* tile, const uint16_t* base, int64_t stride, int64_t r0, int64_t limit,
                             int tid) {
  constexpr int S = D + kSmemPad, CH = D / 8;
  DPO_FLASH_UNROLL
  for (int i = tid; i < kTileKeys * CH; i += kThreads) {
    const int row = i / CH, ch = i % CH;
    if (r0 + row < limit)
      W::copy16(tile + row * S + 8 * ch, base + (r0 + row) * stride + 8 * ch);
    else
      W::zero16(tile + row * S + 8 * ch);
  }
}

// The forward's tile vote for (query block [t0, t0 + 64), key tile [k0, k0 + 64)): whether some query of the block
// sees some key of the tile. The same answer in every warp and lane (a block-uniform branch).
template <class W>
DPO_FLASH_FN bool block_sees_tile(const BackwardParams& p, int64_t b, int64_t t0, int64_t k0) {
  bool visit = false;
  W::warps([&](int, int) {
    visit = W::any([&](int lane) {
      bool seen = false;
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        int32_t sp[3];
        query_span(p, b, t0 + lane + 32 * rr, sp);
        seen = seen || span_sees_any(sp, t0 + lane + 32 * rr, k0, k0 + kTileKeys);
      }
      return seen;
    });
  });
  return visit;
}

// --- dk / dv pass ---------------------------------------------------------------------------------------------------

template <class W, int D>
struct DkvRegs {
  typename W::template Regs<float, D / 2> dk, dv;  // keys g and g + 8 of the warp's 16, C fragments as the forward's o
};

// One warp's keys [kr0, kr0 + 16) of the tile (slots k0 + kr0 + ...) against the staged query block (slots t0 + ...),
// in two halves of 32 queries (half the score and dP registers of a whole block: no spills at D = 128).
template <class W, int D>
DPO_FLASH_FN void dkdv_warp_tile(DkvRegs<W, D>& r, const uint16_t* ks, const uint16_t* vs, const uint16_t* qs,
                                 const uint16_t* dos, const float* lse_s, const float* dl_s, const int32_t* sp_s,
                                 int kr0, int64_t k0, int64_t t0, float scale) {
  constexpr int S = D + kSmemPad, NP = kDkvHalfQueries / 16;
  using FR = typename W::template Regs<float, 8 * NP>;
  DPO_FLASH_LOOP_KEEP  // not unrolled: the halves would be interleaved back into a whole block's registers
  for (int half = 0; half < kBlockRows / kDkvHalfQueries; ++half) {
    const int q0 = kDkvHalfQueries * half;
    const uint16_t* qh = qs + q0 * S;
    const uint16_t* doh = dos + q0 * S;
    typename W::template Regs<uint32_t, 4 * NP> pa;
    // S^T = K_w Q^T; C register 4 nc + 2 rr + e: key kr0 + g + 8 rr, query q0 + 8 nc + 2 c + e of the block.
    FR s;
    rows_dot_tile<W, D, NP>(s, [&](int kc, Frag4<W>& a) { load_a_from_tile<W, D>(a, ks, kr0, kc); }, qh);
    W::each([&](int lane) {
      const int g = lane >> 2, c = lane & 3;
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t key = k0 + kr0 + g + 8 * rr;
        DPO_FLASH_UNROLL
        for (int nc = 0; nc < 2 * NP; ++nc) {
          DPO_FLASH_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int i = 4 * nc + 2 * rr + e, qi = q0 + 8 * nc + 2 * c + e;
            // Invisible pairs (masked, keys or queries past T) are exact zeros whatever the score or lse (+inf for a
            // query that sees nothing).
            s(lane, i) = span_sees(sp_s + kSpanWidth * qi, t0 + qi, key)
                             ? W::exp2((s(lane, i) * scale - lse_s[qi]) * kLog2e)
                             : 0.0f;
          }
        }
      }
    });
    pack_c_to_a<W, NP>(s, pa);
    frags_times_tile<W, D, NP>(r.dv, pa, doh);  // dV_w += P^T dO
    FR dp;                                       // dP^T = V_w dO^T
    rows_dot_tile<W, D, NP>(dp, [&](int kc, Frag4<W>& a) { load_a_from_tile<W, D>(a, vs, kr0, kc); }, doh);
    W::each([&](int lane) {
      const int c = lane & 3;
      DPO_FLASH_UNROLL
      for (int i = 0; i < 8 * NP; ++i) {
        const int qi = q0 + 8 * (i >> 2) + 2 * c + (i & 1);
        const float pv = s(lane, i);
        dp(lane, i) = pv == 0.0f ? 0.0f : pv * (dp(lane, i) - dl_s[qi]);
      }
    });
    pack_c_to_a<W, NP>(dp, pa);
    frags_times_tile<W, D, NP>(r.dk, pa, qh);  // dK_w += dS^T Q
  }
}

// One block of the dk/dv grid: key tile, kv head and b from `block` (tiles ascending within a (b, kv head): the
// first tiles see the most query blocks and start first). smem: bwd_smem_bytes<D>() bytes, 16-byte aligned; regs:
// W's slots. Returns the number of (query head, query block) pairs visited.
template <class W, int D>
DPO_FLASH_FN int64_t dkdv_block(const BackwardParams& p, int64_t block, uint16_t* smem, DkvRegs<W, D>* regs) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr int S = D + kSmemPad;
  const int64_t T = p.T, nkt = key_tiles(T), nqb = query_blocks(T);
  const int64_t kt = block % nkt, bj = block / nkt;
  const int64_t b = bj / p.n_kv_head, kvh = bj % p.n_kv_head, group = p.n_head / p.n_kv_head;
  const int64_t k0 = kt * kTileKeys;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(D)));
  uint16_t* ks = smem;
  uint16_t* vs = ks + kTileKeys * S;
  uint16_t* qs = vs + kTileKeys * S;
  uint16_t* dos = qs + kBlockRows * S;
  float* lse_s = reinterpret_cast<float*>(smem + bwd_tile_elems<D>());
  float* dl_s = lse_s + kBlockRows;
  int32_t* sp_s = reinterpret_cast<int32_t*>(dl_s + kBlockRows);

  // Phase: K and V rows [k0, k0 + 64) of kv head kvh (zeros past T); accumulators 0. Read after the first sync of
  // the loop (the diagonal block, t0 = k0, always sees its own keys: every query sees itself).
  W::warps([&](int w, int slot) {
    W::each([&](int lane) {
      const int tid = w * 32 + lane;
      stage_tile<W, D>(ks, p.k + b * T * p.k_stride + kvh * D, p.k_stride, k0, T, tid);
      stage_tile<W, D>(vs, p.v + b * T * p.v_stride + kvh * D, p.v_stride, k0, T, tid);
      DPO_FLASH_UNROLL
      for (int i = 0; i < D / 2; ++i) regs[slot].dk(lane, i) = regs[slot].dv(lane, i) = 0.0f;
    });
  });

  int64_t visited = 0;
  for (int64_t j = 0; j < group; ++j) {
    const int64_t h = kvh * group + j;
    const uint16_t* qbase = p.q + b * T * p.q_stride + h * D;
    const uint16_t* dobase = p.dout + b * T * p.dout_stride + h * D;
    const int64_t lrow = (b * p.n_head + h) * T;
    for (int64_t qb = kt; qb < nqb; ++qb) {
      const int64_t t0 = qb * kBlockRows;
      if (!block_sees_tile<W>(p, b, t0, k0)) continue;
      ++visited;
      // Phase: Q and dO rows [t0, t0 + 64) of head h (zeros past T); lse, delta and span of each query (0, 0 and
      // "sees nothing" past T).
      W::warps([&](int w, int) {
        W::each([&](int lane) {
          const int tid = w * 32 + lane;
          stage_tile<W, D>(qs, qbase, p.q_stride, t0, T, tid);
          stage_tile<W, D>(dos, dobase, p.dout_stride, t0, T, tid);
          if (tid < kBlockRows) {
            const int64_t t = t0 + tid;
            query_span(p, b, t, sp_s + kSpanWidth * tid);
            lse_s[tid] = t < T ? p.lse[lrow + t] : 0.0f;
            dl_s[tid] = t < T ? p.delta[lrow + t] : 0.0f;
          }
        });
      });
      W::sync();
      W::warps([&](int w, int slot) {
        dkdv_warp_tile<W, D>(regs[slot], ks, vs, qs, dos, lse_s, dl_s, sp_s, 16 * w, k0, t0, scale);
      });
      W::sync();  // Q, dO and the per-query arrays are overwritten next
    }
  }

  // Phase: dk = scale dK, dv = dV for the keys below T.
  W::warps([&](int w, int slot) {
    W::each([&](int lane) {
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t key = k0 + 16 * w + (lane >> 2) + 8 * rr;
        if (key >= T) continue;
        write_grad_row<W, D>(p.dk + (b * T + key) * p.dk_stride + kvh * D, regs[slot].dk, lane, rr, scale, p.write);
        write_grad_row<W, D>(p.dv + (b * T + key) * p.dv_stride + kvh * D, regs[slot].dv, lane, rr, 1.0f, p.write);
      }
    });
  });
  return visited;
}

// --- dq pass --------------------------------------------------------------------------------------------------------

template <class W, int D>
struct DqRegs {
  typename W::template Regs<float, D / 2> dq;  // rows g and g + 8 of the warp's 16 queries
  typename W::template Regs<float, 2> lse, dl;  // lse and delta of rows g and g + 8
  typename W::template Regs<int32_t, 6> sp;     // spans of rows g and g + 8
};

// One warp's queries (block rows [qr0, qr0 + 16), slots trow0 + ...) against the staged key tile [k0, k0 + 64).
template <class W, int D>
DPO_FLASH_FN void dq_warp_tile(DqRegs<W, D>& r, const uint16_t* ks, const uint16_t* vs, const uint16_t* qs,
                               const uint16_t* dos, int qr0, int64_t trow0, int64_t k0, float scale) {
  using FR = typename W::template Regs<float, 32>;
  typename W::template Regs<uint32_t, 16> pa;
  // S = Q_w K^T; C register 4 nc + 2 rr + e: query row g + 8 rr, key 8 nc + 2 c + e of the tile.
  FR s;
  rows_dot_tile<W, D, 4>(s, [&](int kc, Frag4<W>& a) { load_a_from_tile<W, D>(a, qs, qr0, kc); }, ks);
  W::each([&](int lane) {
    const int g = lane >> 2, c = lane & 3;
    DPO_FLASH_UNROLL
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t t = trow0 + g + 8 * rr;
      const int32_t sp[3] = {r.sp(lane, 3 * rr), r.sp(lane, 3 * rr + 1), r.sp(lane, 3 * rr + 2)};
      const float l = r.lse(lane, rr);
      DPO_FLASH_UNROLL
      for (int nc = 0; nc < 8; ++nc) {
        DPO_FLASH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * nc + 2 * rr + e;
          s(lane, i) = span_sees(sp, t, k0 + 8 * nc + 2 * c + e) ? W::exp2((s(lane, i) * scale - l) * kLog2e) : 0.0f;
        }
      }
    }
  });
  FR dp;  // dP = dO_w V^T
  rows_dot_tile<W, D, 4>(dp, [&](int kc, Frag4<W>& a) { load_a_from_tile<W, D>(a, dos, qr0, kc); }, vs);
  W::each([&](int lane) {
    DPO_FLASH_UNROLL
    for (int i = 0; i < 32; ++i) {
      const float pv = s(lane, i);
      dp(lane, i) = pv == 0.0f ? 0.0f : pv * (dp(lane, i) - r.dl(lane, (i >> 1) & 1));
    }
  });
  pack_c_to_a<W, 4>(dp, pa);
  frags_times_tile<W, D, 4>(r.dq, pa, ks);  // dQ_w += dS K
}

// One block of the dq grid: query block and (b, h) from `block` as the forward's (last query block first). smem:
// bwd_smem_bytes<D>() bytes (the per-query arrays unused); regs: W's slots. Returns the number of key tiles visited.
template <class W, int D>
DPO_FLASH_FN int64_t dq_block(const BackwardParams& p, int64_t block, uint16_t* smem, DqRegs<W, D>* regs) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr int S = D + kSmemPad;
  const int64_t T = p.T, nqb = query_blocks(T);
  const int64_t qb = nqb - 1 - block % nqb, bh = block / nqb;
  const int64_t b = bh / p.n_head, h = bh % p.n_head, kvh = h / (p.n_head / p.n_kv_head);
  const int64_t t0 = qb * kBlockRows, lrow = (b * p.n_head + h) * T;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(D)));
  uint16_t* ks = smem;
  uint16_t* vs = ks + kTileKeys * S;
  uint16_t* qs = vs + kTileKeys * S;
  uint16_t* dos = qs + kBlockRows * S;

  // Phase: Q and dO rows [t0, t0 + 64) (zeros past T), kept for the whole block; per-row registers.
  W::warps([&](int w, int slot) {
    DqRegs<W, D>& r = regs[slot];
    W::each([&](int lane) {
      const int tid = w * 32 + lane;
      stage_tile<W, D>(qs, p.q + b * T * p.q_stride + h * D, p.q_stride, t0, T, tid);
      stage_tile<W, D>(dos, p.dout + b * T * p.dout_stride + h * D, p.dout_stride, t0, T, tid);
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t t = t0 + 16 * w + (lane >> 2) + 8 * rr;
        int32_t sp[3];
        query_span(p, b, t, sp);
        for (int j = 0; j < 3; ++j) r.sp(lane, 3 * rr + j) = sp[j];
        r.lse(lane, rr) = t < T ? p.lse[lrow + t] : 0.0f;
        r.dl(lane, rr) = t < T ? p.delta[lrow + t] : 0.0f;
      }
      DPO_FLASH_UNROLL
      for (int i = 0; i < D / 2; ++i) r.dq(lane, i) = 0.0f;
    });
  });

  const int64_t t_last = (t0 + kBlockRows < T ? t0 + kBlockRows : T) - 1;
  int64_t visited = 0;
  for (int64_t k0 = 0; k0 <= t_last; k0 += kTileKeys) {
    if (!block_sees_tile<W>(p, b, t0, k0)) continue;
    ++visited;
    // Phase: K and V rows [k0, k0 + 64) of kv head kvh (zeros past T).
    W::warps([&](int w, int) {
      W::each([&](int lane) {
        const int tid = w * 32 + lane;
        stage_tile<W, D>(ks, p.k + b * T * p.k_stride + kvh * D, p.k_stride, k0, T, tid);
        stage_tile<W, D>(vs, p.v + b * T * p.v_stride + kvh * D, p.v_stride, k0, T, tid);
      });
    });
    W::sync();
    W::warps([&](int w, int slot) { dq_warp_tile<W, D>(regs[slot], ks, vs, qs, dos, 16 * w, t0 + 16 * w, k0, scale); });
    W::sync();  // the K and V tiles are overwritten next
  }

  // Phase: dq = scale dQ for the rows below T.
  W::warps([&](int w, int slot) {
    W::each([&](int lane) {
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t t = t0 + 16 * w + (lane >> 2) + 8 * rr;
        if (t >= T) continue;
        write_grad_row<W, D>(p.dq + (b * T + t) * p.dq_stride + h * D, regs[slot].dq, lane, rr, scale, p.write);
      }
    });
  });
  return visited;
}

}  // namespace dpo::flash
