// The flash attention forward's tile code (kernels/flash_tile.h) run on the host through the lane-accurate warp
// emulation (kernels/flash_emulation.h), so the GPU kernel's indexing and arithmetic are tested without a GPU:
//   - the emulated primitives on their own: fragment tables against entries read off the PTX ISA figures, each table
//     a bijection onto its matrix, ldmatrix against a direct read of the addressed rows, mma against a plain matrix
//     product with the operands loaded the way the kernel loads them (A row-major, B from [n][k] rows and, with
//     .trans, from [k][n] rows), shfl.xor;
//   - the whole forward against the blocked CPU kernel (budgets: tests/flash_test_cases.h), head dims 64 and 128,
//     T = 1, 17, 64, 100, 257, 1024, B = 2, NH = 3, grouped-query heads (NH 4 with 2 and 1 kv heads), padding,
//     packed and prefix_shared spans, outputs poisoned with NaN first;
//   - the key tiles visited against the tiles the spans need (every pair checked with span_sees), and the sum of
//     squares of a packed row with tile-aligned segments;
//   - the backward (kernels/flash_tile_bwd.h) on the emulated forward's out and lse against the blocked CPU kernel's
//     backward in the same cases (budgets: tests/flash_test_cases.h; grouped-query dk and dv against the sums over
//     the group's heads), gradients poisoned first; both passes visit exactly the forward's (block, tile) pairs;
//     a few elements against central differences of the exact loss in double; "+=" onto non-zero old values and
//     "+=" onto zeros equal to "="; two runs, and a run with the grids in reverse order on another thread count,
//     bitwise equal.
#include <gtest/gtest.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "flash_test_cases.h"
#include "kernels/common.h"
#include "kernels/flash_emulation.h"
#include "runtime/error.h"
#include "test_util.h"

namespace dpo {
namespace {

using flash::HostWarp;
using flash::RowCol;
using flash_test::Inputs;

// --- fragment tables -----------------------------------------------------------------------------------------------

bool same(RowCol a, int row, int col) { return a.row == row && a.col == col; }

TEST(FlashEmulationTables, EntriesFromTheIsaFigures) {
  // mma.m16n8k16 A (figure "MMA .m16n8k16 fragment layout for matrix A with .f16/.bf16 type"): a0..a7 in registers
  // {a0,a1} {a2,a3} {a4,a5} {a6,a7}; lane 0 holds (0,0) (0,1) (8,0) (8,1) (0,8) (0,9) (8,8) (8,9).
  EXPECT_TRUE(same(flash::mma_a_coord(0, 0, 0), 0, 0));
  EXPECT_TRUE(same(flash::mma_a_coord(0, 0, 1), 0, 1));
  EXPECT_TRUE(same(flash::mma_a_coord(0, 1, 0), 8, 0));
  EXPECT_TRUE(same(flash::mma_a_coord(0, 2, 0), 0, 8));
  EXPECT_TRUE(same(flash::mma_a_coord(0, 3, 1), 8, 9));
  EXPECT_TRUE(same(flash::mma_a_coord(5, 0, 0), 1, 2));   // groupID 1, threadID_in_group 1
  EXPECT_TRUE(same(flash::mma_a_coord(5, 3, 0), 9, 10));
  EXPECT_TRUE(same(flash::mma_a_coord(31, 3, 1), 15, 15));
  // B (16x8): b0,b1 rows 2c, 2c+1 and b2,b3 rows 2c+8, 2c+9 of column g.
  EXPECT_TRUE(same(flash::mma_b_coord(0, 0, 0), 0, 0));
  EXPECT_TRUE(same(flash::mma_b_coord(0, 0, 1), 1, 0));
  EXPECT_TRUE(same(flash::mma_b_coord(0, 1, 0), 8, 0));
  EXPECT_TRUE(same(flash::mma_b_coord(6, 0, 0), 4, 1));
  EXPECT_TRUE(same(flash::mma_b_coord(31, 1, 1), 15, 7));
  // C/D (16x8 fp32): c0,c1 row g columns 2c, 2c+1; c2,c3 row g+8.
  EXPECT_TRUE(same(flash::mma_c_coord(0, 0), 0, 0));
  EXPECT_TRUE(same(flash::mma_c_coord(0, 1), 0, 1));
  EXPECT_TRUE(same(flash::mma_c_coord(0, 2), 8, 0));
  EXPECT_TRUE(same(flash::mma_c_coord(9, 3), 10, 3));
  EXPECT_TRUE(same(flash::mma_c_coord(31, 3), 15, 7));
  // ldmatrix: lane l receives row l/4, elements 2(l%4), 2(l%4)+1; .trans: column l/4, rows 2(l%4), 2(l%4)+1.
  EXPECT_TRUE(same(flash::ldmatrix_coord(0, 0, false), 0, 0));
  EXPECT_TRUE(same(flash::ldmatrix_coord(5, 1, false), 1, 3));
  EXPECT_TRUE(same(flash::ldmatrix_coord(5, 1, true), 3, 1));
  EXPECT_TRUE(same(flash::ldmatrix_coord(31, 0, true), 6, 7));
}

TEST(FlashEmulationTables, EachTableCoversItsMatrixOnce) {
  std::set<std::pair<int, int>> a, b, c, l, lt;
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) {
        const RowCol x = flash::mma_a_coord(lane, r, h);
        a.insert({x.row, x.col});
        EXPECT_TRUE(x.row >= 0 && x.row < 16 && x.col >= 0 && x.col < 16);
      }
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) {
        const RowCol x = flash::mma_b_coord(lane, r, h);
        b.insert({x.row, x.col});
        EXPECT_TRUE(x.row >= 0 && x.row < 16 && x.col >= 0 && x.col < 8);
      }
    for (int r = 0; r < 4; ++r) {
      const RowCol x = flash::mma_c_coord(lane, r);
      c.insert({x.row, x.col});
      EXPECT_TRUE(x.row >= 0 && x.row < 16 && x.col >= 0 && x.col < 8);
    }
    for (int h = 0; h < 2; ++h) {
      const RowCol x = flash::ldmatrix_coord(lane, h, false), y = flash::ldmatrix_coord(lane, h, true);
      l.insert({x.row, x.col});
      lt.insert({y.row, y.col});
    }
  }
  EXPECT_EQ(a.size(), 256u);
  EXPECT_EQ(b.size(), 128u);
  EXPECT_EQ(c.size(), 128u);
  EXPECT_EQ(l.size(), 64u);
  EXPECT_EQ(lt.size(), 64u);
}

