#include "model/gpt2.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

#include "runtime/trace_range.h"

namespace dpo {

void GPT2Config::validate(const std::string& where) const {
  auto positive = [&](int64_t v, const char* field) {
    if (v <= 0) throw InputError(where + ": " + field + " must be positive, got " + std::to_string(v));
  };
  positive(max_seq_len, "n_positions");
  positive(vocab_size, "vocab_size");
  positive(n_layer, "n_layer");
  positive(n_head, "n_head");
  positive(n_embd, "n_embd");
  if (n_embd % n_head != 0)
    throw InputError(where + ": n_embd (" + std::to_string(n_embd) + ") is not divisible by n_head (" +
                     std::to_string(n_head) + ")");
  if (vocab_size > INT32_MAX) throw InputError(where + ": vocab_size does not fit in int32 token ids");
  if (arch == Arch::Llama) {
    if (n_kv_head < 0) throw InputError(where + ": num_key_value_heads must be positive, got " + std::to_string(n_kv_head));
    if (intermediate_size < 0)
      throw InputError(where + ": intermediate_size must be positive, got " + std::to_string(intermediate_size));
    if (n_head % kv_heads() != 0)
      throw InputError(where + ": num_attention_heads (" + std::to_string(n_head) +
                       ") is not a multiple of num_key_value_heads (" + std::to_string(kv_heads()) + ")");
    if (head_dim() % 2 != 0)
      throw InputError(where + ": the head dimension hidden_size / num_attention_heads (" + std::to_string(head_dim()) +
                       ") must be even for rotary embeddings");
    if (!(rope_theta > 0) || !std::isfinite(rope_theta))
      throw InputError(where + ": rope_theta must be a positive finite number");
    if (rope_scaling.enabled()) {
      const RopeScaling& r = rope_scaling;
      if (!std::isfinite(r.factor) || !(r.low_freq_factor > 0) || !(r.high_freq_factor > r.low_freq_factor) ||
          !std::isfinite(r.high_freq_factor) || r.original_max_position_embeddings <= 0)
        throw InputError(where + ": rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                                 "original_max_position_embeddings > 0");
    }
  }
  if (!(ln_eps > 0) || !std::isfinite(ln_eps))
    throw InputError(where + ": layer_norm_epsilon must be a positive finite number");
  // An impossible size is an input error, not an overflow or a failed allocation later: at most 2^40 parameters
  // (4 TiB of fp32 weights, 16 TiB with gradients and AdamW moments: beyond any one machine; GPT-2 XL has
  // 1.6e9). Computed in long double so that the check itself cannot overflow.
  const long double C = static_cast<long double>(n_embd);
  long double n = static_cast<long double>(vocab_size) * C + static_cast<long double>(max_seq_len) * C +
                  static_cast<long double>(n_layer) * (12.0L * C * C + 13.0L * C) + 2.0L * C;
  if (arch == Arch::Llama) {
    const long double W = static_cast<long double>(n_head + 2 * kv_heads()) * static_cast<long double>(head_dim());
    const long double I = static_cast<long double>(mlp_width());
    n = static_cast<long double>(vocab_size) * C * (tied_head() ? 1.0L : 2.0L) + C +
        static_cast<long double>(n_layer) * (C * W + W + C * C + 2.0L * C + 3.0L * C * I);
  }
  constexpr long double kMaxParams = 1099511627776.0L;  // 2^40
  if (n > kMaxParams) {
    std::ostringstream m;
    m.precision(3);
    m << where << ": n_layer " << n_layer << ", n_embd " << n_embd << ", vocab_size " << vocab_size
      << " and n_positions " << max_seq_len << " make " << static_cast<double>(n)
      << " parameters; at most 2^40 (1.1e12) are supported";
    throw InputError(m.str());
  }
}

int64_t GPT2Config::num_parameters() const {
  const int64_t C = n_embd;
  if (arch == Arch::Llama) {
    const int64_t W = qkv_width(), I = mlp_width();
    return vocab_size * C * (tied_head() ? 1 : 2) + C +
           n_layer * (C * W + (attention_bias ? W : 0) + C * C + 2 * C + 3 * C * I);
  }
  return vocab_size * C + max_seq_len * C + n_layer * (12 * C * C + 13 * C) + 2 * C;
}

Fusions Fusions::parse(const std::string& spec) {
  if (spec.empty()) return defaults();
  if (spec == "all") return all();
  if (spec == "none") return none();
  Fusions f = none();
  std::stringstream in(spec);
  std::string name;
  while (std::getline(in, name, ',')) {
    if (name == "residual_layernorm") f.residual_layernorm = true;
    else if (name == "overwrite_grads") f.overwrite_grads = true;
    else if (name == "gelu_epilogue") f.gelu_epilogue = true;
    else
      throw InputError("DPO_FUSIONS: unknown fusion '" + name + "' in '" + spec +
                       "'; expected all, none, or a comma-separated list of residual_layernorm, overwrite_grads, "
                       "gelu_epilogue");
  }
  return f;
}

const Fusions& Fusions::from_env() {
  static const Fusions f = [] {
    const char* v = std::getenv("DPO_FUSIONS");
    return parse(v ? std::string(v) : std::string());
  }();
  return f;
}

std::vector<ParamSpec> gpt2_param_specs(const GPT2Config& cfg) {
  const int64_t C = cfg.n_embd;
  std::vector<ParamSpec> s;
  int64_t off = 0;
  auto add = [&](std::string name, Shape shape, bool decay) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    s.push_back({std::move(name), std::move(shape), off, decay});
    off += n;
  };
  if (cfg.arch == Arch::Llama) {
    // HF LlamaForCausalLM's order and names without "model."; q|k|v and gate|up concatenated, dense weights in
    // the [in, out] layout (WeightLayout::InOut) as GPT-2's, lm_head [V, C] (OutIn) as the tied embedding.
    const int64_t W = cfg.qkv_width(), I = cfg.mlp_width();
    add("embed_tokens.weight", {cfg.vocab_size, C}, true);
    for (int64_t l = 0; l < cfg.n_layer; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      add(p + "input_layernorm.weight", {C}, false);
      add(p + "self_attn.qkv_proj.weight", {C, W}, true);
      if (cfg.attention_bias) add(p + "self_attn.qkv_proj.bias", {W}, false);
      add(p + "self_attn.o_proj.weight", {C, C}, true);
      add(p + "post_attention_layernorm.weight", {C}, false);
      add(p + "mlp.gate_up_proj.weight", {C, 2 * I}, true);
      add(p + "mlp.down_proj.weight", {I, C}, true);
    }
    add("norm.weight", {C}, false);
    if (!cfg.tied_head()) add("lm_head.weight", {cfg.vocab_size, C}, true);
    return s;
  }
  add("wte.weight", {cfg.vocab_size, C}, true);
  add("wpe.weight", {cfg.max_seq_len, C}, true);
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    add(p + "ln_1.weight", {C}, false);
    add(p + "ln_1.bias", {C}, false);
    add(p + "attn.c_attn.weight", {C, 3 * C}, true);
    add(p + "attn.c_attn.bias", {3 * C}, false);
    add(p + "attn.c_proj.weight", {C, C}, true);
    add(p + "attn.c_proj.bias", {C}, false);
    add(p + "ln_2.weight", {C}, false);
    add(p + "ln_2.bias", {C}, false);
    add(p + "mlp.c_fc.weight", {C, 4 * C}, true);
    add(p + "mlp.c_fc.bias", {4 * C}, false);
    add(p + "mlp.c_proj.weight", {4 * C, C}, true);
    add(p + "mlp.c_proj.bias", {C}, false);
  }
  add("ln_f.weight", {C}, false);
  add("ln_f.bias", {C}, false);
  return s;
}

struct GPT2::Acts {
  int64_t B = 0, T = 0;
  Tensor encoded;  // [B,T,C]
  struct Layer {
    Tensor ln1, ln1_mean, ln1_rstd, qkv, atty, att, res2, ln2, ln2_mean, ln2_rstd, fch, fch_gelu, res3;
    // Llama: qkv is the compact [B,T,(NH + 2 KV) D] projection, rotated in place; qkvx its grouped-query expansion
    // [B,T,3C] that the attention reads (qkv itself when KV == NH); fch the gate|up [B,T,2I], fch_gelu the SwiGLU
    // output [B,T,I]. The norms' *_mean are undefined (RMSNorm keeps only rstd).
    Tensor qkvx;
  };
  // With checkpointing (interval > 0) layers[l] are views: block l of segment k = l / interval uses scratch slot
  // l - k * interval, except its res3 when it ends a segment (the next segment's saved input) or is the last
  // block (ln_f's input): those are buffers of their own.
  std::vector<Layer> layers;
  int64_t interval = 0;          // 0: every block has buffers of its own
  int64_t scratch_segment = -1;  // checkpointing: the segment whose activations the scratch slots hold (-1: none)
  Tensor lnf, lnf_mean, lnf_rstd;
  Tensor logits;  // [B,T,ldv], allocated by forward() only (the unfused path)
  Tensor proj;  // [B,T,C] scratch for c_proj outputs before the residual add
  // gradient scratch
  Tensor dres, dln, dqkv, datty, dfch, dfch_gelu;
  Tensor dqkvc;  // Llama: d(compact qkv) [B,T,(NH + 2 KV) D] (dqkv itself when KV == NH)
  Tensor pos;    // Llama: [B*T] I32, position t of every slot (b, t): the rotary positions of a padded batch
};

GPT2::GPT2(Backend& backend, GPT2Config cfg, DType dtype)
    : be_(&backend), cfg_(cfg), dtype_(dtype), fusions_(Fusions::from_env()) {
  cfg_.validate("GPT2Config");
  specs_ = gpt2_param_specs(cfg_);
  const int64_t n = cfg_.num_parameters();
  int64_t last = 1;
  for (int64_t d : specs_.back().shape) last *= d;
  DPO_ASSERT(specs_.back().offset + last == n, "parameter layout does not add up");
  DPO_ASSERT(dtype_ == DType::F32 || dtype_ == DType::F64 || dtype_ == DType::BF16,
             std::string("GPT2: dtype must be F32, F64 or BF16, got ") + dtype_name(dtype_));
  gdtype_ = grad_dtype(dtype_);
  params_ = be_->zeros({n}, dtype_);
  master_ = dtype_ == DType::BF16 ? be_->zeros({n}, DType::F32) : params_;
  grads_ = be_->zeros({n}, gdtype_);
  if (llama()) build_rope_tables();
}

