// The tile code of the flash attention forward (contract: kernels/flash_attention.h), written once over a warp
// policy W so that the same code runs on the GPU (kernels/flash_attention.cu, W = DeviceWarp: one thread is one
// lane) and on the host (kernels/flash_emulation.h, W = HostWarp: one object holds the registers of all 32 lanes
// and emulates the warp-wide instructions lane by lane from the PTX fragment tables).
//
// What lives here: block scheduling (which query block, which kv head), which key tiles a block visits, the staging
// of Q, K and V tiles into shared memory, the span masks, the online softmax (running max and sum), the output
// rescaling, the final normalisation and the log-sum-exp. What the policy supplies (the only hardware-specific
// parts):
//   Regs<T, N>            per-lane register arrays; r(lane, i) is lane `lane`'s register i (the device ignores lane)
//   warps(f)              f(warp, slot) for the block's warps: the device calls it once (its own warp, slot 0);
//                         the host runs the 4 warps one after another (slot = warp). Code between two sync() is a
//                         phase: on the host every warp finishes a phase before any starts the next, which is what
//                         __syncthreads guarantees on the device.
//   each(f)               f(lane) for this warp's lanes (device: its own lane; host: 0..31)
//   any(f)                warp vote: whether f(lane) holds for some lane (__any_sync)
//   mma(c, ci, a, ai, b, bi)   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: c[ci..ci+3] += a[ai..ai+3] *
//                         b[bi..bi+1] in the PTX fragment layouts (A 16x16 row-major, B 16x8 "col", C 16x8 fp32)
//   ldmatrix_x4<Trans>(r, ri, addr)   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l supplies addr(l),
//                         the address of row l % 8 of matrix l / 8; r[ri + j] receives matrix j's fragment
//   shfl_xor(x, i, mask, y)   y[0] of lane l = x[i] of lane l ^ mask
//   exp2, log, pack_bf16x2 (round to nearest even, lo in the low half), copy16 / zero16 (16 bytes), store_u32
//   load_u32 (two bf16 from global memory), lo / hi (the bf16 in the low / high half of a word, as float)
//
// Fragment layouts used below (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"); g = lane / 4,
// c = lane % 4:
//   A (16x16 bf16, 4 regs of 2): reg i holds row g + 8 (i & 1), columns 2c + 8 (i >> 1) + {0, 1}
//   B (16x8 bf16, 2 regs of 2):  reg i holds rows (k) 2c + 8 i + {0, 1}, column (n) g
//   C (16x8 fp32, 4 regs):       reg i holds row g + 8 (i >> 1), column 2c + (i & 1)
// ldmatrix (without .trans): reg j of lane l holds row l / 4, columns 2 (l % 4) + {0, 1} of matrix j; with .trans,
// rows 2 (l % 4) + {0, 1} of column l / 4 (the matrix as stored, i.e. the fragment of its transpose).
//
// Shared memory: two tiles of kTileKeys rows x (D + kSmemPad) bf16 (K, then V); Q is staged in the K tile once and
// moved to registers before the first key tile. The pad of 8 elements (16 bytes) shifts consecutive rows by 4 banks,
// so the 8 row addresses of one ldmatrix matrix hit 8 different 16-byte bank groups.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/batch_layout.h"
#include "kernels/flash_attention.h"

#if defined(__CUDACC__)
#define DPO_FLASH_FN __device__ __forceinline__
#define DPO_FLASH_UNROLL _Pragma("unroll")
#else
#define DPO_FLASH_FN inline
#define DPO_FLASH_UNROLL
#endif

