// `dpo bench`: times full DPO optimizer steps on a random-init GPT-2 and synthetic preference pairs.
//
// Phases: batch_and_zero (make_batch, zeroing the step and model gradients), reference_forward (live only),
// policy_forward_fused_head (the transformer forward, then per chunk of pairs the LM head, log-probs, the pairs'
// loss gradients and the LM-head backward: GPT2::fused_forward), loss (the batch's loss and metrics from the
// log-probs), backward (the rest of the backward, and adding into the step gradient), optimizer, other.
//
// One timed step is what run_training does for one micro-batch step (train/trainer.cpp): make_batch, zero the
// step's gradient and the model's, [live reference forward], the policy's fused forward (sigmoid loss, beta 0.1,
// logits in chunks of logits_chunk_rows rows), the backward, accumulate into the step gradient, AdamW step
// (default OptimConfig: lr 5e-7, max_grad_norm 1). The precomputed reference's log-probs are fixed random numbers
// (no reference forward).
//
// Workload lengths: the workload's prompt / chosen / rejected token counts for every pair (--length-spread none),
// or those means times entries of a fixed log-normal quantile table (sigma 0.4, mean 1; lognormal), different
// entries for the prompt and the two completions of a pair; tools/bench_torch.py builds the same lengths. Rows
// are right-padded to the batch's longest. Token ids are uniform random in [0, vocab) from a seeded Rng.
//
// Phases are timed on the host with std::chrono::steady_clock. On the CPU there is no asynchrony, so that is
// exact; on CUDA the backend is synchronize()d at every phase boundary (host-timed with syncs, not CUDA events).
//
// Each phase is also an NVTX range of the same name (kernel launchers open their own inside it).
//
// On CUDA the timed steps run inside a profiler capture range (cudaProfilerStart before the first, cudaProfilerStop
// after the last; runtime/kernel_trace.h), so `nsys profile --capture-range=cudaProfilerApi` and
// `ncu --profile-from-start off` see the steady state only (docs/profiling.md).
//
// --kernels (cuda only): GPU time per kernel over the timed steps, from CUPTI's activity records (each kernel's
// start and end on the GPU; memory copies and sets as rows of their own): printed after the phases and written to
// the JSON as "kernels" (rows, largest first) and "kernel_trace" (status, totals, GPU busy fraction). The step times
// of such a run include CUPTI's per-launch overhead. When CUPTI cannot start at run time, the bench runs on without
// the table and says why (kernel_trace.status "unavailable", kernel_trace.error).
//
// FLOPs per step (docs: ../shared/REFERENCE.md): 12*P*T*(N + L*d*T) with precomputed reference log-probs,
// 16*P*T*(N + L*d*T) with a live reference; P pairs, T the mean real length of the 2P rows, N = parameters
// including the (tied) LM head (GPT2Config::num_parameters(), which also counts wpe), L layers, d width.
// These are the useful FLOPs: padding to the batch's longest row is not counted.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/gpt2.h"