void GPT2::build_rope_tables() {
  // HF LlamaRotaryEmbedding: inv_freq in float32 from rope_theta (and the llama3 scaling), freqs = pos * inv_freq
  // in float32, cos / sin of those float32 values, then widened to the table's dtype. An F64 model computes all of
  // it in double instead (its parity fixture computes HF's rotary in float64 too: tests/fixtures/gen_llama.py):
  // float32 tables would cap an F64 model's agreement with its reference at float32's 1e-7.
  const int64_t D = cfg_.head_dim(), H = D / 2, P = cfg_.max_seq_len;
  Tensor cos_h = Tensor::host({P, H}, gdtype_), sin_h = Tensor::host({P, H}, gdtype_);
  auto fill = [&](auto zero) {
    using R = decltype(zero);  // float (HF's arithmetic) or double
    std::vector<R> inv(static_cast<size_t>(H));
    for (int64_t i = 0; i < H; ++i) {
      // 1.0 / (base ** (arange(0, dim, 2).float() / dim))
      const R e = static_cast<R>(2 * i) / static_cast<R>(D);
      inv[static_cast<size_t>(i)] = R(1) / std::pow(static_cast<R>(cfg_.rope_theta), e);
    }
    if (cfg_.rope_scaling.enabled()) {  // _compute_llama3_parameters, elementwise in R
      const RopeScaling& r = cfg_.rope_scaling;
      const R factor = static_cast<R>(r.factor), lo = static_cast<R>(r.low_freq_factor),
              hi = static_cast<R>(r.high_freq_factor);
      const R old_len = static_cast<R>(r.original_max_position_embeddings);
      // Python floats: old_context_len / low_freq_factor is computed in double, then compared with R values.
      const double low_wavelen = static_cast<double>(r.original_max_position_embeddings) / r.low_freq_factor;
      const double high_wavelen = static_cast<double>(r.original_max_position_embeddings) / r.high_freq_factor;
      for (R& f : inv) {
        const R wavelen = static_cast<R>(2 * M_PI) / f;
        R scaled = static_cast<double>(wavelen) > low_wavelen ? f / factor : f;
        const R smooth = (old_len / wavelen - lo) / (hi - lo);
        const R smoothed = (R(1) - smooth) * scaled / factor + smooth * scaled;
        const bool medium = !(static_cast<double>(wavelen) < high_wavelen) && !(static_cast<double>(wavelen) > low_wavelen);
        f = medium ? smoothed : scaled;
      }
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t i = 0; i < H; ++i) {
        const R a = static_cast<R>(p) * inv[static_cast<size_t>(i)];
        const double c = static_cast<double>(std::cos(a)), sn = static_cast<double>(std::sin(a));
        if (gdtype_ == DType::F64) {
          cos_h.data<double>()[p * H + i] = c;
          sin_h.data<double>()[p * H + i] = sn;
        } else {
          cos_h.data<float>()[p * H + i] = static_cast<float>(c);
          sin_h.data<float>()[p * H + i] = static_cast<float>(sn);
        }
      }
  };
  if (dtype_ == DType::F64) fill(0.0);
  else fill(0.0f);
  rope_cos_ = to_backend(*be_, cos_h);
  rope_sin_ = to_backend(*be_, sin_h);
}

std::string GPT2::embed_name() const { return llama() ? "embed_tokens.weight" : "wte.weight"; }
std::string GPT2::layer_prefix(int64_t l) const {
  return (llama() ? "layers." : "h.") + std::to_string(l) + ".";
}
std::string GPT2::first_layer_param(int64_t l) const {
  return layer_prefix(l) + (llama() ? "input_layernorm.weight" : "ln_1.weight");
}
std::string GPT2::final_norm_name() const { return llama() ? "norm.weight" : "ln_f.weight"; }
Tensor GPT2::head_weight() const { return param(cfg_.tied_head() ? embed_name() : "lm_head.weight"); }
Tensor GPT2::head_grad() const { return grad(cfg_.tied_head() ? embed_name() : "lm_head.weight"); }

const ParamSpec& GPT2::spec(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return s;
  throw Error("GPT-2 has no parameter named '" + name + "'");
}

Tensor GPT2::param(const std::string& name) const {
  const ParamSpec& s = spec(name);
  return params_.view(s.offset, s.shape);
}

Tensor GPT2::master_param(const std::string& name) const {
  DPO_ASSERT(!master_sharded_, "master_param('" + name + "'): the master weights are sharded");
  const ParamSpec& s = spec(name);
  return master_.view(s.offset, s.shape);
}

void GPT2::sync_params() {
  if (dtype_ != DType::BF16) return;
  if (master_.numel() > 0) be_->convert(params_.view(master_begin_, {master_.numel()}), master_);
}

void GPT2::shard_master(int64_t begin, int64_t end) {
  DPO_ASSERT(dtype_ == DType::BF16, "shard_master: only BF16 models keep a separate master copy");
  DPO_ASSERT(!master_sharded_, "shard_master: already sharded");
  DPO_ASSERT(0 <= begin && begin <= end && end <= params_.numel(),
             "shard_master: [" + std::to_string(begin) + ", " + std::to_string(end) + ") is not within the parameters");
  Tensor range = be_->empty({end - begin}, DType::F32);
  if (end > begin) be_->copy(range, master_.view(begin, {end - begin}));
  master_ = range;  // the full master is freed here
  master_begin_ = begin;
  master_sharded_ = true;
}

Tensor GPT2::grad(const std::string& name) const {
  const ParamSpec& s = spec(name);
  return grads_.view(s.offset, s.shape);
}

void GPT2::init_random(Rng& rng) {
  Tensor host = Tensor::host({params_.numel()}, DType::F64);
  double* p = host.data<double>();
  const double resid_std = 0.02 / std::sqrt(2.0 * static_cast<double>(cfg_.n_layer));
  for (const auto& s : specs_) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    // Llama (HF LlamaPreTrainedModel._init_weights): every Linear and the embedding N(0, 0.02), RMSNorm weights 1,
    // biases 0, no residual scaling.
    const bool is_ln = s.name.find(llama() ? "norm" : "ln_") != std::string::npos;
    const bool is_bias = s.name.size() >= 5 && s.name.compare(s.name.size() - 5, 5, ".bias") == 0;
    const bool is_resid = !llama() && s.name.find("c_proj.weight") != std::string::npos;
    for (int64_t i = 0; i < n; ++i) {
      double v;
      if (is_bias) v = 0.0;
      else if (is_ln) v = 1.0;
      else v = rng.normal() * (is_resid ? resid_std : 0.02);
      p[s.offset + i] = v;
    }
  }
  DPO_ASSERT(!master_sharded_, "init_random: the master weights are sharded");
  be_->copy_from_host(master_, host);
  sync_params();
}

void GPT2::zero_grad() { be_->fill_zero(grads_); }

void GPT2::set_gradient_checkpointing(int64_t interval) {
  if (interval < 0) throw Error("gradient checkpointing interval must be >= 0, got " + std::to_string(interval));
  if (interval == ckpt_interval_) return;
  ckpt_interval_ = interval;
  // The buffers of the other arrangement are released, so that the new one's peak is its own.
  acts_.reset();
  act_pool_.clear();
  ++buffers_generation_;
  targets_ = Tensor();
  head_done_ = false;
}

void GPT2::ensure_acts(int64_t B, int64_t T) {
  const int64_t interval = ckpt_interval_ > 0 ? std::min(ckpt_interval_, cfg_.n_layer) : 0;
  if (acts_ && acts_->B == B && acts_->T == T && acts_->interval == interval) return;
  auto a = std::make_shared<Acts>();
  a->B = B;
  a->T = T;
  a->interval = interval;
  const int64_t C = cfg_.n_embd, NH = cfg_.n_head;
  const bool lm = llama();
  const int64_t W = cfg_.qkv_width(), F = lm ? 2 * cfg_.mlp_width() : 4 * C, G = lm ? cfg_.mlp_width() : 4 * C;
  const bool expand = lm && cfg_.kv_heads() != NH;
  // Every activation is a view of a buffer of act_pool_ that only ever grows (the i-th tensor below always takes
  // buffer i), so a batch no larger than an earlier one allocates nothing and keeps every device address: what a
  // captured CUDA graph (Backend::capture) relies on. buffers_generation() counts the growths.
  size_t next = 0;
  auto take = [&](Shape s, DType dt) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    if (next == act_pool_.size()) act_pool_.emplace_back();
    Tensor& buf = act_pool_[next++];
    if (!buf.defined() || buf.numel() < n || buf.dtype() != dt) {
      buf = Tensor();  // release the smaller buffer before allocating its successor
      buf = be_->empty({n}, dt);
      ++buffers_generation_;
    }
    return buf.view(0, std::move(s));
  };
  auto t = [&](Shape s) { return take(std::move(s), dtype_); };
  auto stat = [&](Shape s) { return take(std::move(s), gdtype_); };  // LayerNorm mean / rstd
  auto mean = [&](Shape s) { return lm ? Tensor() : stat(std::move(s)); };  // RMSNorm has no mean
  a->encoded = t({B, T, C});
  auto block = [&](Acts::Layer& L, bool with_res3) {
    L.ln1 = t({B, T, C});
    L.ln1_mean = mean({B, T});
    L.ln1_rstd = stat({B, T});
    L.qkv = t({B, T, W});
    L.qkvx = expand ? t({B, T, 3 * C}) : L.qkv;
    L.atty = t({B, T, C});
    L.att = take(be_->attention_saved_shape(B, T, NH), be_->attention_saved_dtype(dtype_));
    L.res2 = t({B, T, C});
    L.ln2 = t({B, T, C});
    L.ln2_mean = mean({B, T});
    L.ln2_rstd = stat({B, T});
    L.fch = t({B, T, F});
    L.fch_gelu = t({B, T, G});
    if (with_res3) L.res3 = t({B, T, C});
  };
  const int64_t NL = cfg_.n_layer;
  a->layers.resize(static_cast<size_t>(NL));
  if (interval == 0) {
    for (auto& L : a->layers) block(L, true);
  } else {
    // The last slot's block always ends a segment: its res3 is never a slot buffer.
    std::vector<Acts::Layer> slots(static_cast<size_t>(interval));
    for (int64_t j = 0; j < interval; ++j) block(slots[static_cast<size_t>(j)], j + 1 < interval);
    for (int64_t l = 0; l < NL; ++l) {
      Acts::Layer& L = a->layers[static_cast<size_t>(l)];
      L = slots[static_cast<size_t>(l % interval)];
      if ((l + 1) % interval == 0 || l + 1 == NL) L.res3 = t({B, T, C});  // a segment's output: kept
    }
  }
  a->lnf = t({B, T, C});
  a->lnf_mean = mean({B, T});
  a->lnf_rstd = stat({B, T});
  a->proj = t({B, T, C});
  a->dres = t({B, T, C});
  a->dln = t({B, T, C});
  a->dqkv = t({B, T, 3 * C});
  a->dqkvc = expand ? t({B, T, W}) : a->dqkv;
  a->datty = t({B, T, C});
  a->dfch = t({B, T, F});
  a->dfch_gelu = t({B, T, G});
  if (lm) {
    // The rotary positions of a padded batch: t for slot (b, t), as wpe's rows in the GPT-2 path.
    Tensor pos_h = Tensor::host({B * T}, DType::I32);
    for (int64_t i = 0; i < B * T; ++i) pos_h.data<int32_t>()[i] = static_cast<int32_t>(i % std::max<int64_t>(T, 1));
    Tensor pos = take({B * T}, DType::I32);
    be_->copy_from_host(pos, pos_h);
    a->pos = pos;
  }
  acts_ = std::move(a);
}

