// The NCCL communicator: the Communicator interface (runtime/comm.h) over device tensors, for the CUDA backend.
// Compiled only when the build has CUDA and NCCL (DPO_HAVE_NCCL); make_device_communicator() is the usual door.
//
// What goes where:
//   device tensors (on `device`)   NCCL on `stream`: allreduce_sum (ncclAllReduce, sum, in place),
//                                  reduce_scatter_sum (ncclReduceScatter), all_gather (ncclAllGather),
//                                  ordered_fold (below). F32 or F64 (all_gather: any dtype).
//   host tensors, host data        the wrapped host communicator (mpi or local), rank-order folds as there:
//                                  allreduce_sum(double*, n), broadcast_bytes, barrier, abort, and any
//                                  tensor collective whose tensors live on the host (the trainer's metric sums).
// rank() and size() are the host communicator's; NCCL rank r is host rank r.
//
// ordered_fold(acc, terms) on device tensors: each rank sums its own terms on the device in order, rank 0 starting
// from acc and the others from zero (acc = ((acc + t_0) + t_1) + ..., a deterministic elementwise kernel), then
// one ncclAllReduce of acc. Order: NCCL sums the ranks' partial sums in an order that depends on the rank count
// and on the algorithm it picks (ring, tree; NCCL_ALGO, NCCL_PROTO), so the result is not the rank-order left fold
// of the local and MPI communicators and differs from a one-process run at rounding level; it is the same on
// every rank and reproducible for a fixed rank count and fixed NCCL settings. With one rank it is exactly the
// one-process fold.
//
// Waiting and errors. The communicator is created non-blocking (ncclConfig_t::blocking = 0). Every device
// collective is enqueued on `stream` and then waited for: the host polls a CUDA event recorded after it together
// with ncclCommGetAsyncError, so each call returns with its result in memory (one host wait per collective; the
// trainer makes one or two per optimizer step). The wait covers the stream work queued before the collective too.
// Initialisation is waited for the same way. When NCCL reports an error, or a wait passes its timeout
// (NcclOptions; a peer died, hangs, or never joined), the communicator calls ncclCommAbort and throws dpo::Error naming the
// call, file:line, device, NCCL rank and NCCL's last error; the caller's error path then ends the job
// (abort_job_if_distributed). Later calls on an aborted communicator throw at once. It never waits forever.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

#include "runtime/comm.h"

namespace dpo {

struct NcclOptions {
  // Longest the initialisation may take (every rank joining), in seconds.
  double init_timeout_s = 300;
  // Longest one collective may take, with the stream work queued before it, in seconds.
  double timeout_s = 300;
};

// Collective over `host`: rank 0 makes the ncclUniqueId and broadcasts it with host->broadcast_bytes, then every
// rank joins with ncclCommInitRankConfig(host->size(), id, host->rank()). The caller has selected `device`
// (cudaSetDevice; checked here) and owns `stream` (the CUDA backend's stream), which must outlive the
// communicator. `host` may be the local communicator: a 1-rank NCCL communicator in one process.
std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host, int device,
                                                     cudaStream_t stream, const NcclOptions& options = {});

}  // namespace dpo
