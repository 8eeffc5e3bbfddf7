// KernelTrace over CUPTI's Activity API, and the CUDA profiler capture range (runtime/kernel_trace.h).
//
// CUPTI hands activity records over in buffers: it asks for an empty one (buffer_requested), fills it, and gives it
// back (buffer_completed) when it is full or on cuptiActivityFlushAll, possibly from its own thread. The records
// are folded into the running trace's KernelStats there, under the sink's lock, and the buffer is freed; the kernel
// name pointers in the records are CUPTI's and are copied (once per distinct name) before the buffer goes.
//
// Activity kinds: CONCURRENT_KERNEL (not KERNEL, which serialises every launch), MEMCPY and MEMSET. Built only with
// CUPTI (DPO_HAVE_CUPTI, set by CMakeLists.txt when CUDA::cupti exists); otherwise KernelTrace says why not.
#include "runtime/kernel_trace.h"

#include <cuda_profiler_api.h>

#include <cstdlib>
#include <iterator>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/cuda/cuda_check.h"

#ifdef DPO_HAVE_CUPTI
#include <cupti.h>
#endif

namespace dpo {

void profiler_capture_start() { DPO_CUDA_CHECK(cudaProfilerStart()); }
void profiler_capture_stop() { DPO_CUDA_CHECK(cudaProfilerStop()); }

#ifdef DPO_HAVE_CUPTI

namespace {

// 8 MiB holds some 30 000 kernel records; CUPTI asks for another buffer when one fills. Records are 8-byte aligned
// (CUPTI's ACTIVITY_RECORD_ALIGNMENT).
constexpr size_t kBufferBytes = size_t{8} << 20;
constexpr size_t kBufferAlign = 8;

// The process-wide destination of CUPTI's buffers: the running trace's stats, or none (records are discarded).
struct Sink {
  std::mutex mu;
  KernelStats* stats = nullptr;
};

// Never destroyed: CUPTI may hand back a last buffer from its own exit handler, after static destructors ran.
Sink& sink() {
  static Sink* s = new Sink;
  return *s;
}

std::string cupti_error(const std::string& call, CUptiResult r) {
  const char* str = nullptr;
  if (cuptiGetResultString(r, &str) != CUPTI_SUCCESS || str == nullptr) str = "unknown CUPTI error";
  return call + " failed: " + str + " (CUptiResult " + std::to_string(static_cast<int>(r)) + ")";
}

const char* memcpy_name(uint8_t copy_kind) {
  switch (copy_kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "[memcpy HtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "[memcpy DtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "[memcpy DtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOH: return "[memcpy HtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "[memcpy PtoP]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOA: return "[memcpy HtoA]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOH: return "[memcpy AtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOA: return "[memcpy AtoA]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_ATOD: return "[memcpy AtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOA: return "[memcpy DtoA]";
    default: return "[memcpy other]";
  }
}

// The activity kinds a trace enables, in order (disabled in reverse), with their names for error messages.
struct TracedKind {
  CUpti_ActivityKind kind;
  const char* name;
};
constexpr TracedKind kTracedKinds[] = {
    {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, "CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL"},
    {CUPTI_ACTIVITY_KIND_MEMCPY, "CUPTI_ACTIVITY_KIND_MEMCPY"},
    {CUPTI_ACTIVITY_KIND_MEMSET, "CUPTI_ACTIVITY_KIND_MEMSET"},
};

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlign, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;  // a null buffer: CUPTI drops records (and counts them)
  *max_records = 0;                               // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream_id, uint8_t* buffer, size_t /*size*/,
                               size_t valid_size) {
  Sink& s = sink();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.stats != nullptr) {
      KernelStats& st = *s.stats;
      CUpti_Activity* rec = nullptr;
      while (valid_size > 0) {
        const CUptiResult r = cuptiActivityGetNextRecord(buffer, valid_size, &rec);
        if (r == CUPTI_ERROR_MAX_LIMIT_REACHED) break;  // the end of the buffer
        if (r != CUPTI_SUCCESS) {
          st.add_warning(cupti_error("cuptiActivityGetNextRecord", r) + "; the rest of a buffer was skipped");
          break;
        }
        switch (rec->kind) {
          case CUPTI_ACTIVITY_KIND_KERNEL:
          case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
            st.add(GpuActivityKind::Kernel, k->name != nullptr ? k->name : "(unnamed kernel)", k->start, k->end);
            break;
          }
          case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
            st.add(GpuActivityKind::Memcpy, memcpy_name(m->copyKind), m->start, m->end, m->bytes);
            break;
          }
          case CUPTI_ACTIVITY_KIND_MEMSET: {
            const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
            st.add(GpuActivityKind::Memset, "[memset]", m->start, m->end, m->bytes);
            break;
          }
          default:
            break;
        }
      }
      size_t dropped = 0;
      if (cuptiActivityGetNumDroppedRecords(ctx, stream_id, &dropped) == CUPTI_SUCCESS) st.add_dropped(dropped);
    }
  }
  std::free(buffer);
}

