// Communication between the processes of a data-parallel run (docs/distributed.md).
//
// A Communicator connects the R ranks of one run. Two implementations today:
//   local   one process, rank 0 of 1; every collective is a no-op (or a local fold). Used whenever the process
//           was not started by an MPI launcher, so a single-process run never calls MPI_Init.
//   mpi     Open MPI / MPICH over MPI_COMM_WORLD (a duplicate of it, with MPI_ERRORS_RETURN so every failure
//           comes back through DPO_MPI_CHECK as a dpo::Error). Host tensors only.
// A later NCCL communicator (CUDA path) implements the same interface over device tensors; it will give
// allreduce_sum with NCCL's (not rank-count-invariant) reduction order.
//
// Reduction order. Every sum here is a left fold in rank order: ((x_0 + x_1) + x_2) + ..., computed by a chain
// (rank r receives the running sum from r-1, adds its terms, passes it on; the last rank broadcasts it), so the
// result has the same bits on every rank and the same bits as the same fold done in one process. That is what
// makes CPU runs bit-identical across rank counts (the trainer folds per-micro-batch gradients in global
// micro-batch order). The cost is latency: R-1 sequential point-to-point messages of the whole buffer plus a
// broadcast, about 2x the bytes of a ring all-reduce per rank and O(R) steps instead of O(log R). Fine for CPU
// runs on a few ranks; the GPU path uses NCCL's ring/tree all-reduce instead.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace dpo {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "local", "mpi"

  // Ordered fold. `acc` on rank 0 holds the initial value (other ranks' acc contents are ignored); then rank 0,
  // rank 1, ... in turn add their own `terms`, in order (acc += term, elementwise in acc's dtype); the result is
  // written into acc on every rank. acc and every term: same dtype (F32 or F64), same numel, host memory for the
  // MPI implementation. Collective: every rank must call it, with any number of terms (zero included).
  virtual void ordered_fold(const Tensor& acc, const std::vector<Tensor>& terms) = 0;

  // In place: t = t_0 + t_1 + ... + t_{R-1}, summed in rank order (an ordered_fold with one term per rank), the
  // same bits on every rank. F32 or F64. Collective.
  virtual void allreduce_sum(const Tensor& t);
  virtual void allreduce_sum(double* v, int64_t n);

  virtual void barrier() = 0;

  // Ends every rank of the run with exit status `code` (MPI_Abort); never returns. The caller prints the reason
  // first. The local communicator just exits the process.
  [[noreturn]] virtual void abort(int code) = 0;
};

// The communicator of this process: MPI when the process was started by an MPI launcher with more than one
// process (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_SIZE or SLURM_STEP_NUM_TASKS > 1), otherwise local. MPI is
// initialised on first use (MPI_Init_thread, FUNNELED) and finalised at process exit. Throws dpo::Error when
// started with several processes by a launcher but built without MPI (the processes would otherwise each run
// the whole job and race on out_dir).
std::unique_ptr<Communicator> make_communicator();
std::unique_ptr<Communicator> make_local_communicator();

// The number of processes the launcher started (1 when none), read from the environment.
int launcher_size();

// For error paths: if this process is one rank of a multi-process MPI job that is still running, aborts the whole
// job with `code` (MPI_Abort on MPI_COMM_WORLD) and does not return; otherwise returns. Flushes stdout/stderr
// first.
void abort_job_if_distributed(int code);

// std::set_terminate handler: prints the uncaught exception with the rank, then abort_job_if_distributed(1),
// then std::abort(). Installed by the `dpo` main and the MPI tests.
void install_terminate_handler();

}  // namespace dpo
