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
#include "test_fixture.h"

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
