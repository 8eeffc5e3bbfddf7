// CudaBackend: boundary checks (shapes, dtypes, device of every tensor), then one launcher call per op. See
// cuda_backend.h for where the host waits.
#include "runtime/cuda/cuda_backend.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/batch_layout.h"
#include "kernels/elementwise.cuh"
#include "kernels/encoder.cuh"
#include "kernels/flash_attention.h"
#include "kernels/gather.cuh"
#include "kernels/gelu.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/logprob.cuh"
#include "kernels/matmul.cuh"
#include "kernels/pair_loss.cuh"
#include "kernels/repeat_kv.cuh"
#include "kernels/residual.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/nvtx.h"
#include "runtime/safetensors.h"

namespace dpo {

namespace {

std::string arg(const char* name, const std::string& what) { return std::string(name) + ": " + what; }

void check_host(const Tensor& t, const char* name) {
  if (!t.defined()) throw Error(arg(name, "tensor is undefined"));
  if (t.device().kind != DeviceKind::CPU)
    throw Error(arg(name, "expected a host tensor, got one on " + t.device().str()));
}

void check_same_shape(const Tensor& a, const Tensor& b, const char* what) {
  if (a.shape() != b.shape())
    throw Error(arg(what, "shapes " + shape_str(a.shape()) + " and " + shape_str(b.shape()) + " differ"));
}

float* f32(const Tensor& t) { return t.data<float>(); }

// Typed device pointers for the launchers, after the dtype checks (Tensor::data has no bf16 type).
template <class T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.raw());
}
template <class T>
T* opt_ptr(const Tensor& t) {
  return t.defined() ? ptr<T>(t) : nullptr;
}

// Calls f(float{}) for activation dtype F32 and f(__nv_bfloat16{}) for BF16, so that one body picks the launcher
// overload of the storage type (kernels/*.cuh).
template <class F>
void with_storage(DType a, F&& f) {
  if (a == DType::BF16) {
    f(__nv_bfloat16{});
  } else {
    f(float{});
  }
}

bool is_floating(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16; }

// Page-locked host memory is read by the DMA engine after cudaMemcpyAsync returns, so a copy from it must finish
// before the caller may reuse the buffer. When the query fails, assume it is page-locked (the safe side).
bool is_page_locked(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error
    return true;
  }
  return a.type == cudaMemoryTypeHost;
}

bool overlap(const Tensor& a, const Tensor& b) {
  const char* pa = static_cast<const char*>(a.raw());
  const char* pb = static_cast<const char*>(b.raw());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

}  // namespace

CudaBackend::CudaBackend(int device) {
  const int n = CudaContext::device_count();  // throws, naming the CUDA error, when a GPU is there but unusable
  if (n == 0)
    throw Error("CUDA device " + std::to_string(device) + " does not exist: " + CudaContext::query_devices().message);
  if (device < 0 || device >= n)
    throw Error("CUDA device " + std::to_string(device) + " does not exist (this machine has " + std::to_string(n) +
                " CUDA device" + (n == 1 ? "" : "s") + ")");
  ctx_ = std::make_shared<CudaContext>(device);
}

Device CudaBackend::device() const { return Device{DeviceKind::CUDA, ctx_->device()}; }

void CudaBackend::check_device(const Tensor& t, const char* name) const {
  if (!t.defined()) throw Error(arg(name, "tensor is undefined"));
  if (!(t.device() == device()))
    throw Error(arg(name, "tensor is on " + t.device().str() + ", this backend is " + device().str()));
}

void CudaBackend::check_f32(const Tensor& t, const char* name) const {
  check_device(t, name);
  if (t.dtype() != DType::F32)
    throw Error(arg(name, std::string("the CUDA optimizer ops take F32 (master weights), got ") +
                              dtype_name(t.dtype())));
}

DType CudaBackend::check_activation(const Tensor& t, const char* name) const {
  check_device(t, name);
  if (t.dtype() != DType::F32 && t.dtype() != DType::BF16)
    throw Error(arg(name, std::string("the CUDA backend's activation dtype is F32 or BF16, got ") +
                              dtype_name(t.dtype())));
  return t.dtype();
}

void CudaBackend::check_is(const Tensor& t, DType expect, const char* name) const {
  check_device(t, name);
  if (t.dtype() != expect)
    throw Error(arg(name, std::string("expected ") + dtype_name(expect) + ", got " + dtype_name(t.dtype()) +
                              " (runtime/backend.h: activations share one dtype A; gradients of parameters, LayerNorm "
                              "statistics and per-sequence scalars are grad_dtype(A))"));
}

void CudaBackend::check_i32(const Tensor& t, const char* name) const {
  check_device(t, name);
  check_dtype(t, DType::I32, name);
}

// --- memory -------------------------------------------------------------------------------------------------------

Tensor CudaBackend::empty(Shape shape, DType dtype) {
  int64_t n = 1;
  for (int64_t d : shape) {
    DPO_ASSERT(d >= 0, "empty: negative dimension in " + shape_str(shape));
    n *= d;
  }
  const int64_t bytes = n * dtype_size(dtype);
  std::shared_ptr<Buffer> inner = ctx_->alloc(bytes);
  void* p = inner->data();
  // The outer buffer keeps the context alive until the memory is released (in stream order, on its stream).
  auto release = [inner, ctx = ctx_](void*) mutable {
    inner.reset();
    ctx.reset();
  };
  return Tensor(std::make_shared<Buffer>(p, bytes, device(), std::move(release)), 0, dtype, std::move(shape));
}

void CudaBackend::fill_zero(const Tensor& t) {
  check_device(t, "fill_zero");
  if (t.nbytes() == 0) return;
  DPO_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, static_cast<size_t>(t.nbytes()), ctx_->stream()));
}

namespace {

class CudaGraph final : public Backend::Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream) : exec_(exec), stream_(stream) {}
  ~CudaGraph() override { cudaGraphExecDestroy(exec_); }
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  void replay() override {
    DPO_NVTX_RANGE("graph replay");
    DPO_CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
};

}  // namespace

std::unique_ptr<Backend::Graph> CudaBackend::capture(const std::function<void()>& fn) {
  cudaStream_t s = ctx_->stream();
  DPO_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  // Ends the capture whatever happened, so the stream is usable again; returns the graph or null.
  auto end = [&]() -> cudaGraph_t {
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(s, &g);
    if (e != cudaSuccess) {
      cudaGetLastError();  // capture errors are not sticky: clear them
      if (g) cudaGraphDestroy(g);
      return nullptr;
    }
    return g;
  };
  try {
    fn();
  } catch (const std::exception& ex) {
    if (cudaGraph_t g = end()) cudaGraphDestroy(g);
    throw GraphCaptureError(std::string("CUDA graph capture failed: ") + ex.what());
  }
  cudaGraph_t g = end();
  if (!g)
    throw GraphCaptureError("CUDA graph capture failed: the captured work used a call that is not allowed during "
                            "capture (a synchronisation or synchronous copy), so the capture was invalidated");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
  cudaGraphDestroy(g);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw GraphCaptureError(std::string("CUDA graph instantiation failed: ") + cudaGetErrorName(e) + ": " +
                            cudaGetErrorString(e));
  }
  return std::make_unique<CudaGraph>(exec, s);
}

void CudaBackend::copy_from_host(const Tensor& dst, const Tensor& src) {
  check_device(dst, "copy_from_host dst");
  check_host(src, "copy_from_host src");
  check_same_shape(dst, src, "copy_from_host");
  if (dst.nbytes() == 0) return;
  if (dst.dtype() == src.dtype()) {
    DPO_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), static_cast<size_t>(src.nbytes()), cudaMemcpyHostToDevice,
                                   ctx_->stream()));
    if (is_page_locked(src.raw())) ctx_->synchronize();
    return;
  }
  // Convert on the host into pageable staging memory; cudaMemcpyAsync has staged it before it returns, so the
  // temporary may be freed at the end of this scope without a sync.
  const Tensor staged = convert_host(src, dst.dtype(), "copy_from_host");
  DPO_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), staged.raw(), static_cast<size_t>(staged.nbytes()), cudaMemcpyHostToDevice,
                                 ctx_->stream()));
}

void CudaBackend::copy_to_host(const Tensor& dst, const Tensor& src) {
  check_host(dst, "copy_to_host dst");
  check_device(src, "copy_to_host src");
  check_same_shape(dst, src, "copy_to_host");
  if (dst.nbytes() == 0) return;
  if (dst.dtype() == src.dtype()) {
    DPO_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), static_cast<size_t>(src.nbytes()), cudaMemcpyDeviceToHost,
                                   ctx_->stream()));
    ctx_->synchronize();  // the caller reads dst on return
    return;
  }
  const Tensor staged = Tensor::host(src.shape(), src.dtype());
  DPO_CUDA_CHECK(cudaMemcpyAsync(staged.raw(), src.raw(), static_cast<size_t>(src.nbytes()), cudaMemcpyDeviceToHost,
                                 ctx_->stream()));
  ctx_->synchronize();
  const Tensor c = convert_host(staged, dst.dtype(), "copy_to_host");
  std::memcpy(dst.raw(), c.raw(), static_cast<size_t>(c.nbytes()));
}

