#include "runtime/tensor.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace dpo {

int64_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

bool dtype_from_name(const std::string& name, DType* out) {
  static const std::pair<const char*, DType> table[] = {{"F32", DType::F32}, {"F64", DType::F64},
                                                        {"BF16", DType::BF16}, {"F16", DType::F16},
                                                        {"I32", DType::I32}, {"I64", DType::I64}};
  for (const auto& [n, t] : table) {
    if (name == n) {
      *out = t;
      return true;
    }
  }
  return false;
}

std::string Device::str() const {
  return kind == DeviceKind::CPU ? std::string("cpu") : "cuda:" + std::to_string(index);
}

namespace {
std::atomic<int64_t> g_host_live{0}, g_host_peak{0};
}  // namespace

HostMemoryStats host_memory_stats() { return {g_host_live.load(), g_host_peak.load()}; }

void reset_host_peak_bytes() { g_host_peak.store(g_host_live.load()); }

std::shared_ptr<Buffer> Buffer::host(int64_t bytes) {
  DPO_ASSERT(bytes >= 0, "negative allocation size");
  // aligned_alloc needs a size that is a multiple of the alignment.
  size_t rounded = static_cast<size_t>((bytes + 63) / 64 * 64);
  if (rounded == 0) rounded = 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw Error("host allocation of " + std::to_string(bytes) + " bytes failed");
  std::memset(p, 0, rounded);
  const int64_t live = g_host_live.fetch_add(bytes) + bytes;
  for (int64_t peak = g_host_peak.load(); live > peak && !g_host_peak.compare_exchange_weak(peak, live);) {
  }
  return std::make_shared<Buffer>(p, bytes, Device{DeviceKind::CPU, 0}, [bytes](void* q) {
    g_host_live.fetch_sub(bytes);
    std::free(q);
  });
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

static int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    DPO_ASSERT(d >= 0, "negative dimension in " + shape_str(s));
    n *= d;
  }
  return n;
}

Tensor::Tensor(std::shared_ptr<Buffer> buf, int64_t offset_bytes, DType dtype, Shape shape)
    : buf_(std::move(buf)), offset_(offset_bytes), dtype_(dtype), shape_(std::move(shape)) {
  DPO_ASSERT(buf_ != nullptr, "tensor without a buffer");
  DPO_ASSERT(offset_ >= 0 && offset_ + numel_of(shape_) * dtype_size(dtype_) <= buf_->bytes(),
             "view " + shape_str(shape_) + " at byte " + std::to_string(offset_) + " exceeds a buffer of " +
                 std::to_string(buf_->bytes()) + " bytes");
}

Tensor Tensor::host(Shape shape, DType dtype) {
  int64_t bytes = numel_of(shape) * dtype_size(dtype);
  return Tensor(Buffer::host(bytes), 0, dtype, std::move(shape));
}

int64_t Tensor::size(int64_t i) const {
  if (i < 0) i += dim();
  DPO_ASSERT(i >= 0 && i < dim(), "dimension index out of range for " + shape_str(shape_));
  return shape_[static_cast<size_t>(i)];
}

int64_t Tensor::numel() const { return numel_of(shape_); }

Tensor Tensor::view(int64_t elem_offset, Shape shape) const {
  DPO_ASSERT(defined(), "view of an undefined tensor");
  DPO_ASSERT(elem_offset >= 0 && elem_offset + numel_of(shape) <= numel(),
             "view " + shape_str(shape) + " at " + std::to_string(elem_offset) + " exceeds " + shape_str(shape_));
  return Tensor(buf_, offset_ + elem_offset * dtype_size(dtype_), dtype_, std::move(shape));
}

void check_shape(const Tensor& t, const Shape& expect, const char* name) {
  if (!t.defined()) throw Error(std::string(name) + ": tensor is undefined");
  if (t.shape() != expect)
    throw Error(std::string(name) + ": expected shape " + shape_str(expect) + ", got " + shape_str(t.shape()));
}

void check_dtype(const Tensor& t, DType expect, const char* name) {
  if (t.dtype() != expect)
    throw Error(std::string(name) + ": expected dtype " + dtype_name(expect) + ", got " + dtype_name(t.dtype()));
}

void check_same_dtype(const Tensor& a, const Tensor& b, const char* name_a, const char* name_b) {
  if (a.dtype() != b.dtype())
    throw Error(std::string(name_a) + " is " + dtype_name(a.dtype()) + " but " + name_b + " is " +
                dtype_name(b.dtype()));
}

}  // namespace dpo
