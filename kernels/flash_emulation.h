// The flash attention forward and backward (kernels/flash_attention.h) run on the host through the very tile code of
// the GPU kernels (kernels/flash_tile.h, kernels/flash_tile_bwd.h), with a warp policy that holds the registers of
// all 32 lanes and emulates the warp instructions lane by lane: mma.sync m16n8k16 (bf16 in, fp32 accumulate),
// ldmatrix .x4 (with and without .trans), shfl.xor and the vote (and the plain loads, stores and bf16 conversions
// the tile code reaches through the policy). The fragment tables below are the PTX ISA's (section "Matrix fragments
// for mma.m16n8k16 with floating point type" and "ldmatrix"); tests/test_flash_emulation.cpp checks them against
// entries read off the ISA's figures and against plain matrix products, so that the kernel's indexing is tested
// here, without a GPU.
// What the emulation cannot show: timing, races between warps (the host runs the warps of a phase one after another),
// and the hardware's internal summation order in mma (here: fp32, k ascending).
//
// Shared-memory discipline is checked: every ldmatrix row address and every 16-byte staging store must lie inside
// the block's shared array and be 16-byte aligned (std::logic_error otherwise); the array starts poisoned with bf16
// NaN, so a read of a row that was never staged shows up as NaN in the outputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/flash_tile.h"
#include "kernels/flash_tile_bwd.h"

namespace dpo::flash {

// --- bf16 bit patterns on the host ---------------------------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even (NaN stays a quiet NaN), as __float2bfloat16_rn.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// --- fragment tables (lane, register, half) -> matrix coordinates ---------------------------------------------------
struct RowCol {
  int row, col;
};
// A of m16n8k16 (16x16, row-major), 4 registers of two bf16; half 0 is the low 16 bits.
constexpr RowCol mma_a_coord(int lane, int reg, int half) {
  return {lane / 4 + 8 * (reg & 1), 2 * (lane % 4) + half + 8 * (reg >> 1)};
}
// B of m16n8k16 (16x8, k x n), 2 registers of two bf16.
constexpr RowCol mma_b_coord(int lane, int reg, int half) { return {2 * (lane % 4) + half + 8 * reg, lane / 4}; }
// C / D of m16n8k16 (16x8 fp32), 4 registers.
constexpr RowCol mma_c_coord(int lane, int reg) { return {lane / 4 + 8 * (reg >> 1), 2 * (lane % 4) + (reg & 1)}; }
// ldmatrix .m8n8 .b16: the element of 8x8 matrix `reg` (rows as addressed, 8 elements each) that lands in half
// `half` of register `reg` of lane `lane`; .trans swaps the roles of rows and columns.
constexpr RowCol ldmatrix_coord(int lane, int half, bool trans) {
  return trans ? RowCol{2 * (lane % 4) + half, lane / 4} : RowCol{lane / 4, 2 * (lane % 4) + half};
}

// --- the host warp policy ------------------------------------------------------------------------------------------
struct HostWarp {
  template <class T, int N>
  struct Regs {
    T v[32][N];
    T& operator()(int lane, int i) { return v[lane][i]; }
    const T& operator()(int lane, int i) const { return v[lane][i]; }
  };

  // The block's shared array, for the address checks (set by the driver, per thread).
  static const uint16_t*& smem_lo() {
    static thread_local const uint16_t* p = nullptr;
    return p;
  }
  static const uint16_t*& smem_hi() {
    static thread_local const uint16_t* p = nullptr;
    return p;
  }
  static void check_row(const uint16_t* a, const char* what) {
    if (a < smem_lo() || a + 8 > smem_hi() || (a - smem_lo()) % 8 != 0)
      throw std::logic_error(std::string("flash emulation: ") + what + " address outside the shared tiles or not "
                             "16-byte aligned (element offset " + std::to_string(a - smem_lo()) + ")");
  }

  template <class F>
  static void warps(F&& f) {
    for (int w = 0; w < kWarps; ++w) f(w, w);
  }
  template <class F>
  static void each(F&& f) {
    for (int lane = 0; lane < 32; ++lane) f(lane);
  }
  static void sync() {}
  template <class F>
  static bool any(F&& f) {
    bool a = false;
    for (int lane = 0; lane < 32; ++lane) a = f(lane) || a;  // every lane evaluates its predicate
    return a;
  }

