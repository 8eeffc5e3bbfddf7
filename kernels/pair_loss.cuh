// The preference loss of a batch of pairs on the GPU: pair_loss_eval (kernels/pair_loss.h, the function the CPU
// uses) per pair, from device arrays, and the batch sums. CPU twin: CpuBackend::preference_loss
// (runtime/cpu_backend.cpp), which calls the same header functions.
//   stats    [2P, kSeqStatsWidth] float  the log-prob forward's rows (kernels/seq_stats.h): chosen 0..P-1,
//                                         rejected P..2P-1; kSeqLogp is the policy log-prob, kSeqTokens the length
//   ref_logp [2P] float, or null          the reference's summed log-probs, same rows (null: 0; for ReferenceFree)
//   offset   [P] float, or null           ODPO offsets (odpo_offset; null: 0)
//   dseq     [2P] float  (=)              d loss / d logp of each row, divided by `normalizer` (the global pair count
//                                         of the optimizer step; train/loss.h): logprob_backward's dseq
//   pair_loss [P] float (=), or null      each pair's weighted loss, unnormalised
//   sums     [kPairSumsWidth] double      the sums over pairs [q0, q1) (kernels/pair_loss.h PairSum), unnormalised:
//                                         = (all 0 for an empty range), or += with `accumulate` (one addition per
//                                         column after the range's tree sum; stream order keeps chunks in order)
// With p.rows = PairRows::Interleaved every per-sequence array has pair q at rows 2q, 2q + 1 instead.
// Only pairs [q0, q1) (0 <= q0 <= q1 <= P) are evaluated: rows q and P + q of dseq and entry q of pair_loss for q
// in the range are written, nothing else.
// Arithmetic: double throughout (inputs widened exactly), each float output rounded once. The preconditions of
// pair_loss_eval are the caller's (the data pipeline's); p.n_terms and normalizer are checked here (dpo::Error).
// Deterministic: one block; thread i handles pairs q0 + i, q0 + i + 128, ... in order, accumulating in double,
// then a fixed shared-memory tree over the threads. No atomics: repeated calls give bitwise-equal results, and the
// result does not depend on the GPU. One block is enough: P is a micro-batch's pair count (up to a few thousand), a few dozen
// flops each; the launch latency dominates.
// No aliasing between outputs and inputs. No host synchronisation, no allocation.
#pragma once

#include <cstdint>

#include "kernels/pair_loss.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo::cuda {

void pair_loss(CudaContext& ctx, float* dseq, float* pair_loss, double* sums, const float* stats,
               const float* ref_logp, const float* offset, const PairLossParams& p, int64_t P, int64_t q0, int64_t q1,
               bool accumulate, double normalizer);

}  // namespace dpo::cuda