// --- emulated instructions ------------------------------------------------------------------------------------------

// A shared array of `rows` rows of `stride` bf16 with random values; the emulation's address checks need its bounds.
struct Smem {
  std::vector<uint16_t> v;
  int stride;
  Smem(std::mt19937_64& g, int rows, int stride_)
      : v(flash_test::rand_bf16(g, int64_t{rows} * stride_)), stride(stride_) {
    HostWarp::smem_lo() = v.data();
    HostWarp::smem_hi() = v.data() + v.size();
  }
  float at(int r, int c) const { return flash_test::from_bf16(v[static_cast<size_t>(r * stride + c)]); }
  const uint16_t* row(int r, int c) const { return v.data() + r * stride + c; }
};

TEST(FlashEmulationInstructions, LdmatrixDeliversTheAddressedRows) {
  std::mt19937_64 g(test::test_seed());
  Smem sm(g, 40, 24);
  // Lane l addresses an arbitrary row (a permutation, at column offsets 0, 8 or 16) for row l % 8 of matrix l / 8.
  std::vector<int> rows(32), cols(32);
  for (int l = 0; l < 32; ++l) rows[l] = (l * 7 + 3) % 40, cols[l] = 8 * (l % 3);
  for (bool trans : {false, true}) {
    HostWarp::Regs<uint32_t, 6> r{};
    const auto addr = [&](int lane) { return sm.row(rows[lane], cols[lane]); };
    if (trans)
      HostWarp::ldmatrix_x4<true>(r, 2, addr);
    else
      HostWarp::ldmatrix_x4<false>(r, 2, addr);
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j)
        for (int h = 0; h < 2; ++h) {
          // Matrix j's element (row i, column e) is element e of the row lane 8 j + i addressed.
          const int i = trans ? 2 * (lane % 4) + h : lane / 4, e = trans ? lane / 4 : 2 * (lane % 4) + h;
          const uint32_t w = r(lane, 2 + j);
          const float got = flash_test::from_bf16(static_cast<uint16_t>(h ? w >> 16 : w & 0xffffu));
          EXPECT_EQ(got, sm.at(rows[8 * j + i], cols[8 * j + i] + e)) << "lane " << lane << " reg " << j;
        }
  }
  // A row address outside the array is refused.
  HostWarp::Regs<uint32_t, 4> r{};
  EXPECT_THROW(HostWarp::ldmatrix_x4<false>(r, 0, [&](int lane) { return sm.row(39, 16) + (lane == 3 ? 8 : 0); }),
               std::logic_error);
}

