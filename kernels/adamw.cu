#include "kernels/adamw.cuh"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;

// Per-step scalars: the step state's doubles (adamw_step_state, kernels/adamw.h: computed on the host in double,
// as kernels/adamw_cpu.cpp uses them) rounded to float. The legacy launchers build them on the host from AdamWParams;
// the device step's kernels build them from the state and the record in device memory: the same conversions of the
// same doubles, so both give the same floats.
struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float neg_step_size;  // -(lr / (1 - beta1^step))
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float w1;             // 1 - beta1 (lerp weight)
  float one_minus_w1;   // 1 - w1, ATen's second lerp branch
  float beta2;
  float w2;  // 1 - beta2
  float eps;
  float grad_scale;
};

static __host__ __device__ __forceinline__ AdamWScalars scalars_from_state(const double* st, double grad_scale) {
  namespace S = adamw_state;
  AdamWScalars s;
  s.decay = static_cast<float>(st[S::kDecay]);
  s.neg_step_size = static_cast<float>(st[S::kNegStepSize]);
  s.bc2_sqrt = static_cast<float>(st[S::kBc2Sqrt]);
  s.w1 = static_cast<float>(st[S::kW1]);
  s.one_minus_w1 = static_cast<float>(st[S::kOneMinusW1]);
  s.beta2 = static_cast<float>(st[S::kBeta2]);
  s.w2 = static_cast<float>(st[S::kW2]);
  s.eps = static_cast<float>(st[S::kEps]);
  s.grad_scale = static_cast<float>(grad_scale);
  return s;
}

// The legacy launchers' scalars and the undecayed segments' decay factor (1 - lr * 0).
static AdamWScalars make_scalars(const AdamWParams& p, float* decay_off = nullptr) {
  double st[adamw_state::kWidth];
  adamw_step_state(p, 0.0, st);
  if (decay_off != nullptr) *decay_off = static_cast<float>(st[adamw_state::kDecayOff]);
  return scalars_from_state(st, p.grad_scale);
}

// The new values of element i of one AdamW step. Every kernel here (the update kernels and the dry run) calls this
// one function with the same scalars, so their float operations (and nvcc's FMA contractions of them) are the same:
// the fused and single-tensor updates agree bitwise, and the dry run tests bitwise the values the update stores.
struct AdamWValues {
  float x, m, v;
};
static __device__ __forceinline__ AdamWValues adamw_values(float param, float grad, float m0, float v0,
                                                           const AdamWScalars& s, float decay) {
  const float g = grad * s.grad_scale;
  float x = param * decay;  // param.mul_(1 - lr * weight_decay)
  // exp_avg.lerp_(grad, 1 - beta1), ATen's two branches (exact at both ends).
  const float mi = fabsf(s.w1) < 0.5f ? m0 + s.w1 * (g - m0) : g - (g - m0) * s.one_minus_w1;
  float vi = v0 * s.beta2;  // exp_avg_sq.mul_(beta2)
  vi = vi + s.w2 * g * g;   //   .addcmul_(grad, grad, value=1 - beta2)
  const float denom = sqrtf(vi) / s.bc2_sqrt + s.eps;
  x = x + s.neg_step_size * mi / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  return {x, mi, vi};
}

// Float vectors: the four arrays share one index, so a split (kernels/bf16.cuh) aligns them together when their
// addresses agree modulo 16 bytes.
constexpr int kG = 4;

// NaN or +-Inf: all exponent bits set. A bit test rather than isfinite(), so that no math-mode flag can fold it away.
static __device__ __forceinline__ bool non_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// What adamw_range does with each element's new values.
enum class RangeMode {
  Update,  // write param, m, v
  DryRun,  // write nothing; return whether any new value is non-finite
  Apply,   // Update, plus copy[i] = bf16(new param) when copy is set and grad[i] = 0 when zero_grad
};

