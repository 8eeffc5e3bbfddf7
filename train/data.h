// Preference (DPO) and SFT data: JSONL loading, validation, truncation, batching, epoch order.
//
// File format: JSONL, one JSON object per line. Lines holding only whitespace are ignored and counted nowhere
// (not in LoadStats::read); line numbers in messages are physical 1-based line numbers, blank lines included.
// A UTF-8 byte-order mark at the start of the file is skipped.
//
// Preference records take one of two forms (load_preferences):
//   text      {"prompt": str, "chosen": str, "rejected": str}                 tokenised with the given Tokenizer
//   token ids {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}  each id in [0, vocab_size)
// where vocab_size is the model's (DataOptions::vocab_size), or the tokenizer's when that is not set; the ids a
// tokenizer makes of a text record are held to the same bound.
// plus optional "score_chosen" / "score_rejected" (finite numbers, both or neither; for ODPO). Other fields
// are allowed and ignored (datasets carry ids, sources, ratings, ...). Chat-style message lists are not
// supported: apply the chat template before writing the file. SFT records (load_sft) are {"prompt",
// "completion"} or {"prompt_ids", "completion_ids"}.
//
// Malformed records throw InputError("path:line: <what> (field 'x')"), or with DataOptions::skip_malformed are
// skipped and counted by reason in LoadStats::skipped_by_reason (read == kept + skipped always holds). Reasons:
//   bad_json          the line is not valid JSON
//   duplicate_key     an object on the line has the same key twice (at any depth; JSON leaves the meaning open,
//                     so the record is refused rather than one value silently chosen)
//   invalid_utf8      the line holds bytes that are not strict UTF-8 (any field; nlohmann-json cannot parse it)
//   not_object        the line is valid JSON but not an object
//   mixed_forms       the record has fields of both the text and the token-id form
//   no_form           the record has fields of neither form
//   missing_field     a field of the chosen form is absent
//   wrong_type        a field has the wrong JSON type (not a string / not an array of integers / not a number)
//   id_out_of_range   a token id is outside [0, vocab_size)
//   empty_prompt      the prompt is empty: the first completion token would have no position predicting it
//   empty_completion  a completion is empty, or holds only EOS
//   scores            only one of score_chosen / score_rejected, or a non-finite score; with
//                     DataOptions::require_score_gap (ODPO) also a record without scores, with
//                     score_chosen <= score_rejected, or with a difference that overflows
// These checks and make_batch's guarantees are the preconditions of the per-pair loss (kernels/pair_loss.h), which
// runs on the device and cannot report a bad pair: every batch row has completion_len >= 1 (empty completions are
// refused, truncation keeps >= 1 completion token), and with require_score_gap every pair's ODPO offset
// log(score_chosen - score_rejected) is finite.
// A file that cannot be opened, an I/O error, or a file with no kept record throws InputError naming the file.
//
// EOS (DataOptions::append_eos): appended to each completion unless it already ends with eos_id (never doubled);
// never added to the prompt. EOS ids elsewhere in a token-id record are kept as given. Text records take the
// tokenizer's eos_id(), token-id records DataOptions::ids_eos_id (the model's EOS; the tokenizer's when unset).
//
// Truncation, after EOS (DataOptions::rule; a completion cut loses its EOS; a record with anything cut counts once
// in LoadStats::truncated). SFT records follow the same rules with their single completion.
//   Trl1 (TRL 1.x, checked against TRL v1.9.0's DPOTrainer: DataCollatorForPreference and the filter in
//   _prepare_dataset): a record whose prompt alone has len(prompt) >= max_length tokens is dropped (TRL: "Dropping
//   fully truncated examples", kept iff len(prompt_ids) < max_length) and counted in LoadStats::dropped, never an
//   error unless nothing is left; in every kept record, prompt + chosen and prompt + rejected are each cut to
//   their first max_length tokens (TRL's keep_start slice [:max_length] of each sequence), so the prompt stays
//   whole and each completion is cut to max_length - len(prompt) >= 1 tokens independently of the other.
//   TruncationMode::KeepEnd is refused (validate): TRL cuts the start of each sequence then, so chosen and
//   rejected would keep different parts of the prompt, which a pair sharing one prompt cannot hold; TRL 1.x
//   deprecates it.
//   Legacy (this trainer's rule before TRL 1.x's, applied to a whole record so chosen and rejected are cut the
//   same way):
//     L = len(prompt) + max(len(chosen), len(rejected))
//     if L > max_length:
//       cut the prompt to max_prompt_length tokens (KeepEnd: keep its last tokens, KeepStart: its first);
//       if still L > max_length: cut every completion to max_length - len(prompt) tokens, keeping its start.
//     A prompt longer than max_prompt_length is left whole when the record fits in max_length. Nothing is
//     dropped.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kernels/batch_layout.h"
#include "runtime/tensor.h"
#include "train/tokenizer.h"