// C[16x8] = A[16x16] B[16x8] + C0 with the operands in shared memory as the kernel keeps them: A row-major (Q),
// B from rows of its transpose [n][k] without .trans (K), or from rows [k][n] with .trans (V); ldmatrix address
// patterns as in kernels/flash_tile.h.
TEST(FlashEmulationInstructions, MmaOfLdmatrixFragmentsIsTheMatrixProduct) {
  std::mt19937_64 g(test::test_seed());
  for (bool b_trans : {false, true}) {
    SCOPED_TRACE(b_trans ? "B from [k][n] rows with .trans" : "B from [n][k] rows");
    Smem sm(g, 48, 24);  // A in rows 0..15 (cols 0..15); B in rows 16..31 (as [n][k]: 8 rows x 16) or 16..31 [k][n]
    HostWarp::Regs<uint32_t, 4> a{}, b{};
    HostWarp::ldmatrix_x4<false>(a, 0, [&](int lane) {
      return sm.row((lane & 7) + 8 * ((lane >> 3) & 1), 8 * (lane >> 4));
    });
    float B[16][8];
    if (!b_trans) {
      // [n][k]: row n of 16 k values; matrix j: rows n in [0, 8), k in 8 (j & 1) + [0, 8) (regs 0, 1 of one chunk).
      HostWarp::ldmatrix_x4<false>(b, 0, [&](int lane) { return sm.row(16 + (lane & 7), 8 * ((lane >> 3) & 1)); });
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 8; ++n) B[k][n] = sm.at(16 + n, k);
    } else {
      // [k][n]: row k of 8 n values; matrix j: rows k in 8 (j & 1) + [0, 8).
      HostWarp::ldmatrix_x4<true>(b, 0, [&](int lane) { return sm.row(16 + (lane & 7) + 8 * ((lane >> 3) & 1), 0); });
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 8; ++n) B[k][n] = sm.at(16 + k, n);
    }
    HostWarp::Regs<float, 8> c{};
    std::normal_distribution<float> nd;
    float C0[16][8];
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r) {
        const RowCol x = flash::mma_c_coord(lane, r);
        c(lane, 4 + r) = C0[x.row][x.col] = nd(g);
      }
    HostWarp::mma(c, 4, a, 0, b, 0);
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r) {
        const int i = lane / 4 + 8 * (r >> 1), j = 2 * (lane % 4) + (r & 1);
        double want = C0[i][j];
        double mag = std::fabs(want);
        for (int k = 0; k < 16; ++k) {
          want += double(sm.at(i, k)) * B[k][j];
          mag += std::fabs(double(sm.at(i, k)) * B[k][j]);
        }
        // fp32 accumulation of 17 terms: at most 17 eps of their magnitude.
        EXPECT_NEAR(c(lane, 4 + r), want, 17 * FLT_EPSILON * mag) << "lane " << lane << " reg " << r;
      }
  }
}

TEST(FlashEmulationInstructions, ShflXorAndQuadReduce) {
  HostWarp::Regs<float, 2> x{};
  for (int lane = 0; lane < 32; ++lane) x(lane, 1) = static_cast<float>(lane * lane);
  HostWarp::Regs<float, 1> y{};
  HostWarp::shfl_xor(x, 1, 5, y);
  for (int lane = 0; lane < 32; ++lane) EXPECT_EQ(y(lane, 0), float((lane ^ 5) * (lane ^ 5)));
  flash::quad_allreduce<HostWarp, 2>(x, 1, [](float a, float b) { return a + b; });
  for (int lane = 0; lane < 32; ++lane) {
    const int q = lane & ~3;
    EXPECT_EQ(x(lane, 1), float(q * q + (q + 1) * (q + 1) + (q + 2) * (q + 2) + (q + 3) * (q + 3)));
  }
}

// --- the forward against the blocked CPU kernel ---------------------------------------------------------------------

struct Emulated {
  flash_test::Result r;
  std::vector<uint16_t> out;
  int64_t visited = 0;
};

Emulated emulate(const Inputs& in) {
  Emulated e;
  e.out.assign(static_cast<size_t>(in.B * in.T * in.C()), uint16_t{0x7fc0});  // poisoned: bf16 NaN
  e.r.lse.assign(static_cast<size_t>(in.B * in.NH * in.T), NAN);
  const int32_t* span = in.span.empty() ? nullptr : in.span.data();
  const flash::Params p = flash_test::params_for(in, in.qkv.data(), in.q.data(), in.k.data(), in.v.data(),
                                                 e.out.data(), e.r.lse.data(), span);
  e.visited = flash::emulate_forward(p);
  return e;
}

