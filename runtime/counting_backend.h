// CountingBackend: a Backend that forwards every call to another Backend and counts the calls that make the host
// wait for the device, so that a test can assert how often a training or optimizer step waits.
//
// What is counted (per call, whatever the wrapped backend does inside it):
//   synchronize     synchronize()
//   copy_to_host    copy_to_host(): the caller reads the host tensor on return, so the device must have finished
//   value_returns   ops whose result is a host value computed on the device: sum_squares, adamw_dry_run_segments
//   copy_from_host  copy_from_host(): an upload. Not a wait on the CUDA backend from pageable memory (the bytes are
//                   staged before the call returns), but one from page-locked memory waits, and any upload is a
//                   host-to-device transfer inside the step; counted on its own.
//   allocations     empty() (zeros() goes through it): device allocations requested through the backend
//   ops             every forwarded call
// waits() = synchronize + copy_to_host + value_returns. The names of the counted calls (all but `ops` and
// `allocations`) are kept in order in log(), for failure messages. Not thread-safe (neither are the backends).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/backend.h"

namespace dpo {

class CountingBackend final : public Backend {
 public:
  struct Counts {
    int64_t synchronize = 0;
    int64_t copy_to_host = 0;
    int64_t value_returns = 0;
    int64_t copy_from_host = 0;
    int64_t allocations = 0;
    int64_t ops = 0;
    int64_t waits() const { return synchronize + copy_to_host + value_returns; }
  };

  // `inner` must outlive this wrapper. Tensors are inner's: device() and name() are inner's too.
  explicit CountingBackend(Backend& inner) : inner_(&inner) {}

  const Counts& counts() const { return counts_; }
  const std::vector<std::string>& log() const { return log_; }
  // The log as one line ("copy_to_host, sum_squares"), for failure messages.
  std::string log_line() const;
  void reset();
  Backend& inner() { return *inner_; }

  Device device() const override { return inner_->device(); }
  std::string name() const override { return inner_->name(); }

  Tensor empty(Shape shape, DType dtype) override;
  void fill_zero(const Tensor& t) override;
  void copy_from_host(const Tensor& dst, const Tensor& host_src) override;
  void copy_to_host(const Tensor& host_dst, const Tensor& src) override;
  void copy(const Tensor& dst, const Tensor& src) override;
  void convert(const Tensor& dst, const Tensor& src) override;
  void synchronize() override;
  void* native_stream() const override { return inner_->native_stream(); }
  // Forwarded: the inner backend records (a CUDA graph on the GPU). fn's calls go through this wrapper, so they
  // are counted when fn runs: once at a CUDA capture (a replay then counts as one op), again at every replay on the
  // CPU, whose recording is fn itself.
  std::unique_ptr<Graph> capture(const std::function<void()>& fn) override;

  void encoder_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) override;
  void encoder_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens) override;
  void encoder_forward_pos(const Tensor& out, const Tensor& tokens, const Tensor& pos, const Tensor& wte,
                           const Tensor& wpe) override;
  void encoder_backward_pos(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens,
                            const Tensor& pos) override;
  void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp, const Tensor& w,
                         const Tensor& b, double eps) override;
  using Backend::layernorm_backward;
  void layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout, const Tensor& inp,
                          const Tensor& w, const Tensor& mean, const Tensor& rstd, GradWrite dinp_write) override;
  void residual_layernorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& mean, const Tensor& rstd,
                                  const Tensor& a, const Tensor& b, const Tensor& w, const Tensor& bias,
                                  double eps) override;
  void matmul_forward(const Tensor& out, const Tensor& inp, const Tensor& w, const Tensor& bias,
                      WeightLayout layout) override;
  using Backend::matmul_backward;
  void matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout, const Tensor& inp,
                       const Tensor& w, WeightLayout layout, GradWrite dinp_write) override;
  void matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp, const Tensor& w, const Tensor& bias,
                           WeightLayout layout) override;
  void matmul_backward_dgelu(const Tensor& dpre, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                             const Tensor& inp, const Tensor& w, const Tensor& pre, WeightLayout layout) override;
  Shape attention_saved_shape(int64_t B, int64_t T, int64_t NH) const override {
    return inner_->attention_saved_shape(B, T, NH);
  }
  DType attention_saved_dtype(DType activation) const override { return inner_->attention_saved_dtype(activation); }
  void attention_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                         int64_t n_head) override;
  void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                          const Tensor& saved, int64_t n_head) override;
  void set_attention_impl(AttentionImpl impl) override { inner_->set_attention_impl(impl); }
  AttentionImpl attention_impl() const override { return inner_->attention_impl(); }
  void attention_forward_spans(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& span,
                               int64_t n_head) override;
  void attention_backward_spans(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                const Tensor& saved, const Tensor& span, int64_t n_head) override;
  void attention_cache_store(const Tensor& kcache, const Tensor& vcache, const Tensor& qkv) override;
  void attention_decode_forward(const Tensor& out, const Tensor& kcache, const Tensor& vcache, const Tensor& qkv,
                                const Tensor& pos, int64_t n_head) override;
  void gelu_forward(const Tensor& out, const Tensor& inp) override;
  using Backend::gelu_backward;
  void gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, GradWrite dinp_write) override;
  void residual_forward(const Tensor& out, const Tensor& a, const Tensor& b) override;
  void residual_backward(const Tensor& da, const Tensor& db, const Tensor& dout) override;
  using Backend::logprob_backward;
  using Backend::logprob_forward;
  void logprob_forward(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets, const Tensor& weights,
                       int64_t V) override;
  void logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets, const Tensor& weights,
                        const Tensor& dseq, int64_t V) override;
  void gather_rows(const Tensor& out, const Tensor& inp, const Tensor& idx) override;
  void scatter_add_rows(const Tensor& dinp, const Tensor& dout, const Tensor& idx) override;
  void logprob_forward_segments(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                const Tensor& weights, const Tensor& seg, int64_t V) override;
  void logprob_backward_segments(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                 const Tensor& weights, const Tensor& seg, const Tensor& dseq, int64_t V) override;
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
  using Backend::preference_loss;
  void preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp, const Tensor& offset,
                       const PairLossParams& p, double normalizer, int64_t q0, int64_t q1) override;

  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                    const AdamWParams& p) override;
  void adamw_update_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                             const std::vector<AdamWSegment>& segs, const AdamWParams& p) override;
  AdamWCheck adamw_dry_run_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                    const std::vector<AdamWSegment>& segs, const AdamWParams& p) override;
  double sum_squares(const Tensor& x) override;
  void scale(const Tensor& x, double s) override;
  void sum_squares_into(const Tensor& out, const Tensor& x) override;
  void adamw_prepare(const Tensor& record, const Tensor& state, AdamWNormFrom from) override;
  void adamw_check_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                            const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs) override;
  void adamw_apply_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                            const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs, const Tensor& copy,
                            GradAfterStep after) override;

 private:
  enum class Kind { Op, Synchronize, CopyToHost, ValueReturn, CopyFromHost, Allocation };
  void count(Kind k, const char* name);

  Backend* inner_;
  Counts counts_;
  std::vector<std::string> log_;
};

}  // namespace dpo
