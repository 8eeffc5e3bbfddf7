// Reference-model log-probs: computed live, or once per (reference weights, data, tokenisation settings) and
// cached on disk.
//
// The cache key is SHA-256 over the reference's weights as it computes with them (master_params() as an F32
// vector: the loaded values in fp32, the BF16 weights of the trainer's forward-only BF16 reference) and config, the
// data file's bytes, the tokens the reference scores (every pair's prompt, chosen and rejected ids, so any
// tokenisation or truncation setting changes it), and a settings string (the trainer builds it from its config:
// tokenizer, lengths, truncation, precision, device, batch size; cached_ref_logps appends the shape's ld_alpha
// when it is not 1). The cache file is <cache_dir>/ref-<key>.safetensors holding F64 "chosen" and "rejected" [N]
// and, in its metadata, every component of the key and "values_sha256", the SHA-256 of the two tensors' bytes. A
// file whose metadata does not match what this run computes, whose values do not match values_sha256 (a flipped
// bit), or that is unreadable, is reported as stale and recomputed (and rewritten); it is never used.
#pragma once

#include <string>
#include <vector>

#include "model/gpt2.h"
#include "train/data.h"

namespace dpo {

struct RefLogps {
  std::vector<double> chosen, rejected;  // per pair, summed completion log-probs under the reference
};

// Summed completion log-probs of every row of a preference batch under `m` (rows 0..P-1 chosen, P..2P-1
// rejected); the batch's host tensors are moved to m's backend as needed.
// The summed completion log-probs of b's sequences under m, [chosen 0..P-1, rejected P..2P-1] (a preference
// batch in any layout; for an SFT batch, one per row).
std::vector<double> sequence_logps(GPT2& m, const Batch& b);

// How batches are laid out (config keys batch_layout, max_tokens_per_row): make_layout_batch's arguments.
struct BatchShape {
  BatchLayout layout = BatchLayout::Padded;
  int64_t max_tokens_per_row = 0;  // packed / prefix_shared rows
  double ld_alpha = 1.0;  // LD-DPO's weight of the tokens past a pair's shared length (apply_ld_alpha); 1: none
  int32_t pad_id = 0;     // the id of padding slots (DataOptions::pad_id)
  // A batch of `data`'s records `indices` in this shape (make_batch for Padded), with ld_alpha applied.
  Batch make(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices, DType weight_dtype) const;
};

// While alive, `m` takes batches in b's layout (GPT2::set_layout with b's positions and spans on m's device);
// nothing for a padded batch.
class LayoutScope {
 public:
  LayoutScope(GPT2& m, const Batch& b);
  ~LayoutScope();
  LayoutScope(const LayoutScope&) = delete;
  LayoutScope& operator=(const LayoutScope&) = delete;

 private:
  GPT2* m_ = nullptr;
};

// Forward passes of the reference over every pair, `batch_pairs` at a time.
RefLogps compute_ref_logps(GPT2& ref, const std::vector<PreferencePair>& data, int64_t batch_pairs,
                           const BatchShape& shape = {});

struct RefCacheResult {
  RefLogps logps;
  std::string path;
  enum class Status { Hit, Miss, Stale } status = Status::Miss;
  std::string reason;  // why a file was stale
};

RefCacheResult cached_ref_logps(GPT2& ref, const std::vector<PreferencePair>& data, const std::string& data_path,
                                const std::string& settings, const std::string& cache_dir, int64_t batch_pairs,
                                const BatchShape& shape = {});

// $XDG_CACHE_HOME/dpo/ref, else $HOME/.cache/dpo/ref, else ./.dpo-cache/ref.
std::string default_ref_cache_dir();

// TR-DPO's reference update (Gorbatovski et al. 2024, arXiv 2404.09656; TRL's SyncRefModelCallback): each
// parameter of the reference becomes
//     ref <- alpha * policy + (1 - alpha) * ref,        alpha = ref_model_mixup_alpha in [0, 1]
// computed in double from the reference's stored values and rounded once to the reference's dtype (F32: to the
// nearest float; BF16: to the nearest bf16, so alpha = 1 gives exactly the policy's BF16 compute copy).
//
// mix_weights_host: the arithmetic alone, in place on ref_host (host, [n], F32, F64 or BF16) from policy_host
// (host, [n], any floating dtype).
void mix_weights_host(const Tensor& ref_host, const Tensor& policy_host, double alpha);

// The update of a live reference model from the policy's full weights `policy_host` (host, [num_parameters], any
// floating dtype: the trainer passes the F32 master weights, gathered under ZeRO-1), through one host round-trip
// of the reference's parameters, written back through GPT2::assign_weights (so a forward-only reference works): a
// BF16 reference's F32 master copy, when it has one, is set to the same (BF16) values, so that saving and
// reloading it reproduces it exactly. Same config as the policy required (InputError
// otherwise, checked by the caller; here a size mismatch is an assertion).
void sync_reference(GPT2& ref, const Tensor& policy_host, double alpha);

// Whether optimizer step `step` (1-based, counted after the step's update, as transformers' global_step in
// on_step_end) is followed by a reference sync: every `every`-th step (steps every, 2 * every, ...).
inline bool ref_sync_due(int64_t step, int64_t every) { return every > 0 && step > 0 && step % every == 0; }

}  // namespace dpo
