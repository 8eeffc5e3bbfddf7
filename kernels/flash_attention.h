// Flash-style causal attention forward on tensor cores (bf16 storage, fp32 accumulation), with the per-row
// log-sum-exp saved for a backward. The tile code is kernels/flash_tile.h; it runs on the GPU in
// kernels/flash_attention.cu and, lane by lane, on the host in kernels/flash_emulation.h (tests).
//
// Shapes and storage (all strides and sizes in elements, 64-bit):
//   q   [B, T, n_head,    D] rows of q_stride elements: query head h of slot (b, t) is q + (b*T + t)*q_stride + h*D
//   k,v [B, T, n_kv_head, D] rows of k_stride / v_stride elements, kv head j at offset j*D of a row
//   out [B, T, n_head,    D] rows of out_stride elements                                                 (=)
//   lse [B, n_head, T] fp32: the log-sum-exp of query (b, h, t)'s scaled scores q.k / sqrt(D) over its visible keys
//                           (natural log), +inf for a query with no visible key (its out row is 0), as the blocked
//                           CPU kernel (kernels/attention.h, attention_tiled_forward) writes it               (=)
// q, k, v and out are bf16 (here as their 16-bit patterns, uint16_t; on the GPU the same bits as __nv_bfloat16).
// GPT-2's packed c_attn output qkv [B, T, 3C] is q = qkv, k = qkv + C, v = qkv + 2C with q/k/v stride 3C, n_head =
// n_kv_head = C / D; separate grouped-query tensors are q [B, T, n_head*D], k and v [B, T, n_kv_head*D].
// Grouped-query heads: n_kv_head divides n_head; query head h reads kv head h / (n_head / n_kv_head).
// Head dims: D = 64 or 128 (one kernel instantiation each). T: any (>= 1), not a multiple of a tile.
// Visibility: span [B, T, kSpanWidth] int32 (kernels/batch_layout.h): query t of row b sees key k of the same row
// when span_sees(span[b, t], t, k); span null: plain causal (k <= t). Spans are only compared with key slots, never
// used as addresses: an invalid span (not span_valid) cannot cause an out-of-bounds access; a query whose span lets
// it see nothing gets out 0 and lse +inf. The GPU cannot report a bad span without a sync; callers check them on the
// host (cpu::check_attention_spans).
//
// Arithmetic: the scores q.k are tensor-core products of the bf16 inputs summed in fp32 (mma.sync m16n8k16), then
// scaled by 1/sqrt(D); the softmax is online over key tiles (running max m and sum l in fp32, the output
// accumulators rescaled by exp(m_old - m_new) when the max grows); the probabilities exp(s - m) are rounded to bf16
// for the P.V product (fp32 accumulation) while l sums them unrounded; out = acc / l rounded once to bf16, lse =
// m + log(l). Against an exact softmax on the same bf16 inputs this bounds the error of out by about
// 2^-8 * max|v| (the probability rounding: every weight moves by at most 2^-8 of itself, and the weights sum to 1)
// plus 2^-8 |out| (the output rounding), plus fp32 reduction errors (budgets: tests/flash_test_cases.h).
//
// Work: blocks of kFlashBlockRows = 64 queries (4 warps x 16 rows) against key tiles of kFlashTileKeys = 64. A block
// visits the key tiles of [0, last query] that at least one of its queries sees (span_sees_any): tiles left of
// every query's range and tiles wholly inside every query's hole are skipped, so a row packed with segments of
// lengths L_i costs about sum_i L_i^2 (plus the tiles that straddle a boundary), not T^2.
// Deterministic: every output is computed by one warp in a fixed order (no atomics); no scratch memory.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/error.h"

namespace dpo {
class CudaContext;
}

namespace dpo::flash {

constexpr int64_t kFlashBlockRows = 64;  // queries per block
constexpr int64_t kFlashTileKeys = 64;   // keys per tile; tile j holds the keys [64 j, 64 (j + 1))

// One call. Pointers are device pointers for the GPU launcher, host pointers for the emulation.
struct Params {
  const uint16_t* q = nullptr;  // bf16 bits
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  uint16_t* out = nullptr;
  float* lse = nullptr;
  const int32_t* span = nullptr;  // [B, T, kSpanWidth] or null (causal)
  int64_t B = 0, T = 0, n_head = 0, n_kv_head = 0, head_dim = 0;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0, out_stride = 0;  // elements between consecutive slots
};

// The checks both entry points make before anything runs (dpo::Error naming fn and the rule broken): positive
// sizes, D in {64, 128}, n_kv_head dividing n_head, every row holding its heads (stride >= heads * D), and the
// alignment the kernel's 16-byte loads and 4-byte stores need: q, k, v, out at multiples of 16 bytes and every
// stride a multiple of 8 elements.
inline void check_params(const Params& p, const char* fn) {
  const auto fail = [&](const std::string& what) { throw Error(std::string(fn) + ": " + what); };
  if (p.B <= 0 || p.T <= 0 || p.n_head <= 0 || p.n_kv_head <= 0)
    fail("B, T, n_head and n_kv_head must be positive (got B=" + std::to_string(p.B) + " T=" + std::to_string(p.T) +
         " n_head=" + std::to_string(p.n_head) + " n_kv_head=" + std::to_string(p.n_kv_head) + ")");
  if (p.head_dim != 64 && p.head_dim != 128)
    fail("head_dim must be 64 or 128 (got " + std::to_string(p.head_dim) + ")");
  if (p.n_head % p.n_kv_head != 0)
    fail("n_kv_head (" + std::to_string(p.n_kv_head) + ") must divide n_head (" + std::to_string(p.n_head) + ")");
  if (p.T > INT32_MAX) fail("T must fit the int32 spans (got " + std::to_string(p.T) + ")");
  if (!p.q || !p.k || !p.v || !p.out || !p.lse) fail("q, k, v, out and lse must not be null");
  const struct {
    const char* name;
    const void* ptr;
    int64_t stride, heads;
  } arrays[] = {{"q", p.q, p.q_stride, p.n_head},
                {"k", p.k, p.k_stride, p.n_kv_head},
                {"v", p.v, p.v_stride, p.n_kv_head},
                {"out", p.out, p.out_stride, p.n_head}};
  for (const auto& a : arrays) {
    if (a.stride < a.heads * p.head_dim)
      fail(std::string(a.name) + " row stride " + std::to_string(a.stride) + " is shorter than its " +
           std::to_string(a.heads) + " heads of " + std::to_string(p.head_dim));
    if (a.stride % 8 != 0 || reinterpret_cast<uintptr_t>(a.ptr) % 16 != 0)
      fail(std::string(a.name) + " must start at a multiple of 16 bytes with a row stride that is a multiple of 8 "
           "elements (got stride " + std::to_string(a.stride) + ")");
  }
}

// The GPU kernel (kernels/flash_attention.cu): asynchronous on ctx.stream(), no scratch. check_params first
// (dpo::Error). Output may not alias an input.
void flash_attention_forward(CudaContext& ctx, const Params& p);

}  // namespace dpo::flash