void GPT2::check_tokens(const Tensor& tokens) const {
  check_dtype(tokens, DType::I32, "tokens");
  if (tokens.dim() != 2) throw Error("tokens must be [B,T], got " + shape_str(tokens.shape()));
  // (With a layout a row holds several sequences: its positions, not its length, are bounded by n_positions,
  // which encoder_forward_pos checks.)
  if (!layout_ && tokens.size(1) > cfg_.max_seq_len)
    throw InputError("sequence length " + std::to_string(tokens.size(1)) + " exceeds the model's n_positions (" +
                     std::to_string(cfg_.max_seq_len) + ")");
  // Out-of-range ids would index outside wte. On the host we can check cheaply here; device backends check when
  // batches are built (the data pipeline validates every id against the vocabulary).
  if (tokens.device().kind == DeviceKind::CPU) {
    const int32_t* p = tokens.data<int32_t>();
    for (int64_t i = 0; i < tokens.numel(); ++i)
      if (p[i] < 0 || p[i] >= cfg_.vocab_size)
        throw InputError("token id " + std::to_string(p[i]) + " at position " + std::to_string(i) +
                         " is outside the vocabulary [0, " + std::to_string(cfg_.vocab_size) + ")");
  }
}

void GPT2::forward_trunk(const Tensor& tokens, const Tensor& keymask,
                         const std::function<void(int64_t layer)>& after_layer) {
  check_tokens(tokens);
  const int64_t B = tokens.size(0), T = tokens.size(1);
  ensure_acts(B, T);
  Acts& a = *acts_;
  Backend& be = *be_;
  if (layout_) {
    check_shape(layout_->pos, {B, T}, "layout pos");
    check_shape(layout_->span, {B, T, kSpanWidth}, "layout span");
    be.encoder_forward_pos(a.encoded, tokens, layout_->pos, param(embed_name()),
                           llama() ? Tensor() : param("wpe.weight"));
  } else {
    be.encoder_forward(a.encoded, tokens, param(embed_name()), llama() ? Tensor() : param("wpe.weight"));
  }
  // Fusions (gpt2.h): with residual_layernorm each residual add also computes the LayerNorm that reads its sum
  // (ln_2 after the attention, then the next layer's ln_1 or ln_f after the MLP), so only h.0's ln_1 runs alone.
  const bool fuse_ln = fusions_.residual_layernorm;
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    layer_forward(l, keymask, l == 0 || !fuse_ln, true);
    if (after_layer) after_layer(l);
  }
  if (a.interval > 0 && cfg_.n_layer > 0) a.scratch_segment = (cfg_.n_layer - 1) / a.interval;
  if (!fuse_ln || cfg_.n_layer == 0) {
    const Tensor& residual = cfg_.n_layer > 0 ? a.layers.back().res3 : a.encoded;
    if (llama()) be.rmsnorm_forward(a.lnf, a.lnf_rstd, residual, param("norm.weight"), cfg_.ln_eps);
    else
      be.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, param("ln_f.weight"), param("ln_f.bias"),
                           cfg_.ln_eps);
  }
  tokens_ = tokens;
  keymask_ = keymask;
  targets_ = Tensor();  // any earlier head state is stale now
  head_done_ = false;
}

Tensor GPT2::rope_positions() const {
  const int64_t N = acts_->B * acts_->T;
  return layout_ ? layout_->pos.view(0, {N}) : acts_->pos;
}

void GPT2::layer_forward_llama(int64_t l, const Tensor& keymask, bool ln1_here, bool finish) {
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t NH = cfg_.n_head, KV = cfg_.kv_heads();
  const bool fuse_ln = fusions_.residual_layernorm;
  auto& L = a.layers[static_cast<size_t>(l)];
  const Tensor& residual = l > 0 ? a.layers[static_cast<size_t>(l - 1)].res3 : a.encoded;
  const std::string p = layer_prefix(l);
  DPO_TRACE_RANGE(p + " forward");
  if (ln1_here) be.rmsnorm_forward(L.ln1, L.ln1_rstd, residual, param(p + "input_layernorm.weight"), cfg_.ln_eps);
  be.matmul_forward(L.qkv, L.ln1, param(p + "self_attn.qkv_proj.weight"),
                    cfg_.attention_bias ? param(p + "self_attn.qkv_proj.bias") : Tensor(), WeightLayout::InOut);
  const Tensor pos = rope_positions();
  const int64_t N = a.B * a.T;
  const Tensor qkv2 = L.qkv.view(0, {N, cfg_.qkv_width()});
  be.rope_forward(qkv2, qkv2, rope_cos_, rope_sin_, pos, NH, KV);
  if (KV != NH) be.repeat_kv_forward(L.qkvx.view(0, {N, 3 * cfg_.n_embd}), qkv2, NH, KV);
  if (layout_) be.attention_forward_spans(L.atty, L.att, L.qkvx, layout_->span, NH);
  else be.attention_forward(L.atty, L.att, L.qkvx, keymask, NH);
  be.matmul_forward(a.proj, L.atty, param(p + "self_attn.o_proj.weight"), Tensor(), WeightLayout::InOut);
  const Tensor w2 = param(p + "post_attention_layernorm.weight");
  if (fuse_ln) {
    be.residual_rmsnorm_forward(L.res2, L.ln2, L.ln2_rstd, residual, a.proj, w2, cfg_.ln_eps);
  } else {
    be.residual_forward(L.res2, residual, a.proj);
    be.rmsnorm_forward(L.ln2, L.ln2_rstd, L.res2, w2, cfg_.ln_eps);
  }
  be.matmul_forward(L.fch, L.ln2, param(p + "mlp.gate_up_proj.weight"), Tensor(), WeightLayout::InOut);
  be.swiglu_forward(L.fch_gelu.view(0, {N, cfg_.mlp_width()}), L.fch.view(0, {N, 2 * cfg_.mlp_width()}));
  if (!finish) return;
  be.matmul_forward(a.proj, L.fch_gelu, param(p + "mlp.down_proj.weight"), Tensor(), WeightLayout::InOut);
  if (fuse_ln) {
    const bool last = l + 1 == cfg_.n_layer;
    auto& next = last ? L : a.layers[static_cast<size_t>(l + 1)];
    be.residual_rmsnorm_forward(L.res3, last ? a.lnf : next.ln1, last ? a.lnf_rstd : next.ln1_rstd, L.res2, a.proj,
                                param(last ? std::string("norm.weight") : first_layer_param(l + 1)), cfg_.ln_eps);
  } else {
    be.residual_forward(L.res3, L.res2, a.proj);
  }
}

void GPT2::layer_backward_llama(int64_t l) {
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t NH = cfg_.n_head, KV = cfg_.kv_heads(), N = a.B * a.T, I = cfg_.mlp_width();
  auto& L = a.layers[static_cast<size_t>(l)];
  const Tensor& residual = l > 0 ? a.layers[static_cast<size_t>(l - 1)].res3 : a.encoded;
  const std::string p = layer_prefix(l);
  const bool ow = fusions_.overwrite_grads;
  const GradWrite first = first_write();
  DPO_TRACE_RANGE(p + " backward");
  // a.dres holds dL/d(residual stream) as in the GPT-2 block (backward_trunk).
  if (!ow) be.fill_zero(a.dfch_gelu);
  be.matmul_backward(a.dfch_gelu, grad(p + "mlp.down_proj.weight"), Tensor(), a.dres, L.fch_gelu,
                     param(p + "mlp.down_proj.weight"), WeightLayout::InOut, first);
  be.swiglu_backward(a.dfch.view(0, {N, 2 * I}), a.dfch_gelu.view(0, {N, I}), L.fch.view(0, {N, 2 * I}));
  if (!ow) be.fill_zero(a.dln);
  be.matmul_backward(a.dln, grad(p + "mlp.gate_up_proj.weight"), Tensor(), a.dfch, L.ln2,
                     param(p + "mlp.gate_up_proj.weight"), WeightLayout::InOut, first);
  be.rmsnorm_backward(a.dres, grad(p + "post_attention_layernorm.weight"), a.dln, L.res2,
                      param(p + "post_attention_layernorm.weight"), L.ln2_rstd, GradWrite::Accumulate);
  if (!ow) be.fill_zero(a.datty);
  be.matmul_backward(a.datty, grad(p + "self_attn.o_proj.weight"), Tensor(), a.dres, L.atty,
                     param(p + "self_attn.o_proj.weight"), WeightLayout::InOut, first);
  be.fill_zero(a.dqkv);  // attention_backward accumulates
  if (layout_) be.attention_backward_spans(a.dqkv, a.datty, L.qkvx, L.atty, L.att, layout_->span, NH);
  else be.attention_backward(a.dqkv, a.datty, L.qkvx, L.atty, L.att, NH);
  const Tensor dqkvc = a.dqkvc.view(0, {N, cfg_.qkv_width()});
  if (KV != NH) be.repeat_kv_backward(dqkvc, a.dqkv.view(0, {N, 3 * cfg_.n_embd}), NH, KV);
  be.rope_backward(dqkvc, dqkvc, rope_cos_, rope_sin_, rope_positions(), NH, KV);
  if (!ow) be.fill_zero(a.dln);
  be.matmul_backward(a.dln, grad(p + "self_attn.qkv_proj.weight"),
                     cfg_.attention_bias ? grad(p + "self_attn.qkv_proj.bias") : Tensor(), a.dqkvc, L.ln1,
                     param(p + "self_attn.qkv_proj.weight"), WeightLayout::InOut, first);
  be.rmsnorm_backward(a.dres, grad(p + "input_layernorm.weight"), a.dln, residual, param(p + "input_layernorm.weight"),
                      L.ln1_rstd, GradWrite::Accumulate);
}

void GPT2::layer_forward(int64_t l, const Tensor& keymask, bool ln1_here, bool finish) {
  if (llama()) {
    layer_forward_llama(l, keymask, ln1_here, finish);
    return;
  }
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t NH = cfg_.n_head;
  const bool lay = layout_.has_value();
  const bool fuse_ln = fusions_.residual_layernorm;
  const bool fuse_gelu = fusions_.gelu_epilogue && dtype_ == DType::BF16;
  auto& L = a.layers[static_cast<size_t>(l)];
  const Tensor& residual = l > 0 ? a.layers[static_cast<size_t>(l - 1)].res3 : a.encoded;
  const std::string p = "h." + std::to_string(l) + ".";
  DPO_TRACE_RANGE("h." + std::to_string(l) + " forward");
  if (ln1_here) {
    be.layernorm_forward(L.ln1, L.ln1_mean, L.ln1_rstd, residual, param(p + "ln_1.weight"), param(p + "ln_1.bias"),
                         cfg_.ln_eps);
  }
  be.matmul_forward(L.qkv, L.ln1, param(p + "attn.c_attn.weight"), param(p + "attn.c_attn.bias"),
                    WeightLayout::InOut);
  if (lay) be.attention_forward_spans(L.atty, L.att, L.qkv, layout_->span, NH);
  else be.attention_forward(L.atty, L.att, L.qkv, keymask, NH);
  be.matmul_forward(a.proj, L.atty, param(p + "attn.c_proj.weight"), param(p + "attn.c_proj.bias"),
                    WeightLayout::InOut);
  if (fuse_ln) {
    be.residual_layernorm_forward(L.res2, L.ln2, L.ln2_mean, L.ln2_rstd, residual, a.proj, param(p + "ln_2.weight"),
                                  param(p + "ln_2.bias"), cfg_.ln_eps);
  } else {
    be.residual_forward(L.res2, residual, a.proj);
    be.layernorm_forward(L.ln2, L.ln2_mean, L.ln2_rstd, L.res2, param(p + "ln_2.weight"), param(p + "ln_2.bias"),
                         cfg_.ln_eps);
  }
  if (fuse_gelu) {
    be.matmul_gelu_forward(L.fch_gelu, L.fch, L.ln2, param(p + "mlp.c_fc.weight"), param(p + "mlp.c_fc.bias"),
                           WeightLayout::InOut);
  } else {
    be.matmul_forward(L.fch, L.ln2, param(p + "mlp.c_fc.weight"), param(p + "mlp.c_fc.bias"), WeightLayout::InOut);
    be.gelu_forward(L.fch_gelu, L.fch);
  }
  if (!finish) return;
  be.matmul_forward(a.proj, L.fch_gelu, param(p + "mlp.c_proj.weight"), param(p + "mlp.c_proj.bias"),
                    WeightLayout::InOut);
  if (fuse_ln) {
    const bool last = l + 1 == cfg_.n_layer;
    const std::string q = last ? "ln_f." : "h." + std::to_string(l + 1) + ".ln_1.";
    auto& next = last ? L : a.layers[static_cast<size_t>(l + 1)];
    be.residual_layernorm_forward(L.res3, last ? a.lnf : next.ln1, last ? a.lnf_mean : next.ln1_mean,
                                  last ? a.lnf_rstd : next.ln1_rstd, L.res2, a.proj, param(q + "weight"),
                                  param(q + "bias"), cfg_.ln_eps);
  } else {
    be.residual_forward(L.res3, L.res2, a.proj);
  }
}

