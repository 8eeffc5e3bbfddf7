// The op interface the model and trainer call. One implementation per device: CpuBackend (runtime/cpu_backend.cpp,
// over the CPU reference kernels in kernels/*_cpu.cpp) and, with [cuda-core], a CUDA backend over kernels/*.cu.
// Model and trainer code only ever see Backend&, so a new backend needs no change above this line.
//
// Conventions for every op:
//   - Tensors are contiguous and live on this backend's device; shapes and dtypes are checked here, at the
//     boundary, once per call (a mismatch throws dpo::Error naming the argument).
//   - Padded rows, the one exception (the LM head's logits, model/gpt2.h): matmul's out / dout and log-prob's
//     logits / dlogits may have a last dim ld larger than the valid width (OC, taken from w; V, passed explicitly):
//     each row is `width` valid elements followed by ld - width padding elements that the op never reads and never
//     writes (they may hold NaN). A padded ld must make every row a multiple of 16 bytes (ld * dtype size), the
//     alignment cuBLASLt's fast kernels and the vector loads need; check_row_stride() below is the check.
//   - Floating tensors of one call share one dtype, the activation dtype A (F32, F64 on the CPU only, or BF16; see
//     "Mixed precision" below for what differs with BF16). Token ids, targets and masks are I32.
//   - "=" outputs are overwritten, "+=" outputs accumulate (gradients). Each op's contract comment is in
//     kernels/<op>.h; the shapes below use B batch, T time, C channels, NH heads, V vocabulary, N = B*T rows.
//   - An undefined Tensor() passed for an optional argument means "absent".
//
// Mixed precision (A = BF16; docs/architecture.md "Precision"). Activations, activation gradients and the
// parameters the ops read (the model's BF16 compute copy) are BF16; everything that accumulates over rows or is
// a per-sequence scalar is F32 (grad_dtype(A)):
//   - parameter gradients: dwte, dwpe (encoder_backward), dw, db (layernorm_backward), dw, dbias
//     (matmul_backward) are F32, += in fp32;
//   - LayerNorm mean and rstd are F32;
//   - log-prob: logits and dlogits BF16; weights, seq_logp, token_logp, seq_stats and dseq F32;
//   - the attention's saved state has dtype attention_saved_dtype(A) (BF16 probabilities);
//   - residual, GELU, fill_zero, copy: all BF16 (residual_forward also takes F32 tensors, e.g. gradients).
// Every op computes in fp32 (or wider), reads BF16 exactly, and rounds each BF16 output once (round to nearest
// even); a "+=" BF16 output is read, added to in fp32 and rounded once. The CPU backend implements BF16 this
// way over its float kernels (the oracle); the CUDA kernels do the same arithmetic with their own summation
// orders, so the two agree to about one BF16 rounding per output. With A = F32 or F64 every floating tensor is
// A (the fp32 parity mode). The optimizer never sees BF16: AdamW updates F32 master weights, and convert()
// rounds them into the BF16 compute copy.
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/common.h"
#include "kernels/pair_loss.h"
#include "kernels/seq_stats.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

namespace dpo {

// Backend::capture could not record the work (e.g. it synchronised); the message says why.
class GraphCaptureError : public Error {
 public:
  using Error::Error;
};

// The attention kernels a backend runs (Backend::set_attention_impl).
enum class AttentionImpl { Eager, Flash };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // --- memory -------------------------------------------------------------------------------------------------
  virtual Tensor empty(Shape shape, DType dtype) = 0;  // contents unspecified
  Tensor zeros(Shape shape, DType dtype) {
    Tensor t = empty(std::move(shape), dtype);
    fill_zero(t);
    return t;
  }
  virtual void fill_zero(const Tensor& t) = 0;
  // Same shape; dtype conversion between floating types is allowed (host F64 -> device F32, etc.).
  virtual void copy_from_host(const Tensor& dst, const Tensor& host_src) = 0;
  virtual void copy_to_host(const Tensor& host_dst, const Tensor& src) = 0;
  virtual void copy(const Tensor& dst, const Tensor& src) = 0;  // same device, same dtype and numel
  // dst = src converted (same device, same numel; F32, F64, BF16 either way; to BF16 rounds to nearest even,
  // NaN stays NaN). The same dtype is a copy.
  virtual void convert(const Tensor& dst, const Tensor& src) = 0;
  virtual void synchronize() {}
  // The stream every op is enqueued on (a cudaStream_t for the CUDA backend, type-erased; nullptr on the CPU), for
  // components that must order their own work after the backend's (the NCCL communicator).
  virtual void* native_stream() const { return nullptr; }