void CudaBackend::copy(const Tensor& dst, const Tensor& src) {
  check_device(dst, "copy dst");
  check_device(src, "copy src");
  check_same_dtype(dst, src, "copy dst", "copy src");
  DPO_ASSERT(dst.numel() == src.numel(), "copy: sizes differ");
  if (dst.nbytes() == 0 || dst.raw() == src.raw()) return;
  DPO_ASSERT(!overlap(dst, src), "copy: dst and src overlap");
  DPO_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), static_cast<size_t>(src.nbytes()), cudaMemcpyDeviceToDevice,
                                 ctx_->stream()));
}

void CudaBackend::convert(const Tensor& dst, const Tensor& src) {
  check_device(dst, "convert dst");
  check_device(src, "convert src");
  DPO_ASSERT(dst.numel() == src.numel(),
             "convert: sizes differ (" + shape_str(dst.shape()) + " and " + shape_str(src.shape()) + ")");
  if (dst.dtype() == src.dtype()) return copy(dst, src);
  if (!is_floating(dst.dtype()) || !is_floating(src.dtype()))
    throw Error(std::string("convert: converts between F32, F64 and BF16, got ") + dtype_name(src.dtype()) + " -> " +
                dtype_name(dst.dtype()));
  if (dst.numel() == 0) return;
  DPO_ASSERT(!overlap(dst, src), "convert: dst and src overlap");
  const int64_t n = dst.numel();
  const DType d = dst.dtype(), s = src.dtype();
  if (d == DType::BF16 && s == DType::F32) return cuda::convert(*ctx_, ptr<__nv_bfloat16>(dst), ptr<float>(src), n);
  if (d == DType::BF16 && s == DType::F64) return cuda::convert(*ctx_, ptr<__nv_bfloat16>(dst), ptr<double>(src), n);
  if (d == DType::F32 && s == DType::BF16) return cuda::convert(*ctx_, ptr<float>(dst), ptr<__nv_bfloat16>(src), n);
  if (d == DType::F32 && s == DType::F64) return cuda::convert(*ctx_, ptr<float>(dst), ptr<double>(src), n);
  if (d == DType::F64 && s == DType::BF16) return cuda::convert(*ctx_, ptr<double>(dst), ptr<__nv_bfloat16>(src), n);
  return cuda::convert(*ctx_, ptr<double>(dst), ptr<float>(src), n);  // F64 <- F32, the one left
}

void CudaBackend::synchronize() { ctx_->synchronize(); }

// --- GPT-2 ops ----------------------------------------------------------------------------------------------------

// Each op takes its activation dtype A from one activation argument (the first one checked), then requires A of
// the other activations and G = grad_dtype(A) of parameter gradients, statistics and per-sequence scalars.

void CudaBackend::encoder_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte, const Tensor& wpe) {
  const DType A = check_activation(out, "encoder out");
  check_i32(tokens, "encoder tokens");
  check_is(wte, A, "encoder wte");
  if (wpe.defined()) check_is(wpe, A, "encoder wpe");  // undefined: no position embedding (runtime/backend.h)
  DPO_ASSERT(tokens.dim() == 2 && wte.dim() == 2 && (!wpe.defined() || wpe.dim() == 2),
             "encoder: tokens, wte and wpe must be 2-D, got " + shape_str(tokens.shape()) + ", " +
                 shape_str(wte.shape()) + ", " + (wpe.defined() ? shape_str(wpe.shape()) : "undefined"));
  const int64_t B = tokens.size(0), T = tokens.size(1), V = wte.size(0), C = wte.size(1);
  check_shape(out, {B, T, C}, "encoder out");
  if (wpe.defined())
    DPO_ASSERT(wpe.size(0) >= T && wpe.size(1) == C, "wpe " + shape_str(wpe.shape()) + " for T=" + std::to_string(T));
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::encoder_forward(*ctx_, ptr<S>(out), tokens.data<int32_t>(), ptr<S>(wte), opt_ptr<S>(wpe), B, T, C, V);
  });
}

void CudaBackend::encoder_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout, const Tensor& tokens) {
  const DType A = check_activation(dout, "encoder dout");
  check_is(dwte, grad_dtype(A), "encoder dwte");
  if (dwpe.defined()) check_is(dwpe, grad_dtype(A), "encoder dwpe");  // undefined: no position embedding
  check_i32(tokens, "encoder tokens");
  DPO_ASSERT(tokens.dim() == 2 && dwte.dim() == 2 && (!dwpe.defined() || dwpe.dim() == 2),
             "encoder: tokens, dwte and dwpe must be 2-D, got " + shape_str(tokens.shape()) + ", " +
                 shape_str(dwte.shape()) + ", " + (dwpe.defined() ? shape_str(dwpe.shape()) : "undefined"));
  const int64_t B = tokens.size(0), T = tokens.size(1), V = dwte.size(0), C = dwte.size(1);
  check_shape(dout, {B, T, C}, "encoder dout");
  if (dwpe.defined())
    DPO_ASSERT(dwpe.size(0) >= T && dwpe.size(1) == C,
               "dwpe " + shape_str(dwpe.shape()) + " for T=" + std::to_string(T));
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::encoder_backward(*ctx_, f32(dwte), opt_ptr<float>(dwpe), ptr<S>(dout), tokens.data<int32_t>(), B, T, C, V);
  });
}

void CudaBackend::encoder_forward_pos(const Tensor& out, const Tensor& tokens, const Tensor& pos, const Tensor& wte,
                                      const Tensor& wpe) {
  if (!wpe.defined()) return encoder_forward(out, tokens, wte, wpe);  // no position embedding: pos unused
  const DType A = check_activation(out, "encoder out");
  check_i32(tokens, "encoder tokens");
  check_i32(pos, "encoder pos");
  check_is(wte, A, "encoder wte");
  check_is(wpe, A, "encoder wpe");
  DPO_ASSERT(tokens.dim() == 2 && wte.dim() == 2 && wpe.dim() == 2,
             "encoder: tokens, wte and wpe must be 2-D, got " + shape_str(tokens.shape()) + ", " +
                 shape_str(wte.shape()) + ", " + shape_str(wpe.shape()));
  const int64_t B = tokens.size(0), T = tokens.size(1), V = wte.size(0), C = wte.size(1), P = wpe.size(0);
  check_shape(pos, {B, T}, "encoder pos");
  check_shape(out, {B, T, C}, "encoder out");
  DPO_ASSERT(wpe.size(1) == C, "wpe " + shape_str(wpe.shape()) + " for C=" + std::to_string(C));
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::encoder_forward_pos(*ctx_, ptr<S>(out), tokens.data<int32_t>(), pos.data<int32_t>(), ptr<S>(wte),
                              ptr<S>(wpe), B, T, C, V, P);
  });
}

void CudaBackend::encoder_backward_pos(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                                       const Tensor& tokens, const Tensor& pos) {
  if (!dwpe.defined()) return encoder_backward(dwte, dwpe, dout, tokens);  // no position embedding: pos unused
  const DType A = check_activation(dout, "encoder dout");
  check_is(dwte, grad_dtype(A), "encoder dwte");
  check_is(dwpe, grad_dtype(A), "encoder dwpe");
  check_i32(tokens, "encoder tokens");
  check_i32(pos, "encoder pos");
  DPO_ASSERT(tokens.dim() == 2 && dwte.dim() == 2 && dwpe.dim() == 2,
             "encoder: tokens, dwte and dwpe must be 2-D, got " + shape_str(tokens.shape()) + ", " +
                 shape_str(dwte.shape()) + ", " + shape_str(dwpe.shape()));
  const int64_t B = tokens.size(0), T = tokens.size(1), V = dwte.size(0), C = dwte.size(1), P = dwpe.size(0);
  check_shape(pos, {B, T}, "encoder pos");
  check_shape(dout, {B, T, C}, "encoder dout");
  DPO_ASSERT(dwpe.size(1) == C, "dwpe " + shape_str(dwpe.shape()) + " for C=" + std::to_string(C));
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::encoder_backward_pos(*ctx_, f32(dwte), f32(dwpe), ptr<S>(dout), tokens.data<int32_t>(),
                               pos.data<int32_t>(), B, T, C, V, P);
  });
}

void CudaBackend::layernorm_forward(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& inp,
                                    const Tensor& w, const Tensor& b, double eps) {
  const DType A = check_activation(inp, "layernorm inp");
  check_is(out, A, "layernorm out");
  check_is(mean, grad_dtype(A), "layernorm mean");
  check_is(rstd, grad_dtype(A), "layernorm rstd");
  check_is(w, A, "layernorm w");
  check_is(b, A, "layernorm b");
  const int64_t C = inp.size(-1);
  DPO_ASSERT(C > 0, "layernorm inp " + shape_str(inp.shape()) + " has no channels");
  const int64_t N = inp.numel() / C;
  check_shape(out, inp.shape(), "layernorm out");
  check_shape(w, {C}, "layernorm w");
  check_shape(b, {C}, "layernorm b");
  DPO_ASSERT(mean.numel() == N && rstd.numel() == N, "layernorm mean/rstd must have N elements");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::layernorm_forward(*ctx_, ptr<S>(out), f32(mean), f32(rstd), ptr<S>(inp), ptr<S>(w), ptr<S>(b), N, C, eps);
  });
}

