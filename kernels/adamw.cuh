// AdamW on the GPU. Contract and order of operations: kernels/adamw.h (CPU twin cpu::adamw_update in
// kernels/adamw_cpu.cpp), which is torch.optim.AdamW's single-tensor path:
//     g      = grad * grad_scale
//     param *= 1 - lr * weight_decay
//     m      = lerp(m, g, 1 - beta1)                 (ATen's two-branch lerp)
//     v      = v * beta2 + (1 - beta2) * g * g
//     denom  = sqrt(v) / sqrt(1 - beta2^step) + eps
//     param += (-lr / (1 - beta1^step)) * m / denom
//   param[n], m[n], v[n]: float, read and written in place; grad[n]: float, read only. No two may alias.
//   State (m, v) is fp32 and each element's arithmetic is fp32, as in the CPU twin's float path, but nvcc contracts
//   the lerp and the v update into fused multiply-adds where the twin does not (kernels/adamw.h), so the two differ
//   by float round-off; the scalars (bias corrections, step size, decay) are computed on the host in double
//   (adamw_step_state), as PyTorch computes them in Python, then rounded to float. Each element's value is a function
//   of that element only, so the result does not depend on the launch configuration. Moved with 128-bit loads and
//   stores where the four arrays can be aligned together (kernels/bf16.cuh: scalar head and tail, all scalar when
//   they cannot). p.step is 1-based. Asynchronous on ctx.stream(); 64-bit indices.
//
// adamw_update_segments: the same update over segs[0, n_segs) of flat arrays of n floats in ONE launch (the
//   multi-tensor form; per-segment weight decay and the segment rules as in kernels/adamw.h, elements outside every
//   segment untouched). Each segment is cut into chunks of kAdamWChunk elements; a device table lists, per
//   non-empty segment, its first chunk (a prefix sum), offset, size and decay flag, and each block takes chunks in
//   a grid-stride loop and finds a chunk's segment by binary search in the table. Every element goes through the
//   same device function and the same host-computed float scalars as adamw_update, so the two agree bitwise.
//   The table lives in an AdamWSegmentTable the caller keeps across steps: it is validated and uploaded
//   (stream-ordered, no host sync) only when the segments, n or the context change, so a training step costs one
//   launch and no host-device transfer.
//
// adamw_dry_run_segments: the numerical guard (kernels/adamw.h): the same launch as adamw_update_segments over the
//   same table, in a read-only pass that computes each element's new param, m, v with the update's own device
//   function and writes nothing but *flag (a device int): 0 when every value is finite, 1 otherwise. The flag is
//   zeroed by a stream-ordered memset first; each block ORs its threads' findings (__syncthreads_or) and an
//   offending block sets the flag with one atomicOr. Asynchronous: the caller reads the flag back (CudaBackend does,
//   once per step) and launches the update only when it is 0.
//
// The device step (kernels/adamw.h, "The device step"; record and state are F64 device arrays in the adamw_record /
//   adamw_state layouts). All asynchronous on ctx.stream(), no allocation, nothing returned to the host:
//   adamw_prepare         one thread: the record's norm, clip factor and flags (cpu::adamw_prepare's arithmetic).
//   adamw_check_segments  the dry run's launch over the segment table, reading the step's scalars and grad_scale
//                         from state and record; skipped by every block when the norm is not finite; an offending
//                         block sets record[kNonFiniteRanks] to 1.0 (a 64-bit atomicOr of 1.0's bits into 0.0).
//   adamw_apply_segments  ONE launch over the same table: when the record does not say skip, the update (bitwise
//                         adamw_update_segments with grad_scale = the record's), copy[i] = bf16(new param[i]) when
//                         copy is given (__float2bfloat16_rn, convert()'s rounding), grad[i] = 0 with
//                         GradAfterStep::Zero; when it says skip, only the gradient zeroing. The decision is read
//                         from device memory by every block, so the host never waits for it.
//   The gradient norm itself is cuda::sum_squares (kernels/elementwise.cuh) into record[kSumSquares] with a
//   preallocated scratch: the same kernels and order as the backend's sum_squares, so the value is bitwise that.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/adamw.h"

namespace dpo {
class Buffer;
class CudaContext;
}  // namespace dpo

namespace dpo::cuda {

constexpr int64_t kAdamWChunk = 4096;  // elements per chunk of adamw_update_segments (one block-iteration each)
// The fused kernel's grid is min(chunks, kAdamWBlocksPerSm * SMs) blocks of 256 threads (one resident wave on
// sm_80/sm_90); the grid-stride loop takes the remaining chunks.
constexpr int kAdamWBlocksPerSm = 8;

void adamw_update(CudaContext& ctx, float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& p);

// The device copy of a segment list, cached by whoever calls adamw_update_segments step after step (CudaBackend
// keeps one). Not thread-safe; one context at a time. Its device buffer is freed in stream order on the context's
// stream, so the table must not outlive the context.
class AdamWSegmentTable {
 public:
  // Makes the table describe segs[0, n_segs) of an n-element array on ctx. When they (and n and ctx) equal the
  // current ones this only compares; otherwise it validates them (check_adamw_segments: dpo::Error, the table is
  // left as it was) and enqueues the upload on ctx.stream().
  void assign(CudaContext& ctx, const AdamWSegment* segs, int64_t n_segs, int64_t n);

  const int64_t* device_entries() const;    // [entries()][4]: first chunk, offset, numel, decay flag (0/1)
  int64_t entries() const { return static_cast<int64_t>(host_.size() / 4); }  // non-empty segments
  int64_t chunks() const { return chunks_; }
  int64_t uploads() const { return uploads_; }  // how many times assign() rebuilt the table (for cache tests)

 private:
  const CudaContext* ctx_ = nullptr;
  int64_t n_ = -1;
  std::vector<AdamWSegment> segs_;  // as last assigned, for the comparison
  std::vector<int64_t> host_;       // the entries as uploaded
  std::shared_ptr<Buffer> dev_;
  int64_t chunks_ = 0;
  int64_t uploads_ = 0;
};

// `table` is assign()ed first (so it may be a fresh table or one from earlier steps), then one launch.
void adamw_update_segments(CudaContext& ctx, AdamWSegmentTable& table, float* param, const float* grad, float* m,
                           float* v, int64_t n, const AdamWSegment* segs, int64_t n_segs, const AdamWParams& p);

// flag: one device int, overwritten (see the top of this file). `table` as for adamw_update_segments (the same
// table serves both calls without a re-upload).
void adamw_dry_run_segments(CudaContext& ctx, AdamWSegmentTable& table, int* flag, const float* param,
                            const float* grad, const float* m, const float* v, int64_t n, const AdamWSegment* segs,
                            int64_t n_segs, const AdamWParams& p);

void adamw_prepare(CudaContext& ctx, double* record, const double* state, AdamWNormFrom from);
void adamw_check_segments(CudaContext& ctx, AdamWSegmentTable& table, double* record, const double* state,
                          const float* param, const float* grad, const float* m, const float* v, int64_t n,
                          const AdamWSegment* segs, int64_t n_segs);
// copy: n bf16 or nullptr.
void adamw_apply_segments(CudaContext& ctx, AdamWSegmentTable& table, const double* record, const double* state,
                          float* param, float* grad, float* m, float* v, __nv_bfloat16* copy, int64_t n,
                          const AdamWSegment* segs, int64_t n_segs, GradAfterStep after);

}  // namespace dpo::cuda
