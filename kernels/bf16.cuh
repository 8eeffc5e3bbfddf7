// Storage types of the CUDA kernels and their conversion to the fp32 compute type (runtime/backend.h, "Mixed
// precision"). Device code: include from kernels/*.cu only (the launcher headers need just <cuda_bf16.h>).
//
// Every kernel templated on a storage type T (float or __nv_bfloat16) reads with to_float and writes with
// from_float<T>, and does all its arithmetic in float in between. With T = float both are the identity, so the fp32
// kernels compile to the same operations as before the templating (the fp32 tests keep their bitwise checks).
// With T = bf16 a read is exact and a write rounds once, to nearest even (__float2bfloat16_rn; NaN stays NaN).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

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

// --- 128-bit access to views at any element offset ------------------------------------------------------------------
// A tensor view may start at any element offset inside its buffer, so its pointer is aligned to its element size but
// not necessarily to 16 bytes. A memory-bound kernel over n elements of one or more such arrays splits [0, n) into
//   head [0, h)              scalar: up to the first index at which EVERY array of the call is 16-byte aligned,
//   body [h, h + G*groups)   groups of G consecutive elements, each array moved with 128-bit loads/stores,
//   tail [h + G*groups, n)   scalar, fewer than G elements.
// G = 16 / (smallest element size of the call): 4 for float, 8 for bf16, 8 for a float<->bf16 pair (one 16-byte
// bf16 vector, two 16-byte float vectors). When no h < G aligns all arrays at once (e.g. out at offset 0 and a at
// offset 1), h = n: everything is scalar, still correct. Per element the arithmetic is the scalar path's, so the
// vector path changes how elements are moved, never their values.

// G consecutive elements of T; alignas(16) and a size that is a multiple of 16 bytes, so that a copy from or to an
// address that is a multiple of 16 compiles to 128-bit memory instructions (LDG.E.128 / STG.E.128).
template <class T, int G>
struct alignas(16) Pack {
  static_assert((G * sizeof(T)) % 16 == 0, "a pack is a whole number of 16-byte vectors");
  T e[G];
};

// Call only with p + i a multiple of 16 bytes (an index of the body).
template <int G, class T>
__device__ __forceinline__ Pack<T, G> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, G>*>(p + i);
}
template <int G, class T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, G>& v) {
  *reinterpret_cast<Pack<T, G>*>(p + i) = v;
}

// One array of a call: its address and element size.
struct VecView {
  const void* p;
  int elem;
};

// The head length h: the smallest h in [0, G) at which every view is 16-byte aligned, clamped to n; n when there is
// none (then the body is empty). Host and device (a per-row split computes it in the kernel).
__host__ __device__ __forceinline__ int64_t vec_head(int64_t n, int G, const VecView* v, int nv) {
  for (int h = 0; h < G; ++h) {
    bool aligned = true;
    for (int k = 0; k < nv; ++k) {
      const unsigned long long addr = reinterpret_cast<unsigned long long>(v[k].p);
      aligned = aligned && (addr + static_cast<unsigned long long>(h) * v[k].elem) % 16u == 0u;
    }
    if (aligned) return h < n ? h : n;
  }
  return n;
}

// Runs fg(i) for every body group (first index i, G elements) and f1(i) for every head and tail element, spread
// over `nt` workers of which this is worker `t` (t < nt; a grid, a block or a warp). Each index is visited exactly
// once, by exactly one worker; nothing outside [0, n) is touched.
template <int G, class Scalar, class Group>
__device__ __forceinline__ void split_loop(int64_t t, int64_t nt, int64_t n, int64_t head, Scalar f1, Group fg) {
  const int64_t groups = (n - head) / G;
  for (int64_t k = t; k < groups; k += nt) fg(head + k * G);
  const int64_t body = groups * G, rest = n - body;  // head + tail elements
  for (int64_t k = t; k < rest; k += nt) f1(k < head ? k : k + body);
}

}  // namespace dpo::cuda