void CudaBackend::layernorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& db, const Tensor& dout,
                                     const Tensor& inp, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                                     GradWrite dinp_write) {
  const DType A = check_activation(inp, "layernorm inp");
  const DType G = grad_dtype(A);
  check_is(dinp, A, "layernorm dinp");
  check_is(dw, G, "layernorm dw");
  check_is(db, G, "layernorm db");
  check_is(dout, A, "layernorm dout");
  check_is(w, A, "layernorm w");
  check_is(mean, G, "layernorm mean");
  check_is(rstd, G, "layernorm rstd");
  const int64_t C = inp.size(-1);
  DPO_ASSERT(C > 0, "layernorm inp " + shape_str(inp.shape()) + " has no channels");
  const int64_t N = inp.numel() / C;
  check_shape(dinp, inp.shape(), "layernorm dinp");
  check_shape(dout, inp.shape(), "layernorm dout");
  check_shape(dw, {C}, "layernorm dw");
  check_shape(db, {C}, "layernorm db");
  check_shape(w, {C}, "layernorm w");
  DPO_ASSERT(mean.numel() == N && rstd.numel() == N, "layernorm mean/rstd must have N elements");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::layernorm_backward(*ctx_, ptr<S>(dinp), f32(dw), f32(db), ptr<S>(dout), ptr<S>(inp), ptr<S>(w), f32(mean),
                             f32(rstd), N, C, dinp_write);
  });
}

void CudaBackend::residual_layernorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& mean,
                                             const Tensor& rstd, const Tensor& a, const Tensor& b, const Tensor& w,
                                             const Tensor& bias, double eps) {
  const DType A = check_activation(a, "residual_layernorm a");
  check_is(b, A, "residual_layernorm b");
  check_is(res_out, A, "residual_layernorm res_out");
  check_is(ln_out, A, "residual_layernorm ln_out");
  check_is(w, A, "residual_layernorm w");
  check_is(bias, A, "residual_layernorm bias");
  check_is(mean, grad_dtype(A), "residual_layernorm mean");
  check_is(rstd, grad_dtype(A), "residual_layernorm rstd");
  const int64_t C = a.size(-1);
  DPO_ASSERT(C > 0, "residual_layernorm a " + shape_str(a.shape()) + " has no channels");
  const int64_t N = a.numel() / C;
  check_shape(b, a.shape(), "residual_layernorm b");
  check_shape(res_out, a.shape(), "residual_layernorm res_out");
  check_shape(ln_out, a.shape(), "residual_layernorm ln_out");
  check_shape(w, {C}, "residual_layernorm w");
  check_shape(bias, {C}, "residual_layernorm bias");
  DPO_ASSERT(mean.numel() == N && rstd.numel() == N, "residual_layernorm mean/rstd must have N elements");
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&a, "a"}, {&b, "b"}, {&res_out, "res_out"},
                                {&w, "w"}, {&bias, "bias"}}) {
    DPO_ASSERT(!overlap(ln_out, *t), std::string("residual_layernorm: ln_out overlaps ") + name);
  }
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::residual_layernorm_forward(*ctx_, ptr<S>(res_out), ptr<S>(ln_out), f32(mean), f32(rstd), ptr<S>(a),
                                     ptr<S>(b), ptr<S>(w), ptr<S>(bias), N, C, eps);
  });
}

// --- Llama-family ops ---------------------------------------------------------------------------------------------

void CudaBackend::rmsnorm_forward(const Tensor& out, const Tensor& rstd, const Tensor& inp, const Tensor& w,
                                  double eps) {
  const DType A = check_activation(inp, "rmsnorm inp");
  check_is(out, A, "rmsnorm out");
  check_is(w, A, "rmsnorm w");
  check_is(rstd, grad_dtype(A), "rmsnorm rstd");
  const int64_t C = inp.size(-1);
  DPO_ASSERT(C > 0, "rmsnorm inp " + shape_str(inp.shape()) + " has no channels");
  const int64_t N = inp.numel() / C;
  check_shape(out, inp.shape(), "rmsnorm out");
  check_shape(w, {C}, "rmsnorm w");
  DPO_ASSERT(rstd.numel() == N, "rmsnorm rstd " + shape_str(rstd.shape()) + " must have N = " + std::to_string(N) +
                                    " elements");
  DPO_ASSERT(!overlap(out, inp) && !overlap(out, w), "rmsnorm: out overlaps inp or w");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::rmsnorm_forward(*ctx_, ptr<S>(out), f32(rstd), ptr<S>(inp), ptr<S>(w), N, C, eps);
  });
}

void CudaBackend::rmsnorm_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dout, const Tensor& inp,
                                   const Tensor& w, const Tensor& rstd, GradWrite dinp_write) {
  const DType A = check_activation(inp, "rmsnorm inp");
  const DType G = grad_dtype(A);
  check_is(dinp, A, "rmsnorm dinp");
  check_is(dout, A, "rmsnorm dout");
  check_is(w, A, "rmsnorm w");
  check_is(dw, G, "rmsnorm dw");
  check_is(rstd, G, "rmsnorm rstd");
  const int64_t C = inp.size(-1);
  DPO_ASSERT(C > 0, "rmsnorm inp " + shape_str(inp.shape()) + " has no channels");
  const int64_t N = inp.numel() / C;
  check_shape(dinp, inp.shape(), "rmsnorm dinp");
  check_shape(dout, inp.shape(), "rmsnorm dout");
  check_shape(w, {C}, "rmsnorm w");
  check_shape(dw, {C}, "rmsnorm dw");
  DPO_ASSERT(rstd.numel() == N, "rmsnorm rstd " + shape_str(rstd.shape()) + " must have N = " + std::to_string(N) +
                                    " elements");
  DPO_ASSERT(!overlap(dinp, dout) && !overlap(dinp, inp), "rmsnorm_backward: dinp overlaps dout or inp");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::rmsnorm_backward(*ctx_, ptr<S>(dinp), f32(dw), ptr<S>(dout), ptr<S>(inp), ptr<S>(w), f32(rstd), N, C,
                           dinp_write);
  });
}

void CudaBackend::residual_rmsnorm_forward(const Tensor& res_out, const Tensor& ln_out, const Tensor& rstd,
                                           const Tensor& a, const Tensor& b, const Tensor& w, double eps) {
  const DType A = check_activation(a, "residual_rmsnorm a");
  check_is(b, A, "residual_rmsnorm b");
  check_is(res_out, A, "residual_rmsnorm res_out");
  check_is(ln_out, A, "residual_rmsnorm ln_out");
  check_is(w, A, "residual_rmsnorm w");
  check_is(rstd, grad_dtype(A), "residual_rmsnorm rstd");
  const int64_t C = a.size(-1);
  DPO_ASSERT(C > 0, "residual_rmsnorm a " + shape_str(a.shape()) + " has no channels");
  const int64_t N = a.numel() / C;
  check_shape(b, a.shape(), "residual_rmsnorm b");
  check_shape(res_out, a.shape(), "residual_rmsnorm res_out");
  check_shape(ln_out, a.shape(), "residual_rmsnorm ln_out");
  check_shape(w, {C}, "residual_rmsnorm w");
  DPO_ASSERT(rstd.numel() == N, "residual_rmsnorm rstd must have N = " + std::to_string(N) + " elements");
  for (const auto& [t, name] :
       {std::pair<const Tensor*, const char*>{&a, "a"}, {&b, "b"}, {&res_out, "res_out"}, {&w, "w"}}) {
    DPO_ASSERT(!overlap(ln_out, *t), std::string("residual_rmsnorm: ln_out overlaps ") + name);
  }
  DPO_ASSERT(res_out.raw() == a.raw() || !overlap(res_out, a), "residual_rmsnorm: res_out partly overlaps a");
  DPO_ASSERT(res_out.raw() == b.raw() || !overlap(res_out, b), "residual_rmsnorm: res_out partly overlaps b");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::residual_rmsnorm_forward(*ctx_, ptr<S>(res_out), ptr<S>(ln_out), f32(rstd), ptr<S>(a), ptr<S>(b),
                                   ptr<S>(w), N, C, eps);
  });
}

