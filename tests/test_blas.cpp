// The BLAS kernel check (runtime/blas_info.h, runtime/cpu_info.h):
//   - cpuid decoding and the CPU -> OpenBLAS core mapping on a table of CPUs, written from Intel's and AMD's
//     published cpuid signatures and feature lists and from OpenBLAS's core names (driver/others/dynamic.c: which
//     core each family gets), not from this code's output;
//   - this machine's decoded features against the kernel's /proc/cpuinfo flags;
//   - the startup decision (restart, warn, keep) on a table of environments;
//   - the misdetection itself: the dpo binary started with OpenBLAS forced onto its Prescott kernels as the
//     library's own choice must restart onto the CPU's core and say so; started with the same core as the user's
//     choice it must keep it and warn;
//   - the kernel set in `dpo train`'s log header and trainer state, and the warning on resuming with another.
#include <gtest/gtest.h>
#include <strings.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

#include "runtime/blas_info.h"
#include "runtime/comm.h"
#include "runtime/cpu_info.h"
#include "train/hash.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::CliResult;

const std::string kDpoBinary = std::string(DPO_BINARY_DIR) + "/dpo";
std::string q(const std::string& s) { return test::shell_quote(s); }

// --- cpuid words of published CPUs ------------------------------------------------------------------------------

enum Feat : unsigned {
  kSse3 = 1u << 0,
  kSsse3 = 1u << 1,
  kSse42 = 1u << 2,
  kAvx = 1u << 3,
  kFma = 1u << 4,
  kAvx2 = 1u << 5,
  kAvx512 = 1u << 6,  // F, DQ, CD, BW, VL together (every AVX-512 server CPU here has all five)
  kBf16 = 1u << 7,    // AVX512_BF16
  kAmx = 1u << 8,     // AMX-TILE, AMX-BF16, AMX-INT8
};
constexpr unsigned kNehalemSet = kSse3 | kSsse3 | kSse42;
constexpr unsigned kAvx2Set = kNehalemSet | kAvx | kFma | kAvx2;

// XCR0 of an OS that saves x87/SSE/AVX (0x7), AVX-512 state (0xe0) and AMX tiles (bits 17, 18).
constexpr uint64_t kXcr0Avx = 0x7, kXcr0Avx512 = 0xe7, kXcr0Amx = 0xe7 | (1ull << 17) | (1ull << 18);

CpuidWords words(const char* vendor, uint32_t signature, unsigned f, uint64_t xcr0, const char* brand) {
  CpuidWords w;
  w.max_leaf = 0x1b;
  std::snprintf(w.vendor, sizeof w.vendor, "%s", vendor);
  std::snprintf(w.brand, sizeof w.brand, "%s", brand);
  w.l1_eax = signature;
  // Leaf 1 ECX: SSE3 0, SSSE3 9, FMA 12, SSE4.2 20, OSXSAVE 27, AVX 28 (Intel SDM vol. 2A, table 3-10).
  w.l1_ecx = ((f & kSse3) ? 1u << 0 : 0) | ((f & kSsse3) ? 1u << 9 : 0) | ((f & kFma) ? 1u << 12 : 0) |
             ((f & kSse42) ? 1u << 20 : 0) | (1u << 27) | ((f & kAvx) ? 1u << 28 : 0);
  // Leaf 7.0 EBX: AVX2 5, AVX512F 16, AVX512DQ 17, AVX512CD 28, AVX512BW 30, AVX512VL 31; EDX: AMX-BF16 22,
  // AMX-TILE 24, AMX-INT8 25; leaf 7.1 EAX: AVX512_BF16 5.
  w.l7_ebx = ((f & kAvx2) ? 1u << 5 : 0) |
             ((f & kAvx512) ? (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31) : 0);
  w.l7_edx = (f & kAmx) ? (1u << 22) | (1u << 24) | (1u << 25) : 0;
  w.l7s1_eax = (f & kBf16) ? 1u << 5 : 0;
  w.xcr0 = xcr0;
  return w;
}

