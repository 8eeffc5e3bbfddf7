// Status checks for CUDA, cuBLAS/cuBLASLt, cuDNN and NCCL. Each reports the library, its status string, the
// failing statement, file:line, the current device and the launcher rank (runtime/error.h), by throwing dpo::Error.
// Kernel launches are checked with DPO_CUDA_CHECK(cudaGetLastError()); there is no device sync here (a debug
// build may add one at the call site).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "runtime/error.h"

namespace dpo::cuda_detail {

inline int current_device() {
  int d = -1;
  if (cudaGetDevice(&d) != cudaSuccess) return -1;
  return d;
}

}  // namespace dpo::cuda_detail

#define DPO_CUDA_CHECK(stmt)                                                                              \
  do {                                                                                                    \
    cudaError_t dpo_err_ = (stmt);                                                                        \
    if (dpo_err_ != cudaSuccess)                                                                          \
      ::dpo::throw_library_error("CUDA", std::string(cudaGetErrorName(dpo_err_)) + " (" +                  \
                                             cudaGetErrorString(dpo_err_) + ")",                          \
                                 #stmt, __FILE__, __LINE__, ::dpo::cuda_detail::current_device());        \
  } while (0)

#define DPO_CUBLAS_CHECK(stmt)                                                                            \
  do {                                                                                                    \
    cublasStatus_t dpo_st_ = (stmt);                                                                      \
    if (dpo_st_ != CUBLAS_STATUS_SUCCESS)                                                                 \
      ::dpo::throw_library_error("cuBLAS", cublasGetStatusName(dpo_st_), #stmt, __FILE__, __LINE__,       \
                                 ::dpo::cuda_detail::current_device());                                   \
  } while (0)

#define DPO_CUDNN_CHECK(stmt)                                                                             \
  do {                                                                                                    \
    cudnnStatus_t dpo_st_ = (stmt);                                                                       \
    if (dpo_st_ != CUDNN_STATUS_SUCCESS)                                                                  \
      ::dpo::throw_library_error("cuDNN", cudnnGetErrorString(dpo_st_), #stmt, __FILE__, __LINE__,        \
                                 ::dpo::cuda_detail::current_device());                                   \
  } while (0)

#define DPO_NCCL_CHECK(stmt)                                                                              \
  do {                                                                                                    \
    ncclResult_t dpo_st_ = (stmt);                                                                        \
    if (dpo_st_ != ncclSuccess)                                                                           \
      ::dpo::throw_library_error("NCCL", ncclGetErrorString(dpo_st_), #stmt, __FILE__, __LINE__,          \
                                 ::dpo::cuda_detail::current_device());                                   \
  } while (0)
