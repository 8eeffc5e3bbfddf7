// GPT-2 (decoder-only, pre-LayerNorm, learned positions, GELU-tanh MLP, LM head tied to the token embedding).
//
// Parameters live in one flat tensor (`params()`), gradients in another of the same layout (`grads()`), so the
// optimizer and the gradient all-reduce see single vectors. The layout is HF's order and HF's shapes, layer by
// layer (names without the "transformer." prefix):
//   wte [V,C], wpe [maxT,C],
//   h.<l>.ln_1.{weight,bias} [C], h.<l>.attn.c_attn.{weight [C,3C], bias [3C]}, h.<l>.attn.c_proj.{weight [C,C],
//   bias [C]}, h.<l>.ln_2.{weight,bias} [C], h.<l>.mlp.c_fc.{weight [C,4C], bias [4C]},
//   h.<l>.mlp.c_proj.{weight [4C,C], bias [C]},
//   ln_f.{weight,bias} [C].
// Dense weights are in HF's Conv1D layout [in, out] (WeightLayout::InOut); the LM head reads wte as [V, C] (OutIn).
//
// The same class runs the Llama family (GPT2Config::arch == Arch::Llama; HF llama, qwen2, mistral) through the same
// trunk, LM head, recomputation, layouts and decoding, with its own block ops. Its layout (HF's names without the
// "model." prefix; D = n_embd / n_head, W = (n_head + 2 n_kv_head) D, I = intermediate_size):
//   embed_tokens.weight [V,C],
//   layers.<l>.input_layernorm.weight [C], layers.<l>.self_attn.qkv_proj.{weight [C,W], bias [W] (attention_bias
//   only)} (HF's q_proj | k_proj | v_proj, transposed and concatenated), layers.<l>.self_attn.o_proj.weight [C,C],
//   layers.<l>.post_attention_layernorm.weight [C], layers.<l>.mlp.gate_up_proj.weight [C,2I] (gate_proj |
//   up_proj), layers.<l>.mlp.down_proj.weight [I,C],
//   norm.weight [C], lm_head.weight [V,C] (untied heads only; tied: the head reads embed_tokens).
// Block: h = rmsnorm(x); qkv = h @ Wqkv (+ b); rotary embedding in place on q and k (tables built on the host as HF
// builds them, build_rope_tables); k/v heads repeated to n_head (repeat_kv) when n_kv_head < n_head; the GPT-2
// attention ops; x += attn @ Wo; h = rmsnorm(x); x += swiglu(h @ Wgate|up) @ Wdown. Then rmsnorm and the LM head.
// Positions: t for slot (b, t) of a padded batch, the layout's pos otherwise (what wpe reads in the GPT-2 path).
//
// Every op goes through a Backend, so the same model runs on the CPU (F32 or F64) and, with the CUDA backend, on a GPU.
//
// Precision (dtype): F32 or F64 run everything in that type. BF16 is mixed precision (runtime/backend.h): the
// parameters the ops read and the activations are BF16, the gradients F32 (grads()), and an F32 master copy of
// the parameters (master_params()) is what the optimizer updates and checkpoints hold; sync_params() rounds it
// into the BF16 compute copy. In F32/F64 master_params() is params() itself and sync_params() does nothing.
// Per-sequence tensors (weights, seq_logp, dseq) and LayerNorm statistics have dtype grad_dtype(dtype()).
//
// Logits layout: every logits buffer (forward()'s [B,T,ldv] and the chunked head's [rows, ldv]) has the row stride
// ldv = logits_stride() = V rounded up to kLogitsRowAlign elements, while the LM-head GEMM's output width stays V.
// V = 50257 would leave the rows of the largest GEMMs (logits = ln_f @ wte^T and its two backward GEMMs) at an odd
// element stride, 2-byte aligned in bf16, and cuBLASLt falls back to slow kernels; 64 elements (128 B in bf16,
// 256 B in fp32) align every row. Columns [V, ldv) are zero from allocation on and no op reads or writes them
// (runtime/backend.h, "Padded rows"): they never enter the softmax, the log-probs or any gradient. The parameters,
// wte [V, C] included, and the checkpoints are unchanged.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kernels/batch_layout.h"
#include "kernels/pair_loss.h"
#include "runtime/backend.h"
#include "runtime/rng.h"

