#include "kernels/repeat_kv.h"

#include <algorithm>

namespace dpo::cpu {

template <class T>
void repeat_kv_forward(T* out, const T* inp, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D) {
  const int64_t g = n_head / n_kv_head;
  const int64_t Wi = (n_head + 2 * n_kv_head) * D, Wo = 3 * n_head * D;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * Wi;
    T* y = out + n * Wo;
    std::copy(x, x + n_head * D, y);
    for (int part = 1; part <= 2; ++part) {  // k, then v
      const T* src = x + (n_head + (part - 1) * n_kv_head) * D;
      T* dst = y + part * n_head * D;
      for (int64_t h = 0; h < n_head; ++h) std::copy(src + (h / g) * D, src + (h / g + 1) * D, dst + h * D);
    }
  }
}

template <class T>
void repeat_kv_backward(T* dinp, const T* dout, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D) {
  const int64_t g = n_head / n_kv_head;
  const int64_t Wi = (n_head + 2 * n_kv_head) * D, Wo = 3 * n_head * D;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* dy = dout + n * Wo;
    T* dx = dinp + n * Wi;
    std::copy(dy, dy + n_head * D, dx);
    for (int part = 1; part <= 2; ++part) {
      const T* src = dy + part * n_head * D;
      T* dst = dx + (n_head + (part - 1) * n_kv_head) * D;
      for (int64_t j = 0; j < n_kv_head; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          T acc = src[(j * g) * D + d];
          for (int64_t r = 1; r < g; ++r) acc += src[(j * g + r) * D + d];
          dst[j * D + d] = acc;
        }
      }
    }
  }
}

template void repeat_kv_forward<float>(float*, const float*, int64_t, int64_t, int64_t, int64_t);
template void repeat_kv_forward<double>(double*, const double*, int64_t, int64_t, int64_t, int64_t);
template void repeat_kv_backward<float>(float*, const float*, int64_t, int64_t, int64_t, int64_t);
template void repeat_kv_backward<double>(double*, const double*, int64_t, int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
