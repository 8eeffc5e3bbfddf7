// GPU time by kernel: the table `dpo bench --kernels` prints, and the profiler capture range (cudaProfilerStart /
// cudaProfilerStop) that `dpo bench` and the trainer's `profile_steps` open around steady-state steps.
//
// Three parts, so that everything above the runtime stays free of CUPTI and of CUDA headers:
//   - KernelStats: aggregates finished GPU activities (kernels, memory copies, memory sets) by name into a
//     KernelTable; plain C++, tested on the CPU with synthetic records (tests/test_bench.cpp).
//   - KernelTrace: collects those activities from CUPTI's Activity API between start() and stop()
//     (runtime/cuda/kernel_trace.cpp). CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL gives each kernel's start and end on the
//     GPU's clock, as Nsight Systems sees them: no events around launches (which would distort microsecond kernels
//     and see nothing inside a CUDA graph replay) and no serialisation of the stream. A build without CUDA, or
//     without CUPTI (CMake's CUDA::cupti target), gets a stub whose built() says why.
//   - profiler_capture_start / profiler_capture_stop: cudaProfilerStart / cudaProfilerStop, so that
//     `nsys profile --capture-range=cudaProfilerApi` and `ncu --profile-from-start off` see only the steps inside
//     (docs/profiling.md). No-ops in a build without CUDA.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace dpo {

enum class GpuActivityKind { Kernel, Memcpy, Memset };

// One row per distinct activity name.
struct KernelTableRow {
  GpuActivityKind kind = GpuActivityKind::Kernel;
  std::string name;       // for display: shorten_kernel_name(full_name); copies "[memcpy HtoD]", sets "[memset]"
  std::string full_name;  // demangled when the name was mangled (demangle_kernel_name), else as recorded
  int64_t calls = 0;
  double total_ms = 0;
  double mean_us = 0;     // total_ms * 1000 / calls
  double share = 0;       // total_ms / KernelTable::total_ms; the rows' shares sum to 1
  uint64_t bytes = 0;     // copies and sets: bytes moved over all calls; 0 for kernels
};

struct KernelTable {
  std::vector<KernelTableRow> rows;  // by total_ms, largest first; ties by name
  double total_ms = 0;               // summed GPU time of all rows (busy time, not wall time)
  double kernel_ms = 0;              // the kernels' part of total_ms
  int64_t records = 0;               // activities counted in the rows
  int64_t untimed_records = 0;       // activities CUPTI gave without valid timestamps (left out of the rows)
  uint64_t dropped_records = 0;      // activities CUPTI dropped (no buffer space)
  std::vector<std::string> warnings;  // anything that makes the table incomplete, for the reader
};

// Aggregates activities by name (copies and sets are named "[memcpy HtoD]", "[memset]", which no kernel can be,
// so a name belongs to one kind). Durations are end - start in nanoseconds on the GPU clock; an activity
// with start == end == 0 (CUPTI: no timestamp collected) or end < start is counted in untimed_records only.
class KernelStats {
 public:
  void add(GpuActivityKind kind, std::string_view name, uint64_t start_ns, uint64_t end_ns, uint64_t bytes = 0);
  void add_dropped(uint64_t n) { dropped_ += n; }
  void add_warning(std::string w) { warnings_.push_back(std::move(w)); }
  bool empty() const { return acc_.empty(); }
  // Demangles and shortens the names (once per distinct name), sorts, and computes the shares.
  KernelTable table() const;

 private:
  struct Acc {
    GpuActivityKind kind = GpuActivityKind::Kernel;
    int64_t calls = 0;
    uint64_t total_ns = 0;
    uint64_t bytes = 0;
  };
  std::map<std::string, Acc, std::less<>> acc_;  // std::less<>: found by string_view, no copy per record
  int64_t untimed_ = 0;
  uint64_t dropped_ = 0;
  std::vector<std::string> warnings_;
};

// The demangled name ("_Z..." through the C++ ABI demangler); a name that is not mangled, or that does not demangle,
// comes back unchanged.
std::string demangle_kernel_name(const std::string& raw);

// A readable name for a kernel: demangled, without the return type and the parameter list, without namespace and
// class qualifiers (anywhere, template arguments included: "dpo::cuda::(anonymous namespace)::" and "cutlass::gemm::"
// go), "__nv_bfloat16" written "bf16", cut to at most max_len characters with "..." at the end. Names that were
// never mangled (cuBLAS's "sm90_xmma_gemm_...", "nvjet_...") are only cut. Two kernels may shorten to the same text; the table keeps them
// as separate rows (full_name tells them apart).
std::string shorten_kernel_name(const std::string& raw, size_t max_len = 72);

// The table as text: one line per row (share, cumulative share, total ms, calls, mean us, name) for the first
// max_rows rows, then one line summing the rest; warnings below. `per` divides total_ms into a per-step column when
// > 0 (the number of steps traced).
std::string format_kernel_table(const KernelTable& t, size_t max_rows = 30, int64_t per = 0);

// Collects GPU activities through CUPTI between start() and stop(). One trace at a time per process: CUPTI's buffer
// callbacks carry no user pointer, so activities go to one process-wide sink, which a running trace owns.
class KernelTrace {
 public:
  // Whether this build can trace: CUDA and CUPTI both found at configure time. Otherwise false, with the reason
  // in *why_not (when given).
  static bool built(std::string* why_not = nullptr);

  KernelTrace() = default;
  ~KernelTrace();  // a running trace is stopped and its records are discarded
  KernelTrace(const KernelTrace&) = delete;
  KernelTrace& operator=(const KernelTrace&) = delete;

  // Enables collection of kernels, memory copies and memory sets for every CUDA context of the process. Returns ""
  // on success, else the CUPTI call and its error string (then nothing is collected and stop() returns an empty
  // table). Activities already enqueued before start() but not yet finished may be recorded: synchronize first.
  std::string start();
  // Flushes CUPTI's buffers (cuptiActivityFlushAll, forced), disables collection and returns the table. The caller
  // synchronizes the device first, so that every traced activity has finished and carries its timestamps.
  KernelTable stop();
  bool running() const { return running_; }

 private:
  bool running_ = false;
  KernelStats stats_;
};

// cudaProfilerStart / cudaProfilerStop on the calling thread's current device (the CUDA profiler capture range).
// Cheap and harmless without a profiler attached; no-ops in a build without CUDA.
void profiler_capture_start();
void profiler_capture_stop();

}  // namespace dpo
