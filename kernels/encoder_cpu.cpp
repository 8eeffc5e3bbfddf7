#include "kernels/encoder.h"

#include <algorithm>

namespace dpo::cpu {

template <class T>
void encoder_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_, int64_t C) {
  const int64_t BT = B * T_;
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < BT; ++bt) {
    const T* e = wte + static_cast<int64_t>(tokens[bt]) * C;
    const T* p = wpe + (bt % T_) * C;
    T* o = out + bt * C;
    for (int64_t c = 0; c < C; ++c) o[c] = e[c] + p[c];
  }
}

template <class T>
void encoder_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_, int64_t C) {
  // Tokens repeat, so several (b,t) hit the same row of dwte. Threads split the channels instead of the rows and
  // each walks (b,t) in order: every element is summed in the same order whatever the thread count.
  constexpr int64_t kBlock = 32;
  const int64_t BT = B * T_;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    for (int64_t bt = 0; bt < BT; ++bt) {
      T* dw = dwte + static_cast<int64_t>(tokens[bt]) * C;
      const T* d = dout + bt * C;
      for (int64_t c = c0; c < c1; ++c) dw[c] += d[c];
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    T* dp = dwpe + t * C;
    for (int64_t b = 0; b < B; ++b) {
      const T* d = dout + (b * T_ + t) * C;
      for (int64_t c = 0; c < C; ++c) dp[c] += d[c];
    }
  }
}

template void encoder_forward<float>(float*, const int32_t*, const float*, const float*, int64_t, int64_t, int64_t);
template void encoder_forward<double>(double*, const int32_t*, const double*, const double*, int64_t, int64_t,
                                      int64_t);
template void encoder_backward<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, int64_t);
template void encoder_backward<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
