#include "kernels/rope.h"

#include <string>

#include "runtime/error.h"

namespace dpo::cpu {

namespace {

// Serially, before any output is written (dpo::Error directly: dpo_kernels_cpu does not link dpo_runtime).
void check_rope_positions(const char* fn, const int32_t* pos, int64_t N, int64_t P) {
  for (int64_t n = 0; n < N; ++n) {
    if (pos[n] < 0 || pos[n] >= P)
      throw Error(std::string(fn) + ": position " + std::to_string(pos[n]) + " of row " + std::to_string(n) +
                  " is outside [0, P=" + std::to_string(P) + ") (the rows of the cos / sin tables)");
  }
}

// sgn = +1: the forward rotation by theta; sgn = -1: its transpose (by -theta), the backward.
template <class T>
void rope_apply(const char* fn, T* out, const T* inp, const T* cos, const T* sin, const int32_t* pos, int64_t N,
                int64_t n_head, int64_t n_kv_head, int64_t D, int64_t P, double sgn) {
  check_rope_positions(fn, pos, N, P);
  const int64_t H = D / 2;
  const int64_t W = (n_head + 2 * n_kv_head) * D;
  const int64_t rotated = (n_head + n_kv_head) * D;  // q and k heads; the v heads follow
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * W;
    T* y = out + n * W;
    const T* cr = cos + static_cast<int64_t>(pos[n]) * H;
    const T* sr = sin + static_cast<int64_t>(pos[n]) * H;
    for (int64_t h0 = 0; h0 < rotated; h0 += D) {
      for (int64_t i = 0; i < H; ++i) {
        const double c = static_cast<double>(cr[i]), s = sgn * static_cast<double>(sr[i]);
        const double a = static_cast<double>(x[h0 + i]), b = static_cast<double>(x[h0 + H + i]);
        y[h0 + i] = static_cast<T>(a * c - b * s);
        y[h0 + H + i] = static_cast<T>(b * c + a * s);
      }
    }
    if (y != x)
      for (int64_t k = rotated; k < W; ++k) y[k] = x[k];
  }
}

}  // namespace

template <class T>
void rope_forward(T* out, const T* inp, const T* cos, const T* sin, const int32_t* pos, int64_t N, int64_t n_head,
                  int64_t n_kv_head, int64_t D, int64_t P) {
  rope_apply("rope_forward", out, inp, cos, sin, pos, N, n_head, n_kv_head, D, P, 1.0);
}

template <class T>
void rope_backward(T* dinp, const T* dout, const T* cos, const T* sin, const int32_t* pos, int64_t N, int64_t n_head,
                   int64_t n_kv_head, int64_t D, int64_t P) {
  rope_apply("rope_backward", dinp, dout, cos, sin, pos, N, n_head, n_kv_head, D, P, -1.0);
}

template void rope_forward<float>(float*, const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                  int64_t, int64_t, int64_t);
template void rope_forward<double>(double*, const double*, const double*, const double*, const int32_t*, int64_t,
                                   int64_t, int64_t, int64_t, int64_t);
template void rope_backward<float>(float*, const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                   int64_t, int64_t, int64_t);
template void rope_backward<double>(double*, const double*, const double*, const double*, const int32_t*, int64_t,
                                    int64_t, int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