void CudaBackend::rope_any(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin,
                           const Tensor& pos, int64_t n_head, int64_t n_kv_head, bool backward) {
  const std::string op = backward ? "rope_backward" : "rope_forward";
  const DType A = check_activation(inp, (op + (backward ? " dout" : " inp")).c_str());
  check_is(out, A, (op + (backward ? " dinp" : " out")).c_str());
  check_is(cos, grad_dtype(A), (op + " cos").c_str());
  check_is(sin, grad_dtype(A), (op + " sin").c_str());
  check_i32(pos, (op + " pos").c_str());
  const LlamaHeads hr = check_llama_heads(inp, n_head, n_kv_head, false, (op + " inp").c_str());
  check_shape(out, inp.shape(), (op + " out").c_str());
  DPO_ASSERT(cos.dim() == 2 && 2 * cos.size(1) == hr.D,
             op + ": cos " + shape_str(cos.shape()) + " must be [P, D/2] for head size D = " + std::to_string(hr.D));
  check_shape(sin, cos.shape(), (op + " sin").c_str());
  DPO_ASSERT(pos.numel() == hr.N, op + ": pos " + shape_str(pos.shape()) + " must have one entry per row (N = " +
                                      std::to_string(hr.N) + ")");
  DPO_ASSERT(out.raw() == inp.raw() || !overlap(out, inp), op + ": out and inp overlap without being the same tensor");
  const cuda::RopeDirection dir = backward ? cuda::RopeDirection::Backward : cuda::RopeDirection::Forward;
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::rope(*ctx_, ptr<S>(out), ptr<S>(inp), f32(cos), f32(sin), pos.data<int32_t>(), hr.N, n_head, n_kv_head,
               hr.D, cos.size(0), dir);
  });
}
void CudaBackend::rope_forward(const Tensor& out, const Tensor& inp, const Tensor& cos, const Tensor& sin,
                               const Tensor& pos, int64_t n_head, int64_t n_kv_head) {
  rope_any(out, inp, cos, sin, pos, n_head, n_kv_head, false);
}
void CudaBackend::rope_backward(const Tensor& dinp, const Tensor& dout, const Tensor& cos, const Tensor& sin,
                                const Tensor& pos, int64_t n_head, int64_t n_kv_head) {
  rope_any(dinp, dout, cos, sin, pos, n_head, n_kv_head, true);
}

namespace {

// inp [N, 2I] (last dim even and > 0); returns I.
int64_t swiglu_width(const Tensor& inp) {
  DPO_ASSERT(inp.dim() > 0 && inp.size(-1) > 0 && inp.size(-1) % 2 == 0,
             "swiglu inp " + shape_str(inp.shape()) + ": the last dim must be 2I > 0 ([gate | up])");
  return inp.size(-1) / 2;
}

}  // namespace

void CudaBackend::swiglu_forward(const Tensor& out, const Tensor& inp) {
  const DType A = check_activation(inp, "swiglu inp");
  check_is(out, A, "swiglu out");
  const int64_t I = swiglu_width(inp), N = inp.numel() / (2 * I);
  DPO_ASSERT(check_llama_rows(out, I, "swiglu out") == N,
             "swiglu out " + shape_str(out.shape()) + " must have N = " + std::to_string(N) + " rows");
  DPO_ASSERT(!overlap(out, inp), "swiglu: out overlaps inp");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::swiglu_forward(*ctx_, ptr<S>(out), ptr<S>(inp), N, I);
  });
}

void CudaBackend::swiglu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp) {
  const DType A = check_activation(inp, "swiglu inp");
  check_is(dinp, A, "swiglu dinp");
  check_is(dout, A, "swiglu dout");
  const int64_t I = swiglu_width(inp), N = inp.numel() / (2 * I);
  check_shape(dinp, inp.shape(), "swiglu dinp");
  DPO_ASSERT(check_llama_rows(dout, I, "swiglu dout") == N,
             "swiglu dout " + shape_str(dout.shape()) + " must have N = " + std::to_string(N) + " rows");
  DPO_ASSERT(!overlap(dinp, inp) && !overlap(dinp, dout), "swiglu: dinp overlaps inp or dout");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::swiglu_backward(*ctx_, ptr<S>(dinp), ptr<S>(dout), ptr<S>(inp), N, I);
  });
}

void CudaBackend::repeat_kv_forward(const Tensor& out, const Tensor& inp, int64_t n_head, int64_t n_kv_head) {
  const DType A = check_activation(inp, "repeat_kv inp");
  check_is(out, A, "repeat_kv out");
  const LlamaHeads hr = check_llama_heads(inp, n_head, n_kv_head, true, "repeat_kv_forward inp");
  DPO_ASSERT(check_llama_rows(out, 3 * n_head * hr.D, "repeat_kv_forward out") == hr.N,
             "repeat_kv_forward out " + shape_str(out.shape()) + " must have N = " + std::to_string(hr.N) + " rows");
  DPO_ASSERT(!overlap(out, inp), "repeat_kv_forward: out overlaps inp");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::repeat_kv_forward(*ctx_, ptr<S>(out), ptr<S>(inp), hr.N, n_head, n_kv_head, hr.D);
  });
}

void CudaBackend::repeat_kv_backward(const Tensor& dinp, const Tensor& dout, int64_t n_head, int64_t n_kv_head) {
  const DType A = check_activation(dout, "repeat_kv dout");
  check_is(dinp, A, "repeat_kv dinp");
  const LlamaHeads hr = check_llama_heads(dinp, n_head, n_kv_head, true, "repeat_kv_backward dinp");
  DPO_ASSERT(check_llama_rows(dout, 3 * n_head * hr.D, "repeat_kv_backward dout") == hr.N,
             "repeat_kv_backward dout " + shape_str(dout.shape()) + " must have N = " + std::to_string(hr.N) +
                 " rows");
  DPO_ASSERT(!overlap(dinp, dout), "repeat_kv_backward: dinp overlaps dout");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::repeat_kv_backward(*ctx_, ptr<S>(dinp), ptr<S>(dout), hr.N, n_head, n_kv_head, hr.D);
  });
}

namespace {

void matmul_dims(const Tensor& inp, const Tensor& w, WeightLayout layout, int64_t* N, int64_t* C, int64_t* OC) {
  *C = inp.size(-1);
  DPO_ASSERT(*C > 0, "matmul inp " + shape_str(inp.shape()) + " has no channels");
  *N = inp.numel() / *C;
  DPO_ASSERT(w.dim() == 2, "matmul w must be 2-D, got " + shape_str(w.shape()));
  const int64_t wc = layout == WeightLayout::InOut ? w.size(0) : w.size(1);
  *OC = layout == WeightLayout::InOut ? w.size(1) : w.size(0);
  DPO_ASSERT(wc == *C, "matmul: inp " + shape_str(inp.shape()) + " does not match w " + shape_str(w.shape()));
}

}  // namespace

void CudaBackend::matmul_forward(const Tensor& out, const Tensor& inp, const Tensor& w, const Tensor& bias,
                                 WeightLayout layout) {
  const DType A = check_activation(inp, "matmul inp");
  check_is(w, A, "matmul w");
  check_is(out, A, "matmul out");
  if (bias.defined()) check_is(bias, A, "matmul bias");
  int64_t N, C, OC;
  matmul_dims(inp, w, layout, &N, &C, &OC);
  const int64_t ld = check_row_stride(out, OC, "matmul out");
  DPO_ASSERT(out.numel() == N * ld, "matmul out " + shape_str(out.shape()) + " for inp " + shape_str(inp.shape()));
  if (bias.defined()) check_shape(bias, {OC}, "matmul bias");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::matmul_forward(*ctx_, ptr<S>(out), ptr<S>(inp), ptr<S>(w), opt_ptr<S>(bias), N, C, OC, layout, ld);
  });
}

void CudaBackend::matmul_backward(const Tensor& dinp, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                                  const Tensor& inp, const Tensor& w, WeightLayout layout, GradWrite dinp_write) {
  const DType A = check_activation(inp, "matmul inp");
  check_is(w, A, "matmul w");
  check_is(dout, A, "matmul dout");
  int64_t N, C, OC;
  matmul_dims(inp, w, layout, &N, &C, &OC);
  const int64_t ld = check_row_stride(dout, OC, "matmul dout");
  DPO_ASSERT(dout.numel() == N * ld, "matmul dout " + shape_str(dout.shape()) + " for inp " + shape_str(inp.shape()));
  if (dinp.defined()) {
    check_is(dinp, A, "matmul dinp");
    check_shape(dinp, inp.shape(), "matmul dinp");
  }
  if (dw.defined()) {
    check_is(dw, grad_dtype(A), "matmul dw");
    check_shape(dw, w.shape(), "matmul dw");
  }
  if (dbias.defined()) {
    check_is(dbias, grad_dtype(A), "matmul dbias");
    check_shape(dbias, {OC}, "matmul dbias");
  }
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::matmul_backward(*ctx_, opt_ptr<S>(dinp), opt_ptr<float>(dw), opt_ptr<float>(dbias), ptr<S>(dout),
                          ptr<S>(inp), ptr<S>(w), N, C, OC, layout, ld, dinp_write);
  });
}