  static float lo(uint32_t x) { return bf16_to_float(static_cast<uint16_t>(x & 0xffffu)); }
  static float hi(uint32_t x) { return bf16_to_float(static_cast<uint16_t>(x >> 16)); }

  // D = A B + C for one m16n8k16 tile, gathered from and scattered to the lanes through the tables above.
  template <int NC, int NA, int NB>
  static void mma(Regs<float, NC>& c, int ci, const Regs<uint32_t, NA>& a, int ai, const Regs<uint32_t, NB>& b,
                  int bi) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      for (int r = 0; r < 4; ++r)
        for (int hf = 0; hf < 2; ++hf) {
          const RowCol x = mma_a_coord(lane, r, hf);
          const uint32_t word = a(lane, ai + r);
          A[x.row][x.col] = hf ? hi(word) : lo(word);
        }
      for (int r = 0; r < 2; ++r)
        for (int hf = 0; hf < 2; ++hf) {
          const RowCol x = mma_b_coord(lane, r, hf);
          const uint32_t word = b(lane, bi + r);
          B[x.row][x.col] = hf ? hi(word) : lo(word);
        }
      for (int r = 0; r < 4; ++r) {
        const RowCol x = mma_c_coord(lane, r);
        C[x.row][x.col] = c(lane, ci + r);
      }
    }
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        float acc = C[i][j];
        for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];  // bf16 x bf16 is exact in fp32
        C[i][j] = acc;
      }
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r) {
        const RowCol x = mma_c_coord(lane, r);
        c(lane, ci + r) = C[x.row][x.col];
      }
  }

  // ldmatrix.x4: lane l supplies the address of row l % 8 of matrix l / 8; register ri + j of every lane receives
  // its two elements of matrix j.
  template <bool Trans, int N, class Addr>
  static void ldmatrix_x4(Regs<uint32_t, N>& r, int ri, Addr&& addr) {
    const uint16_t* rows[32];
    for (int lane = 0; lane < 32; ++lane) {
      rows[lane] = addr(lane);
      check_row(rows[lane], "ldmatrix");
    }
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j) {
        uint32_t word = 0;
        for (int hf = 0; hf < 2; ++hf) {
          const RowCol x = ldmatrix_coord(lane, hf, Trans);
          word |= static_cast<uint32_t>(rows[8 * j + x.row][x.col]) << (16 * hf);
        }
        r(lane, ri + j) = word;
      }
  }

  template <int N>
  static void shfl_xor(const Regs<float, N>& x, int i, int mask, Regs<float, 1>& y) {
    for (int lane = 0; lane < 32; ++lane) y(lane, 0) = x(lane ^ mask, i);
  }

  static float exp2(float x) { return std::exp2(x); }
  static float log(float x) { return std::log(x); }
  static uint32_t pack_bf16x2(float lo_v, float hi_v) {
    return static_cast<uint32_t>(float_to_bf16(lo_v)) | (static_cast<uint32_t>(float_to_bf16(hi_v)) << 16);
  }
  // 16 bytes into shared memory (checked), from global memory or zeros.
  static void copy16(uint16_t* dst, const uint16_t* src) {
    check_row(dst, "staging store");
    std::memcpy(dst, src, 16);
  }
  static void zero16(uint16_t* dst) {
    check_row(dst, "staging store");
    std::memset(dst, 0, 16);
  }
  static void store_u32(uint16_t* dst, uint32_t v) { std::memcpy(dst, &v, 4); }
  static uint32_t load_u32(const uint16_t* src) {
    uint32_t v;
    std::memcpy(&v, src, 4);
    return v;
  }
};

