#include "kernels/encoder.h"

#include <algorithm>
#include <string>

#include "runtime/error.h"

namespace dpo::cpu {

template <class T>
void encoder_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_, int64_t C) {
  const int64_t BT = B * T_;
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < BT; ++bt) {
    const T* e = wte + static_cast<int64_t>(tokens[bt]) * C;
    T* o = out + bt * C;
    if (wpe == nullptr) {
      for (int64_t c = 0; c < C; ++c) o[c] = e[c];
      continue;
    }
    const T* p = wpe + (bt % T_) * C;
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
  if (dwpe == nullptr) return;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    T* dp = dwpe + t * C;
    for (int64_t b = 0; b < B; ++b) {
      const T* d = dout + (b * T_ + t) * C;
      for (int64_t c = 0; c < C; ++c) dp[c] += d[c];
    }
  }
}

namespace {

// Runs serially before any output is written (dpo::Error directly: dpo_kernels_cpu does not link dpo_runtime).
void check_positions(const char* fn, const int32_t* pos, int64_t B, int64_t T_, int64_t n_positions) {
  for (int64_t i = 0; i < B * T_; ++i) {
    if (pos[i] < 0 || pos[i] >= n_positions) {
      throw Error(std::string(fn) + ": position " + std::to_string(pos[i]) + " at (b=" + std::to_string(i / T_) +
                  ", t=" + std::to_string(i % T_) + ") is outside [0, n_positions=" + std::to_string(n_positions) +
                  ")");
    }
  }
}

// dst[idx[i], :] += src[i, :] for i = 0..n-1 in order, for every element. Threads split the channels (rows of dst
// repeat), so each element's order is the slot order whatever the thread count.
template <class T>
void scatter_add_rows(T* dst, const T* src, const int32_t* idx, int64_t n, int64_t C) {
  constexpr int64_t kBlock = 32;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    for (int64_t i = 0; i < n; ++i) {
      T* d = dst + static_cast<int64_t>(idx[i]) * C;
      const T* s = src + i * C;
      for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
    }
  }
}

}  // namespace

template <class T>
void encoder_forward_pos(T* out, const int32_t* tokens, const int32_t* pos, const T* wte, const T* wpe, int64_t B,
                         int64_t T_, int64_t C, int64_t n_positions) {
  if (wpe == nullptr) return encoder_forward(out, tokens, wte, wpe, B, T_, C);  // no position embedding
  check_positions("encoder_forward_pos", pos, B, T_, n_positions);
  const int64_t BT = B * T_;
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < BT; ++bt) {
    const T* e = wte + static_cast<int64_t>(tokens[bt]) * C;
    const T* p = wpe + static_cast<int64_t>(pos[bt]) * C;
    T* o = out + bt * C;
    for (int64_t c = 0; c < C; ++c) o[c] = e[c] + p[c];
  }
}

template <class T>
void encoder_backward_pos(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, const int32_t* pos, int64_t B,
                          int64_t T_, int64_t C, int64_t n_positions) {
  if (dwpe == nullptr) return scatter_add_rows(dwte, dout, tokens, B * T_, C);  // no position embedding
  check_positions("encoder_backward_pos", pos, B, T_, n_positions);
  // dwte: the order of encoder_backward's token loop. dwpe: with pos[b,t] = t, the slots of position t in slot
  // order are b = 0..B-1, encoder_backward's order for dwpe[t].
  scatter_add_rows(dwte, dout, tokens, B * T_, C);
  scatter_add_rows(dwpe, dout, pos, B * T_, C);
}

template void encoder_forward<float>(float*, const int32_t*, const float*, const float*, int64_t, int64_t, int64_t);
template void encoder_forward<double>(double*, const int32_t*, const double*, const double*, int64_t, int64_t,
                                      int64_t);
template void encoder_backward<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, int64_t);
template void encoder_backward<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t, int64_t);
template void encoder_forward_pos<float>(float*, const int32_t*, const int32_t*, const float*, const float*, int64_t,
                                         int64_t, int64_t, int64_t);
template void encoder_forward_pos<double>(double*, const int32_t*, const int32_t*, const double*, const double*,
                                          int64_t, int64_t, int64_t, int64_t);
template void encoder_backward_pos<float>(float*, float*, const float*, const int32_t*, const int32_t*, int64_t,
                                          int64_t, int64_t, int64_t);
template void encoder_backward_pos<double>(double*, double*, const double*, const int32_t*, const int32_t*, int64_t,
                                           int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
