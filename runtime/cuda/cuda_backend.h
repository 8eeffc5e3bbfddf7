// CudaBackend: the Backend op interface (runtime/backend.h) on one GPU, over the launchers in kernels/*.cuh and a
// CudaContext (runtime/cuda/cuda_context.h). Model and trainer code see only Backend&.
//
// Tensors. The activation dtype A of a GPT-2 op is F32 or BF16 (runtime/backend.h, "Mixed precision"); F64 and F16
// throw dpo::Error naming the argument. With A = F32 every floating argument is F32 (the fp32 parity mode). With
// A = BF16 the activations, their gradients and the parameters the ops read are BF16, and parameter gradients,
// LayerNorm statistics and per-sequence scalars are grad_dtype(A) = F32; the kernels read BF16 exactly, compute in
// fp32 and round each BF16 output once (kernels/*.cuh). The optimizer ops (adamw_*, sum_squares, scale) take F32
// only: they work on the F32 master weights and gradients. Token ids, targets and masks are I32. Every tensor must
// live on this backend's device; the checks (defined, device, dtype, shape) are those of CpuBackend plus device and
// dtype for every argument, once per call, before any launch. empty() accepts any dtype (it is memory only);
// copy_from_host / copy_to_host convert between floating dtypes (or I32/I64) on the host, e.g. a host F64 parameter
// vector into a device F32 one; convert() converts on the device (kernels/elementwise.cuh).
//
// Streams and host syncs. Every op is enqueued on the context's single stream and returns without waiting. The
// host blocks only in:
//   - copy_to_host: the caller reads the host buffer on return (one cudaStreamSynchronize);
//   - sum_squares: it returns a host double (one sync); the device step uses sum_squares_into instead;
//   - adamw_dry_run_segments: it returns whether the step's update would be finite (one 4-byte read, one sync);
//     the device step (sum_squares_into, adamw_prepare, adamw_check_segments, adamw_apply_segments) never waits;
//   - synchronize();
//   - copy_from_host from page-locked host memory, so that the caller may reuse the buffer on return. From ordinary
//     pageable memory (Tensor::host) cudaMemcpyAsync has staged the bytes before it returns, so no sync is needed.
// Errors inside a kernel therefore surface at the next of these points (CUDA's asynchronous error model).
//
// Lifetime. Device tensors hold a reference to the context (stream, device), so a tensor may outlive the backend
// that made it; the memory is freed in stream order on that stream. The calling thread's current device must be
// this backend's device (the constructor selects it); one backend per device per process is the intended use.
#pragma once

#include <memory>
#include <string>

#include "kernels/adamw.cuh"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo {

class CudaBackend final : public Backend {
 public:
  // Selects `device` before anything else is created on it (throws dpo::Error for a device that does not exist).
  explicit CudaBackend(int device);
  ~CudaBackend() override = default;

  CudaContext& context() { return *ctx_; }

  Device device() const override;
  std::string name() const override { return "cuda"; }

  Tensor empty(Shape shape, DType dtype) override;
  void fill_zero(const Tensor& t) override;
  void copy_from_host(const Tensor& dst, const Tensor& host_src) override;
  void copy_to_host(const Tensor& host_dst, const Tensor& src) override;
  void copy(const Tensor& dst, const Tensor& src) override;
  // F32, F64, BF16 in any direction, one launch (kernels/elementwise.cuh: round to nearest even, NaN stays NaN); the
  // same dtype is copy(). dst and src must not overlap.
  void convert(const Tensor& dst, const Tensor& src) override;
  void synchronize() override;
  void* native_stream() const override { return static_cast<void*>(ctx_->stream()); }
  // A CUDA graph of the stream's work (runtime/backend.h): cudaStreamBeginCapture in thread-local mode, so a call
  // that is not allowed during capture (a synchronisation, a synchronous copy, cudaMalloc) fails and the capture
  // is abandoned with GraphCaptureError instead of running; cudaGraphInstantiate; replay() is one cudaGraphLaunch
  // on the same stream.
  std::unique_ptr<Graph> capture(const std::function<void()>& fn) override;

