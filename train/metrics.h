// Training metrics: <out_dir>/metrics.jsonl (one JSON object per logged step, TRL's metric names) and a progress
// display on the terminal: a live single line (step, loss, accuracy, tokens/s, ETA) when stderr is a terminal,
// plain lines otherwise (logs, CI, pipes).
#pragma once

#include <chrono>
#include <cstdio>
#include <map>
#include <string>

namespace dpo {

class MetricsLog {
 public:
  // Appends when `append` (resume), else truncates. Each record is flushed when written, so a crash loses at
  // most the line being written.
  MetricsLog(const std::string& path, bool append);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  // Keys are written in insertion order of the map (sorted by name); `step` is added first.
  void write(int64_t step, const std::map<std::string, double>& values);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

class Progress {
 public:
  Progress(std::string label, int64_t total_steps, bool force_plain = false);
  // Called after every optimizer step; prints a line every `every` steps in plain mode, always in live mode.
  void update(int64_t step, double loss, double accuracy, double tokens_per_second, int64_t every);
  void message(const std::string& text);  // a full line that does not disturb the live line
  void finish();

 private:
  std::string label_;
  int64_t total_;
  bool live_;
  bool line_open_ = false;
  std::chrono::steady_clock::time_point start_;
  int64_t start_step_ = -1;
};

}  // namespace dpo
