#include "runtime/counting_backend.h"

namespace dpo {

void CountingBackend::count(Kind k, const char* name) {
  ++counts_.ops;
  switch (k) {
    case Kind::Op: return;
    case Kind::Allocation: ++counts_.allocations; return;
    case Kind::Synchronize: ++counts_.synchronize; break;
    case Kind::CopyToHost: ++counts_.copy_to_host; break;
    case Kind::ValueReturn: ++counts_.value_returns; break;
    case Kind::CopyFromHost: ++counts_.copy_from_host; break;
  }
  log_.emplace_back(name);
}

void CountingBackend::reset() {
  counts_ = Counts{};
  log_.clear();
}

std::string CountingBackend::log_line() const {
  std::string s;
  for (const std::string& n : log_) s += (s.empty() ? "" : ", ") + n;
  return s.empty() ? "(none)" : s;
}

Tensor CountingBackend::empty(Shape shape, DType dtype) {
  count(Kind::Allocation, "empty");
  return inner_->empty(std::move(shape), dtype);
}
void CountingBackend::fill_zero(const Tensor& t) {
  count(Kind::Op, "fill_zero");
  inner_->fill_zero(t);
}
void CountingBackend::copy_from_host(const Tensor& dst, const Tensor& host_src) {
  count(Kind::CopyFromHost, "copy_from_host");
  inner_->copy_from_host(dst, host_src);
}
void CountingBackend::copy_to_host(const Tensor& host_dst, const Tensor& src) {
  count(Kind::CopyToHost, "copy_to_host");
  inner_->copy_to_host(host_dst, src);
}
void CountingBackend::copy(const Tensor& dst, const Tensor& src) {
  count(Kind::Op, "copy");
  inner_->copy(dst, src);
}
void CountingBackend::convert(const Tensor& dst, const Tensor& src) {
  count(Kind::Op, "convert");
  inner_->convert(dst, src);
}
void CountingBackend::synchronize() {
  count(Kind::Synchronize, "synchronize");
  inner_->synchronize();
}

void CountingBackend::encoder_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) {
  count(Kind::Op, "encoder_forward");
  inner_->encoder_forward(out, tokens, wte, wpe);
}
void CountingBackend::encoder_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                                       const Tensor& tokens) {
  count(Kind::Op, "encoder_backward");
  inner_->encoder_backward(dwte, dwpe, dout, tokens);
}
void CountingBackend::encoder_forward_pos(const Tensor& out, const Tensor& tokens, const Tensor& pos,
                                          const Tensor& wte, const Tensor& wpe) {
  count(Kind::Op, "encoder_forward_pos");
  inner_->encoder_forward_pos(out, tokens, pos, wte, wpe);
}
void CountingBackend::encoder_backward_pos(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                                           const Tensor& tokens, const Tensor& pos) {
  count(Kind::Op, "encoder_backward_pos");
  inner_->encoder_backward_pos(dwte, dwpe, dout, tokens, pos);
}
void CountingBackend::layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                                        const Tensor& w, const Tensor& b, double eps) {
  count(Kind::Op, "layernorm_forward");
  inner_->layernorm_forward(out, mean, rstd, inp, w, b, eps);
}
void CountingBackend::layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout,
                                         const Tensor& inp, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                                         GradWrite dinp_write) {
  count(Kind::Op, "layernorm_backward");
  inner_->layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, dinp_write);
}
void CountingBackend::residual_layernorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& mean,
                                                 const Tensor& rstd, const Tensor& a, const Tensor& b,
                                                 const Tensor& w, const Tensor& bias, double eps) {
  count(Kind::Op, "residual_layernorm_forward");
  inner_->residual_layernorm_forward(res_out, ln_out, mean, rstd, a, b, w, bias, eps);
}
void CountingBackend::matmul_forward(const Tensor& out, const Tensor& inp, const Tensor& w, const Tensor& bias,
                                     WeightLayout layout) {
  count(Kind::Op, "matmul_forward");
  inner_->matmul_forward(out, inp, w, bias, layout);
}
void CountingBackend::matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                                      const Tensor& inp, const Tensor& w, WeightLayout layout, GradWrite dinp_write) {
  count(Kind::Op, "matmul_backward");
  inner_->matmul_backward(dinp, dw, dbias, dout, inp, w, layout, dinp_write);
}
void CountingBackend::matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp, const Tensor& w,
                                          const Tensor& bias, WeightLayout layout) {
  count(Kind::Op, "matmul_gelu_forward");
  inner_->matmul_gelu_forward(out, pre, inp, w, bias, layout);
}
void CountingBackend::matmul_backward_dgelu(const Tensor& dpre, const Tensor& dw, const Tensor& dbias,
                                            const Tensor& dout, const Tensor& inp, const Tensor& w, const Tensor& pre,
                                            WeightLayout layout) {
  count(Kind::Op, "matmul_backward_dgelu");
  inner_->matmul_backward_dgelu(dpre, dw, dbias, dout, inp, w, pre, layout);
}
void CountingBackend::attention_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv,
                                        const Tensor& keymask, int64_t n_head) {
  count(Kind::Op, "attention_forward");
  inner_->attention_forward(out, saved, qkv, keymask, n_head);
}
void CountingBackend::attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                                         const Tensor& out, const Tensor& saved, int64_t n_head) {
  count(Kind::Op, "attention_backward");
  inner_->attention_backward(dqkv, dout, qkv, out, saved, n_head);
}
void CountingBackend::attention_forward_spans(const Tensor& out, const Tensor& saved, const Tensor& qkv,
                                              const Tensor& span, int64_t n_head) {
  count(Kind::Op, "attention_forward_spans");
  inner_->attention_forward_spans(out, saved, qkv, span, n_head);
}
void CountingBackend::attention_backward_spans(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                                               const Tensor& out, const Tensor& saved, const Tensor& span,
                                               int64_t n_head) {
  count(Kind::Op, "attention_backward_spans");
  inner_->attention_backward_spans(dqkv, dout, qkv, out, saved, span, n_head);
}
void CountingBackend::attention_cache_store(const Tensor& kcache, const Tensor& vcache, const Tensor& qkv) {
  count(Kind::Op, "attention_cache_store");
  inner_->attention_cache_store(kcache, vcache, qkv);
}
void CountingBackend::attention_decode_forward(const Tensor& out, const Tensor& kcache, const Tensor& vcache,
                                               const Tensor& qkv, const Tensor& pos, int64_t n_head) {
  count(Kind::Op, "attention_decode_forward");
  inner_->attention_decode_forward(out, kcache, vcache, qkv, pos, n_head);
}
void CountingBackend::gelu_forward(const Tensor& out, const Tensor& inp) {
  count(Kind::Op, "gelu_forward");
  inner_->gelu_forward(out, inp);
}
void CountingBackend::gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, GradWrite dinp_write) {
  count(Kind::Op, "gelu_backward");
  inner_->gelu_backward(dinp, dout, inp, dinp_write);
}
void CountingBackend::residual_forward(const Tensor& out, const Tensor& a, const Tensor& b) {
  count(Kind::Op, "residual_forward");
  inner_->residual_forward(out, a, b);
}
void CountingBackend::residual_backward(const Tensor& da, const Tensor& db, const Tensor& dout) {
  count(Kind::Op, "residual_backward");
  inner_->residual_backward(da, db, dout);
}
void CountingBackend::logprob_forward(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                      const Tensor& weights, int64_t V) {
  count(Kind::Op, "logprob_forward");
  inner_->logprob_forward(out, logits, targets, weights, V);
}
void CountingBackend::logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                       const Tensor& weights, const Tensor& dseq, int64_t V) {
  count(Kind::Op, "logprob_backward");
  inner_->logprob_backward(dlogits, logits, targets, weights, dseq, V);
}
void CountingBackend::gather_rows(const Tensor& out, const Tensor& inp, const Tensor& idx) {
  count(Kind::Op, "gather_rows");
  inner_->gather_rows(out, inp, idx);
}
void CountingBackend::scatter_add_rows(const Tensor& dinp, const Tensor& dout, const Tensor& idx) {
  count(Kind::Op, "scatter_add_rows");
  inner_->scatter_add_rows(dinp, dout, idx);
}
void CountingBackend::logprob_forward_segments(const LogprobOutputs& out, const Tensor& logits,
                                               const Tensor& targets, const Tensor& weights, const Tensor& seg,
                                               int64_t V) {
  count(Kind::Op, "logprob_forward_segments");
  inner_->logprob_forward_segments(out, logits, targets, weights, seg, V);
}
void CountingBackend::logprob_backward_segments(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                                const Tensor& weights, const Tensor& seg, const Tensor& dseq,
                                                int64_t V) {
  count(Kind::Op, "logprob_backward_segments");
  inner_->logprob_backward_segments(dlogits, logits, targets, weights, seg, dseq, V);
}
void CountingBackend::rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& w,
                                      double eps) {
  count(Kind::Op, "rmsnorm_forward");
  inner_->rmsnorm_forward(out, rstd, inp, w, eps);
}
void CountingBackend::rmsnorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dout, const Tensor& inp,
                                       const Tensor& w, const Tensor& rstd, GradWrite dinp_write) {
  count(Kind::Op, "rmsnorm_backward");
  inner_->rmsnorm_backward(dinp, dw, dout, inp, w, rstd, dinp_write);
}
void CountingBackend::residual_rmsnorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& rstd,
                                               const Tensor& a, const Tensor& b, const Tensor& w, double eps) {
  count(Kind::Op, "residual_rmsnorm_forward");
  inner_->residual_rmsnorm_forward(res_out, ln_out, rstd, a, b, w, eps);
}
void CountingBackend::rope_forward(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin,
                                   const Tensor& pos, int64_t n_head, int64_t n_kv_head) {
  count(Kind::Op, "rope_forward");
  inner_->rope_forward(out, inp, cos, sin, pos, n_head, n_kv_head);
}
void CountingBackend::rope_backward(const Tensor& dinp, const Tensor& dout, const Tensor& cos, const Tensor& sin,
                                    const Tensor& pos, int64_t n_head, int64_t n_kv_head) {
  count(Kind::Op, "rope_backward");
  inner_->rope_backward(dinp, dout, cos, sin, pos, n_head, n_kv_head);
}
void CountingBackend::swiglu_forward(const Tensor& out, const Tensor& inp) {
  count(Kind::Op, "swiglu_forward");
  inner_->swiglu_forward(out, inp);
}
void CountingBackend::swiglu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) {
  count(Kind::Op, "swiglu_backward");
  inner_->swiglu_backward(dinp, dout, inp);
}
void CountingBackend::repeat_kv_forward(const Tensor& out, const Tensor& inp, int64_t n_head, int64_t n_kv_head) {
  count(Kind::Op, "repeat_kv_forward");
  inner_->repeat_kv_forward(out, inp, n_head, n_kv_head);
}
void CountingBackend::repeat_kv_backward(const Tensor& dinp, const Tensor& dout, int64_t n_head, int64_t n_kv_head) {
  count(Kind::Op, "repeat_kv_backward");
  inner_->repeat_kv_backward(dinp, dout, n_head, n_kv_head);
}
void CountingBackend::preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp,
                                      const Tensor& offset, const PairLossParams& p, double normalizer, int64_t q0,
                                      int64_t q1) {
  count(Kind::Op, "preference_loss");
  inner_->preference_loss(out, stats, ref_logp, offset, p, normalizer, q0, q1);
}

