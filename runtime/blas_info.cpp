// The BLAS core check and its startup fix (runtime/blas_info.h).
#include "runtime/blas_info.h"

#include <fcntl.h>
#include <omp.h>
#include <strings.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

#include "runtime/comm.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

// OpenBLAS's identification calls, declared weak so that the program also links (and reports "unknown") against a
// BLAS that lacks them.
extern "C" {
char* openblas_get_config(void) __attribute__((weak));
char* openblas_get_corename(void) __attribute__((weak));
}

extern char** environ;

namespace dpo {

namespace {

// OpenBLAS's x86-64 core names (driver/others/dynamic.c, corename[]) and the SIMD level each one's kernels need.
// SapphireRapids is reported by OpenBLAS >= 0.3.22 on CPUs with AMX; OPENBLAS_CORETYPE cannot ask for it (its
// sgemm/dgemm kernels are SkylakeX's), so preferred_openblas_core never returns it.
struct CoreLevel {
  const char* name;
  SimdLevel level;
};
constexpr CoreLevel kCores[] = {
    {"Katmai", SimdLevel::kBaseline},     {"Coppermine", SimdLevel::kBaseline}, {"Northwood", SimdLevel::kBaseline},
    {"Banias", SimdLevel::kBaseline},     {"Athlon", SimdLevel::kBaseline},     {"Prescott", SimdLevel::kSse3},
    {"Atom", SimdLevel::kSse3},           {"Core2", SimdLevel::kSse3},          {"Penryn", SimdLevel::kSse3},
    {"Dunnington", SimdLevel::kSse3},     {"Nehalem", SimdLevel::kSse3},        {"Opteron", SimdLevel::kSse3},
    {"Opteron_SSE3", SimdLevel::kSse3},   {"Barcelona", SimdLevel::kSse3},      {"Nano", SimdLevel::kSse3},
    {"Bobcat", SimdLevel::kSse3},         {"Sandybridge", SimdLevel::kAvx},     {"Bulldozer", SimdLevel::kAvx},
    {"Piledriver", SimdLevel::kAvx},      {"Steamroller", SimdLevel::kAvx},     {"Haswell", SimdLevel::kAvx2},
    {"Excavator", SimdLevel::kAvx2},      {"Zen", SimdLevel::kAvx2},            {"SkylakeX", SimdLevel::kAvx512},
    {"Cooperlake", SimdLevel::kAvx512Bf16}, {"SapphireRapids", SimdLevel::kAmx},
};

// The level that decides GEMM speed in fp32/fp64: the AVX-512 BF16 and AMX cores run SkylakeX's sgemm and dgemm
// kernels (they differ in the bf16 sbgemm only), so anything from AVX-512 up counts as AVX-512.
SimdLevel gemm_level(SimdLevel l) { return std::min(l, SimdLevel::kAvx512); }

std::string env_or_empty(const EnvLookup& env, const char* name) { return env(name).value_or(""); }

EnvLookup process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  };
}

std::string what_cpu_has(const CpuInfo& cpu) {
  return cpu.describe() + ", " + simd_level_name(cpu.level());
}

std::string core_with_level(const std::string& core) {
  const auto l = openblas_core_level(core);
  return core + " (" + (l ? simd_level_name(*l) : "unknown level") + ")";
}

}  // namespace

BlasInfo query_blas() {
  BlasInfo b;
  if (!openblas_get_config || !openblas_get_corename) return b;
  b.library = "OpenBLAS";
  if (const char* c = openblas_get_config()) b.config = c;
  if (const char* c = openblas_get_corename()) b.core = c;
  // "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY USE_OPENMP Cooperlake MAX_THREADS=64"
  if (b.config.rfind("OpenBLAS ", 0) == 0) {
    const auto end = b.config.find(' ', 9);
    b.version = b.config.substr(9, end == std::string::npos ? std::string::npos : end - 9);
  }
  b.dynamic_arch = (" " + b.config + " ").find(" DYNAMIC_ARCH ") != std::string::npos;
  return b;
}

