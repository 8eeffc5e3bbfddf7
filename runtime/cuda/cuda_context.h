// Per-device CUDA state, owned (never global): the device, its properties, one compute stream, a cuBLASLt handle
// and its workspace, a cuDNN handle bound to the stream. Created once per process per device by the CUDA backend
// and passed by reference to every launcher.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cstddef>
#include <memory>

#include "runtime/tensor.h"

namespace dpo {

class CudaContext {
 public:
  // Selects `device` (cudaSetDevice) before creating anything on it.
  explicit CudaContext(int device, size_t cublaslt_workspace_bytes = 32u << 20);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  const cudaDeviceProp& props() const { return props_; }
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t cublaslt() const { return lt_; }
  cudnnHandle_t cudnn() const { return cudnn_; }
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }

  // Device buffer of `bytes` (stream-ordered allocation on this context's stream; freed on the same stream).
  std::shared_ptr<Buffer> alloc(int64_t bytes);
  void synchronize();

  static int device_count();  // 0 when no driver or no device, never throws

 private:
  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cudnnHandle_t cudnn_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

}  // namespace dpo