  // --- recorded work (CUDA graphs) ---------------------------------------------------------------------------
  // A recording of the work a function enqueued, replayed as one unit.
  class Graph {
   public:
    virtual ~Graph() = default;
    virtual void replay() = 0;  // enqueue the recorded work once more
  };
  // Records the work `fn` enqueues on this backend WITHOUT running it; each replay() runs it. On the GPU this is a
  // CUDA graph (stream capture, then cudaGraphInstantiate): the host code in fn runs once, at capture, and every
  // kernel, argument and device address is frozen, so fn must not wait for the device, copy to or from the host,
  // or keep a tensor it allocated beyond its return (tensors it allocates and releases inside become the graph's
  // own memory), and the buffers it reads and writes must stay where they are for as long as the graph is
  // replayed. The replayed kernels are the same kernels in the same order, so results are bitwise those of
  // running fn. Throws GraphCaptureError when the work cannot be captured (nothing has run then; the caller may
  // run fn itself). The CPU backend records fn itself and replay() calls it again, host code included: it keeps
  // the callers' logic testable on the CPU, not the freezing.
  virtual std::unique_ptr<Graph> capture(const std::function<void()>& fn);

  // --- GPT-2 ops ----------------------------------------------------------------------------------------------
  // out[B,T,C] = wte[tokens] + wpe[0..T)            | dwte[V,C] +=, dwpe[maxT,C] +=
  // An undefined wpe (forward) / dwpe (backward) means no position embedding (Llama-family models): out =
  // wte[tokens] (=, bitwise a copy of the rows), and only dwte accumulates. The _pos variants likewise; pos is then
  // not used by the encoder (it may be undefined).
  virtual void encoder_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) = 0;
  virtual void encoder_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                                const Tensor& tokens) = 0;
  // With explicit positions (kernels/batch_layout.h `pos`, kernels/encoder.h): pos[B,T] I32, 0 <= pos < P = wpe's
  // rows. out[B,T,C] = wte[tokens] + wpe[pos] (=) | dwte[V,C] +=, dwpe[P,C] += (each position's slots summed in slot
  // order). With pos[b,t] = t, bitwise encoder_forward / encoder_backward on the same backend. The CPU throws
  // dpo::Error naming the slot of a position outside [0, P); the CUDA backend cannot check without a sync: such a
  // slot's out row is NaN and its dout row adds nothing to dwpe (kernels/encoder.cuh).
  virtual void encoder_forward_pos(const Tensor& out, const Tensor& tokens, const Tensor& pos, const Tensor& wte,
                                   const Tensor& wpe) = 0;
  virtual void encoder_backward_pos(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens,
                                    const Tensor& pos) = 0;
  // inp[N,C] -> out[N,C], mean[N], rstd[N]           | dinp +=, dw +=, db +=
  virtual void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                                 const Tensor& w, const Tensor& b, double eps) = 0;
  // dinp_write = GradWrite::Overwrite makes dinp "=" (kernels/common.h); dw and db always accumulate.
  virtual void layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout,
                                  const Tensor& inp, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                                  GradWrite dinp_write) = 0;
  void layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout,
                          const Tensor& inp, const Tensor& w, const Tensor& mean, const Tensor& rstd) {
    layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, GradWrite::Accumulate);
  }
  // The residual add fused into the next LayerNorm (kernels/layernorm.h): res_out[N,C] = a + b (=), then ln_out,
  // mean, rstd as layernorm_forward(ln_out, mean, rstd, res_out, w, b, eps) computes them (=). res_out is rounded to
  // the activation dtype exactly as residual_forward rounds it and the LayerNorm reads it as stored, so the fused op
  // is bitwise equal to residual_forward followed by layernorm_forward on the same backend (CPU: by construction;
  // CUDA: the same per-element arithmetic and the same per-row summation order, kernels/layernorm.cuh). res_out may
  // alias a or b; ln_out must not alias any argument.
  virtual void residual_layernorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& mean,
                                          const Tensor& rstd, const Tensor& a, const Tensor& b, const Tensor& w,
                                          const Tensor& bias, double eps) = 0;
  // out[N,OC] = inp[N,C] @ W + bias (bias optional)   | dinp +=, dw +=, dbias += (each optional)
  // OC comes from w. out (forward) and dout (backward) are [..., ld] with N * ld elements and ld >= OC: columns
  // [OC, ld) of each row are padding, untouched by the forward and never read by the backward.
  virtual void matmul_forward(const Tensor& out, const Tensor& inp, const Tensor& w, const Tensor& bias,
                              WeightLayout layout) = 0;
  // dinp_write = GradWrite::Overwrite makes dinp "=" (kernels/common.h); dw and dbias always accumulate.
  virtual void matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                               const Tensor& inp, const Tensor& w, WeightLayout layout, GradWrite dinp_write) = 0;
  void matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                       const Tensor& inp, const Tensor& w, WeightLayout layout) {
    matmul_backward(dinp, dw, dbias, dout, inp, w, layout, GradWrite::Accumulate);
  }
  // The MLP's first dense layer with its GELU (GPT-2's c_fc; the CUDA backend's cuBLASLt GELU_AUX_BIAS epilogue
  // in BF16, kernels/matmul.cuh): pre[N,OC] = inp @ W + bias (=, the pre-activation kept for the backward) and
  // out[N,OC] = gelu(pre) (=). Rounding contract: with A = F32 / F64 this is bitwise matmul_forward then
  // gelu_forward. With A = BF16, gelu is applied to the fp32 pre-activation before it is rounded (the unfused pair
  // applies it to the rounded BF16 pre), so out may differ from the unfused path by one BF16 rounding of pre
  // propagated through gelu (|gelu'| <= 1.13: about one BF16 ulp of pre); the CPU backend mirrors that order.
  // The CUDA backend's fused path also uses cuBLASLt's own tanh-GELU (kernels/matmul.cu states that difference).
  virtual void matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp, const Tensor& w,
                                   const Tensor& bias, WeightLayout layout) = 0;
  // The backward of the MLP's second dense layer through the GELU before it (cuBLASLt's DGELU epilogue in BF16):
  //   dpre[N,C] = (dout[N,OC] @ W^T) * gelu'(pre)      (=; pre [N,C] the pre-activation of inp = gelu(pre))
  //   dw += inp^T @ dout, dbias += sum_n dout           (+=, as matmul_backward; each optional)
  // Rounding contract: with A = F32 / F64 bitwise matmul_backward (dinp += into a zeroed buffer) then gelu_backward
  // (+= into a zeroed dpre). With A = BF16 the product dout @ W^T stays fp32 (the unfused path rounds it to BF16
  // before gelu'): dpre differs by up to one BF16 rounding of the product times |gelu'(pre)| (<= 1.13), plus, on
  // the CUDA fused path, the difference between cuBLASLt's gelu' and ours.
  virtual void matmul_backward_dgelu(const Tensor& dpre, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                                     const Tensor& inp, const Tensor& w, const Tensor& pre, WeightLayout layout) = 0;
  // qkv[B,T,3C] -> out[B,T,C]; `saved` holds what the backward needs, in a backend-defined shape
  // (attention_saved_shape): the CPU backend keeps the per-row log-sum-exp and the key mask (or, with
  // CpuAttention::Reference, the probabilities [B,NH,T,T]). keymask[B,T] I32 is optional.
  // The backward takes the forward's own output `out` [B,T,C] (as the forward wrote it: the flash backward's
  // preprocess sums dout * out per row); a backend whose saved state suffices ignores it. The shape and dtype of
  // `saved` are one function of the backend and its attention implementation (set_attention_impl below), so they
  // must be asked again after that setting changes.
  virtual Shape attention_saved_shape(int64_t B, int64_t T, int64_t NH) const = 0;
  virtual DType attention_saved_dtype(DType activation) const { return activation; }
  virtual void attention_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                                 int64_t n_head) = 0;
  virtual void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                  const Tensor& saved, int64_t n_head) = 0;
  // Which attention kernels the backend runs (HF's config key attn_implementation, docs/training.md):
  //   Eager: the backend's default kernels (the CPU's blocked or reference kernels; the CUDA backend's
  //          materialised [B,NH,T,T] softmax).
  //   Flash: the tensor-core flash kernels (kernels/flash_attention.h), BF16 activations on the CUDA backend only;
  //          the saved state is then the per-row log-sum-exp and the key mask (runtime/cuda/cuda_backend.h).
  // The base class knows only Eager: Flash throws dpo::Error naming the backend. Set it before the model allocates
  // its activations (the saved state's shape follows it).
  virtual void set_attention_impl(AttentionImpl impl) {
    if (impl != AttentionImpl::Eager)
      throw Error("attn_implementation flash: the " + name() +
                  " backend has no flash attention kernels (they run on the CUDA backend in bf16)");
  }
  virtual AttentionImpl attention_impl() const { return AttentionImpl::Eager; }
  // The same ops under a batch layout's spans (kernels/batch_layout.h, kernels/attention.h): span [B,T,kSpanWidth]
  // I32; query slot t of row b attends to the key slots k of row b with span_sees(span[b,t], t, k) instead of the
  // key-mask rule. Same tensors and contracts otherwise (saved: attention_saved_shape / attention_saved_dtype; out
  // =, dqkv +=). The backward takes the spans its forward saw, and a saved state written by one form is for the
  // backward of the same form. The CPU backend checks every span (span_valid; dpo::Error naming the row, the slot
  // and the values, before anything is written). The CUDA backend cannot check without a sync: a query whose span
  // is not valid gets NaN probabilities and a NaN output row (so NaN gradients), never an out-of-bounds access
  // (kernels/attention.cuh).
  virtual void attention_forward_spans(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& span,
                                       int64_t n_head) = 0;
  virtual void attention_backward_spans(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                        const Tensor& saved, const Tensor& span, int64_t n_head) = 0;
  // Incremental decoding with a key/value cache (kernels/attention.h). kcache, vcache [B,Tc,C] in the activation
  // dtype, positions per sequence.
  // attention_cache_store: qkv [B,T,3C] with T <= Tc; positions [0,T) of each sequence's cache = its k, v (=), the
  // rest untouched.
  // attention_decode_forward: qkv [B,3C] holds one new token per sequence, at position pos[b] (pos [B] I32, 0 <=
  // pos[b] < Tc): its k, v are written into the cache at pos[b] (=), then out [B,C] = its attention over the cache's
  // positions [0, pos[b]] (=). The CPU checks the positions (dpo::Error); the CUDA backend cannot without a sync and
  // gives an out-of-range position a NaN output row instead (kernels/attention.cuh).
  virtual void attention_cache_store(const Tensor& kcache, const Tensor& vcache, const Tensor& qkv) = 0;
  virtual void attention_decode_forward(const Tensor& out, const Tensor& kcache, const Tensor& vcache,
                                        const Tensor& qkv, const Tensor& pos, int64_t n_head) = 0;
  virtual void gelu_forward(const Tensor& out, const Tensor& inp) = 0;
  virtual void gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, GradWrite dinp_write) = 0;
  void gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) {
    gelu_backward(dinp, dout, inp, GradWrite::Accumulate);
  }
  virtual void residual_forward(const Tensor& out, const Tensor& a, const Tensor& b) = 0;
  virtual void residual_backward(const Tensor& da, const Tensor& db, const Tensor& dout) = 0;
  // logits[B,T,ld], targets[B,T] I32, weights[B,T] -> out.seq_logp[B] (=), out.token_logp[B,T] (=, optional),
  // out.seq_stats[B, kSeqStatsWidth] (=, optional; kernels/seq_stats.h: seq_logp, completion token count, sum of
  // the logits over the completion positions). The vocabulary is columns [0, V) of each row, 1 <= V <= ld; columns
  // [V, ld) are padding (never read). The three outputs have the per-sequence dtype grad_dtype(A).
  struct LogprobOutputs {
    Tensor seq_logp;    // [B], required
    Tensor token_logp;  // [B,T] or undefined
    Tensor seq_stats;   // [B, kSeqStatsWidth] or undefined
  };
  virtual void logprob_forward(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                               const Tensor& weights, int64_t V) = 0;
  void logprob_forward(const Tensor& seq_logp, const Tensor& token_logp, const Tensor& logits, const Tensor& targets,
                       const Tensor& weights, int64_t V) {
    logprob_forward(LogprobOutputs{seq_logp, token_logp, Tensor()}, logits, targets, weights, V);
  }
  // dlogits[B,T,ld] (same shape as logits), columns [0, V) = dseq[b] * weights * (onehot - softmax)  (=; may alias
  // logits); columns [V, ld) are never written.
  virtual void logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                const Tensor& weights, const Tensor& dseq, int64_t V) = 0;
  // Per-sequence slot ranges (kernels/batch_layout.h `seg`, kernels/logprob.h): seg[S,2] I32, sequence s's slots
  // the flat range [seg[s,0], seg[s,1]) of the B*T slots, ranges sorted, non-overlapping, inside [0, B*T).
  // out.seq_logp [S] (=), out.seq_stats [S, kSeqStatsWidth] (=, optional), out.token_logp [B,T] (=, optional; 0 for
  // slots in no range). The backward writes dlogits rows of sequence s as logprob_backward does with dseq[s] (dseq
  // [S]) and columns [0, V) of rows in no range as 0 (=; may alias logits). With seg[s] = [s*T, (s+1)*T) (S = B),
  // bitwise logprob_forward / logprob_backward on the same backend. The CPU throws dpo::Error naming a bad range;
  // the CUDA backend does not check them (a sync): it clamps every access to [0, B*T) (kernels/logprob.cuh).
  virtual void logprob_forward_segments(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                        const Tensor& weights, const Tensor& seg, int64_t V) = 0;
  virtual void logprob_backward_segments(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                         const Tensor& weights, const Tensor& seg, const Tensor& dseq,
                                         int64_t V) = 0;
  // Rows through an index list (kernels/gather.h; the compacted LM head, model/gpt2.h): idx [n] I32, entries in
  // [0, N) and distinct.
  //   gather_rows      out[n,C] = inp[N,C] rows idx          (=)   any dtype (a copy: activations, I32 targets,
  //                                                                per-sequence weights; same dtype for both)
  //   scatter_add_rows dinp[N,C] rows idx += dout[n,C]       (+=)  activation dtype A
  // Rows no entry names are untouched. The CPU throws dpo::Error naming the first entry out of range or repeated,
  // before anything is written; the CUDA backend does not check them (a sync): an out-of-range entry makes its out
  // row all-one bits (NaN, or -1 in I32) and adds nothing, never an out-of-bounds access (kernels/gather.cuh), and
  // repeated entries are the caller's bug (a race in the scatter).
  virtual void gather_rows(const Tensor& out, const Tensor& inp, const Tensor& idx) = 0;
  virtual void scatter_add_rows(const Tensor& dinp, const Tensor& dout, const Tensor& idx) = 0;
  // Unpadded logits: V = the last dim.
  void logprob_forward(const Tensor& seq_logp, const Tensor& token_logp, const Tensor& logits, const Tensor& targets,
                       const Tensor& weights) {
    logprob_forward(seq_logp, token_logp, logits, targets, weights, logits.size(-1));
  }
  void logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets, const Tensor& weights,
                        const Tensor& dseq) {
    logprob_backward(dlogits, logits, targets, weights, dseq, logits.size(-1));
  }

  // --- Llama-family ops ---------------------------------------------------------------------------------------
  // Contracts in kernels/rmsnorm.h, kernels/rope.h, kernels/swiglu.h, kernels/repeat_kv.h. Dtypes as above:
  // activations A (F32, F64 on the CPU only, BF16); parameter gradients, per-row statistics and the RoPE tables
  // grad_dtype(A). Row-major [N, width] tensors: the last dim is the width, N = numel / width (the leading dims may
  // be [B,T] or [N]).
  //
  // RMSNorm (HF LlamaRMSNorm: statistics in fp32 or wider): rstd[N] = 1 / sqrt(mean_c(inp^2) + eps) (=,
  // grad_dtype(A)), out[N,C] = inp * rstd * w (=). BF16 uses HF's order, out = round_bf16(w * round_bf16(inp *
  // rstd)): HF multiplies by the weight after casting the normalised value back to the input dtype
  // (kernels/rmsnorm.h).
  virtual void rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& w,
                               double eps) = 0;
  // dinp (= with GradWrite::Overwrite, else +=), dw[C] += (grad_dtype(A)).
  virtual void rmsnorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dout, const Tensor& inp,
                                const Tensor& w, const Tensor& rstd, GradWrite dinp_write) = 0;
  // res_out = a + b (=, rounded exactly as residual_forward rounds it), then rmsnorm_forward(ln_out, rstd, res_out,
  // w, eps): bitwise equal to the unfused pair on the same backend. res_out may alias a or b; ln_out aliases
  // nothing.
  virtual void residual_rmsnorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& rstd,
                                        const Tensor& a, const Tensor& b, const Tensor& w, double eps) = 0;

  // Rotary position embedding, HF's rotate_half convention (Llama, Qwen2, Mistral). inp/out [N, W] with
  // W = (n_head + 2 * n_kv_head) * D, each row the heads [q 0..n_head-1 | k 0..n_kv_head-1 | v 0..n_kv_head-1];
  // D = 2 * cos.size(1). cos, sin [P, D/2] in grad_dtype(A) (the model builds the tables), pos [N] I32 in [0, P)
  // (any shape with N elements, e.g. the batch layout's [B,T]). For every q and k head, with c = cos[pos[n], i],
  // s = sin[pos[n], i], i < D/2:  y_i = x_i c - x_{i+D/2} s,   y_{i+D/2} = x_{i+D/2} c + x_i s;   v heads copied
  // unchanged. (=) out may alias inp (in place is the model's use). The CPU throws naming the first bad pos; CUDA
  // writes NaN rows.
  virtual void rope_forward(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin,
                            const Tensor& pos, int64_t n_head, int64_t n_kv_head) = 0;
  // The transpose rotation: dx_i = dy_i c + dy_{i+D/2} s, dx_{i+D/2} = dy_{i+D/2} c - dy_i s; v heads copied. (=,
  // dinp may alias dout)
  virtual void rope_backward(const Tensor& dinp, const Tensor& dout, const Tensor& cos, const Tensor& sin,
                             const Tensor& pos, int64_t n_head, int64_t n_kv_head) = 0;

  // SwiGLU (HF LlamaMLP: down(silu(gate(x)) * up(x))): inp [N, 2I], each row [gate 0..I-1 | up 0..I-1] (the model
  // concatenates gate_proj and up_proj into one weight); out [N, I] = silu(gate) * up (=).
  virtual void swiglu_forward(const Tensor& out, const Tensor& inp) = 0;
  // dinp [N, 2I] (=): d gate = dout * up * silu'(gate), d up = dout * silu(gate).
  virtual void swiglu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) = 0;

  // Grouped-query heads for the existing attention ops (HF's repeat_kv): inp [N, (n_head + 2 n_kv_head) D] ->
  // out [N, 3 n_head D] = [q heads copied | k heads | v heads], where expanded head h takes kv head h / g,
  // g = n_head / n_kv_head (n_head % n_kv_head == 0, else dpo::Error). (=) With n_kv_head == n_head it is a copy
  // and the model may skip it.
  virtual void repeat_kv_forward(const Tensor& out, const Tensor& inp, int64_t n_head, int64_t n_kv_head) = 0;
  // dinp [N, (n_head + 2 n_kv_head) D] (=): q part copied, each kv head the sum of its g expanded heads' gradients,
  // added in head order (fixed order: bitwise reproducible).
  virtual void repeat_kv_backward(const Tensor& dinp, const Tensor& dout, int64_t n_head, int64_t n_kv_head) = 0;

  // --- preference loss (kernels/pair_loss.h) -----------------------------------------------------------------
  // A preference batch of P pairs, rows [chosen 0..P-1, rejected P..2P-1], each pair evaluated by pair_loss_eval
  // (the one per-pair function of both backends):
  //   stats [2P, kSeqStatsWidth]  the policy's logprob_forward seq_stats (kSeqLogp, kSeqTokens are read)
  //   ref_logp [2P]               the reference's summed log-probs; undefined only with RefMode::ReferenceFree
  //   offset [P]                  ODPO offsets (odpo_offset); undefined = 0
  //   out.dseq [2P] (=)           d loss / d logp per row divided by `normalizer` (logprob_backward's dseq)
  //   out.pair_loss [P] (=)       each pair's weighted loss (optional)
  //   out.sums [kPairSumsWidth] F64      the batch sums (PairSum), unnormalised: = , or += with out.accumulate
  // p.rows = PairRows::Interleaved reads and writes pair q at rows 2q and 2q + 1 instead of q and P + q (batch
  // layouts). Pairs [q0, q1) only (0 <= q0 <= q1 <= P; the overload without them takes every pair): rows q and P + q of
  // dseq and entry q of pair_loss for q in the range are written, nothing else of them; sums are those of the
  // range, in pair order. With out.accumulate the range's sum is added to out.sums (one addition per column, in
  // stream order), so consecutive ranges q0 = 0 < q1 < ... < P accumulate a batch's sums chunk by chunk in a fixed
  // order (the chunked LM head, model/gpt2.h). The CPU adds pair by pair in order (the order of batch_loss,
  // train/loss.h); the GPU adds each range's fixed-tree sum.
  // stats, ref_logp, offset, dseq and pair_loss have the per-sequence dtype grad_dtype(A) (F32 on the GPU; F32 or
  // F64 on the CPU), all one dtype. The arithmetic is double on both backends (kernels/pair_loss.h), so they agree
  // to rounding; the sums are in a fixed order on each (bitwise reproducible). The preconditions of pair_loss_eval
  // (completion lengths > 0 where used, finite offsets) are the data pipeline's, not checked here (the GPU could
  // not without a sync); a violation gives non-finite values. p and normalizer are checked
  // (check_preference_loss_args below), shapes and dtypes as for every op.
  struct PairLossOutputs {
    Tensor dseq;       // [2P], required
    Tensor pair_loss;  // [P] or undefined
    Tensor sums;       // [kPairSumsWidth] F64, required
    bool accumulate = false;  // sums += the range's sums (else =)
  };
  virtual void preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp,
                               const Tensor& offset, const PairLossParams& p, double normalizer, int64_t q0,
                               int64_t q1) = 0;
  void preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp, const Tensor& offset,
                       const PairLossParams& p, double normalizer) {
    preference_loss(out, stats, ref_logp, offset, p, normalizer, 0, stats.defined() ? stats.size(0) / 2 : 0);
  }

  // --- optimizer ops (kernels/adamw.h) ------------------------------------------------------------------------
  // One AdamW step, in place on param, m, v (all four tensors: same shape, same floating dtype, no aliasing);
  // grad is read only and multiplied by p.grad_scale first. p.step is 1-based.
  virtual void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                            const AdamWParams& p) = 0;
  // The same step over segments of flat 1-D tensors (param, grad, m, v: same [n], same dtype, no aliasing), in one
  // call (one launch on the GPU): segment k, elements [offset, offset + numel), uses p.weight_decay when its
  // weight_decay flag is set and 0 otherwise; elements outside every segment are untouched. Segments: in range,
  // sorted by offset, non-overlapping (dpo::Error otherwise). Bitwise equal to adamw_update per segment.
  virtual void adamw_update_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                     const std::vector<AdamWSegment>& segs, const AdamWParams& p) = 0;
  // The numerical guard of that update (kernels/adamw.h, adamw_dry_run_segments): the same arguments, nothing
  // written; NonFinite when any param, m or v value the update would write is NaN or +-Inf. The values tested are
  // bitwise those the update stores (one element function). Returns to the host: on the GPU one 4-byte device flag,
  // set by the kernel, is read back (one stream sync). Callers run it before adamw_update_segments and skip the
  // update on NonFinite, so a rejected step leaves param, m and v bit-identical. AdamW itself uses the device form
  // below (adamw_check_segments), which leaves the verdict on the device.
  virtual AdamWCheck adamw_dry_run_segments(const Tensor& param, const Tensor& grad, const Tensor& m,
                                            const Tensor& v, const std::vector<AdamWSegment>& segs,
                                            const AdamWParams& p) = 0;
  // sum(x^2) accumulated in double; bitwise reproducible for a given x whatever the thread count.
  virtual double sum_squares(const Tensor& x) = 0;
  // x *= s, in place.
  virtual void scale(const Tensor& x, double s) = 0;

  // The device step (kernels/adamw.h, "The device step"; AdamW::step_async drives it). None of these returns a value
  // to the host, waits for the device or allocates after its first call. record: F64 [adamw_record::kWidth], state:
  // F64 [adamw_state::kWidth], both on this device; param, grad, m, v as for adamw_update_segments.
  // out: F64 [1] (=) the value sum_squares(x) would return (bitwise: same kernels, same order), left on the device.
  virtual void sum_squares_into(const Tensor& out, const Tensor& x) = 0;
  // The norm, the clipping factor and the non-finite-norm flag from record[kSumSquares] or record[kNorm].
  virtual void adamw_prepare(const Tensor& record, const Tensor& state, AdamWNormFrom from) = 0;
  // The dry run with the record's grad_scale, when the norm is finite: record[kNonFiniteRanks] = 1 if any new value
  // would be NaN or +-Inf.
  virtual void adamw_check_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                                    const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs) = 0;
  // The update, unless the record says skip; copy (optional, BF16 [n], F32 param only) = the new param rounded to
  // BF16 for every updated element; GradAfterStep::Zero zeroes the gradient's segment elements either way.
  virtual void adamw_apply_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                                    const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs,
                                    const Tensor& copy, GradAfterStep after) = 0;
};

