// KernelStats, name shortening and the text table (runtime/kernel_trace.h): plain C++, built everywhere. The CUPTI
// collector and the capture range live in runtime/cuda/kernel_trace.cpp; a build without CUDA gets the stubs at the
// end of this file.
#include "runtime/kernel_trace.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace dpo {

void KernelStats::add(GpuActivityKind kind, std::string_view name, uint64_t start_ns, uint64_t end_ns,
                      uint64_t bytes) {
  if ((start_ns == 0 && end_ns == 0) || end_ns < start_ns) {
    ++untimed_;
    return;
  }
  auto it = acc_.find(name);
  if (it == acc_.end()) {
    it = acc_.emplace(std::string(name), Acc{}).first;
    it->second.kind = kind;
  }
  Acc& a = it->second;
  a.calls += 1;
  a.total_ns += end_ns - start_ns;
  a.bytes += bytes;
}

KernelTable KernelStats::table() const {
  KernelTable t;
  std::vector<std::pair<uint64_t, KernelTableRow>> rows;  // (total_ns, row): sorted on the exact integer
  uint64_t total_ns = 0, kernel_ns = 0;
  for (const auto& [key, a] : acc_) {
    KernelTableRow r;
    r.kind = a.kind;
    if (a.kind == GpuActivityKind::Kernel) {
      r.full_name = demangle_kernel_name(key);
      r.name = shorten_kernel_name(key);
      kernel_ns += a.total_ns;
    } else {
      r.full_name = r.name = key;
    }
    r.calls = a.calls;
    r.total_ms = static_cast<double>(a.total_ns) * 1e-6;
    r.mean_us = static_cast<double>(a.total_ns) * 1e-3 / static_cast<double>(a.calls);
    r.bytes = a.bytes;
    total_ns += a.total_ns;
    t.records += a.calls;
    rows.emplace_back(a.total_ns, std::move(r));
  }
  std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) {
    if (x.first != y.first) return x.first > y.first;
    if (x.second.name != y.second.name) return x.second.name < y.second.name;
    return x.second.full_name < y.second.full_name;
  });
  for (auto& [ns, r] : rows) {
    r.share = total_ns > 0 ? static_cast<double>(ns) / static_cast<double>(total_ns) : 0.0;
    t.rows.push_back(std::move(r));
  }
  t.total_ms = static_cast<double>(total_ns) * 1e-6;
  t.kernel_ms = static_cast<double>(kernel_ns) * 1e-6;
  t.untimed_records = untimed_;
  t.dropped_records = dropped_;
  t.warnings = warnings_;
  if (untimed_ > 0)
    t.warnings.push_back(std::to_string(untimed_) +
                         " activities had no timestamps (CUPTI could not time them) and are left out");
  if (dropped_ > 0)
    t.warnings.push_back(std::to_string(dropped_) +
                         " activities were dropped by CUPTI (no buffer space); the table is incomplete");
  return t;
}

std::string demangle_kernel_name(const std::string& raw) {
  if (raw.rfind("_Z", 0) != 0) return raw;
  int status = 0;
  char* d = abi::__cxa_demangle(raw.c_str(), nullptr, nullptr, &status);
  if (status != 0 || d == nullptr) {
    std::free(d);
    return raw;
  }
  std::string out(d);
  std::free(d);
  return out;
}

namespace {

bool ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

// Drops every "X::" qualifier: "(anonymous namespace)::", identifiers, and class templates "Outer<...>::".
std::string drop_qualifiers(const std::string& s) {
  static const std::string kAnon = "(anonymous namespace)::";
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (s.compare(i, kAnon.size(), kAnon) == 0) {
      i += kAnon.size();
      continue;
    }
    if (s.compare(i, 2, "::") == 0) {
      // Remove the qualifier just written: a balanced <...> (a class template's arguments), then the identifier.
      if (!out.empty() && out.back() == '>') {
        int depth = 0;
        while (!out.empty()) {
          const char c = out.back();
          out.pop_back();
          if (c == '>') ++depth;
          else if (c == '<' && --depth == 0) break;
        }
      }
      while (!out.empty() && ident_char(out.back())) out.pop_back();
      i += 2;
      continue;
    }
    out += s[i++];
  }
  return out;
}

}  // namespace

