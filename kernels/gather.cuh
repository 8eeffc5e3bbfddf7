// Row gather and scatter-add through an index list on the GPU. Contract: kernels/gather.h (CPU twins
// cpu::gather_rows / cpu::scatter_add_rows).
//   gather_rows      : out[i, :] = inp[idx[i], :]        (=)   out [n, C], inp [N, C], idx int32 [n]
//   scatter_add_rows : dinp[idx[i], :] += dout[i, :]     (+=)  dinp [N, C], dout [n, C]
// gather_rows copies elements of elem_bytes = 2 (bf16) or 4 (float, int32) bytes as bit patterns (NaN payloads
// included): bitwise the twin. scatter_add_rows (float or bf16 storage): per element the twin's one addition in
// fp32, rounded once for bf16 (bitwise the twin in float; in bf16 bitwise the twin's F32 result rounded).
// No check of idx here (a sync): an entry outside [0, N) sets its out row to all-one bits (NaN / -1) in gather_rows
// and adds nothing in scatter_add_rows; no access is ever out of bounds. Entries must be distinct for
// scatter_add_rows (a repeated row would be a data race, not an atomic sum).
// Launch: a 256-thread block holds 256 / tpr rows, tpr = the power of two >= the row's 16-byte groups (at most 256),
// so short rows (C = 1 for the targets and weights) do not leave most threads idle; 64-bit indices; 128-bit loads
// and stores on each row's aligned body (kernels/bf16.cuh split, per row: rows of a C that is not a multiple of
// the group start at any phase), scalar head and tail; asynchronous on ctx.stream(). Deterministic.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

// elem_bytes 2 or 4 (dpo::Error otherwise).
void gather_rows(CudaContext& ctx, void* out, const void* inp, const int32_t* idx, int64_t n, int64_t N, int64_t C,
                 int elem_bytes);
void scatter_add_rows(CudaContext& ctx, float* dinp, const float* dout, const int32_t* idx, int64_t n, int64_t N,
                      int64_t C);
void scatter_add_rows(CudaContext& ctx, __nv_bfloat16* dinp, const __nv_bfloat16* dout, const int32_t* idx,
                      int64_t n, int64_t N, int64_t C);

}  // namespace dpo::cuda
