// G consecutive elements moved as one unit by the Llama-family elementwise kernels (kernels/rope.cu, swiglu.cu,
// repeat_kv.cu): 128-bit loads/stores when G * sizeof(T) is a multiple of 16 (the caller guarantees p + i is then
// 16-byte aligned), element by element otherwise (G = 1, the scalar path). Device code: include from kernels/*.cu.
#pragma once

#include <cstdint>

#include "kernels/bf16.cuh"

namespace dpo::cuda {

template <class T, int G>
struct Group {
  T e[G];
};

template <int G, class T>
__device__ __forceinline__ Group<T, G> load_group(const T* p, int64_t i) {
  Group<T, G> g;
  if constexpr (G * sizeof(T) % 16 == 0) {
    const Pack<T, G> v = load_pack<G>(p, i);
#pragma unroll
    for (int j = 0; j < G; ++j) g.e[j] = v.e[j];
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j) g.e[j] = p[i + j];
  }
  return g;
}

template <int G, class T>
__device__ __forceinline__ void store_group(T* p, int64_t i, const Group<T, G>& g) {
  if constexpr (G * sizeof(T) % 16 == 0) {
    Pack<T, G> v;
#pragma unroll
    for (int j = 0; j < G; ++j) v.e[j] = g.e[j];
    store_pack<G>(p, i, v);
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j) p[i + j] = g.e[j];
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace dpo::cuda
