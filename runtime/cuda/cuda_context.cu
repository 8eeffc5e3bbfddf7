#include <cudnn.h>

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
  DPO_CUDNN_CHECK(cudnnCreate(&cudnn_));
  DPO_CUDNN_CHECK(cudnnSetStream(cudnn_, stream_));
  workspace_bytes_ = cublaslt_workspace_bytes;
  DPO_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

CudaContext::~CudaContext() {
  // Destructors must not throw: errors here are ignored deliberately (the process is tearing the device down).
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  if (workspace_) cudaFree(workspace_);
  if (cudnn_) cudnnDestroy(cudnn_);
  if (lt_) cublasLtDestroy(lt_);
  if (stream_) cudaStreamDestroy(stream_);
}

std::shared_ptr<Buffer> CudaContext::alloc(int64_t bytes) {
  void* p = nullptr;
  DPO_CUDA_CHECK(cudaMallocAsync(&p, static_cast<size_t>(bytes > 0 ? bytes : 1), stream_));
  cudaStream_t s = stream_;
  return std::make_shared<Buffer>(p, bytes, Device{DeviceKind::CUDA, device_}, [s](void* q) { cudaFreeAsync(q, s); });
}

void CudaContext::synchronize() { DPO_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

int CudaContext::device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace dpo