// Registers the buffer callbacks once per process; "" or the error.
const std::string& register_callbacks() {
  static const std::string error = [] {
    const CUptiResult r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    return r == CUPTI_SUCCESS ? std::string() : cupti_error("cuptiActivityRegisterCallbacks", r);
  }();
  return error;
}

void detach(KernelStats* mine) {
  Sink& s = sink();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.stats == mine) s.stats = nullptr;
}

}  // namespace

bool KernelTrace::built(std::string* why_not) {
  if (why_not) why_not->clear();
  return true;
}

KernelTrace::~KernelTrace() {
  if (!running_) return;
  for (const auto& k : kTracedKinds) cuptiActivityDisable(k.kind);  // best effort: a destructor reports nothing
  detach(&stats_);
}

std::string KernelTrace::start() {
  if (running_) return "KernelTrace::start: this trace is already running";
  if (const std::string& e = register_callbacks(); !e.empty()) return e;
  {
    Sink& s = sink();
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.stats != nullptr) return "another kernel trace is already running in this process";
    stats_ = KernelStats{};
    s.stats = &stats_;
  }
  for (size_t i = 0; i < std::size(kTracedKinds); ++i) {
    const CUptiResult r = cuptiActivityEnable(kTracedKinds[i].kind);
    if (r != CUPTI_SUCCESS) {
      for (size_t j = i; j-- > 0;) cuptiActivityDisable(kTracedKinds[j].kind);
      detach(&stats_);
      return cupti_error(std::string("cuptiActivityEnable(") + kTracedKinds[i].name + ")", r);
    }
  }
  running_ = true;
  return "";
}

KernelTable KernelTrace::stop() {
  if (!running_) return {};
  running_ = false;
  // The flush delivers the buffers through buffer_completed, which takes the sink's lock: no lock is held here, and
  // the sink still points at stats_ until the flush has returned.
  const CUptiResult flushed = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::vector<std::string> problems;
  for (size_t j = std::size(kTracedKinds); j-- > 0;) {
    const CUptiResult r = cuptiActivityDisable(kTracedKinds[j].kind);
    if (r != CUPTI_SUCCESS)
      problems.push_back(cupti_error(std::string("cuptiActivityDisable(") + kTracedKinds[j].name + ")", r));
  }
  detach(&stats_);  // waits for a callback still running on CUPTI's thread
  if (flushed != CUPTI_SUCCESS)
    stats_.add_warning(cupti_error("cuptiActivityFlushAll", flushed) + "; the table may be incomplete");
  for (auto& p : problems) stats_.add_warning(std::move(p));
  return stats_.table();
}

#else  // CUDA without CUPTI

bool KernelTrace::built(std::string* why_not) {
  if (why_not)
    *why_not = "CUPTI was not found at build time (CMake's FindCUDAToolkit had no CUDA::cupti target, so libcupti was "
               "not linked); rebuild with a CUDA toolkit that ships CUPTI";
  return false;
}
KernelTrace::~KernelTrace() = default;
std::string KernelTrace::start() {
  std::string why;
  built(&why);
  return why;
}
KernelTable KernelTrace::stop() { return {}; }

#endif

}  // namespace dpo