void CudaBackend::matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp, const Tensor& w,
                                      const Tensor& bias, WeightLayout layout) {
  const DType A = check_activation(inp, "matmul_gelu inp");
  check_is(out, A, "matmul_gelu out");
  check_is(pre, A, "matmul_gelu pre");
  check_is(w, A, "matmul_gelu w");
  if (bias.defined()) check_is(bias, A, "matmul_gelu bias");
  int64_t N, C, OC;
  matmul_dims(inp, w, layout, &N, &C, &OC);
  DPO_ASSERT(pre.numel() == N * OC && pre.size(-1) == OC,
             "matmul_gelu pre " + shape_str(pre.shape()) + " for inp " + shape_str(inp.shape()));
  check_shape(out, pre.shape(), "matmul_gelu out");
  if (bias.defined()) check_shape(bias, {OC}, "matmul_gelu bias");
  DPO_ASSERT(!overlap(out, pre), "matmul_gelu: out and pre overlap");
  if (A == DType::BF16 &&
      cuda::matmul_gelu_forward(*ctx_, ptr<__nv_bfloat16>(out), ptr<__nv_bfloat16>(pre), ptr<__nv_bfloat16>(inp),
                                ptr<__nv_bfloat16>(w), opt_ptr<__nv_bfloat16>(bias), N, C, OC, layout)) {
    return;
  }
  matmul_forward(pre, inp, w, bias, layout);
  gelu_forward(out, pre);
}

void CudaBackend::matmul_backward_dgelu(const Tensor& dpre, const Tensor& dw, const Tensor& dbias, const Tensor& dout,
                                        const Tensor& inp, const Tensor& w, const Tensor& pre, WeightLayout layout) {
  const DType A = check_activation(inp, "matmul_dgelu inp");
  check_is(dpre, A, "matmul_dgelu dpre");
  check_is(pre, A, "matmul_dgelu pre");
  check_is(dout, A, "matmul_dgelu dout");
  check_is(w, A, "matmul_dgelu w");
  int64_t N, C, OC;
  matmul_dims(inp, w, layout, &N, &C, &OC);
  check_shape(dpre, inp.shape(), "matmul_dgelu dpre");
  check_shape(pre, inp.shape(), "matmul_dgelu pre");
  DPO_ASSERT(dout.numel() == N * OC && dout.size(-1) == OC,
             "matmul_dgelu dout " + shape_str(dout.shape()) + " for inp " + shape_str(inp.shape()));
  if (dw.defined()) {
    check_is(dw, grad_dtype(A), "matmul_dgelu dw");
    check_shape(dw, w.shape(), "matmul_dgelu dw");
  }
  if (dbias.defined()) {
    check_is(dbias, grad_dtype(A), "matmul_dgelu dbias");
    check_shape(dbias, {OC}, "matmul_dgelu dbias");
  }
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&pre, "pre"}, {&dout, "dout"}, {&inp, "inp"},
                                {&w, "w"}}) {
    DPO_ASSERT(!overlap(dpre, *t), std::string("matmul_dgelu: dpre overlaps ") + name);
  }
  if (A == DType::BF16 &&
      cuda::matmul_backward_dgelu(*ctx_, ptr<__nv_bfloat16>(dpre), opt_ptr<float>(dw), opt_ptr<float>(dbias),
                                  ptr<__nv_bfloat16>(dout), ptr<__nv_bfloat16>(inp), ptr<__nv_bfloat16>(w),
                                  ptr<__nv_bfloat16>(pre), N, C, OC, layout)) {
    return;
  }
  // Unfused: the product into a scratch of the activation dtype (=), then its GELU backward (=).
  Tensor prod = empty(inp.shape(), A);
  matmul_backward(prod, dw, dbias, dout, inp, w, layout, GradWrite::Overwrite);
  gelu_backward(dpre, prod, pre, GradWrite::Overwrite);
}

void CudaBackend::attention_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                                    int64_t n_head) {
  if (attn_impl_ == AttentionImpl::Flash) return flash_forward(out, saved, qkv, keymask, Tensor(), n_head);
  const DType A = check_activation(qkv, "attention qkv");
  check_is(out, A, "attention out");
  check_is(saved, attention_saved_dtype(A), "attention saved");
  DPO_ASSERT(qkv.dim() == 3 && n_head > 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  DPO_ASSERT(qkv.size(2) == 3 * C && C % n_head == 0, "attention qkv " + shape_str(qkv.shape()));
  check_shape(out, {B, T, C}, "attention out");
  check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
  if (keymask.defined()) {
    check_i32(keymask, "attention keymask");
    check_shape(keymask, {B, T}, "attention keymask");
  }
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::attention_forward(*ctx_, ptr<S>(out), ptr<S>(saved), ptr<S>(qkv), opt_ptr<int32_t>(keymask), B, T, C,
                            n_head);
  });
}

void CudaBackend::attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                     const Tensor& saved, int64_t n_head) {
  if (attn_impl_ == AttentionImpl::Flash) return flash_backward(dqkv, dout, qkv, out, saved, Tensor(), n_head);
  const DType A = check_activation(qkv, "attention qkv");
  check_is(dqkv, A, "attention dqkv");
  check_is(dout, A, "attention dout");
  check_is(saved, attention_saved_dtype(A), "attention saved");
  DPO_ASSERT(qkv.dim() == 3 && n_head > 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  DPO_ASSERT(qkv.size(2) == 3 * C && C % n_head == 0, "attention qkv " + shape_str(qkv.shape()));
  check_shape(dqkv, qkv.shape(), "attention dqkv");
  check_shape(dout, {B, T, C}, "attention dout");
  check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::attention_backward(*ctx_, ptr<S>(dqkv), ptr<S>(dout), ptr<S>(qkv), ptr<S>(saved), B, T, C, n_head);
  });
}

void CudaBackend::attention_forward_spans(const Tensor& out, const Tensor& saved, const Tensor& qkv,
                                          const Tensor& span, int64_t n_head) {
  if (attn_impl_ == AttentionImpl::Flash) {
    DPO_ASSERT(span.defined(), "attention span: tensor is undefined");
    return flash_forward(out, saved, qkv, Tensor(), span, n_head);
  }
  const DType A = check_activation(qkv, "attention qkv");
  check_is(out, A, "attention out");
  check_is(saved, attention_saved_dtype(A), "attention saved");
  DPO_ASSERT(qkv.dim() == 3 && n_head > 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  DPO_ASSERT(qkv.size(2) == 3 * C && C % n_head == 0, "attention qkv " + shape_str(qkv.shape()));
  check_shape(out, {B, T, C}, "attention out");
  check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
  check_i32(span, "attention span");
  check_shape(span, {B, T, kSpanWidth}, "attention span");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::attention_forward_spans(*ctx_, ptr<S>(out), ptr<S>(saved), ptr<S>(qkv), ptr<int32_t>(span), B, T, C,
                                  n_head);
  });
}