namespace dpo {

// The decoder's two block families. GPT2: LayerNorm, learned positions (wpe), biased GELU MLP, tied head. Llama
// (HF model_type llama, qwen2, mistral): RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP without
// biases, q/k/v biases optional (Qwen2), the LM head tied or not.
enum class Arch { GPT2, Llama };

// Llama 3's rope_type "llama3" frequency scaling (HF _compute_llama3_parameters); factor 0: none (rope_type
// "default").
struct RopeScaling {
  double factor = 0;
  double low_freq_factor = 1;
  double high_freq_factor = 4;
  int64_t original_max_position_embeddings = 8192;
  bool enabled() const { return factor > 0; }
  bool operator==(const RopeScaling&) const = default;
};

struct GPT2Config {
  Arch arch = Arch::GPT2;
  std::string model_type = "gpt2";  // HF model_type written back on save: gpt2, or llama / qwen2 / mistral
  int64_t max_seq_len = 1024;  // n_positions (max_position_embeddings)
  int64_t vocab_size = 50257;
  int64_t n_layer = 12;
  int64_t n_head = 12;
  int64_t n_embd = 768;
  double ln_eps = 1e-5;  // layer_norm_epsilon (GPT2) or rms_norm_eps (Llama)

  // Llama only (GPT2 ignores them: its MLP is 4 n_embd wide, its heads all have their own k/v, its head is tied).
  int64_t n_kv_head = 0;          // num_key_value_heads; 0: n_head. n_head % n_kv_head == 0
  int64_t intermediate_size = 0;  // the SwiGLU width I; 0: 4 n_embd
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool attention_bias = false;       // q/k/v biases (Qwen2); o_proj never has one
  bool tie_word_embeddings = true;   // false: lm_head.weight [V, C] of its own

  int64_t head_dim() const { return n_embd / n_head; }
  int64_t kv_heads() const { return n_kv_head > 0 ? n_kv_head : n_head; }
  int64_t mlp_width() const { return intermediate_size > 0 ? intermediate_size : 4 * n_embd; }
  // Width of the fused q|k|v projection: 3 n_embd for GPT2, (n_head + 2 n_kv_head) head_dim for Llama.
  int64_t qkv_width() const { return (n_head + 2 * (arch == Arch::Llama ? kv_heads() : n_head)) * head_dim(); }
  bool tied_head() const { return arch == Arch::GPT2 || tie_word_embeddings; }

  // Hugging Face config.json content that the model does not compute with, kept so that a checkpoint saved from
  // a loaded model carries it on (model/checkpoint.h): the special-token ids (-1: not given; saved as
  // vocab_size - 1, GPT-2's <|endoftext|> convention), every other key of the loaded config.json that the saver
  // does not write itself (a JSON object, compact text; empty: none), and the bytes of the checkpoint
  // directory's generation_config.json (empty: none).
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  std::string hf_extra_json;
  std::string generation_config;

  // Throws InputError("<where>: <field> ...") for non-positive sizes, n_embd % n_head != 0, an odd head_dim or
  // n_head % n_kv_head != 0 (Llama).
  void validate(const std::string& where) const;
  int64_t num_parameters() const;
};

// Fusions of the training step (docs/architecture.md, "Fusions"), each a runtime switch so that one binary can compare
// the fused and unfused paths. By default (DPO_FUSIONS unset) the two whose results are bitwise the unfused ops' are
// on and gelu_epilogue, which changes BF16 rounding and has not yet been checked on a GPU, is off (DPO_FUSIONS=all
// turns it on).
struct Fusions {
  // residual add + the next LayerNorm in one op (Backend::residual_layernorm_forward; bitwise equal to the pair).
  bool residual_layernorm = true;
  // "=" first writes (GradWrite::Overwrite) in the backward instead of fill_zero followed by a "+=" op (bitwise
  // equal on the CPU; on the GPU the same arithmetic without the add of 0).
  bool overwrite_grads = true;
  // The MLP's GEMM + GELU (forward) and GEMM + GELU' (backward) as one op each (Backend::matmul_gelu_forward,
  // matmul_backward_dgelu; cuBLASLt epilogues on the GPU). BF16 models only: the F32 / F64 parity modes always run
  // the unfused ops, whatever this says. Changes BF16 rounding (runtime/backend.h states by how much).
  bool gelu_epilogue = true;

