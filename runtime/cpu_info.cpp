// cpuid decoding. Bit positions: Intel SDM vol. 2A, CPUID (leaf 1 ECX/EDX, leaf 7 sub-leaves 0 and 1) and vol. 1
// ch. 13 (XCR0 state components); AMD APM vol. 3, appendix E (the same bits for the features both vendors have).
#include "runtime/cpu_info.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace dpo {

namespace {

bool bit(uint64_t v, int b) { return ((v >> b) & 1u) != 0; }

// XCR0 state components the OS must save for a register file to be usable.
constexpr uint64_t kXcr0Avx = (1u << 1) | (1u << 2);                       // SSE + AVX (YMM upper halves)
constexpr uint64_t kXcr0Avx512 = kXcr0Avx | (1u << 5) | (1u << 6) | (1u << 7);  // + opmask, ZMM0-15 upper, ZMM16-31
constexpr uint64_t kXcr0Amx = (1u << 17) | (1u << 18);                     // XTILECFG + XTILEDATA

std::string trim(const char* s) {
  std::string r(s);
  const auto b = r.find_first_not_of(' ');
  if (b == std::string::npos) return "";
  return r.substr(b, r.find_last_not_of(' ') - b + 1);
}

}  // namespace

const char* simd_level_name(SimdLevel l) {
  switch (l) {
    case SimdLevel::kBaseline: return "sse2";
    case SimdLevel::kSse3: return "sse3";
    case SimdLevel::kAvx: return "avx";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx512Bf16: return "avx512-bf16";
    case SimdLevel::kAmx: return "amx";
  }
  return "?";
}

CpuInfo decode_cpuid(const CpuidWords& w) {
  CpuInfo c;
  c.vendor_id = w.vendor[0] ? std::string(w.vendor) : "unknown";
  if (c.vendor_id == "GenuineIntel") c.vendor = CpuVendor::kIntel;
  else if (c.vendor_id == "AuthenticAMD") c.vendor = CpuVendor::kAmd;
  else if (c.vendor_id == "HygonGenuine") c.vendor = CpuVendor::kHygon;
  c.brand = trim(w.brand);
  if (w.max_leaf < 1) return c;

  const int base_family = static_cast<int>((w.l1_eax >> 8) & 0xf);
  const int base_model = static_cast<int>((w.l1_eax >> 4) & 0xf);
  c.stepping = static_cast<int>(w.l1_eax & 0xf);
  c.family = base_family == 0xf ? base_family + static_cast<int>((w.l1_eax >> 20) & 0xff) : base_family;
  c.model = (base_family == 0x6 || base_family == 0xf) ? base_model + (static_cast<int>((w.l1_eax >> 16) & 0xf) << 4)
                                                       : base_model;

  c.sse3 = bit(w.l1_ecx, 0);
  c.ssse3 = bit(w.l1_ecx, 9);
  c.sse4_2 = bit(w.l1_ecx, 20);
  const bool osxsave = bit(w.l1_ecx, 27);
  const uint64_t xcr0 = osxsave ? w.xcr0 : 0;
  const bool os_avx = (xcr0 & kXcr0Avx) == kXcr0Avx;
  const bool os_avx512 = (xcr0 & kXcr0Avx512) == kXcr0Avx512;
  const bool os_amx = (xcr0 & kXcr0Amx) == kXcr0Amx;

  c.avx = os_avx && bit(w.l1_ecx, 28);
  c.fma = c.avx && bit(w.l1_ecx, 12);
  if (w.max_leaf >= 7) {
    c.avx2 = c.avx && bit(w.l7_ebx, 5);
    c.avx512f = os_avx512 && bit(w.l7_ebx, 16);
    c.avx512dq = c.avx512f && bit(w.l7_ebx, 17);
    c.avx512cd = c.avx512f && bit(w.l7_ebx, 28);
    c.avx512bw = c.avx512f && bit(w.l7_ebx, 30);
    c.avx512vl = c.avx512f && bit(w.l7_ebx, 31);
    c.avx512_bf16 = c.avx512f && bit(w.l7s1_eax, 5);
    c.amx_bf16 = os_amx && bit(w.l7_edx, 22);
    c.amx_tile = os_amx && bit(w.l7_edx, 24);
    c.amx_int8 = os_amx && bit(w.l7_edx, 25);
  }
  return c;
}

SimdLevel CpuInfo::level() const {
  const bool avx512 = avx512f && avx512bw && avx512vl && avx512dq && avx512cd && avx2 && fma;
  if (avx512 && avx512_bf16 && amx_tile && amx_bf16) return SimdLevel::kAmx;
  if (avx512 && avx512_bf16) return SimdLevel::kAvx512Bf16;
  if (avx512) return SimdLevel::kAvx512;
  if (avx2 && fma) return SimdLevel::kAvx2;
  if (avx) return SimdLevel::kAvx;
  if (sse3) return SimdLevel::kSse3;
  return SimdLevel::kBaseline;
}

std::string CpuInfo::features() const {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (on) s += (s.empty() ? "" : " ") + std::string(name);
  };
  add(sse3, "sse3");
  add(ssse3, "ssse3");
  add(sse4_2, "sse4.2");
  add(avx, "avx");
  add(fma, "fma");
  add(avx2, "avx2");
  add(avx512f, "avx512f");
  add(avx512bw, "avx512bw");
  add(avx512vl, "avx512vl");
  add(avx512dq, "avx512dq");
  add(avx512cd, "avx512cd");
  add(avx512_bf16, "avx512_bf16");
  add(amx_tile, "amx_tile");
  add(amx_bf16, "amx_bf16");
  add(amx_int8, "amx_int8");
  return s;
}

std::string CpuInfo::describe() const {
  return (brand.empty() ? std::string("unknown CPU") : brand) + " (" + vendor_id + " family " +
         std::to_string(family) + " model " + std::to_string(model) + ")";
}

CpuidWords read_cpuid() {
  CpuidWords w;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return w;
  w.max_leaf = a;
  std::memcpy(w.vendor + 0, &b, 4);
  std::memcpy(w.vendor + 4, &d, 4);
  std::memcpy(w.vendor + 8, &c, 4);
  if (w.max_leaf >= 1 && __get_cpuid(1, &a, &b, &c, &d)) {
    w.l1_eax = a;
    w.l1_ecx = c;
    w.l1_edx = d;
  }
  if (w.max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    w.l7_ebx = b;
    w.l7_ecx = c;
    w.l7_edx = d;
    const uint32_t subleaves = a;
    if (subleaves >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      w.l7s1_eax = a;
    }
  }
  if (bit(w.l1_ecx, 27)) {  // OSXSAVE: xgetbv is allowed
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    w.xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  }
  if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
    uint32_t regs[12];
    for (unsigned i = 0; i < 3; ++i) __get_cpuid(0x80000002 + i, &regs[4 * i], &regs[4 * i + 1], &regs[4 * i + 2],
                                                 &regs[4 * i + 3]);
    std::memcpy(w.brand, regs, 48);
    w.brand[48] = 0;
  }
#endif
  return w;
}

CpuInfo detect_cpu() { return decode_cpuid(read_cpuid()); }

}  // namespace dpo