  void encoder_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) override;
  void encoder_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens) override;
  // Positions outside [0, P) are not checked here (a sync): NaN out rows, no dwpe contribution (kernels/encoder.cuh).
  void encoder_forward_pos(const Tensor& out, const Tensor& tokens, const Tensor& pos, const Tensor& wte,
                           const Tensor& wpe) override;
  void encoder_backward_pos(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens,
                            const Tensor& pos) override;
  void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp, const Tensor& w,
                         const Tensor& b, double eps) override;
  using Backend::layernorm_backward;
  void layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout, const Tensor& inp,
                          const Tensor& w, const Tensor& mean, const Tensor& rstd, GradWrite dinp_write) override;
  // One kernel (kernels/layernorm.cuh), bitwise equal to residual_forward + layernorm_forward on this backend.
  void residual_layernorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& mean, const Tensor& rstd,
                                  const Tensor& a, const Tensor& b, const Tensor& w, const Tensor& bias,
                                  double eps) override;
  // out (forward) and dout (backward) may have a padded last dim ld > OC (runtime/backend.h, "Padded rows"): it is
  // cuBLASLt's leading dimension, and only columns [0, OC) are read or written (kernels/matmul.cuh).
  // The Llama-family ops (runtime/backend.h; kernels/rmsnorm.cuh, rope.cuh, swiglu.cuh, repeat_kv.cuh). One launch
  // each (rmsnorm_backward: two, the dw partials and their fixed-order reduce), no host sync, no atomics. RoPE does
  // not check the positions (a sync): a row whose position is outside [0, P) is written NaN (kernels/rope.cuh).
  void rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& w, double eps) override;
  void rmsnorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dout, const Tensor& inp, const Tensor& w,
                        const Tensor& rstd, GradWrite dinp_write) override;
  void residual_rmsnorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& rstd, const Tensor& a,
                                const Tensor& b, const Tensor& w, double eps) override;
  void rope_forward(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin, const Tensor& pos,
                    int64_t n_head, int64_t n_kv_head) override;
  void rope_backward(const Tensor& dinp, const Tensor& dout, const Tensor& cos, const Tensor& sin, const Tensor& pos,
                     int64_t n_head, int64_t n_kv_head) override;
  void swiglu_forward(const Tensor& out, const Tensor& inp) override;
  void swiglu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) override;
  void repeat_kv_forward(const Tensor& out, const Tensor& inp, int64_t n_head, int64_t n_kv_head) override;
  void repeat_kv_backward(const Tensor& dinp, const Tensor& dout, int64_t n_head, int64_t n_kv_head) override;
  void matmul_forward(const Tensor& out, const Tensor& inp, const Tensor& w, const Tensor& bias,
                      WeightLayout layout) override;
  using Backend::matmul_backward;
  void matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout, const Tensor& inp,
                       const Tensor& w, WeightLayout layout, GradWrite dinp_write) override;
  // BF16: cuBLASLt's GELU_AUX_BIAS / DGELU epilogues where the call fits them (kernels/matmul.cuh), else the unfused
  // ops. F32 (the parity mode): always the unfused ops (matmul_backward_dgelu through a scratch for the product).
  void matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp, const Tensor& w,
                           const Tensor& bias, WeightLayout layout) override;
  void matmul_backward_dgelu(const Tensor& dpre, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                             const Tensor& inp, const Tensor& w, const Tensor& pre, WeightLayout layout) override;
  // Two attention implementations (set_attention_impl; HF's key attn_implementation, docs/training.md):
  //   Eager (the default): the materialised kernels (kernels/attention.cuh). Saved state: the probabilities
  //     [B,NH,T,T], as on the CPU's reference kernels, in the activation dtype (BF16 probabilities for A = BF16,
  //     rounded once from the fp32 softmax). The backward ignores `out`.
  //   Flash: the tensor-core kernels (kernels/flash_attention.h), A = BF16 only (an F32 call throws dpo::Error:
  //     fp32 is the parity mode and stays on the eager kernels); head size C / NH of 64 or 128. Saved state: F32
  //     [B*NH*T + B*T], the CPU blocked kernels' layout (model/memory_plan.h, RowStats): the log-sum-exp
  //     [B,NH,T] of every query row, then one entry per slot saying which forward wrote it, 1 / 0 for the key
  //     mask's real / padding slots (the key-mask form), 2 for the spans form. The key-mask form runs the flash
  //     kernels on the padded layout's spans of the mask (cuda::attention_keymask_spans into a workspace: real
  //     slot t -> {first real slot of the row, t, t}, padding slot t -> {t, t, t}; a null mask is all real), and
  //     its backward derives them again from the saved entries, so the mask need not be passed to it. Padding
  //     query slots thus see only themselves (eager: left padding sees nothing, right padding the real keys); their
  //     outputs are never scored and get no gradient, so the model's real slots are unaffected. The backward reads
  //     the forward's `out` (delta = rowsum(dout * out)) and accumulates into dqkv (GradWrite::Accumulate, one
  //     rounding). Workspaces (the spans I32 [B*T*3], delta F32 [B*NH*T]) are owned here and only grow, so a
  //     steady shape allocates nothing (CUDA graphs). They grow only for a B*T (B*NH*T) above every earlier
  //     call's, which grows the model's own activation buffers too (GPT2::buffers_generation), so the trainer
  //     recaptures its graphs before one could replay a freed workspace address (as for CudaContext::scratch). Deterministic: two runs give bitwise equal results.
  // Neither checks the spans on the host (a sync): a span that is not valid makes its query's output NaN (eager)
  // or that of a query seeing nothing 0 (flash, kernels/flash_attention.h); never an out-of-bounds access.
  void set_attention_impl(AttentionImpl impl) override { attn_impl_ = impl; }
  AttentionImpl attention_impl() const override { return attn_impl_; }
  Shape attention_saved_shape(int64_t B, int64_t T, int64_t NH) const override {
    if (attn_impl_ == AttentionImpl::Flash) return {B * NH * T + B * T};
    return {B, NH, T, T};
  }
  DType attention_saved_dtype(DType activation) const override {
    return attn_impl_ == AttentionImpl::Flash ? DType::F32 : activation;
  }
  void attention_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                         int64_t n_head) override;
  void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                          const Tensor& saved, int64_t n_head) override;
  // Spans (kernels/attention.cuh): the span tensor is not read on the host (that would need a sync). The eager
  // backward is attention_backward's (the saved probabilities carry the spans); it checks the span tensor's shape
  // and dtype only. The flash backward takes the spans again.
  void attention_forward_spans(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& span,
                               int64_t n_head) override;
  void attention_backward_spans(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                const Tensor& saved, const Tensor& span, int64_t n_head) override;
  // The key/value cache ops (kernels/attention.cuh): F32 or BF16 caches. A position outside [0, Tc) is not checked
  // here (it would need a sync): that sequence's out row becomes NaN and its cache is left as it was.
  void attention_cache_store(const Tensor& kcache, const Tensor& vcache, const Tensor& qkv) override;
  void attention_decode_forward(const Tensor& out, const Tensor& kcache, const Tensor& vcache, const Tensor& qkv,
                                const Tensor& pos, int64_t n_head) override;
  void gelu_forward(const Tensor& out, const Tensor& inp) override;
  using Backend::gelu_backward;
  void gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, GradWrite dinp_write) override;
  void residual_forward(const Tensor& out, const Tensor& a, const Tensor& b) override;
  void residual_backward(const Tensor& da, const Tensor& db, const Tensor& dout) override;
  // Targets outside [0, V) with a non-zero weight cannot be reported here without a device sync; see
  // kernels/logprob.cuh for what the kernel does with them (the data pipeline validates every id).
  // Padded logits [B,T,ld] (runtime/backend.h, "Padded rows"): only columns [0, V) are read or written.
  using Backend::logprob_backward;
  using Backend::logprob_forward;
  void logprob_forward(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets, const Tensor& weights,
                       int64_t V) override;
  void logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets, const Tensor& weights,
                        const Tensor& dseq, int64_t V) override;
  // The index entries are not checked here (a sync): kernels/gather.cuh says what an entry out of range does.
  // gather_rows takes 2- and 4-byte dtypes (BF16, F32, I32); scatter_add_rows the activation dtype.
  void gather_rows(const Tensor& out, const Tensor& inp, const Tensor& idx) override;
  void scatter_add_rows(const Tensor& dinp, const Tensor& dout, const Tensor& idx) override;
  // The ranges are not checked here (a sync); every access is clamped to [0, B*T) (kernels/logprob.cuh).
  void logprob_forward_segments(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                const Tensor& weights, const Tensor& seg, int64_t V) override;
  void logprob_backward_segments(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                 const Tensor& weights, const Tensor& seg, const Tensor& dseq, int64_t V) override;

  // One launch (kernels/pair_loss.cuh), no host sync: the loss's inputs, gradients and sums stay on the device.
  // F32 per-sequence tensors, F64 sums.
  void preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp, const Tensor& offset,
                       const PairLossParams& p, double normalizer, int64_t q0, int64_t q1) override;
  using Backend::preference_loss;

  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                    const AdamWParams& p) override;
  // One launch (kernels/adamw.cuh). The segment table is uploaded on the first call and again only when the
  // segments change (then one stream-ordered copy; never a host sync).
  void adamw_update_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                             const std::vector<AdamWSegment>& segs, const AdamWParams& p) override;
  // Deterministic (kernels/elementwise.cuh): bitwise the same for the same x on every run; syncs once.
  // One launch over the same cached segment table, then the 4-byte flag is read back: one stream sync.
  AdamWCheck adamw_dry_run_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                    const std::vector<AdamWSegment>& segs, const AdamWParams& p) override;
  double sum_squares(const Tensor& x) override;
  void scale(const Tensor& x, double s) override;
  // The device step (kernels/adamw.cuh): launches only, no sync, no allocation after the first sum_squares_into
  // (which allocates the norm's scratch once).
  void sum_squares_into(const Tensor& out, const Tensor& x) override;
  void adamw_prepare(const Tensor& record, const Tensor& state, AdamWNormFrom from) override;
  void adamw_check_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                            const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs) override;
  void adamw_apply_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                            const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs, const Tensor& copy,
                            GradAfterStep after) override;

 private:
  void check_device(const Tensor& t, const char* name) const;
  void check_f32(const Tensor& t, const char* name) const;
  // On this device with dtype F32 or BF16, which it returns: the activation dtype A of a call.
  DType check_activation(const Tensor& t, const char* name) const;
  // On this device with dtype `expect` (A or grad_dtype(A)).
  void check_is(const Tensor& t, DType expect, const char* name) const;
  void check_i32(const Tensor& t, const char* name) const;
  void check_adamw_args(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                        const AdamWParams& p) const;
  void check_step_tensors(const Tensor& record, const Tensor& state) const;
  // The flash forms of the attention ops (span undefined: the key-mask form).
  void flash_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                     const Tensor& span, int64_t n_head);
  void flash_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                      const Tensor& saved, const Tensor& span, int64_t n_head);
  // rope_forward (backward = false) and rope_backward: the same kernel, the transpose rotation for the backward.
  void rope_any(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin, const Tensor& pos,
                int64_t n_head, int64_t n_kv_head, bool backward);
  // `ws` holding at least n elements of dtype dt (grown only; the old buffer is freed in stream order).
  void grow_workspace(Tensor& ws, int64_t n, DType dt);

  std::shared_ptr<CudaContext> ctx_;
  cuda::AdamWSegmentTable adamw_segments_;  // after ctx_: freed on its stream before the context goes
  Tensor norm_scratch_;  // F64 [cuda::kSumSquaresBlocks], sum_squares_into's partial sums (holds the context)
  AttentionImpl attn_impl_ = AttentionImpl::Eager;
  Tensor flash_spans_;  // I32, the key-mask form's spans (grown only)
  Tensor flash_delta_;  // F32, the flash backward's delta (grown only)
};

}  // namespace dpo