// Elements [0, len) of param + base etc. over `nt` workers, worker t: 128-bit loads and stores on the common aligned
// body, scalar edges; every element through adamw_values. grad is written only by Apply with zero_grad; copy (bf16,
// same indexing as param) only by Apply. The bf16 copy is not part of the 16-byte alignment (a 4-element group of it
// is 8 bytes): it is stored as two bf16 pairs when copy + base + head is 4-byte aligned (then every group is), else
// element by element.
template <RangeMode kMode>
static __device__ __forceinline__ int adamw_range(float* param, float* grad, float* m, float* v, bf16* copy,
                                                  bool zero_grad, int64_t base, int64_t len, int64_t t, int64_t nt,
                                                  const AdamWScalars& s, float decay) {
  constexpr bool kWrite = kMode != RangeMode::DryRun;
  float* p = param + base;
  float* g = grad + base;
  float* mm = m + base;
  float* vv = v + base;
  bf16* c = kMode == RangeMode::Apply && copy != nullptr ? copy + base : nullptr;
  const bool zero = kMode == RangeMode::Apply && zero_grad;
  const VecView views[] = {{p, sizeof(float)}, {g, sizeof(float)}, {mm, sizeof(float)}, {vv, sizeof(float)}};
  const int64_t head = vec_head(len, kG, views, 4);
  const bool c_pairs = c != nullptr && (reinterpret_cast<unsigned long long>(c + head) % 4u) == 0u;
  int bad = 0;
  auto visit = [&](const AdamWValues& r) {
    bad |= (non_finite(r.x) || non_finite(r.m) || non_finite(r.v)) ? 1 : 0;
  };
  split_loop<kG>(
      t, nt, len, head,
      [&](int64_t i) {
        const AdamWValues r = adamw_values(p[i], g[i], mm[i], vv[i], s, decay);
        if constexpr (kWrite) {
          p[i] = r.x;
          mm[i] = r.m;
          vv[i] = r.v;
          if (c != nullptr) c[i] = __float2bfloat16_rn(r.x);
          if (zero) g[i] = 0.0f;
        } else {
          visit(r);
        }
      },
      [&](int64_t i) {
        Pack<float, kG> px = load_pack<kG>(p, i), pm = load_pack<kG>(mm, i), pv = load_pack<kG>(vv, i);
        const Pack<float, kG> pg = load_pack<kG>(g, i);
#pragma unroll
        for (int j = 0; j < kG; ++j) {
          const AdamWValues r = adamw_values(px.e[j], pg.e[j], pm.e[j], pv.e[j], s, decay);
          if constexpr (kWrite) {
            px.e[j] = r.x;
            pm.e[j] = r.m;
            pv.e[j] = r.v;
          } else {
            visit(r);
          }
        }
        if constexpr (kWrite) {
          store_pack<kG>(p, i, px);
          store_pack<kG>(mm, i, pm);
          store_pack<kG>(vv, i, pv);
          if (c != nullptr) {
            static_assert(kG == 4, "the bf16 copy is stored as two pairs per group");
            if (c_pairs) {
              __nv_bfloat162* c2 = reinterpret_cast<__nv_bfloat162*>(c + i);
              c2[0] = __floats2bfloat162_rn(px.e[0], px.e[1]);
              c2[1] = __floats2bfloat162_rn(px.e[2], px.e[3]);
            } else {
#pragma unroll
              for (int j = 0; j < kG; ++j) c[i + j] = __float2bfloat16_rn(px.e[j]);
            }
          }
          if (zero) store_pack<kG>(g, i, Pack<float, kG>{});
        }
      });
  return bad;
}

// Grid-stride over the split of [0, n).
static __global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, AdamWScalars s) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // (Update never writes grad: the cast only fits the shared signature.)
  adamw_range<RangeMode::Update>(param, const_cast<float*>(grad), m, v, nullptr, false, 0, n, t, nt, s, s.decay);
}

// Chunk c of a segment table (see adamw_segments_kernel): its first element, length and decay flag.
struct ChunkOf {
  int64_t base, len;
  bool decayed;
};
static __device__ __forceinline__ ChunkOf chunk_of(const int64_t* __restrict__ table, int64_t n_entries, int64_t c) {
  int64_t lo = 0, hi = n_entries - 1;  // the whole block searches the same entries: broadcast loads
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (table[4 * mid] <= c) lo = mid;
    else hi = mid - 1;
  }
  const int64_t* e = table + 4 * lo;
  const int64_t first = (c - e[0]) * kAdamWChunk;  // within the segment
  const int64_t left = e[2] - first;
  return {e[1] + first, left < kAdamWChunk ? left : kAdamWChunk, e[3] != 0};
}

// What a launch of adamw_segments_kernel does with each element.
enum class SegmentsPass { Update, DryRun };