void run_cases(int64_t D) {
  std::mt19937_64 g(test::test_seed());
  for (auto& c : flash_test::standard_cases(g, D, /*long_t=*/true)) {
    SCOPED_TRACE(c.name + " D=" + std::to_string(D));
    const flash_test::Result ref = flash_test::oracle(c.in);
    const Emulated got = emulate(c.in);
    flash_test::expect_within_budget(c.in, ref, got.out, got.r.lse);
    EXPECT_EQ(got.visited, flash_test::needed_tile_visits(c.in));
    if (c.name.rfind("prefix_shared", 0) == 0) {
      // The dup slot's output against the prompt's last slot's: the same exact value, computed from the same keys
      // and values but at other places in the tiles (other key tiles, other lanes, another order of the online
      // max), so not bitwise; each is within u (A + |out|) <= u (max|v| + |out|) of it (tests/flash_test_cases.h),
      // so they differ by at most twice that.
      double max_v = 0.0;
      for (int64_t s = 0; s < c.in.B * c.in.T; ++s)
        for (int64_t i = 0; i < c.in.C(); ++i)
          max_v = std::max(max_v, std::fabs(double(c.in.ref_qkv[static_cast<size_t>((3 * s + 2) * c.in.C() + i)])));
      for (const auto& dp : flash_test::prefix_shared_dups())
        for (int64_t h = 0; h < c.in.NH; ++h)
          for (int64_t d = 0; d < D; ++d) {
            const auto at = [&](int64_t t) {
              return flash_test::from_bf16(got.out[static_cast<size_t>((dp.b * c.in.T + t) * c.in.C() + h * D + d)]);
            };
            const float a = at(dp.dup), b = at(dp.last);
            EXPECT_NEAR(a, b, std::ldexp(1.0, -7) * (max_v + std::fabs(b))) << "dup " << dp.dup << " h " << h;
          }
    }
  }
}

TEST(FlashEmulationForward, HeadDim64MatchesBlockedCpu) { run_cases(64); }
TEST(FlashEmulationForward, HeadDim128MatchesBlockedCpu) { run_cases(128); }

TEST(FlashEmulationForward, RepeatedRunsAreBitwiseEqual) {
  std::mt19937_64 g(test::test_seed());
  Inputs in = flash_test::packed_inputs(g, 2, 100, 3, 64);
  const Emulated a = emulate(in), b = emulate(in);
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(std::memcmp(a.r.lse.data(), b.r.lse.data(), a.r.lse.size() * sizeof(float)), 0);
}

// --- tile skipping --------------------------------------------------------------------------------------------------

TEST(FlashEmulationTiles, SpanSeesAnyIsTheUnionOfSpanSees) {
  // span_sees_any (kernels/batch_layout.h), the tile vote, against span_sees over every key of the range, for every
  // valid span of a short row (with and without a hole) and every key range, empty ones included.
  const int64_t T = 12;
  int64_t checked = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t lo = 0; lo <= t; ++lo)
      for (int64_t hl = lo; hl <= t; ++hl)
        for (int64_t hh = hl; hh <= t; ++hh) {
          if (hl == hh && hl != t) continue;  // one empty-hole form is enough
          const int32_t sp[3] = {int32_t(lo), int32_t(hl), int32_t(hh)};
          if (!span_valid(sp, t)) continue;
          for (int64_t k0 = 0; k0 <= T; ++k0)
            for (int64_t k1 = k0; k1 <= T + 2; ++k1) {
              bool any = false;
              for (int64_t k = k0; k < k1; ++k) any = any || span_sees(sp, t, k);
              ASSERT_EQ(span_sees_any(sp, t, k0, k1), any)
                  << "span {" << lo << ", " << hl << ", " << hh << "} t " << t << " keys [" << k0 << ", " << k1 << ")";
              ++checked;
            }
        }
  EXPECT_GT(checked, 10000);
}

TEST(FlashEmulationTiles, PackedRowCostsTheSumOfSquares) {
  // Segments of 3, 2 and 1 tiles (192, 128, 64 slots): a segment of n tiles costs n (n + 1) / 2 block-tile pairs,
  // so 6 + 3 + 1 = 10 per head against 21 for the causal row of 6 tiles.
  std::mt19937_64 g(test::test_seed());
  Inputs in = flash_test::packed_inputs(g, 1, 384, 2, 64);
  in.span = flash_test::padding_spans(1, 384);
  flash_test::pack_row(in.span, 384, 0, 0, {192, 128, 64});
  EXPECT_EQ(emulate(in).visited, 10 * 2);
  Inputs causal = in;
  causal.span.clear();
  EXPECT_EQ(emulate(causal).visited, 21 * 2);
}

