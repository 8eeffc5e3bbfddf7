// Shared main for the tests that run on several ranks (ctest starts them with `mpirun --oversubscribe -np 2`;
// started alone they run on one rank and still pass).
//
// Every rank runs every test; collectives must line up, so a failed assertion on one rank must not let the
// others go on into a different collective and hang. A listener therefore prints the failure with the rank and
// aborts the whole job (MPI_Abort) at the first failure. Only rank 0 keeps gtest's normal output.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "runtime/comm.h"
#include "runtime/rng.h"

namespace dpo::test {

inline Communicator*& world_slot() {
  static Communicator* c = nullptr;
  return c;
}
inline Communicator& world() { return *world_slot(); }

class AbortOnFailure : public ::testing::EmptyTestEventListener {
 public:
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    Communicator& c = world();
    std::fprintf(stderr, "[rank %d of %d] FAILURE %s:%d\n%s\n", c.rank(), c.size(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
    if (c.size() > 1) c.abort(1);
  }
};

// A tiny GPT-2 (byte vocabulary) in dir/base, preference pairs in dir/pref.jsonl (n_pairs), evaluation pairs in
// dir/eval.jsonl (9), SFT examples in dir/sft.jsonl (n_pairs). Same data as tests/test_trainer.cpp.
inline void write_tiny_fixture(const std::string& dir, int n_pairs) {
  auto be = make_cpu_backend(1);
  GPT2Config c;
  c.vocab_size = 257;
  c.max_seq_len = 40;
  c.n_embd = 16;
  c.n_head = 2;
  c.n_layer = 2;
  GPT2 m(*be, c, DType::F32);
  Rng rng(3);
  m.init_random(rng);
  save_gpt2_checkpoint(m, dir + "/base");
  const char* good[] = {"great", "fine", "superb", "lovely"};
  const char* bad[] = {"awful", "dull", "weak", "bad"};
  std::ofstream pref(dir + "/pref.jsonl"), sft(dir + "/sft.jsonl"), ev(dir + "/eval.jsonl");
  for (int i = 0; i < n_pairs; ++i) {
    nlohmann::json j = {{"prompt", "review " + std::to_string(i % 5) + ":"},
                        {"chosen", std::string(" ") + good[i % 4] + (i % 3 ? " film" : "")},
                        {"rejected", std::string(" ") + bad[(i + 1) % 4]}};
    pref << j.dump() << "\n";
    nlohmann::json s = {{"prompt", "review:"}, {"completion", std::string(" ") + (i % 2 ? good : bad)[i % 4]}};
    sft << s.dump() << "\n";
  }
  for (int i = 0; i < 9; ++i) {
    nlohmann::json j = {{"prompt", "opinion " + std::to_string(i % 3) + ":"},
                        {"chosen", std::string(" ") + good[(i + 2) % 4] + " show"},
                        {"rejected", std::string(" ") + bad[i % 4] + (i % 2 ? " plot" : "")}};
    ev << j.dump() << "\n";
  }
}

inline int mpi_test_main(int argc, char** argv) {
  install_terminate_handler();
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<Communicator> comm = make_communicator();
  world_slot() = comm.get();
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (comm->rank() != 0) delete listeners.Release(listeners.default_result_printer());
  listeners.Append(new AbortOnFailure);
  const int rc = RUN_ALL_TESTS();
  comm->barrier();
  world_slot() = nullptr;
  return rc;
}

}  // namespace dpo::test

#define DPO_MPI_TEST_MAIN() \
  int main(int argc, char** argv) { return ::dpo::test::mpi_test_main(argc, argv); }