// table: [n_entries][4] = {first chunk, offset, numel, decay flag}, first chunks strictly increasing from 0 (every
// entry has at least one chunk). Chunk c belongs to the last entry whose first chunk is <= c. decay_off is the
// decay factor of weight_decay = 0 as adamw_update computes it (1.0f), so undecayed segments match it bitwise.
// Update: writes param, m, v (flag unused). DryRun: writes nothing but *flag, which the caller zeroed: each thread
// ORs whether any of its elements' new values is non-finite; a block-level OR (__syncthreads_or, reached by every
// thread of the block: the loops are block-uniform in c and only j varies) leaves one atomicOr per offending block.
template <SegmentsPass kPass>
static __global__ void adamw_segments_kernel(float* param, const float* grad, float* m, float* v,
                                             const int64_t* __restrict__ table, int64_t n_entries, int64_t n_chunks,
                                             AdamWScalars s, float decay_off, int* flag) {
  int bad = 0;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const ChunkOf k = chunk_of(table, n_entries, c);
    const float decay = k.decayed ? s.decay : decay_off;
    // The chunk's own split: a segment may start at any offset of the flat arrays. (The grad is never written here.)
    bad |= adamw_range<kPass == SegmentsPass::Update ? RangeMode::Update : RangeMode::DryRun>(
        param, const_cast<float*>(grad), m, v, nullptr, false, k.base, k.len, threadIdx.x, blockDim.x, s, decay);
  }
  if constexpr (kPass == SegmentsPass::DryRun) {
    if (__syncthreads_or(bad) != 0 && threadIdx.x == 0) atomicOr(flag, 1);
  }
}

void adamw_update(CudaContext& ctx, float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& p) {
  DPO_NVTX_RANGE("adamw_update");
  if (n <= 0) return;
  const AdamWScalars s = make_scalars(p);
  // One thread per 4-element group, capped (grid-stride); each element's result does not depend on the grid.
  const int64_t blocks = std::min<int64_t>(((n + kG - 1) / kG + kThreads - 1) / kThreads, int64_t{1} << 16);
  adamw_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream()>>>(param, grad, m, v, n, s);
  DPO_CUDA_CHECK(cudaGetLastError());
}

// --- the segment table --------------------------------------------------------------------------------------------

static bool same_segments(const std::vector<AdamWSegment>& a, const AdamWSegment* b, int64_t n_b) {
  if (static_cast<int64_t>(a.size()) != n_b) return false;
  for (int64_t k = 0; k < n_b; ++k)
    if (a[k].offset != b[k].offset || a[k].numel != b[k].numel || a[k].weight_decay != b[k].weight_decay) return false;
  return true;
}

void AdamWSegmentTable::assign(CudaContext& ctx, const AdamWSegment* segs, int64_t n_segs, int64_t n) {
  if (ctx_ == &ctx && n_ == n && same_segments(segs_, segs, n_segs)) return;
  check_adamw_segments(segs, n_segs, n, "adamw_update_segments");
  std::vector<int64_t> host;
  int64_t chunks = 0;
  for (int64_t k = 0; k < n_segs; ++k) {
    const AdamWSegment& s = segs[k];
    if (s.numel == 0) continue;
    host.insert(host.end(), {chunks, s.offset, s.numel, s.weight_decay ? int64_t{1} : int64_t{0}});
    chunks += (s.numel + kAdamWChunk - 1) / kAdamWChunk;
  }
  std::shared_ptr<Buffer> dev;
  if (!host.empty()) {
    const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(int64_t));
    dev = ctx.alloc(bytes);
    // From pageable memory: the bytes are staged before cudaMemcpyAsync returns, and the copy is ordered before
    // any later launch on the stream; the old table is freed in stream order after the launches that read it.
    DPO_CUDA_CHECK(
        cudaMemcpyAsync(dev->data(), host.data(), static_cast<size_t>(bytes), cudaMemcpyHostToDevice, ctx.stream()));
  }
  ctx_ = &ctx;
  n_ = n;
  segs_.assign(segs, segs + n_segs);
  host_ = std::move(host);
  dev_ = std::move(dev);
  chunks_ = chunks;
  ++uploads_;
}

const int64_t* AdamWSegmentTable::device_entries() const {
  return dev_ ? static_cast<const int64_t*>(dev_->data()) : nullptr;
}