TEST(FlashEmulationTiles, TilesInsideEveryQuerysHoleAreSkipped) {
  // prefix_shared: prompt [0, 128), chosen [128, 319), dup 319, rejected [320, 448); a rejected slot's span is
  // {0, 128, 320}: the whole prompt and its own earlier slots (tests/flash_test_cases.h). Blocks 0..3 are causal
  // (1 + 2 + 3 + 4 tiles); block 4 holds chosen slots (tiles 0..4); the rejected blocks 5 and 6 see the prompt's
  // tiles 0, 1 and their own (5; 5, 6): the tiles 2, 3 and 4 of the chosen part are skipped. Total 22 (causal: 28).
  std::mt19937_64 g(test::test_seed());
  Inputs in = flash_test::packed_inputs(g, 1, 448, 1, 64);
  in.span = flash_test::padding_spans(1, 448);
  EXPECT_EQ(flash_test::prefix_shared_segment(in.span, 448, 0, 0, 128, 191, 128), 319);
  const Emulated e = emulate(in);
  EXPECT_EQ(e.visited, 22);
  EXPECT_EQ(flash_test::needed_tile_visits(in), 22);
  flash_test::expect_within_budget(in, flash_test::oracle(in), e.out, e.r.lse);
}

// --- the backward against the blocked CPU kernel --------------------------------------------------------------------

TEST(FlashEmulationInstructions, LoadU32AndHalvesReadTheBf16Pair) {
  // load_u32 reads two consecutive bf16 (the first in the low half, little-endian), lo / hi convert each exactly.
  std::mt19937_64 g(test::test_seed());
  const std::vector<uint16_t> v = flash_test::rand_bf16(g, 64);
  for (size_t i = 0; i + 1 < v.size(); i += 2) {
    const uint32_t w = HostWarp::load_u32(v.data() + i);
    EXPECT_EQ(HostWarp::lo(w), flash_test::from_bf16(v[i]));
    EXPECT_EQ(HostWarp::hi(w), flash_test::from_bf16(v[i + 1]));
    EXPECT_EQ(HostWarp::pack_bf16x2(HostWarp::lo(w), HostWarp::hi(w)), w);
  }
}

// One backward case: inputs, a bf16 dout, and the emulated forward's out and lse (what the backward is given).
struct BwdCase {
  Inputs in;
  std::vector<uint16_t> dout;
  std::vector<float> dout_ref;
  Emulated fwd;
};

BwdCase make_bwd_case(std::mt19937_64& g, Inputs in) {
  BwdCase c;
  c.dout = flash_test::rand_bf16(g, in.B * in.T * in.C());
  c.dout_ref.resize(c.dout.size());
  for (size_t i = 0; i < c.dout.size(); ++i) c.dout_ref[i] = flash_test::from_bf16(c.dout[i]);
  c.fwd = emulate(in);
  c.in = std::move(in);
  return c;
}

// The emulated backward into `grads` (its contents are the old values for Accumulate); the delta workspace poisoned.
flash::BackwardVisits emulate_bwd(const BwdCase& c, flash_test::Grads& grads, GradWrite write, bool reverse = false) {
  const Inputs& in = c.in;
  std::vector<float> delta(static_cast<size_t>(in.B * in.NH * in.T), NAN);
  const flash::BackwardParams p = flash_test::backward_params_for(
      in, in.qkv.data(), in.q.data(), in.k.data(), in.v.data(), c.fwd.out.data(), c.dout.data(),
      c.fwd.r.lse.data(), in.span.empty() ? nullptr : in.span.data(), grads.dqkv.data(), grads.dq.data(),
      grads.dk.data(), grads.dv.data(), delta.data(), write);
  EXPECT_EQ(flash::backward_workspace_bytes(p), static_cast<int64_t>(delta.size() * sizeof(float)));
  return flash::emulate_backward(p, reverse);
}

bool bitwise_equal(const flash_test::Grads& a, const flash_test::Grads& b) {
  return a.dqkv == b.dqkv && a.dq == b.dq && a.dk == b.dk && a.dv == b.dv;
}

void run_backward_cases(int64_t D) {
  std::mt19937_64 g(test::test_seed());
  for (auto& nc : flash_test::standard_cases(g, D, /*long_t=*/true)) {
    SCOPED_TRACE(nc.name + " D=" + std::to_string(D));
    const BwdCase c = make_bwd_case(g, std::move(nc.in));
    const flash_test::Result ref_fwd = flash_test::oracle(c.in);
    const std::vector<float> ref = flash_test::backward_oracle(c.in, c.dout_ref, ref_fwd);
    flash_test::Grads got = flash_test::make_grads(c.in, uint16_t{0x7fc0});  // poisoned: Overwrite never reads it
    const flash::BackwardVisits visits = emulate_bwd(c, got, GradWrite::Overwrite);
    // Grouped-query cases: dk and dv of a kv head against the sum of the oracle's over the group's query heads.
    flash_test::expect_backward_within_budget(c.in, c.dout_ref, ref_fwd, ref, got, nullptr);
    // Both passes pair exactly the (query block, key tile) pairs the forward visits.
    EXPECT_EQ(visits.dkdv, c.fwd.visited);
    EXPECT_EQ(visits.dq, c.fwd.visited);
  }
}

