// MPI status checks on the project's one error path (runtime/error.h): library, MPI's own error string, the
// failing statement, file:line and the launcher rank. Use on every MPI call whose communicator has
// MPI_ERRORS_RETURN set (the distributed runtime sets it, so a failure is reported here rather than aborting
// inside MPI with a less specific message).
#pragma once

#include <mpi.h>

#include <string>

#include "runtime/error.h"

namespace dpo::mpi_detail {

inline std::string mpi_status_string(int code) {
  // Open MPI aborts if MPI_Error_string is called before MPI_Init; MPI_Initialized is always allowed.
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return "MPI error code " + std::to_string(code) + " (MPI not initialised)";
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(buf, static_cast<size_t>(len)) + " (" + std::to_string(code) + ")";
}

}  // namespace dpo::mpi_detail

#define DPO_MPI_CHECK(stmt)                                                                                    \
  do {                                                                                                         \
    int dpo_rc_ = (stmt);                                                                                      \
    if (dpo_rc_ != MPI_SUCCESS)                                                                                \
      ::dpo::throw_library_error("MPI", ::dpo::mpi_detail::mpi_status_string(dpo_rc_), #stmt, __FILE__,       \
                                 __LINE__, -1);                                                                \
  } while (0)