const Tensor& GPT2::forward(const Tensor& tokens, const Tensor& keymask) {
  DPO_ASSERT(!layout_, "forward: a batch layout is set (only score and fused_forward_pairs take one)");
  forward_trunk(tokens, keymask);
  Acts& a = *acts_;
  // Zeroed once: the padding columns are never written after this (gpt2.h, "Logits layout").
  if (!a.logits.defined()) a.logits = be_->zeros({a.B, a.T, logits_stride()}, dtype_);
  be_->matmul_forward(a.logits, a.lnf, head_weight(), Tensor(), WeightLayout::OutIn);
  return a.logits;
}

void GPT2::sequence_logprobs(const Tensor& tokens, const Tensor& keymask, const Tensor& targets,
                             const Tensor& weights, const Tensor& seq_logp, const Tensor& token_logp,
                             const Tensor& seq_stats) {
  const Tensor& logits = forward(tokens, keymask);
  be_->logprob_forward(Backend::LogprobOutputs{seq_logp, token_logp, seq_stats}, logits, targets, weights,
                       cfg_.vocab_size);
  targets_ = targets;
  weights_ = weights;
}

void GPT2::backward(const Tensor& dseq) {
  DPO_ASSERT(acts_ && targets_.defined(), "backward without a preceding sequence_logprobs");
  Acts& a = *acts_;
  Backend& be = *be_;
  // The logits buffer becomes dlogits (the CPU kernel supports the alias; the logits are not needed again).
  {
    DPO_TRACE_RANGE("lm_head backward");
    be.logprob_backward(a.logits, a.logits, targets_, weights_, dseq, cfg_.vocab_size);
    if (!fusions_.overwrite_grads) be.fill_zero(a.dln);
    be.matmul_backward(a.dln, head_grad(), Tensor(), a.logits, a.lnf, head_weight(), WeightLayout::OutIn,
                       first_write());
  }
  backward_trunk();
  targets_ = Tensor();  // the logits were consumed; a second backward needs a new forward
}

std::vector<std::pair<int64_t, int64_t>> GPT2::grad_buckets() const {
  // The final norm's specs come after the layers (with an untied Llama head, lm_head.weight after it, final
  // before the norm's: the head's backward runs first); layer l's specs are contiguous; the embeddings come first.
  std::vector<std::pair<int64_t, int64_t>> b;
  const int64_t n = params_.numel();
  const int64_t lnf = spec(final_norm_name()).offset;
  b.push_back({lnf, n - lnf});
  for (int64_t l = cfg_.n_layer - 1; l >= 0; --l) {
    const int64_t lo = spec(first_layer_param(l)).offset;
    const int64_t hi = l + 1 < cfg_.n_layer ? spec(first_layer_param(l + 1)).offset : lnf;
    b.push_back({lo, hi - lo});
  }
  const int64_t first_layer = cfg_.n_layer > 0 ? spec(first_layer_param(0)).offset : lnf;
  b.push_back({0, first_layer});
  return b;
}

void GPT2::backward_trunk() {
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t NH = cfg_.n_head;
  const auto buckets = grad_hook_ ? grad_buckets() : std::vector<std::pair<int64_t, int64_t>>{};
  size_t next_bucket = 0;
  auto ready = [&]() {
    if (!grad_hook_) return;
    grad_hook_(buckets[next_bucket].first, buckets[next_bucket].second);
    ++next_bucket;
  };
  const Tensor& last = cfg_.n_layer > 0 ? a.layers.back().res3 : a.encoded;
  // overwrite_grads (gpt2.h): each buffer's first contribution is written with "=" instead of fill_zero + "+=".
  const bool ow = fusions_.overwrite_grads;
  const GradWrite first = first_write();
  const bool fuse_gelu = fusions_.gelu_epilogue && dtype_ == DType::BF16;
  if (!ow) be.fill_zero(a.dres);
  if (llama())
    be.rmsnorm_backward(a.dres, grad("norm.weight"), a.dln, last, param("norm.weight"), a.lnf_rstd, first);
  else
    be.layernorm_backward(a.dres, grad("ln_f.weight"), grad("ln_f.bias"), a.dln, last, param("ln_f.weight"),
                          a.lnf_mean, a.lnf_rstd, first);
  ready();  // ln_f
  // a.dres holds dL/d(residual stream) at the current depth; both branches of each residual add read it, and
  // each LayerNorm backward accumulates into it, which is the residual backward done in place.
  for (int64_t l = cfg_.n_layer - 1; l >= 0; --l) {
    if (a.interval > 0 && a.scratch_segment != l / a.interval) {
      // Recomputation: l ends its segment here; rerun the segment's forward from its saved input into the
      // scratch slots, without its last residual add (that output, the next segment's input, is kept and would
      // write the next segment's slot-0 ln_1, which is this segment's).
      DPO_TRACE_RANGE(layer_prefix(l) + " recompute");
      const int64_t s = l / a.interval * a.interval;
      for (int64_t j = s; j <= l; ++j) layer_forward(j, keymask_, j == s || !fusions_.residual_layernorm, j < l);
      a.scratch_segment = l / a.interval;
    }
    if (llama()) {
      layer_backward_llama(l);
      ready();  // layers.l
      continue;
    }
    auto& L = a.layers[static_cast<size_t>(l)];
    const std::string p = "h." + std::to_string(l) + ".";
    DPO_TRACE_RANGE("h." + std::to_string(l) + " backward");
    const Tensor& residual = l > 0 ? a.layers[static_cast<size_t>(l - 1)].res3 : a.encoded;
    if (fuse_gelu) {
      be.matmul_backward_dgelu(a.dfch, grad(p + "mlp.c_proj.weight"), grad(p + "mlp.c_proj.bias"), a.dres,
                               L.fch_gelu, param(p + "mlp.c_proj.weight"), L.fch, WeightLayout::InOut);
    } else {
      if (!ow) be.fill_zero(a.dfch_gelu);
      be.matmul_backward(a.dfch_gelu, grad(p + "mlp.c_proj.weight"), grad(p + "mlp.c_proj.bias"), a.dres,
                         L.fch_gelu, param(p + "mlp.c_proj.weight"), WeightLayout::InOut, first);
      if (!ow) be.fill_zero(a.dfch);
      be.gelu_backward(a.dfch, a.dfch_gelu, L.fch, first);
    }
    if (!ow) be.fill_zero(a.dln);
    be.matmul_backward(a.dln, grad(p + "mlp.c_fc.weight"), grad(p + "mlp.c_fc.bias"), a.dfch, L.ln2,
                       param(p + "mlp.c_fc.weight"), WeightLayout::InOut, first);
    be.layernorm_backward(a.dres, grad(p + "ln_2.weight"), grad(p + "ln_2.bias"), a.dln, L.res2,
                          param(p + "ln_2.weight"), L.ln2_mean, L.ln2_rstd);
    if (!ow) be.fill_zero(a.datty);
    be.matmul_backward(a.datty, grad(p + "attn.c_proj.weight"), grad(p + "attn.c_proj.bias"), a.dres, L.atty,
                       param(p + "attn.c_proj.weight"), WeightLayout::InOut, first);
    be.fill_zero(a.dqkv);  // attention_backward accumulates (its kernels have no "=" form)
    if (layout_) be.attention_backward_spans(a.dqkv, a.datty, L.qkv, L.atty, L.att, layout_->span, NH);
    else be.attention_backward(a.dqkv, a.datty, L.qkv, L.atty, L.att, NH);
    if (!ow) be.fill_zero(a.dln);
    be.matmul_backward(a.dln, grad(p + "attn.c_attn.weight"), grad(p + "attn.c_attn.bias"), a.dqkv, L.ln1,
                       param(p + "attn.c_attn.weight"), WeightLayout::InOut, first);
    be.layernorm_backward(a.dres, grad(p + "ln_1.weight"), grad(p + "ln_1.bias"), a.dln, residual,
                          param(p + "ln_1.weight"), L.ln1_mean, L.ln1_rstd);
    ready();  // h.l
  }
  const Tensor dwpe = llama() ? Tensor() : grad("wpe.weight");
  if (layout_) be.encoder_backward_pos(grad(embed_name()), dwpe, a.dres, tokens_, layout_->pos);
  else be.encoder_backward(grad(embed_name()), dwpe, a.dres, tokens_);
  ready();  // wte + wpe
}

// --- the chunked LM head ---------------------------------------------------------------------------------------

int64_t GPT2::chunk_rows_within(int64_t rows, int64_t bytes, int64_t vocab_size, DType dtype) {
  const int64_t row_bytes = logits_stride(vocab_size) * dtype_size(dtype);
  return std::max<int64_t>(1, std::min(rows, bytes / row_bytes));
}

void GPT2::set_chunk_limits(int64_t rows, int64_t bytes) {
  const int64_t before = head_rows_limit();
  chunk_rows_ = rows;
  chunk_bytes_ = bytes;
  if (head_rows_limit() != before && (chunk_.defined() || compact_ln_.defined() || compact_dln_.defined())) {
    chunk_ = Tensor();
    compact_ln_ = Tensor();
    compact_dln_ = Tensor();
    ++buffers_generation_;
  }
}

void GPT2::set_logits_chunk_rows(int64_t rows) {
  if (rows < 1) throw Error("logits_chunk_rows must be >= 1, got " + std::to_string(rows));
  set_chunk_limits(rows, chunk_bytes_);
}

void GPT2::set_logits_chunk_bytes(int64_t bytes) {
  if (bytes < 1) throw Error("logits_chunk_bytes must be >= 1, got " + std::to_string(bytes));
  set_chunk_limits(chunk_rows_, bytes);
}

int64_t GPT2::logits_buffer_numel() const {
  int64_t n = chunk_.defined() ? chunk_.numel() : 0;
  if (acts_ && acts_->logits.defined()) n += acts_->logits.numel();
  return n;
}

