// Grouped-query attention heads expanded for the attention ops (HF's repeat_kv). g = n_head / n_kv_head
// (n_head % n_kv_head == 0, checked by the backends), D the head size.
//   inp [N, (n_head + 2 n_kv_head) D], rows [q 0..n_head-1 | k 0..n_kv_head-1 | v 0..n_kv_head-1]
//   forward : out [N, 3 n_head D] = [q heads copied | k heads | v heads], expanded head h taking kv head h / g  (=)
//   backward: dinp [N, (n_head + 2 n_kv_head) D] (=): the q part copied; each kv head j of k and of v the sum of
//             the gradients of its expanded heads h = j g .. j g + g - 1, added in that order starting from the
//             first term (sum = d[jg]; sum += d[jg+1]; ...) in T, so with g = 1 the backward is a copy and the
//             result is bitwise reproducible.
// BF16 (the backends): the forward is an exact copy; the backward sums in fp32 in the same order and rounds once.
#pragma once
#include <cstdint>

namespace dpo::cpu {

template <class T>
void repeat_kv_forward(T* out, const T* inp, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D);

template <class T>
void repeat_kv_backward(T* dinp, const T* dout, int64_t N, int64_t n_head, int64_t n_kv_head, int64_t D);

}  // namespace dpo::cpu