std::optional<SimdLevel> openblas_core_level(const std::string& core) {
  for (const auto& c : kCores)
    if (strcasecmp(c.name, core.c_str()) == 0) return c.level;
  return std::nullopt;
}

std::string preferred_openblas_core(const CpuInfo& cpu) {
  const bool amd = cpu.vendor == CpuVendor::kAmd || cpu.vendor == CpuVendor::kHygon;
  switch (cpu.level()) {
    case SimdLevel::kAmx:         // Sapphire Rapids and later: OPENBLAS_CORETYPE's newest AVX-512 core
    case SimdLevel::kAvx512Bf16:  // Cooper Lake, Zen 4 and later (what OpenBLAS itself picks for them)
      return "Cooperlake";
    case SimdLevel::kAvx512: return "SkylakeX";
    case SimdLevel::kAvx2: return amd ? "Zen" : "Haswell";  // Zen: Haswell's kernels with AMD's blocking sizes
    case SimdLevel::kAvx: return "Sandybridge";
    case SimdLevel::kSse3: return cpu.sse4_2 ? "Nehalem" : cpu.ssse3 ? "Core2" : "Prescott";
    case SimdLevel::kBaseline: break;
  }
  return "Prescott";  // the x86-64 floor
}

CoreFit judge_openblas_core(const std::string& core, const CpuInfo& cpu) {
  const auto l = openblas_core_level(core);
  if (!l || cpu.vendor_id == "unknown") return CoreFit::kUnknown;
  const SimdLevel have = cpu.level();
  if (*l > have) return CoreFit::kAboveCpu;
  return gemm_level(*l) < gemm_level(have) ? CoreFit::kBelowCpu : CoreFit::kFits;
}

const char* core_fit_name(CoreFit f) {
  switch (f) {
    case CoreFit::kFits: return "fits";
    case CoreFit::kBelowCpu: return "below_cpu";
    case CoreFit::kAboveCpu: return "above_cpu";
    case CoreFit::kUnknown: return "unknown";
  }
  return "?";
}

const char* core_fit_phrase(CoreFit f) {
  switch (f) {
    case CoreFit::kFits: return "fits the CPU";
    case CoreFit::kBelowCpu: return "uses narrower vectors than the CPU has";
    case CoreFit::kAboveCpu: return "needs instructions the CPU or OS lacks";
    case CoreFit::kUnknown: return "is not checked (not an x86-64 OpenBLAS core)";
  }
  return "?";
}

std::string KernelSet::id() const {
  if (blas.library != "OpenBLAS") return blas.library + " BLAS";
  return "OpenBLAS " + blas.version + " core " + (blas.core.empty() ? "unknown" : blas.core);
}

std::string KernelSet::summary() const {
  return id() + ", " + std::to_string(threads) + " threads (" + origin + "); CPU " + cpu.describe() + ", " +
         simd_level_name(cpu.level()) + " [" + cpu.features() + "]";
}

nlohmann::json KernelSet::to_json() const {
  return {{"id", id()},
          {"blas_library", blas.library},
          {"blas_version", blas.version},
          {"blas_config", blas.config},
          {"blas_core", blas.core},
          {"core_origin", origin},
          {"core_fit", core_fit_name(fit)},
          {"threads", threads},
          {"cpu_vendor", cpu.vendor_id},
          {"cpu_brand", cpu.brand},
          {"cpu_family", cpu.family},
          {"cpu_model", cpu.model},
          {"cpu_simd_level", simd_level_name(cpu.level())},
          {"cpu_features", cpu.features()}};
}

