// Row gather and scatter-add through an index list (the compacted LM head of model/gpt2.h: the scored slots' rows
// of the ln_f output in, their d(ln_f output) rows back).
//   gather_rows      : out[i, :]       = inp[idx[i], :]     i in [0, n)     (=)   out [n, C], inp [N, C]
//   scatter_add_rows : dinp[idx[i], :] += dout[i, :]        i in [0, n)     (+=)  dinp [N, C], dout [n, C]
// idx: int32 [n], every entry in [0, N) and no two entries equal (the caller's guarantee). Distinct entries make
// each row of dinp the target of at most one addition, so no two workers touch one row: deterministic without
// atomics, and scatter_add_rows into a zeroed dinp stores dout's rows exactly. Rows of out (gather) and of dinp
// (scatter) that no entry names are untouched; out must not overlap inp, dinp not dout.
// gather_rows is a copy and works on any element type (the CPU twin takes the element size in bytes: 2, 4 or 8;
// the model gathers BF16/F32/F64 activations, I32 targets and F32/F64 weights with it). scatter_add_rows adds in
// the element type (float, double; a BF16 "+=" is read, added in fp32 and rounded once, runtime/backend.h).
// The CPU twin checks every entry (range and distinctness, check_row_index) before anything is written and throws
// dpo::Error naming the first bad entry. The CUDA kernels (kernels/gather.cuh) cannot check without a sync; they
// never access memory out of bounds: an out-of-range entry's out row is set to all-one bits (NaN in every floating
// type, -1 in I32) and its dout row adds nothing; equal entries in scatter_add_rows race (one row's additions in an
// unspecified order), which the caller's guarantee excludes.
#pragma once
#include <cstdint>

namespace dpo::cpu {

// Throws dpo::Error("<fn>: index entry i is ... ") for an entry outside [0, N) or equal to an earlier entry.
void check_row_index(const int32_t* idx, int64_t n, int64_t N, const char* fn);

// gather_rows on rows of C elements of elem_bytes bytes each (a byte copy per row). Checks idx first.
void gather_rows(void* out, const void* inp, const int32_t* idx, int64_t n, int64_t N, int64_t C,
                 int64_t elem_bytes);

// Checks idx first.
template <class T>
void scatter_add_rows(T* dinp, const T* dout, const int32_t* idx, int64_t n, int64_t N, int64_t C);

}  // namespace dpo::cpu
