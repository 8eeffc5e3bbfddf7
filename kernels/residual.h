// Residual add.
//   forward : out[N] = a[N] + b[N]                (=; out may alias a or b)
//   backward: da[N] += dout; db[N] += dout        (+=)
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void residual_forward(T* out, const T* a, const T* b, int64_t N);

template <class T>
void residual_backward(T* da, T* db, const T* dout, int64_t N);

}  // namespace dpo::cpu
