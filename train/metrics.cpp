#include "train/metrics.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace dpo {

MetricsLog::MetricsLog(const std::string& path, bool append) : path_(path) {
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) throw Error("cannot open " + path + ": " + std::strerror(errno));
}

MetricsLog::~MetricsLog() {
  if (f_) std::fclose(f_);
}

void MetricsLog::write(int64_t step, const std::map<std::string, double>& values) {
  nlohmann::ordered_json j;
  j["step"] = step;
  for (const auto& [k, v] : values) {
    if (std::isfinite(v)) j[k] = v;
    else j[k] = nullptr;  // JSON has no NaN/inf; null keeps the key visible
  }
  const std::string line = j.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw Error("writing " + path_ + " failed: " + std::strerror(errno));
}

Progress::Progress(std::string label, int64_t total_steps, bool force_plain)
    : label_(std::move(label)), total_(total_steps), live_(!force_plain && ::isatty(STDERR_FILENO)),
      start_(std::chrono::steady_clock::now()) {}

static std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

void Progress::update(int64_t step, double loss, double accuracy, double tps, int64_t every) {
  if (start_step_ < 0) {
    start_step_ = step - 1;
    start_ = std::chrono::steady_clock::now();
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double per_step = elapsed / static_cast<double>(std::max<int64_t>(1, step - start_step_));
  const double eta = per_step * static_cast<double>(total_ - step);
  char buf[256];
  char acc[32] = "";
  if (std::isfinite(accuracy)) std::snprintf(acc, sizeof acc, "  acc %.3f", accuracy);  // DPO only
  std::snprintf(buf, sizeof buf, "%s step %lld/%lld  loss %.4f%s  %.0f tok/s  ETA %s", label_.c_str(),
                static_cast<long long>(step), static_cast<long long>(total_), loss, acc, tps,
                fmt_duration(eta).c_str());
  if (live_) {
    std::fprintf(stderr, "\r\033[K%s", buf);
    line_open_ = true;
  } else if (step % every == 0 || step == total_) {
    std::fprintf(stderr, "%s\n", buf);
  }
  std::fflush(stderr);
}

void Progress::message(const std::string& text) {
  if (live_ && line_open_) std::fprintf(stderr, "\r\033[K");
  std::fprintf(stderr, "%s\n", text.c_str());
  line_open_ = false;
  std::fflush(stderr);
}

void Progress::finish() {
  if (live_ && line_open_) std::fprintf(stderr, "\n");
  line_open_ = false;
}

}  // namespace dpo
