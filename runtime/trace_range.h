// Named ranges for profilers, for the layers above the runtime that must not know CUDA (model/, train/): in a
// CUDA build an NVTX range (runtime/cuda/nvtx.h: Nsight Systems shows it on the timeline, `ncu --nvtx-include`
// selects kernels by it; NVTX copies the name at the push, so a temporary string is fine), elsewhere nothing.
// A range costs a few hundred nanoseconds with no profiler attached; open them per layer or per phase, never per
// element or per tiny op.
#pragma once

#include <string>

#ifdef DPO_HAVE_CUDA
#include "runtime/cuda/nvtx.h"
#endif

namespace dpo {

#ifdef DPO_HAVE_CUDA
class TraceRange {
 public:
  explicit TraceRange(const char* name) { nvtxRangePushA(name); }
  explicit TraceRange(const std::string& name) { nvtxRangePushA(name.c_str()); }
  ~TraceRange() { nvtxRangePop(); }
  TraceRange(const TraceRange&) = delete;
  TraceRange& operator=(const TraceRange&) = delete;
};
#else
class TraceRange {
 public:
  explicit TraceRange(const char*) {}
  explicit TraceRange(const std::string&) {}
};
#endif

}  // namespace dpo

#define DPO_TRACE_CONCAT_(a, b) a##b
#define DPO_TRACE_CONCAT(a, b) DPO_TRACE_CONCAT_(a, b)
// DPO_TRACE_RANGE("lm_head forward") or DPO_TRACE_RANGE(some_string): a range until the end of the scope.
#define DPO_TRACE_RANGE(name) ::dpo::TraceRange DPO_TRACE_CONCAT(dpo_trace_range_, __LINE__)(name)