struct CpuCase {
  const char* name;
  CpuidWords w;
  int family, model;
  SimdLevel level;
  const char* core;  // what OPENBLAS_CORETYPE should name on it
};

// Signatures (leaf 1 EAX): Intel's "Intel Xeon Processor Scalable Family" specification updates and AMD's
// revision guides. Cores: the OpenBLAS core whose kernels the CPU's widest vector unit runs, as OpenBLAS's own
// detection assigns it where that detection knows the CPU (Skylake-X, Ice Lake SP, Cooper Lake, Zen 2/3/4,
// Ivy Bridge, Westmere) and as it would for Sapphire Rapids, which OpenBLAS 0.3.21 does not know.
std::vector<CpuCase> cpu_table() {
  return {
      {"Intel Xeon Platinum 8180 (Skylake-SP)", words("GenuineIntel", 0x50654, kAvx2Set | kAvx512, kXcr0Avx512,
                                                      "Intel(R) Xeon(R) Platinum 8180 CPU @ 2.50GHz"),
       6, 0x55, SimdLevel::kAvx512, "SkylakeX"},
      {"Intel Xeon Platinum 8380 (Ice Lake SP)", words("GenuineIntel", 0x606A6, kAvx2Set | kAvx512, kXcr0Avx512,
                                                       "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz"),
       6, 0x6A, SimdLevel::kAvx512, "SkylakeX"},
      {"Intel Xeon Platinum 8380H (Cooper Lake)",
       words("GenuineIntel", 0x5065B, kAvx2Set | kAvx512 | kBf16, kXcr0Avx512, "Intel(R) Xeon(R) Platinum 8380H"),
       6, 0x55, SimdLevel::kAvx512Bf16, "Cooperlake"},
      {"Intel Xeon Platinum 8480+ (Sapphire Rapids)",
       words("GenuineIntel", 0x806F8, kAvx2Set | kAvx512 | kBf16 | kAmx, kXcr0Amx,
             "Intel(R) Xeon(R) Platinum 8480+"),
       6, 0x8F, SimdLevel::kAmx, "Cooperlake"},
      {"Sapphire Rapids, OS without AMX tile state",
       words("GenuineIntel", 0x806F8, kAvx2Set | kAvx512 | kBf16 | kAmx, kXcr0Avx512, "Intel(R) Xeon(R) Gold 6430"),
       6, 0x8F, SimdLevel::kAvx512Bf16, "Cooperlake"},
      {"Skylake-SP, OS without AVX-512 state",
       words("GenuineIntel", 0x50654, kAvx2Set | kAvx512, kXcr0Avx, "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz"), 6,
       0x55, SimdLevel::kAvx2, "Haswell"},
      {"AMD EPYC 7742 (Zen 2)", words("AuthenticAMD", 0x830F10, kAvx2Set, kXcr0Avx, "AMD EPYC 7742 64-Core Processor"),
       0x17, 0x31, SimdLevel::kAvx2, "Zen"},
      {"AMD EPYC 7763 (Zen 3)", words("AuthenticAMD", 0xA00F11, kAvx2Set, kXcr0Avx, "AMD EPYC 7763 64-Core Processor"),
       0x19, 0x01, SimdLevel::kAvx2, "Zen"},
      {"AMD EPYC 9654 (Zen 4)", words("AuthenticAMD", 0xA10F11, kAvx2Set | kAvx512 | kBf16, kXcr0Avx512,
                                      "AMD EPYC 9654 96-Core Processor"),
       0x19, 0x11, SimdLevel::kAvx512Bf16, "Cooperlake"},
      {"Intel Xeon E5-2680 v2 (Ivy Bridge, AVX without AVX2)",
       words("GenuineIntel", 0x306E4, kNehalemSet | kAvx, kXcr0Avx, "Intel(R) Xeon(R) CPU E5-2680 v2 @ 2.80GHz"), 6,
       0x3E, SimdLevel::kAvx, "Sandybridge"},
      {"Intel Xeon X5670 (Westmere, no AVX)",
       words("GenuineIntel", 0x206C2, kNehalemSet, 0x3, "Intel(R) Xeon(R) CPU X5670 @ 2.93GHz"), 6, 0x2C,
       SimdLevel::kSse3, "Nehalem"},
  };
}

