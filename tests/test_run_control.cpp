// How a run stops and who may write its out_dir (train/run_control.h, docs/training.md "How a run stops"):
// SIGTERM to a `dpo train` process mid-run gives a checkpoint at that step, exit status 143 and a resume command
// that continues to the same bits as an uninterrupted run; a second signal ends the process at once; a second run
// on a held out_dir exits 2 naming it and the holder, and a kill -9 of the holder frees it; temporaries of killed
// writers are removed at start.
//
// The child processes are the built `dpo` binary. To signal one at a known step, the trainer's test hook
// (DPO_TEST_FAIL_MODE=stop, train/trainer.h) makes it SIGSTOP itself inside that step; the test waits (waitpid
// WUNTRACED) until it is stopped, sends its signals, then SIGCONT. No sleeps: every wait polls with a generous bound.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "runtime/error.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/run_control.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

constexpr double kBoundS = 180;  // longest any child may take (a loaded 2-core machine; a run takes ~1-5 s)

struct Workdir : test::ScratchDir {
  Workdir() : ScratchDir("dpo_run_control_") { test::write_tiny_fixture(dir.string(), 16); }
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// `dpo train` on the tiny fixture: 16 pairs, 4 per step, 2 epochs = 8 optimizer steps, save_steps 0.
std::vector<std::string> train_args(const Workdir& w, const std::string& out) {
  return {std::string(DPO_BINARY_DIR) + "/dpo", "train", "--plain", "model=" + (w / "base"),
          "train_file=" + (w / "pref.jsonl"), "out_dir=" + (w / out), "ref_cache_dir=" + (w / "cache"),
          "max_length=32", "max_prompt_length=16", "per_device_train_batch_size=2", "gradient_accumulation_steps=2",
          "num_train_epochs=2", "num_threads=1", "learning_rate=1e-3", "logging_steps=1"};
}

// A child process running `args` with `env` added, stdout and stderr into `log`.
struct Child {
  pid_t pid = -1;
  std::string log;
  ~Child() {
    if (pid > 0) {  // a failed test: never leave a process behind
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

void spawn(Child& c, const std::vector<std::string>& args, const std::vector<std::string>& env,
           const std::string& log) {
  c.log = log;
  c.pid = ::fork();
  ASSERT_GE(c.pid, 0) << "fork failed";
  if (c.pid == 0) {
    for (const std::string& e : env) ::putenv(const_cast<char*>(e.c_str()));
    ::setenv("OMP_NUM_THREADS", "1", 1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) ::_exit(126);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
}

// Polls until the child stops (stopped = true) or ends; returns the waitpid status. Fails after kBoundS.
int wait_child(Child& c, bool until_stopped) {
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    int st = 0;
    const pid_t r = ::waitpid(c.pid, &st, WNOHANG | (until_stopped ? WUNTRACED : 0));
    if (r == c.pid) {
      if (!WIFSTOPPED(st)) c.pid = -1;  // reaped
      return st;
    }
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > kBoundS) {
      ADD_FAILURE() << "child " << c.pid << " did not " << (until_stopped ? "stop" : "end") << " within " << kBoundS
                    << " s; log:\n"
                    << read_all(c.log);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string exit_text(int st) {
  if (WIFEXITED(st)) return "exit " + std::to_string(WEXITSTATUS(st));
  if (WIFSIGNALED(st)) return "signal " + std::to_string(WTERMSIG(st));
  return "status " + std::to_string(st);
}

// Runs to the end; returns the waitpid status.
int run(const std::vector<std::string>& args, const std::string& log, const std::vector<std::string>& env = {}) {
  Child c;
  spawn(c, args, env, log);
  return wait_child(c, false);
}

// A child that has stopped itself inside optimizer step `step` (the hook), holding out_dir's lock.
void spawn_stopped_in_step(Child& c, const std::vector<std::string>& args, int step, const std::string& log) {
  spawn(c, args, {"DPO_TEST_FAIL_RANK=0", "DPO_TEST_FAIL_STEP=" + std::to_string(step), "DPO_TEST_FAIL_MODE=stop"},
        log);
  const int st = wait_child(c, true);
  ASSERT_TRUE(WIFSTOPPED(st)) << exit_text(st) << "\n" << read_all(log);
}

TEST(RunControl, SigtermMidRunCheckpointsThatStepAndItsResumeCommandMatchesAnUninterruptedRun) {
  Workdir w;
  // The control: 8 steps without a stop.
  ASSERT_EQ(run(train_args(w, "full"), w / "full.log"), 0) << read_all(w / "full.log");
  const fs::path full = w.dir / "full" / "checkpoints" / "step-8";

  // SIGTERM from another process while the run is inside step 3.
  Child c;
  spawn_stopped_in_step(c, train_args(w, "cut"), 3, w / "cut.log");
  ASSERT_EQ(::kill(c.pid, SIGTERM), 0);
  ASSERT_EQ(::kill(c.pid, SIGCONT), 0);
  const int st = wait_child(c, false);
  const std::string log = read_all(w / "cut.log");
  ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 143) << exit_text(st) << "\n" << log;  // 128 + SIGTERM
  const fs::path ckpts = w.dir / "cut" / "checkpoints";
  EXPECT_TRUE(fs::exists(ckpts / "step-3" / "trainer_state.json")) << log;
  EXPECT_FALSE(fs::exists(ckpts / "step-4")) << log;
  EXPECT_EQ(read_all((ckpts / "latest").string()), "step-3\n");
  EXPECT_NE(log.find("SIGTERM received"), std::string::npos) << log;
  EXPECT_NE(log.find("stopped on SIGTERM after step 3 of 8"), std::string::npos) << log;

  // The printed command, run as printed, continues to step 8.
  const std::string marker = "to continue this run";
  const size_t at = log.find(marker);
  ASSERT_NE(at, std::string::npos) << log;
  const size_t b = log.find('\n', at) + 1, e = log.find('\n', b);
  std::string cmd = log.substr(b, e - b);
  while (!cmd.empty() && cmd.front() == ' ') cmd.erase(0, 1);
  EXPECT_NE(cmd.find("--resume " + (ckpts / "step-3").string()), std::string::npos) << cmd;
  ASSERT_EQ(run({"/bin/sh", "-c", cmd}, w / "resume.log"), 0) << cmd << "\n" << read_all(w / "resume.log");
  for (const char* f : {"model.safetensors", "optimizer.safetensors"}) {
    const std::string a = read_all((full / f).string()), r = read_all((ckpts / "step-8" / f).string());
    ASSERT_FALSE(a.empty()) << f;
    EXPECT_TRUE(a == r) << f << " after the stop and resume differs from the uninterrupted run's";
  }
}

TEST(RunControl, SecondSignalStopsAtOnceWithoutACheckpoint) {
  Workdir w;
  Child c;
  spawn_stopped_in_step(c, train_args(w, "out"), 3, w / "out.log");
  // Both pending while it is stopped: on SIGCONT the first sets the stop flag, the second ends the process.
  ASSERT_EQ(::kill(c.pid, SIGINT), 0);
  ASSERT_EQ(::kill(c.pid, SIGTERM), 0);
  ASSERT_EQ(::kill(c.pid, SIGCONT), 0);
  const int st = wait_child(c, false);
  const std::string log = read_all(w / "out.log");
  ASSERT_TRUE(WIFSIGNALED(st) && (WTERMSIG(st) == SIGINT || WTERMSIG(st) == SIGTERM)) << exit_text(st) << "\n" << log;
  EXPECT_FALSE(fs::exists(w.dir / "out" / "checkpoints" / "step-3")) << log;
  EXPECT_EQ(log.find("stopped on"), std::string::npos) << log;
}

TEST(RunControl, SecondRunOnAHeldOutDirExits2NamingItAndTheHolderAndKill9FreesIt) {
  Workdir w;
  Child holder;
  spawn_stopped_in_step(holder, train_args(w, "out"), 2, w / "holder.log");
  const int st = run(train_args(w, "out"), w / "second.log");
  const std::string log = read_all(w / "second.log");
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 2) << exit_text(st) << "\n" << log;
  EXPECT_NE(log.find((w.dir / "out").string() + " is in use by another run"), std::string::npos) << log;
  EXPECT_NE(log.find("pid " + std::to_string(holder.pid) + " on host "), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(w.dir / "out" / "checkpoints" / "step-8")) << log;

  // kill -9 of the holder: the kernel drops its lock; the next run proceeds (and finishes).
  ASSERT_EQ(::kill(holder.pid, SIGKILL), 0);
  const int hs = wait_child(holder, false);
  EXPECT_TRUE(WIFSIGNALED(hs) && WTERMSIG(hs) == SIGKILL) << exit_text(hs);
  const int st3 = run(train_args(w, "out"), w / "third.log");
  EXPECT_EQ(st3, 0) << exit_text(st3) << "\n" << read_all(w / "third.log");
  EXPECT_TRUE(fs::exists(w.dir / "out" / "checkpoints" / "step-8" / "model.safetensors"));
}

TEST(RunControl, LockInOneProcessIsExclusiveAndReleasedOnDestruction) {
  test::ScratchDir d("dpo_lock_");
  {
    OutDirLock a(d.dir.string());
    try {
      OutDirLock b(d.dir.string());
      ADD_FAILURE() << "a second lock on the same out_dir was granted";
    } catch (const InputError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("key 'out_dir': " + d.dir.string() + " is in use"), std::string::npos) << m;
      EXPECT_NE(m.find("pid " + std::to_string(::getpid())), std::string::npos) << m;
    }
  }
  OutDirLock again(d.dir.string());  // released with `a`
  EXPECT_TRUE(fs::exists(d.dir / "dpo.lock"));
}

// What remove_stale_temporaries takes and leaves.
struct StaleFiles {
  std::vector<fs::path> stale, kept;
  fs::path outside;
  explicit StaleFiles(const fs::path& out, const fs::path& elsewhere) {
    fs::create_directories(out / "checkpoints" / ".step-2.tmp-99999");
    auto touch = [](const fs::path& p) { std::ofstream(p) << "x"; };
    touch(out / "checkpoints" / ".step-2.tmp-99999" / "model.safetensors.tmp.99999");
    stale = {out / "checkpoints" / ".step-2.tmp-99999", out / "config.yaml.tmp.4242", out / "metrics.jsonl.tmp.17",
             out / "checkpoints" / "latest.tmp.5", out / "eval_metrics.json.tmp.8"};
    for (size_t i = 1; i < stale.size(); ++i) touch(stale[i]);
    // Not ours, or not a temporary of ours: kept.
    fs::create_directories(out / "checkpoints" / ".step-2.tmp-x");
    fs::create_directories(out / "notes.tmp.3");
    kept = {out / "notes.txt", out / "config.yaml.tmp.abc", out / "checkpoints" / ".step-2.tmp-x",
            out / "notes.tmp.3", out / "config.yaml"};
    for (const fs::path& p : {kept[0], kept[1], kept[4]}) touch(p);
    // A link with a temporary's name is not followed or removed; its target is outside out_dir.
    outside = elsewhere / "precious.json";
    touch(outside);
    fs::create_symlink(outside, out / "metrics.jsonl.tmp.77");
    kept.push_back(out / "metrics.jsonl.tmp.77");
  }
  void check() const {
    for (const fs::path& p : stale) EXPECT_FALSE(fs::exists(fs::symlink_status(p))) << p << " was not removed";
    for (const fs::path& p : kept) EXPECT_TRUE(fs::exists(fs::symlink_status(p))) << p << " was removed";
    EXPECT_EQ(read_all(outside.string()), "x");
  }
};

TEST(RunControl, RemovesOnlyTheWritersTemporaries) {
  test::ScratchDir d("dpo_stale_");
  StaleFiles s(d.dir / "out", d.dir);
  const std::vector<std::string> removed = remove_stale_temporaries((d.dir / "out").string());
  EXPECT_EQ(removed.size(), s.stale.size());
  s.check();
  EXPECT_TRUE(remove_stale_temporaries((d.dir / "absent").string()).empty());
}

TEST(RunControl, TrainingRemovesStaleTemporariesAtStart) {
  Workdir w;
  StaleFiles s(w.dir / "out", w.dir);
  const int st = run(train_args(w, "out"), w / "out.log");
  const std::string log = read_all(w / "out.log");
  ASSERT_EQ(st, 0) << exit_text(st) << "\n" << log;
  s.check();
  EXPECT_NE(log.find("removed a temporary file of an interrupted earlier run: " +
                     (w.dir / "out" / "checkpoints" / ".step-2.tmp-99999").string()),
            std::string::npos)
      << log;
}

TEST(RunControl, StopFlagKeepsTheFirstSignalAndExitCodesFollowTheShell) {
  StopSignals::clear();
  EXPECT_EQ(StopSignals::pending(), 0);
  StopSignals::request(SIGTERM);
  StopSignals::request(SIGINT);
  EXPECT_EQ(StopSignals::pending(), SIGTERM);
  StopSignals::clear();
  EXPECT_EQ(stop_exit_code(SIGINT), 130);
  EXPECT_EQ(stop_exit_code(SIGTERM), 143);
  // This test binary is not `dpo train`: the generic form, with the path quoted for a shell.
  EXPECT_EQ(resume_command("train", "/o ut/step-3"), "dpo train --config <your config> --resume '/o ut/step-3'");
}

}  // namespace
}  // namespace dpo
