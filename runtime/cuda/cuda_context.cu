#include <algorithm>
#include <string>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo {

CudaContext::CudaContext(int device, size_t cublaslt_workspace_bytes) : device_(device) {
  DPO_CUDA_CHECK(cudaSetDevice(device));
  DPO_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
  DPO_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  // Scratch and tensors come from the device's default stream-ordered pool (alloc below). Its release threshold
  // defaults to 0: every synchronisation would hand freed memory back to the driver, and the next step would map
  // it again (the chunked LM head and the gradient norm synchronise several times per step). Keep it instead.
  cudaMemPool_t pool = nullptr;
  DPO_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t keep = UINT64_MAX;
  DPO_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  DPO_CUBLAS_CHECK(cublasLtCreate(&lt_));
  workspace_bytes_ = cublaslt_workspace_bytes;
  DPO_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

CudaContext::~CudaContext() {
  // Destructors must not throw: errors here are ignored deliberately (the process is tearing the device down).
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  if (workspace_) cudaFree(workspace_);
#ifdef DPO_HAVE_CUDNN
  if (cudnn_) cudnnDestroy(cudnn_);
#endif
  if (lt_) cublasLtDestroy(lt_);
  if (stream_) cudaStreamDestroy(stream_);
}

std::shared_ptr<Buffer> CudaContext::alloc(int64_t bytes) {
  void* p = nullptr;
  DPO_CUDA_CHECK(cudaMallocAsync(&p, static_cast<size_t>(bytes > 0 ? bytes : 1), stream_));
  cudaStream_t s = stream_;
  std::shared_ptr<AllocCounts> counts = counts_;
  const int64_t now = counts->live.fetch_add(bytes) + bytes;
  int64_t peak = counts->peak.load();
  while (now > peak && !counts->peak.compare_exchange_weak(peak, now)) {
  }
  return std::make_shared<Buffer>(p, bytes, Device{DeviceKind::CUDA, device_}, [s, counts, bytes](void* q) {
    cudaFreeAsync(q, s);
    counts->live.fetch_sub(bytes);
  });
}

void CudaContext::mem_get_info(int64_t* free_bytes, int64_t* total_bytes) const {
  DPO_CUDA_CHECK(cudaSetDevice(device_));
  size_t f = 0, t = 0;
  DPO_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  *free_bytes = static_cast<int64_t>(f);
  *total_bytes = static_cast<int64_t>(t);
}

void* CudaContext::scratch(int64_t bytes) {
  if (!scratch_ || scratch_->bytes() < bytes) {
    scratch_.reset();  // freed in stream order, after every launch that used it
    scratch_ = alloc(std::max<int64_t>(bytes, 256));
  }
  return scratch_->data();
}

void CudaContext::synchronize() { DPO_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

#ifdef DPO_HAVE_CUDNN
cudnnHandle_t CudaContext::cudnn() {
  if (!cudnn_) {
    DPO_CUDA_CHECK(cudaSetDevice(device_));
    cudnnHandle_t h = nullptr;
    DPO_CUDNN_CHECK(cudnnCreate(&h));
    cudnnStatus_t st = cudnnSetStream(h, stream_);
    if (st != CUDNN_STATUS_SUCCESS) cudnnDestroy(h);
    DPO_CUDNN_CHECK(st);
    cudnn_ = h;
  }
  return cudnn_;
}
#endif

CudaContext::DeviceQuery CudaContext::query_devices() {
  DeviceQuery q;
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  q.error_name = cudaGetErrorName(err);
  if (err == cudaSuccess) {
    q.count = n;
    q.no_gpu = n == 0;
    q.message = std::to_string(n) + " CUDA device(s)";
    return q;
  }
  cudaGetLastError();  // cudaGetDeviceCount's error is not sticky, but leave no error behind for the next check
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);  // 0 when no CUDA driver is installed
  cudaRuntimeGetVersion(&runtime);
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  if (err == cudaErrorNoDevice) {
    q.no_gpu = true;
    q.message = "no CUDA device on this machine (cudaErrorNoDevice)";
  } else if (driver == 0 && (err == cudaErrorInsufficientDriver || err == cudaErrorInitializationError)) {
    q.no_gpu = true;
    q.message = "no CUDA device on this machine (no CUDA driver installed; " + q.error_name + ")";
  } else {
    q.message = "cudaGetDeviceCount failed: " + q.error_name + " (" + cudaGetErrorString(err) + "); CUDA driver " +
                (driver ? ver(driver) : std::string("not found")) + ", CUDA runtime " + ver(runtime) +
                (err == cudaErrorInsufficientDriver ? " (the driver is older than this build's CUDA runtime needs)"
                                                    : "");
  }
  return q;
}

int CudaContext::device_count() {
  const DeviceQuery q = query_devices();
  if (q.count == 0 && !q.no_gpu) throw Error(q.message);
  return q.count;
}

}  // namespace dpo