// The whole forward on the host: every block of the GPU grid through forward_block<HostWarp, D>, blocks spread over
// the OpenMP threads (each block is independent, as on the GPU). check_params first (dpo::Error). Returns the number
// of (query block, key tile) pairs visited.
inline int64_t emulate_forward(const Params& p) {
  check_params(p, "flash::emulate_forward");
  const int64_t nblocks = grid_blocks(p);
  int64_t visited = 0;
  std::string error;  // the first failed check (an exception may not leave an OpenMP region)
  const auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
#pragma omp parallel for schedule(dynamic) reduction(+ : visited)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      try {
        std::vector<uint16_t> smem(static_cast<size_t>(smem_elems<D>()), uint16_t{0x7fc0});  // bf16 NaN
        std::vector<WarpRegs<HostWarp, D>> regs(kWarps);
        HostWarp::smem_lo() = smem.data();
        HostWarp::smem_hi() = smem.data() + smem.size();
        visited += forward_block<HostWarp, D>(p, blk, smem.data(), regs.data());
      } catch (const std::exception& e) {
#pragma omp critical(dpo_flash_emulation_error)
        if (error.empty()) error = std::string(e.what()) + " (block " + std::to_string(blk) + ")";
      }
    }
  };
  if (p.head_dim == 64)
    run(std::integral_constant<int, 64>{});
  else
    run(std::integral_constant<int, 128>{});
  if (!error.empty()) throw std::logic_error(error);
  return visited;
}

// What the emulated backward visited: (query head, query block) pairs summed over the dk/dv blocks, and key tiles
// summed over the dq blocks. Both equal the forward's (query block, key tile) pairs (the same vote).
struct BackwardVisits {
  int64_t dkdv = 0, dq = 0;
};

// The whole backward on the host: the preprocess, then every block of the dk/dv grid and of the dq grid through
// dkdv_block / dq_block<HostWarp, D>, blocks spread over the OpenMP threads in the given schedule order (`reverse`:
// the blocks of each grid taken last to first, to show that the result does not depend on the order the GPU runs
// its blocks in). check_backward_params first (dpo::Error). Each block's shared array starts poisoned (bf16 NaN
// in the tiles, NaN bits in the per-query arrays); ldmatrix and staging addresses are checked against the tiles.
inline BackwardVisits emulate_backward(const BackwardParams& p, bool reverse = false) {
  check_backward_params(p, "flash::emulate_backward");
  BackwardVisits visits;
  const int64_t rows = backward_delta_rows(p);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) backward_delta_row<HostWarp>(p, reverse ? rows - 1 - i : i);
  std::string error;
  const auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const size_t words = static_cast<size_t>(bwd_smem_bytes<D>() / 4);
    const int64_t nkv = dkdv_grid_blocks(p), nq = dq_grid_blocks(p);
    int64_t vkv = 0, vq = 0;
#pragma omp parallel for schedule(dynamic) reduction(+ : vkv, vq)
    for (int64_t i = 0; i < nkv + nq; ++i) {
      try {
        std::vector<uint32_t> raw(words, 0x7fc07fc0u);  // bf16 NaN pairs
        uint16_t* smem = reinterpret_cast<uint16_t*>(raw.data());
        HostWarp::smem_lo() = smem;
        HostWarp::smem_hi() = smem + bwd_tile_elems<D>();
        // The dk/dv grid's blocks, then the dq grid's (independent: they write disjoint outputs).
        if (i < nkv) {
          std::vector<DkvRegs<HostWarp, D>> regs(kWarps);
          vkv += dkdv_block<HostWarp, D>(p, reverse ? nkv - 1 - i : i, smem, regs.data());
        } else {
          std::vector<DqRegs<HostWarp, D>> regs(kWarps);
          const int64_t blk = i - nkv;
          vq += dq_block<HostWarp, D>(p, reverse ? nq - 1 - blk : blk, smem, regs.data());
        }
      } catch (const std::exception& e) {
#pragma omp critical(dpo_flash_emulation_error)
        if (error.empty()) error = std::string(e.what()) + " (backward block " + std::to_string(i) + ")";
      }
    }
    visits.dkdv = vkv;
    visits.dq = vq;
  };
  if (p.head_dim == 64)
    run(std::integral_constant<int, 64>{});
  else
    run(std::integral_constant<int, 128>{});
  if (!error.empty()) throw std::logic_error(error);
  return visits;
}

}  // namespace dpo::flash