// The dtype of parameter gradients, LayerNorm statistics and per-sequence scalars for activation dtype `a`:
// F32 for BF16 (and F16), else `a`.
inline DType grad_dtype(DType a) { return (a == DType::BF16 || a == DType::F16) ? DType::F32 : a; }

// The row stride (last dim) of `t`, whose rows hold `width` valid elements and then padding (the "Padded rows"
// convention above): ld >= width, and when ld > width, ld * dtype size a multiple of 16 bytes. Throws dpo::Error
// naming `name` otherwise. Both backends apply the same rule, so a padded layout that runs on the CPU runs on a GPU.
inline int64_t check_row_stride(const Tensor& t, int64_t width, const char* name) {
  const int64_t ld = t.dim() > 0 ? t.size(-1) : 0;
  if (ld < width)
    throw Error(std::string(name) + " " + shape_str(t.shape()) + ": last dim " + std::to_string(ld) +
                " is smaller than the row's width " + std::to_string(width));
  if (ld > width && (ld * dtype_size(t.dtype())) % 16 != 0)
    throw Error(std::string(name) + " " + shape_str(t.shape()) + ": a padded row stride must be a multiple of 16 " +
                "bytes, got " + std::to_string(ld) + " " + dtype_name(t.dtype()) + " elements for width " +
                std::to_string(width));
  return ld;
}

