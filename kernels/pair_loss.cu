// The preference loss of a batch of pairs; contract in kernels/pair_loss.cuh, the per-pair formulas in
// kernels/pair_loss.h (shared with the CPU).
//
// One block of kThreads threads: thread i evaluates pairs q0 + i, q0 + i + kThreads, ... (in that order), writes their
// gradients and losses, and accumulates its pairs' sums in double; the kThreads partial rows are then reduced by a
// fixed tree in shared memory. The summation order depends on P only, so results are bitwise reproducible, with no
// atomics and no second launch.
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "kernels/pair_loss.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

namespace {

// A power of two (the tree below halves it). 128, not 256: the row has one column per loss type, and
// kPairSumsWidth * kThreads doubles = 28 * 128 * 8 = 28,672 bytes must stay under the 48 KiB static limit.
constexpr int kThreads = 128;
static_assert(kPairSumsWidth * kThreads * sizeof(double) <= 48 * 1024, "pair_loss: shared partial sums too large");

__global__ void __launch_bounds__(kThreads)
    pair_loss_kernel(float* __restrict__ dseq, float* __restrict__ loss_out, double* __restrict__ sums,
                     const float* __restrict__ stats, const float* __restrict__ ref_logp,
                     const float* __restrict__ offset, const PairLossParams p, int64_t P, int64_t q0,
                     int64_t q1, bool accumulate, double normalizer) {
  __shared__ double part[kPairSumsWidth][kThreads];
  double acc[kPairSumsWidth];
#pragma unroll
  for (int k = 0; k < kPairSumsWidth; ++k) acc[k] = 0.0;
  for (int64_t q = q0 + threadIdx.x; q < q1; q += kThreads) {
    const PairLossInput in = pair_input_at(stats, ref_logp, offset, P, q, p.rows);
    const PairLossOutput o = pair_loss_eval(p, in);
    dseq[pair_row(p.rows, P, q, 0)] = static_cast<float>(o.d_chosen / normalizer);
    dseq[pair_row(p.rows, P, q, 1)] = static_cast<float>(o.d_rejected / normalizer);
    if (loss_out) loss_out[q] = static_cast<float>(o.loss);
    pair_sums_add(acc, in, o);
  }
#pragma unroll
  for (int k = 0; k < kPairSumsWidth; ++k) part[k][threadIdx.x] = acc[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
#pragma unroll
      for (int k = 0; k < kPairSumsWidth; ++k) part[k][threadIdx.x] += part[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x < kPairSumsWidth)
    sums[threadIdx.x] = accumulate ? sums[threadIdx.x] + part[threadIdx.x][0] : part[threadIdx.x][0];
}

}  // namespace

void pair_loss(CudaContext& ctx, float* dseq, float* pair_loss, double* sums, const float* stats,
               const float* ref_logp, const float* offset, const PairLossParams& p, int64_t P, int64_t q0, int64_t q1,
               bool accumulate, double normalizer) {
  DPO_NVTX_RANGE("pair_loss");
  DPO_ASSERT(P >= 0, "pair_loss: negative pair count " + std::to_string(P));
  DPO_ASSERT(0 <= q0 && q0 <= q1 && q1 <= P, "pair_loss: pairs [" + std::to_string(q0) + ", " + std::to_string(q1) +
                                                 ") out of range for " + std::to_string(P) + " pairs");
  DPO_ASSERT(p.n_terms >= 1 && p.n_terms <= kMaxLossTerms,
             "pair_loss: n_terms must be in [1, " + std::to_string(kMaxLossTerms) + "], got " +
                 std::to_string(p.n_terms));
  DPO_ASSERT(std::isfinite(normalizer) && normalizer > 0, "pair_loss: normalizer must be finite and > 0");
  pair_loss_kernel<<<1, kThreads, 0, ctx.stream()>>>(dseq, pair_loss, sums, stats, ref_logp, offset, p, P, q0,
                                                     q1, accumulate, normalizer);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dpo::cuda