  static Fusions all() { return Fusions{}; }
  static Fusions defaults() { return Fusions{true, true, false}; }
  static Fusions none() { return Fusions{false, false, false}; }
  // Parses a DPO_FUSIONS value: "all", "none", or a comma-separated list of residual_layernorm, overwrite_grads,
  // gelu_epilogue (those on, the rest off). Throws InputError naming DPO_FUSIONS for anything else.
  static Fusions parse(const std::string& spec);
  // The environment variable DPO_FUSIONS (unset or empty: defaults()), read and parsed once per process.
  static const Fusions& from_env();
  bool operator==(const Fusions&) const = default;
};

// Which slots the chunked LM head computes logits for (GPT2::set_head_rows).
//   Scored: only the scored slots (weight != 0): their ln_f output rows are gathered into a compact buffer, the
//           LM-head GEMMs and the log-softmax run on those rows only, and the d(ln_f output) rows are scattered back.
//           Needs the weights as host data (GPT2::score, LossHead, PairLossHead: `host_weights`); without them the
//           head runs over all slots.
//   All:    every slot of a chunk (the padded rows' unscored positions included): the reference for Scored.
enum class HeadRows { Scored, All };

struct ParamSpec {
  std::string name;  // HF name without the "transformer." prefix
  Shape shape;
  int64_t offset = 0;        // elements into the flat vector
  bool weight_decay = true;  // false for biases and LayerNorm parameters (AdamW convention)
};

std::vector<ParamSpec> gpt2_param_specs(const GPT2Config& cfg);

class GPT2 {
 public:
  GPT2(Backend& backend, GPT2Config cfg, DType dtype);

