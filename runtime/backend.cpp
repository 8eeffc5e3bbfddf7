#include "runtime/backend.h"

namespace dpo {

Tensor to_backend(Backend& be, const Tensor& host) {
  if (be.device().kind == DeviceKind::CPU) return host;
  Tensor d = be.empty(host.shape(), host.dtype());
  be.copy_from_host(d, host);
  return d;
}

std::vector<double> to_host_f64(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), DType::F64);
  be.copy_to_host(h, t);
  return std::vector<double>(h.data<double>(), h.data<double>() + h.numel());
}

}  // namespace dpo