TEST(CpuInfo, DecodesFamilyModelAndLevelOfPublishedCpus) {
  for (const CpuCase& c : cpu_table()) {
    SCOPED_TRACE(c.name);
    const CpuInfo cpu = decode_cpuid(c.w);
    EXPECT_EQ(cpu.family, c.family);
    EXPECT_EQ(cpu.model, c.model);
    EXPECT_EQ(cpu.level(), c.level) << simd_level_name(cpu.level());
    EXPECT_EQ(preferred_openblas_core(cpu), c.core);
    EXPECT_EQ(judge_openblas_core(c.core, cpu), CoreFit::kFits);
    // The preferred core is one OpenBLAS's OPENBLAS_CORETYPE accepts (a known name) ...
    ASSERT_TRUE(openblas_core_level(c.core).has_value());
    // ... and the generic fallback is "below" on every CPU here that has more than SSE3.
    if (c.level > SimdLevel::kSse3) {
      EXPECT_EQ(judge_openblas_core("Prescott", cpu), CoreFit::kBelowCpu);
      EXPECT_EQ(judge_openblas_core("Nehalem", cpu), CoreFit::kBelowCpu);
    }
  }
}

TEST(CpuInfo, JudgesCoresAgainstWhatTheCpuRuns) {
  const auto t = cpu_table();
  const CpuInfo spr = decode_cpuid(t[3].w), icx = decode_cpuid(t[1].w), zen2 = decode_cpuid(t[6].w),
                ivb = decode_cpuid(t[9].w), no_os512 = decode_cpuid(t[5].w);
  // Sapphire Rapids: SkylakeX, Cooperlake and SapphireRapids run the same fp32/fp64 GEMM kernels; anything with
  // narrower vectors is a fallback (Haswell included: half the width).
  for (const char* ok : {"SkylakeX", "Cooperlake", "SapphireRapids", "skylakex", "COOPERLAKE"})
    EXPECT_EQ(judge_openblas_core(ok, spr), CoreFit::kFits) << ok;
  for (const char* low : {"Haswell", "Zen", "Sandybridge", "Core2", "Prescott", "Katmai"})
    EXPECT_EQ(judge_openblas_core(low, spr), CoreFit::kBelowCpu) << low;
  // Ice Lake SP has no AVX512_BF16: Cooperlake's bf16 kernels would fault there.
  EXPECT_EQ(judge_openblas_core("Cooperlake", icx), CoreFit::kAboveCpu);
  EXPECT_EQ(judge_openblas_core("SkylakeX", icx), CoreFit::kFits);
  // Zen 2: Haswell and Zen both fit (the same AVX2 kernels); AVX-512 cores do not run.
  EXPECT_EQ(judge_openblas_core("Haswell", zen2), CoreFit::kFits);
  EXPECT_EQ(judge_openblas_core("Zen", zen2), CoreFit::kFits);
  EXPECT_EQ(judge_openblas_core("SkylakeX", zen2), CoreFit::kAboveCpu);
  // AVX without AVX2: Haswell needs AVX2 and FMA.
  EXPECT_EQ(judge_openblas_core("Haswell", ivb), CoreFit::kAboveCpu);
  EXPECT_EQ(judge_openblas_core("Sandybridge", ivb), CoreFit::kFits);
  // The CPU has AVX-512 but the OS does not save ZMM registers: AVX-512 code cannot run.
  EXPECT_EQ(judge_openblas_core("SkylakeX", no_os512), CoreFit::kAboveCpu);
  // Names OpenBLAS does not have on x86-64.
  for (const char* other : {"POWER9", "ARMV8", "", "Skylake"})
    EXPECT_EQ(judge_openblas_core(other, spr), CoreFit::kUnknown) << other;
  CpuInfo not_x86;
  EXPECT_EQ(judge_openblas_core("Haswell", not_x86), CoreFit::kUnknown);
}