BlasStartupDecision decide_blas_startup(const BlasInfo& blas, const CpuInfo& cpu, const EnvLookup& env) {
  BlasStartupDecision d;
  const std::optional<std::string> coretype = env("OPENBLAS_CORETYPE");
  const std::optional<std::string> fixed = env(kBlasCoreFixedEnv);
  const bool test_as_detected = !env_or_empty(env, kTestCoretypeAsDetectedEnv).empty();
  d.origin = "library's choice";
  if (blas.library != "OpenBLAS") {
    d.origin = "unknown BLAS: not checked";
    return d;
  }
  const CoreFit fit = judge_openblas_core(blas.core, cpu);
  const std::string preferred = preferred_openblas_core(cpu);
  const std::string on_cpu = "on this CPU (" + what_cpu_has(cpu) + ")";

  if (fixed) {
    // A restarted process, or the restart turned off by hand: no second restart, whatever the outcome.
    const bool restarted = coretype && !fixed->empty() && openblas_core_level(*fixed);
    if (restarted) d.origin = "OPENBLAS_CORETYPE=" + *coretype + " set at startup; the library had chosen " + *fixed;
    else if (coretype) d.origin = "OPENBLAS_CORETYPE=" + *coretype + " (user)";
    if (fit == CoreFit::kBelowCpu || fit == CoreFit::kAboveCpu) {
      d.action = BlasStartupDecision::Action::kWarn;
      d.message = "warning: OpenBLAS runs its " + core_with_level(blas.core) + " kernels " + on_cpu + ", which " +
                  core_fit_phrase(fit) + (restarted ? " even after the restart with OPENBLAS_CORETYPE=" + *coretype
                                                  : std::string(" (") + kBlasCoreFixedEnv + " is set: no restart)") +
                  "; GEMMs may be slow or fail. Set OPENBLAS_CORETYPE=" + preferred +
                  " (docs/performance.md, \"BLAS kernels\")";
    }
    return d;
  }
  if (coretype && !test_as_detected) {
    d.origin = "OPENBLAS_CORETYPE=" + *coretype + " (user)";
    if (fit == CoreFit::kBelowCpu || fit == CoreFit::kAboveCpu) {
      d.action = BlasStartupDecision::Action::kWarn;
      d.message = "warning: OPENBLAS_CORETYPE=" + *coretype + " is set: OpenBLAS runs its " +
                  core_with_level(blas.core) + " kernels " + on_cpu + ", which " + core_fit_phrase(fit) +
                  "; kept as set (the kernels for this CPU: OPENBLAS_CORETYPE=" + preferred +
                  ", or unset it; docs/performance.md, \"BLAS kernels\")";
    }
    return d;
  }
  if (fit == CoreFit::kFits || fit == CoreFit::kUnknown) return d;
  if (!blas.dynamic_arch) {
    d.action = BlasStartupDecision::Action::kWarn;
    d.message = "warning: OpenBLAS runs its " + core_with_level(blas.core) + " kernels " + on_cpu + ", which " +
                core_fit_phrase(fit) + "; this OpenBLAS was built for that core alone (no DYNAMIC_ARCH: \"" +
                blas.config + "\"), so it cannot switch. Install a DYNAMIC_ARCH build (Debian's " +
                "libopenblas-openmp-dev) or one built for " + preferred + " (docs/performance.md, \"BLAS kernels\")";
    return d;
  }
  d.action = BlasStartupDecision::Action::kRestart;
  d.coretype = preferred;
  d.message = "OpenBLAS chose its " + core_with_level(blas.core) + " kernels " + on_cpu + ", which " +
              core_fit_phrase(fit) + "; restarting with OPENBLAS_CORETYPE=" + preferred +
              " (docs/performance.md, \"BLAS kernels\")";
  return d;
}

KernelSet current_kernel_set() {
  KernelSet k;
  k.blas = query_blas();
  k.cpu = detect_cpu();
  k.threads = omp_get_max_threads();
  k.fit = judge_openblas_core(k.blas.core, k.cpu);
  k.origin = decide_blas_startup(k.blas, k.cpu, process_env()).origin;
  return k;
}