  const GPT2Config& config() const { return cfg_; }
  DType dtype() const { return dtype_; }
  Backend& backend() const { return *be_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  const ParamSpec& spec(const std::string& name) const;  // throws Error for an unknown name

  const Tensor& params() const { return params_; }        // the compute copy (dtype())
  const Tensor& master_params() const { return master_; }  // F32 master (BF16) or params() itself
  const Tensor& grads() const { return grads_; }           // grad_dtype(dtype())
  Tensor param(const std::string& name) const;
  Tensor master_param(const std::string& name) const;
  Tensor grad(const std::string& name) const;
  void sync_params();  // params = master rounded to BF16 (only the master's range when sharded); nothing in F32/F64

  // ZeRO-1 with BF16: keep only [begin, end) of the F32 master (master_params() becomes that range, [end - begin]);
  // the rest is freed. sync_params() then rounds only that range into params(); whoever sharded the master gathers
  // the other ranges of params() (the trainer all-gathers them). master_param() throws once sharded. BF16 only
  // (in F32/F64 the master is params() itself, which every rank needs whole).
  void shard_master(int64_t begin, int64_t end);
  bool master_sharded() const { return master_sharded_; }
  int64_t master_begin() const { return master_begin_; }

  // GPT-2's initialisation (as HF's _init_weights): weights and embeddings N(0, 0.02), residual projections
  // (attn.c_proj, mlp.c_proj) N(0, 0.02/sqrt(2 n_layer)), biases 0, LayerNorm weight 1, bias 0.
  void init_random(Rng& rng);
  void zero_grad();

  // Which fusions forward and backward use (Fusions::from_env() at construction); tests set them directly.
  void set_fusions(const Fusions& f) { fusions_ = f; }
  const Fusions& fusions() const { return fusions_; }

  // --- Activation recomputation (gradient checkpointing) -------------------------------------------------------
  // interval 0 (the default): every layer's activations are kept from the forward for the backward. interval
  // N >= 1: the layers form segments of N consecutive blocks (the last one may be shorter; N > n_layer acts as
  // n_layer); the forward keeps only each segment's input (the residual stream entering its first block; the
  // embeddings' output for the first segment), the last block's output (ln_f's input) and ln_f's output and
  // statistics (the LM head's input), and runs every block through one scratch set of N blocks' activations.
  // The backward, segment by segment from the last, reruns the segment's forward from its saved input into the
  // scratch set (the segment still there from the forward is not rerun) and then its backward. The rerun is the
  // forward's own ops in the forward's order on the same inputs (its first LayerNorm unfused, which the backend
  // contract makes bitwise equal to the fused residual + LayerNorm, runtime/backend.h), so gradients are bitwise
  // those of interval 0 wherever the kernels are deterministic. Activation memory per layer drops from every
  // block's activations to one [B,T,C] tensor per segment (model/memory_plan.h has the arithmetic). Forward-only
  // paths (score, decoding) run the same way and recompute nothing. Changing the interval frees the activation
  // buffers (buffers_generation() moves) and drops a pending forward (a backward then needs a new forward).
  // Throws Error for interval < 0.
  void set_gradient_checkpointing(int64_t interval);
  int64_t gradient_checkpointing() const { return ckpt_interval_; }

  // tokens [B,T] I32 on the backend's device, T <= max_seq_len; keymask [B,T] I32 (1 real, 0 padding) or
  // undefined. Positions are 0..T-1 for every row. Returns the logits [B,T,ldv] (ldv = logits_stride(); the logits
  // of (b,t) are elements [0, V) of row (b,t), the rest is zero padding), valid until the next forward.
  const Tensor& forward(const Tensor& tokens, const Tensor& keymask);

  // The row stride of every logits buffer: vocab_size rounded up to a multiple of kLogitsRowAlign.
  static constexpr int64_t kLogitsRowAlign = 64;
  static int64_t logits_stride(int64_t vocab_size) {
    return (vocab_size + kLogitsRowAlign - 1) / kLogitsRowAlign * kLogitsRowAlign;
  }
  int64_t logits_stride() const { return logits_stride(cfg_.vocab_size); }

  // forward, then seq_logp[b] = sum_t weights[b,t] * log p(targets[b,t] | tokens[b, <=t])   (targets/weights
  // [B,T]; see kernels/logprob.h). token_logp [B,T] and seq_stats [B, kSeqStatsWidth] (kernels/seq_stats.h: the
  // log-prob, completion token count and sum of the logits over the vocabulary columns [0, V) of the completion
  // positions) are optional.
  void sequence_logprobs(const Tensor& tokens, const Tensor& keymask, const Tensor& targets, const Tensor& weights,
                         const Tensor& seq_logp, const Tensor& token_logp = Tensor(),
                         const Tensor& seq_stats = Tensor());

  // Backward of the last sequence_logprobs call, given dL/dseq_logp [B]. Gradients accumulate (+=) into grads().
  // Overwrites the stored logits with their gradient.
  // sequence_logprobs + backward is the unfused path: it materialises the logits of the whole batch [B,T,V]. The
  // tests use it as the reference for the chunked path below.
  void backward(const Tensor& dseq);

  // --- The chunked LM head (no [B,T,V] logits) ------------------------------------------------------------------
  // The LM head, log-softmax, gather and per-sequence sums run over chunks of whole sequences through one logits
  // buffer of at most max(logits_chunk_rows, one unit) x ldv elements, whatever B is (a unit is one sequence, or a
  // pair of sequences with the pair layout below). The GEMM work is that of the unfused path: one forward GEMM
  // per chunk and, in fused_forward, the two backward GEMMs (d ln_f output, d wte) right after the chunk's loss
  // gradient is known, so no logits are recomputed.
  void set_logits_chunk_rows(int64_t rows);  // >= 1 (Error otherwise); default kDefaultLogitsChunkRows
  int64_t logits_chunk_rows() const { return chunk_rows_; }
  // The chunk is bounded in bytes too, whatever the vocabulary: a chunk holds at most
  // chunk_rows_within(logits_chunk_rows, logits_chunk_bytes, V, dtype) rows (then whole units, at least one, as
  // above). 2048 rows of Qwen2's 151936-token vocabulary are 1.2 GB in fp32; the default 512 MiB keeps GPT-2's 2048
  // rows in fp32 and bf16 and caps a 152k vocabulary at 883 (fp32) or 1766 (bf16) rows.
  void set_logits_chunk_bytes(int64_t bytes);  // >= 1 (Error otherwise); default kDefaultLogitsChunkBytes
  int64_t logits_chunk_bytes() const { return chunk_bytes_; }
  // min(rows, bytes / (logits_stride(vocab_size) * dtype size)), at least 1.
  static int64_t chunk_rows_within(int64_t rows, int64_t bytes, int64_t vocab_size, DType dtype);
  //
  // Compaction (HeadRows::Scored, the default): most slots of a preference batch are prompt or padding, which no
  // log-prob reads (weight 0); the head then computes logits only for the scored slots (weight != 0), a third of
  // the slots at HH-like lengths, and the LM head is most of a small model's step. Per call the model builds, on
  // the host from the weights, the list of scored slots in chunk order and each sequence's range of compact rows
  // (contiguous: a sequence's scored slots are consecutive compact rows), uploads both once, gathers the targets
  // and weights of those slots once (Backend::gather_rows), and per chunk gathers its ln_f output rows into a
  // [rows, C] buffer, runs the GEMM and logprob_*_segments on them, and after the loss gradient scatters the
  // d(ln_f output) rows back into the zeroed full-size gradient (Backend::scatter_add_rows). logits_chunk_rows
  // then bounds the compact rows of a chunk (whole units, at least one). The results are those of HeadRows::All
  // up to round-off: per-sequence log-probs and statistics are sums over the same rows in the same order (the rows
  // left out add exact zeros); d wte sums fewer (zero) rows, in other groups, so it is not bitwise
  // (tests/test_gpt2_head_compaction.cpp). The weights must be host data for this: `host_weights` below (same values
  // as `weights`, host memory, [B,T] F32 or F64), or `weights` itself when it is host memory (the CPU backend).
  // Neither: the head runs over all slots. Each compacted call uploads its lists and allocates small per-call
  // tensors, which a CUDA graph cannot hold, so the trainer's and the bench's graph paths pass no host weights
  // (their captured heads run over all slots).
  void set_head_rows(HeadRows rows) { head_rows_ = rows; }
  HeadRows head_rows() const { return head_rows_; }
  // Elements of every logits buffer this model holds now, padding included (rows * ldv): the chunk buffer, plus
  // [B,T,ldv] if forward() or sequence_logprobs() was called (memory accounting; tests; train/bench.cpp).
  int64_t logits_buffer_numel() const;

  // Forward only, chunked: seq_logp[b] (=, [B] on the backend's device, the model's dtype) as sequence_logprobs
  // computes it, without the [B,T,V] logits and without keeping anything for a backward pass; seq_stats
  // [B, kSeqStatsWidth] (=, optional) as sequence_logprobs computes it.
  // host_weights: the weights as host data, for compaction (set_head_rows above); undefined: none.
  void score(const Tensor& tokens, const Tensor& keymask, const Tensor& targets, const Tensor& weights,
             const Tensor& seq_logp, const Tensor& seq_stats = Tensor(), const Tensor& host_weights = Tensor());

  // How the loss turns sequence log-probs into dL/dseq_logp, one chunk at a time (host doubles).
  struct LossHead {
    // 0: every sequence is a unit of its own. P > 0: the batch is [chosen 0..P-1, rejected P..2P-1] (B == 2P)
    // and unit q is the pair (q, q + P), so a pair's loss sees both of its log-probs in the same chunk.
    int64_t pair_stride = 0;
    // Called once per chunk, in order, for units [u0, u1): logp holds the log-probs of those units' sequences
    // (entries of later chunks are not yet computed); it must set dseq for exactly those sequences.
    std::function<void(int64_t u0, int64_t u1, const std::vector<double>& logp, std::vector<double>& dseq)> grad;
    Tensor host_weights;  // the weights as host data, for compaction (set_head_rows); undefined: none
  };

  // The training forward: the transformer forward, then per chunk the LM head, the log-probs, head.grad, the
  // log-softmax backward in place and the two LM-head backward GEMMs (d wte += into grads(), d ln_f output kept).
  // Returns seq_logp [B] as host doubles (each rounded through the model's dtype, as sequence_logprobs does).
  // With seq_stats non-null, it is set to the per-sequence statistics as host doubles, [B * kSeqStatsWidth]
  // row-major (kernels/seq_stats.h; taken in the log-prob pass over each chunk, one more copy to the host at the
  // end). fused_backward() then finishes the backward pass (gradients += into grads()).
  std::vector<double> fused_forward(const Tensor& tokens, const Tensor& keymask, const Tensor& targets,
                                    const Tensor& weights, const LossHead& head,
                                    std::vector<double>* seq_stats = nullptr);
  void fused_backward();

  // The preference loss on the device (Backend::preference_loss, kernels/pair_loss.h), for fused_forward_pairs.
  // The batch is [chosen 0..P-1, rejected P..2P-1]; every tensor is on the backend's device, per-sequence ones in
  // grad_dtype(dtype()).
  struct PairLossHead {
    Tensor ref_logp;       // [2P] the reference's summed log-probs; undefined only with RefMode::ReferenceFree
    Tensor offset;         // [P] ODPO offsets (odpo_offset), or undefined (0)
    PairLossParams params;
    double normalizer = 1;  // dL/dlogp is divided by it (the optimizer step's global pair count)
    Tensor sums;           // [kPairSumsWidth] F64 (=): the batch's PairSum row, accumulated chunk by chunk
    Tensor stats;          // [2P, kSeqStatsWidth] (=, optional): the policy's per-sequence statistics
    Tensor pair_loss;      // [P] (=, optional): each pair's weighted loss
    Tensor host_weights;   // the weights as host data, for compaction (set_head_rows); undefined: none
  };
  // fused_forward with the loss on the device: per chunk of pairs, the LM head, the log-probs and statistics, the
  // pairs' loss and dL/dlogp (preference_loss over the chunk's pairs, its sums added to head.sums in pair-chunk
  // order), the log-softmax backward and the LM-head backward GEMMs, all enqueued on the backend's stream: no copy
  // to or from the host and no synchronisation (the host callback of fused_forward costs one of each per chunk).
  // The caller reads head.sums when it needs the metrics. fused_backward() then finishes the backward pass.
  void fused_forward_pairs(const Tensor& tokens, const Tensor& keymask, const Tensor& targets, const Tensor& weights,
                           const PairLossHead& head);

  // --- Batches in another layout (kernels/batch_layout.h: packed rows, prefix sharing) ---------------------------
  // Rows hold several sequences; for a preference batch of P pairs, sequence 2q is pair q's chosen completion and
  // 2q + 1 its rejected one (PairRows::Interleaved), and row r holds the row_pairs[r] pairs that follow those of the
  // rows before it (both sequences of a pair in one row), so chunks of whole rows hold whole, consecutive pairs and
  // their sequences are a contiguous range of the per-sequence arrays.
  struct Layout {
    Tensor pos;   // [R,T] I32 on the backend's device: each slot's position
    Tensor span;  // [R,T,kSpanWidth] I32 on the device: what each slot attends to
    std::vector<int64_t> seg;        // host, [2P * 2]: sequence s's scored slots [seg[2s], seg[2s+1]) (flat, sorted)
    std::vector<int64_t> row_pairs;  // host, [R]: pairs per row
  };
  // The layout of the tokens passed to the next score() and fused_forward_pairs() calls (their keymask is then
  // not used, their per-sequence outputs are [2P] in the interleaved order, and fused_forward_pairs' ref_logp too;
  // its head.params.rows is taken as Interleaved); nullptr returns to one right-padded sequence per
  // row. The layout is copied (its tensors are shared, not copied). Other entry points (forward,
  // sequence_logprobs, fused_forward, decoding) refuse a batch while a layout is set.
  void set_layout(const Layout* layout);
  bool has_layout() const { return layout_.has_value(); }

  // Counts the times the model's activation or logits buffers were reallocated (a batch larger than any before, a
  // larger logits chunk). Work captured with Backend::capture holds their device addresses: captures made before
  // the count last changed must not be replayed. Batches no larger than an earlier one reuse the buffers.
  int64_t buffers_generation() const { return buffers_generation_; }

  static constexpr int64_t kDefaultLogitsChunkRows = 2048;
  static constexpr int64_t kDefaultLogitsChunkBytes = int64_t{512} << 20;

  // Gradient buckets, for overlapping the gradient all-reduce with the backward pass. The ranges (offset, numel)
  // of grads() in the order their gradients become final in a backward pass: ln_f, h.{L-1}, ..., h.0, then
  // wte + wpe (wte last: the embedding backward adds to it after the LM head did). Together they cover grads()
  // exactly once. With a hook set, each backward pass (backward() and fused_backward()) calls it with each range
  // right after that range's last gradient kernel has been enqueued; an empty function removes the hook.
  using GradReadyHook = std::function<void(int64_t offset, int64_t numel)>;
  std::vector<std::pair<int64_t, int64_t>> grad_buckets() const;
  void set_grad_ready_hook(GradReadyHook hook) { grad_hook_ = std::move(hook); }

  // --- Incremental decoding with a key/value cache (sampling, train/sample.h) ----------------------------------
  // The cache holds every layer's keys and values, [B, capacity, C] each in dtype(), with positions per sequence:
  // position p of sequence b holds the k, v of that sequence's token p, so prompts of different lengths share a
  // batch and each keeps positions 0, 1, ... exactly as when run alone (as the full forward does for a right-padded
  // batch). Each step runs the existing ops at M = B rows, plus Backend::attention_decode_forward.
  //
  // decode_prefill: tokens [B,T] I32 on the backend's device, right-padded: row b's tokens are [0, lengths[b]) with
  // 1 <= lengths[b] <= T (lengths: host). Runs the transformer forward over the batch (forward_trunk, no key mask:
  // causal attention keeps padding out of every real position), keeps every layer's k, v of positions [0, T) in a
  // new cache of `capacity` positions per sequence (T <= capacity <= n_positions, else InputError naming
  // n_positions), and returns the logits [B, ldv] of each row's last real token (position lengths[b] - 1), valid
  // until the next decode call. The k, v stored at positions [lengths[b], T) are those of padding; decode_step
  // overwrites each of them before any query reads it (the filled-length rule below).
  const Tensor& decode_prefill(const Tensor& tokens, const std::vector<int64_t>& lengths, int64_t capacity);
  // One token per sequence (host ids in [0, vocab_size), InputError otherwise) at host positions[b], with positions[b]
  // < capacity and positions[b] <= filled(b), the sequence's filled length (lengths[b] after the prefill, then one
  // past its last step), so the cache never has a gap; dpo::Error otherwise. Writes that position's k, v (filled(b)
  // becomes positions[b] + 1) and returns the logits [B, ldv] of the new tokens, valid until the next decode call.
  const Tensor& decode_step(const std::vector<int32_t>& tokens, const std::vector<int64_t>& positions);
  // Keeps the sequences rows[0..n): sequence rows[i] of the current batch becomes sequence i, and the batch shrinks
  // to n, so finished sequences stop costing anything. Each rows[i] must be i itself or >= n (a kept sequence stays
  // where it is or moves into a place that a leaving one frees), so that each sequence's cache is copied at most
  // once and no copy overwrites a sequence still to be moved; dpo::Error otherwise.
  void decode_select(const std::vector<int64_t>& rows);
  void decode_end();  // frees the cache (the prefill's activations stay, as after forward())
  int64_t decode_batch() const;  // sequences in the cache; 0 when there is none
  int64_t decode_capacity() const;
  int64_t decode_filled(int64_t b) const;

 private:
  struct Acts;  // activations kept for the backward pass, sized for the current (B, T)
  void ensure_acts(int64_t B, int64_t T);
  // Up to the ln_f output. after_layer (optional) runs after each block's forward, while its activations are in
  // their buffers (with checkpointing the scratch set is reused by the next segment).
  void forward_trunk(const Tensor& tokens, const Tensor& keymask,
                     const std::function<void(int64_t layer)>& after_layer = nullptr);
  // Block l's forward from acts_->layers[l - 1].res3 (or encoded). ln1_here: run ln_1 here (else the previous
  // block's fused residual + LayerNorm wrote it); finish: the block's last residual add (and, fused, the next
  // LayerNorm), which writes the next block's input.
  void layer_forward(int64_t l, const Tensor& keymask, bool ln1_here, bool finish);
  void backward_trunk();  // from dL/d(ln_f output) in acts_->dln down to the embeddings
  // How the backward writes a buffer's first contribution (Fusions::overwrite_grads).
  GradWrite first_write() const {
    return fusions_.overwrite_grads ? GradWrite::Overwrite : GradWrite::Accumulate;
  }
  void check_head_args(const Tensor& targets, const Tensor& weights) const;
  // Sequence ranges of each chunk: {first sequence, count, first row of the chunk buffer / T}.
  struct Range {
    int64_t seq0, nseq, slot;
    int64_t row0 = 0, nrow = 0;  // the compacted head's compact rows of these sequences (HeadPlan)
  };
  std::vector<std::vector<Range>> plan_chunks(int64_t B, int64_t T, int64_t pair_stride);
  Tensor chunk_logits(int64_t rows);  // a [rows, ldv] view of the chunk buffer, grown when needed
  // LM head and log-probs of the sequences of `r` into logits [nseq, T, ldv] and seq_logp[r.seq0 ...] (=), and
  // rows r.seq0 ... of seq_stats [B, kSeqStatsWidth] (=) when it is defined.
  void head_forward(const Range& r, const Tensor& logits, const Tensor& seq_logp, const Tensor& seq_stats,
                    const Tensor& targets, const Tensor& weights);
  void check_tokens(const Tensor& tokens) const;
  // The layout path of score() and fused_forward_pairs(): chunks of whole rows (at least one, at most
  // logits_chunk_rows slots when more than one), each with its pairs; the chunks' sequence ranges relative to their
  // first slots, uploaded once per call. `head` null: forward only (score).
  struct RowChunk {
    int64_t r0, nr, q0, nq;
  };
  std::vector<RowChunk> plan_row_chunks(int64_t R, int64_t T) const;
  // The compacted head (HeadRows::Scored) of one call, planned on the host: chunks of ranges of sequences (each
  // Range's row0 / nrow: its compact rows, [row0, row0 + nrow) of idx), the scored slots in compact-row order
  // (idx, flat slots b*T + t) and each sequence's compact rows relative to its Range's row0 (seg [S, 2]).
  struct HeadPlan {
    std::vector<std::vector<Range>> chunks;
    std::vector<int32_t> idx, seg;
  };
  // The plan when compaction applies (HeadRows::Scored and host weights: `host_weights`, or `weights` when it is
  // host memory), else nullopt. pair_stride as in LossHead (padded batches; a layout's chunks are whole rows).
  std::optional<HeadPlan> plan_scored(const Tensor& weights, const Tensor& host_weights, int64_t pair_stride) const;
  // The compacted chunk loop: per chunk, gather the scored ln_f rows, the LM-head GEMM, logprob_forward_segments
  // into seq / stats per Range; with dseq defined also chunk_grad(ranges) (which sets dseq of the chunk's
  // sequences), logprob_backward_segments, the two backward GEMMs (d wte +=) and the scatter of d(ln_f output)
  // rows into acts_->dln (which the caller zeroed).
  void compact_head(const HeadPlan& plan, const Tensor& targets, const Tensor& weights, const Tensor& seq,
                    const Tensor& stats, const Tensor& dseq,
                    const std::function<void(const std::vector<Range>&)>& chunk_grad);
  void layout_head(const Tensor& targets, const Tensor& weights, const Tensor& seq, const Tensor& stats,
                   const PairLossHead* head, const HeadPlan* plan);
  std::optional<Layout> layout_;
  // The chunk loop of fused_forward and fused_forward_pairs: per chunk, head_forward into seq_dev / stats_dev,
  // then chunk_grad(ranges) sets dseq_dev for the chunk's sequences, then the log-softmax and LM-head backward.
  // With `plan`, the compacted loop (compact_head) instead.
  void fused_head(const Tensor& targets, const Tensor& weights, int64_t pair_stride, const Tensor& seq_dev,
                  const Tensor& stats_dev, const Tensor& dseq_dev,
                  const std::function<void(const std::vector<Range>&)>& chunk_grad, const HeadPlan* plan);

  // --- the Llama family (gpt2.h top) ---
  bool llama() const { return cfg_.arch == Arch::Llama; }
  std::string embed_name() const;                // wte.weight / embed_tokens.weight
  std::string layer_prefix(int64_t l) const;     // "h.<l>." / "layers.<l>."
  std::string first_layer_param(int64_t l) const;  // the first spec of layer l (ln_1 / input_layernorm weight)
  std::string final_norm_name() const;           // ln_f.weight / norm.weight
  Tensor head_weight() const;  // the LM head's [V, C]: the embedding when tied, else lm_head.weight
  Tensor head_grad() const;
  void build_rope_tables();  // rope_cos_, rope_sin_ [max_seq_len, D/2] in grad_dtype(dtype())
  Tensor rope_positions() const;  // [B*T] I32: the layout's pos, else t for every (b, t)
  void layer_forward_llama(int64_t l, const Tensor& keymask, bool ln1_here, bool finish);
  void layer_backward_llama(int64_t l);
  void decode_step_llama(const Tensor& tok, const Tensor& pos);
  Tensor rope_cos_, rope_sin_;

  Backend* be_;
  GPT2Config cfg_;
  DType dtype_;
  std::vector<ParamSpec> specs_;
  DType gdtype_;
  Tensor params_, master_, grads_;
  bool master_sharded_ = false;
  Fusions fusions_;
  int64_t ckpt_interval_ = 0;  // set_gradient_checkpointing
  GradReadyHook grad_hook_;
  int64_t master_begin_ = 0;
  std::shared_ptr<Acts> acts_;
  std::vector<Tensor> act_pool_;  // the buffers acts_ views (ensure_acts); they only grow
  int64_t buffers_generation_ = 0;
  Tensor tokens_, keymask_, targets_, weights_;  // inputs of the last sequence_logprobs, for backward
  int64_t chunk_rows_ = kDefaultLogitsChunkRows;
  int64_t chunk_bytes_ = kDefaultLogitsChunkBytes;
  int64_t head_rows_limit() const {  // the rows a chunk may hold (set_logits_chunk_bytes)
    return chunk_rows_within(chunk_rows_, chunk_bytes_, cfg_.vocab_size, dtype_);
  }
  void set_chunk_limits(int64_t rows, int64_t bytes);
  Tensor chunk_;           // the chunked LM head's logits buffer
  HeadRows head_rows_ = HeadRows::Scored;
  Tensor compact_ln_, compact_dln_;  // the compacted head's [rows, C] gathered ln_f rows and their gradient
  Tensor compact_rows(int64_t rows, int which);  // a [rows, C] view of compact_ln_ (0) or compact_dln_ (1), grown
  bool head_done_ = false;  // fused_forward ran; fused_backward may follow
  struct Decode;  // the key/value cache and the [B, ...] activations of one decoding step
  std::shared_ptr<Decode> dec_;
  Tensor decode_cache(int64_t layer, int kv) const;  // layer's keys (kv 0) or values (kv 1), [B, capacity, C]
};

}  // namespace dpo
