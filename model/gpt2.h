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
// Every op goes through a Backend, so the same model runs on the CPU (F32 or F64) and, with the CUDA backend, on a GPU.
#pragma once

#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/rng.h"

namespace dpo {

struct GPT2Config {
  int64_t max_seq_len = 1024;  // n_positions
  int64_t vocab_size = 50257;
  int64_t n_layer = 12;
  int64_t n_head = 12;
  int64_t n_embd = 768;
  double ln_eps = 1e-5;

  // Throws InputError("<where>: <field> ...") for non-positive sizes or n_embd % n_head != 0.
  void validate(const std::string& where) const;
  int64_t num_parameters() const;
};

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

  const Tensor& params() const { return params_; }
  const Tensor& grads() const { return grads_; }
  Tensor param(const std::string& name) const;
  Tensor grad(const std::string& name) const;

  // GPT-2's initialisation (as HF's _init_weights): weights and embeddings N(0, 0.02), residual projections
  // (attn.c_proj, mlp.c_proj) N(0, 0.02/sqrt(2 n_layer)), biases 0, LayerNorm weight 1, bias 0.
  void init_random(Rng& rng);
  void zero_grad();

  // tokens [B,T] I32 on the backend's device, T <= max_seq_len; keymask [B,T] I32 (1 real, 0 padding) or
  // undefined. Positions are 0..T-1 for every row. Returns the logits [B,T,V], valid until the next forward.
  const Tensor& forward(const Tensor& tokens, const Tensor& keymask);

  // forward, then seq_logp[b] = sum_t weights[b,t] * log p(targets[b,t] | tokens[b, <=t])   (targets/weights
  // [B,T]; see kernels/logprob.h). token_logp [B,T] is optional.
  void sequence_logprobs(const Tensor& tokens, const Tensor& keymask, const Tensor& targets, const Tensor& weights,
                         const Tensor& seq_logp, const Tensor& token_logp = Tensor());

  // Backward of the last sequence_logprobs call, given dL/dseq_logp [B]. Gradients accumulate (+=) into grads().
  // Overwrites the stored logits with their gradient.
  void backward(const Tensor& dseq);

 private:
  struct Acts;  // activations kept for the backward pass, sized for the current (B, T)
  void ensure_acts(int64_t B, int64_t T);
  void check_tokens(const Tensor& tokens) const;

  Backend* be_;
  GPT2Config cfg_;
  DType dtype_;
  std::vector<ParamSpec> specs_;
  Tensor params_, grads_;
  std::shared_ptr<Acts> acts_;
  Tensor tokens_, keymask_, targets_, weights_;  // inputs of the last sequence_logprobs, for backward
};

}  // namespace dpo