// The launch shared by the update and the dry run: same table, same scalars, same grid.
template <SegmentsPass kPass>
static void launch_segments(CudaContext& ctx, const AdamWSegmentTable& table, float* param, const float* grad,
                            float* m, float* v, const AdamWParams& p, int* flag) {
  float decay_off = 1.0f;
  const AdamWScalars s = make_scalars(p, &decay_off);
  const int64_t max_blocks = static_cast<int64_t>(std::max(1, ctx.props().multiProcessorCount)) * kAdamWBlocksPerSm;
  const int64_t blocks = std::min(table.chunks(), max_blocks);
  adamw_segments_kernel<kPass><<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream()>>>(
      param, grad, m, v, table.device_entries(), table.entries(), table.chunks(), s, decay_off, flag);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void adamw_update_segments(CudaContext& ctx, AdamWSegmentTable& table, float* param, const float* grad, float* m,
                           float* v, int64_t n, const AdamWSegment* segs, int64_t n_segs, const AdamWParams& p) {
  DPO_NVTX_RANGE("adamw_update_segments");
  table.assign(ctx, segs, n_segs, n);
  if (table.chunks() == 0) return;
  launch_segments<SegmentsPass::Update>(ctx, table, param, grad, m, v, p, nullptr);
}

void adamw_dry_run_segments(CudaContext& ctx, AdamWSegmentTable& table, int* flag, const float* param,
                            const float* grad, const float* m, const float* v, int64_t n, const AdamWSegment* segs,
                            int64_t n_segs, const AdamWParams& p) {
  DPO_NVTX_RANGE("adamw_dry_run_segments");
  table.assign(ctx, segs, n_segs, n);
  DPO_CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(int), ctx.stream()));
  if (table.chunks() == 0) return;
  // The kernel is shared with the update and takes writable pointers; the DryRun pass never writes through them.
  launch_segments<SegmentsPass::DryRun>(ctx, table, const_cast<float*>(param), grad, const_cast<float*>(m),
                                        const_cast<float*>(v), p, flag);
}

// --- the device step ----------------------------------------------------------------------------------------------

// NaN or +-Inf in double: all exponent bits set (a bit test, as non_finite above).
static __device__ __forceinline__ bool non_finite_d(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// One thread: the record's norm fields from its sum of squares (or its given norm) and the state's threshold, the
// arithmetic of cpu::adamw_prepare: each operation one IEEE double rounding (the intrinsics keep nvcc from fusing
// norm + 1e-6 into anything), so the same norm gives the same scale on both backends.
static __global__ void adamw_prepare_kernel(double* record, const double* state, int norm_given) {
  namespace R = adamw_record;
  const double norm = norm_given != 0 ? record[R::kNorm] : __dsqrt_rn(record[R::kSumSquares]);
  record[R::kGradScale] = 1.0;
  record[R::kClipped] = 0.0;
  record[R::kNonFiniteRanks] = 0.0;
  if (non_finite_d(norm)) {
    record[R::kNorm] = __longlong_as_double(0x7ff8000000000000ll);  // quiet NaN
    record[R::kNormNonFinite] = 1.0;
    return;
  }
  record[R::kNorm] = norm;
  record[R::kNormNonFinite] = 0.0;
  const double max_norm = state[adamw_state::kMaxGradNorm];
  if (max_norm > 0.0) {
    const double coef = __ddiv_rn(max_norm, __dadd_rn(norm, 1e-6));  // clip_grad_norm_'s clip_coef
    if (coef < 1.0) {
      record[R::kGradScale] = coef;
      record[R::kClipped] = 1.0;
    }
  }
}

enum class StepPass { Check, Apply };

// The device step's two passes over the segment table (layout as adamw_segments_kernel), every block reading the
// step's scalars from device memory: state (the host's upload) and record (adamw_prepare_kernel's output, and the
// ranks' agreement). Nothing in the record changes while either kernel runs except, in Check, the
// kNonFiniteRanks word, which no Check block reads.
//   Check: nothing read when the norm is not finite; otherwise the dry run, and a block that found a non-finite new
//     value ORs the bits of 1.0 into record[kNonFiniteRanks] (zeroed by the prepare kernel; 0.0 | bits(1.0) is 1.0),
//     one 64-bit atomicOr per offending block after a block-level OR (__syncthreads_or, reached by every thread:
//     the early return and the chunk loop are block-uniform).
//   Apply: skip = norm not finite or kNonFiniteRanks != 0 (uniform over the grid). Not skipped: update, copy, zero
//     (adamw_range's Apply). Skipped: only the gradient is zeroed, when asked.
template <StepPass kPass>
static __global__ void adamw_step_kernel(float* param, float* grad, float* m, float* v, bf16* copy, int zero_grad,
                                         const int64_t* __restrict__ table, int64_t n_entries, int64_t n_chunks,
                                         const double* __restrict__ state, double* record) {
  namespace R = adamw_record;
  const bool norm_bad = record[R::kNormNonFinite] != 0.0;
  bool skip = false;
  if constexpr (kPass == StepPass::Check) {
    if (norm_bad) return;
  } else {
    skip = norm_bad || record[R::kNonFiniteRanks] != 0.0;
    if (skip && zero_grad == 0) return;
  }
  const AdamWScalars s = scalars_from_state(state, record[R::kGradScale]);
  const float decay_off = static_cast<float>(state[adamw_state::kDecayOff]);
  int bad = 0;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const ChunkOf k = chunk_of(table, n_entries, c);
    const float decay = k.decayed ? s.decay : decay_off;
    if constexpr (kPass == StepPass::Check) {
      bad |= adamw_range<RangeMode::DryRun>(param, grad, m, v, nullptr, false, k.base, k.len, threadIdx.x, blockDim.x,
                                            s, decay);
    } else if (skip) {
      for (int64_t i = threadIdx.x; i < k.len; i += blockDim.x) grad[k.base + i] = 0.0f;
    } else {
      adamw_range<RangeMode::Apply>(param, grad, m, v, copy, zero_grad != 0, k.base, k.len, threadIdx.x, blockDim.x, s,
                                    decay);
    }
  }
  if constexpr (kPass == StepPass::Check) {
    if (__syncthreads_or(bad) != 0 && threadIdx.x == 0)
      atomicOr(reinterpret_cast<unsigned long long*>(record + R::kNonFiniteRanks),
               static_cast<unsigned long long>(__double_as_longlong(1.0)));
  }
}