void fix_blas_core_at_startup() {
  const BlasInfo blas = query_blas();
  const CpuInfo cpu = detect_cpu();
  const BlasStartupDecision d = decide_blas_startup(blas, cpu, process_env());
  if (d.action == BlasStartupDecision::Action::kNone) return;
  const bool prints = launcher_rank() <= 0;
  if (d.action == BlasStartupDecision::Action::kWarn) {
    if (prints) std::fprintf(stderr, "dpo: %s\n", d.message.c_str());
    return;
  }
  // The same argv as this process (from the kernel's copy: this runs before main), the same environment plus the
  // two variables; open files and stdin carry over through exec.
  // POSIX reads, not iostreams: this runs during static initialisation.
  std::string cmdline;
  if (const int fd = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC); fd >= 0) {
    char buf[4096];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) cmdline.append(buf, static_cast<size_t>(n));
    ::close(fd);
  }
  std::vector<std::string> args;
  for (size_t b = 0; b < cmdline.size();) {
    const size_t e = cmdline.find('\0', b);
    args.push_back(cmdline.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  if (args.empty()) {
    if (prints)
      std::fprintf(stderr, "dpo: warning: %s failed: cannot read /proc/self/cmdline; set OPENBLAS_CORETYPE=%s\n",
                   d.message.c_str(), d.coretype.c_str());
    return;
  }
  std::vector<std::string> env_store;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv(*e);
    if (kv.rfind("OPENBLAS_CORETYPE=", 0) == 0 || kv.rfind(std::string(kBlasCoreFixedEnv) + "=", 0) == 0) continue;
    env_store.push_back(kv);
  }
  env_store.push_back("OPENBLAS_CORETYPE=" + d.coretype);
  env_store.push_back(std::string(kBlasCoreFixedEnv) + "=" + blas.core);
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);
  if (prints) {
    std::fprintf(stderr, "dpo: %s\n", d.message.c_str());
    std::fflush(stderr);
  }
  std::fflush(stdout);
  ::execve("/proc/self/exe", argv.data(), envp.data());
  const int err = errno;  // only reached when exec failed
  if (prints)
    std::fprintf(stderr, "dpo: warning: the restart failed (execve /proc/self/exe: %s); continuing with %s. Set "
                 "OPENBLAS_CORETYPE=%s before starting dpo\n", std::strerror(err), blas.core.c_str(),
                 d.coretype.c_str());
}

std::vector<std::string> kernel_sets_across_ranks(Communicator& comm, const std::string& id) {
  const int n = comm.size();
  if (n <= 1) return {};
  // Fixed-size slots of bytes (carried in I32 elements, one byte each: all_gather moves any dtype exactly).
  constexpr int64_t kSlot = 160;
  Tensor mine = Tensor::host({kSlot}, DType::I32);
  Tensor all = Tensor::host({n * kSlot}, DType::I32);
  auto* m = mine.data<int32_t>();
  for (int64_t i = 0; i < kSlot; ++i) m[i] = i < static_cast<int64_t>(id.size()) ? static_cast<unsigned char>(id[i]) : 0;
  comm.all_gather(all, mine);
  std::map<std::string, std::string> ranks;  // id -> "0,1"
  const auto* a = all.data<int32_t>();
  for (int r = 0; r < n; ++r) {
    std::string s;
    for (int64_t i = 0; i < kSlot && a[r * kSlot + i] != 0; ++i) s += static_cast<char>(a[r * kSlot + i]);
    auto& who = ranks[s];
    who += (who.empty() ? "" : ",") + std::to_string(r);
  }
  if (ranks.size() <= 1) return {};
  std::vector<std::string> out;
  for (const auto& [s, who] : ranks)
    out.push_back((who.find(',') == std::string::npos ? "rank " : "ranks ") + who + ": " + s);
  return out;
}

}  // namespace dpo
