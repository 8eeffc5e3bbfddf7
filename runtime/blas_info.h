// Which BLAS kernels the CPU backend's GEMMs run, and the check that they fit the CPU.
//
// Debian's OpenBLAS is built with DYNAMIC_ARCH: it carries one kernel set ("core") per CPU family and picks one
// when the library is loaded, from cpuid, before main() runs. A CPU that its table does not know gets a fallback:
// OpenBLAS 0.3.21 gives an Intel Sapphire Rapids Xeon (AVX-512, AMX) its "Prescott" SSE3 kernels, 3-4x slower
// (docs/performance.md, "BLAS kernels"). The environment variable OPENBLAS_CORETYPE, read at that same load, names
// the core instead. So the check runs at process start, before any GEMM (fix_blas_core_at_startup, called from a
// static initialiser of the CPU backend, so every program that uses it, the dpo CLI and the tests, gets it):
//   - the core OpenBLAS chose is compared with what the CPU can run (judge_openblas_core);
//   - a core below the CPU's level (or one the CPU cannot run) chosen by the library itself is fixed by
//     re-executing the process (/proc/self/exe with the same argv, environment, open files and stdin) with
//     OPENBLAS_CORETYPE set to preferred_openblas_core(cpu) and the marker DPO_BLAS_CORE_FIXED set to the core
//     the library had chosen; the marker stops a second restart, whatever the outcome;
//   - OPENBLAS_CORETYPE set by the user is kept; a mismatch is a warning;
//   - a library that cannot choose (OpenBLAS built for one core, no DYNAMIC_ARCH) gets a warning.
// The kernel set (library, version, core, threads, CPU) is printed by `dpo bench` and the training log, and stored
// in every checkpoint's trainer state: a different core rounds the GEMMs differently, so a resume or an MPI run
// across CPUs with different kernel sets is not bit-identical (warnings name both).
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "runtime/cpu_info.h"

namespace dpo {

class Communicator;

// Set by the restart, to the core the library had chosen; set by hand (any value), it turns the restart off.
inline constexpr const char* kBlasCoreFixedEnv = "DPO_BLAS_CORE_FIXED";
// Tests only: OPENBLAS_CORETYPE is treated as the library's own choice (not the user's), so that a test can make
// OpenBLAS load the wrong kernels exactly as a misdetected CPU does and check that the process fixes them.
inline constexpr const char* kTestCoretypeAsDetectedEnv = "DPO_TEST_CORETYPE_AS_DETECTED";

struct BlasInfo {
  std::string library = "unknown";  // "OpenBLAS", or "unknown" for a BLAS without openblas_get_config
  std::string version;              // "0.3.21"
  std::string config;               // openblas_get_config(): version, build options, core
  std::string core;                 // openblas_get_corename(): "SkylakeX", "Prescott", ...; "" when unknown
  bool dynamic_arch = false;        // built with DYNAMIC_ARCH: OPENBLAS_CORETYPE can choose the core
};
BlasInfo query_blas();

// The SIMD level the kernels of OpenBLAS x86-64 core `core` need (OpenBLAS's own names, driver/others/dynamic.c,
// matched without case, as OPENBLAS_CORETYPE is); nullopt for any other name.
std::optional<SimdLevel> openblas_core_level(const std::string& core);

// The core to ask OpenBLAS for on `cpu` (a name OPENBLAS_CORETYPE accepts): the one whose kernels use the widest
// vector unit the CPU has. Measured on AMD Zen 4 in docs/perf/2026-12-06-blas.
std::string preferred_openblas_core(const CpuInfo& cpu);

enum class CoreFit {
  kFits,      // the core's GEMM kernels use the CPU's widest vector unit
  kBelowCpu,  // a narrower unit: a generic fallback (slow)
  kAboveCpu,  // instructions the CPU or OS lacks: the first GEMM would fault
  kUnknown,   // not an x86-64 OpenBLAS core name, or not an x86-64 CPU
};
CoreFit judge_openblas_core(const std::string& core, const CpuInfo& cpu);
const char* core_fit_name(CoreFit f);    // "fits", "below_cpu", "above_cpu", "unknown" (the JSON's core_fit)
const char* core_fit_phrase(CoreFit f);  // for messages: "fits the CPU", "uses narrower vectors than the CPU has"

// The kernels the CPU backend's GEMMs run in this process.
struct KernelSet {
  BlasInfo blas;
  CpuInfo cpu;
  int threads = 0;     // OpenMP threads the GEMMs use now (omp_get_max_threads)
  std::string origin;  // how the core was chosen: "library's choice", "OPENBLAS_CORETYPE=X (user)", or
                       // "OPENBLAS_CORETYPE=X set at startup; the library had chosen Y"
  CoreFit fit = CoreFit::kUnknown;

  // What decides the GEMMs' rounding: "OpenBLAS 0.3.21 core SkylakeX". Equal ids: the same kernels.
  std::string id() const;
  // One line: id, threads, origin, CPU, its SIMD level and extensions.
  std::string summary() const;
  nlohmann::json to_json() const;
};
KernelSet current_kernel_set();

// The environment a startup decision reads (a function so that tests can pass a table).
using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

struct BlasStartupDecision {
  enum class Action { kNone, kRestart, kWarn };
  Action action = Action::kNone;
  std::string coretype;  // kRestart: the OPENBLAS_CORETYPE value to restart with
  std::string message;   // kRestart, kWarn: what to print
  std::string origin;    // KernelSet::origin
};
BlasStartupDecision decide_blas_startup(const BlasInfo& blas, const CpuInfo& cpu, const EnvLookup& env);

// Runs the decision for this process: prints its message (rank 0 of a launcher's job only, or a process without
// one) and, for kRestart, re-executes; returns if the restart is impossible or fails (with a warning).
void fix_blas_core_at_startup();

// Collective over `comm`: the distinct kernel-set ids of all ranks, with the ranks that have each, when they
// differ; empty when every rank has the same. E.g. {"ranks 0,1: OpenBLAS 0.3.21 core SkylakeX", "rank 2: ..."}.
std::vector<std::string> kernel_sets_across_ranks(Communicator& comm, const std::string& id);

}  // namespace dpo