TEST(FlashEmulationBackward, HeadDim64MatchesBlockedCpu) { run_backward_cases(64); }
TEST(FlashEmulationBackward, HeadDim128MatchesBlockedCpu) { run_backward_cases(128); }

TEST(FlashEmulationBackward, AccumulateAddsToTheOldValues) {
  std::mt19937_64 g(test::test_seed());
  for (int64_t D : {64, 128}) {
    Inputs in = flash_test::grouped_inputs(g, 2, 100, 4, 2, D);
    in.span = flash_test::padded_spans(100, 81);
    const BwdCase c = make_bwd_case(g, std::move(in));
    SCOPED_TRACE("D=" + std::to_string(D));
    const flash_test::Result ref_fwd = flash_test::oracle(c.in);
    const std::vector<float> ref = flash_test::backward_oracle(c.in, c.dout_ref, ref_fwd);
    // Non-zero old values (of the gradients' size): the result is old + gradient within the budgets.
    flash_test::Grads old = flash_test::make_grads(c.in, 0);
    for (auto* v : {&old.dqkv, &old.dq, &old.dk, &old.dv})
      *v = flash_test::rand_bf16(g, static_cast<int64_t>(v->size()));
    flash_test::Grads acc = old;
    emulate_bwd(c, acc, GradWrite::Accumulate);
    flash_test::expect_backward_within_budget(c.in, c.dout_ref, ref_fwd, ref, acc, &old);
    // On zeros, += gives the values = writes (0 + x is x; -0 and +0 compare equal).
    flash_test::Grads zero = flash_test::make_grads(c.in, 0), over = flash_test::make_grads(c.in, 0x7fc0);
    emulate_bwd(c, zero, GradWrite::Accumulate);
    emulate_bwd(c, over, GradWrite::Overwrite);
    int mismatches = 0;
    for (int which = 0; which < 3; ++which)
      for (int64_t s = 0; s < c.in.B * c.in.T; ++s)
        for (int64_t h = 0; h < (which == 0 ? c.in.NH : c.in.NKV); ++h)
          for (int64_t d = 0; d < D; ++d)
            mismatches +=
                flash_test::grad_at(c.in, zero, which, s, h, d) != flash_test::grad_at(c.in, over, which, s, h, d);
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(FlashEmulationBackward, GroupedHeadsGetTheSumOverTheirGroup) {
  // Grouped-query inputs against the same values with every query head given its own copy of its kv head (packed,
  // n_kv_head = n_head). dq reads the same keys and values in the same order: bitwise equal. dk and dv of a kv head
  // are the group's per-head gradients summed in fp32 before the one rounding; the expanded run rounds each head's
  // first, so they agree within the heads' budgets plus both roundings.
  std::mt19937_64 g(test::test_seed());
  for (int64_t D : {64, 128}) {
    SCOPED_TRACE("D=" + std::to_string(D));
    Inputs grouped = flash_test::grouped_inputs(g, 2, 130, 4, 2, D);
    grouped.span = flash_test::padding_spans(2, 130);
    flash_test::prefix_shared_segment(grouped.span, 130, 0, 3, 50, 30, 40);
    flash_test::pack_row(grouped.span, 130, 1, 0, {64, 66});
    Inputs expanded = grouped;
    expanded.packed = true, expanded.NKV = expanded.NH;
    expanded.q.clear(), expanded.k.clear(), expanded.v.clear();
    expanded.qkv.resize(expanded.ref_qkv.size());
    for (size_t i = 0; i < expanded.qkv.size(); ++i) expanded.qkv[i] = flash_test::to_bf16(expanded.ref_qkv[i]);
    BwdCase cg = make_bwd_case(g, std::move(grouped));
    BwdCase ce;
    ce.dout = cg.dout, ce.dout_ref = cg.dout_ref, ce.fwd = emulate(expanded), ce.in = std::move(expanded);
    flash_test::Grads gg = flash_test::make_grads(cg.in, 0x7fc0), ge = flash_test::make_grads(ce.in, 0x7fc0);
    emulate_bwd(cg, gg, GradWrite::Overwrite);
    emulate_bwd(ce, ge, GradWrite::Overwrite);
    const std::vector<double> bud = flash_test::backward_budgets(ce.in, ce.dout_ref, flash_test::oracle(ce.in));
    const int64_t NH = cg.in.NH, group = NH / cg.in.NKV, C = cg.in.C();
    const double u = std::ldexp(1.0, -8);
    int failures = 0;
    for (int64_t s = 0; s < cg.in.B * cg.in.T; ++s)
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t h = 0; h < NH; ++h)
          if (flash_test::grad_at(cg.in, gg, 0, s, h, d) != flash_test::grad_at(ce.in, ge, 0, s, h, d) &&
              failures++ < 8)
            ADD_FAILURE() << "dq slot " << s << " head " << h << " dim " << d;
        for (int which = 1; which < 3; ++which)
          for (int64_t j = 0; j < cg.in.NKV; ++j) {
            double sum = 0.0, mag = 0.0, tol = 0.0;
            for (int64_t h = j * group; h < (j + 1) * group; ++h) {
              const double x = flash_test::grad_at(ce.in, ge, which, s, h, d);
              sum += x, mag += std::fabs(x);
              tol += bud[static_cast<size_t>(s * 3 * C + which * C + h * D + d)];
            }
            const double got = flash_test::grad_at(cg.in, gg, which, s, j, d);
            tol += u * (std::fabs(got) + mag);
            if (!(std::fabs(got - sum) <= tol) && failures++ < 8)
              ADD_FAILURE() << "d" << "qkv"[which] << " slot " << s << " kv head " << j << " dim " << d << ": got "
                            << got << ", sum over the group " << sum << ", budget " << tol;
          }
      }
  }
}

