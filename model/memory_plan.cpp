#include "model/memory_plan.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>

#include "kernels/batch_layout.h"

namespace dpo {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

const MemoryTerm& MemoryPlan::largest() const {
  DPO_ASSERT(!terms.empty(), "MemoryPlan::largest: no terms");
  return *std::max_element(terms.begin(), terms.end(),
                           [](const MemoryTerm& a, const MemoryTerm& b) { return a.bytes < b.bytes; });
}

ActivationBytes activation_bytes(const GPT2Config& cfg, DType dtype, int64_t rows, int64_t T, int64_t interval,
                                 AttentionSaved attention) {
  const int64_t a = dtype_size(dtype), s = dtype_size(grad_dtype(dtype));
  const int64_t C = cfg.n_embd, NH = cfg.n_head, L = cfg.n_layer, BT = rows * T;
  // One block's buffers (ensure_acts): ln1, qkv, atty, res2, ln2, fch, fch_gelu, res3 = 16 C activations and four
  // LayerNorm statistics per slot, plus the attention's saved state.
  const int64_t block_res3 = BT * C * a;
  int64_t block = BT * (16 * C * a + 4 * s);
  // Llama: ln1, qkv [W], its expansion [3C] when n_kv_head < n_head, atty, res2, ln2, gate|up [2I], SwiGLU [I], res3
  // and two RMSNorm statistics (rstd only) per slot.
  const bool llama = cfg.arch == Arch::Llama;
  const int64_t W = cfg.qkv_width(), I = cfg.mlp_width();
  const bool expand = llama && cfg.kv_heads() != NH;
  if (llama) block = BT * ((5 * C + W + (expand ? 3 * C : 0) + 3 * I) * a + 2 * s);
  const int64_t att = attention == AttentionSaved::RowStats
                          ? (rows * NH * T + rows * T) * (dtype == DType::BF16 ? 4 : a)
                          : rows * NH * T * T * a;
  ActivationBytes out;
  const int64_t n = interval > 0 ? std::min(interval, L) : 0;
  if (n == 0) {
    out.blocks = L * block;
    out.attention = L * att;
  } else {
    // n scratch blocks (the last without res3) plus one kept [rows, T, C] output per segment.
    out.blocks = n * block - block_res3 + ceil_div(L, n) * block_res3;
    out.attention = n * att;
  }
  out.other = BT * (3 * C * a + 2 * s);  // encoded, ln_f output and statistics, the c_proj scratch
  out.backward_scratch = BT * 14 * C * a;  // dres, dln, dqkv, datty, dfch, dfch_gelu
  if (llama) {
    out.other = BT * (3 * C * a + s + 4);  // encoded, the final norm's output and rstd, the o/down scratch, positions
    // dres, dln, dqkv [3C], datty, gate|up [2I], SwiGLU [I], d(compact qkv) [W] when expanded
    out.backward_scratch = BT * (6 * C + 3 * I + (expand ? W : 0)) * a;
  }
  return out;
}

MemoryPlan plan_memory(const MemoryPlanInput& in) {
  DPO_ASSERT(in.dtype == DType::F32 || in.dtype == DType::F64 || in.dtype == DType::BF16,
             std::string("plan_memory: dtype must be F32, F64 or BF16, got ") + dtype_name(in.dtype));
  DPO_ASSERT(in.pairs >= 1 && in.rows >= 1 && in.T >= 1 && in.logits_chunk_rows >= 1 && in.logits_chunk_bytes >= 1 &&
                 in.ranks >= 1 && in.checkpoint_interval >= 0 && in.device_reserve >= 0,
             "plan_memory: sizes must be positive");
  const GPT2Config& m = in.model;
  const int64_t N = m.num_parameters();
  const int64_t a = dtype_size(in.dtype), gs = dtype_size(grad_dtype(in.dtype));
  const bool bf16 = in.dtype == DType::BF16;
  const int64_t share = in.zero1 && in.ranks > 1 ? ceil_div(N, in.ranks) : N;
  const std::string zero_note = in.zero1 && in.ranks > 1 ? " (ZeRO-1: 1/" + std::to_string(in.ranks) + ")" : "";
  MemoryPlan p;
  auto add = [&](std::string name, int64_t bytes, std::string note) {
    p.terms.push_back({std::move(name), bytes, std::move(note)});
  };
  add("weights", N * a, std::to_string(N) + " parameters in " + dtype_name(in.dtype));
  // Llama: the rotary cos / sin tables [n_positions, head_dim / 2] each, in the statistics dtype (GPT2 builds them).
  const int64_t rope = m.arch == Arch::Llama ? 2 * m.max_seq_len * (m.head_dim() / 2) * gs : 0;
  if (rope > 0) add("rotary tables", rope, "cos and sin [n_positions, head_dim/2]");
  if (bf16) add("master weights", share * 4, "F32 copy the optimizer updates" + zero_note);
  add("gradients", N * gs, std::string("one flat ") + dtype_name(grad_dtype(in.dtype)) + " vector");
  // AdamW (train/optim.h): m and v in F32 (F64 for an F64 model) over this rank's share.
  add("AdamW moments", 2 * share * (in.dtype == DType::F64 ? 8 : 4), "m and v" + zero_note);
  if (in.zero1 && in.ranks > 1 && bf16)
    add("ZeRO-1 gather buffers", (in.ranks + 1) * share * 2, "BF16 all-gather of the updated ranges");

  const ActivationBytes act =
      activation_bytes(m, in.dtype, in.rows, in.T, in.checkpoint_interval, in.attention);
  const std::string ck = in.checkpoint_interval > 0
                             ? "gradient_checkpointing interval " + std::to_string(in.checkpoint_interval) +
                                   ": one segment's blocks live, one [B,T,C] input kept per segment"
                             : "every block kept for the backward; gradient_checkpointing: true reduces it";
  add("activations: blocks", act.blocks, ck);
  add("activations: attention saved state", act.attention,
      in.attention == AttentionSaved::RowStats ? "per-row log-sum-exp and key mask per live block"
                                               : "[B,NH,T,T] probabilities per live block (grows with T^2)");
  add("activations: embeddings, ln_f, scratch", act.other, "[B,T,C] embeddings, ln_f output, c_proj scratch");
  add("backward scratch", act.backward_scratch,
      m.arch == Arch::Llama ? "the blocks' gradient buffers (6 [B,T,C], 3 [B,T,I] wide), reused by every block"
                            : "14 [B,T,C]-wide gradient buffers, reused by every block");
  p.activations = act.total();

  // The chunked LM head (GPT2::plan_chunks / plan_row_chunks): whole units of 2T slots (a pair of padded rows) or
  // one row, as many as logits_chunk_rows holds, at least one; the compacted head's two [rows, C] buffers bound by
  // the same rows.
  const int64_t unit = in.pair_rows ? 2 * in.T : in.T;
  const int64_t units = in.pair_rows ? in.pairs : in.rows;
  const int64_t rows_max = GPT2::chunk_rows_within(in.logits_chunk_rows, in.logits_chunk_bytes, m.vocab_size, in.dtype);
  const int64_t chunk = std::min(units, std::max<int64_t>(1, rows_max / unit)) * unit;
  const int64_t ldv = GPT2::logits_stride(m.vocab_size);
  const int64_t head = chunk * ldv * a + (in.compact_head ? 2 * chunk * m.n_embd * a : 0);
  add("LM-head chunk", head, std::to_string(chunk) + " logits rows x " + std::to_string(ldv) +
                                 " columns (+ gathered rows); logits_chunk_rows or logits_chunk_bytes reduces it");
  if (in.reference == ReferencePlan::Live) {
    const int64_t ref_w = N * (a + gs + (bf16 ? 4 : 0)) + rope;
    add("reference model", ref_w,
        "a second model's weights (and, as every GPT2, its gradient buffer); precompute_ref_log_probs: true frees it");
    const ActivationBytes ra =
        activation_bytes(m, in.dtype, in.rows, in.T, in.checkpoint_interval, in.attention);
    add("reference activations", ra.total() + head, "its forward's buffers and LM-head chunk, kept between steps");
  }
  const int64_t slot_bytes = 12 + gs + (in.pair_rows ? 0 : 4 + kSpanWidth * 4);
  add("batch inputs", in.rows * in.T * slot_bytes, "tokens, key mask, targets, weights (and positions, spans)");
  if (in.f32_op_copies && bf16)
    // GPT-2: the GELU's three [B,T,4C]; Llama: swiglu_backward's dinp [B,T,2I], dout [B,T,I] and inp [B,T,2I]
    // (measured: tests/test_memory_plan.cpp).
    add("op workspace", in.rows * in.T * (m.arch == Arch::Llama ? 5 * m.mlp_width() : 12 * m.n_embd) * 4,
        "the CPU's bf16 ops: F32 copies of one op's operands");
  if (in.device_reserve > 0)
    add("device reserve", in.device_reserve, "CUDA context, cuBLAS/cuDNN workspaces, allocator slack (allowance)");
  for (const MemoryTerm& t : p.terms) p.total += t.bytes;
  return p;
}

int64_t parse_bytes(const std::string& text, const std::string& what) {
  auto bad = [&]() -> int64_t {
    throw InputError(what + ": expected a size such as 80GiB, 80GB or 512MiB, got '" + text + "'");
  };
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  size_t j = i;
  while (j < text.size() && (std::isdigit(static_cast<unsigned char>(text[j])) || text[j] == '.')) ++j;
  if (j == i) return bad();
  double v = 0;
  try {
    size_t used = 0;
    v = std::stod(text.substr(i, j - i), &used);
    if (used != j - i) return bad();
  } catch (const std::exception&) {
    return bad();
  }
  std::string unit;
  for (size_t k = j; k < text.size(); ++k)
    if (!std::isspace(static_cast<unsigned char>(text[k])))
      unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[k])));
  double scale = 0;
  const std::pair<const char*, double> units[] = {
      {"", 1},           {"b", 1},           {"kib", 1024.0},   {"mib", 1048576.0}, {"gib", 1073741824.0},
      {"tib", 1099511627776.0}, {"kb", 1e3},  {"mb", 1e6},       {"gb", 1e9},        {"tb", 1e12}};
  for (const auto& [name, s] : units)
    if (unit == name) scale = s;
  if (scale == 0) return bad();
  const double bytes = v * scale;
  if (!(bytes >= 1) || bytes > 9.0e18) return bad();
  return static_cast<int64_t>(std::llround(bytes));
}

std::string format_bytes(int64_t bytes) {
  char buf[64];
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", b / 1073741824.0);
  else if (bytes >= (int64_t{1} << 20)) std::snprintf(buf, sizeof buf, "%.1f MiB", b / 1048576.0);
  else if (bytes >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  else std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  return buf;
}

}  // namespace dpo
