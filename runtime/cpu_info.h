// What the CPU can run: vendor, family/model, brand string and the vector extensions that both the CPU reports
// (cpuid) and the operating system has enabled (XCR0, read with xgetbv). An AVX-512 CPU whose OS does not save the
// ZMM registers cannot run AVX-512 code, so each extension below is "usable", not just "present".
//
// decode_cpuid() turns raw cpuid words into a CpuInfo, so that the decoding and everything built on it (the BLAS
// core check, runtime/blas_info.h) can be tested on a table of CPUs this machine is not; detect_cpu() reads this
// machine's words. On a non-x86 machine detect_cpu() returns vendor "unknown" and no extensions.
#pragma once

#include <cstdint>
#include <string>

namespace dpo {

enum class CpuVendor { kIntel, kAmd, kHygon, kOther };

// The widest vector instruction set the usable extensions add up to, in the order the BLAS kernel families need
// them (each level includes the ones before it).
enum class SimdLevel {
  kBaseline,    // x86-64 SSE2 only (or not x86)
  kSse3,        // SSE3 (and possibly SSSE3 / SSE4): OpenBLAS's Prescott .. Nehalem kernels
  kAvx,         // AVX, OS-enabled YMM state
  kAvx2,        // AVX2 + FMA3
  kAvx512,      // AVX-512 F, BW, VL, DQ and CD, OS-enabled ZMM and opmask state
  kAvx512Bf16,  // kAvx512 + AVX512_BF16
  kAmx,         // kAvx512Bf16 + AMX-TILE + AMX-BF16, OS-enabled tile state
};
const char* simd_level_name(SimdLevel l);  // "sse2", "sse3", "avx", "avx2", "avx512", "avx512-bf16", "amx"

// The cpuid words decode_cpuid reads. Leaves a CPU does not have are zero.
struct CpuidWords {
  uint32_t max_leaf = 0;                  // leaf 0 eax
  char vendor[13] = {};                   // leaf 0 ebx, edx, ecx: "GenuineIntel", "AuthenticAMD", ...
  uint32_t l1_eax = 0, l1_ecx = 0, l1_edx = 0;        // leaf 1: signature, features
  uint32_t l7_ebx = 0, l7_ecx = 0, l7_edx = 0;        // leaf 7 sub-leaf 0
  uint32_t l7s1_eax = 0;                  // leaf 7 sub-leaf 1 (AVX512_BF16 is eax bit 5)
  uint64_t xcr0 = 0;                      // xgetbv(0), only meaningful when OSXSAVE (leaf 1 ecx bit 27) is set
  char brand[49] = {};                    // leaves 0x80000002..4
};

struct CpuInfo {
  CpuVendor vendor = CpuVendor::kOther;
  std::string vendor_id = "unknown";      // the cpuid vendor string
  std::string brand;                      // e.g. "AMD EPYC 9654 96-Core Processor" (spaces trimmed)
  int family = 0, model = 0, stepping = 0;  // display family / model (extended fields folded in, as Intel's and
                                            // AMD's manuals define them)
  // Usable (CPU + OS) extensions.
  bool sse3 = false, ssse3 = false, sse4_2 = false;
  bool avx = false, fma = false, avx2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512cd = false;
  bool avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;

  SimdLevel level() const;
  // The usable extensions that matter for GEMM kernels, space-separated: "sse3 ssse3 sse4.2 avx fma avx2 avx512f
  // avx512bw avx512vl avx512dq avx512cd avx512_bf16 amx_tile amx_bf16 amx_int8" (those present).
  std::string features() const;
  // "AMD EPYC (AuthenticAMD family 25 model 17)"
  std::string describe() const;
};

CpuInfo decode_cpuid(const CpuidWords& w);
CpuidWords read_cpuid();  // this machine (all zero and vendor "" off x86)
CpuInfo detect_cpu();     // decode_cpuid(read_cpuid())

}  // namespace dpo