// The checks of gather_rows / scatter_add_rows that do not depend on the device: `rows` [n, C] (out / dout) and
// `all` [N, C] (inp / dinp) 2-D with the same C and dtype, idx [n] I32 (dpo::Error naming `op` otherwise). The
// entries of idx are the backends' to check (or not: runtime/backend.h above).
struct RowIndexShape {
  int64_t n, N, C;
};
inline RowIndexShape check_row_index_args(const Tensor& rows, const Tensor& all, const Tensor& idx, const char* op) {
  const std::string o(op);
  DPO_ASSERT(rows.defined() && all.defined() && idx.defined(), o + ": a tensor is undefined");
  DPO_ASSERT(rows.dim() == 2 && all.dim() == 2 && rows.size(1) == all.size(1),
             o + ": expected [n,C] and [N,C] rows, got " + shape_str(rows.shape()) + " and " + shape_str(all.shape()));
  check_same_dtype(rows, all, (o + " rows").c_str(), (o + " table").c_str());
  check_dtype(idx, DType::I32, (o + " idx").c_str());
  check_shape(idx, {rows.size(0)}, (o + " idx").c_str());
  return {rows.size(0), all.size(0), rows.size(1)};
}

// The shape checks of the Llama-family ops that do not depend on the device (dpo::Error naming the op and argument).
// Head layout [N, (n_head + 2 n_kv_head) D] of `t`: n_head >= 1, n_kv_head >= 1, the last dim a multiple of
// n_head + 2 n_kv_head; returns {N, D}. `need_groups`: n_head % n_kv_head == 0 as well (repeat_kv).
struct LlamaHeads {
  int64_t N, D;
};
inline LlamaHeads check_llama_heads(const Tensor& t, int64_t n_head, int64_t n_kv_head, bool need_groups,
                                    const char* name) {
  const std::string nm(name);
  DPO_ASSERT(t.defined(), nm + ": tensor is undefined");
  DPO_ASSERT(n_head >= 1 && n_kv_head >= 1, nm + ": n_head and n_kv_head must be >= 1, got " +
                                                std::to_string(n_head) + " and " + std::to_string(n_kv_head));
  DPO_ASSERT(!need_groups || n_head % n_kv_head == 0,
             nm + ": n_head " + std::to_string(n_head) + " is not a multiple of n_kv_head " +
                 std::to_string(n_kv_head) + " (grouped-query attention shares each kv head among n_head / n_kv_head "
                 "query heads)");
  const int64_t heads = n_head + 2 * n_kv_head;
  const int64_t W = t.dim() > 0 ? t.size(-1) : 0;
  DPO_ASSERT(W > 0 && W % heads == 0, nm + " " + shape_str(t.shape()) + ": the last dim must be (n_head + 2 * "
                                           "n_kv_head) * head_size = " + std::to_string(heads) + " * D");
  return {t.numel() / W, W / heads};
}
// Row-major [N, width] view of `t`: the last dim equals `width` (> 0); returns N.
inline int64_t check_llama_rows(const Tensor& t, int64_t width, const char* name) {
  DPO_ASSERT(t.defined(), std::string(name) + ": tensor is undefined");
  DPO_ASSERT(width > 0 && t.dim() > 0 && t.size(-1) == width,
             std::string(name) + " " + shape_str(t.shape()) + ": expected rows of " + std::to_string(width));
  return t.numel() / width;
}

