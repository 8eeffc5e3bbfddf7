#include "runtime/error.h"

#include <cstdlib>

namespace dpo {

int launcher_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return -1;
}

void throw_error(const char* stmt, const char* file, int line, const std::string& detail) {
  std::string msg = std::string(stmt) + " failed at " + file + ":" + std::to_string(line);
  int rank = launcher_rank();
  if (rank >= 0) msg += " (rank " + std::to_string(rank) + ")";
  if (!detail.empty()) msg += ": " + detail;
  throw Error(msg);
}

void throw_library_error(const char* library, const std::string& status, const char* stmt, const char* file,
                         int line, int device) {
  std::string msg = std::string(library) + " error " + status + ": " + stmt + " failed at " + file + ":" +
                    std::to_string(line);
  std::string where;
  if (device >= 0) where = "device " + std::to_string(device);
  int rank = launcher_rank();
  if (rank >= 0) where += (where.empty() ? "" : ", ") + std::string("rank ") + std::to_string(rank);
  if (!where.empty()) msg += " (" + where + ")";
  throw Error(msg);
}

}  // namespace dpo
