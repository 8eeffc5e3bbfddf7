// Per-device CUDA state, owned (never global): the device, its properties, one compute stream, a cuBLASLt handle
// and its workspace, and (in builds with cuDNN) a cuDNN handle bound to the stream, created on first use so that a
// cuDNN that fails to load breaks only what uses it. Created once per process per device by the CUDA backend and
// passed by reference to every launcher.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>
#ifdef DPO_HAVE_CUDNN
#include <cudnn.h>
#endif

#include <atomic>
#include <cstddef>
#include <memory>
#include <string>

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
#ifdef DPO_HAVE_CUDNN
  // The cuDNN handle, created on the first call (throws dpo::Error naming cuDNN's status if it cannot be created).
  cudnnHandle_t cudnn();
#endif
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }

  // Device buffer of `bytes` (stream-ordered allocation on this context's stream; freed on the same stream).
  std::shared_ptr<Buffer> alloc(int64_t bytes);
  // The context's reduction scratch: at least `bytes` of device memory (cudaMallocAsync's alignment), contents
  // unspecified. Grow-only (a larger request frees the old buffer in stream order and allocates a new one), so a steady training
  // step allocates nothing. Valid until the next call; an op may use it only between its own launches on this
  // context's stream (the ops are stream-ordered, so consecutive ops never see each other's use of it).
  void* scratch(int64_t bytes);
  void synchronize();

  // Bytes of the buffers alloc() handed out that are alive now, and the most alive at once since
  // reset_peak_bytes(), as requested (the pool's rounding and the cuBLASLt workspace not included). Counted on the
  // host when a buffer is made and when it is released (its cudaFreeAsync enqueued); thread-safe.
  int64_t live_bytes() const { return counts_->live.load(); }
  int64_t peak_bytes() const { return counts_->peak.load(); }
  void reset_peak_bytes() { counts_->peak.store(counts_->live.load()); }
  // cudaMemGetInfo on this context's device: free and total bytes, device-wide (other processes' memory, the
  // pool's cached blocks and the CUDA context itself count as used).
  void mem_get_info(int64_t* free_bytes, int64_t* total_bytes) const;

  // Number of CUDA devices this process can use. 0 when the machine has no GPU: cudaErrorNoDevice, or no CUDA
  // driver installed at all (cudaDriverGetVersion reports 0). Any other failure, e.g. a driver older than this
  // toolkit needs (cudaErrorInsufficientDriver with a driver present) or a broken device node, throws dpo::Error
  // with the CUDA error's name and text and the driver and runtime versions: a machine with a GPU that cannot be
  // used must fail loudly, never look like a machine without one (tests would then skip instead of fail).
  static int device_count();
  // What device_count() decided, without throwing: count, the CUDA error name ("cudaSuccess" when it worked) and a
  // one-line explanation; no_gpu is true when the machine has no GPU (then count is 0 and that is not an error).
  struct DeviceQuery {
    int count = 0;
    bool no_gpu = false;
    std::string error_name;
    std::string message;
  };
  static DeviceQuery query_devices();

 private:
  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
#ifdef DPO_HAVE_CUDNN
  cudnnHandle_t cudnn_ = nullptr;
#endif
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::shared_ptr<Buffer> scratch_;
  struct AllocCounts {
    std::atomic<int64_t> live{0}, peak{0};
  };
  // Shared with every buffer's release, which may run after the context is gone.
  std::shared_ptr<AllocCounts> counts_ = std::make_shared<AllocCounts>();
};

}  // namespace dpo