// /proc/cpuinfo's flags are the kernel's own decoding of cpuid (cleared for state the OS does not enable): an
// independent reading of the same machine.
TEST(CpuInfo, ThisMachineAgreesWithProcCpuinfo) {
  std::ifstream f("/proc/cpuinfo");
  std::string line, flags, family, model;
  while (std::getline(f, line)) {
    auto value = [&] { return line.substr(line.find(':') + 2); };
    if (flags.empty() && line.rfind("flags", 0) == 0) flags = " " + value() + " ";
    if (family.empty() && line.rfind("cpu family", 0) == 0) family = value();
    if (model.empty() && line.rfind("model\t", 0) == 0) model = value();
  }
  const CpuInfo cpu = detect_cpu();
  if (flags.empty() || cpu.vendor_id == "unknown") GTEST_SKIP() << "not an x86 Linux machine";
  auto has = [&](const char* flag) { return flags.find(" " + std::string(flag) + " ") != std::string::npos; };
  EXPECT_EQ(cpu.family, std::stoi(family));
  EXPECT_EQ(cpu.model, std::stoi(model));
  EXPECT_EQ(cpu.sse3, has("pni"));
  EXPECT_EQ(cpu.ssse3, has("ssse3"));
  EXPECT_EQ(cpu.sse4_2, has("sse4_2"));
  EXPECT_EQ(cpu.avx, has("avx"));
  EXPECT_EQ(cpu.fma, has("fma"));
  EXPECT_EQ(cpu.avx2, has("avx2"));
  EXPECT_EQ(cpu.avx512f, has("avx512f"));
  EXPECT_EQ(cpu.avx512bw, has("avx512bw"));
  EXPECT_EQ(cpu.avx512vl, has("avx512vl"));
  EXPECT_EQ(cpu.avx512dq, has("avx512dq"));
  EXPECT_EQ(cpu.avx512cd, has("avx512cd"));
  EXPECT_EQ(cpu.avx512_bf16, has("avx512_bf16"));
  EXPECT_EQ(cpu.amx_tile, has("amx_tile"));
  EXPECT_EQ(cpu.amx_bf16, has("amx_bf16"));
}

// --- the startup decision ---------------------------------------------------------------------------------------

EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

BlasInfo openblas(const std::string& core, bool dynamic = true) {
  BlasInfo b;
  b.library = "OpenBLAS";
  b.version = "0.3.21";
  b.core = core;
  b.dynamic_arch = dynamic;
  b.config = "OpenBLAS 0.3.21 " + std::string(dynamic ? "DYNAMIC_ARCH " : "") + "USE_OPENMP " + core;
  return b;
}

using Action = BlasStartupDecision::Action;

TEST(BlasStartup, MisdetectedSapphireRapidsRestartsOntoCooperlake) {
  const CpuInfo spr = decode_cpuid(cpu_table()[3].w);
  const auto d = decide_blas_startup(openblas("Prescott"), spr, env_of({}));
  EXPECT_EQ(d.action, Action::kRestart);
  EXPECT_EQ(d.coretype, "Cooperlake");
  EXPECT_NE(d.message.find("Prescott"), std::string::npos) << d.message;
  EXPECT_NE(d.message.find("OPENBLAS_CORETYPE=Cooperlake"), std::string::npos) << d.message;
  EXPECT_EQ(d.origin, "library's choice");

  // The restarted process: the marker holds the library's first choice; no second restart either way.
  const auto fixed = decide_blas_startup(openblas("Cooperlake"), spr,
                                         env_of({{"OPENBLAS_CORETYPE", "Cooperlake"}, {kBlasCoreFixedEnv, "Prescott"}}));
  EXPECT_EQ(fixed.action, Action::kNone);
  EXPECT_EQ(fixed.origin, "OPENBLAS_CORETYPE=Cooperlake set at startup; the library had chosen Prescott");
  const auto still = decide_blas_startup(openblas("Prescott"), spr,
                                         env_of({{"OPENBLAS_CORETYPE", "Cooperlake"}, {kBlasCoreFixedEnv, "Prescott"}}));
  EXPECT_EQ(still.action, Action::kWarn);
  EXPECT_NE(still.message.find("even after the restart"), std::string::npos) << still.message;
}

