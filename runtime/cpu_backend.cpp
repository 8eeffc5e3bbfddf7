// CpuBackend: checks shapes and dtypes once per call, then dispatches to the float or double CPU kernel (the
// reference kernels, and for attention by default the blocked kernels of kernels/attention_tiled_cpu.cpp).
#include <omp.h>

#include <cstring>
#include <utility>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/encoder.h"
#include "kernels/gather.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "kernels/logprob.h"
#include "kernels/matmul.h"
#include "kernels/pair_loss.h"
#include "kernels/repeat_kv.h"
#include "kernels/residual.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/backend.h"
#include "runtime/blas_info.h"
#include "runtime/safetensors.h"

namespace dpo {

namespace {

void check_host(const Tensor& t, const char* name) {
  if (!t.defined()) throw Error(std::string(name) + ": tensor is undefined");
  if (t.device().kind != DeviceKind::CPU) throw Error(std::string(name) + ": tensor is on " + t.device().str());
}

void check_float(const Tensor& t, const char* name) {
  check_host(t, name);
  if (t.dtype() != DType::F32 && t.dtype() != DType::F64)
    throw Error(std::string(name) + ": CPU kernels take F32 or F64, got " + dtype_name(t.dtype()));
}

// Calls f(T{}) with T = float or double according to `dtype`.
template <class F>
void dispatch(DType dtype, F&& f) {
  if (dtype == DType::F32) f(float{});
  else if (dtype == DType::F64) f(double{});
  else throw Error(std::string("CPU kernels take F32 or F64, got ") + dtype_name(dtype));
}

template <class T>
T* opt(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

// --- BF16 (runtime/backend.h, "Mixed precision"): each op on F32 working copies of its BF16 arguments, then each
// BF16 output rounded once. F32 arguments (parameter gradients, statistics, per-sequence scalars) are used as they
// are, so their "+=" accumulates in place in fp32.
bool is_bf16(const Tensor& t) { return t.defined() && t.dtype() == DType::BF16; }

// An F32 copy of a BF16 tensor (exact); any other tensor (or an undefined one) itself.
Tensor up(const Tensor& t) {
  if (!is_bf16(t)) return t;
  return convert_host(t, DType::F32, "bf16 argument");
}

// Scratch for a BF16 "=" output (its old contents are not read, so not converted); any other tensor itself.
Tensor out32(const Tensor& t) { return is_bf16(t) ? Tensor::host(t.shape(), DType::F32) : t; }

// dst (BF16) = f rounded to nearest even; nothing when dst is not BF16 (then f is dst itself).
void down(const Tensor& dst, const Tensor& f) {
  if (!is_bf16(dst)) return;
  Tensor r = convert_host(f, DType::BF16, "bf16 result");
  std::memcpy(dst.raw(), r.raw(), static_cast<size_t>(r.nbytes()));
}

// dst (BF16, rows of ld = dst.size(-1) elements) = the first `width` elements of each row of f rounded to nearest
// even; the rest of each row of dst (padding, backend.h "Padded rows") is left as it is. Nothing when dst is not
// BF16.
void down_rows(const Tensor& dst, const Tensor& f, int64_t width) {
  if (!is_bf16(dst)) return;
  const int64_t ld = dst.size(-1);
  if (width == ld) return down(dst, f);
  Tensor r = convert_host(f, DType::BF16, "bf16 result");
  const int64_t rows = ld > 0 ? dst.numel() / ld : 0;
  const auto* src = static_cast<const char*>(r.raw());
  auto* out = static_cast<char*>(dst.raw());
  const auto row_bytes = static_cast<size_t>(width) * 2;
  for (int64_t n = 0; n < rows; ++n) std::memcpy(out + n * ld * 2, src + n * ld * 2, row_bytes);
}

// Optional argument `t` of a BF16 call must have dtype `d`.
void need(const Tensor& t, DType d, const char* name) {
  if (!t.defined()) return;
  check_host(t, name);
  if (t.dtype() != d)
    throw Error(std::string(name) + ": a BF16 call takes " + dtype_name(d) + " here, got " + dtype_name(t.dtype()));
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int num_threads, CpuAttention attention) : attention_(attention) {
    if (num_threads > 0) omp_set_num_threads(num_threads);
  }
  Device device() const override { return Device{DeviceKind::CPU, 0}; }
  std::string name() const override { return "cpu"; }

  Tensor empty(Shape shape, DType dtype) override { return Tensor::host(std::move(shape), dtype); }
  void fill_zero(const Tensor& t) override {
    check_host(t, "fill_zero");
    std::memset(t.raw(), 0, static_cast<size_t>(t.nbytes()));
  }
  void copy_from_host(const Tensor& dst, const Tensor& src) override { convert_into(dst, src, "copy_from_host"); }
  void copy_to_host(const Tensor& dst, const Tensor& src) override { convert_into(dst, src, "copy_to_host"); }
  void copy(const Tensor& dst, const Tensor& src) override {
    check_host(dst, "copy dst");
    check_host(src, "copy src");
    check_same_dtype(dst, src, "copy dst", "copy src");
    DPO_ASSERT(dst.numel() == src.numel(), "copy: sizes differ");
    std::memmove(dst.raw(), src.raw(), static_cast<size_t>(src.nbytes()));
  }
  void convert(const Tensor& dst, const Tensor& src) override {
    DPO_ASSERT(dst.numel() == src.numel(), "convert: sizes differ (" + shape_str(dst.shape()) + " and " +
                                               shape_str(src.shape()) + ")");
    const char* d = static_cast<const char*>(dst.raw());
    const char* s = static_cast<const char*>(src.raw());
    DPO_ASSERT(dst.numel() == 0 || !(d < s + src.nbytes() && s < d + dst.nbytes()), "convert: dst and src overlap");
    convert_into(dst, src.reshape(dst.shape()), "convert");
  }

  void encoder_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) override {
    if (is_bf16(out)) {
      need(wte, DType::BF16, "encoder wte");
      need(wpe, DType::BF16, "encoder wpe");
      const Tensor o = out32(out);
      encoder_forward(o, tokens, up(wte), up(wpe));
      return down(out, o);
    }
    check_float(out, "encoder out");
    check_dtype(tokens, DType::I32, "encoder tokens");
    const int64_t B = tokens.size(0), T = tokens.size(1), C = wte.size(1);
    check_shape(out, {B, T, C}, "encoder out");
    check_same_dtype(out, wte, "out", "wte");
    if (wpe.defined()) {  // undefined: no position embedding (runtime/backend.h)
      DPO_ASSERT(wpe.dim() == 2 && wpe.size(0) >= T && wpe.size(1) == C,
                 "wpe " + shape_str(wpe.shape()) + " for T=" + std::to_string(T));
      check_same_dtype(out, wpe, "out", "wpe");
    }
    dispatch(out.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::encoder_forward<F>(out.data<F>(), tokens.data<int32_t>(), wte.data<F>(), opt<F>(wpe), B, T, C);
    });
  }
  void encoder_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens) override {
    if (is_bf16(dout)) {
      need(dwte, DType::F32, "encoder dwte");
      need(dwpe, DType::F32, "encoder dwpe");
      return encoder_backward(dwte, dwpe, up(dout), tokens);
    }
    check_float(dout, "encoder dout");
    check_dtype(tokens, DType::I32, "encoder tokens");
    const int64_t B = tokens.size(0), T = tokens.size(1), C = dwte.size(1);
    check_shape(dout, {B, T, C}, "encoder dout");
    check_same_dtype(dout, dwte, "dout", "dwte");
    if (dwpe.defined()) {
      DPO_ASSERT(dwpe.dim() == 2 && dwpe.size(0) >= T && dwpe.size(1) == C,
                 "dwpe " + shape_str(dwpe.shape()) + " for T=" + std::to_string(T));
      check_same_dtype(dout, dwpe, "dout", "dwpe");
    }
    dispatch(dout.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::encoder_backward<F>(dwte.data<F>(), opt<F>(dwpe), dout.data<F>(), tokens.data<int32_t>(), B, T, C);
    });
  }

  void encoder_forward_pos(const Tensor& out, const Tensor& tokens, const Tensor& pos, const Tensor& wte,
                           const Tensor& wpe) override {
    if (is_bf16(out)) {
      need(wte, DType::BF16, "encoder wte");
      need(wpe, DType::BF16, "encoder wpe");
      const Tensor o = out32(out);
      encoder_forward_pos(o, tokens, pos, up(wte), up(wpe));
      return down(out, o);
    }
    check_float(out, "encoder out");
    check_host(tokens, "encoder tokens");
    check_dtype(tokens, DType::I32, "encoder tokens");
    if (!wpe.defined()) return encoder_forward(out, tokens, wte, wpe);  // no position embedding: pos unused
    DPO_ASSERT(tokens.dim() == 2 && wte.dim() == 2 && wpe.dim() == 2,
               "encoder: tokens, wte and wpe must be 2-D, got " + shape_str(tokens.shape()) + ", " +
                   shape_str(wte.shape()) + ", " + shape_str(wpe.shape()));
    const int64_t B = tokens.size(0), T = tokens.size(1), C = wte.size(1);
    check_positions(pos, B, T);
    check_shape(out, {B, T, C}, "encoder out");
    DPO_ASSERT(wpe.size(1) == C, "wpe " + shape_str(wpe.shape()) + " for C=" + std::to_string(C));
    check_same_dtype(out, wte, "out", "wte");
    check_same_dtype(out, wpe, "out", "wpe");
    dispatch(out.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::encoder_forward_pos<F>(out.data<F>(), tokens.data<int32_t>(), pos.data<int32_t>(), wte.data<F>(),
                                  wpe.data<F>(), B, T, C, wpe.size(0));
    });
  }
  void encoder_backward_pos(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens,
                            const Tensor& pos) override {
    if (is_bf16(dout)) {
      need(dwte, DType::F32, "encoder dwte");
      need(dwpe, DType::F32, "encoder dwpe");
      return encoder_backward_pos(dwte, dwpe, up(dout), tokens, pos);
    }
    check_float(dout, "encoder dout");
    check_host(tokens, "encoder tokens");
    check_dtype(tokens, DType::I32, "encoder tokens");
    if (!dwpe.defined()) return encoder_backward(dwte, dwpe, dout, tokens);  // no position embedding: pos unused
    DPO_ASSERT(tokens.dim() == 2 && dwte.dim() == 2 && dwpe.dim() == 2,
               "encoder: tokens, dwte and dwpe must be 2-D, got " + shape_str(tokens.shape()) + ", " +
                   shape_str(dwte.shape()) + ", " + shape_str(dwpe.shape()));
    const int64_t B = tokens.size(0), T = tokens.size(1), C = dwte.size(1);
    check_positions(pos, B, T);
    check_shape(dout, {B, T, C}, "encoder dout");
    DPO_ASSERT(dwpe.size(1) == C, "dwpe " + shape_str(dwpe.shape()) + " for C=" + std::to_string(C));
    check_same_dtype(dout, dwte, "dout", "dwte");
    check_same_dtype(dout, dwpe, "dout", "dwpe");
    dispatch(dout.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::encoder_backward_pos<F>(dwte.data<F>(), dwpe.data<F>(), dout.data<F>(), tokens.data<int32_t>(),
                                   pos.data<int32_t>(), B, T, C, dwpe.size(0));
    });
  }

  void layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                         const Tensor& w, const Tensor& b, double eps) override {
    if (is_bf16(inp)) {
      need(out, DType::BF16, "layernorm out");
      need(w, DType::BF16, "layernorm w");
      need(b, DType::BF16, "layernorm b");
      need(mean, DType::F32, "layernorm mean");
      need(rstd, DType::F32, "layernorm rstd");
      const Tensor o = out32(out);
      layernorm_forward(o, mean, rstd, up(inp), up(w), up(b), eps);
      return down(out, o);
    }
    check_float(inp, "layernorm inp");
    const int64_t C = inp.size(-1), N = inp.numel() / C;
    check_shape(out, inp.shape(), "layernorm out");
    check_shape(w, {C}, "layernorm w");
    check_shape(b, {C}, "layernorm b");
    DPO_ASSERT(mean.numel() == N && rstd.numel() == N, "layernorm mean/rstd must have N elements");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::layernorm_forward<F>(out.data<F>(), mean.data<F>(), rstd.data<F>(), inp.data<F>(), w.data<F>(),
                                b.data<F>(), N, C, eps);
    });
  }
  // BF16: the unfused pair itself (the oracle the CUDA kernel is held to). F32 / F64: the fused CPU kernel, bitwise
  // the same as the pair (kernels/layernorm.h).
  void residual_layernorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& mean, const Tensor& rstd,
                                  const Tensor& a, const Tensor& b, const Tensor& w, const Tensor& bias,
                                  double eps) override {
    if (is_bf16(a)) {
      need(res_out, DType::BF16, "residual_layernorm res_out");
      residual_forward(res_out, a, b);
      return layernorm_forward(ln_out, mean, rstd, res_out, w, bias, eps);
    }
    check_float(a, "residual_layernorm a");
    const int64_t C = a.size(-1);
    const int64_t N = C > 0 ? a.numel() / C : 0;
    check_shape(b, a.shape(), "residual_layernorm b");
    check_shape(res_out, a.shape(), "residual_layernorm res_out");
    check_shape(ln_out, a.shape(), "residual_layernorm ln_out");
    check_shape(w, {C}, "residual_layernorm w");
    check_shape(bias, {C}, "residual_layernorm bias");
    for (const Tensor* t : {&b, &res_out, &ln_out, &w, &bias, &mean, &rstd})
      check_same_dtype(a, *t, "residual_layernorm a", "residual_layernorm argument");
    DPO_ASSERT(mean.numel() == N && rstd.numel() == N, "residual_layernorm mean/rstd must have N elements");
    dispatch(a.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::residual_layernorm_forward<F>(res_out.data<F>(), ln_out.data<F>(), mean.data<F>(), rstd.data<F>(),
                                         a.data<F>(), b.data<F>(), w.data<F>(), bias.data<F>(), N, C, eps);
    });
  }
  using Backend::layernorm_backward;
  void layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout,
                          const Tensor& inp, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                          GradWrite dinp_write) override {
    if (is_bf16(inp)) {
      need(dinp, DType::BF16, "layernorm dinp");
      need(dout, DType::BF16, "layernorm dout");
      need(w, DType::BF16, "layernorm w");
      need(dw, DType::F32, "layernorm dw");
      need(db, DType::F32, "layernorm db");
      need(mean, DType::F32, "layernorm mean");
      need(rstd, DType::F32, "layernorm rstd");
      const Tensor di = dinp_write == GradWrite::Overwrite ? out32(dinp) : up(dinp);
      layernorm_backward(di, dw, db, up(dout), up(inp), up(w), mean, rstd, dinp_write);
      return down(dinp, di);
    }
    check_float(inp, "layernorm inp");
    const int64_t C = inp.size(-1), N = inp.numel() / C;
    check_shape(dinp, inp.shape(), "layernorm dinp");
    check_shape(dout, inp.shape(), "layernorm dout");
    check_shape(dw, {C}, "layernorm dw");
    check_shape(db, {C}, "layernorm db");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::layernorm_backward<F>(dinp.data<F>(), dw.data<F>(), db.data<F>(), dout.data<F>(), inp.data<F>(),
                                 w.data<F>(), mean.data<F>(), rstd.data<F>(), N, C, dinp_write);
    });
  }

  static void matmul_dims(const Tensor& inp, const Tensor& w, WeightLayout layout, int64_t* N, int64_t* C,
                          int64_t* OC) {
    *C = inp.size(-1);
    *N = inp.numel() / *C;
    DPO_ASSERT(w.dim() == 2, "matmul w must be 2-D, got " + shape_str(w.shape()));
    const int64_t wc = layout == WeightLayout::InOut ? w.size(0) : w.size(1);
    *OC = layout == WeightLayout::InOut ? w.size(1) : w.size(0);
    DPO_ASSERT(wc == *C, "matmul: inp " + shape_str(inp.shape()) + " does not match w " + shape_str(w.shape()));
  }
  void matmul_forward(const Tensor& out, const Tensor& inp, const Tensor& w, const Tensor& bias,
                      WeightLayout layout) override {
    int64_t N, C, OC;
    if (is_bf16(inp)) {
      need(out, DType::BF16, "matmul out");
      need(w, DType::BF16, "matmul w");
      need(bias, DType::BF16, "matmul bias");
      matmul_dims(inp, w, layout, &N, &C, &OC);
      check_row_stride(out, OC, "matmul out");  // on the BF16 tensor: the F32 scratch's rows are twice as long
      const Tensor o = out32(out);
      matmul_forward(o, up(inp), up(w), up(bias), layout);
      return down_rows(out, o, OC);
    }
    check_float(inp, "matmul inp");
    matmul_dims(inp, w, layout, &N, &C, &OC);
    const int64_t ld = check_row_stride(out, OC, "matmul out");
    DPO_ASSERT(out.numel() == N * ld, "matmul out " + shape_str(out.shape()) + " for inp " + shape_str(inp.shape()));
    if (bias.defined()) check_shape(bias, {OC}, "matmul bias");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::matmul_forward<F>(out.data<F>(), inp.data<F>(), w.data<F>(), opt<F>(bias), N, C, OC, layout, ld);
    });
  }
  using Backend::matmul_backward;
  void matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                       const Tensor& inp, const Tensor& w, WeightLayout layout, GradWrite dinp_write) override {
    if (is_bf16(inp)) {
      need(dinp, DType::BF16, "matmul dinp");
      need(dout, DType::BF16, "matmul dout");
      need(w, DType::BF16, "matmul w");
      need(dw, DType::F32, "matmul dw");
      need(dbias, DType::F32, "matmul dbias");
      int64_t N, C, OC;
      matmul_dims(inp, w, layout, &N, &C, &OC);
      check_row_stride(dout, OC, "matmul dout");
      const Tensor di = dinp_write == GradWrite::Overwrite ? out32(dinp) : up(dinp);
      matmul_backward(di, dw, dbias, up(dout), up(inp), up(w), layout, dinp_write);
      return down(dinp, di);
    }
    check_float(inp, "matmul inp");
    int64_t N, C, OC;
    matmul_dims(inp, w, layout, &N, &C, &OC);
    const int64_t ld = check_row_stride(dout, OC, "matmul dout");
    DPO_ASSERT(dout.numel() == N * ld, "matmul dout " + shape_str(dout.shape()) + " for inp " + shape_str(inp.shape()));
    if (dinp.defined()) check_shape(dinp, inp.shape(), "matmul dinp");
    if (dw.defined()) check_shape(dw, w.shape(), "matmul dw");
    if (dbias.defined()) check_shape(dbias, {OC}, "matmul dbias");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::matmul_backward<F>(opt<F>(dinp), opt<F>(dw), opt<F>(dbias), dout.data<F>(), inp.data<F>(), w.data<F>(),
                              N, C, OC, layout, ld, dinp_write);
    });
  }

  // F32 / F64: matmul_forward then gelu_forward (bitwise the unfused pair). BF16: gelu of the fp32 pre-activation,
  // then both outputs rounded once (the order of the CUDA backend's epilogue; runtime/backend.h).
  void matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp, const Tensor& w,
                           const Tensor& bias, WeightLayout layout) override {
    check_shape(out, pre.shape(), "matmul_gelu out");
    if (is_bf16(inp)) {
      need(out, DType::BF16, "matmul_gelu out");
      need(pre, DType::BF16, "matmul_gelu pre");
      const Tensor p32 = out32(pre), g32 = out32(out);
      matmul_forward(p32, up(inp), up(w), up(bias), layout);
      gelu_forward(g32, p32);
      down(pre, p32);
      return down(out, g32);
    }
    matmul_forward(pre, inp, w, bias, layout);
    gelu_forward(out, pre);
  }
  // F32 / F64: matmul_backward into a scratch (=) then gelu_backward (=), bitwise the unfused sequence with its two
  // zero fills. BF16: the same with the product dout @ W^T kept in fp32 (runtime/backend.h).
  void matmul_backward_dgelu(const Tensor& dpre, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                             const Tensor& inp, const Tensor& w, const Tensor& pre, WeightLayout layout) override {
    check_shape(dpre, inp.shape(), "matmul_dgelu dpre");
    check_shape(pre, inp.shape(), "matmul_dgelu pre");
    const bool bf = is_bf16(inp);
    if (bf) {
      need(dpre, DType::BF16, "matmul_dgelu dpre");
      need(pre, DType::BF16, "matmul_dgelu pre");
    } else {
      check_float(inp, "matmul_dgelu inp");
      check_same_dtype(inp, dpre, "matmul_dgelu inp", "matmul_dgelu dpre");
      check_same_dtype(inp, pre, "matmul_dgelu inp", "matmul_dgelu pre");
    }
    const Tensor prod = Tensor::host(inp.shape(), bf ? DType::F32 : inp.dtype());
    if (bf) {
      need(dout, DType::BF16, "matmul_dgelu dout");
      need(w, DType::BF16, "matmul_dgelu w");
      matmul_backward(prod, dw, dbias, up(dout), up(inp), up(w), layout, GradWrite::Overwrite);
      const Tensor g32 = out32(dpre);
      gelu_backward(g32, prod, up(pre), GradWrite::Overwrite);
      return down(dpre, g32);
    }
    matmul_backward(prod, dw, dbias, dout, inp, w, layout, GradWrite::Overwrite);
    gelu_backward(dpre, prod, pre, GradWrite::Overwrite);
  }

  // Saved state. Reference: the probabilities [B,NH,T,T] in the activation dtype. Tiled: one flat vector of
  // B*NH*T + B*T elements, the log-sum-exp [B,NH,T] of every query row then B*T entries that say which forward wrote
  // it: the key mask [B,T] as 0/1 values (attention_forward; the blocked backward recomputes the probabilities from
  // q, k, the mask and the log-sum-exp), or all kSpansMark (attention_forward_spans, whose backward takes the spans
  // again). Each backward checks that its own form wrote the state. F32 under BF16 activations (a BF16 log-sum-exp
  // would move every probability by up to 0.4% of |lse|).
  static constexpr double kSpansMark = 2.0;
  Shape attention_saved_shape(int64_t B, int64_t T, int64_t NH) const override {
    if (attention_ == CpuAttention::Reference) return {B, NH, T, T};
    return {B * NH * T + B * T};
  }
  DType attention_saved_dtype(DType activation) const override {
    if (attention_ == CpuAttention::Reference) return activation;
    return activation == DType::BF16 ? DType::F32 : activation;
  }
  void attention_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                         int64_t n_head) override {
    attention_forward_any(out, saved, qkv, keymask, Tensor(), n_head);
  }
  // `out` is not needed: the saved state suffices for both CPU kernels.
  void attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& /*out*/,
                          const Tensor& saved, int64_t n_head) override {
    attention_backward_any(dqkv, dout, qkv, saved, Tensor(), n_head);
  }
  void attention_forward_spans(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& span,
                               int64_t n_head) override {
    check_host(span, "attention span");
    attention_forward_any(out, saved, qkv, Tensor(), span, n_head);
  }
  void attention_backward_spans(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& /*out*/,
                                const Tensor& saved, const Tensor& span, int64_t n_head) override {
    check_host(span, "attention span");
    attention_backward_any(dqkv, dout, qkv, saved, span, n_head);
  }

  // span [B,T,kSpanWidth] I32 with every span valid (kernels/batch_layout.h); fn names the op in the error.
  static void check_spans(const Tensor& span, int64_t B, int64_t T, const char* fn) {
    check_host(span, "attention span");
    check_dtype(span, DType::I32, "attention span");
    check_shape(span, {B, T, kSpanWidth}, "attention span");
    cpu::check_attention_spans(span.data<int32_t>(), B, T, fn);
  }
  // The key-mask form (span undefined) or the spans form (span defined; keymask undefined).
  void attention_forward_any(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                             const Tensor& span, int64_t n_head) {
    const bool tiled = attention_ == CpuAttention::Tiled, spans = span.defined();
    if (is_bf16(qkv)) {
      need(out, DType::BF16, "attention out");
      need(saved, attention_saved_dtype(DType::BF16), "attention saved");
      const Tensor o = out32(out), sv = out32(saved);
      attention_forward_any(o, sv, up(qkv), keymask, span, n_head);
      down(out, o);
      return down(saved, sv);  // nothing for the tiled F32 state
    }
    check_float(qkv, "attention qkv");
    const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
    DPO_ASSERT(qkv.size(2) == 3 * C && C % n_head == 0, "attention qkv " + shape_str(qkv.shape()));
    check_shape(out, {B, T, C}, "attention out");
    check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
    check_same_dtype(saved, qkv, "attention saved", "attention qkv");
    if (keymask.defined()) {
      check_dtype(keymask, DType::I32, "attention keymask");
      check_shape(keymask, {B, T}, "attention keymask");
    }
    if (spans) check_spans(span, B, T, "attention_forward_spans");
    dispatch(qkv.dtype(), [&](auto z) {
      using F = decltype(z);
      const int32_t* sp = opt<int32_t>(span);
      if (!tiled) {
        if (spans) {
          cpu::attention_forward_spans<F>(out.data<F>(), saved.data<F>(), qkv.data<F>(), sp, B, T, C, n_head);
        } else {
          cpu::attention_forward<F>(out.data<F>(), saved.data<F>(), qkv.data<F>(), opt<int32_t>(keymask), B, T, C,
                                    n_head);
        }
        return;
      }
      F* lse = saved.data<F>();
      F* mask = lse + B * n_head * T;
      const int32_t* km = opt<int32_t>(keymask);
      for (int64_t i = 0; i < B * T; ++i)
        mask[i] = spans ? F(kSpansMark) : km == nullptr || km[i] != 0 ? F(1) : F(0);
      if (spans) {
        cpu::attention_tiled_forward_spans<F>(out.data<F>(), lse, qkv.data<F>(), sp, B, T, C, n_head);
      } else {
        cpu::attention_tiled_forward<F>(out.data<F>(), lse, qkv.data<F>(), km, B, T, C, n_head);
      }
    });
  }
  void attention_backward_any(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& saved,
                              const Tensor& span, int64_t n_head) {
    const bool tiled = attention_ == CpuAttention::Tiled, spans = span.defined();
    if (is_bf16(qkv)) {
      need(dqkv, DType::BF16, "attention dqkv");
      need(dout, DType::BF16, "attention dout");
      need(saved, attention_saved_dtype(DType::BF16), "attention saved");
      const Tensor d = up(dqkv);
      attention_backward_any(d, up(dout), up(qkv), up(saved), span, n_head);
      return down(dqkv, d);
    }
    check_float(qkv, "attention qkv");
    const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
    check_shape(dqkv, qkv.shape(), "attention dqkv");
    check_shape(dout, {B, T, C}, "attention dout");
    check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
    check_same_dtype(saved, qkv, "attention saved", "attention qkv");
    if (spans) check_spans(span, B, T, "attention_backward_spans");
    dispatch(qkv.dtype(), [&](auto z) {
      using F = decltype(z);
      const int32_t* sp = opt<int32_t>(span);
      if (!tiled) {
        if (spans) {
          cpu::attention_backward_spans<F>(dqkv.data<F>(), dout.data<F>(), qkv.data<F>(), saved.data<F>(), sp, B, T,
                                           C, n_head);
        } else {
          cpu::attention_backward<F>(dqkv.data<F>(), dout.data<F>(), qkv.data<F>(), saved.data<F>(), B, T, C,
                                     n_head);
        }
        return;
      }
      const F* lse = saved.data<F>();
      const F* mask = lse + B * n_head * T;
      for (int64_t i = 0; i < B * T; ++i) {
        const bool mark = mask[i] == F(kSpansMark);
        if (spans && !mark)
          throw Error("attention_backward_spans: the saved state was written by attention_forward (the key-mask "
                      "form), not by attention_forward_spans");
        if (!spans && mark)
          throw Error("attention_backward: the saved state was written by attention_forward_spans; its backward is "
                      "attention_backward_spans");
      }
      if (spans) {
        cpu::attention_tiled_backward_spans<F>(dqkv.data<F>(), dout.data<F>(), qkv.data<F>(), sp, lse, B, T, C,
                                               n_head);
        return;
      }
      std::vector<int32_t> km(static_cast<size_t>(B * T));
      for (int64_t i = 0; i < B * T; ++i) km[static_cast<size_t>(i)] = mask[i] != F(0) ? 1 : 0;
      cpu::attention_tiled_backward<F>(dqkv.data<F>(), dout.data<F>(), qkv.data<F>(), km.data(), lse, B, T, C,
                                       n_head);
    });
  }

  // [B,Tc,C] caches of one dtype; returns Tc.
  static int64_t check_cache(const Tensor& kcache, const Tensor& vcache, int64_t B, int64_t C) {
    check_float(kcache, "attention kcache");
    check_float(vcache, "attention vcache");
    DPO_ASSERT(kcache.dim() == 3, "attention kcache must be [B,Tc,C], got " + shape_str(kcache.shape()));
    const int64_t Tc = kcache.size(1);
    check_shape(kcache, {B, Tc, C}, "attention kcache");
    check_shape(vcache, {B, Tc, C}, "attention vcache");
    check_same_dtype(kcache, vcache, "attention kcache", "attention vcache");
    return Tc;
  }
  void attention_cache_store(const Tensor& kcache, const Tensor& vcache, const Tensor& qkv) override {
    if (is_bf16(qkv)) {
      need(kcache, DType::BF16, "attention kcache");
      need(vcache, DType::BF16, "attention vcache");
      const Tensor k = up(kcache), v = up(vcache);  // whole caches: the positions not stored keep their values
      attention_cache_store(k, v, up(qkv));
      down(kcache, k);
      return down(vcache, v);
    }
    check_float(qkv, "attention qkv");
    DPO_ASSERT(qkv.dim() == 3 && qkv.size(2) % 3 == 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
    const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
    const int64_t Tc = check_cache(kcache, vcache, B, C);
    check_same_dtype(kcache, qkv, "attention kcache", "attention qkv");
    DPO_ASSERT(T <= Tc, "attention_cache_store: qkv " + shape_str(qkv.shape()) + " has more positions than the cache " +
                            shape_str(kcache.shape()));
    dispatch(qkv.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::attention_cache_store<F>(kcache.data<F>(), vcache.data<F>(), qkv.data<F>(), B, T, Tc, C);
    });
  }
  void attention_decode_forward(const Tensor& out, const Tensor& kcache, const Tensor& vcache, const Tensor& qkv,
                                const Tensor& pos, int64_t n_head) override {
    if (is_bf16(qkv)) {
      need(out, DType::BF16, "attention out");
      need(kcache, DType::BF16, "attention kcache");
      need(vcache, DType::BF16, "attention vcache");
      const Tensor o = out32(out), k = up(kcache), v = up(vcache);
      attention_decode_forward(o, k, v, up(qkv), pos, n_head);
      down(out, o);
      down(kcache, k);
      return down(vcache, v);
    }
    check_float(qkv, "attention qkv");
    DPO_ASSERT(qkv.dim() == 2 && qkv.size(1) % 3 == 0, "attention qkv must be [B,3C], got " + shape_str(qkv.shape()));
    const int64_t B = qkv.size(0), C = qkv.size(1) / 3;
    DPO_ASSERT(n_head > 0 && C % n_head == 0, "attention: C = " + std::to_string(C) + " is not a multiple of n_head " +
                                                  std::to_string(n_head));
    const int64_t Tc = check_cache(kcache, vcache, B, C);
    check_same_dtype(kcache, qkv, "attention kcache", "attention qkv");
    check_float(out, "attention out");
    check_shape(out, {B, C}, "attention out");
    check_same_dtype(out, qkv, "attention out", "attention qkv");
    check_host(pos, "attention pos");
    check_dtype(pos, DType::I32, "attention pos");
    check_shape(pos, {B}, "attention pos");
    dispatch(qkv.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::attention_decode_forward<F>(out.data<F>(), kcache.data<F>(), vcache.data<F>(), qkv.data<F>(),
                                       pos.data<int32_t>(), B, Tc, C, n_head);
    });
  }

  void gelu_forward(const Tensor& out, const Tensor& inp) override {
    if (is_bf16(inp)) {
      need(out, DType::BF16, "gelu out");
      const Tensor o = out32(out);
      gelu_forward(o, up(inp));
      return down(out, o);
    }
    check_float(inp, "gelu inp");
    check_shape(out, inp.shape(), "gelu out");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::gelu_forward<F>(out.data<F>(), inp.data<F>(), inp.numel());
    });
  }
  using Backend::gelu_backward;
  void gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, GradWrite dinp_write) override {
    if (is_bf16(inp)) {
      need(dinp, DType::BF16, "gelu dinp");
      need(dout, DType::BF16, "gelu dout");
      const Tensor d = dinp_write == GradWrite::Overwrite ? out32(dinp) : up(dinp);
      gelu_backward(d, up(dout), up(inp), dinp_write);
      return down(dinp, d);
    }
    check_float(inp, "gelu inp");
    check_shape(dinp, inp.shape(), "gelu dinp");
    check_shape(dout, inp.shape(), "gelu dout");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::gelu_backward<F>(dinp.data<F>(), dout.data<F>(), inp.data<F>(), inp.numel(), dinp_write);
    });
  }
  void residual_forward(const Tensor& out, const Tensor& a, const Tensor& b) override {
    if (is_bf16(a)) {
      need(out, DType::BF16, "residual out");
      need(b, DType::BF16, "residual b");
      const Tensor o = out32(out);
      residual_forward(o, up(a), up(b));
      return down(out, o);
    }
    check_float(a, "residual a");
    check_shape(b, a.shape(), "residual b");
    check_shape(out, a.shape(), "residual out");
    dispatch(a.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::residual_forward<F>(out.data<F>(), a.data<F>(), b.data<F>(), a.numel());
    });
  }
  void residual_backward(const Tensor& da, const Tensor& db, const Tensor& dout) override {
    if (is_bf16(dout)) {
      need(da, DType::BF16, "residual da");
      need(db, DType::BF16, "residual db");
      const Tensor a = up(da), b = up(db);
      residual_backward(a, b, up(dout));
      down(da, a);
      return down(db, b);
    }
    check_float(dout, "residual dout");
    check_shape(da, dout.shape(), "residual da");
    check_shape(db, dout.shape(), "residual db");
    dispatch(dout.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::residual_backward<F>(da.data<F>(), db.data<F>(), dout.data<F>(), dout.numel());
    });
  }

  // --- Llama-family ops (runtime/backend.h) -------------------------------------------------------------------
  // F32 / F64: the twins of kernels/{rmsnorm,rope,swiglu,repeat_kv}.h. BF16: the same twins in float on F32 copies,
  // each BF16 output rounded once (RMSNorm: twice, HF's order, kernels/rmsnorm.h).

  // All arguments of one Llama-family call on the host with the dtype of `ref` (undefined ones skipped).
  static void check_same_host(const Tensor& ref, std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
    for (const auto& [t, name] : ts) {
      if (!t->defined()) continue;
      check_host(*t, name);
      check_same_dtype(ref, *t, "first argument", name);
    }
  }
  // `a` and `b` are the same tensor or do not overlap (in-place ops).
  static void check_same_or_apart(const Tensor& a, const Tensor& b, const char* what) {
    DPO_ASSERT(a.raw() == b.raw() || !overlaps(a, b), std::string(what) + " overlap without being the same tensor");
  }
  // The RMSNorm forward in F32 / F64, w undefined: out = inp * rstd (the BF16 path's first step).
  void rmsnorm_forward_float(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& w, double eps) {
    check_float(inp, "rmsnorm inp");
    const int64_t C = inp.size(-1);
    DPO_ASSERT(C > 0, "rmsnorm inp " + shape_str(inp.shape()) + " has no channels");
    const int64_t N = inp.numel() / C;
    check_shape(out, inp.shape(), "rmsnorm out");
    if (w.defined()) check_shape(w, {C}, "rmsnorm w");
    check_host(rstd, "rmsnorm rstd");
    DPO_ASSERT(rstd.numel() == N, "rmsnorm rstd " + shape_str(rstd.shape()) + " must have N = " + std::to_string(N) +
                                      " elements");
    check_same_host(inp, {{&out, "rmsnorm out"}, {&w, "rmsnorm w"}, {&rstd, "rmsnorm rstd"}});
    DPO_ASSERT(!overlaps(out, inp), "rmsnorm: out overlaps inp");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::rmsnorm_forward<F>(out.data<F>(), rstd.data<F>(), inp.data<F>(), opt<F>(w), N, C, eps);
    });
  }
  void rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& w,
                       double eps) override {
    if (is_bf16(inp)) {
      need(out, DType::BF16, "rmsnorm out");
      DPO_ASSERT(w.defined(), "rmsnorm w: tensor is undefined");
      need(w, DType::BF16, "rmsnorm w");
      need(rstd, DType::F32, "rmsnorm rstd");
      check_shape(w, {inp.size(-1)}, "rmsnorm w");
      // HF's order: n = round_bf16(inp * rstd), then out = round_bf16(w * n); w * n is exact in fp32.
      Tensor n32 = out32(out);
      rmsnorm_forward_float(n32, rstd, up(inp), Tensor(), eps);
      n32 = convert_host(convert_host(n32, DType::BF16, "rmsnorm normalised"), DType::F32, "rmsnorm normalised");
      const Tensor w32 = up(w);
      const int64_t C = inp.size(-1), NC = n32.numel();
      float* pn = n32.data<float>();
      const float* pw = w32.data<float>();
      for (int64_t i = 0; i < NC; ++i) pn[i] *= pw[i % C];
      return down(out, n32);
    }
    DPO_ASSERT(w.defined(), "rmsnorm w: tensor is undefined");
    rmsnorm_forward_float(out, rstd, inp, w, eps);
  }
  void rmsnorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dout, const Tensor& inp, const Tensor& w,
                        const Tensor& rstd, GradWrite dinp_write) override {
    if (is_bf16(inp)) {
      need(dinp, DType::BF16, "rmsnorm dinp");
      need(dout, DType::BF16, "rmsnorm dout");
      need(w, DType::BF16, "rmsnorm w");
      need(dw, DType::F32, "rmsnorm dw");
      need(rstd, DType::F32, "rmsnorm rstd");
      DPO_ASSERT(dinp.defined(), "rmsnorm dinp: tensor is undefined");
      const Tensor di = dinp_write == GradWrite::Overwrite ? out32(dinp) : up(dinp);
      rmsnorm_backward(di, dw, up(dout), up(inp), up(w), rstd, dinp_write);
      return down(dinp, di);
    }
    check_float(inp, "rmsnorm inp");
    const int64_t C = inp.size(-1);
    DPO_ASSERT(C > 0, "rmsnorm inp " + shape_str(inp.shape()) + " has no channels");
    const int64_t N = inp.numel() / C;
    for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&dinp, "rmsnorm dinp"},
                                  {&dout, "rmsnorm dout"}, {&w, "rmsnorm w"}, {&dw, "rmsnorm dw"},
                                  {&rstd, "rmsnorm rstd"}})
      check_host(*t, name);
    check_shape(dinp, inp.shape(), "rmsnorm dinp");
    check_shape(dout, inp.shape(), "rmsnorm dout");
    check_shape(w, {C}, "rmsnorm w");
    check_shape(dw, {C}, "rmsnorm dw");
    DPO_ASSERT(rstd.numel() == N, "rmsnorm rstd " + shape_str(rstd.shape()) + " must have N = " + std::to_string(N) +
                                      " elements");
    check_same_host(inp, {{&dinp, "rmsnorm dinp"}, {&dout, "rmsnorm dout"}, {&w, "rmsnorm w"}, {&dw, "rmsnorm dw"},
                          {&rstd, "rmsnorm rstd"}});
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::rmsnorm_backward<F>(dinp.data<F>(), dw.data<F>(), dout.data<F>(), inp.data<F>(), w.data<F>(),
                               rstd.data<F>(), N, C, dinp_write);
    });
  }
  // BF16: the unfused pair itself (the oracle the CUDA kernel is held to). F32 / F64: the fused CPU kernel, bitwise
  // the same as the pair (kernels/rmsnorm.h).
  void residual_rmsnorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& rstd, const Tensor& a,
                                const Tensor& b, const Tensor& w, double eps) override {
    if (is_bf16(a)) {
      need(res_out, DType::BF16, "residual_rmsnorm res_out");
      DPO_ASSERT(res_out.defined() && ln_out.defined(), "residual_rmsnorm: res_out or ln_out is undefined");
      for (const Tensor* t : {&a, &b, &res_out, &w})
        DPO_ASSERT(!t->defined() || !overlaps(ln_out, *t), "residual_rmsnorm: ln_out overlaps an input");
      residual_forward(res_out, a, b);
      return rmsnorm_forward(ln_out, rstd, res_out, w, eps);
    }
    check_float(a, "residual_rmsnorm a");
    const int64_t C = a.size(-1);
    DPO_ASSERT(C > 0, "residual_rmsnorm a " + shape_str(a.shape()) + " has no channels");
    const int64_t N = a.numel() / C;
    for (const auto& [t, name] :
         {std::pair<const Tensor*, const char*>{&b, "residual_rmsnorm b"}, {&res_out, "residual_rmsnorm res_out"},
          {&ln_out, "residual_rmsnorm ln_out"}, {&w, "residual_rmsnorm w"}, {&rstd, "residual_rmsnorm rstd"}})
      check_host(*t, name);
    check_shape(b, a.shape(), "residual_rmsnorm b");
    check_shape(res_out, a.shape(), "residual_rmsnorm res_out");
    check_shape(ln_out, a.shape(), "residual_rmsnorm ln_out");
    check_shape(w, {C}, "residual_rmsnorm w");
    DPO_ASSERT(rstd.numel() == N, "residual_rmsnorm rstd must have N = " + std::to_string(N) + " elements");
    check_same_host(a, {{&b, "residual_rmsnorm b"}, {&res_out, "residual_rmsnorm res_out"},
                        {&ln_out, "residual_rmsnorm ln_out"}, {&w, "residual_rmsnorm w"},
                        {&rstd, "residual_rmsnorm rstd"}});
    check_same_or_apart(res_out, a, "residual_rmsnorm res_out and a");
    check_same_or_apart(res_out, b, "residual_rmsnorm res_out and b");
    for (const Tensor* t : {&a, &b, &res_out, &w})
      DPO_ASSERT(!overlaps(ln_out, *t), "residual_rmsnorm: ln_out overlaps an input");
    dispatch(a.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::residual_rmsnorm_forward<F>(res_out.data<F>(), ln_out.data<F>(), rstd.data<F>(), a.data<F>(),
                                       b.data<F>(), w.data<F>(), N, C, eps);
    });
  }

  // The shared checks of rope_forward / rope_backward on (out, inp) = (out, inp) or (dinp, dout); returns N, D, P.
  struct RopeDims {
    int64_t N, D, P;
  };
  static RopeDims check_rope(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin,
                             const Tensor& pos, int64_t n_head, int64_t n_kv_head, const char* op, bool check_dtypes) {
    const std::string o(op);
    const LlamaHeads hr = check_llama_heads(inp, n_head, n_kv_head, false, (o + " inp").c_str());
    check_host(out, (o + " out").c_str());
    check_shape(out, inp.shape(), (o + " out").c_str());
    check_host(cos, (o + " cos").c_str());
    check_host(sin, (o + " sin").c_str());
    DPO_ASSERT(cos.dim() == 2 && 2 * cos.size(1) == hr.D,
               o + ": cos " + shape_str(cos.shape()) + " must be [P, D/2] for head size D = " + std::to_string(hr.D));
    check_shape(sin, cos.shape(), (o + " sin").c_str());
    check_host(pos, (o + " pos").c_str());
    check_dtype(pos, DType::I32, (o + " pos").c_str());
    DPO_ASSERT(pos.numel() == hr.N, o + ": pos " + shape_str(pos.shape()) + " must have one entry per row (N = " +
                                        std::to_string(hr.N) + ")");
    if (check_dtypes)
      check_same_host(inp, {{&out, (o + " out").c_str()}, {&cos, (o + " cos").c_str()}, {&sin, (o + " sin").c_str()}});
    check_same_or_apart(out, inp, (o + ": out and inp").c_str());
    return {hr.N, hr.D, cos.size(0)};
  }
  void rope_forward(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin, const Tensor& pos,
                    int64_t n_head, int64_t n_kv_head) override {
    rope_any(out, inp, cos, sin, pos, n_head, n_kv_head, false);
  }
  void rope_backward(const Tensor& dinp, const Tensor& dout, const Tensor& cos, const Tensor& sin, const Tensor& pos,
                     int64_t n_head, int64_t n_kv_head) override {
    rope_any(dinp, dout, cos, sin, pos, n_head, n_kv_head, true);
  }
  void rope_any(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin, const Tensor& pos,
                int64_t n_head, int64_t n_kv_head, bool backward) {
    const char* op = backward ? "rope_backward" : "rope_forward";
    if (is_bf16(inp)) {
      check_rope(out, inp, cos, sin, pos, n_head, n_kv_head, op, false);
      need(out, DType::BF16, backward ? "rope_backward dinp" : "rope_forward out");
      need(cos, DType::F32, backward ? "rope_backward cos" : "rope_forward cos");
      need(sin, DType::F32, backward ? "rope_backward sin" : "rope_forward sin");
      const Tensor o = out32(out);  // inp is read from its F32 copy: in place works
      rope_any(o, up(inp), cos, sin, pos, n_head, n_kv_head, backward);
      return down(out, o);
    }
    check_float(inp, backward ? "rope_backward dout" : "rope_forward inp");
    const RopeDims d = check_rope(out, inp, cos, sin, pos, n_head, n_kv_head, op, true);
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      if (backward) {
        cpu::rope_backward<F>(out.data<F>(), inp.data<F>(), cos.data<F>(), sin.data<F>(), pos.data<int32_t>(), d.N,
                              n_head, n_kv_head, d.D, d.P);
      } else {
        cpu::rope_forward<F>(out.data<F>(), inp.data<F>(), cos.data<F>(), sin.data<F>(), pos.data<int32_t>(), d.N,
                             n_head, n_kv_head, d.D, d.P);
      }
    });
  }

  // inp [N, 2I]; returns I.
  static int64_t check_swiglu_inp(const Tensor& inp, const char* name) {
    DPO_ASSERT(inp.defined() && inp.dim() > 0 && inp.size(-1) > 0 && inp.size(-1) % 2 == 0,
               std::string(name) + " " + (inp.defined() ? shape_str(inp.shape()) : std::string("undefined")) +
                   ": the last dim must be 2I > 0 ([gate | up])");
    return inp.size(-1) / 2;
  }
  void swiglu_forward(const Tensor& out, const Tensor& inp) override {
    if (is_bf16(inp)) {
      need(out, DType::BF16, "swiglu out");
      DPO_ASSERT(out.defined(), "swiglu out: tensor is undefined");
      const Tensor o = out32(out);
      swiglu_forward(o, up(inp));
      return down(out, o);
    }
    check_float(inp, "swiglu inp");
    const int64_t I = check_swiglu_inp(inp, "swiglu inp"), N = inp.numel() / (2 * I);
    check_host(out, "swiglu out");
    DPO_ASSERT(check_llama_rows(out, I, "swiglu out") == N, "swiglu out " + shape_str(out.shape()) + " must have N = " +
                                                             std::to_string(N) + " rows of I = " + std::to_string(I));
    check_same_host(inp, {{&out, "swiglu out"}});
    DPO_ASSERT(!overlaps(out, inp), "swiglu: out overlaps inp");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::swiglu_forward<F>(out.data<F>(), inp.data<F>(), N, I);
    });
  }
  void swiglu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) override {
    if (is_bf16(inp)) {
      need(dinp, DType::BF16, "swiglu dinp");
      need(dout, DType::BF16, "swiglu dout");
      DPO_ASSERT(dinp.defined(), "swiglu dinp: tensor is undefined");
      const Tensor d = out32(dinp);
      swiglu_backward(d, up(dout), up(inp));
      return down(dinp, d);
    }
    check_float(inp, "swiglu inp");
    const int64_t I = check_swiglu_inp(inp, "swiglu inp"), N = inp.numel() / (2 * I);
    check_host(dinp, "swiglu dinp");
    check_host(dout, "swiglu dout");
    check_shape(dinp, inp.shape(), "swiglu dinp");
    DPO_ASSERT(check_llama_rows(dout, I, "swiglu dout") == N, "swiglu dout " + shape_str(dout.shape()) +
                                                               " must have N = " + std::to_string(N) +
                                                               " rows of I = " + std::to_string(I));
    check_same_host(inp, {{&dinp, "swiglu dinp"}, {&dout, "swiglu dout"}});
    DPO_ASSERT(!overlaps(dinp, inp) && !overlaps(dinp, dout), "swiglu: dinp overlaps inp or dout");
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::swiglu_backward<F>(dinp.data<F>(), dout.data<F>(), inp.data<F>(), N, I);
    });
  }

  // compact [N, (n_head + 2 n_kv_head) D] and expanded [N, 3 n_head D]; returns N, D.
  static LlamaHeads check_repeat_kv(const Tensor& compact, const Tensor& expanded, int64_t n_head,
                                    int64_t n_kv_head, const char* op, const char* compact_name,
                                    const char* expanded_name) {
    const LlamaHeads hr =
        check_llama_heads(compact, n_head, n_kv_head, true, (std::string(op) + " " + compact_name).c_str());
    const std::string en = std::string(op) + " " + expanded_name;
    DPO_ASSERT(check_llama_rows(expanded, 3 * n_head * hr.D, en.c_str()) == hr.N,
               en + " " + shape_str(expanded.shape()) + " must have N = " + std::to_string(hr.N) + " rows");
    DPO_ASSERT(!overlaps(compact, expanded), std::string(op) + ": " + compact_name + " overlaps " + expanded_name);
    return hr;
  }
  void repeat_kv_forward(const Tensor& out, const Tensor& inp, int64_t n_head, int64_t n_kv_head) override {
    if (is_bf16(inp)) {  // a copy: exact in F32 and back
      need(out, DType::BF16, "repeat_kv out");
      check_repeat_kv(inp, out, n_head, n_kv_head, "repeat_kv_forward", "inp", "out");
      const Tensor o = out32(out);
      repeat_kv_forward(o, up(inp), n_head, n_kv_head);
      return down(out, o);
    }
    check_float(inp, "repeat_kv inp");
    check_host(out, "repeat_kv out");
    const LlamaHeads hr = check_repeat_kv(inp, out, n_head, n_kv_head, "repeat_kv_forward", "inp", "out");
    check_same_host(inp, {{&out, "repeat_kv out"}});
    dispatch(inp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::repeat_kv_forward<F>(out.data<F>(), inp.data<F>(), hr.N, n_head, n_kv_head, hr.D);
    });
  }
  void repeat_kv_backward(const Tensor& dinp, const Tensor& dout, int64_t n_head, int64_t n_kv_head) override {
    if (is_bf16(dout)) {
      need(dinp, DType::BF16, "repeat_kv dinp");
      check_repeat_kv(dinp, dout, n_head, n_kv_head, "repeat_kv_backward", "dinp", "dout");
      const Tensor d = out32(dinp);
      repeat_kv_backward(d, up(dout), n_head, n_kv_head);
      return down(dinp, d);
    }
    check_float(dout, "repeat_kv dout");
    check_host(dinp, "repeat_kv dinp");
    const LlamaHeads hr = check_repeat_kv(dinp, dout, n_head, n_kv_head, "repeat_kv_backward", "dinp", "dout");
    check_same_host(dout, {{&dinp, "repeat_kv dinp"}});
    dispatch(dout.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::repeat_kv_backward<F>(dinp.data<F>(), dout.data<F>(), hr.N, n_head, n_kv_head, hr.D);
    });
  }

  // The host checks of the log-prob forward's inputs and outputs, for S sequences of a [B, T] batch.
  static void check_logprob_io(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                               const Tensor& weights, int64_t B, int64_t T, int64_t S) {
    check_shape(targets, {B, T}, "logprob targets");
    check_dtype(targets, DType::I32, "logprob targets");
    check_shape(weights, {B, T}, "logprob weights");
    check_dtype(weights, logits.dtype(), "logprob weights");
    check_host(out.seq_logp, "logprob seq_logp");
    check_shape(out.seq_logp, {S}, "logprob seq_logp");
    check_dtype(out.seq_logp, logits.dtype(), "logprob seq_logp");
    if (out.token_logp.defined()) {
      check_host(out.token_logp, "logprob token_logp");
      check_shape(out.token_logp, {B, T}, "logprob token_logp");
      check_dtype(out.token_logp, logits.dtype(), "logprob token_logp");
    }
    if (out.seq_stats.defined()) {
      check_host(out.seq_stats, "logprob seq_stats");
      check_shape(out.seq_stats, {S, kSeqStatsWidth}, "logprob seq_stats");
      check_dtype(out.seq_stats, logits.dtype(), "logprob seq_stats");
    }
  }

  using Backend::logprob_backward;
  using Backend::logprob_forward;
  using Backend::preference_loss;
  void logprob_forward(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                       const Tensor& weights, int64_t V) override {
    if (is_bf16(logits)) {
      need(out.seq_logp, DType::F32, "logprob seq_logp");
      need(out.token_logp, DType::F32, "logprob token_logp");
      need(out.seq_stats, DType::F32, "logprob seq_stats");
      need(weights, DType::F32, "logprob weights");
      check_logits(logits, V);
      return logprob_forward(out, up(logits), targets, weights, V);
    }
    check_float(logits, "logprob logits");
    const int64_t B = logits.size(0), T = logits.size(1), ld = check_logits(logits, V);
    check_logprob_io(out, logits, targets, weights, B, T, B);
    dispatch(logits.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::logprob_forward<F>(out.seq_logp.data<F>(), opt<F>(out.token_logp), opt<F>(out.seq_stats),
                              logits.data<F>(), targets.data<int32_t>(), weights.data<F>(), B, T, V, ld);
    });
  }
  void logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets, const Tensor& weights,
                        const Tensor& dseq, int64_t V) override {
    if (is_bf16(logits)) {
      need(dlogits, DType::BF16, "logprob dlogits");
      need(weights, DType::F32, "logprob weights");
      need(dseq, DType::F32, "logprob dseq");
      check_logits(logits, V);
      const Tensor d = up(dlogits);  // a copy: dlogits may alias logits
      logprob_backward(d, up(logits), targets, weights, dseq, V);
      return down_rows(dlogits, d, V);
    }
    check_float(logits, "logprob logits");
    const int64_t B = logits.size(0), T = logits.size(1), ld = check_logits(logits, V);
    check_shape(dlogits, logits.shape(), "logprob dlogits");
    check_shape(targets, {B, T}, "logprob targets");
    check_shape(weights, {B, T}, "logprob weights");
    check_shape(dseq, {B}, "logprob dseq");
    dispatch(logits.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::logprob_backward<F>(dlogits.data<F>(), logits.data<F>(), targets.data<int32_t>(), weights.data<F>(),
                               dseq.data<F>(), B, T, V, ld);
    });
  }

  void logprob_forward_segments(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                const Tensor& weights, const Tensor& seg, int64_t V) override {
    if (is_bf16(logits)) {
      need(out.seq_logp, DType::F32, "logprob seq_logp");
      need(out.token_logp, DType::F32, "logprob token_logp");
      need(out.seq_stats, DType::F32, "logprob seq_stats");
      need(weights, DType::F32, "logprob weights");
      check_logits(logits, V);
      return logprob_forward_segments(out, up(logits), targets, weights, seg, V);
    }
    check_float(logits, "logprob logits");
    const int64_t B = logits.size(0), T = logits.size(1), ld = check_logits(logits, V);
    const int64_t S = check_segments(seg);
    check_logprob_io(out, logits, targets, weights, B, T, S);
    dispatch(logits.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::logprob_forward_segments<F>(out.seq_logp.data<F>(), opt<F>(out.token_logp), opt<F>(out.seq_stats),
                                       logits.data<F>(), targets.data<int32_t>(), weights.data<F>(),
                                       seg.data<int32_t>(), S, B, T, V, ld);
    });
  }
  void logprob_backward_segments(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                 const Tensor& weights, const Tensor& seg, const Tensor& dseq, int64_t V) override {
    if (is_bf16(logits)) {
      need(dlogits, DType::BF16, "logprob dlogits");
      need(weights, DType::F32, "logprob weights");
      need(dseq, DType::F32, "logprob dseq");
      check_logits(logits, V);
      const Tensor d = up(dlogits);  // a copy: dlogits may alias logits
      logprob_backward_segments(d, up(logits), targets, weights, seg, dseq, V);
      return down_rows(dlogits, d, V);
    }
    check_float(logits, "logprob logits");
    const int64_t B = logits.size(0), T = logits.size(1), ld = check_logits(logits, V);
    const int64_t S = check_segments(seg);
    check_host(dlogits, "logprob dlogits");
    check_shape(dlogits, logits.shape(), "logprob dlogits");
    check_dtype(dlogits, logits.dtype(), "logprob dlogits");
    check_host(targets, "logprob targets");
    check_shape(targets, {B, T}, "logprob targets");
    check_dtype(targets, DType::I32, "logprob targets");
    check_host(weights, "logprob weights");
    check_shape(weights, {B, T}, "logprob weights");
    check_dtype(weights, logits.dtype(), "logprob weights");
    check_host(dseq, "logprob dseq");
    check_shape(dseq, {S}, "logprob dseq");
    check_dtype(dseq, logits.dtype(), "logprob dseq");
    dispatch(logits.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::logprob_backward_segments<F>(dlogits.data<F>(), logits.data<F>(), targets.data<int32_t>(),
                                        weights.data<F>(), seg.data<int32_t>(), dseq.data<F>(), S, B, T, V, ld);
    });
  }

  void gather_rows(const Tensor& out, const Tensor& inp, const Tensor& idx) override {
    const auto [n, N, C] = check_row_index_args(out, inp, idx, "gather_rows");
    check_host(out, "gather_rows out");
    check_host(inp, "gather_rows inp");
    check_host(idx, "gather_rows idx");
    const char* o = static_cast<const char*>(out.raw());
    const char* i = static_cast<const char*>(inp.raw());
    DPO_ASSERT(out.numel() == 0 || inp.numel() == 0 || !(o < i + inp.nbytes() && i < o + out.nbytes()),
               "gather_rows: out overlaps inp");
    cpu::gather_rows(out.raw(), inp.raw(), idx.data<int32_t>(), n, N, C, dtype_size(out.dtype()));
  }
  void scatter_add_rows(const Tensor& dinp, const Tensor& dout, const Tensor& idx) override {
    // Plain variables, not a structured binding: the lambda below uses them (clang before 16 cannot capture
    // bindings, and the fuzzing build uses clang).
    const RowIndexShape sh = check_row_index_args(dout, dinp, idx, "scatter_add_rows");
    const int64_t n = sh.n, N = sh.N, C = sh.C;
    check_host(idx, "scatter_add_rows idx");
    check_host(dinp, "scatter_add_rows dinp");
    check_host(dout, "scatter_add_rows dout");
    const char* d0 = static_cast<const char*>(dinp.raw());
    const char* s0 = static_cast<const char*>(dout.raw());
    DPO_ASSERT(dinp.numel() == 0 || dout.numel() == 0 || !(d0 < s0 + dout.nbytes() && s0 < d0 + dinp.nbytes()),
               "scatter_add_rows: dinp overlaps dout");
    if (is_bf16(dinp)) {
      // The rows are checked before the F32 working copies exist; the copy of dinp is exact and rounded back once.
      cpu::check_row_index(idx.data<int32_t>(), n, N, "scatter_add_rows");
      const Tensor d = up(dinp);
      scatter_add_rows(d, up(dout), idx);
      return down(dinp, d);
    }
    check_float(dinp, "scatter_add_rows dinp");
    check_float(dout, "scatter_add_rows dout");
    dispatch(dinp.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::scatter_add_rows<F>(dinp.data<F>(), dout.data<F>(), idx.data<int32_t>(), n, N, C);
    });
  }

  // The CUDA kernel's arithmetic (kernels/pair_loss.h) in pair order; the sums are accumulated serially in pair
  // order (the GPU's order differs: the two agree to rounding).
  void preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp, const Tensor& offset,
                       const PairLossParams& p, double normalizer, int64_t q0, int64_t q1) override {
    const int64_t P = check_preference_loss_args(out, stats, ref_logp, offset, p, normalizer, q0, q1);
    check_float(stats, "preference_loss stats");
    const DType G = stats.dtype();
    for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&ref_logp, "preference_loss ref_logp"},
                                  {&offset, "preference_loss offset"}, {&out.pair_loss, "preference_loss pair_loss"}}) {
      if (!t->defined()) continue;
      check_host(*t, name);
      check_dtype(*t, G, name);
    }
    check_host(out.dseq, "preference_loss dseq");
    check_dtype(out.dseq, G, "preference_loss dseq");
    check_host(out.sums, "preference_loss sums");
    dispatch(G, [&](auto z) {
      using F = decltype(z);
      const F* st = stats.data<F>();
      const F* ref = opt<F>(ref_logp);
      const F* off = opt<F>(offset);
      F* dseq = out.dseq.data<F>();
      F* loss = opt<F>(out.pair_loss);
      double sums[kPairSumsWidth] = {};
      if (out.accumulate) std::memcpy(sums, out.sums.raw(), sizeof(sums));  // pair by pair onto the running sums
      for (int64_t q = q0; q < q1; ++q) {
        const PairLossInput in = pair_input_at(st, ref, off, P, q, p.rows);
        const PairLossOutput o = pair_loss_eval(p, in);
        dseq[pair_row(p.rows, P, q, 0)] = static_cast<F>(o.d_chosen / normalizer);
        dseq[pair_row(p.rows, P, q, 1)] = static_cast<F>(o.d_rejected / normalizer);
        if (loss) loss[q] = static_cast<F>(o.loss);
        pair_sums_add(sums, in, o);
      }
      std::memcpy(out.sums.raw(), sums, sizeof(sums));
    });
  }

  void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                    const AdamWParams& p) override {
    check_adamw_args(param, grad, m, v, p);
    dispatch(param.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::adamw_update<F>(param.data<F>(), grad.data<F>(), m.data<F>(), v.data<F>(), param.numel(), p);
    });
  }
  void adamw_update_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                             const std::vector<AdamWSegment>& segs, const AdamWParams& p) override {
    check_adamw_args(param, grad, m, v, p);
    DPO_ASSERT(param.dim() == 1, "adamw_update_segments: param must be a flat 1-D tensor, got " +
                                     shape_str(param.shape()));
    dispatch(param.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::adamw_update_segments<F>(param.data<F>(), grad.data<F>(), m.data<F>(), v.data<F>(), param.numel(),
                                    segs.data(), static_cast<int64_t>(segs.size()), p);
    });
  }
  AdamWCheck adamw_dry_run_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                    const std::vector<AdamWSegment>& segs, const AdamWParams& p) override {
    check_adamw_args(param, grad, m, v, p);
    DPO_ASSERT(param.dim() == 1, "adamw_dry_run_segments: param must be a flat 1-D tensor, got " +
                                     shape_str(param.shape()));
    AdamWCheck r = AdamWCheck::AllFinite;
    dispatch(param.dtype(), [&](auto z) {
      using F = decltype(z);
      r = cpu::adamw_dry_run_segments<F>(param.data<F>(), grad.data<F>(), m.data<F>(), v.data<F>(), param.numel(),
                                         segs.data(), static_cast<int64_t>(segs.size()), p);
    });
    return r;
  }
  double sum_squares(const Tensor& x) override {
    check_float(x, "sum_squares x");
    double s = 0.0;
    dispatch(x.dtype(), [&](auto z) {
      using F = decltype(z);
      s = cpu::sum_squares<F>(x.data<F>(), x.numel());
    });
    return s;
  }
  void scale(const Tensor& x, double s) override {
    check_float(x, "scale x");
    dispatch(x.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::scale<F>(x.data<F>(), x.numel(), s);
    });
  }

  // The device step: this backend's device is the host, so these are the host functions of kernels/adamw.h.
  void sum_squares_into(const Tensor& out, const Tensor& x) override {
    check_host(out, "sum_squares_into out");
    check_dtype(out, DType::F64, "sum_squares_into out");
    check_shape(out, {1}, "sum_squares_into out");
    out.data<double>()[0] = sum_squares(x);
  }
  void adamw_prepare(const Tensor& record, const Tensor& state, AdamWNormFrom from) override {
    check_step_tensors(record, state);
    cpu::adamw_prepare(record.data<double>(), state.data<double>(), from);
  }
  void adamw_check_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                            const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs) override {
    check_step_tensors(record, state);
    check_adamw_args(param, grad, m, v, AdamWParams{});
    DPO_ASSERT(param.dim() == 1, "adamw_check_segments: param must be a flat 1-D tensor, got " +
                                     shape_str(param.shape()));
    dispatch(param.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::adamw_check_segments<F>(param.data<F>(), grad.data<F>(), m.data<F>(), v.data<F>(), param.numel(),
                                   segs.data(), static_cast<int64_t>(segs.size()), state.data<double>(),
                                   record.data<double>());
    });
  }
  void adamw_apply_segments(const Tensor& record, const Tensor& state, const Tensor& param, const Tensor& grad,
                            const Tensor& m, const Tensor& v, const std::vector<AdamWSegment>& segs, const Tensor& copy,
                            GradAfterStep after) override {
    check_step_tensors(record, state);
    check_adamw_args(param, grad, m, v, AdamWParams{});
    DPO_ASSERT(param.dim() == 1, "adamw_apply_segments: param must be a flat 1-D tensor, got " +
                                     shape_str(param.shape()));
    uint16_t* c = nullptr;
    if (copy.defined()) {
      check_host(copy, "adamw_apply_segments copy");
      check_dtype(copy, DType::BF16, "adamw_apply_segments copy");
      check_shape(copy, param.shape(), "adamw_apply_segments copy");
      DPO_ASSERT(param.dtype() == DType::F32, std::string("adamw_apply_segments: a BF16 copy needs F32 parameters, "
                                                          "got ") + dtype_name(param.dtype()));
      for (const Tensor* t : {&param, &grad, &m, &v})
        DPO_ASSERT(!overlaps(copy, *t), "adamw_apply_segments: copy overlaps param, grad, m or v");
      c = static_cast<uint16_t*>(copy.raw());
    }
    dispatch(param.dtype(), [&](auto z) {
      using F = decltype(z);
      cpu::adamw_apply_segments<F>(param.data<F>(), grad.data<F>(), m.data<F>(), v.data<F>(), c, param.numel(),
                                   segs.data(), static_cast<int64_t>(segs.size()), state.data<double>(),
                                   record.data<double>(), after);
    });
  }

 private:
  CpuAttention attention_;

  // logits [B,T,ld] with 1 <= V <= ld (backend.h "Padded rows"); returns ld.
  static int64_t check_logits(const Tensor& logits, int64_t V) {
    check_host(logits, "logprob logits");
    DPO_ASSERT(logits.dim() == 3, "logprob logits must be [B,T,ld], got " + shape_str(logits.shape()));
    DPO_ASSERT(V >= 1, "logprob: the vocabulary width V must be >= 1, got " + std::to_string(V));
    return check_row_stride(logits, V, "logprob logits");
  }
  // pos [B,T] I32 on the host (the range of every position is the kernel's check, kernels/encoder.h).
  static void check_positions(const Tensor& pos, int64_t B, int64_t T) {
    check_host(pos, "encoder pos");
    check_dtype(pos, DType::I32, "encoder pos");
    check_shape(pos, {B, T}, "encoder pos");
  }
  // seg [S,2] I32 on the host; returns S (the ranges themselves are the kernel's check, kernels/logprob.h).
  static int64_t check_segments(const Tensor& seg) {
    check_host(seg, "logprob seg");
    check_dtype(seg, DType::I32, "logprob seg");
    DPO_ASSERT(seg.dim() == 2 && seg.size(1) == 2, "logprob seg must be [S,2], got " + shape_str(seg.shape()));
    return seg.size(0);
  }
  // The checks of both AdamW ops: floating host tensors of one dtype and one shape, no two overlapping, step >= 1.
  static void check_adamw_args(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                               const AdamWParams& p) {
    check_float(param, "adamw param");
    check_shape(grad, param.shape(), "adamw grad");
    check_shape(m, param.shape(), "adamw m");
    check_shape(v, param.shape(), "adamw v");
    check_same_dtype(param, grad, "adamw param", "adamw grad");
    check_same_dtype(param, m, "adamw param", "adamw m");
    check_same_dtype(param, v, "adamw param", "adamw v");
    DPO_ASSERT(p.step >= 1, "adamw step is 1-based, got " + std::to_string(p.step));
    const Tensor* ts[4] = {&param, &grad, &m, &v};
    const char* names[4] = {"param", "grad", "m", "v"};
    for (int a = 0; a < 4; ++a)
      for (int b = a + 1; b < 4; ++b) {
        const char* pa = static_cast<const char*>(ts[a]->raw());
        const char* pb = static_cast<const char*>(ts[b]->raw());
        const bool overlap = pa < pb + ts[b]->nbytes() && pb < pa + ts[a]->nbytes();
        DPO_ASSERT(!overlap, std::string("adamw: ") + names[a] + " and " + names[b] + " overlap");
      }
  }
  static bool overlaps(const Tensor& a, const Tensor& b) {
    const char* pa = static_cast<const char*>(a.raw());
    const char* pb = static_cast<const char*>(b.raw());
    return pa < pb + b.nbytes() && pb < pa + a.nbytes();
  }
  // The device step's record [adamw_record::kWidth] and state [adamw_state::kWidth]: F64 host tensors.
  static void check_step_tensors(const Tensor& record, const Tensor& state) {
    check_host(record, "adamw record");
    check_host(state, "adamw state");
    check_dtype(record, DType::F64, "adamw record");
    check_dtype(state, DType::F64, "adamw state");
    check_shape(record, {adamw_record::kWidth}, "adamw record");
    check_shape(state, {adamw_state::kWidth}, "adamw state");
  }
  static void convert_into(const Tensor& dst, const Tensor& src, const char* what) {
    check_host(dst, what);
    check_host(src, what);
    DPO_ASSERT(dst.shape() == src.shape(), std::string(what) + ": shapes " + shape_str(dst.shape()) + " and " +
                                               shape_str(src.shape()) + " differ");
    if (dst.dtype() == src.dtype()) {
      std::memmove(dst.raw(), src.raw(), static_cast<size_t>(src.nbytes()));
      return;
    }
    Tensor c = convert_host(src, dst.dtype(), what);
    std::memcpy(dst.raw(), c.raw(), static_cast<size_t>(c.nbytes()));
  }
};

// Before main() of every program that links the CPU backend, hence before any GEMM: OpenBLAS chose its kernels
// when it was loaded (before this runs); a choice that does not fit the CPU is fixed by restarting the process
// with OPENBLAS_CORETYPE set, or reported (runtime/blas_info.h). A constructor, not a call in main(), so that the
// test programs (GoogleTest's main) get the same fix as the dpo CLI.
__attribute__((constructor)) void check_blas_core_before_main() { fix_blas_core_at_startup(); }

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads, CpuAttention attention) {
  return std::make_unique<CpuBackend>(num_threads, attention);
}

}  // namespace dpo