namespace dpo::flash {

constexpr int kBlockRows = static_cast<int>(kFlashBlockRows);
constexpr int kTileKeys = static_cast<int>(kFlashTileKeys);
constexpr int kWarps = 4;  // each warp owns 16 query rows of the block
constexpr int kThreads = 32 * kWarps;
constexpr int kSmemPad = 8;
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr int64_t smem_elems() {
  return int64_t{2} * kTileKeys * (D + kSmemPad);
}

constexpr int64_t query_blocks(int64_t T) { return (T + kBlockRows - 1) / kBlockRows; }
inline int64_t grid_blocks(const Params& p) { return p.B * p.n_head * query_blocks(p.T); }

// The registers one warp keeps across the key tiles.
template <class W, int D>
struct WarpRegs {
  typename W::template Regs<uint32_t, D / 16 * 4> qa;  // Q as A fragments: dims [16 kc, 16 kc + 16) in [4 kc, 4 kc + 4)
  typename W::template Regs<float, D / 8 * 4> o;       // output accumulators: dims [8 dn, 8 dn + 8) in [4 dn, 4 dn + 4)
  typename W::template Regs<float, 2> m, l;            // running max (scaled score) and partial sum, rows g and g + 8
  typename W::template Regs<int32_t, 6> sp;            // spans of this lane's rows g and g + 8 of the warp
  typename W::template Regs<int32_t, 6> vis;           // spans of block rows lane and lane + 32 (tile votes)
};

// x[i] of every lane = op over the 4 lanes of its quad (the lanes holding one C-fragment row), by two butterflies.
template <class W, int N, class Op>
DPO_FLASH_FN void quad_allreduce(typename W::template Regs<float, N>& x, int i, Op op) {
  for (int mask = 1; mask <= 2; mask <<= 1) {
    typename W::template Regs<float, 1> y;
    W::shfl_xor(x, i, mask, y);
    W::each([&](int lane) { x(lane, i) = op(x(lane, i), y(lane, 0)); });
  }
}

// The span of query slot t of row b as {lo, hole_lo, hole_hi}: the caller's span, {0, t, t} (causal) without one,
// and {t + 1, t + 1, t + 1} (sees nothing) for a slot past the end of the row (the last block's spare rows).
// P: Params or BackwardParams (their T and span).
template <class P>
DPO_FLASH_FN void query_span(const P& p, int64_t b, int64_t t, int32_t* sp) {
  if (t >= p.T) {
    sp[0] = sp[1] = sp[2] = static_cast<int32_t>(t + 1);
  } else if (p.span == nullptr) {
    sp[0] = 0;
    sp[1] = sp[2] = static_cast<int32_t>(t);
  } else {
    const int32_t* s = p.span + (b * p.T + t) * kSpanWidth;
    sp[0] = s[kSpanLo];
    sp[1] = s[kSpanHoleLo];
    sp[2] = s[kSpanHoleHi];
  }
}

// One key tile [k0, k0 + 64) for one warp whose rows start at block row `row0` (slot t = t0 + row0 + ...): scores,
// masks, the online softmax update and P.V. ks / vs: the staged K and V tiles.
template <class W, int D>
DPO_FLASH_FN void warp_tile(const Params& p, WarpRegs<W, D>& r, const uint16_t* ks, const uint16_t* vs, int64_t trow0,
                            int64_t k0, float scale) {
  constexpr int S = D + kSmemPad;
  using FR = typename W::template Regs<float, 32>;
  using UR4 = typename W::template Regs<uint32_t, 4>;
  // S = Q K^T: 8 chunks of 8 keys; one ldmatrix.x4 gives the B fragments of two chunks for 16 dims.
  FR s;
  W::each([&](int lane) {
    for (int i = 0; i < 32; ++i) s(lane, i) = 0.0f;
  });
  DPO_FLASH_UNROLL
  for (int kc = 0; kc < D / 16; ++kc) {
    DPO_FLASH_UNROLL
    for (int np = 0; np < 4; ++np) {
      UR4 kb;
      // matrix j = lane / 8: keys 16 np + 8 (j >> 1) + [0, 8), dims 16 kc + 8 (j & 1) + [0, 8)
      W::template ldmatrix_x4<false>(kb, 0, [&](int lane) {
        return ks + (16 * np + (lane & 7) + 8 * (lane >> 4)) * S + 16 * kc + 8 * ((lane >> 3) & 1);
      });
      W::mma(s, 4 * (2 * np), r.qa, 4 * kc, kb, 0);
      W::mma(s, 4 * (2 * np + 1), r.qa, 4 * kc, kb, 2);
    }
  }
  // Masks and the rows' maxima over this tile. C register i of chunk nc: row g + 8 (i >> 1), key 8 nc + 2 c + (i & 1).
  typename W::template Regs<float, 2> mx;
  W::each([&](int lane) {
    const int g = lane >> 2, c = lane & 3;
    DPO_FLASH_UNROLL
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t t = trow0 + g + 8 * rr;
      const int32_t sp[3] = {r.sp(lane, 3 * rr), r.sp(lane, 3 * rr + 1), r.sp(lane, 3 * rr + 2)};
      float m = kNegInf;
      DPO_FLASH_UNROLL
      for (int nc = 0; nc < 8; ++nc) {
        DPO_FLASH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * nc + 2 * rr + e;
          const float x = span_sees(sp, t, k0 + 8 * nc + 2 * c + e) ? s(lane, i) * scale : kNegInf;
          s(lane, i) = x;
          m = x > m ? x : m;
        }
      }
      mx(lane, rr) = m;
    }
  });
  const auto fmax = [](float a, float b) { return a > b ? a : b; };
  quad_allreduce<W, 2>(mx, 0, fmax);
  quad_allreduce<W, 2>(mx, 1, fmax);
  // Online softmax: new max, rescale of the running sum and the accumulators, probabilities in place of the scores.
  W::each([&](int lane) {
    DPO_FLASH_UNROLL
    for (int rr = 0; rr < 2; ++rr) {
      const float m_old = r.m(lane, rr);
      const float m_new = fmax(m_old, mx(lane, rr));
      // A row that has seen no key yet keeps m = -inf; exponents against 0 then give exact zeros (no inf - inf).
      const float mu = m_new == kNegInf ? 0.0f : m_new;
      const float alpha = W::exp2((m_old - mu) * kLog2e);
      r.m(lane, rr) = m_new;
      float sum = 0.0f;
      DPO_FLASH_UNROLL
      for (int nc = 0; nc < 8; ++nc) {
        DPO_FLASH_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * nc + 2 * rr + e;
          const float pv = W::exp2((s(lane, i) - mu) * kLog2e);
          s(lane, i) = pv;
          sum += pv;
        }
      }
      r.l(lane, rr) = r.l(lane, rr) * alpha + sum;
      DPO_FLASH_UNROLL
      for (int dn = 0; dn < D / 8; ++dn) {
        r.o(lane, 4 * dn + 2 * rr) *= alpha;
        r.o(lane, 4 * dn + 2 * rr + 1) *= alpha;
      }
    }
  });
  // P as A fragments: the C fragments of key chunks 2 kk and 2 kk + 1 are, register for register, the A fragment of
  // keys [16 kk, 16 kk + 16) (A reg 0: row g, keys 2c..; 1: row g + 8; 2: row g, keys 8 + 2c..; 3: row g + 8).
  typename W::template Regs<uint32_t, 16> pa;
  W::each([&](int lane) {
    DPO_FLASH_UNROLL
    for (int kk = 0; kk < 4; ++kk) {
      DPO_FLASH_UNROLL
      for (int j = 0; j < 4; ++j)
        pa(lane, 4 * kk + j) = W::pack_bf16x2(s(lane, 8 * kk + 2 * j), s(lane, 8 * kk + 2 * j + 1));
    }
  });
  // O += P V: V tile row-major [key][dim]; ldmatrix.trans gives the B fragments (keys along k, dims along n).
  DPO_FLASH_UNROLL
  for (int kk = 0; kk < 4; ++kk) {
    DPO_FLASH_UNROLL
    for (int dp = 0; dp < D / 16; ++dp) {
      UR4 vb;
      // matrix j = lane / 8: keys 16 kk + 8 (j & 1) + [0, 8), dims 16 dp + 8 (j >> 1) + [0, 8)
      W::template ldmatrix_x4<true>(vb, 0, [&](int lane) {
        return vs + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + 16 * dp + 8 * (lane >> 4);
      });
      W::mma(r.o, 4 * (2 * dp), pa, 4 * kk, vb, 0);
      W::mma(r.o, 4 * (2 * dp + 1), pa, 4 * kk, vb, 2);
    }
  }
}