TEST(BlasStartup, UserChoiceIsKeptWithAWarningWhenItMismatches) {
  const CpuInfo spr = decode_cpuid(cpu_table()[3].w);
  const auto d = decide_blas_startup(openblas("Prescott"), spr, env_of({{"OPENBLAS_CORETYPE", "prescott"}}));
  EXPECT_EQ(d.action, Action::kWarn);
  EXPECT_EQ(d.origin, "OPENBLAS_CORETYPE=prescott (user)");
  EXPECT_NE(d.message.find("kept as set"), std::string::npos) << d.message;
  EXPECT_NE(d.message.find("OPENBLAS_CORETYPE=Cooperlake"), std::string::npos) << d.message;
  // A fitting user choice: silent. Other OpenBLAS variables (OPENBLAS_VERBOSE) change nothing.
  const auto ok = decide_blas_startup(openblas("SkylakeX"), spr,
                                      env_of({{"OPENBLAS_CORETYPE", "SkylakeX"}, {"OPENBLAS_VERBOSE", "2"}}));
  EXPECT_EQ(ok.action, Action::kNone);
  EXPECT_EQ(ok.origin, "OPENBLAS_CORETYPE=SkylakeX (user)");
  // A user choice the CPU cannot run.
  const CpuInfo zen2 = decode_cpuid(cpu_table()[6].w);
  const auto above = decide_blas_startup(openblas("SkylakeX"), zen2, env_of({{"OPENBLAS_CORETYPE", "SkylakeX"}}));
  EXPECT_EQ(above.action, Action::kWarn);
  EXPECT_NE(above.message.find("needs instructions the CPU or OS lacks"), std::string::npos) << above.message;
  // The test switch makes the same setting count as the library's choice.
  const auto as_detected = decide_blas_startup(
      openblas("Prescott"), spr, env_of({{"OPENBLAS_CORETYPE", "Prescott"}, {kTestCoretypeAsDetectedEnv, "1"}}));
  EXPECT_EQ(as_detected.action, Action::kRestart);
  EXPECT_EQ(as_detected.coretype, "Cooperlake");
}

TEST(BlasStartup, FittingOrUncheckableChoicesAreLeftAlone) {
  const auto t = cpu_table();
  for (const CpuCase& c : t) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ(decide_blas_startup(openblas(c.core), decode_cpuid(c.w), env_of({})).action, Action::kNone);
  }
  // Zen on Zen 2 and Haswell on Zen 3: the library's own (fitting) choices, not "improved" by a restart.
  EXPECT_EQ(decide_blas_startup(openblas("Haswell"), decode_cpuid(t[7].w), env_of({})).action, Action::kNone);
  BlasInfo other;  // not OpenBLAS: nothing to ask, nothing to set
  EXPECT_EQ(decide_blas_startup(other, decode_cpuid(t[3].w), env_of({})).action, Action::kNone);
  // Turned off by hand: a mismatch is only reported.
  const auto off = decide_blas_startup(openblas("Prescott"), decode_cpuid(t[3].w), env_of({{kBlasCoreFixedEnv, "1"}}));
  EXPECT_EQ(off.action, Action::kWarn);
  // A single-core build cannot switch: reported, not restarted (a restart would loop on the same kernels).
  const auto single = decide_blas_startup(openblas("Prescott", false), decode_cpuid(t[3].w), env_of({}));
  EXPECT_EQ(single.action, Action::kWarn);
  EXPECT_NE(single.message.find("DYNAMIC_ARCH"), std::string::npos) << single.message;
}

