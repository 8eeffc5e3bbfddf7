// The batch layout: how sequences sit in the rows of a batch, defined once for the kernels (attention, encoder,
// log-probs; CPU twins and CUDA), the model (model/gpt2.h) and the data pipeline (train/data.h), in three modes
// (config key batch_layout, docs/training.md):
//
//   padded         one sequence per row, right-padded to the longest row (today's layout; the key mask form).
//   packed         several whole sequences per row, each with positions from 0 and no attention across them; rows
//                  filled to max_tokens_per_row by a deterministic first-fit order; padding only at a row's end.
//   prefix_shared  one segment per pair: [prompt | chosen | dup | rejected], where the chosen tokens attend to the
//                  prompt and their own earlier tokens, and the rejected tokens to the prompt and their own earlier
//                  tokens (never to the chosen); the rejected tokens' positions continue from the prompt's end as if
//                  the chosen were absent. `dup` is a copy of the prompt's last token at the prompt's last position
//                  whose span hides the prompt's last slot and the chosen part (hole [prompt_last, dup)): it sees the
//                  prompt's first p-1 slots and itself, whose key and value equal the prompt's last slot's (same
//                  token, same position, and by induction over the layers the same inputs), in the same order, so
//                  its hidden state is bitwise the prompt's last state. It predicts the rejected completion's first
//                  token while the prompt's own last slot predicts the chosen's first token: every scored token has
//                  its own predicting slot. The rejected tokens use the same hole (they see the prompt's first p-1
//                  slots, dup, and their own earlier tokens). Segments of several pairs may share a row (packed).
//
// Everything is per token slot of a [R, T] batch (slot = r * T + t), as int32 arrays of the backends' devices:
//
//   pos   [R, T]     the position id of the slot (the row of wpe the encoder adds). Padding slots: 0.
//   span  [R, T, 3]  what query slot t of row r attends to: key slots k of the same row with
//                    span[0] <= k <= t and not (span[1] <= k < span[2]), i.e. a contiguous range ending at the query
//                    itself, minus one hole (span[1] == span[2]: no hole). Always span[0] <= t and, when the hole is
//                    not empty, span[0] <= span[1] < span[2] <= t (the query never falls in its own hole), so every
//                    query sees at least itself and every softmax row is finite. Padding slots: {t, t, t} (itself
//                    only; their outputs are never scored).
//   seg   [S, 2]     sequence s's scored slots: the contiguous flat slot range [seg[0], seg[1]) whose log-probs (with
//                    the targets and weights of those slots) sum to its log-prob (kernels/logprob.h); every scored
//                    slot belongs to exactly one sequence. For a preference batch of P pairs, sequence 2q is pair
//                    q's chosen completion and 2q + 1 its rejected one (pairs in row order, so the ranges are
//                    sorted by slot; the per-sequence arrays of such a batch use PairRows::Interleaved,
//                    kernels/pair_loss.h, where the padded layout has chosen 0..P-1 and rejected P..2P-1).
//
// The padded layout in this form: pos[r, t] = t, span = {first real slot of the row (0 unless left-padded), t, t}
// for real slots and {t, t, t} for padding, seg[s] = [s * T, (s + 1) * T). The attention kernels' cost follows the
// spans: a query visits only the key tiles of its range (sum over segments of len^2, not T^2 per row).
#pragma once

#include <cstdint>

namespace dpo {

enum class BatchLayout : int32_t { Padded, Packed, PrefixShared };

constexpr int64_t kSpanWidth = 3;  // span[..., 0..2]: first key, hole begin, hole end
enum SpanField : int64_t { kSpanLo = 0, kSpanHoleLo = 1, kSpanHoleHi = 2 };

// Whether key slot k is visible to the query whose span is `sp` (t: the query's slot in its row).
inline constexpr bool span_sees(const int32_t* sp, int64_t t, int64_t k) {
  return k >= sp[kSpanLo] && k <= t && !(k >= sp[kSpanHoleLo] && k < sp[kSpanHoleHi]);
}

// Whether the query whose span is `sp` (slot t) sees any key slot of [k0, k1): its visible range [lo, t] cut to
// [k0, k1) is not empty and does not lie wholly inside the hole (an empty hole hides nothing). The flash attention
// kernel (kernels/flash_tile.h) skips a key tile that no query of its block sees by this test.
inline constexpr bool span_sees_any(const int32_t* sp, int64_t t, int64_t k0, int64_t k1) {
  const int64_t a = k0 > sp[kSpanLo] ? k0 : sp[kSpanLo];
  const int64_t e = k1 < t + 1 ? k1 : t + 1;  // [a, e): the visible range before the hole is taken out
  return a < e && (a < sp[kSpanHoleLo] || e > sp[kSpanHoleHi]);
}

// Whether `sp` keeps the rules above for query slot t: 0 <= lo <= t, and the hole is empty (hole_lo == hole_hi) or
// lo <= hole_lo < hole_hi <= t. A span that does not is a bug of its producer (the attention ops reject it).
inline constexpr bool span_valid(const int32_t* sp, int64_t t) {
  const int64_t lo = sp[kSpanLo], hl = sp[kSpanHoleLo], hh = sp[kSpanHoleHi];
  return lo >= 0 && lo <= t && (hl == hh || (lo <= hl && hl < hh && hh <= t));
}

}  // namespace dpo
