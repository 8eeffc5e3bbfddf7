// The memory model of a DPO training step: the bytes each device holds at the step's peak, as named terms, from
// the model shape and the run's settings. It mirrors what the code allocates (GPT2's parameter, gradient and
// activation buffers, model/gpt2.cpp ensure_acts; the chunked LM head; AdamW's moments, train/optim.h; the
// reference model) and depends on no backend: the one backend-specific input, the attention's saved state, is
// a parameter. `dpo plan` (tools/dpo_main.cpp) prints it for a config; tests/test_memory_plan.cpp checks it against
// the CPU backend's measured peak (host_memory_stats, runtime/tensor.h).
//
// Not counted: per-sequence tensors of a step (O(pairs) elements), the host side (data, tokenizer), memory that
// ops allocate inside themselves (CPU: std::vector scratch, BLAS; CUDA: cuBLAS/cuDNN workspaces, which the
// `device_reserve` term stands for as an allowance).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/gpt2.h"

namespace dpo {

// What attention_forward saves per block for its backward (Backend::attention_saved_shape).
enum class AttentionSaved {
  RowStats,       // the CPU backend's flash form: [B*NH*T + B*T] (log-sum-exp and key mask), F32 under BF16
  Probabilities,  // the CUDA backend: [B,NH,T,T] probabilities in the activation dtype
};

enum class ReferencePlan {
  None,    // reference_free
  Cached,  // precomputed log-probs: the reference model is freed before training
  Live,    // a second model scores every micro-batch
};

struct MemoryPlanInput {
  GPT2Config model;
  DType dtype = DType::F32;  // the policy's (and a live reference's) compute dtype: F32, F64 or BF16
  int64_t pairs = 1;         // preference pairs per micro-batch
  int64_t rows = 2;          // token rows of a micro-batch (padded: 2 * pairs; a layout: its rows)
  int64_t T = 1;             // slots per row
  bool pair_rows = true;     // padded pairs: the LM head's unit is a pair of rows (2T slots); a layout: one row
  int64_t logits_chunk_rows = GPT2::kDefaultLogitsChunkRows;
  int64_t logits_chunk_bytes = GPT2::kDefaultLogitsChunkBytes;  // GPT2::set_logits_chunk_bytes
  bool compact_head = true;  // HeadRows::Scored with host weights: the head's two gathered [rows, C] buffers
  int64_t checkpoint_interval = 0;  // GPT2::set_gradient_checkpointing (0: off)
  ReferencePlan reference = ReferencePlan::Cached;
  int64_t ranks = 1;
  bool zero1 = false;  // ZeRO-1 across `ranks`: AdamW moments (and, BF16, the master weights) sharded
  AttentionSaved attention = AttentionSaved::RowStats;
  int64_t device_reserve = 0;  // bytes: the CUDA context and library workspaces (an allowance; 0 on the CPU)
  // The CPU backend runs BF16 ops on F32 copies of their operands (runtime/backend.h): at most three [B,T,4C] F32
  // tensors live inside one op for GPT-2, five [B,T,I] for the Llama family (SwiGLU's backward) (measured:
  // tests/test_memory_plan.cpp). True: count them (CPU and BF16 only).
  bool f32_op_copies = false;
};

struct MemoryTerm {
  std::string name;
  int64_t bytes = 0;
  std::string note;  // what it is, how it scales, which key reduces it
};

struct MemoryPlan {
  std::vector<MemoryTerm> terms;
  int64_t total = 0;
  // The activation terms together (blocks, attention state, embeddings / ln_f / scratch, backward scratch): what
  // checkpointing changes.
  int64_t activations = 0;
  const MemoryTerm& largest() const;
};

// Throws dpo::Error for sizes < 1 or a dtype other than F32, F64, BF16.
MemoryPlan plan_memory(const MemoryPlanInput& in);

// The activation bytes of one GPT2 (policy or reference) for a [rows, T] batch: exactly what ensure_acts
// allocates (model/gpt2.cpp), split into {blocks without attention state, attention state, the rest}.
struct ActivationBytes {
  int64_t blocks = 0, attention = 0, other = 0, backward_scratch = 0;
  int64_t total() const { return blocks + attention + other + backward_scratch; }
};
ActivationBytes activation_bytes(const GPT2Config& cfg, DType dtype, int64_t rows, int64_t T, int64_t interval,
                                 AttentionSaved attention);

// "80GiB", "80 GB", "512MiB", "1.5TiB", "1000000" (bytes): binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB,
// TB) units, case-insensitive. Throws InputError naming `what` for anything else or a value below 1 byte.
int64_t parse_bytes(const std::string& text, const std::string& what);
std::string format_bytes(int64_t bytes);  // "1.23 GiB", "512.0 MiB", "12 B"

}  // namespace dpo
