// Communication between the processes of a data-parallel run (docs/distributed.md).
//
// A Communicator connects the R ranks of one run. Three implementations:
//   local   one process, rank 0 of 1; every collective is a no-op, a local fold or a copy. Used whenever the process
//           was not started by an MPI launcher, so a single-process run never calls MPI_Init.
//   mpi     Open MPI / MPICH over MPI_COMM_WORLD (a duplicate of it, with MPI_ERRORS_RETURN so every failure
//           comes back through DPO_MPI_CHECK as a dpo::Error). Host tensors only. Every transfer is a
//           non-blocking MPI call (MPI_Isend, MPI_Irecv, MPI_Ibcast, MPI_Ibarrier) polled with MPI_Testall
//           against the collective timeout: DPO_MPI_TIMEOUT_S seconds (default 300; 0 = wait forever) from when
//           this rank starts waiting for one transfer. A rank that stops responding (stopped, swapping, stuck)
//           then ends the job: the waiting rank prints which operation timed out after how long and calls
//           MPI_Abort (exit status 1), instead of spinning forever. See CollectiveTimeoutPause.
//   nccl    (runtime/cuda/nccl_comm.h, built with CUDA and NCCL) device tensors through NCCL on one stream, host
//           tensors and host data through the MPI (or local) communicator it wraps. Its sums are in NCCL's order,
//           which depends on the rank count and the algorithm: not the rank-order fold described below.
// make_device_communicator() picks between them for the trainer's device.
//
// Reduction order (local and mpi). Every sum here is a left fold in rank order: ((x_0 + x_1) + x_2) + ...,
// computed by a chain (rank r receives the running sum from r-1, adds its terms, passes it on; for ordered_fold
// and allreduce_sum the last rank then broadcasts it), so the result has the same bits on every rank and the same
// bits as the same fold done in one process. That is what makes CPU runs bit-identical across rank counts (the
// trainer folds per-micro-batch gradients in global micro-batch order). The cost is latency: ordered_fold takes
// R-1 sequential point-to-point messages of the whole buffer plus a broadcast, about 2x the bytes of a ring
// all-reduce per rank and O(R) steps instead of O(log R) (reduce_scatter_sum pipelines its chain; see there).
// Fine for CPU runs on a few ranks; the GPU path uses NCCL's ring/tree algorithms instead.
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
  virtual std::string name() const = 0;  // "local", "mpi", "nccl"

  // Ordered fold. `acc` on rank 0 holds the initial value (other ranks' acc contents are ignored); then rank 0,
  // rank 1, ... in turn add their own `terms`, in order (acc += term, elementwise in acc's dtype); the result is
  // written into acc on every rank. acc and every term: same dtype (F32 or F64), same numel, host memory for the
  // MPI implementation. Collective: every rank must call it, with any number of terms (zero included).
  virtual void ordered_fold(const Tensor& acc, const std::vector<Tensor>& terms) = 0;

  // In place: t = t_0 + t_1 + ... + t_{R-1}, summed in rank order (an ordered_fold with one term per rank), the
  // same bits on every rank. F32 or F64. Collective.
  virtual void allreduce_sum(const Tensor& t);
  virtual void allreduce_sum(double* v, int64_t n);

  // Reduce-scatter (ZeRO-1: each rank keeps the summed gradient of its own slice of the parameters).
  // `full` has numel R * S, `shard` has numel S (S = shard.numel(), any S >= 0, odd included); on rank r
  //   shard = full_0[r*S, (r+1)*S) + full_1[r*S, (r+1)*S) + ... + full_{R-1}[r*S, (r+1)*S)
  // summed as the left fold in rank order: the same bits as ordered_fold / allreduce_sum followed by taking the
  // slice (local, mpi). `shard` is overwritten (=); `full` is read only. `shard` may be full's own slice r
  // (in place); no other overlap. F32 or F64, same dtype and device. Collective.
  //   local  a copy (nothing when in place). Device tensors: only in place (the local communicator does not
  //          launch device copies; use the nccl one, see make_device_communicator).
  //   mpi    per-shard chain, pipelined shard by shard: rank r receives the running sums of all R shards from
  //          r-1, one shard at a time, adds its own and passes each on; the last rank then sends shard s to rank
  //          s. Per rank about N bytes in and N out (N = full's bytes) plus N/R for the hand-out (the last rank
  //          sends (R-1)N/R), R-1 + R-1 pipelined shard latencies. Extra memory: one shard on ranks
  //          1..R-2, one full-size buffer on the last rank.
  //   nccl   ncclReduceScatter (NCCL's order).
  virtual void reduce_scatter_sum(const Tensor& shard, const Tensor& full) = 0;

  // All-gather (ZeRO-1: every rank gets the parameters updated by the others). `full` has numel R * S, `shard`
  // has numel S; on every rank full[r*S, (r+1)*S) = shard of rank r, for every r. `full` is overwritten; `shard`
  // may be full's own slice (in place). Any dtype (data movement only, exact); same dtype and device. Collective.
  //   local  a copy (nothing when in place; device tensors only in place, as above).
  //   mpi    the own slice is copied into full, then one MPI_Bcast per rank of its slice (in pieces of 1 GiB, so
  //          64-bit sizes work): each rank receives (R-1)/R of full's bytes, as in a ring all-gather, with R
  //          broadcast latencies.
  //   nccl   ncclAllGather.
  virtual void all_gather(const Tensor& full, const Tensor& shard) = 0;

  // Host bytes from `root` to every rank (data[0, bytes) is overwritten on the others). Used to hand out NCCL's
  // unique id. local: root must be 0, nothing moves. mpi: MPI_Bcast in pieces. nccl: the wrapped host
  // communicator's. Collective.
  virtual void broadcast_bytes(void* data, int64_t bytes, int root) = 0;

  // Overlap with computation (the gradient all-reduce in buckets during the backward pass). allreduce_sum_async
  // starts t = sum over ranks of t, in place, ordered after the device work enqueued so far, and returns without
  // waiting; finish_async returns once every started one is complete and later device work is ordered after them.
  // The defaults (local, mpi) are allreduce_sum at once and nothing; nccl runs the collectives on a stream of its
  // own, waits with its timeout in finish_async only. Collective, in the same order on every rank.
  virtual void allreduce_sum_async(const Tensor& t) { allreduce_sum(t); }
  virtual void finish_async() {}

  virtual void barrier() = 0;

  // Ends every rank of the run with exit status `code` (MPI_Abort); never returns. The caller prints the reason
  // first. The local communicator just exits the process.
  [[noreturn]] virtual void abort(int code) = 0;
};

