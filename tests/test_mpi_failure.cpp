// A rank that fails mid-step must take the whole job down promptly: `mpirun -np 2 dpo train` with the trainer's
// test hook (DPO_TEST_FAIL_RANK / DPO_TEST_FAIL_STEP / DPO_TEST_FAIL_MODE, train/trainer.h) must exit non-zero
// within 60 s, never hang; a rank that stops responding (SIGSTOP) ends the job through the MPI collective timeout
// (DPO_MPI_TIMEOUT_S); a SIGTERM on one rank stops every rank after the same step, with a checkpoint that resumes
// to the uninterrupted run's bits. Runs as one ordinary process (ctest label mpi) and starts mpirun itself.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "test_mpi_util.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

struct Workdir : test::ScratchDir {
  Workdir() : ScratchDir("dpo_mpi_fail_") { test::write_tiny_fixture(dir.string(), 16); }
};

struct Launch {
  int exit_code = -1;
  double seconds = 0;
  std::string log;
};

// `env` is prepended to the mpirun command line, `extra` appended to dpo's. `timeout 120` guards the test itself
// against a hang.
Launch launch(const Workdir& w, const std::string& env, const std::string& extra = "") {
  std::ostringstream cmd;
  cmd << "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 " << env
      << " timeout 120 " << DPO_MPIEXEC << " --oversubscribe -np 2 " << DPO_BINARY_DIR << "/dpo train --plain"
      << " model=" << (w / "base") << " train_file=" << (w / "pref.jsonl") << " out_dir=" << (w / "out")
      << " ref_cache_dir=" << (w / "cache") << " max_length=32 max_prompt_length=16 per_device_train_batch_size=2"
      << " gradient_accumulation_steps=2 num_train_epochs=2 num_threads=1 learning_rate=1e-3" << extra
      << " > " << (w / "log.txt") << " 2>&1";
  const auto t0 = std::chrono::steady_clock::now();
  const int st = std::system(cmd.str().c_str());
  Launch r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  std::ifstream f(w / "log.txt");
  r.log = std::string(std::istreambuf_iterator<char>(f), {});
  return r;
}

TEST(MpiFailure, HealthyRunSucceeds) {
  // The control: the same launch without the hook trains to the end (so the failures below are the hook's).
  Workdir w;
  Launch r = launch(w, "");
  EXPECT_EQ(r.exit_code, 0) << r.log;
  EXPECT_TRUE(fs::exists(fs::path(w / "out") / "checkpoints" / "step-8" / "model.safetensors")) << r.log;
  EXPECT_NE(r.log.find("data parallel: 2 ranks (mpi)"), std::string::npos) << r.log;
}

TEST(MpiFailure, RankOneThrowingInStepTwoEndsEveryRank) {
  Workdir w;
  Launch r = launch(w, "DPO_TEST_FAIL_RANK=1 DPO_TEST_FAIL_STEP=2");
  EXPECT_NE(r.exit_code, 0) << r.log;
  EXPECT_NE(r.exit_code, 124) << "timed out (hang):\n" << r.log;
  EXPECT_LT(r.seconds, 60.0) << r.log;
  EXPECT_NE(r.log.find("(rank 1): DPO_TEST_FAIL_RANK=1"), std::string::npos) << r.log;
  EXPECT_FALSE(fs::exists(fs::path(w / "out") / "checkpoints" / "step-8")) << r.log;
}

TEST(MpiFailure, RankZeroThrowingEndsEveryRank) {
  Workdir w;
  Launch r = launch(w, "DPO_TEST_FAIL_RANK=0 DPO_TEST_FAIL_STEP=3");
  EXPECT_NE(r.exit_code, 0) << r.log;
  EXPECT_NE(r.exit_code, 124) << "timed out (hang):\n" << r.log;
  EXPECT_LT(r.seconds, 60.0) << r.log;
  EXPECT_NE(r.log.find("(rank 0): DPO_TEST_FAIL_RANK=0"), std::string::npos) << r.log;
}

TEST(MpiFailure, KilledRankEndsEveryRank) {
  Workdir w;
  Launch r = launch(w, "DPO_TEST_FAIL_RANK=1 DPO_TEST_FAIL_STEP=2 DPO_TEST_FAIL_MODE=kill");
  EXPECT_NE(r.exit_code, 0) << r.log;
  EXPECT_NE(r.exit_code, 124) << "timed out (hang):\n" << r.log;
  EXPECT_LT(r.seconds, 60.0) << r.log;
}

TEST(MpiFailure, StoppedRankEndsEveryRankWithinTheCollectiveTimeout) {
  // Rank 1 SIGSTOPs itself in step 2, before the gradient reduction; rank 0 waits in that reduction. With a 3 s
  // timeout the job must end well within the bound below (start-up and MPI_Abort's clean-up take a few seconds
  // more on a loaded machine), with a message naming the operation and the timeout.
  Workdir w;
  Launch r = launch(w, "DPO_MPI_TIMEOUT_S=3 DPO_TEST_FAIL_RANK=1 DPO_TEST_FAIL_STEP=2 DPO_TEST_FAIL_MODE=stop");
  EXPECT_NE(r.exit_code, 0) << r.log;
  EXPECT_NE(r.exit_code, 124) << "timed out (hang):\n" << r.log;
  EXPECT_LT(r.seconds, 60.0) << r.log;
  EXPECT_NE(r.log.find("(rank 0): collective timeout: MPI_"), std::string::npos) << r.log;
  EXPECT_NE(r.log.find("not complete after 3."), std::string::npos) << r.log;
  EXPECT_NE(r.log.find("(DPO_MPI_TIMEOUT_S=3)"), std::string::npos) << r.log;
}

TEST(MpiFailure, BadTimeoutIsAnInputError) {
  Workdir w;
  Launch r = launch(w, "DPO_MPI_TIMEOUT_S=soon");
  EXPECT_EQ(r.exit_code, 2) << r.log;
  EXPECT_NE(r.log.find("DPO_MPI_TIMEOUT_S: 'soon'"), std::string::npos) << r.log;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST(MpiFailure, SigtermOnOneRankStopsEveryRankAfterTheSameStepAndResumesExactly) {
  Workdir cut;
  // The control, into another out_dir (a later key=value wins).
  Launch a = launch(cut, "", " out_dir=" + (cut / "full"));
  ASSERT_EQ(a.exit_code, 0) << a.log;
  // Only rank 1 gets the signal (in step 3); the stop request travels with that step's metrics reduction.
  Launch r = launch(cut, "DPO_TEST_FAIL_RANK=1 DPO_TEST_FAIL_STEP=3 DPO_TEST_FAIL_MODE=sigterm");
  EXPECT_EQ(r.exit_code, 143) << r.log;
  const fs::path ck = fs::path(cut / "out") / "checkpoints";
  EXPECT_TRUE(fs::exists(ck / "step-3" / "trainer_state.json")) << r.log;
  EXPECT_FALSE(fs::exists(ck / "step-4")) << r.log;
  EXPECT_NE(r.log.find("stopped on SIGTERM after step 3 of 8"), std::string::npos) << r.log;
  Launch b = launch(cut, "", " --resume latest");
  ASSERT_EQ(b.exit_code, 0) << b.log;
  for (const char* f : {"model.safetensors", "optimizer.safetensors"}) {
    const std::string x = read_bytes(fs::path(cut / "full") / "checkpoints" / "step-8" / f);
    ASSERT_FALSE(x.empty()) << f;
    EXPECT_TRUE(x == read_bytes(ck / "step-8" / f)) << f << " differs from the uninterrupted run's";
  }
}

}  // namespace
}  // namespace dpo

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
