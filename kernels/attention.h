// Causal multi-head self-attention with a key padding mask (or a batch layout's spans, below), on the packed qkv of
// GPT-2's c_attn.
//   qkv[B,T,3C]: q = qkv[..., 0:C], k = qkv[..., C:2C], v = qkv[..., 2C:3C]; head h owns channels
//                [h*hs, (h+1)*hs) of each, hs = C / NH.
//   keymask[B,T] int32 (1 = real token, 0 = padding) or null (all real).
//   Query t of sequence b attends to keys s <= t with keymask[b,s] != 0, scores scaled by 1/sqrt(hs).
//   forward : att[B,NH,T,T] = softmax probabilities (saved for backward; entries for s > t or masked s are 0)  (=)
//             out[B,T,C]    = att @ v, heads concatenated                                                    (=)
//             A query row with no visible key (left padding) gets att = 0 and out = 0.
//   backward: dqkv[B,T,3C] += gradient through q, k and v                                                    (+=)
#pragma once
#include <cstdint>

#include "kernels/batch_layout.h"

namespace dpo::cpu {

template <class T>
void attention_forward(T* out, T* att, const T* qkv, const int32_t* keymask, int64_t B, int64_t T_, int64_t C,
                       int64_t NH);

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int64_t B, int64_t T_, int64_t C,
                        int64_t NH);

// --- Incremental decoding: one new query per sequence against a key/value cache -------------------------------------
// The cache of one layer is two arrays kcache, vcache [B,Tc,C]: row (b,s) holds the key (value) of position s of
// sequence b, heads laid out as in qkv (head h owns channels [h*hs, (h+1)*hs)). Positions are per sequence, so
// sequences of different lengths share a batch without padding inside the cache (a sequence's positions past its
// length are simply not read).
//
// attention_cache_store (the prefill): for every b and t < T_ (T_ <= Tc)
//   kcache[b,t,:] = qkv[b,t,C:2C], vcache[b,t,:] = qkv[b,t,2C:3C]                                  (=)
//   positions [T_, Tc) are untouched.
//
// attention_decode_forward (one step): qkv[B,3C] is the packed q | k | v of one new token per sequence, at position
// pos[b] (int32, 0 <= pos[b] < Tc, else dpo::Error before anything is written). Then
//   kcache[b,pos[b],:] = k, vcache[b,pos[b],:] = v                                                 (=)
//   out[b,:] [B,C]     = per head, softmax_s(q . kcache[b,s] / sqrt(hs)) over s in [0, pos[b]], times vcache[b,s]  (=)
// Positions s < pos[b] are read as they are (written by the prefill or by earlier steps); positions > pos[b] are
// never read, nor written. There is no key mask: the sequence's own positions [0, pos[b]] are all real, which is
// the right-padded batch of the full forward with its causal mask (a query never sees a later position).
// The arithmetic is that of attention_forward for query row t = pos[b] (dot products, softmax and the weighted sum
// in double, in the same order), so with the keys and values of the same qkv the result is bitwise that row of
// attention_forward's out.
template <class T>
void attention_cache_store(T* kcache, T* vcache, const T* qkv, int64_t B, int64_t T_, int64_t Tc, int64_t C);

template <class T>
void attention_decode_forward(T* out, T* kcache, T* vcache, const T* qkv, const int32_t* pos, int64_t B, int64_t Tc,
                              int64_t C, int64_t NH);

}  // namespace dpo::cpu

// --- Blocked attention (kernels/attention_tiled_cpu.cpp) ----------------------------------------------------------
// The same attention as attention_forward / attention_backward above, without the [B,NH,T,T] probabilities:
//   forward : out[B,T,C] as above                                                                            (=)
//             lse[B,NH,T] = log sum_s exp(score[t, s]) over the visible keys s of query t (the row's
//                           log-sum-exp), +inf for a query with no visible key (its out is 0)                  (=)
//   backward: dqkv[B,T,3C] += gradient through q, k and v, the probabilities recomputed from q, k, keymask and
//             lse (keymask must be the one the forward saw)                                                  (+=)
// Queries are taken in blocks of 32 rows (kAttentionTiledQueries) against tiles of 64 keys (kAttentionTiledKeys); each block's scores are held in a per-thread
// buffer (32 x T), so memory is O(threads * 32 * T) instead of O(B * NH * T^2). Arithmetic is T's own (float for
// float, double for double) with vectorisable inner loops. Every value is computed by one thread in a fixed order,
// so the results do not depend on the thread count. The reference above stays the oracle (tests compare the two).
namespace dpo::cpu {

constexpr int64_t kAttentionTiledQueries = 32;  // query rows per block
constexpr int64_t kAttentionTiledKeys = 64;     // keys per tile; tile j holds the keys [64 j, 64 (j + 1))

template <class T>
void attention_tiled_forward(T* out, T* lse, const T* qkv, const int32_t* keymask, int64_t B, int64_t T_, int64_t C,
                             int64_t NH);

template <class T>
void attention_tiled_backward(T* dqkv, const T* dout, const T* qkv, const int32_t* keymask, const T* lse, int64_t B,
                              int64_t T_, int64_t C, int64_t NH);

}  // namespace dpo::cpu