void GPT2::check_head_args(const Tensor& targets, const Tensor& weights) const {
  const int64_t B = tokens_.size(0), T = tokens_.size(1);
  check_shape(targets, {B, T}, "targets");
  check_dtype(targets, DType::I32, "targets");
  check_shape(weights, {B, T}, "weights");
  check_dtype(weights, gdtype_, "weights");
}

std::vector<std::vector<GPT2::Range>> GPT2::plan_chunks(int64_t B, int64_t T, int64_t pair_stride) {
  DPO_ASSERT(pair_stride >= 0, "pair_stride must be >= 0");
  if (pair_stride > 0)
    DPO_ASSERT(B == 2 * pair_stride, "pair_stride " + std::to_string(pair_stride) + " needs a batch of " +
                                         std::to_string(2 * pair_stride) + " sequences, got " + std::to_string(B));
  const int64_t per_unit = pair_stride > 0 ? 2 : 1;
  const int64_t units = pair_stride > 0 ? pair_stride : B;
  const int64_t unit_rows = per_unit * std::max<int64_t>(T, 1);
  const int64_t k = std::min(units, std::max<int64_t>(1, head_rows_limit() / unit_rows));  // units per chunk
  std::vector<std::vector<Range>> plan;
  for (int64_t u0 = 0; u0 < units; u0 += k) {
    const int64_t n = std::min(k, units - u0);
    std::vector<Range> c{{u0, n, 0}};
    if (pair_stride > 0) c.push_back({u0 + pair_stride, n, n});
    plan.push_back(std::move(c));
  }
  return plan;
}

Tensor GPT2::chunk_logits(int64_t rows) {
  const int64_t ldv = logits_stride();
  // Zeroed once, like forward()'s logits: the padding columns are never written afterwards.
  if (!chunk_.defined() || chunk_.numel() < rows * ldv) {
    chunk_ = Tensor();
    chunk_ = be_->zeros({rows, ldv}, dtype_);
    ++buffers_generation_;
  }
  return chunk_.view(0, {rows, ldv});
}

void GPT2::score(const Tensor& tokens, const Tensor& keymask, const Tensor& targets, const Tensor& weights,
                 const Tensor& seq_logp, const Tensor& seq_stats, const Tensor& host_weights) {
  forward_trunk(tokens, keymask);
  check_head_args(targets, weights);
  const std::optional<HeadPlan> plan = plan_scored(weights, host_weights, 0);
  if (layout_) {
    layout_head(targets, weights, seq_logp, seq_stats, nullptr, plan ? &*plan : nullptr);
    return;
  }
  Acts& a = *acts_;
  const int64_t B = a.B, T = a.T, ldv = logits_stride();
  check_shape(seq_logp, {B}, "seq_logp");
  if (seq_stats.defined()) check_shape(seq_stats, {B, kSeqStatsWidth}, "seq_stats");
  if (plan) {
    compact_head(*plan, targets, weights, seq_logp, seq_stats, Tensor(), nullptr);
    return;
  }
  for (const auto& chunk : plan_chunks(B, T, 0))
    for (const Range& r : chunk)
      head_forward(r, chunk_logits(r.nseq * T).view(0, {r.nseq, T, ldv}), seq_logp, seq_stats, targets, weights);
}

void GPT2::head_forward(const Range& r, const Tensor& logits, const Tensor& seq_logp, const Tensor& seq_stats,
                        const Tensor& targets, const Tensor& weights) {
  DPO_TRACE_RANGE("lm_head forward");
  const int64_t T = acts_->T, C = cfg_.n_embd;
  be_->matmul_forward(logits, acts_->lnf.view(r.seq0 * T * C, {r.nseq * T, C}), head_weight(), Tensor(),
                      WeightLayout::OutIn);
  const Tensor stats =
      seq_stats.defined() ? seq_stats.view(r.seq0 * kSeqStatsWidth, {r.nseq, kSeqStatsWidth}) : Tensor();
  be_->logprob_forward(Backend::LogprobOutputs{seq_logp.view(r.seq0, {r.nseq}), Tensor(), stats}, logits,
                       targets.view(r.seq0 * T, {r.nseq, T}), weights.view(r.seq0 * T, {r.nseq, T}),
                       cfg_.vocab_size);
}

void GPT2::fused_head(const Tensor& targets, const Tensor& weights, int64_t pair_stride, const Tensor& seq_dev,
                      const Tensor& stats_dev, const Tensor& dseq_dev,
                      const std::function<void(const std::vector<Range>&)>& chunk_grad, const HeadPlan* plan) {
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t T = a.T, C = cfg_.n_embd, V = cfg_.vocab_size, ldv = logits_stride();
  const Tensor wte = head_weight(), dwte = head_grad();
  be.fill_zero(a.dln);  // dL/d(ln_f output), accumulated chunk by chunk
  if (plan) {
    compact_head(*plan, targets, weights, seq_dev, stats_dev, dseq_dev, chunk_grad);
    head_done_ = true;
    return;
  }
  for (const auto& chunk : plan_chunks(a.B, T, pair_stride)) {
    int64_t rows = 0;
    for (const Range& r : chunk) rows += r.nseq * T;
    const Tensor lg_all = chunk_logits(rows);
    auto lg = [&](const Range& r) { return lg_all.view(r.slot * T * ldv, {r.nseq, T, ldv}); };
    for (const Range& r : chunk) head_forward(r, lg(r), seq_dev, stats_dev, targets, weights);
    chunk_grad(chunk);
    for (const Range& r : chunk) {
      DPO_TRACE_RANGE("lm_head backward");
      const Tensor tg = targets.view(r.seq0 * T, {r.nseq, T}), w = weights.view(r.seq0 * T, {r.nseq, T});
      be.logprob_backward(lg(r), lg(r), tg, w, dseq_dev.view(r.seq0, {r.nseq}), V);
      be.matmul_backward(a.dln.view(r.seq0 * T * C, {r.nseq * T, C}), dwte, Tensor(), lg(r),
                         a.lnf.view(r.seq0 * T * C, {r.nseq * T, C}), wte, WeightLayout::OutIn);
    }
  }
  head_done_ = true;
}

std::vector<double> GPT2::fused_forward(const Tensor& tokens, const Tensor& keymask, const Tensor& targets,
                                        const Tensor& weights, const LossHead& head,
                                        std::vector<double>* seq_stats) {
  DPO_ASSERT(static_cast<bool>(head.grad), "fused_forward: the loss head has no grad function");
  DPO_ASSERT(!layout_, "fused_forward: a batch layout is set (only score and fused_forward_pairs take one)");
  forward_trunk(tokens, keymask);
  check_head_args(targets, weights);
  Backend& be = *be_;
  const int64_t B = acts_->B;
  Tensor seq_dev = be.zeros({B}, gdtype_), dseq_dev = be.empty({B}, gdtype_);
  const Tensor stats_dev = seq_stats ? be.empty({B, kSeqStatsWidth}, gdtype_) : Tensor();
  // What each chunk copies to the host: the statistics when asked for (their kSeqLogp column is bitwise seq_dev),
  // else the log-probs alone; either way one copy, one synchronisation, per chunk, and none after the last.
  const Tensor& copied_dev = seq_stats ? stats_dev : seq_dev;
  const int64_t copied_stride = seq_stats ? int64_t{kSeqStatsWidth} : 1;
  const int64_t copied_col = seq_stats ? int64_t{kSeqLogp} : 0;
  Tensor seq_host = Tensor::host(copied_dev.shape(), gdtype_), dseq_host = Tensor::host({B}, gdtype_);
  std::memset(dseq_host.raw(), 0, static_cast<size_t>(dseq_host.nbytes()));
  std::vector<double> logp(static_cast<size_t>(B), 0.0), dseq(static_cast<size_t>(B), 0.0);
  auto host_at = [&](const Tensor& h, int64_t i) -> double {
    return gdtype_ == DType::F64 ? h.data<double>()[i] : static_cast<double>(h.data<float>()[i]);
  };
  bool any_chunk = false;
  const std::optional<HeadPlan> plan = plan_scored(weights, head.host_weights, head.pair_stride);
  fused_head(targets, weights, head.pair_stride, seq_dev, stats_dev, dseq_dev, [&](const std::vector<Range>& chunk) {
    any_chunk = true;
    // One copy (one device synchronisation) per chunk: all B entries, of which this chunk's are new.
    be.copy_to_host(seq_host, copied_dev);
    for (const Range& r : chunk)
      for (int64_t s = r.seq0; s < r.seq0 + r.nseq; ++s)
        logp[static_cast<size_t>(s)] = host_at(seq_host, s * copied_stride + copied_col);
    const int64_t u0 = chunk.front().seq0, u1 = u0 + chunk.front().nseq;
    // A sequence the head forgets to set keeps NaN: its gradients become NaN (loud), never a silent 0.
    for (const Range& r : chunk)
      std::fill(dseq.begin() + r.seq0, dseq.begin() + r.seq0 + r.nseq, std::numeric_limits<double>::quiet_NaN());
    head.grad(u0, u1, logp, dseq);
    for (const Range& r : chunk) {
      for (int64_t s = r.seq0; s < r.seq0 + r.nseq; ++s) {
        const double d = dseq[static_cast<size_t>(s)];
        if (gdtype_ == DType::F64) dseq_host.data<double>()[s] = d;
        else dseq_host.data<float>()[s] = static_cast<float>(d);
      }
    }
    // One upload per chunk, all B entries (earlier chunks' entries are rewritten with the same values).
    be.copy_from_host(dseq_dev, dseq_host);
  }, plan ? &*plan : nullptr);
  // Every row of stats_dev was written by its chunk's head_forward (the plan covers every sequence once), so the
  // last chunk's copy holds them all.
  if (seq_stats) {
    seq_stats->assign(static_cast<size_t>(B * kSeqStatsWidth), 0.0);
    if (any_chunk)
      for (int64_t i = 0; i < B * kSeqStatsWidth; ++i) (*seq_stats)[static_cast<size_t>(i)] = host_at(seq_host, i);
  }
  return logp;
}

void GPT2::fused_forward_pairs(const Tensor& tokens, const Tensor& keymask, const Tensor& targets,
                               const Tensor& weights, const PairLossHead& head) {
  forward_trunk(tokens, keymask);
  check_head_args(targets, weights);
  Backend& be = *be_;
  if (layout_) {
    const auto S = static_cast<int64_t>(layout_->seg.size() / 2);
    if (head.stats.defined()) check_shape(head.stats, {S, kSeqStatsWidth}, "fused_forward_pairs stats");
    const Tensor stats = head.stats.defined() ? head.stats : be.empty({S, kSeqStatsWidth}, gdtype_);
    const std::optional<HeadPlan> plan = plan_scored(weights, head.host_weights, 0);
    layout_head(targets, weights, be.empty({S}, gdtype_), stats, &head, plan ? &*plan : nullptr);
    head_done_ = true;
    return;
  }
  const int64_t B = acts_->B;
  DPO_ASSERT(B % 2 == 0 && B > 0, "fused_forward_pairs: a preference batch has 2P > 0 sequences, got " +
                                      std::to_string(B));
  const int64_t P = B / 2;
  if (head.stats.defined()) check_shape(head.stats, {B, kSeqStatsWidth}, "fused_forward_pairs stats");
  const Tensor stats = head.stats.defined() ? head.stats : be.empty({B, kSeqStatsWidth}, gdtype_);
  const Tensor seq = be.empty({B}, gdtype_), dseq = be.empty({B}, gdtype_);
  bool first = true;
  const std::optional<HeadPlan> plan = plan_scored(weights, head.host_weights, P);
  fused_head(targets, weights, P, seq, stats, dseq, [&](const std::vector<Range>& chunk) {
    DPO_TRACE_RANGE("preference loss");
    const int64_t q0 = chunk.front().seq0, q1 = q0 + chunk.front().nseq;
    Backend::PairLossOutputs out{dseq, head.pair_loss, head.sums};
    out.accumulate = !first;
    first = false;
    be.preference_loss(out, stats, head.ref_logp, head.offset, head.params, head.normalizer, q0, q1);
  }, plan ? &*plan : nullptr);
}

