// How a training run starts and stops cleanly (docs/training.md, "How a run stops").
//
// StopSignals   SIGINT and SIGTERM only set a flag; the trainer finishes the optimizer step in progress, writes a
//               checkpoint and returns with RunSummary::stop_signal set (`dpo` exits 128 + the signal number:
//               130 for SIGINT, 143 for SIGTERM). A second signal restores the default action and re-raises it,
//               which ends the process at once.
// OutDirLock    one writer per out_dir: an advisory flock(2) on out_dir/dpo.lock, which records the holder's pid,
//               host and start time. The kernel releases it when the process ends in any way (kill -9 included).
// remove_stale_temporaries
//               deletes the temporary files and directories that an earlier, killed run's writers left in out_dir.
#pragma once

#include <string>
#include <vector>

namespace dpo {

// While an instance lives, SIGINT and SIGTERM set the stop flag (the previous handlers come back when it is
// destroyed). The first signal also writes one line to stderr (async-signal-safe write(2)). Not nested.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The first stop signal received since the last clear() (SIGINT or SIGTERM), or 0.
  static int pending();
  // Forgets a received signal (tests; a run starts with a clear flag).
  static void clear();
  // Sets the flag as a delivered `sig` would, without a signal (tests).
  static void request(int sig);
};

// The exit status of a run stopped by `sig`: 128 + sig (the shell's convention: 130 SIGINT, 143 SIGTERM).
inline int stop_exit_code(int sig) { return 128 + sig; }

// The command that continues this process's run from `checkpoint`: this process's own command line
// (/proc/self/cmdline) with any --resume option replaced by `--resume <checkpoint>`, shell-quoted; where the
// command line cannot be read, `dpo <subcommand> --config <your config> --resume <checkpoint>`.
std::string resume_command(const std::string& subcommand, const std::string& checkpoint);

// Takes the exclusive advisory lock on <out_dir>/dpo.lock (creating the file; out_dir must exist) without waiting.
// Throws dpo::InputError naming `what` (the key or flag that chose out_dir), out_dir and the holder recorded in the
// file when another process holds it. Training runs and `dpo eval --out-dir` take it.
class OutDirLock {
 public:
  explicit OutDirLock(const std::string& out_dir, const std::string& what = "key 'out_dir'");
  ~OutDirLock();  // releases the lock (the file stays: removing it would race with a process about to lock it)
  OutDirLock(const OutDirLock&) = delete;
  OutDirLock& operator=(const OutDirLock&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

// Removes what an interrupted writer of an earlier run left in out_dir (call with the lock held): files named
// <name>.tmp.<digits> (write_file_atomic, save_safetensors) directly in out_dir or out_dir/checkpoints, for the
// names the trainer writes there (config.yaml, metrics.jsonl, latest, *.json, *.safetensors), and checkpoint
// staging directories checkpoints/.step-<digits>.tmp-<digits>. Nothing else, and never through a symbolic link.
// Returns the removed paths.
std::vector<std::string> remove_stale_temporaries(const std::string& out_dir);

}  // namespace dpo
