#include "runtime/backend.h"

namespace dpo {

Tensor to_backend(Backend& be, const Tensor& host) {
  if (be.device().kind == DeviceKind::CPU) return host;
  Tensor d = be.empty(host.shape(), host.dtype());
  be.copy_from_host(d, host);
  return d;
}

namespace {

// The CPU's recording: the function itself (Backend::capture).
class FunctionGraph final : public Backend::Graph {
 public:
  explicit FunctionGraph(std::function<void()> fn) : fn_(std::move(fn)) {}
  void replay() override { fn_(); }

 private:
  std::function<void()> fn_;
};

}  // namespace

std::unique_ptr<Backend::Graph> Backend::capture(const std::function<void()>& fn) {
  return std::make_unique<FunctionGraph>(fn);
}

std::vector<double> to_host_f64(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), DType::F64);
  be.copy_to_host(h, t);
  return std::vector<double>(h.data<double>(), h.data<double>() + h.numel());
}

}  // namespace dpo