namespace dpo {

struct BenchOptions {
  std::string shape = "small";  // tiny | small | gpt2-124m | gpt2-350m | llama-tiny | smollm-135m | smollm-360m |
                                // qwen2-0.5b | llama-1b
  std::string workload = "hh";         // hh | tldr | long | custom
  int64_t prompt_len = 0, chosen_len = 0, rejected_len = 0;  // custom only (all > 0)
  int64_t pairs = 1;
  std::string length_spread = "none";  // none | lognormal (a fixed log-normal quantile table; bench.cpp)
  int64_t steps = 5;                   // timed steps
  int64_t warmup = 1;                  // untimed steps before them
  std::string reference = "precomputed";  // precomputed | live
  std::string device = "cpu";          // cpu | cuda
  int threads = 0;                     // CPU threads; 0 = OpenMP default
  double peak_tflops = -1;             // < 0: default (989 on cuda, none on cpu)
  int64_t logits_chunk_rows = GPT2::kDefaultLogitsChunkRows;  // as the training config key
  // --gradient-checkpointing N: activation recomputation with N blocks per segment (GPT2::set_gradient_checkpointing,
  // the training keys gradient_checkpointing / gradient_checkpointing_interval); 0 = off.
  int64_t gradient_checkpointing = 0;
  std::string precision = "fp32";  // fp32 | bf16 (as the training config key)
  uint64_t seed = 1234;
  std::string json_path;               // write the JSON here when non-empty
  std::string command_line;            // recorded in the JSON
  bool print_table = true;
  bool kernels = false;                // --kernels: per-kernel GPU time table (CUPTI; --device cuda only)
  // --cuda-graphs on|off: as the training key cuda_graphs, the policy's forward, loss and backward of the step is
  // captured once (after the warm-up's first step) and replayed; the policy_forward_fused_head phase then holds the
  // backward too. Ignored on the CPU.
  bool cuda_graphs = true;
  // --batch-layout padded|packed|prefix_shared and --max-tokens-per-row (0: twice the longest pair's padded row), as
  // the training keys batch_layout and max_tokens_per_row. Tokens per second count the pairs' real tokens
  // (2 * prompt + chosen + rejected) in every layout, so layouts compare on the same work.
  std::string batch_layout = "padded";
  int64_t max_tokens_per_row = 0;
  // --head-compaction on|off: the LM head over the scored slots only (HeadRows::Scored, model/gpt2.h) or over every
  // slot (HeadRows::All). With CUDA graphs on the captured step runs over every slot either way (the per-batch
  // upload of the scored slots cannot be captured).
  bool head_compaction = true;
  // --attn-implementation eager|flash: the backend's attention kernels for the full-step bench, as the training key
  // attn_implementation (flash: --device cuda --precision bf16 only).
  std::string attn_implementation = "eager";
  // --attention-only: time causal attention alone instead of DPO steps (run_attention_bench below).
  bool attention_only = false;
  std::vector<int64_t> seq_lens = {256, 512, 1024, 2048};  // --seq-lens
  int64_t attn_batch = 8;      // --attn-batch: B
  int64_t attn_heads = 12;     // --attn-heads: H
  int64_t attn_head_dim = 64;  // --attn-head-dim: d (flash: 64 or 128)
  // Test hook: called with the policy right before the first timed step (after = false) and after the last one
  // (after = true).
  std::function<void(const GPT2& policy, bool after)> inspect;
};

// The shape's GPT2Config; InputError naming --shape for an unknown name.
GPT2Config bench_shape(const std::string& name);

// Validates the options (InputError naming the flag), runs the benchmark, prints the table (print_table), writes
// json_path, and returns the JSON document (schema "dpo-bench-1").
nlohmann::json run_bench(const BenchOptions& opt);

// The readable table for a run_bench result.
std::string format_bench_table(const nlohmann::json& r);

// `dpo bench --attention-only` (run_bench calls it when attention_only is set): the backend's attention ops alone on
// a packed qkv [B, T, 3 H d] (GPT-2's layout; no key mask), BF16, causal, at each T of seq_lens: the forward
// (attention_forward) and the forward + backward (attention_forward then attention_backward, dqkv +=), each timed
// over `steps` runs after `warmup` untimed ones (at least one), median reported. Implementations: on CUDA eager
// (the materialised kernels) and flash (kernels/flash_attention.h); on the CPU the eager one only, the blocked CPU
// kernels (so the bench and its JSON are testable without a GPU). CUDA runs are timed with CUDA events around each
// run on the backend's stream; CPU runs with steady_clock. FLOPs follow flash-attention's convention, as
// tools/bench_torch.py --attention-only: forward 4 B H T^2 d / 2 (causal), backward 2.5x forward, so forward +
// backward counts 3.5x. Inputs N(0, 1) from the seed, the same for both implementations. A shape an implementation
// refuses (e.g. flash with a head dim other than 64 or 128) is a row with "error" instead of times.
// JSON: schema "dpo-bench-attention-1", the run's settings, and "results": one row per (T, implementation) with T,
// implementation, forward_s, forward_backward_s, backward_s (the difference), their per-run times, forward_tflops,
// forward_backward_tflops.
nlohmann::json run_attention_bench(const BenchOptions& opt);

}  // namespace dpo