TEST(FlashEmulationBackward, RunsAndBlockOrdersGiveBitwiseEqualGradients) {
  // Two runs, and a run with the blocks of each grid (and the preprocess rows) taken in reverse order on another
  // number of threads: the same bits, since every output is accumulated by one warp in a fixed order.
  std::mt19937_64 g(test::test_seed());
  std::vector<flash_test::NamedCase> cases = flash_test::standard_cases(g, 64, /*long_t=*/false);
  for (auto& nc : cases) {
    if (nc.name != "causal T=257" && nc.name.rfind("prefix_shared", 0) != 0) continue;
    SCOPED_TRACE(nc.name);
    const BwdCase c = make_bwd_case(g, std::move(nc.in));
    flash_test::Grads a = flash_test::make_grads(c.in, 0x7fc0), b = a, r = a;
    emulate_bwd(c, a, GradWrite::Overwrite);
    emulate_bwd(c, b, GradWrite::Overwrite);
#if defined(_OPENMP)
    const int threads = omp_get_max_threads();
    omp_set_num_threads(threads > 1 ? 1 : 3);
#endif
    emulate_bwd(c, r, GradWrite::Overwrite, /*reverse=*/true);
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#endif
    EXPECT_TRUE(bitwise_equal(a, b));
    EXPECT_TRUE(bitwise_equal(a, r));
  }
}

// sum over (b, t, h, d) of out * dout for the exact attention in double on x ([B, T, 3C], q | k | v as ref_qkv), with
// the spans of `in`.
double exact_loss(const Inputs& in, const std::vector<double>& x, const std::vector<float>& dout) {
  const int64_t T = in.T, NH = in.NH, D = in.D, C = in.C(), C3 = 3 * C;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> w(static_cast<size_t>(T));
  double loss = 0.0;
  for (int64_t b = 0; b < in.B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const double* base = x.data() + b * T * C3 + h * D;
      for (int64_t t = 0; t < T; ++t) {
        double m = -INFINITY;
        for (int64_t k = 0; k <= t; ++k) {
          if (!flash_test::sees(in, b, t, k)) continue;
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += base[t * C3 + d] * base[k * C3 + C + d];
          w[static_cast<size_t>(k)] = s * scale;
          m = std::max(m, s * scale);
        }
        double z = 0.0;
        for (int64_t k = 0; k <= t; ++k)
          if (flash_test::sees(in, b, t, k)) z += (w[static_cast<size_t>(k)] = std::exp(w[static_cast<size_t>(k)] - m));
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t k = 0; k <= t; ++k)
            if (flash_test::sees(in, b, t, k)) o += w[static_cast<size_t>(k)] * base[k * C3 + 2 * C + d];
          loss += o / z * dout[static_cast<size_t>((b * T + t) * C + h * D + d)];
        }
      }
    }
  return loss;
}

