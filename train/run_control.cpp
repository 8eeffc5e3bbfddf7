#include "train/run_control.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <regex>

#include "runtime/error.h"

namespace dpo {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free flag");

struct sigaction g_old_int, g_old_term;

void write_stderr(const char* s) {
  const size_t n = std::strlen(s);
  ssize_t r = ::write(STDERR_FILENO, s, n);
  (void)r;
}

extern "C" void on_stop_signal(int sig) {
  int expected = 0;
  if (!g_stop_signal.compare_exchange_strong(expected, sig)) {
    // The second signal: the default action, now (it ends the process).
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    std::raise(sig);
    return;
  }
  write_stderr(sig == SIGINT ? "\ndpo: SIGINT received: stopping after the current optimizer step with a checkpoint "
                               "(send it again to stop at once, without one)\n"
                             : "\ndpo: SIGTERM received: stopping after the current optimizer step with a checkpoint "
                               "(send it again to stop at once, without one)\n");
}

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+=.,/:@%") ==
                        std::string::npos)
    return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string host_name() {
  char h[256] = {};
  if (::gethostname(h, sizeof h - 1) != 0) return "?";
  return h;
}

}  // namespace

StopSignals::StopSignals() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // file I/O in progress is not cut short by the first signal
  if (sigaction(SIGINT, &sa, &g_old_int) != 0 || sigaction(SIGTERM, &sa, &g_old_term) != 0)
    throw Error(std::string("sigaction failed: ") + std::strerror(errno));
}

StopSignals::~StopSignals() {
  sigaction(SIGINT, &g_old_int, nullptr);
  sigaction(SIGTERM, &g_old_term, nullptr);
}

int StopSignals::pending() { return g_stop_signal.load(); }
void StopSignals::clear() { g_stop_signal.store(0); }
void StopSignals::request(int sig) {
  int expected = 0;
  g_stop_signal.compare_exchange_strong(expected, sig);
}

std::string resume_command(const std::string& subcommand, const std::string& checkpoint) {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> args;
  std::string a;
  while (f && std::getline(f, a, '\0')) args.push_back(a);
  // Only a `dpo <subcommand> ...` command line is rewritten (not a test binary or another program).
  bool ours = args.size() >= 2 && args[1] == subcommand;
  if (!ours) return "dpo " + subcommand + " --config <your config> --resume " + shell_quote(checkpoint);
  std::string cmd;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--resume") {
      ++i;  // and its value
      continue;
    }
    if (args[i].rfind("--resume=", 0) == 0) continue;
    cmd += (cmd.empty() ? "" : " ") + shell_quote(args[i]);
  }
  return cmd + " --resume " + shell_quote(checkpoint);
}

OutDirLock::OutDirLock(const std::string& out_dir, const std::string& what)
    : path_((fs::path(out_dir) / "dpo.lock").string()) {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw InputError(what + ": cannot create the lock file " + path_ + ": " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string holder;
    if (err == EWOULDBLOCK) {
      char buf[512] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      if (n > 0) holder = std::string(buf, static_cast<size_t>(n));
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    }
    ::close(fd_);
    fd_ = -1;
    if (err != EWOULDBLOCK)
      throw InputError(what + ": cannot lock " + path_ + ": " + std::strerror(err));
    throw InputError(what + ": " + out_dir + " is in use by another run (" +
                     (holder.empty() ? std::string("holder unknown") : holder) + "; lock file " + path_ +
                     "): two runs must not write the same out_dir; wait for that run to end or choose another out_dir");
  }
  // Record the holder for the message above (best effort: the lock itself is what counts).
  char when[64] = {};
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  if (localtime_r(&t, &tm)) std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  const std::string rec = "pid " + std::to_string(::getpid()) + " on host " + host_name() + ", started " + when + "\n";
  if (::ftruncate(fd_, 0) == 0) {
    ssize_t r = ::pwrite(fd_, rec.data(), rec.size(), 0);
    (void)r;
  }
}

OutDirLock::~OutDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the only descriptor releases the flock
}

std::vector<std::string> remove_stale_temporaries(const std::string& out_dir) {
  static const std::regex kTempFile(
      R"((config\.yaml|metrics\.jsonl|latest|[A-Za-z0-9_-]+\.json|[A-Za-z0-9_-]+\.safetensors)\.tmp\.[0-9]+)");
  static const std::regex kStagingDir(R"(\.step-[0-9]+\.tmp-[0-9]+)");
  std::vector<std::string> removed;
  const fs::path root(out_dir);
  for (const fs::path& dir : {root, root / "checkpoints"}) {
    std::error_code ec;
    if (!fs::is_directory(fs::symlink_status(dir, ec))) continue;  // absent, or a link: left alone
    std::vector<fs::path> victims;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string n = e.path().filename().string();
      const fs::file_status st = e.symlink_status(ec);
      if (fs::is_regular_file(st) && std::regex_match(n, kTempFile)) victims.push_back(e.path());
      else if (dir != root && fs::is_directory(st) && std::regex_match(n, kStagingDir)) victims.push_back(e.path());
    }
    for (const fs::path& v : victims) {
      std::error_code rc;
      fs::remove_all(v, rc);  // remove_all does not follow symbolic links inside the directory
      if (!rc) removed.push_back(v.string());
    }
  }
  return removed;
}

}  // namespace dpo