// --- Attention under a batch layout's spans (kernels/batch_layout.h) -----------------------------------------------
// span[B,T,kSpanWidth] int32. Query slot t of row b attends to the key slots k of row b with span_sees(span[b,t],
// t, k): the range [lo, t] minus the hole [hole_lo, hole_hi), instead of the key-mask rule; everything else is the
// contract of the function each one mirrors (shapes, scaling, = and +=, determinism across thread counts):
//   attention_forward_spans / attention_backward_spans              the reference pair (att [B,NH,T,T] saved)
//   attention_tiled_forward_spans / attention_tiled_backward_spans  the blocked pair (lse [B,NH,T] saved)
// The backward must get the spans its forward saw. Every span must be valid (span_valid: 0 <= lo <= t, and an empty
// hole or lo <= hole_lo < hole_hi <= t), so every query sees at least itself and no softmax row is empty; each
// function checks all of them before it writes anything (check_attention_spans: dpo::Error naming the row, the
// slot, the values and the rule broken).
//
// Cost follows the spans. Every per-query loop (scores, softmax, weighted sums, gradients) runs over the visible
// keys only, [lo, hole_lo) then [hole_hi, t]. The blocked kernels compute a query block's dot products only for
// the key tiles that hold a key some query of the block sees (attention_tiled_key_tiles): a row packed with
// segments of lengths L_i costs about sum_i L_i^2 (plus the tiles that straddle a segment boundary), not T^2.
//
// What holds against the key-mask form. Each spans function runs the arithmetic of its key-mask twin, visible keys
// in the same ascending order; a key it skips is one whose probability is exactly 0 in the key-mask form, where it
// only adds exact zeros (and a dot product does not depend on the tile it is computed in). So with the spans a
// left/right-padding key mask implies (real slot t: {first real slot, t, t}; padding slot t: {t, t, t}):
//   - for every real query slot, out and the att row (reference) or lse (blocked) are bitwise those of the key-mask
//     form of the same kernel (tested for both kernels, float and double);
//   - dqkv is bitwise that of the key-mask form at every slot when dout is 0 at the padding slots (the model's loss
//     gives padding no gradient). With a non-zero dout there, the key-mask form also sends the right-padding
//     queries' gradient into the real keys and values; the spans form does not;
//   - padding query slots differ by design: the key-mask form gives left padding att = 0 and out = 0 (no visible
//     key) and lets right padding attend to the real keys; with spans each padding slot sees only itself.
// By the same argument, a segment of a packed row (its slots seeing only slots of the segment) gets bitwise the out,
// saved rows and dqkv of the same segment run alone as a row of its own through the same kernel (key mask null),
// and in a prefix_shared segment the dup slot's out is bitwise the prompt's last slot's (tests/test_attention_spans.cpp).
// Across kernels (reference vs blocked, spans or mask) only the documented tolerances hold, not bitwise equality.
namespace dpo::cpu {

// Throws dpo::Error (prefixed by fn) for the first span that is not span_valid, in slot order.
void check_attention_spans(const int32_t* span, int64_t B, int64_t T_, const char* fn);

// The padded layout's spans of a key mask (kernels/batch_layout.h), so that a kernel that takes spans only (the flash
// kernels, kernels/flash_attention.h) runs key-mask batches: keymask [B,T] I32 (non-zero = real; null = all real),
// span [B,T,kSpanWidth] (=): real slot t of row b -> {lo_b, t, t} with lo_b the row's first real slot; padding
// slot t -> {t, t, t} (itself only). Every span written is valid. The rows of a padded batch are left- or
// right-padded, their real slots contiguous; then a real query sees exactly the keys the key-mask rule lets it see
// (the equivalence of kernels/attention.h above). A mask with padding between two real slots is outside that
// contract: a later real query would also see the padding between them. The GPU twin is
// cuda::attention_keymask_spans (kernels/attention.cuh); both write the same integers.
void attention_keymask_spans(int32_t* span, const int32_t* keymask, int64_t B, int64_t T_);

template <class T>
void attention_forward_spans(T* out, T* att, const T* qkv, const int32_t* span, int64_t B, int64_t T_, int64_t C,
                             int64_t NH);

template <class T>
void attention_backward_spans(T* dqkv, const T* dout, const T* qkv, const T* att, const int32_t* span, int64_t B,
                              int64_t T_, int64_t C, int64_t NH);

template <class T>
void attention_tiled_forward_spans(T* out, T* lse, const T* qkv, const int32_t* span, int64_t B, int64_t T_,
                                   int64_t C, int64_t NH);

template <class T>
void attention_tiled_backward_spans(T* dqkv, const T* dout, const T* qkv, const int32_t* span, const T* lse,
                                    int64_t B, int64_t T_, int64_t C, int64_t NH);

// The key tiles the blocked kernels visit for the query block [t0, t1) of one row, written ascending to `tiles`
// (room for ceil(t1 / kAttentionTiledKeys) entries); returns their count. span_row: the row's spans [T, kSpanWidth]
// (valid), and then the tiles are exactly those holding at least one key that some query of the block sees; null
// (the key-mask form): every tile of [0, t1). The kernels call this very function, so a test of its result is a
// test of their key-tile loops.
int64_t attention_tiled_key_tiles(int64_t* tiles, const int32_t* span_row, int64_t t0, int64_t t1);

}  // namespace dpo::cpu