void adamw_prepare(CudaContext& ctx, double* record, const double* state, AdamWNormFrom from) {
  DPO_NVTX_RANGE("adamw_prepare");
  adamw_prepare_kernel<<<1, 1, 0, ctx.stream()>>>(record, state, from == AdamWNormFrom::Norm ? 1 : 0);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <StepPass kPass>
static void launch_step(CudaContext& ctx, const AdamWSegmentTable& table, float* param, float* grad, float* m,
                        float* v, bf16* copy, bool zero_grad, const double* state, double* record) {
  if (table.chunks() == 0) return;
  const int64_t max_blocks = static_cast<int64_t>(std::max(1, ctx.props().multiProcessorCount)) * kAdamWBlocksPerSm;
  const int64_t blocks = std::min(table.chunks(), max_blocks);
  adamw_step_kernel<kPass><<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream()>>>(
      param, grad, m, v, copy, zero_grad ? 1 : 0, table.device_entries(), table.entries(), table.chunks(), state,
      record);
  DPO_CUDA_CHECK(cudaGetLastError());
}

void adamw_check_segments(CudaContext& ctx, AdamWSegmentTable& table, double* record, const double* state,
                          const float* param, const float* grad, const float* m, const float* v, int64_t n,
                          const AdamWSegment* segs, int64_t n_segs) {
  DPO_NVTX_RANGE("adamw_check_segments");
  table.assign(ctx, segs, n_segs, n);
  // The Check pass writes nothing but the record word; the kernel is shared with Apply and takes writable pointers.
  launch_step<StepPass::Check>(ctx, table, const_cast<float*>(param), const_cast<float*>(grad), const_cast<float*>(m),
                               const_cast<float*>(v), nullptr, false, state, record);
}

void adamw_apply_segments(CudaContext& ctx, AdamWSegmentTable& table, const double* record, const double* state,
                          float* param, float* grad, float* m, float* v, __nv_bfloat16* copy, int64_t n,
                          const AdamWSegment* segs, int64_t n_segs, GradAfterStep after) {
  DPO_NVTX_RANGE("adamw_apply_segments");
  table.assign(ctx, segs, n_segs, n);
  // The Apply pass reads the record only.
  launch_step<StepPass::Apply>(ctx, table, param, grad, m, v, copy, after == GradAfterStep::Zero, state,
                               const_cast<double*>(record));
}

}  // namespace dpo::cuda
