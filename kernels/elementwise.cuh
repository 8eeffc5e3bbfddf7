// Elementwise helpers on float device arrays: fill, scale, and the sum of squares behind the global gradient norm.
// CPU twins: cpu::scale and cpu::sum_squares (kernels/adamw.h); fill has no twin (it is std::fill).
//
//   fill       : x[i] = value                                          (=)
//   scale      : x[i] = float(double(x[i]) * s)   (in place; the same rounding as cpu::scale<float>, so the two are
//                bitwise equal)
//   sum_squares: *out = sum_i double(x[i])^2, written to ONE double in device memory (no host sync here; the
//                backend reads it back). Deterministic: a fixed grid of kSumSquaresBlocks blocks (independent of the
//                device), each thread a fixed grid-stride set of elements, per-block tree reduction in double, then
//                one block sums the per-block partials in a fixed tree. The same x gives bitwise the same sum on every
//                run and every GPU; it is NOT bitwise equal to cpu::sum_squares (different order), only to round-off.
//                NaN/Inf propagate.
// All sizes are int64_t; every index is 64-bit (n may exceed 2^31). All launches are asynchronous on ctx.stream().
#pragma once
#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

constexpr int kSumSquaresBlocks = 1024;  // fixed: the reduction order must not depend on the device

void fill(CudaContext& ctx, float* x, int64_t n, float value);
void scale(CudaContext& ctx, float* x, int64_t n, double s);
void sum_squares(CudaContext& ctx, double* out, const float* x, int64_t n);

}  // namespace dpo::cuda