TEST(BlasStartup, OneProcessHasOneKernelSet) {
  auto comm = make_local_communicator();
  EXPECT_TRUE(kernel_sets_across_ranks(*comm, current_kernel_set().id()).empty());
}

// --- this process and the dpo binary -------------------------------------------------------------------------------

// True when the real misdetection can be staged here: OpenBLAS with DYNAMIC_ARCH on an x86-64 CPU whose core is
// above Prescott's.
bool can_stage_misdetection(std::string* why) {
  const KernelSet k = current_kernel_set();
  if (k.blas.library != "OpenBLAS" || !k.blas.dynamic_arch) {
    *why = "the BLAS is not a DYNAMIC_ARCH OpenBLAS (" + k.blas.config + "): OPENBLAS_CORETYPE cannot choose";
    return false;
  }
  const auto level = openblas_core_level(preferred_openblas_core(k.cpu));
  if (k.cpu.vendor_id == "unknown" || !level || *level <= SimdLevel::kSse3) {
    *why = "Prescott's kernels fit this CPU (" + k.cpu.describe() + ")";
    return false;
  }
  return true;
}

// The test program itself went through the startup check (the CPU backend's static initialiser): unless a user
// chose the core, its GEMMs run kernels that fit the CPU. A silent fallback would fail here on the CPU it happens on.
TEST(BlasKernels, ThisProcessRunsKernelsThatFitTheCpu) {
  const KernelSet k = current_kernel_set();
  std::printf("kernel set: %s\n", k.summary().c_str());
  if (k.fit == CoreFit::kUnknown) GTEST_SKIP() << "not an x86-64 OpenBLAS: " << k.summary();
  if (std::getenv("OPENBLAS_CORETYPE") && !std::getenv(kBlasCoreFixedEnv))
    GTEST_SKIP() << "OPENBLAS_CORETYPE is set by the user: " << k.summary();
  EXPECT_EQ(k.fit, CoreFit::kFits) << k.summary();
  EXPECT_EQ(k.threads, omp_get_max_threads());
}

// A dpo bench command small enough for a test; its JSON records the kernel set.
std::string tiny_bench(const std::string& json_path) {
  return " bench --shape tiny --workload custom --prompt-len 6 --chosen-len 5 --rejected-len 4 --pairs 1 --steps 1 "
         "--warmup 0 --threads 1 --json " + q(json_path);
}