void CudaBackend::attention_backward_spans(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                                           const Tensor& out, const Tensor& saved, const Tensor& span,
                                           int64_t n_head) {
  if (attn_impl_ == AttentionImpl::Flash) {
    DPO_ASSERT(span.defined(), "attention span: tensor is undefined");
    return flash_backward(dqkv, dout, qkv, out, saved, span, n_head);
  }
  DPO_ASSERT(qkv.dim() == 3, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  check_i32(span, "attention span");
  check_shape(span, {qkv.size(0), qkv.size(1), kSpanWidth}, "attention span");
  attention_backward(dqkv, dout, qkv, out, saved, n_head);
}

// --- flash attention (cuda_backend.h, "Two attention implementations") ----------------------------------------------

namespace {

// The saved state's per-slot entry of the spans form (the CPU backend's kSpansMark).
constexpr float kFlashSpansMark = 2.0f;

// The packed qkv [B,T,3C] of GPT-2's c_attn as the flash kernels' q, k, v views: q = qkv, k = qkv + C, v = qkv + 2C,
// rows of 3C elements, NH heads of C / NH on both sides (no grouped-query heads here).
template <class P>
void set_qkv_views(P& p, const Tensor& qkv, int64_t B, int64_t T, int64_t C, int64_t NH) {
  const auto* base = static_cast<const uint16_t*>(qkv.raw());
  p.q = base;
  p.k = base + C;
  p.v = base + 2 * C;
  p.B = B, p.T = T, p.n_head = NH, p.n_kv_head = NH, p.head_dim = C / NH;
  p.q_stride = p.k_stride = p.v_stride = 3 * C;
}

}  // namespace

void CudaBackend::grow_workspace(Tensor& ws, int64_t n, DType dt) {
  if (ws.defined() && ws.numel() >= n) return;
  ws = Tensor();  // the smaller buffer goes first (stream-ordered free)
  ws = empty({std::max<int64_t>(n, 1)}, dt);
}

void CudaBackend::flash_forward(const Tensor& out, const Tensor& saved, const Tensor& qkv, const Tensor& keymask,
                                const Tensor& span, int64_t n_head) {
  const DType A = check_activation(qkv, "attention qkv");
  if (A != DType::BF16)
    throw Error("attention: attn_implementation flash runs BF16 activations only, got " + std::string(dtype_name(A)) +
                " (fp32 is the parity mode: use attn_implementation eager)");
  check_is(out, A, "attention out");
  check_is(saved, attention_saved_dtype(A), "attention saved");
  DPO_ASSERT(qkv.dim() == 3 && n_head > 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  DPO_ASSERT(qkv.size(2) == 3 * C && C % n_head == 0, "attention qkv " + shape_str(qkv.shape()));
  check_shape(out, {B, T, C}, "attention out");
  check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
  if (keymask.defined()) {
    check_i32(keymask, "attention keymask");
    check_shape(keymask, {B, T}, "attention keymask");
  }
  if (span.defined()) {
    check_i32(span, "attention span");
    check_shape(span, {B, T, kSpanWidth}, "attention span");
  }
  DPO_ASSERT(!overlap(out, qkv) && !overlap(out, saved) && !overlap(saved, qkv),
             "attention: out, saved and qkv must not overlap (attn_implementation flash)");
  if (B * T == 0) return;
  flash::Params p;
  set_qkv_views(p, qkv, B, T, C, n_head);
  p.out = static_cast<uint16_t*>(out.raw());
  p.out_stride = C;
  p.lse = ptr<float>(saved);
  flash::check_params(p, "attention (attn_implementation flash)");  // head size, alignment: before any launch
  float* marks = p.lse + B * n_head * T;
  if (span.defined()) {
    cuda::fill(*ctx_, marks, B * T, kFlashSpansMark);
    p.span = ptr<int32_t>(span);
  } else {
    grow_workspace(flash_spans_, B * T * kSpanWidth, DType::I32);
    cuda::attention_keymask_spans(*ctx_, ptr<int32_t>(flash_spans_), marks, opt_ptr<int32_t>(keymask), B, T);
    p.span = ptr<int32_t>(flash_spans_);
  }
  flash::flash_attention_forward(*ctx_, p);
}

void CudaBackend::flash_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                 const Tensor& saved, const Tensor& span, int64_t n_head) {
  const DType A = check_activation(qkv, "attention qkv");
  if (A != DType::BF16)
    throw Error("attention: attn_implementation flash runs BF16 activations only, got " + std::string(dtype_name(A)) +
                " (fp32 is the parity mode: use attn_implementation eager)");
  check_is(dqkv, A, "attention dqkv");
  check_is(dout, A, "attention dout");
  DPO_ASSERT(out.defined(), "attention out: the flash backward needs the forward's output (tensor is undefined)");
  check_is(out, A, "attention out");
  check_is(saved, attention_saved_dtype(A), "attention saved");
  DPO_ASSERT(qkv.dim() == 3 && n_head > 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  DPO_ASSERT(qkv.size(2) == 3 * C && C % n_head == 0, "attention qkv " + shape_str(qkv.shape()));
  check_shape(dqkv, qkv.shape(), "attention dqkv");
  check_shape(dout, {B, T, C}, "attention dout");
  check_shape(out, {B, T, C}, "attention out");
  check_shape(saved, attention_saved_shape(B, T, n_head), "attention saved");
  if (span.defined()) {
    check_i32(span, "attention span");
    check_shape(span, {B, T, kSpanWidth}, "attention span");
  }
  DPO_ASSERT(!overlap(dqkv, qkv) && !overlap(dqkv, dout) && !overlap(dqkv, out) && !overlap(dqkv, saved),
             "attention: dqkv must not overlap qkv, dout, out or saved (attn_implementation flash)");
  if (B * T == 0) return;
  flash::BackwardParams p;
  set_qkv_views(p, qkv, B, T, C, n_head);
  p.out = static_cast<const uint16_t*>(out.raw());
  p.dout = static_cast<const uint16_t*>(dout.raw());
  p.out_stride = p.dout_stride = C;
  auto* dbase = static_cast<uint16_t*>(dqkv.raw());
  p.dq = dbase;
  p.dk = dbase + C;
  p.dv = dbase + 2 * C;
  p.dq_stride = p.dk_stride = p.dv_stride = 3 * C;
  p.write = GradWrite::Accumulate;  // the op's contract is dqkv +=
  p.lse = ptr<float>(saved);
  grow_workspace(flash_delta_, B * n_head * T, DType::F32);
  p.delta = ptr<float>(flash_delta_);
  flash::check_backward_params(p, "attention backward (attn_implementation flash)");  // before any launch
  if (span.defined()) {
    p.span = ptr<int32_t>(span);
  } else {
    grow_workspace(flash_spans_, B * T * kSpanWidth, DType::I32);
    cuda::attention_keymask_spans(*ctx_, ptr<int32_t>(flash_spans_), p.lse + B * n_head * T, B, T);
    p.span = ptr<int32_t>(flash_spans_);
  }
  flash::flash_attention_backward(*ctx_, p);
}

namespace {

// [B,Tc,C] caches; returns Tc.
int64_t cache_positions(const Tensor& kcache, const Tensor& vcache, int64_t B, int64_t C) {
  DPO_ASSERT(kcache.dim() == 3, "attention kcache must be [B,Tc,C], got " + shape_str(kcache.shape()));
  const int64_t Tc = kcache.size(1);
  check_shape(kcache, {B, Tc, C}, "attention kcache");
  check_shape(vcache, {B, Tc, C}, "attention vcache");
  return Tc;
}

}  // namespace

void CudaBackend::attention_cache_store(const Tensor& kcache, const Tensor& vcache, const Tensor& qkv) {
  const DType A = check_activation(qkv, "attention qkv");
  check_is(kcache, A, "attention kcache");
  check_is(vcache, A, "attention vcache");
  DPO_ASSERT(qkv.dim() == 3 && qkv.size(2) % 3 == 0, "attention qkv must be [B,T,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  const int64_t Tc = cache_positions(kcache, vcache, B, C);
  DPO_ASSERT(T <= Tc, "attention_cache_store: qkv " + shape_str(qkv.shape()) + " has more positions than the cache " +
                          shape_str(kcache.shape()));
  DPO_ASSERT(!overlap(kcache, vcache) && !overlap(kcache, qkv) && !overlap(vcache, qkv),
             "attention_cache_store: kcache, vcache and qkv must not overlap");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::attention_cache_store(*ctx_, ptr<S>(kcache), ptr<S>(vcache), ptr<S>(qkv), B, T, Tc, C);
  });
}

void CudaBackend::attention_decode_forward(const Tensor& out, const Tensor& kcache, const Tensor& vcache,
                                           const Tensor& qkv, const Tensor& pos, int64_t n_head) {
  const DType A = check_activation(qkv, "attention qkv");
  check_is(out, A, "attention out");
  check_is(kcache, A, "attention kcache");
  check_is(vcache, A, "attention vcache");
  check_i32(pos, "attention pos");
  DPO_ASSERT(qkv.dim() == 2 && qkv.size(1) % 3 == 0, "attention qkv must be [B,3C], got " + shape_str(qkv.shape()));
  const int64_t B = qkv.size(0), C = qkv.size(1) / 3;
  DPO_ASSERT(n_head > 0 && C % n_head == 0,
             "attention: C = " + std::to_string(C) + " is not a multiple of n_head " + std::to_string(n_head));
  const int64_t Tc = cache_positions(kcache, vcache, B, C);
  check_shape(out, {B, C}, "attention out");
  check_shape(pos, {B}, "attention pos");
  DPO_ASSERT(!overlap(kcache, vcache) && !overlap(out, kcache) && !overlap(out, vcache) && !overlap(out, qkv) &&
                 !overlap(kcache, qkv) && !overlap(vcache, qkv),
             "attention_decode_forward: out, kcache, vcache and qkv must not overlap");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::attention_decode_forward(*ctx_, ptr<S>(out), ptr<S>(kcache), ptr<S>(vcache), ptr<S>(qkv),
                                   pos.data<int32_t>(), B, Tc, C, n_head);
  });
}

void CudaBackend::gelu_forward(const Tensor& out, const Tensor& inp) {
  const DType A = check_activation(inp, "gelu inp");
  check_is(out, A, "gelu out");
  check_shape(out, inp.shape(), "gelu out");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::gelu_forward(*ctx_, ptr<S>(out), ptr<S>(inp), inp.numel());
  });
}

void CudaBackend::gelu_backward(const Tensor& dinp, const Tensor& dout, const Tensor& inp, GradWrite dinp_write) {
  const DType A = check_activation(inp, "gelu inp");
  check_is(dinp, A, "gelu dinp");
  check_is(dout, A, "gelu dout");
  check_shape(dinp, inp.shape(), "gelu dinp");
  check_shape(dout, inp.shape(), "gelu dout");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::gelu_backward(*ctx_, ptr<S>(dinp), ptr<S>(dout), ptr<S>(inp), inp.numel(), dinp_write);
  });
}

void CudaBackend::residual_forward(const Tensor& out, const Tensor& a, const Tensor& b) {
  const DType A = check_activation(a, "residual a");
  check_is(b, A, "residual b");
  check_is(out, A, "residual out");
  check_shape(b, a.shape(), "residual b");
  check_shape(out, a.shape(), "residual out");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::residual_forward(*ctx_, ptr<S>(out), ptr<S>(a), ptr<S>(b), a.numel());
  });
}

void CudaBackend::residual_backward(const Tensor& da, const Tensor& db, const Tensor& dout) {
  const DType A = check_activation(dout, "residual dout");
  check_is(da, A, "residual da");
  check_is(db, A, "residual db");
  check_shape(da, dout.shape(), "residual da");
  check_shape(db, dout.shape(), "residual db");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::residual_backward(*ctx_, ptr<S>(da), ptr<S>(db), ptr<S>(dout), dout.numel());
  });
}