std::string shorten_kernel_name(const std::string& raw, size_t max_len) {
  std::string s = demangle_kernel_name(raw);
  while (!s.empty() && s.back() == ' ') s.pop_back();
  // The parameter list: the balanced "(...)" at the end. Template arguments may hold parentheses too ("(Op)1"),
  // but they sit before it.
  if (s.size() > 1 && s.back() == ')') {
    int depth = 0;
    for (size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') {
        ++depth;
      } else if (s[i] == '(' && --depth == 0) {
        if (i > 0) s.erase(i);
        break;
      }
    }
  }
  // The return type ("void "): everything up to the last space outside <>, () and [].
  {
    int depth = 0;
    size_t cut = std::string::npos;
    for (size_t i = 0; i < s.size(); ++i) {
      const char c = s[i];
      if (c == '<' || c == '(' || c == '[') ++depth;
      else if ((c == '>' || c == ')' || c == ']') && depth > 0) --depth;
      else if (c == ' ' && depth == 0) cut = i;
    }
    if (cut != std::string::npos && cut + 1 < s.size()) s.erase(0, cut + 1);
  }
  s = drop_qualifiers(s);
  for (size_t p; (p = s.find("> >")) != std::string::npos;) s.erase(p + 1, 1);  // the demangler's "> >"
  static const std::string kBf16 = "__nv_bfloat16";
  for (size_t p; (p = s.find(kBf16)) != std::string::npos;) s.replace(p, kBf16.size(), "bf16");
  if (s.empty()) s = raw;
  if (s.size() > max_len) {
    if (max_len > 3) s = s.substr(0, max_len - 3) + "...";
    else s = s.substr(0, max_len);
  }
  return s;
}

std::string format_kernel_table(const KernelTable& t, size_t max_rows, int64_t per) {
  std::ostringstream s;
  char b[512];
  std::snprintf(b, sizeof b,
                "  GPU time by kernel (CUPTI activity records): %lld activities, %.3f ms GPU time, %.3f ms in kernels\n",
                static_cast<long long>(t.records), t.total_ms, t.kernel_ms);
  s << b;
  if (per > 0)
    std::snprintf(b, sizeof b, "    %7s %7s %11s %10s %8s %10s  %s\n", "share", "cum.", "total ms", "ms/step", "calls",
                  "mean us", "name");
  else
    std::snprintf(b, sizeof b, "    %7s %7s %11s %8s %10s  %s\n", "share", "cum.", "total ms", "calls", "mean us",
                  "name");
  s << b;
  double cum = 0;
  const size_t shown = std::min(max_rows, t.rows.size());
  for (size_t i = 0; i < shown; ++i) {
    const KernelTableRow& r = t.rows[i];
    cum += r.share;
    if (per > 0)
      std::snprintf(b, sizeof b, "    %6.2f%% %6.2f%% %11.3f %10.3f %8lld %10.2f  %s\n", 100 * r.share, 100 * cum,
                    r.total_ms, r.total_ms / static_cast<double>(per), static_cast<long long>(r.calls), r.mean_us,
                    r.name.c_str());
    else
      std::snprintf(b, sizeof b, "    %6.2f%% %6.2f%% %11.3f %8lld %10.2f  %s\n", 100 * r.share, 100 * cum, r.total_ms,
                    static_cast<long long>(r.calls), r.mean_us, r.name.c_str());
    s << b;
  }
  if (shown < t.rows.size()) {
    double ms = 0, share = 0;
    int64_t calls = 0;
    for (size_t i = shown; i < t.rows.size(); ++i) {
      ms += t.rows[i].total_ms;
      share += t.rows[i].share;
      calls += t.rows[i].calls;
    }
    std::snprintf(b, sizeof b, "    %6.2f%% %7s %11.3f %8lld calls in %zu more rows\n", 100 * share, "", ms,
                  static_cast<long long>(calls), t.rows.size() - shown);
    s << b;
  }
  if (t.rows.empty()) s << "    (no GPU activity recorded)\n";
  for (const auto& w : t.warnings) s << "  warning: " << w << "\n";
  return s.str();
}

#ifndef DPO_HAVE_CUDA
// A build without CUDA: nothing to trace, no profiler to tell.
bool KernelTrace::built(std::string* why_not) {
  if (why_not)
    *why_not = "this build has no CUDA backend (nvcc was not found at configure time); per-kernel GPU times need "
               "--device cuda and a CUDA build with CUPTI";
  return false;
}
KernelTrace::~KernelTrace() = default;
std::string KernelTrace::start() {
  std::string why;
  built(&why);
  return why;
}
KernelTable KernelTrace::stop() { return {}; }
void profiler_capture_start() {}
void profiler_capture_stop() {}
#endif

}  // namespace dpo