// The checks of preference_loss that do not depend on the device: p.n_terms in [1, kMaxLossTerms], every type a
// LossType, normalizer finite and > 0 (dpo::Error otherwise; LossConfig::validate has checked the rest), ref_logp
// defined unless p.ref is ReferenceFree, stats [2P, kSeqStatsWidth]; the shapes of ref_logp [2P], offset [P], dseq
// [2P], pair_loss [P], sums [kPairSumsWidth] F64; 0 <= q0 <= q1 <= P. Returns P.
inline int64_t check_preference_loss_args(const Backend::PairLossOutputs& out, const Tensor& stats,
                                          const Tensor& ref_logp, const Tensor& offset, const PairLossParams& p,
                                          double normalizer, int64_t q0, int64_t q1) {
  DPO_ASSERT(p.n_terms >= 1 && p.n_terms <= kMaxLossTerms,
             "preference_loss: n_terms must be in [1, " + std::to_string(kMaxLossTerms) + "], got " +
                 std::to_string(p.n_terms));
  for (int i = 0; i < p.n_terms; ++i) {
    const auto t = static_cast<int32_t>(p.type[i]);
    DPO_ASSERT(t >= 0 && t < kNumLossTypes,
               "preference_loss: term " + std::to_string(i) + " has no loss type (" + std::to_string(t) + ")");
  }
  DPO_ASSERT(std::isfinite(normalizer) && normalizer > 0,
             "preference_loss: normalizer must be finite and > 0, got " + std::to_string(normalizer));
  DPO_ASSERT(stats.defined() && stats.dim() == 2 && stats.size(1) == kSeqStatsWidth && stats.size(0) % 2 == 0,
             "preference_loss: stats must be [2P, " + std::to_string(kSeqStatsWidth) + "], got " +
                 (stats.defined() ? shape_str(stats.shape()) : std::string("undefined")));
  const int64_t P = stats.size(0) / 2;
  if (p.ref == RefMode::WithReference)
    DPO_ASSERT(ref_logp.defined(), "preference_loss: ref_logp is undefined but the loss uses the reference (only "
                                   "RefMode::ReferenceFree may leave it out)");
  if (ref_logp.defined()) check_shape(ref_logp, {2 * P}, "preference_loss ref_logp");
  if (offset.defined()) check_shape(offset, {P}, "preference_loss offset");
  DPO_ASSERT(out.dseq.defined(), "preference_loss: out.dseq is undefined");
  check_shape(out.dseq, {2 * P}, "preference_loss dseq");
  if (out.pair_loss.defined()) check_shape(out.pair_loss, {P}, "preference_loss pair_loss");
  DPO_ASSERT(out.sums.defined(), "preference_loss: out.sums is undefined");
  check_shape(out.sums, {kPairSumsWidth}, "preference_loss sums");
  check_dtype(out.sums, DType::F64, "preference_loss sums");
  DPO_ASSERT(0 <= q0 && q0 <= q1 && q1 <= P, "preference_loss: pairs [" + std::to_string(q0) + ", " +
                                                  std::to_string(q1) + ") out of range for " + std::to_string(P) +
                                                  " pairs");
  return P;
}

// `host` itself when `be` is the CPU backend, else a copy on be's device (same dtype).
Tensor to_backend(Backend& be, const Tensor& host);
// Any tensor of `be`, converted to a host vector of doubles.
std::vector<double> to_host_f64(Backend& be, const Tensor& t);

// Which CPU attention the CPU backend runs (kernels/attention.h). Tiled: the blocked kernels, which save only the
// per-row log-sum-exp and the key mask. Reference: the plain kernels, which save the probabilities [B,NH,T,T] (the
// oracle; tests that compare another backend's saved probabilities use it).
enum class CpuAttention { Tiled, Reference };

// The CPU backend over the CPU kernels. `num_threads` <= 0 keeps OpenMP's default.
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0, CpuAttention attention = CpuAttention::Tiled);

#ifdef DPO_HAVE_CUDA
// The CUDA backend on GPU `device` (runtime/cuda/cuda_backend.h): F32 or BF16 activations, kernels/*.cu. Declared and
// defined only when the build has CUDA (DPO_HAVE_CUDA, set by CMake when nvcc is found); it throws dpo::Error when
// `device` does not exist (e.g. no GPU on this machine).
std::unique_ptr<Backend> make_cuda_backend(int device);
#endif

}  // namespace dpo