namespace dpo {

struct PreferencePair {
  std::vector<int32_t> prompt, chosen, rejected;  // completions include the appended EOS
  bool has_scores = false;
  double score_chosen = 0, score_rejected = 0;
  int64_t line = 0;  // 1-based line in the source file
};

struct SftExample {
  std::vector<int32_t> prompt, completion;  // completion includes the appended EOS
  int64_t line = 0;
};

// Which truncation rule (see above): TRL 1.x's, or the prompt-budget rule of TRL 0.x's kind.
enum class TruncationRule { Trl1, Legacy };
// Which end is kept: of each sequence (Trl1: KeepStart only) or of a prompt cut to max_prompt_length (Legacy).
enum class TruncationMode { KeepEnd, KeepStart };

struct DataOptions {
  int64_t max_length = 512;  // prompt + completion, in tokens
  TruncationRule rule = TruncationRule::Trl1;
  TruncationMode truncation = TruncationMode::KeepStart;
  int64_t max_prompt_length = 256;  // Legacy: prompt length after a cut; not used by Trl1
  bool skip_malformed = false;  // skip and count malformed records instead of throwing
  bool append_eos = true;
  // The model's vocabulary size: every id must lie in [0, vocab_size); 0 = the tokenizer's vocab_size().
  int64_t vocab_size = 0;
  // The EOS appended to token-id records (the model's config names it); -1 = the tokenizer's eos_id().
  int32_t ids_eos_id = -1;
  // The id batches fill padding slots with (make_batch and the others take it as pad_id): the model's pad_token_id
  // or the key's, else 0. Padding is never scored nor attended to, so results do not depend on it; it must be a
  // token the model can embed, in [0, vocab_size) (validate).
  int32_t pad_id = 0;
  // ODPO (odpo_alpha > 0): every preference record must carry score_chosen > score_rejected with a finite
  // difference (the offset is log(score_chosen - score_rejected)); checked while loading so that the error names
  // file:line (the loss itself, device code, assumes it).
  bool require_score_gap = false;