void GPT2::set_layout(const Layout* layout) {
  if (!layout) {
    layout_.reset();
    return;
  }
  DPO_ASSERT(layout->pos.defined() && layout->pos.dim() == 2, "set_layout: pos must be [R,T]");
  const int64_t R = layout->pos.size(0), T = layout->pos.size(1);
  check_dtype(layout->pos, DType::I32, "layout pos");
  check_shape(layout->span, {R, T, kSpanWidth}, "layout span");
  check_dtype(layout->span, DType::I32, "layout span");
  DPO_ASSERT(static_cast<int64_t>(layout->row_pairs.size()) == R,
             "set_layout: row_pairs has " + std::to_string(layout->row_pairs.size()) + " entries for " +
                 std::to_string(R) + " rows");
  int64_t P = 0;
  for (int64_t n : layout->row_pairs) {
    DPO_ASSERT(n >= 0, "set_layout: a negative pair count in row_pairs");
    P += n;
  }
  DPO_ASSERT(P > 0 && static_cast<int64_t>(layout->seg.size()) == 4 * P,
             "set_layout: seg must hold 2 ranges per pair (" + std::to_string(4 * P) + " values), got " +
                 std::to_string(layout->seg.size()));
  // Every sequence's range lies inside the row of its pair.
  int64_t q = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < layout->row_pairs[static_cast<size_t>(r)]; ++i, ++q)
      for (int64_t s : {2 * q, 2 * q + 1}) {
        const int64_t b = layout->seg[static_cast<size_t>(2 * s)], e = layout->seg[static_cast<size_t>(2 * s + 1)];
        DPO_ASSERT(r * T <= b && b <= e && e <= (r + 1) * T,
                   "set_layout: sequence " + std::to_string(s) + " has slots [" + std::to_string(b) + ", " +
                       std::to_string(e) + ") outside its pair's row " + std::to_string(r));
      }
  layout_ = *layout;
}

std::vector<GPT2::RowChunk> GPT2::plan_row_chunks(int64_t R, int64_t T) const {
  std::vector<RowChunk> plan;
  const int64_t per = std::max<int64_t>(1, head_rows_limit() / std::max<int64_t>(T, 1));  // rows per chunk
  int64_t q = 0;
  for (int64_t r0 = 0; r0 < R; r0 += per) {
    const int64_t nr = std::min(per, R - r0);
    int64_t nq = 0;
    for (int64_t r = r0; r < r0 + nr; ++r) nq += layout_->row_pairs[static_cast<size_t>(r)];
    plan.push_back({r0, nr, q, nq});
    q += nq;
  }
  return plan;
}

void GPT2::layout_head(const Tensor& targets, const Tensor& weights, const Tensor& seq, const Tensor& stats,
                       const PairLossHead* head, const HeadPlan* plan) {
  DPO_ASSERT(layout_.has_value(), "layout_head without a layout");
  const Layout& L = *layout_;
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t R = a.B, T = a.T, C = cfg_.n_embd, V = cfg_.vocab_size, ldv = logits_stride();
  check_shape(L.pos, {R, T}, "layout pos (the batch's rows)");
  const auto S = static_cast<int64_t>(L.seg.size() / 2);
  check_shape(seq, {S}, "seq_logp (one per sequence of the layout)");
  if (stats.defined()) check_shape(stats, {S, kSeqStatsWidth}, "seq_stats (one row per sequence of the layout)");
  if (plan) {
    // Each chunk is one Range of whole pairs (sequences [2 q0, 2 (q0 + nq))), as plan_row_chunks' below.
    const Tensor dseq = head ? be.empty({S}, gdtype_) : Tensor();
    PairLossParams params;
    if (head) {
      params = head->params;
      params.rows = PairRows::Interleaved;
      be.fill_zero(a.dln);
    }
    bool first = true;
    compact_head(*plan, targets, weights, seq, stats, dseq, [&](const std::vector<Range>& chunk) {
      DPO_TRACE_RANGE("preference loss");
      const int64_t q0 = chunk.front().seq0 / 2, q1 = q0 + chunk.front().nseq / 2;
      Backend::PairLossOutputs out{dseq, head->pair_loss, head->sums};
      out.accumulate = !first;
      first = false;
      be.preference_loss(out, stats, head->ref_logp, head->offset, params, head->normalizer, q0, q1);
    });
    return;
  }
  const auto plan_rows = plan_row_chunks(R, T);
  // The sequences' ranges relative to the first slot of their chunk: one upload. A chunk's pairs [q0, q0 + nq)
  // are the sequences [2 q0, 2 (q0 + nq)), so every per-sequence array of the chunk is a view.
  Tensor seg_host = Tensor::host({S, 2}, DType::I32);
  int32_t* sh = seg_host.data<int32_t>();
  for (const RowChunk& c : plan_rows)
    for (int64_t s = 2 * c.q0; s < 2 * (c.q0 + c.nq); ++s) {
      sh[2 * s] = static_cast<int32_t>(L.seg[static_cast<size_t>(2 * s)] - c.r0 * T);
      sh[2 * s + 1] = static_cast<int32_t>(L.seg[static_cast<size_t>(2 * s + 1)] - c.r0 * T);
    }
  const Tensor seg_dev = to_backend(be, seg_host);
  const Tensor dseq = head ? be.empty({S}, gdtype_) : Tensor();
  PairLossParams params;
  if (head) {
    params = head->params;
    params.rows = PairRows::Interleaved;
    be.fill_zero(a.dln);
  }
  const Tensor wte = head_weight(), dwte = head_grad();
  for (size_t ci = 0; ci < plan_rows.size(); ++ci) {
    const RowChunk& c = plan_rows[ci];
    const int64_t s0 = 2 * c.q0, ns = 2 * c.nq;
    const Tensor logits = chunk_logits(c.nr * T).view(0, {c.nr, T, ldv});
    const Tensor lnf = a.lnf.view(c.r0 * T * C, {c.nr * T, C});
    const Tensor tg = targets.view(c.r0 * T, {c.nr, T}), w = weights.view(c.r0 * T, {c.nr, T});
    const Tensor seg_c = seg_dev.view(s0 * 2, {ns, 2});
    {
      DPO_TRACE_RANGE("lm_head forward");
      be.matmul_forward(logits, lnf, wte, Tensor(), WeightLayout::OutIn);
      be.logprob_forward_segments(
          Backend::LogprobOutputs{seq.view(s0, {ns}), Tensor(),
                                  stats.defined() ? stats.view(s0 * kSeqStatsWidth, {ns, kSeqStatsWidth}) : Tensor()},
          logits, tg, w, seg_c, V);
    }
    if (!head) continue;
    {
      DPO_TRACE_RANGE("preference loss");
      Backend::PairLossOutputs out{dseq, head->pair_loss, head->sums};
      out.accumulate = ci > 0;
      be.preference_loss(out, stats, head->ref_logp, head->offset, params, head->normalizer, c.q0, c.q0 + c.nq);
    }
    DPO_TRACE_RANGE("lm_head backward");
    be.logprob_backward_segments(logits, logits, tg, w, seg_c, dseq.view(s0, {ns}), V);
    be.matmul_backward(a.dln.view(c.r0 * T * C, {c.nr * T, C}), dwte, Tensor(), logits, lnf, wte,
                       WeightLayout::OutIn);
  }
}

// --- the compacted head (HeadRows::Scored) ---------------------------------------------------------------------

Tensor GPT2::compact_rows(int64_t rows, int which) {
  Tensor& buf = which == 0 ? compact_ln_ : compact_dln_;
  const int64_t C = cfg_.n_embd;
  if (!buf.defined() || buf.numel() < rows * C) {
    buf = Tensor();
    buf = be_->empty({rows, C}, dtype_);
    ++buffers_generation_;
  }
  return buf.view(0, {rows, C});
}