// One block of the grid: query block and (b, h) from `block` (blocks of one (b, h) run from the last query block
// to the first, so the longest ones start first). smem: smem_elems<D>() bf16; regs: W's slots of warp registers.
// Returns the number of key tiles the block visited.
template <class W, int D>
DPO_FLASH_FN int64_t forward_block(const Params& p, int64_t block, uint16_t* smem, WarpRegs<W, D>* regs) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr int S = D + kSmemPad;  // shared row stride
  constexpr int CH = D / 8;        // 16-byte chunks per row
  const int64_t T = p.T, nqb = query_blocks(T);
  const int64_t qb = nqb - 1 - block % nqb, bh = block / nqb;
  const int64_t b = bh / p.n_head, h = bh % p.n_head, kvh = h / (p.n_head / p.n_kv_head);
  const int64_t t0 = qb * kBlockRows;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(D)));
  const uint16_t* qbase = p.q + b * T * p.q_stride + h * D;
  const uint16_t* kbase = p.k + b * T * p.k_stride + kvh * D;
  const uint16_t* vbase = p.v + b * T * p.v_stride + kvh * D;
  uint16_t* ks = smem;
  uint16_t* vs = smem + kTileKeys * S;

  // Phase: Q rows [t0, t0 + 64) into the K tile (zeros past T); spans and accumulators into registers.
  W::warps([&](int w, int slot) {
    WarpRegs<W, D>& r = regs[slot];
    W::each([&](int lane) {
      const int tid = w * 32 + lane;
      DPO_FLASH_UNROLL
      for (int i = tid; i < kBlockRows * CH; i += kThreads) {
        const int row = i / CH, ch = i % CH;
        uint16_t* dst = ks + row * S + 8 * ch;
        if (t0 + row < T)
          W::copy16(dst, qbase + (t0 + row) * p.q_stride + 8 * ch);
        else
          W::zero16(dst);
      }
      int32_t sp[3];
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        query_span(p, b, t0 + 16 * w + (lane >> 2) + 8 * rr, sp);
        for (int j = 0; j < 3; ++j) r.sp(lane, 3 * rr + j) = sp[j];
        query_span(p, b, t0 + lane + 32 * rr, sp);
        for (int j = 0; j < 3; ++j) r.vis(lane, 3 * rr + j) = sp[j];
        r.m(lane, rr) = kNegInf;
        r.l(lane, rr) = 0.0f;
      }
      DPO_FLASH_UNROLL
      for (int i = 0; i < D / 2; ++i) r.o(lane, i) = 0.0f;
    });
  });
  W::sync();
  // Phase: each warp's 16 rows of Q as A fragments (matrix j: rows 8 (j & 1) + [0, 8), dims 16 kc + 8 (j >> 1)).
  W::warps([&](int w, int slot) {
    DPO_FLASH_UNROLL
    for (int kc = 0; kc < D / 16; ++kc)
      W::template ldmatrix_x4<false>(regs[slot].qa, 4 * kc, [&](int lane) {
        return ks + (16 * w + (lane & 7) + 8 * ((lane >> 3) & 1)) * S + 16 * kc + 8 * (lane >> 4);
      });
  });
  W::sync();  // the K tile is overwritten next

  const int64_t t_last = (t0 + kBlockRows < T ? t0 + kBlockRows : T) - 1;
  int64_t visited = 0;
  for (int64_t k0 = 0; k0 <= t_last; k0 += kTileKeys) {
    // Every warp takes the same vote (the same 64 spans), so the branch is uniform over the block.
    bool visit = false;
    W::warps([&](int, int slot) {
      const WarpRegs<W, D>& r = regs[slot];
      visit = W::any([&](int lane) {
        bool seen = false;
        for (int rr = 0; rr < 2; ++rr) {
          const int32_t sp[3] = {r.vis(lane, 3 * rr), r.vis(lane, 3 * rr + 1), r.vis(lane, 3 * rr + 2)};
          seen = seen || span_sees_any(sp, t0 + lane + 32 * rr, k0, k0 + kTileKeys);
        }
        return seen;
      });
    });
    if (!visit) continue;
    ++visited;
    // Phase: K and V rows [k0, k0 + 64) (zeros past T, so that a masked probability 0 never meets a NaN).
    W::warps([&](int w, int) {
      W::each([&](int lane) {
        const int tid = w * 32 + lane;
        DPO_FLASH_UNROLL
        for (int i = tid; i < kTileKeys * CH; i += kThreads) {
          const int row = i / CH, ch = i % CH;
          const int64_t key = k0 + row;
          if (key < T) {
            W::copy16(ks + row * S + 8 * ch, kbase + key * p.k_stride + 8 * ch);
            W::copy16(vs + row * S + 8 * ch, vbase + key * p.v_stride + 8 * ch);
          } else {
            W::zero16(ks + row * S + 8 * ch);
            W::zero16(vs + row * S + 8 * ch);
          }
        }
      });
    });
    W::sync();
    W::warps([&](int w, int slot) { warp_tile<W, D>(p, regs[slot], ks, vs, t0 + 16 * w, k0, scale); });
    W::sync();  // the tiles are overwritten next
  }

  // Phase: row sums over the quads, normalisation, bf16 output and lse.
  W::warps([&](int w, int slot) {
    WarpRegs<W, D>& r = regs[slot];
    const auto plus = [](float a, float c) { return a + c; };
    quad_allreduce<W, 2>(r.l, 0, plus);
    quad_allreduce<W, 2>(r.l, 1, plus);
    W::each([&](int lane) {
      const int g = lane >> 2, c = lane & 3;
      DPO_FLASH_UNROLL
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t t = t0 + 16 * w + g + 8 * rr;
        if (t >= T) continue;
        const float m = r.m(lane, rr), l = r.l(lane, rr);
        const bool none = m == kNegInf;  // no visible key: out 0 (the accumulators are 0), lse +inf
        const float inv = none ? 0.0f : 1.0f / l;
        uint16_t* orow = p.out + (b * T + t) * p.out_stride + h * D;
        DPO_FLASH_UNROLL
        for (int dn = 0; dn < D / 8; ++dn)
          W::store_u32(orow + 8 * dn + 2 * c,
                       W::pack_bf16x2(r.o(lane, 4 * dn + 2 * rr) * inv, r.o(lane, 4 * dn + 2 * rr + 1) * inv));
        if (c == 0) p.lse[(b * p.n_head + h) * T + t] = none ? -kNegInf : m + W::log(l);
      }
    });
  });
  return visited;
}

}  // namespace dpo::flash
