// Flash-style causal attention on tensor cores (bf16 storage, fp32 accumulation): the forward, which saves the
// per-row log-sum-exp, and the deterministic backward that recomputes the probabilities from it (below). The tile
// code is kernels/flash_tile.h (backward: kernels/flash_tile_bwd.h); it runs on the GPU in kernels/flash_attention.cu
// and, lane by lane, on the host in kernels/flash_emulation.h (tests).
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
#include <initializer_list>
#include <string>

#include "kernels/common.h"
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

// One strided bf16 array of the kernels: `heads` heads of head_dim per row, rows `stride` elements apart.
struct RowArray {
  const char* name;
  const void* ptr;
  int64_t stride, heads;
};

// Every row holds its heads (stride >= heads * head_dim), and the 16-byte loads / 4-byte stores are aligned: the
// array at a multiple of 16 bytes, the stride a multiple of 8 elements (dpo::Error naming fn and the array).
inline void check_row_arrays(const char* fn, int64_t head_dim, std::initializer_list<RowArray> arrays) {
  for (const RowArray& a : arrays) {
    if (a.stride < a.heads * head_dim)
      throw Error(std::string(fn) + ": " + a.name + " row stride " + std::to_string(a.stride) +
                  " is shorter than its " + std::to_string(a.heads) + " heads of " + std::to_string(head_dim));
    if (a.stride % 8 != 0 || reinterpret_cast<uintptr_t>(a.ptr) % 16 != 0)
      throw Error(std::string(fn) + ": " + a.name + " must start at a multiple of 16 bytes with a row stride that is "
                  "a multiple of 8 elements (got stride " + std::to_string(a.stride) + ")");
  }
}

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
  check_row_arrays(fn, p.head_dim, {{"q", p.q, p.q_stride, p.n_head},
                                    {"k", p.k, p.k_stride, p.n_kv_head},
                                    {"v", p.v, p.v_stride, p.n_kv_head},
                                    {"out", p.out, p.out_stride, p.n_head}});
}

// The GPU kernel (kernels/flash_attention.cu): asynchronous on ctx.stream(), no scratch. check_params first
// (dpo::Error). Output may not alias an input.
void flash_attention_forward(CudaContext& ctx, const Params& p);

