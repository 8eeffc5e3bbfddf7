// NVTX ranges, so Nsight Systems shows the structure of a training step: every kernel launcher opens one
// (DPO_NVTX_RANGE("layernorm_forward")), and the trainer opens one per phase. NVTX v3 is header-only and ships
// with the CUDA toolkit; a range costs a few hundred nanoseconds and nothing when no profiler is attached.
#pragma once

#include <nvtx3/nvToolsExt.h>

namespace dpo {

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace dpo

#define DPO_NVTX_CONCAT_(a, b) a##b
#define DPO_NVTX_CONCAT(a, b) DPO_NVTX_CONCAT_(a, b)
#define DPO_NVTX_RANGE(name) ::dpo::NvtxRange DPO_NVTX_CONCAT(dpo_nvtx_range_, __LINE__)(name)