// The misdetection as it happens: OpenBLAS loads its Prescott kernels by itself (OPENBLAS_CORETYPE makes it, and
// the test switch hides that the variable was set), and `dpo` must notice, restart onto the CPU's core and record
// how it got there.
TEST(BlasKernels, DpoFixesAMisdetectedCoreByRestarting) {
  std::string why;
  if (!can_stage_misdetection(&why)) GTEST_SKIP() << why;
  test::ScratchDir w("dpo_blas_");
  const std::string pref = preferred_openblas_core(detect_cpu());
  const CliResult r =
      test::run_cli("/usr/bin/env", w.dir,
                    "-u " + std::string(kBlasCoreFixedEnv) + " OPENBLAS_CORETYPE=Prescott " +
                        kTestCoretypeAsDetectedEnv + "=1 " + q(kDpoBinary) + tiny_bench(w / "b.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("OpenBLAS chose its Prescott (sse3) kernels"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("restarting with OPENBLAS_CORETYPE=" + pref), std::string::npos) << r.err;
  const json k = json::parse(test::slurp(w / "b.json"))["cpu_kernels"];
  EXPECT_EQ(strcasecmp(k["blas_core"].get<std::string>().c_str(), pref.c_str()), 0) << k.dump(2);
  EXPECT_EQ(k["core_origin"], "OPENBLAS_CORETYPE=" + pref + " set at startup; the library had chosen Prescott");
  EXPECT_EQ(k["core_fit"], "fits");
  // The printed table names the kernels too.
  EXPECT_NE(r.out.find("cpu kernels"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("core " + k["blas_core"].get<std::string>()), std::string::npos) << r.out;
}

// The same core chosen by the user is kept (the library really runs Prescott: the staging above is faithful), with
// a warning naming the CPU's core.
TEST(BlasKernels, DpoKeepsAUserChosenCoreAndWarns) {
  std::string why;
  if (!can_stage_misdetection(&why)) GTEST_SKIP() << why;
  test::ScratchDir w("dpo_blas_");
  const std::string pref = preferred_openblas_core(detect_cpu());
  const CliResult r = test::run_cli("/usr/bin/env", w.dir,
                                    "-u " + std::string(kBlasCoreFixedEnv) + " -u " + kTestCoretypeAsDetectedEnv +
                                        " OPENBLAS_CORETYPE=Prescott " + q(kDpoBinary) + tiny_bench(w / "b.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("warning: OPENBLAS_CORETYPE=Prescott is set"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("OPENBLAS_CORETYPE=" + pref), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("restarting"), std::string::npos) << r.err;
  const json k = json::parse(test::slurp(w / "b.json"))["cpu_kernels"];
  EXPECT_EQ(k["blas_core"], "Prescott");
  EXPECT_EQ(k["core_origin"], "OPENBLAS_CORETYPE=Prescott (user)");
  EXPECT_EQ(k["core_fit"], "below_cpu");
}

// `dpo train` prints the kernel set in its log header and stores it in the trainer state; resuming under another
// kernel set warns naming both.
TEST(BlasKernels, TrainerStateRecordsTheKernelSetAndResumeWarnsOnAnother) {
  test::ScratchDir w("dpo_blas_");
  test::write_tiny_fixture(w.dir.string(), 8);
  const std::string args = " model=" + q(w / "base") + " train_file=" + q(w / "pref.jsonl") + " out_dir=" +
                           q(w / "run") + " ref_cache_dir=" + q(w / "cache") +
                           " max_length=24 max_prompt_length=8 per_device_train_batch_size=4 max_steps=2 seed=7"
                           " --plain";
  const CliResult r = test::run_cli(kDpoBinary, w.dir, "train" + args);
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string id = current_kernel_set().id();
  EXPECT_NE(r.err.find("cpu kernels: " + id), std::string::npos) << r.err;

  const std::string ck = w / "run/checkpoints/step-2";
  json st = json::parse(test::slurp(ck + "/trainer_state.json"));
  ASSERT_TRUE(st.contains("cpu_kernels")) << st.dump(2);
  EXPECT_EQ(st["cpu_kernels"]["id"], id);
  EXPECT_EQ(st["cpu_kernels"]["cpu_family"], detect_cpu().family);

  // Same kernels: no warning.
  CliResult again = test::run_cli(kDpoBinary, w.dir, "train" + args + " --resume latest");
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_EQ(again.err.find("CPU GEMM kernels"), std::string::npos) << again.err;

  // A checkpoint from another machine's kernels (its checksums rewritten, as that machine wrote them).
  st["cpu_kernels"]["id"] = "OpenBLAS 0.3.21 core Prescott";
  { std::ofstream(ck + "/trainer_state.json") << st.dump(2) << "\n"; }
  std::vector<std::string> files = {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"};
  if (fs::exists(ck + "/generation_config.json")) files.push_back("generation_config.json");
  write_checksums(ck, files);
  CliResult other = test::run_cli(kDpoBinary, w.dir, "train" + args + " --resume latest");
  ASSERT_EQ(other.code, 0) << other.err;
  EXPECT_NE(other.err.find("warning: the checkpoint was written with CPU GEMM kernels OpenBLAS 0.3.21 core Prescott, "
                           "this run has " + id),
            std::string::npos)
      << other.err;
}

}  // namespace
}  // namespace dpo