TEST(FlashEmulationBackward, GradientsMatchDerivativesOfTheExactLoss) {
  // A few emulated gradient elements (of the emulated forward's out and lse) against a derivative independent of the
  // CPU oracle's backward: d/de L(x + e delta) at e = 0 along one input element (delta a unit vector), for
  // L = sum out * dout of the exact attention in double, by central differences with one Richardson step (error
  // O(h^4) at h = 2^-10, far below the budget). Budget per element: tests/flash_test_cases.h, plus u |grad| for the
  // output rounding. Elements: for each of q, k and v, random slots (and the first and last slot of the row, and the
  // slot after a one-slot segment of the packed row), random head and dim.
  std::mt19937_64 g(test::test_seed());
  for (int64_t D : {64, 128}) {
    Inputs in = flash_test::packed_inputs(g, 1, 100, 2, D);
    in.span = flash_test::padding_spans(1, 100);
    flash_test::pack_row(in.span, 100, 0, 0, {40, 1, 59});
    const BwdCase c = make_bwd_case(g, std::move(in));
    SCOPED_TRACE("D=" + std::to_string(D));
    flash_test::Grads got = flash_test::make_grads(c.in, 0x7fc0);
    emulate_bwd(c, got, GradWrite::Overwrite);
    const flash_test::Result ref_fwd = flash_test::oracle(c.in);
    const std::vector<double> bud = flash_test::backward_budgets(c.in, c.dout_ref, ref_fwd);
    const int64_t C = c.in.C();
    std::vector<double> x(c.in.ref_qkv.begin(), c.in.ref_qkv.end());
    std::uniform_int_distribution<int64_t> slot(0, c.in.T - 1), head(0, c.in.NH - 1), dim(0, D - 1);
    for (int which = 0; which < 3; ++which)
      for (int64_t s : {int64_t{0}, int64_t{41}, c.in.T - 1, slot(g), slot(g), slot(g)}) {
        const int64_t h = head(g), d = dim(g);
        const size_t i = static_cast<size_t>(s * 3 * C + which * C + h * D + d);
        const auto fd = [&](double step) {
          const double x0 = x[i];
          x[i] = x0 + step;
          const double lp = exact_loss(c.in, x, c.dout_ref);
          x[i] = x0 - step;
          const double lm = exact_loss(c.in, x, c.dout_ref);
          x[i] = x0;
          return (lp - lm) / (2 * step);
        };
        const double step = std::ldexp(1.0, -10), deriv = (4 * fd(step / 2) - fd(step)) / 3;
        const double gi = flash_test::grad_at(c.in, got, which, s, h, d);
        EXPECT_NEAR(gi, deriv, bud[i] + std::ldexp(1.0, -8) * std::fabs(gi) + 1e-9)
            << "d" << "qkv"[which] << " slot " << s << " head " << h << " dim " << d;
      }
  }
}

TEST(FlashEmulationBackward, BadParamsAreErrorsNamingTheRule) {
  std::mt19937_64 g(test::test_seed());
  Inputs in = flash_test::grouped_inputs(g, 1, 8, 4, 2, 64);
  std::vector<uint16_t> out(static_cast<size_t>(8 * 4 * 64)), dout(out.size());
  std::vector<float> lse(32), delta(32);
  flash_test::Grads gr = flash_test::make_grads(in, 0);
  const flash::BackwardParams good = flash_test::backward_params_for(
      in, nullptr, in.q.data(), in.k.data(), in.v.data(), out.data(), dout.data(), lse.data(), nullptr, nullptr,
      gr.dq.data(), gr.dk.data(), gr.dv.data(), delta.data(), GradWrite::Overwrite);
  const auto expect_error = [&](flash::BackwardParams p, const char* needle) {
    try {
      flash::emulate_backward(p);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  flash::BackwardParams p = good;
  p.delta = nullptr;
  expect_error(p, "delta workspace must not be null");
  p = good;
  p.dk_stride = 64;
  expect_error(p, "dk row stride 64 is shorter");
  p = good;
  p.dq = gr.dq.data() + 1;
  expect_error(p, "dq must start at a multiple of 16 bytes");
  p = good;
  p.head_dim = 96;
  expect_error(p, "head_dim must be 64 or 128");
}

// --- parameter checks -----------------------------------------------------------------------------------------------

TEST(FlashEmulationParams, BadParamsAreErrorsNamingTheRule) {
  std::mt19937_64 g(test::test_seed());
  Inputs in = flash_test::grouped_inputs(g, 1, 8, 4, 2, 64);
  std::vector<uint16_t> out(static_cast<size_t>(8 * 4 * 64));
  std::vector<float> lse(32);
  const flash::Params good = flash_test::params_for(in, nullptr, in.q.data(), in.k.data(), in.v.data(), out.data(),
                                                    lse.data(), nullptr);
  const auto expect_error = [&](flash::Params p, const char* needle) {
    try {
      flash::emulate_forward(p);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  flash::Params p = good;
  p.head_dim = 96;
  expect_error(p, "head_dim must be 64 or 128");
  p = good;
  p.n_kv_head = 3;
  expect_error(p, "must divide n_head");
  p = good;
  p.k_stride = 64;
  expect_error(p, "k row stride 64 is shorter");
  p = good;
  p.q = in.q.data() + 1;
  expect_error(p, "q must start at a multiple of 16 bytes");
  p = good;
  p.T = 0;
  expect_error(p, "must be positive");
}

}  // namespace
}  // namespace dpo