// --- Backward -------------------------------------------------------------------------------------------------------
// Inputs: q, k, v as in the forward; out and lse of the forward on them; dout [B, T, n_head, D] (rows of
// dout_stride), the gradient of the loss with respect to out; span as the forward saw it. Outputs, bf16 and strided
// like the inputs (GPT-2's packed dqkv [B, T, 3C]: dq = dqkv, dk = dqkv + C, dv = dqkv + 2C, strides 3C):
//   dq [B, T, n_head,    D]  dL/dq                                                                      (write)
//   dk, dv [B, T, n_kv_head, D]  dL/dk, dL/dv, summed over the query heads of the kv head's group           (write)
// write = GradWrite::Overwrite: dx = bf16(g); Accumulate: dx = bf16(dx + g), with g the fp32 gradient (one rounding
// either way; Accumulate reads the old bf16 value). A key no query sees and a query that sees no key get gradient 0
// (Overwrite stores 0; Accumulate stores the old value again).
// Workspace: delta [B, n_head, T] fp32, caller-provided (backward_workspace_bytes; no allocation inside):
//   delta[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d], d ascending in fp32 (the preprocess; the GPU may
//                    fuse the multiply-adds)                                                                   (=)
//
// Arithmetic (fp32 accumulation throughout): the probabilities are recomputed, P = exp(s * scale - lse) on the
// visible keys and 0 elsewhere (s = q.k from mma, as in the forward); dP = dout.v (mma); dS = P (dP - delta);
// dv = sum_t P dout, dk = scale sum_t dS q, dq = scale sum_k dS k. P and dS are rounded to bf16 before the mma that
// consumes them (P.dout, dS.q, dS.k); dS uses the unrounded P. The error budgets this gives against an exact
// backward on the same bf16 inputs are derived in tests/flash_test_cases.h.
//
// Work and determinism (no atomics, no scratch besides delta; two runs give bitwise equal outputs):
//   preprocess: one thread per (b, h, t) row.
//   dk/dv pass: one block per (key tile of 64, kv head, b); 4 warps of 16 keys. It iterates the group's query
//     heads in ascending order and, for each, the query blocks of 64 at or after the key tile that the forward
//     visits against it (the forward's tile vote, transposed: some query of the block sees some key of the tile),
//     ascending; dk and dv of each key are accumulated by one warp in that fixed order and written once.
//   dq pass: one block per (query block of 64, head, b) as in the forward; 4 warps of 16 queries iterate the visited
//     key tiles ascending; dq of each query is accumulated by one warp and written once.
struct BackwardParams {
  const uint16_t* q = nullptr;  // bf16 bits
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  const uint16_t* out = nullptr;
  const uint16_t* dout = nullptr;
  const float* lse = nullptr;     // [B, n_head, T]
  const int32_t* span = nullptr;  // [B, T, kSpanWidth] or null (causal)
  uint16_t* dq = nullptr;
  uint16_t* dk = nullptr;
  uint16_t* dv = nullptr;
  float* delta = nullptr;  // workspace, backward_workspace_bytes(p) bytes
  GradWrite write = GradWrite::Accumulate;
  int64_t B = 0, T = 0, n_head = 0, n_kv_head = 0, head_dim = 0;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0, out_stride = 0, dout_stride = 0;
  int64_t dq_stride = 0, dk_stride = 0, dv_stride = 0;
};

// Bytes of the delta workspace: B * n_head * T floats.
inline int64_t backward_workspace_bytes(const BackwardParams& p) {
  return p.B * p.n_head * p.T * static_cast<int64_t>(sizeof(float));
}

// The checks of check_params, for the backward's arrays (the outputs need the same alignment), plus non-null lse and
// delta at 4-byte alignment.
inline void check_backward_params(const BackwardParams& p, const char* fn) {
  Params f;
  f.q = p.q, f.k = p.k, f.v = p.v, f.out = const_cast<uint16_t*>(p.out), f.lse = const_cast<float*>(p.lse);
  f.B = p.B, f.T = p.T, f.n_head = p.n_head, f.n_kv_head = p.n_kv_head, f.head_dim = p.head_dim;
  f.q_stride = p.q_stride, f.k_stride = p.k_stride, f.v_stride = p.v_stride, f.out_stride = p.out_stride;
  check_params(f, fn);
  const auto fail = [&](const std::string& what) { throw Error(std::string(fn) + ": " + what); };
  if (!p.dout || !p.dq || !p.dk || !p.dv || !p.delta) fail("dout, dq, dk, dv and the delta workspace must not be null");
  if (reinterpret_cast<uintptr_t>(p.lse) % 4 != 0 || reinterpret_cast<uintptr_t>(p.delta) % 4 != 0)
    fail("lse and the delta workspace must be 4-byte aligned");
  check_row_arrays(fn, p.head_dim, {{"dout", p.dout, p.dout_stride, p.n_head},
                                    {"dq", p.dq, p.dq_stride, p.n_head},
                                    {"dk", p.dk, p.dk_stride, p.n_kv_head},
                                    {"dv", p.dv, p.dv_stride, p.n_kv_head}});
}

// The GPU backward (kernels/flash_attention.cu): three kernels on ctx.stream() (preprocess, dk/dv pass, dq pass),
// asynchronous. check_backward_params first (dpo::Error). Outputs may not alias inputs; dq, dk and dv may share one
// packed array (disjoint columns).
void flash_attention_backward(CudaContext& ctx, const BackwardParams& p);

}  // namespace dpo::flash