// The MPI communicator's collective timeout in seconds: DPO_MPI_TIMEOUT_S when set (a number >= 0; 0 means
// none), else 300. Throws dpo::InputError naming the variable for any other value.
double mpi_timeout_from_env();

// While an instance lives (in any thread of the process), the MPI communicator's waits have no deadline: for
// collectives that legitimately wait on one rank's long work, e.g. the other ranks at a barrier while rank 0
// computes the reference log-prob cache or writes a checkpoint. Nests.
class CollectiveTimeoutPause {
 public:
  CollectiveTimeoutPause();
  ~CollectiveTimeoutPause();
  CollectiveTimeoutPause(const CollectiveTimeoutPause&) = delete;
  CollectiveTimeoutPause& operator=(const CollectiveTimeoutPause&) = delete;
  static bool active();
};

// The communicator of this process: MPI when the process was started by an MPI launcher with more than one
// process (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_SIZE or SLURM_STEP_NUM_TASKS > 1), otherwise local. MPI is
// initialised on first use (MPI_Init_thread, FUNNELED) and finalised at process exit. Throws dpo::Error when
// started with several processes by a launcher but built without MPI (the processes would otherwise each run
// the whole job and race on out_dir).
std::unique_ptr<Communicator> make_communicator();
std::unique_ptr<Communicator> make_local_communicator();