  // Throws InputError naming the option unless max_length > 0 and, for Legacy, 0 < max_prompt_length <
  // max_length; for Trl1, unless truncation is KeepStart; and unless 0 <= pad_id < vocab_size (when set).
  void validate() const;
};

struct LoadStats {
  int64_t read = 0;       // non-blank lines; read == kept + skipped + dropped
  int64_t kept = 0;       // records returned
  int64_t skipped = 0;    // malformed records skipped (skip_malformed)
  int64_t dropped = 0;    // well-formed records dropped by truncation (Trl1: prompt alone >= max_length tokens)
  int64_t truncated = 0;  // kept records that were cut
  int64_t with_scores = 0;  // kept records carrying score_chosen/score_rejected
  std::map<std::string, int64_t> skipped_by_reason;
};

// `stats` may be null. Throws InputError as described above.
std::vector<PreferencePair> load_preferences(const std::string& path, const Tokenizer& tok, const DataOptions& opt,
                                             LoadStats* stats);
std::vector<SftExample> load_sft(const std::string& path, const Tokenizer& tok, const DataOptions& opt,
                                 LoadStats* stats);

// A batch as host tensors. Preference batches have 2P rows: rows 0..P-1 the chosen sequences, rows P..2P-1 the
// rejected ones, pair i in rows i and P+i. SFT batches have P rows (pairs == rows == P).
// Each row is prompt + completion, right-padded with pad_id to T = the longest row in the batch.
//   tokens   [R,T] I32   the sequence, pad_id after its end
//   keymask  [R,T] I32   1 on real tokens, 0 on padding
//   targets  [R,T] I32   tokens[r,t+1] where t+1 is a real token, else -1
//   weights  [R,T] F32|F64  1 exactly where targets[r,t] is a completion token (t+1 >= len(prompt)), else 0:
//                        the loss covers the completion, its EOS included, never the prompt or padding
// as kernels/logprob.h expects (targets are ignored where the weight is 0).
//
// With another batch layout (kernels/batch_layout.h; make_layout_batch below) rows hold several sequences: tokens,
// keymask (1 on every used slot), targets and weights are per slot as above but for each sequence of the row, and
// pos, span and seg say where the sequences are. Pair q's chosen sequence is sequence 2q, its rejected one 2q + 1
// (interleaved, kernels/batch_layout.h), in the batch's pair order `indices` (packing may reorder pairs), and both
// sit in one row; completion_len follows the same order.
struct Batch {
  int64_t pairs = 0, T = 0;
  Tensor tokens, keymask, targets;
  Tensor weights;
  std::vector<int64_t> completion_len;  // per sequence (padded: rows; layouts: 2q, 2q + 1): weighted tokens
  std::vector<double> score_chosen, score_rejected;  // per pair; filled only when has_scores
  bool has_scores = false;  // true iff every pair in the batch has scores
  int64_t tokens_total = 0;  // the pairs' tokens, 2 * prompt + chosen + rejected each, whatever the layout
  std::vector<int64_t> indices;  // the records of the batch, in batch order
  BatchLayout layout = BatchLayout::Padded;
  Tensor pos, span;           // layout batches: [R,T] and [R,T,kSpanWidth] I32; undefined for Padded
  std::vector<int64_t> seg;   // layout batches: [2P * 2] flat slot ranges of the sequences (interleaved)
  std::vector<int64_t> row_pairs;  // layout batches: how many pairs each row holds (rows hold consecutive pairs)
  int64_t slots_used = 0;     // slots holding a token (R * T minus the padding)
};

// "padded", "packed", "prefix_shared" (the config key batch_layout); InputError naming the key otherwise.
BatchLayout parse_batch_layout(const std::string& name);
const char* batch_layout_name(BatchLayout l);

// A preference batch in `layout` (kernels/batch_layout.h). Padded: make_batch. Packed: each pair is two segments,
// prompt + chosen and prompt + rejected, with positions from 0 each; PrefixShared: one segment per pair, prompt |
// chosen | dup | rejected. Pairs are placed whole, in the order of `indices`, into the first row with room for
// them (rows of at most max_tokens_per_row slots; a pair longer than that gets a row of its own), and renumbered
// in row order (Batch::indices). T is the longest row. Same preconditions as make_batch; max_tokens_per_row >= 1.
Batch make_layout_batch(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices,
                        BatchLayout layout, int64_t max_tokens_per_row, DType weight_dtype, int32_t pad_id);

// indices select the pairs (duplicates allowed); they must be in range and non-empty, weight_dtype F32 or F64,
// pad_id >= 0 (a token the model can embed; GPT-2 convention: the EOS id), every pair with a non-empty prompt
// and completions (as the loaders guarantee). Violations throw dpo::Error.
Batch make_batch(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices, DType weight_dtype,
                 int32_t pad_id);
Batch make_sft_batch(const std::vector<SftExample>& data, const std::vector<int64_t>& indices, DType weight_dtype,
                     int32_t pad_id);

// LD-DPO's length desensitisation (Liu et al. 2024, arXiv 2409.06411) as TRL 1.16 applies it (`ld_alpha`): pair q's
// completions share their first n = min(len_chosen, len_rejected) scored tokens; each sequence's later tokens (the
// tail of the longer one) weigh ld_alpha, so a sequence's weighted log-prob (kernels/logprob.h) is
//   sum of its first n token log-probs + ld_alpha * sum of the rest,
// TRL's `shared_logps + ld_alpha * tail_logps`, for the policy and the reference alike (both score the same
// batch). Acts on b's preference weights in place, in any layout: a sequence's scored slots are its slots with a
// non-zero weight, in slot order (padded: row q and row P + q; layouts: the ranges seg[2q], seg[2q + 1]), the k-th
// of them (k = 0, 1, ...) in the tail when k >= n. Exactly nothing changes with ld_alpha == 1; ld_alpha must be in
// (0, 1] (Error otherwise): 0 would turn the tail into unscored slots, which the completion lengths
// (kSeqTokens, kernels/seq_stats.h) and the LM head's scored rows then leave out, unlike TRL's.
void apply_ld_alpha(Batch& b, double ld_alpha);

// Pads every row of b with padding columns up to T >= b.T (tokens pad_id, key mask 0, target -1, weight 0): the
// positions a batch of longer rows would pad, so the per-sequence results are those of the narrower batch up to
// rounding (a wider GEMM may round differently). For shape buckets (pad_to_multiple_of, CUDA graphs).
void pad_batch_columns(Batch& b, int64_t T, int32_t pad_id);

// Token-balanced sharding: cuts 0 = c[0] <= c[1] <= ... <= c[parts] = n of items with the given costs (>= 0) into
// `parts` contiguous ranges [c[k], c[k+1]) whose largest total cost is the smallest possible; among such cuts, each
// range takes as many items as the bound allows, left to right (so trailing ranges may be empty). Deterministic:
// the same costs give the same cuts on every machine. parts >= 1.
std::vector<int64_t> balanced_cuts(const std::vector<int64_t>& costs, int parts);

// The cost of a preference micro-batch of `indices` in `layout` for balancing ranks: the token slots it runs
// (padded: rows times the longest row; packed and prefix_shared: the pairs' tokens, prompts once with prefix
// sharing, which is what the CPU's attention and GEMMs scale with).
int64_t micro_batch_cost(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices,
                         BatchLayout layout);

// A permutation of 0..n-1: Fisher-Yates driven by dpo::Rng seeded with a mix of (seed, epoch). The same inputs
// give the same permutation on every machine and compiler. n >= 0.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace dpo
