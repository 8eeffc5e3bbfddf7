// The keys one query of the CPU attention kernels sees (kernels/attention_cpu.cpp, attention_tiled_cpu.cpp), in one
// form for both visibility rules of kernels/attention.h, so that the two share every loop and every rounding:
//   key mask (or none):  the slots [0, t] whose mask entry is not 0;
//   spans:               the slots [lo, hole_lo) and [hole_hi, t] (kernels/batch_layout.h; the span is valid).
// Either way the visible keys are visited in ascending order, and a key-mask query and a spans query with the same
// visible set run the same arithmetic in the same order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/batch_layout.h"

namespace dpo::cpu {

struct QueryKeys {
  int64_t t;                 // the query's slot in its row
  int64_t lo, hole_lo, hole_hi;  // visible: [lo, hole_lo) and [hole_hi, t]; an empty hole is [t + 1, t + 1)
  const int32_t* mask;       // the row's key mask (null: every key is real)

  // The key mask form: keys [0, t] of the row, those with mask[s] == 0 left out.
  static QueryKeys from_mask(const int32_t* mask_row, int64_t t) { return {t, 0, t + 1, t + 1, mask_row}; }
  // The spans form; `sp` is the query's span and must be valid (span_valid).
  static QueryKeys from_span(const int32_t* sp, int64_t t) {
    const int64_t lo = sp[kSpanLo], hl = sp[kSpanHoleLo], hh = sp[kSpanHoleHi];
    if (hl == hh) return {t, lo, t + 1, t + 1, nullptr};
    return {t, lo, hl, hh, nullptr};
  }

  // Whether key s (any slot of the row) is visible.
  bool sees(int64_t s) const {
    return s >= lo && s <= t && !(s >= hole_lo && s < hole_hi) && (mask == nullptr || mask[s] != 0);
  }
  // f(s) for every visible key s, ascending.
  template <class F>
  void for_each(F&& f) const {
    for (int64_t s = lo; s < hole_lo; ++s)
      if (mask == nullptr || mask[s] != 0) f(s);
    for (int64_t s = std::max(hole_hi, lo); s <= t; ++s)
      if (mask == nullptr || mask[s] != 0) f(s);
  }
};

}  // namespace dpo::cpu
