#include <cstring>
#include <string>
#include <vector>

#include "kernels/gather.h"
#include "runtime/error.h"

namespace dpo::cpu {

// Serial, before any output is written (as kernels/logprob_cpu.cpp checks its targets): a bad entry never throws
// inside an OpenMP region and never leaves a half-written result.
void check_row_index(const int32_t* idx, int64_t n, int64_t N, const char* fn) {
  std::vector<int64_t> seen_at(static_cast<size_t>(N > 0 ? N : 0), -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = idx[i];
    if (r < 0 || r >= N)
      throw Error(std::string(fn) + ": index entry " + std::to_string(i) + " is " + std::to_string(r) +
                  ", outside the " + std::to_string(N) + " rows [0, " + std::to_string(N) + ")");
    int64_t& at = seen_at[static_cast<size_t>(r)];
    if (at >= 0)
      throw Error(std::string(fn) + ": index entry " + std::to_string(i) + " is " + std::to_string(r) +
                  ", equal to entry " + std::to_string(at) + " (the entries must be distinct)");
    at = i;
  }
}

void gather_rows(void* out, const void* inp, const int32_t* idx, int64_t n, int64_t N, int64_t C,
                 int64_t elem_bytes) {
  check_row_index(idx, n, N, "gather_rows");
  const int64_t row = C * elem_bytes;
  auto* o = static_cast<char*>(out);
  const auto* s = static_cast<const char*>(inp);
#pragma omp parallel for schedule(static) if (n * row > (int64_t{1} << 20))
  for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * row, s + idx[i] * row, static_cast<size_t>(row));
}

template <class T>
void scatter_add_rows(T* dinp, const T* dout, const int32_t* idx, int64_t n, int64_t N, int64_t C) {
  check_row_index(idx, n, N, "scatter_add_rows");
#pragma omp parallel for schedule(static) if (n * C > 65536)
  for (int64_t i = 0; i < n; ++i) {
    T* d = dinp + static_cast<int64_t>(idx[i]) * C;
    const T* s = dout + i * C;
    for (int64_t c = 0; c < C; ++c) d[c] += s[c];
  }
}

template void scatter_add_rows<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t);
template void scatter_add_rows<double>(double*, const double*, const int32_t*, int64_t, int64_t, int64_t);

}  // namespace dpo::cpu