namespace {

// A replay through the wrapper: counted as one op, then the inner backend's recording.
class CountedGraph final : public Backend::Graph {
 public:
  CountedGraph(std::unique_ptr<Backend::Graph> inner, std::function<void()> on_replay)
      : inner_(std::move(inner)), on_replay_(std::move(on_replay)) {}
  void replay() override {
    on_replay_();
    inner_->replay();
  }

 private:
  std::unique_ptr<Backend::Graph> inner_;
  std::function<void()> on_replay_;
};

}  // namespace

std::unique_ptr<Backend::Graph> CountingBackend::capture(const std::function<void()>& fn) {
  count(Kind::Op, "capture");
  // The inner backend records fn, whose calls go through this wrapper (fn captured the wrapper, not inner).
  return std::make_unique<CountedGraph>(inner_->capture(fn), [this] { count(Kind::Op, "replay"); });
}

void CountingBackend::adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                   const AdamWParams& p) {
  count(Kind::Op, "adamw_update");
  inner_->adamw_update(param, grad, m, v, p);
}
void CountingBackend::adamw_update_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                            const std::vector<AdamWSegment>& segs, const AdamWParams& p) {
  count(Kind::Op, "adamw_update_segments");
  inner_->adamw_update_segments(param, grad, m, v, segs, p);
}
AdamWCheck CountingBackend::adamw_dry_run_segments(const Tensor& param, const Tensor& grad, const Tensor& m,
                                                   const Tensor& v, const std::vector<AdamWSegment>& segs,
                                                   const AdamWParams& p) {
  count(Kind::ValueReturn, "adamw_dry_run_segments");
  return inner_->adamw_dry_run_segments(param, grad, m, v, segs, p);
}
double CountingBackend::sum_squares(const Tensor& x) {
  count(Kind::ValueReturn, "sum_squares");
  return inner_->sum_squares(x);
}
void CountingBackend::scale(const Tensor& x, double s) {
  count(Kind::Op, "scale");
  inner_->scale(x, s);
}
void CountingBackend::sum_squares_into(const Tensor& out, const Tensor& x) {
  count(Kind::Op, "sum_squares_into");
  inner_->sum_squares_into(out, x);
}
void CountingBackend::adamw_prepare(const Tensor& record, const Tensor& state, AdamWNormFrom from) {
  count(Kind::Op, "adamw_prepare");
  inner_->adamw_prepare(record, state, from);
}
void CountingBackend::adamw_check_segments(const Tensor& record, const Tensor& state, const Tensor& param,
                                           const Tensor& grad, const Tensor& m, const Tensor& v,
                                           const std::vector<AdamWSegment>& segs) {
  count(Kind::Op, "adamw_check_segments");
  inner_->adamw_check_segments(record, state, param, grad, m, v, segs);
}
void CountingBackend::adamw_apply_segments(const Tensor& record, const Tensor& state, const Tensor& param,
                                           const Tensor& grad, const Tensor& m, const Tensor& v,
                                           const std::vector<AdamWSegment>& segs, const Tensor& copy,
                                           GradAfterStep after) {
  count(Kind::Op, "adamw_apply_segments");
  inner_->adamw_apply_segments(record, state, param, grad, m, v, segs, copy, after);
}

}  // namespace dpo
