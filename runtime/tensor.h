// Buffers and tensors.
//
// A Buffer owns bytes on one device. A Tensor is a typed, contiguous, row-major view into a Buffer
// (offset + shape); many tensors may share one buffer, which is how a model's parameters live in one flat
// allocation that the optimizer and the gradient all-reduce see as a single vector. All sizes are int64_t.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "runtime/error.h"

namespace dpo {

enum class DType : uint8_t { F32, F64, BF16, F16, I32, I64 };
enum class DeviceKind : uint8_t { CPU, CUDA };

int64_t dtype_size(DType t);
const char* dtype_name(DType t);  // safetensors spelling: "F32", "F64", "BF16", "F16", "I32", "I64"
bool dtype_from_name(const std::string& name, DType* out);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  std::string str() const;
};

class Buffer {
 public:
  // Takes ownership of ptr; `release` frees it (host free, cudaFree, ...).
  Buffer(void* ptr, int64_t bytes, Device dev, std::function<void(void*)> release)
      : ptr_(ptr), bytes_(bytes), dev_(dev), release_(std::move(release)) {}
  ~Buffer() {
    if (ptr_ && release_) release_(ptr_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return ptr_; }
  int64_t bytes() const { return bytes_; }
  Device device() const { return dev_; }

  // 64-byte aligned host allocation, zero-filled.
  static std::shared_ptr<Buffer> host(int64_t bytes);

 private:
  void* ptr_;
  int64_t bytes_;
  Device dev_;
  std::function<void(void*)> release_;
};

// Bytes of host buffers (Buffer::host) alive now and the most alive at once since the last
// reset_host_peak_bytes(), as requested (before the 64-byte rounding). Every tensor the CPU backend creates is a
// host buffer, so for a CPU run these are its tensor memory (plus any host staging tensors); memory that ops
// allocate internally (std::vector scratch, BLAS) is not counted. Process-wide, thread-safe.
struct HostMemoryStats {
  int64_t live = 0, peak = 0;
};
HostMemoryStats host_memory_stats();
void reset_host_peak_bytes();  // peak = live

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Buffer> buf, int64_t offset_bytes, DType dtype, Shape shape);

  // Host tensors (zero-filled). Device tensors come from a Backend (Backend::empty).
  static Tensor host(Shape shape, DType dtype);

  bool defined() const { return buf_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return buf_ ? buf_->device() : Device{}; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t i) const;  // negative i counts from the end
  int64_t numel() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype_); }
  const std::shared_ptr<Buffer>& buffer() const { return buf_; }
  int64_t offset_bytes() const { return offset_; }

  void* raw() const { return static_cast<char*>(buf_->data()) + offset_; }
  template <class T> T* data() const {
    DPO_ASSERT(dtype_ == dtype_of<T>(), std::string("tensor is ") + dtype_name(dtype_));
    return static_cast<T*>(raw());
  }

  // A contiguous view of `shape` starting `elem_offset` elements into this tensor.
  Tensor view(int64_t elem_offset, Shape shape) const;
  Tensor reshape(Shape shape) const { return view(0, std::move(shape)); }

 private:
  std::shared_ptr<Buffer> buf_;
  int64_t offset_ = 0;
  DType dtype_ = DType::F32;
  Shape shape_;
};

// Boundary checks used by backends: throw dpo::Error naming the argument.
void check_shape(const Tensor& t, const Shape& expect, const char* name);
void check_dtype(const Tensor& t, DType expect, const char* name);
void check_same_dtype(const Tensor& a, const Tensor& b, const char* name_a, const char* name_b);

}  // namespace dpo
