// Elementwise helpers on device arrays: fill, dtype conversion, scale, and the sum of squares behind the global
// gradient norm. CPU twins: cpu::scale and cpu::sum_squares (kernels/adamw.h); fill has no twin (it is std::fill),
// convert's is convert_host (runtime/safetensors.h).
//
//   fill       : x[i] = value (float or bf16 x; for bf16, value rounded to nearest even once)  (=)
//   convert    : dst[i] = src[i] between float, double and bf16 (=; all six directions; dst and src must not
//                overlap). A narrowing conversion rounds once to nearest even: double -> bf16 goes directly, not
//                through float (two roundings can differ from one when the double lies just off a bf16 tie and the
//                float rounding lands on it; convert_host, runtime/safetensors.h, goes through float). Widening is
//                exact. NaN stays NaN (the payload is not kept); +-Inf and +-0 keep their sign.
//                Moved in 128-bit vectors on the body where dst and src can be aligned together (kernels/bf16.cuh;
//                scalar head and tail, all scalar when they cannot); the same conversion per element either way.
//   scale      : x[i] = float(double(x[i]) * s), float x only (in place; the same rounding as cpu::scale<float>, so
//                the two are bitwise equal)
//   sum_squares: *out = sum_i double(x[i])^2, written to ONE double in device memory (no host sync here; the
//                backend reads it back). Deterministic: a fixed grid of kSumSquaresBlocks blocks (independent of the
//                device), each thread a fixed grid-stride set of elements, per-block tree reduction in double, then
//                one block sums the per-block partials in a fixed tree. The same x gives bitwise the same sum on every
//                run and every GPU; it is NOT bitwise equal to cpu::sum_squares (different order), only to round-off.
//                NaN/Inf propagate.
// All sizes are int64_t; every index is 64-bit (n may exceed 2^31). All launches are asynchronous on ctx.stream().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

constexpr int kSumSquaresBlocks = 1024;  // fixed: the reduction order must not depend on the device

void fill(CudaContext& ctx, float* x, int64_t n, float value);
void fill(CudaContext& ctx, __nv_bfloat16* x, int64_t n, float value);
void convert(CudaContext& ctx, __nv_bfloat16* dst, const float* src, int64_t n);
void convert(CudaContext& ctx, __nv_bfloat16* dst, const double* src, int64_t n);
void convert(CudaContext& ctx, float* dst, const __nv_bfloat16* src, int64_t n);
void convert(CudaContext& ctx, float* dst, const double* src, int64_t n);
void convert(CudaContext& ctx, double* dst, const __nv_bfloat16* src, int64_t n);
void convert(CudaContext& ctx, double* dst, const float* src, int64_t n);
void scale(CudaContext& ctx, float* x, int64_t n, double s);
// partial: kSumSquaresBlocks doubles of device scratch the caller keeps (overwritten), or nullptr: then a scratch is
// taken from the context's stream-ordered pool for this call.
void sum_squares(CudaContext& ctx, double* out, const float* x, int64_t n, double* partial = nullptr);

}  // namespace dpo::cuda