std::optional<GPT2::HeadPlan> GPT2::plan_scored(const Tensor& weights, const Tensor& host_weights,
                                                int64_t pair_stride) const {
  if (head_rows_ != HeadRows::Scored) return std::nullopt;
  const Tensor& w = host_weights.defined() ? host_weights : weights;
  if (!w.defined() || w.device().kind != DeviceKind::CPU) return std::nullopt;
  const int64_t B = acts_->B, T = acts_->T, N = B * T;
  if (host_weights.defined()) check_shape(host_weights, {B, T}, "host_weights");
  DPO_ASSERT(w.dtype() == DType::F32 || w.dtype() == DType::F64,
             std::string("host_weights: F32 or F64 host data, got ") + dtype_name(w.dtype()));
  DPO_ASSERT(N <= std::numeric_limits<int32_t>::max(),
             "the compacted LM head indexes slots in int32: " + std::to_string(N) + " slots is too many");
  std::vector<uint8_t> scored(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i)
    scored[static_cast<size_t>(i)] =
        w.dtype() == DType::F64 ? w.data<double>()[i] != 0.0 : w.data<float>()[i] != 0.0f;
  auto count = [&](int64_t b, int64_t e) {
    int64_t c = 0;
    for (int64_t i = b; i < e; ++i) c += scored[static_cast<size_t>(i)];
    return c;
  };
  // Greedy chunks of whole units (rows[u]: a unit's compact rows): at most head_rows_limit() rows, at least one unit.
  const int64_t limit = head_rows_limit();
  auto chunk_units = [&](const std::vector<int64_t>& rows) {
    std::vector<std::pair<int64_t, int64_t>> c;  // [u0, u1)
    const auto U = static_cast<int64_t>(rows.size());
    for (int64_t u0 = 0; u0 < U;) {
      int64_t u1 = u0 + 1, sum = rows[static_cast<size_t>(u0)];
      while (u1 < U && sum + rows[static_cast<size_t>(u1)] <= limit) sum += rows[static_cast<size_t>(u1++)];
      c.push_back({u0, u1});
      u0 = u1;
    }
    return c;
  };
  HeadPlan p;
  // Sequence s's scored slots among [b, e), appended to idx; seg[s] relative to row0 (its Range's first row).
  auto add_seq = [&](int64_t s, int64_t b, int64_t e, int64_t row0) {
    const auto r0 = static_cast<int64_t>(p.idx.size());
    for (int64_t i = b; i < e; ++i)
      if (scored[static_cast<size_t>(i)]) p.idx.push_back(static_cast<int32_t>(i));
    p.seg[static_cast<size_t>(2 * s)] = static_cast<int32_t>(r0 - row0);
    p.seg[static_cast<size_t>(2 * s + 1)] = static_cast<int32_t>(static_cast<int64_t>(p.idx.size()) - row0);
  };
  if (layout_) {
    // Units are rows (whole pairs, consecutive sequences); a row's compact rows are its sequences' scored slots
    // (slots in no sequence's range are not scored, as logprob_*_segments ignores them).
    const Layout& L = *layout_;
    const auto S = static_cast<int64_t>(L.seg.size() / 2);
    p.seg.assign(static_cast<size_t>(2 * S), 0);
    std::vector<int64_t> row_rows(static_cast<size_t>(B), 0), row_q0(static_cast<size_t>(B) + 1, 0);
    for (int64_t r = 0, q = 0; r < B; ++r) {
      row_q0[static_cast<size_t>(r)] = q;
      for (int64_t i = 0; i < L.row_pairs[static_cast<size_t>(r)]; ++i, ++q)
        for (int64_t s : {2 * q, 2 * q + 1})
          row_rows[static_cast<size_t>(r)] +=
              count(L.seg[static_cast<size_t>(2 * s)], L.seg[static_cast<size_t>(2 * s + 1)]);
      row_q0[static_cast<size_t>(r) + 1] = q;
    }
    for (const auto& [r0, r1] : chunk_units(row_rows)) {
      const int64_t q0 = row_q0[static_cast<size_t>(r0)], q1 = row_q0[static_cast<size_t>(r1)];
      Range rg{2 * q0, 2 * (q1 - q0), 0};
      rg.row0 = static_cast<int64_t>(p.idx.size());
      for (int64_t s = 2 * q0; s < 2 * q1; ++s)
        add_seq(s, L.seg[static_cast<size_t>(2 * s)], L.seg[static_cast<size_t>(2 * s + 1)], rg.row0);
      rg.nrow = static_cast<int64_t>(p.idx.size()) - rg.row0;
      p.chunks.push_back({rg});
    }
    return p;
  }
  // Padded: units are sequences, or pairs (q, q + P) as in plan_chunks.
  DPO_ASSERT(pair_stride >= 0, "pair_stride must be >= 0");
  if (pair_stride > 0)
    DPO_ASSERT(B == 2 * pair_stride, "pair_stride " + std::to_string(pair_stride) + " needs a batch of " +
                                         std::to_string(2 * pair_stride) + " sequences, got " + std::to_string(B));
  p.seg.assign(static_cast<size_t>(2 * B), 0);
  const int64_t units = pair_stride > 0 ? pair_stride : B;
  std::vector<int64_t> unit_rows(static_cast<size_t>(units));
  for (int64_t u = 0; u < units; ++u) {
    unit_rows[static_cast<size_t>(u)] = count(u * T, (u + 1) * T);
    if (pair_stride > 0) unit_rows[static_cast<size_t>(u)] += count((u + pair_stride) * T, (u + pair_stride + 1) * T);
  }
  for (const auto& [u0, u1] : chunk_units(unit_rows)) {
    std::vector<Range> c{{u0, u1 - u0, 0}};
    if (pair_stride > 0) c.push_back({u0 + pair_stride, u1 - u0, 0});
    for (Range& rg : c) {
      rg.row0 = static_cast<int64_t>(p.idx.size());
      for (int64_t s = rg.seq0; s < rg.seq0 + rg.nseq; ++s) add_seq(s, s * T, (s + 1) * T, rg.row0);
      rg.nrow = static_cast<int64_t>(p.idx.size()) - rg.row0;
    }
    p.chunks.push_back(std::move(c));
  }
  return p;
}

void GPT2::compact_head(const HeadPlan& plan, const Tensor& targets, const Tensor& weights, const Tensor& seq,
                        const Tensor& stats, const Tensor& dseq,
                        const std::function<void(const std::vector<Range>&)>& chunk_grad) {
  Acts& a = *acts_;
  Backend& be = *be_;
  const int64_t N = a.B * a.T, C = cfg_.n_embd, V = cfg_.vocab_size, ldv = logits_stride();
  const auto n_all = static_cast<int64_t>(plan.idx.size());
  const auto S = static_cast<int64_t>(plan.seg.size() / 2);
  // One upload each of the scored slots and the sequences' ranges (host tensors themselves on the CPU), then the
  // scored slots' targets and weights, gathered once. A 1-entry index when nothing is scored (never read).
  Tensor idx_host = Tensor::host({std::max<int64_t>(n_all, 1)}, DType::I32);
  idx_host.data<int32_t>()[0] = 0;
  std::copy(plan.idx.begin(), plan.idx.end(), idx_host.data<int32_t>());
  Tensor seg_host = Tensor::host({S, 2}, DType::I32);
  std::copy(plan.seg.begin(), plan.seg.end(), seg_host.data<int32_t>());
  const Tensor idx = to_backend(be, idx_host), seg = to_backend(be, seg_host);
  Tensor tg, w;
  if (n_all > 0) {
    tg = be.empty({n_all, 1}, DType::I32);
    w = be.empty({n_all, 1}, gdtype_);
    be.gather_rows(tg, targets.view(0, {N, 1}), idx.view(0, {n_all}));
    be.gather_rows(w, weights.view(0, {N, 1}), idx.view(0, {n_all}));
  }
  const Tensor wte = head_weight(), dwte = head_grad();
  const Tensor lnf = a.lnf.view(0, {N, C}), dln = a.dln.view(0, {N, C});
  for (const auto& chunk : plan.chunks) {
    const int64_t row0 = chunk.front().row0;
    int64_t n = 0;
    for (const Range& r : chunk) n += r.nrow;
    Tensor logits, lnc, ids;
    auto lg = [&](const Range& r) { return logits.view((r.row0 - row0) * ldv, {1, r.nrow, ldv}); };
    auto tg_of = [&](const Range& r) { return tg.view(r.row0, {1, r.nrow}); };
    auto w_of = [&](const Range& r) { return w.view(r.row0, {1, r.nrow}); };
    auto seg_of = [&](const Range& r) { return seg.view(2 * r.seq0, {r.nseq, 2}); };
    {
      DPO_TRACE_RANGE("lm_head forward");
      if (n > 0) {
        ids = idx.view(row0, {n});
        lnc = compact_rows(n, 0);
        logits = chunk_logits(n);
        be.gather_rows(lnc, lnf, ids);
        be.matmul_forward(logits, lnc, wte, Tensor(), WeightLayout::OutIn);
      }
      for (const Range& r : chunk) {
        const Tensor sq = seq.view(r.seq0, {r.nseq});
        const Tensor st = stats.defined() ? stats.view(r.seq0 * kSeqStatsWidth, {r.nseq, kSeqStatsWidth}) : Tensor();
        if (r.nrow == 0) {  // no scored slot in these sequences: every output 0 (kernels/logprob.h, empty ranges)
          be.fill_zero(sq);
          if (st.defined()) be.fill_zero(st);
          continue;
        }
        be.logprob_forward_segments(Backend::LogprobOutputs{sq, Tensor(), st}, lg(r), tg_of(r), w_of(r), seg_of(r), V);
      }
    }
    if (!dseq.defined()) continue;
    chunk_grad(chunk);
    if (n == 0) continue;
    DPO_TRACE_RANGE("lm_head backward");
    for (const Range& r : chunk)
      if (r.nrow > 0)
        be.logprob_backward_segments(lg(r), lg(r), tg_of(r), w_of(r), seg_of(r), dseq.view(r.seq0, {r.nseq}), V);
    const Tensor dlnc = compact_rows(n, 1);
    be.matmul_backward(dlnc, dwte, Tensor(), logits, lnc, wte, WeightLayout::OutIn, GradWrite::Overwrite);
    be.scatter_add_rows(dln, dlnc, ids);
  }
}

void GPT2::fused_backward() {
  DPO_ASSERT(acts_ && head_done_, "fused_backward without a preceding fused_forward");
  backward_trunk();
  head_done_ = false;
}

// --- incremental decoding --------------------------------------------------------------------------------------

struct GPT2::Decode {
  int64_t B = 0;         // sequences now in the batch (decode_select shrinks it)
  int64_t Bcap = 0;      // sequences the buffers were allocated for
  int64_t capacity = 0;  // positions per sequence
  Tensor kv;             // [n_layer, 2, Bcap, capacity, C]: layer l's keys, then its values
  std::vector<int64_t> filled;  // per sequence: positions [0, filled) hold its tokens' k, v
  // One step's activations, [Bcap, ...]; a step uses the first B rows.
  Tensor x, ln, qkv, atty, proj, res2, fch, fch_gelu, mean, rstd;
  Tensor qkvx;  // Llama: the grouped-query expansion of qkv [Bcap, 3C] (qkv itself when KV == NH)
  Tensor logits;  // [Bcap, ldv], zeroed once (padding columns, as forward()'s)
  Tensor tok, pos;  // [Bcap] I32 on the device
  Tensor out;  // the logits view handed out, [B, ldv]
};

Tensor GPT2::decode_cache(int64_t layer, int kv) const {
  const Decode& d = *dec_;
  const int64_t C = cfg_.n_embd, per = d.Bcap * d.capacity * C;
  return d.kv.view((layer * 2 + kv) * per, {d.B, d.capacity, C});
}

int64_t GPT2::decode_batch() const { return dec_ ? dec_->B : 0; }
int64_t GPT2::decode_capacity() const { return dec_ ? dec_->capacity : 0; }
int64_t GPT2::decode_filled(int64_t b) const {
  DPO_ASSERT(dec_ && b >= 0 && b < dec_->B, "decode_filled: no sequence " + std::to_string(b) + " in the cache");
  return dec_->filled[static_cast<size_t>(b)];
}

void GPT2::decode_end() { dec_.reset(); }

const Tensor& GPT2::decode_prefill(const Tensor& tokens, const std::vector<int64_t>& lengths, int64_t capacity) {
  DPO_ASSERT(!layout_, "decode_prefill: a batch layout is set");
  check_tokens(tokens);
  const int64_t B = tokens.size(0), T = tokens.size(1), C = cfg_.n_embd, ldv = logits_stride();
  DPO_ASSERT(static_cast<int64_t>(lengths.size()) == B, "decode_prefill: " + std::to_string(lengths.size()) +
                                                            " lengths for " + std::to_string(B) + " sequences");
  for (int64_t b = 0; b < B; ++b)
    DPO_ASSERT(lengths[static_cast<size_t>(b)] >= 1 && lengths[static_cast<size_t>(b)] <= T,
               "decode_prefill: sequence " + std::to_string(b) + " has length " +
                   std::to_string(lengths[static_cast<size_t>(b)]) + ", outside [1, " + std::to_string(T) + "]");
  if (capacity > cfg_.max_seq_len)
    throw InputError("a decoding cache of " + std::to_string(capacity) +
                     " positions exceeds the model's n_positions (" + std::to_string(cfg_.max_seq_len) + ")");
  DPO_ASSERT(capacity >= T, "decode_prefill: capacity " + std::to_string(capacity) + " is below the prompt length " +
                                std::to_string(T));
  dec_.reset();  // the previous cache first: its memory may be needed

  auto d = std::make_shared<Decode>();
  Backend& be = *be_;
  d->B = d->Bcap = B;
  d->capacity = capacity;
  d->filled = lengths;
  auto t = [&](int64_t width) { return be.empty({B, width}, dtype_); };
  d->kv = be.empty({cfg_.n_layer, 2, B, capacity, C}, dtype_);
  d->x = t(C);
  d->ln = t(C);
  d->qkv = t(cfg_.qkv_width());
  d->qkvx = llama() && cfg_.kv_heads() != cfg_.n_head ? t(3 * C) : d->qkv;
  d->atty = t(C);
  d->proj = t(C);
  d->res2 = t(C);
  d->fch = t(llama() ? 2 * cfg_.mlp_width() : 4 * C);
  d->fch_gelu = t(llama() ? cfg_.mlp_width() : 4 * C);
  d->mean = be.empty({B}, gdtype_);
  d->rstd = be.empty({B}, gdtype_);
  d->logits = be.zeros({B, ldv}, dtype_);
  d->tok = be.empty({B}, DType::I32);
  d->pos = be.empty({B}, DType::I32);
  dec_ = d;
  // Each block's k, v are stored as soon as the block has run (with checkpointing its qkv buffer is reused).
  forward_trunk(tokens, Tensor(), [&](int64_t l) {
    const auto& L = acts_->layers[static_cast<size_t>(l)];
    be.attention_cache_store(decode_cache(l, 0), decode_cache(l, 1), llama() ? L.qkvx : L.qkv);
  });
  // The LM head on each row's last real position only: ln_f output rows gathered into d->ln.
  for (int64_t b = 0; b < B; ++b)
    be.copy(d->ln.view(b * C, {C}), acts_->lnf.view((b * T + lengths[static_cast<size_t>(b)] - 1) * C, {C}));
  d->out = d->logits.view(0, {B, ldv});
  be.matmul_forward(d->out, d->ln, head_weight(), Tensor(), WeightLayout::OutIn);
  return d->out;
}