void CudaBackend::logprob_forward(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                  const Tensor& weights, int64_t V) {
  const DType A = check_activation(logits, "logprob logits");
  const DType G = grad_dtype(A);
  check_i32(targets, "logprob targets");
  check_is(weights, G, "logprob weights");
  check_is(out.seq_logp, G, "logprob seq_logp");
  DPO_ASSERT(logits.dim() == 3, "logprob logits must be [B,T,ld], got " + shape_str(logits.shape()));
  DPO_ASSERT(V >= 1, "logprob: the vocabulary width V must be >= 1, got " + std::to_string(V));
  const int64_t B = logits.size(0), T = logits.size(1), ld = check_row_stride(logits, V, "logprob logits");
  check_shape(targets, {B, T}, "logprob targets");
  check_shape(weights, {B, T}, "logprob weights");
  check_shape(out.seq_logp, {B}, "logprob seq_logp");
  if (out.token_logp.defined()) {
    check_is(out.token_logp, G, "logprob token_logp");
    check_shape(out.token_logp, {B, T}, "logprob token_logp");
  }
  if (out.seq_stats.defined()) {
    check_is(out.seq_stats, G, "logprob seq_stats");
    check_shape(out.seq_stats, {B, kSeqStatsWidth}, "logprob seq_stats");
  }
  // The kernels take the outputs as __restrict__ pointers: no output may overlap another argument.
  {
    const Tensor* outs[] = {&out.seq_logp, &out.token_logp, &out.seq_stats};
    const Tensor* all[] = {&out.seq_logp, &out.token_logp, &out.seq_stats, &logits, &targets, &weights};
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 6; ++b)
        if (a != b)
          DPO_ASSERT(!outs[a]->defined() || !all[b]->defined() || !overlap(*outs[a], *all[b]),
                     "logprob_forward: an output overlaps another argument");
  }
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::logprob_forward(*ctx_, f32(out.seq_logp), opt_ptr<float>(out.token_logp), opt_ptr<float>(out.seq_stats),
                          ptr<S>(logits), targets.data<int32_t>(), f32(weights), B, T, V, ld);
  });
}

void CudaBackend::logprob_backward(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                   const Tensor& weights, const Tensor& dseq, int64_t V) {
  const DType A = check_activation(logits, "logprob logits");
  const DType G = grad_dtype(A);
  check_is(dlogits, A, "logprob dlogits");
  check_i32(targets, "logprob targets");
  check_is(weights, G, "logprob weights");
  check_is(dseq, G, "logprob dseq");
  DPO_ASSERT(logits.dim() == 3, "logprob logits must be [B,T,ld], got " + shape_str(logits.shape()));
  DPO_ASSERT(V >= 1, "logprob: the vocabulary width V must be >= 1, got " + std::to_string(V));
  const int64_t B = logits.size(0), T = logits.size(1), ld = check_row_stride(logits, V, "logprob logits");
  check_shape(dlogits, logits.shape(), "logprob dlogits");
  check_shape(targets, {B, T}, "logprob targets");
  check_shape(weights, {B, T}, "logprob weights");
  check_shape(dseq, {B}, "logprob dseq");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::logprob_backward(*ctx_, ptr<S>(dlogits), ptr<S>(logits), targets.data<int32_t>(), f32(weights), f32(dseq),
                           B, T, V, ld);
  });
}

void CudaBackend::gather_rows(const Tensor& out, const Tensor& inp, const Tensor& idx) {
  const RowIndexShape sh = check_row_index_args(out, inp, idx, "gather_rows");
  check_device(out, "gather_rows out");
  check_device(inp, "gather_rows inp");
  check_device(idx, "gather_rows idx");
  const int64_t es = dtype_size(out.dtype());
  DPO_ASSERT(es == 2 || es == 4, std::string("gather_rows: the GPU gathers 2- or 4-byte elements (BF16, F32, I32), "
                                             "got ") + dtype_name(out.dtype()));
  DPO_ASSERT(out.numel() == 0 || inp.numel() == 0 || !overlap(out, inp), "gather_rows: out overlaps inp");
  cuda::gather_rows(*ctx_, out.raw(), inp.raw(), idx.data<int32_t>(), sh.n, sh.N, sh.C, static_cast<int>(es));
}

void CudaBackend::scatter_add_rows(const Tensor& dinp, const Tensor& dout, const Tensor& idx) {
  const RowIndexShape sh = check_row_index_args(dout, dinp, idx, "scatter_add_rows");  // (CUDA sources are C++17)
  const DType A = check_activation(dinp, "scatter_add_rows dinp");
  check_is(dout, A, "scatter_add_rows dout");
  check_device(idx, "scatter_add_rows idx");
  DPO_ASSERT(dinp.numel() == 0 || dout.numel() == 0 || !overlap(dinp, dout), "scatter_add_rows: dinp overlaps dout");
  with_storage(A, [&](auto z) {
    using S = decltype(z);
    cuda::scatter_add_rows(*ctx_, ptr<S>(dinp), ptr<S>(dout), idx.data<int32_t>(), sh.n, sh.N, sh.C);
  });
}

void CudaBackend::logprob_forward_segments(const LogprobOutputs& out, const Tensor& logits, const Tensor& targets,
                                           const Tensor& weights, const Tensor& seg, int64_t V) {
  const DType A = check_activation(logits, "logprob logits");
  const DType G = grad_dtype(A);
  check_i32(targets, "logprob targets");
  check_i32(seg, "logprob seg");
  check_is(weights, G, "logprob weights");
  check_is(out.seq_logp, G, "logprob seq_logp");
  DPO_ASSERT(logits.dim() == 3, "logprob logits must be [B,T,ld], got " + shape_str(logits.shape()));
  DPO_ASSERT(V >= 1, "logprob: the vocabulary width V must be >= 1, got " + std::to_string(V));
  DPO_ASSERT(seg.dim() == 2 && seg.size(1) == 2, "logprob seg must be [S,2], got " + shape_str(seg.shape()));
  const int64_t B = logits.size(0), T = logits.size(1), ld = check_row_stride(logits, V, "logprob logits");
  const int64_t S = seg.size(0);
  check_shape(targets, {B, T}, "logprob targets");
  check_shape(weights, {B, T}, "logprob weights");
  check_shape(out.seq_logp, {S}, "logprob seq_logp");
  if (out.token_logp.defined()) {
    check_is(out.token_logp, G, "logprob token_logp");
    check_shape(out.token_logp, {B, T}, "logprob token_logp");
  }
  if (out.seq_stats.defined()) {
    check_is(out.seq_stats, G, "logprob seq_stats");
    check_shape(out.seq_stats, {S, kSeqStatsWidth}, "logprob seq_stats");
  }
  // The kernels take the outputs as __restrict__ pointers: no output may overlap another argument.
  {
    const Tensor* outs[] = {&out.seq_logp, &out.token_logp, &out.seq_stats};
    const Tensor* all[] = {&out.seq_logp, &out.token_logp, &out.seq_stats, &logits, &targets, &weights, &seg};
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 7; ++b)
        if (a != b)
          DPO_ASSERT(!outs[a]->defined() || !all[b]->defined() || !overlap(*outs[a], *all[b]),
                     "logprob_forward_segments: an output overlaps another argument");
  }
  with_storage(A, [&](auto z) {
    using S_ = decltype(z);
    cuda::logprob_forward_segments(*ctx_, f32(out.seq_logp), opt_ptr<float>(out.token_logp),
                                   opt_ptr<float>(out.seq_stats), ptr<S_>(logits), targets.data<int32_t>(),
                                   f32(weights), seg.data<int32_t>(), S, B, T, V, ld);
  });
}

void CudaBackend::logprob_backward_segments(const Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                            const Tensor& weights, const Tensor& seg, const Tensor& dseq,
                                            int64_t V) {
  const DType A = check_activation(logits, "logprob logits");
  const DType G = grad_dtype(A);
  check_is(dlogits, A, "logprob dlogits");
  check_i32(targets, "logprob targets");
  check_i32(seg, "logprob seg");
  check_is(weights, G, "logprob weights");
  check_is(dseq, G, "logprob dseq");
  DPO_ASSERT(logits.dim() == 3, "logprob logits must be [B,T,ld], got " + shape_str(logits.shape()));
  DPO_ASSERT(V >= 1, "logprob: the vocabulary width V must be >= 1, got " + std::to_string(V));
  DPO_ASSERT(seg.dim() == 2 && seg.size(1) == 2, "logprob seg must be [S,2], got " + shape_str(seg.shape()));
  const int64_t B = logits.size(0), T = logits.size(1), ld = check_row_stride(logits, V, "logprob logits");
  const int64_t S = seg.size(0);
  check_shape(dlogits, logits.shape(), "logprob dlogits");
  check_shape(targets, {B, T}, "logprob targets");
  check_shape(weights, {B, T}, "logprob weights");
  check_shape(dseq, {S}, "logprob dseq");
  with_storage(A, [&](auto z) {
    using S_ = decltype(z);
    cuda::logprob_backward_segments(*ctx_, ptr<S_>(dlogits), ptr<S_>(logits), targets.data<int32_t>(), f32(weights),
                                    seg.data<int32_t>(), f32(dseq), S, B, T, V, ld);
  });
}

