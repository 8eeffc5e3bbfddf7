// One error path for the whole project.
//
// Two kinds of failure:
//   InputError   the user's input is bad (a file, a config key, a flag). The message names the file and the
//                field. The CLI maps it to exit code 2.
//   Error        anything else (a failed library call, a broken invariant). The CLI maps it to exit code 1.
// Library status checks (CUDA, cuBLAS, cuDNN, NCCL, MPI) go through DPO_CHECK_* macros that report the failing
// statement, file:line, device and rank (runtime/cuda/cuda_check.h, runtime/mpi_check.h).
#pragma once

#include <stdexcept>
#include <string>

namespace dpo {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InputError : public Error {
 public:
  using Error::Error;
};

// The process's rank as the launcher reports it (Open MPI, Slurm, PMI), or -1 when not launched under one.
// Read from the environment at report time so that error messages need no global state.
int launcher_rank();

// "stmt failed at file:line (rank R): detail"
[[noreturn]] void throw_error(const char* stmt, const char* file, int line, const std::string& detail);

// "<library> error <status>: stmt failed at file:line (device D, rank R)"; device < 0 means none.
[[noreturn]] void throw_library_error(const char* library, const std::string& status, const char* stmt,
                                      const char* file, int line, int device);

}  // namespace dpo

// Internal invariant: throws dpo::Error naming the condition and file:line.
#define DPO_ASSERT(cond, msg)                                                          \
  do {                                                                                 \
    if (!(cond)) ::dpo::throw_error(#cond, __FILE__, __LINE__, std::string(msg));      \
  } while (0)