// When the device communicator uses NCCL.
enum class NcclUse {
  kWhenDistributed,  // a CUDA device with more than one rank (one rank keeps the host communicator)
  kAlways,           // a CUDA device, also as rank 0 of 1 without MPI (a 1-rank NCCL run, e.g. a GPU check)
};

struct DeviceCommOptions {
  // The cudaStream_t the device collectives are enqueued on and waited for: the CUDA backend's stream
  // (CudaContext::stream()), so that they are ordered after the kernels that produce their inputs. Type-erased
  // to keep this header free of CUDA; ignored for a CPU device.
  void* cuda_stream = nullptr;
  NcclUse nccl = NcclUse::kWhenDistributed;
  // Longest a wait on NCCL work (initialisation, one collective with the stream work queued before it) may take
  // before the NCCL communicator is aborted and dpo::Error is thrown; a dead or stuck peer ends as an error, never
  // as a hang.
  double nccl_timeout_s = 300;
};

// The communicator for tensors on `dev`, wrapping `host` (from make_communicator()):
//   CPU device                                   -> `host` itself.
//   CUDA device, built with NCCL, and host->size() > 1 or options.nccl == kAlways
//                                                -> the NCCL communicator over `host` (runtime/cuda/nccl_comm.h:
//                                                   rank 0 makes the NCCL id and broadcasts it over `host`).
//   CUDA device, one rank, not forced            -> `host` (the local communicator; no NCCL).
//   CUDA device, more than one rank, no NCCL     -> throws dpo::Error (the mpi communicator takes host tensors).
// The caller has already selected `dev` (cudaSetDevice, e.g. by creating the CUDA backend on it).
// Forcing NCCL for one process: pass options.nccl = NcclUse::kAlways, or set the environment variable
// DPO_FORCE_NCCL=1 (read here; it turns kWhenDistributed into kAlways). Once the trainer makes its communicator
// here, `DPO_FORCE_NCCL=1 ./build/dpo train --config run.yaml device=cuda` is a single-process training whose
// gradient reductions go through a 1-rank NCCL communicator (no MPI launcher needed).
std::unique_ptr<Communicator> make_device_communicator(std::unique_ptr<Communicator> host, const Device& dev,
                                                       const DeviceCommOptions& options = {});

// Argument checks shared by the implementations; each throws dpo::Error naming the op and the mismatch.
namespace comm_detail {
// acc defined, F32 or F64; every term with acc's dtype, numel and device.
void check_fold_args(const Tensor& acc, const std::vector<Tensor>& terms);
void check_sum_dtype(const char* what, const Tensor& t);  // F32 or F64
// Both defined, same dtype and device, full.numel() == ranks * shard.numel().
void check_shard_args(const char* what, const Tensor& shard, const Tensor& full, int ranks);
}  // namespace comm_detail

// The number of processes the launcher started (1 when none), read from the environment.
int launcher_size();

// This process's rank among the ranks on its node (which GPU it takes): OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID
// or MPI_LOCALRANKID when the launcher sets one; otherwise the number of lower ranks whose host name equals this
// one's (an all-gather of host names over `comm`; collective then). 0 for a single process.
int node_local_rank(Communicator& comm);
// The same rule on given host names: the number of ranks before `me` with hosts[me]'s name.
int local_rank_among(const std::vector<std::string>& hosts, int me);

// For error paths: if this process is one rank of a multi-process MPI job that is still running, aborts the whole
// job with `code` (MPI_Abort on MPI_COMM_WORLD) and does not return; otherwise returns. Flushes stdout/stderr
// first.
void abort_job_if_distributed(int code);

// std::set_terminate handler: prints the uncaught exception with the rank, then abort_job_if_distributed(1),
// then std::abort(). Installed by the `dpo` main and the MPI tests.
void install_terminate_handler();

}  // namespace dpo
