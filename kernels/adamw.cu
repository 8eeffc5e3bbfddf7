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

// Per-step scalars, computed once on the host in double (as kernels/adamw_cpu.cpp does) and rounded to float.
struct AdamWScalars {
  float decay;         // 1 - lr * weight_decay
  float step_size;     // lr / (1 - beta1^step)
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float w1;            // 1 - beta1 (lerp weight)
  float one_minus_w1;  // 1 - w1, ATen's second lerp branch
  float beta2;
  float w2;  // 1 - beta2
  float eps;
  float grad_scale;
};

static AdamWScalars make_scalars(const AdamWParams& p) {
  const double bias_correction1 = 1.0 - std::pow(p.beta1, static_cast<double>(p.step));
  const double bias_correction2 = 1.0 - std::pow(p.beta2, static_cast<double>(p.step));
  const double w1 = 1.0 - p.beta1;
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  s.step_size = static_cast<float>(p.lr / bias_correction1);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  s.w1 = static_cast<float>(w1);
  s.one_minus_w1 = static_cast<float>(1.0 - w1);
  s.beta2 = static_cast<float>(p.beta2);
  s.w2 = static_cast<float>(1.0 - p.beta2);
  s.eps = static_cast<float>(p.eps);
  s.grad_scale = static_cast<float>(p.grad_scale);
  return s;
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
  x = x + (-s.step_size) * mi / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  return {x, mi, vi};
}

// Float vectors: the four arrays share one index, so a split (kernels/bf16.cuh) aligns them together when their
// addresses agree modulo 16 bytes.
constexpr int kG = 4;

// NaN or +-Inf: all exponent bits set. A bit test rather than isfinite(), so that no math-mode flag can fold it away.
static __device__ __forceinline__ bool non_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// Elements [0, len) of param + base etc. over `nt` workers, worker t: 128-bit loads and stores on the common aligned
// body, scalar edges; every element through adamw_values. Update writes param, m, v; DryRun returns whether any new
// value of this worker's elements is non-finite and writes nothing.
template <bool kWrite>
static __device__ __forceinline__ int adamw_range(float* param, const float* grad, float* m, float* v, int64_t base,
                                                  int64_t len, int64_t t, int64_t nt, const AdamWScalars& s,
                                                  float decay) {
  float* p = param + base;
  const float* g = grad + base;
  float* mm = m + base;
  float* vv = v + base;
  const VecView views[] = {{p, sizeof(float)}, {g, sizeof(float)}, {mm, sizeof(float)}, {vv, sizeof(float)}};
  const int64_t head = vec_head(len, kG, views, 4);
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
        }
      });
  return bad;
}

// Grid-stride over the split of [0, n).
static __global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, AdamWScalars s) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  adamw_range<true>(param, grad, m, v, 0, n, t, nt, s, s.decay);
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
    int64_t lo = 0, hi = n_entries - 1;  // the whole block searches the same entries: broadcast loads
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (table[4 * mid] <= c) lo = mid;
      else hi = mid - 1;
    }
    const int64_t* e = table + 4 * lo;
    const int64_t first = (c - e[0]) * kAdamWChunk;  // within the segment
    const int64_t left = e[2] - first;
    const int64_t len = left < kAdamWChunk ? left : kAdamWChunk;
    const int64_t base = e[1] + first;
    const float decay = e[3] != 0 ? s.decay : decay_off;
    // The chunk's own split: a segment may start at any offset of the flat arrays.
    bad |= adamw_range<kPass == SegmentsPass::Update>(param, grad, m, v, base, len, threadIdx.x, blockDim.x, s, decay);
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
  const AdamWScalars s = make_scalars(p);
  AdamWParams off = p;
  off.weight_decay = 0.0;
  const float decay_off = make_scalars(off).decay;
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

}  // namespace dpo::cuda
