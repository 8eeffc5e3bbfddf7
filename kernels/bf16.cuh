// Storage types of the CUDA kernels and their conversion to the fp32 compute type (runtime/backend.h, "Mixed
// precision"). Device code: include from kernels/*.cu only (the launcher headers need just <cuda_bf16.h>).
//
// Every kernel templated on a storage type T (float or __nv_bfloat16) reads with to_float and writes with
// from_float<T>, and does all its arithmetic in float in between. With T = float both are the identity, so the fp32
// kernels compile to the same operations as before the templating (the fp32 tests keep their bitwise checks).
// With T = bf16 a read is exact and a write rounds once, to nearest even (__float2bfloat16_rn; NaN stays NaN).
#pragma once

#include <cuda_bf16.h>

namespace dpo::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  return __float2bfloat16_rn(x);
}

// `dst += v` for a "+=" output: read, add in fp32, round once.
template <class T>
__device__ __forceinline__ void add_to(T* dst, float v) {
  *dst = from_float<T>(to_float(*dst) + v);
}

}  // namespace dpo::cuda