const Tensor& GPT2::decode_step(const std::vector<int32_t>& tokens, const std::vector<int64_t>& positions) {
  DPO_ASSERT(dec_ != nullptr, "decode_step without a decode_prefill");
  Decode& d = *dec_;
  Backend& be = *be_;
  const int64_t B = d.B, C = cfg_.n_embd, NH = cfg_.n_head, ldv = logits_stride(), maxT = cfg_.max_seq_len;
  DPO_ASSERT(static_cast<int64_t>(tokens.size()) == B && static_cast<int64_t>(positions.size()) == B,
             "decode_step: " + std::to_string(tokens.size()) + " tokens and " + std::to_string(positions.size()) +
                 " positions for a batch of " + std::to_string(B));
  Tensor tok_h = Tensor::host({B}, DType::I32), pos_h = Tensor::host({B}, DType::I32);
  for (int64_t b = 0; b < B; ++b) {
    const auto i = static_cast<size_t>(b);
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size)
      throw InputError("token id " + std::to_string(tokens[i]) + " of sequence " + std::to_string(b) +
                       " is outside the vocabulary [0, " + std::to_string(cfg_.vocab_size) + ")");
    DPO_ASSERT(positions[i] >= 0 && positions[i] < d.capacity,
               "decode_step: position " + std::to_string(positions[i]) + " of sequence " + std::to_string(b) +
                   " is outside the cache's [0, " + std::to_string(d.capacity) + ")");
    DPO_ASSERT(positions[i] <= d.filled[i],
               "decode_step: position " + std::to_string(positions[i]) + " of sequence " + std::to_string(b) +
                   " would leave a gap (positions [0, " + std::to_string(d.filled[i]) + ") are filled)");
    tok_h.data<int32_t>()[b] = tokens[i];
    pos_h.data<int32_t>()[b] = static_cast<int32_t>(positions[i]);
  }
  auto rows = [&](const Tensor& buf, int64_t width) { return buf.view(0, {B, width}); };
  const Tensor tok = d.tok.view(0, {B}), pos = d.pos.view(0, {B});
  be.copy_from_host(tok, tok_h);
  be.copy_from_host(pos, pos_h);
  if (llama()) {
    decode_step_llama(tok, pos);
    for (int64_t b = 0; b < B; ++b) d.filled[static_cast<size_t>(b)] = positions[static_cast<size_t>(b)] + 1;
    return d.out;
  }
  const Tensor x = rows(d.x, C), ln = rows(d.ln, C), qkv = rows(d.qkv, 3 * C), atty = rows(d.atty, C),
               proj = rows(d.proj, C), res2 = rows(d.res2, C), fch = rows(d.fch, 4 * C),
               fch_gelu = rows(d.fch_gelu, 4 * C), mean = d.mean.view(0, {B}), rstd = d.rstd.view(0, {B});
  // Embeddings: the existing encoder at T = 1 with wpe shifted to the position, once per run of consecutive
  // sequences at the same position (one call when all share it). Bitwise the full forward's wte + wpe.
  const Tensor wte = param("wte.weight"), wpe = param("wpe.weight");
  for (int64_t b0 = 0; b0 < B;) {
    const int64_t p = positions[static_cast<size_t>(b0)];
    int64_t b1 = b0 + 1;
    while (b1 < B && positions[static_cast<size_t>(b1)] == p) ++b1;
    be.encoder_forward(x.view(b0 * C, {b1 - b0, 1, C}), tok.view(b0, {b1 - b0, 1}), wte,
                       wpe.view(p * C, {maxT - p, C}));
    b0 = b1;
  }
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    DPO_TRACE_RANGE("h." + std::to_string(l) + " decode");
    be.layernorm_forward(ln, mean, rstd, x, param(p + "ln_1.weight"), param(p + "ln_1.bias"), cfg_.ln_eps);
    be.matmul_forward(qkv, ln, param(p + "attn.c_attn.weight"), param(p + "attn.c_attn.bias"), WeightLayout::InOut);
    be.attention_decode_forward(atty, decode_cache(l, 0), decode_cache(l, 1), qkv, pos, NH);
    be.matmul_forward(proj, atty, param(p + "attn.c_proj.weight"), param(p + "attn.c_proj.bias"),
                      WeightLayout::InOut);
    be.residual_forward(res2, x, proj);
    be.layernorm_forward(ln, mean, rstd, res2, param(p + "ln_2.weight"), param(p + "ln_2.bias"), cfg_.ln_eps);
    be.matmul_forward(fch, ln, param(p + "mlp.c_fc.weight"), param(p + "mlp.c_fc.bias"), WeightLayout::InOut);
    be.gelu_forward(fch_gelu, fch);
    be.matmul_forward(proj, fch_gelu, param(p + "mlp.c_proj.weight"), param(p + "mlp.c_proj.bias"),
                      WeightLayout::InOut);
    be.residual_forward(x, res2, proj);  // the residual stream for the next layer
  }
  be.layernorm_forward(ln, mean, rstd, x, param("ln_f.weight"), param("ln_f.bias"), cfg_.ln_eps);
  d.out = d.logits.view(0, {B, ldv});
  be.matmul_forward(d.out, ln, wte, Tensor(), WeightLayout::OutIn);
  for (int64_t b = 0; b < B; ++b) d.filled[static_cast<size_t>(b)] = positions[static_cast<size_t>(b)] + 1;
  return d.out;
}

void GPT2::decode_step_llama(const Tensor& tok, const Tensor& pos) {
  Decode& d = *dec_;
  Backend& be = *be_;
  const int64_t B = d.B, C = cfg_.n_embd, NH = cfg_.n_head, KV = cfg_.kv_heads(), I = cfg_.mlp_width(),
                W = cfg_.qkv_width(), ldv = logits_stride();
  auto rows = [&](const Tensor& buf, int64_t width) { return buf.view(0, {B, width}); };
  const Tensor x = rows(d.x, C), ln = rows(d.ln, C), qkv = rows(d.qkv, W), qkvx = rows(d.qkvx, 3 * C),
               atty = rows(d.atty, C), proj = rows(d.proj, C), res2 = rows(d.res2, C), fch = rows(d.fch, 2 * I),
               act = rows(d.fch_gelu, I), rstd = d.rstd.view(0, {B});
  // The same ops as layer_forward_llama at M = B rows, each row rotated at its own position.
  be.encoder_forward(x.view(0, {B, 1, C}), tok.view(0, {B, 1}), param(embed_name()), Tensor());
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    const std::string p = layer_prefix(l);
    DPO_TRACE_RANGE(p + " decode");
    be.rmsnorm_forward(ln, rstd, x, param(p + "input_layernorm.weight"), cfg_.ln_eps);
    be.matmul_forward(qkv, ln, param(p + "self_attn.qkv_proj.weight"),
                      cfg_.attention_bias ? param(p + "self_attn.qkv_proj.bias") : Tensor(), WeightLayout::InOut);
    be.rope_forward(qkv, qkv, rope_cos_, rope_sin_, pos, NH, KV);
    if (KV != NH) be.repeat_kv_forward(qkvx, qkv, NH, KV);
    be.attention_decode_forward(atty, decode_cache(l, 0), decode_cache(l, 1), qkvx, pos, NH);
    be.matmul_forward(proj, atty, param(p + "self_attn.o_proj.weight"), Tensor(), WeightLayout::InOut);
    be.residual_forward(res2, x, proj);
    be.rmsnorm_forward(ln, rstd, res2, param(p + "post_attention_layernorm.weight"), cfg_.ln_eps);
    be.matmul_forward(fch, ln, param(p + "mlp.gate_up_proj.weight"), Tensor(), WeightLayout::InOut);
    be.swiglu_forward(act, fch);
    be.matmul_forward(proj, act, param(p + "mlp.down_proj.weight"), Tensor(), WeightLayout::InOut);
    be.residual_forward(x, res2, proj);
  }
  be.rmsnorm_forward(ln, rstd, x, param("norm.weight"), cfg_.ln_eps);
  d.out = d.logits.view(0, {B, ldv});
  be.matmul_forward(d.out, ln, head_weight(), Tensor(), WeightLayout::OutIn);
}

void GPT2::decode_select(const std::vector<int64_t>& rows) {
  DPO_ASSERT(dec_ != nullptr, "decode_select without a decode_prefill");
  Decode& d = *dec_;
  const auto n = static_cast<int64_t>(rows.size());
  std::vector<char> seen(static_cast<size_t>(d.B), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[static_cast<size_t>(i)];
    DPO_ASSERT(r >= 0 && r < d.B && !seen[static_cast<size_t>(r)],
               "decode_select: rows must be distinct indices into the batch of " + std::to_string(d.B));
    DPO_ASSERT(r == i || r >= n, "decode_select: sequence " + std::to_string(r) + " cannot move to " +
                                     std::to_string(i) + " (a kept sequence stays or fills a place at or past " +
                                     std::to_string(n) + ")");
    seen[static_cast<size_t>(r)] = 1;
  }
  const int64_t C = cfg_.n_embd, row = d.capacity * C;
  // Every source is i itself (no copy) or >= n, and every target is < n: no copy reads a row another one wrote.
  for (int64_t l = 0; l < cfg_.n_layer; ++l)
    for (int kv = 0; kv < 2; ++kv) {
      const Tensor cache = decode_cache(l, kv);
      for (size_t i = 0; i < rows.size(); ++i)
        if (rows[i] != static_cast<int64_t>(i))
          be_->copy(cache.view(static_cast<int64_t>(i) * row, {row}), cache.view(rows[i] * row, {row}));
    }
  std::vector<int64_t> filled;
  for (int64_t r : rows) filled.push_back(d.filled[static_cast<size_t>(r)]);
  d.filled = std::move(filled);
  d.B = static_cast<int64_t>(rows.size());
}

}  // namespace dpo