// --- preference loss ----------------------------------------------------------------------------------------------

void CudaBackend::preference_loss(const PairLossOutputs& out, const Tensor& stats, const Tensor& ref_logp,
                                  const Tensor& offset, const PairLossParams& p, double normalizer, int64_t q0,
                                  int64_t q1) {
  const int64_t P = check_preference_loss_args(out, stats, ref_logp, offset, p, normalizer, q0, q1);
  check_is(stats, DType::F32, "preference_loss stats");
  if (ref_logp.defined()) check_is(ref_logp, DType::F32, "preference_loss ref_logp");
  if (offset.defined()) check_is(offset, DType::F32, "preference_loss offset");
  check_is(out.dseq, DType::F32, "preference_loss dseq");
  if (out.pair_loss.defined()) check_is(out.pair_loss, DType::F32, "preference_loss pair_loss");
  check_is(out.sums, DType::F64, "preference_loss sums");
  // The kernel's pointers are __restrict__: no output may share memory with an input or another output.
  const Tensor* outs[3] = {&out.dseq, &out.pair_loss, &out.sums};
  const Tensor* all[6] = {&out.dseq, &out.pair_loss, &out.sums, &stats, &ref_logp, &offset};
  for (int a = 0; a < 3; ++a)
    for (int b = a + 1; b < 6; ++b)
      DPO_ASSERT(!outs[a]->defined() || !all[b]->defined() || !overlap(*outs[a], *all[b]),
                 "preference_loss: an output overlaps another argument");
  cuda::pair_loss(*ctx_, f32(out.dseq), opt_ptr<float>(out.pair_loss), ptr<double>(out.sums), f32(stats),
                  opt_ptr<float>(ref_logp), opt_ptr<float>(offset), p, P, q0, q1, out.accumulate, normalizer);
}

// --- optimizer ops ------------------------------------------------------------------------------------------------

void CudaBackend::check_adamw_args(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                   const AdamWParams& p) const {
  check_f32(param, "adamw param");
  check_f32(grad, "adamw grad");
  check_f32(m, "adamw m");
  check_f32(v, "adamw v");
  check_shape(grad, param.shape(), "adamw grad");
  check_shape(m, param.shape(), "adamw m");
  check_shape(v, param.shape(), "adamw v");
  DPO_ASSERT(p.step >= 1, "adamw step is 1-based, got " + std::to_string(p.step));
  const Tensor* ts[4] = {&param, &grad, &m, &v};
  const char* names[4] = {"param", "grad", "m", "v"};
  for (int a = 0; a < 4; ++a)
    for (int b = a + 1; b < 4; ++b)
      DPO_ASSERT(!overlap(*ts[a], *ts[b]), std::string("adamw: ") + names[a] + " and " + names[b] + " overlap");
}

void CudaBackend::adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                               const AdamWParams& p) {
  check_adamw_args(param, grad, m, v, p);
  cuda::adamw_update(*ctx_, f32(param), f32(grad), f32(m), f32(v), param.numel(), p);
}

void CudaBackend::adamw_update_segments(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                                        const std::vector<AdamWSegment>& segs, const AdamWParams& p) {
  check_adamw_args(param, grad, m, v, p);
  DPO_ASSERT(param.dim() == 1,
             "adamw_update_segments: param must be a flat 1-D tensor, got " + shape_str(param.shape()));
  cuda::adamw_update_segments(*ctx_, adamw_segments_, f32(param), f32(grad), f32(m), f32(v), param.numel(),
                              segs.data(), static_cast<int64_t>(segs.size()), p);
}

AdamWCheck CudaBackend::adamw_dry_run_segments(const Tensor& param, const Tensor& grad, const Tensor& m,
                                               const Tensor& v, const std::vector<AdamWSegment>& segs,
                                               const AdamWParams& p) {
  check_adamw_args(param, grad, m, v, p);
  DPO_ASSERT(param.dim() == 1,
             "adamw_dry_run_segments: param must be a flat 1-D tensor, got " + shape_str(param.shape()));
  auto flag = ctx_->alloc(static_cast<int64_t>(sizeof(int)));
  cuda::adamw_dry_run_segments(*ctx_, adamw_segments_, static_cast<int*>(flag->data()), f32(param), f32(grad),
                               f32(m), f32(v), param.numel(), segs.data(), static_cast<int64_t>(segs.size()), p);
  int h = 0;
  DPO_CUDA_CHECK(cudaMemcpyAsync(&h, flag->data(), sizeof(int), cudaMemcpyDeviceToHost, ctx_->stream()));
  ctx_->synchronize();  // the caller decides now whether the update runs
  return h != 0 ? AdamWCheck::NonFinite : AdamWCheck::AllFinite;
}

double CudaBackend::sum_squares(const Tensor& x) {
  check_f32(x, "sum_squares x");
  auto out = ctx_->alloc(static_cast<int64_t>(sizeof(double)));
  cuda::sum_squares(*ctx_, static_cast<double*>(out->data()), f32(x), x.numel());
  double s = 0.0;
  DPO_CUDA_CHECK(cudaMemcpyAsync(&s, out->data(), sizeof(double), cudaMemcpyDeviceToHost, ctx_->stream()));
  ctx_->synchronize();  // the one host sync: the caller needs the value now
  return s;
}

void CudaBackend::scale(const Tensor& x, double s) {
  check_f32(x, "scale x");
  cuda::scale(*ctx_, f32(x), x.numel(), s);
}

// --- the device step ------------------------------------------------------------------------------------------------

void CudaBackend::check_step_tensors(const Tensor& record, const Tensor& state) const {
  check_device(record, "adamw record");
  check_device(state, "adamw state");
  check_dtype(record, DType::F64, "adamw record");
  check_dtype(state, DType::F64, "adamw state");
  check_shape(record, {adamw_record::kWidth}, "adamw record");
  check_shape(state, {adamw_state::kWidth}, "adamw state");
  DPO_ASSERT(!overlap(record, state), "adamw: record and state overlap");
}

void CudaBackend::sum_squares_into(const Tensor& out, const Tensor& x) {
  check_f32(x, "sum_squares x");
  check_device(out, "sum_squares_into out");
  check_dtype(out, DType::F64, "sum_squares_into out");
  check_shape(out, {1}, "sum_squares_into out");
  if (!norm_scratch_.defined()) norm_scratch_ = empty({cuda::kSumSquaresBlocks}, DType::F64);
  cuda::sum_squares(*ctx_, ptr<double>(out), f32(x), x.numel(), ptr<double>(norm_scratch_));
}

void CudaBackend::adamw_prepare(const Tensor& record, const Tensor& state, AdamWNormFrom from) {
  check_step_tensors(record, state);
  cuda::adamw_prepare(*ctx_, ptr<double>(record), ptr<double>(state), from);
}

void CudaBackend::adamw_check_segments(const Tensor& record, const Tensor& state, const Tensor& param,
                                       const Tensor& grad, const Tensor& m, const Tensor& v,
                                       const std::vector<AdamWSegment>& segs) {
  check_step_tensors(record, state);
  check_adamw_args(param, grad, m, v, AdamWParams{});
  DPO_ASSERT(param.dim() == 1, "adamw_check_segments: param must be a flat 1-D tensor, got " + shape_str(param.shape()));
  cuda::adamw_check_segments(*ctx_, adamw_segments_, ptr<double>(record), ptr<double>(state), f32(param), f32(grad),
                             f32(m), f32(v), param.numel(), segs.data(), static_cast<int64_t>(segs.size()));
}

void CudaBackend::adamw_apply_segments(const Tensor& record, const Tensor& state, const Tensor& param,
                                       const Tensor& grad, const Tensor& m, const Tensor& v,
                                       const std::vector<AdamWSegment>& segs, const Tensor& copy,
                                       GradAfterStep after) {
  check_step_tensors(record, state);
  check_adamw_args(param, grad, m, v, AdamWParams{});
  DPO_ASSERT(param.dim() == 1, "adamw_apply_segments: param must be a flat 1-D tensor, got " + shape_str(param.shape()));
  __nv_bfloat16* c = nullptr;
  if (copy.defined()) {
    check_device(copy, "adamw_apply_segments copy");
    check_dtype(copy, DType::BF16, "adamw_apply_segments copy");
    check_shape(copy, param.shape(), "adamw_apply_segments copy");
    for (const Tensor* t : {&param, &grad, &m, &v})
      DPO_ASSERT(!overlap(copy, *t), "adamw_apply_segments: copy overlaps param, grad, m or v");
    c = ptr<__nv_bfloat16>(copy);
  }
  for (const Tensor* t : {&param, &grad, &m, &v, &copy})
    DPO_ASSERT(!t->defined() || (!overlap(record, *t) && !overlap(state, *t)),
               "adamw_apply_segments: the record or state overlaps param, grad, m, v or copy");
  cuda::adamw_apply_segments(*ctx_, adamw_segments_, ptr<double>(record), ptr<double>(state), f32(param), f32(grad),
                             f32(m), f32(v), c, param.numel(), segs.data(), static_cast<int64_t>(segs.size()), after);
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

}  // namespace dpo
