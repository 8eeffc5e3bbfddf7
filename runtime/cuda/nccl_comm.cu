// The NCCL communicator (contract in runtime/cuda/nccl_comm.h).
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "runtime/cuda/cuda_check.h"  // DPO_CUDA_CHECK; DPO_NCCL_CHECK for calls without a communicator
#include "runtime/cuda/nvtx.h"
#include "runtime/cuda/nccl_comm.h"

namespace dpo {

namespace {

// acc[i] += x[i]: one rounding per element, so the device fold of a rank's terms is deterministic and, with one
// rank, bitwise the host fold.
template <class T>
__global__ void add_into_kernel(T* acc, const T* x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) acc[i] += x[i];
}

void launch_add_into(DType dt, void* acc, const void* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 8192));
  if (dt == DType::F32)
    add_into_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<float*>(acc), static_cast<const float*>(x), n);
  else
    add_into_kernel<double>
        <<<blocks, kThreads, 0, stream>>>(static_cast<double*>(acc), static_cast<const double*>(x), n);
  DPO_CUDA_CHECK(cudaGetLastError());
}

ncclDataType_t nccl_sum_type(DType dt) { return dt == DType::F32 ? ncclFloat32 : ncclFloat64; }

using Clock = std::chrono::steady_clock;

// A call on the live communicator: ncclInProgress (non-blocking mode) is waited for; an error aborts and throws.
#define DPO_NCCL_COMM_CALL(stmt) call((stmt), #stmt, __FILE__, __LINE__)

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<Communicator> host, int device, cudaStream_t stream, const NcclOptions& options)
      : host_(std::move(host)), device_(device), stream_(stream), options_(options) {
    DPO_ASSERT(host_ != nullptr, "make_nccl_communicator: no host communicator");
    DPO_ASSERT(stream_ != nullptr, "make_nccl_communicator: pass the CUDA backend's stream (CudaContext::stream())");
    DPO_ASSERT(options_.timeout_s > 0 && options_.init_timeout_s > 0,
               "make_nccl_communicator: the timeouts must be positive");
    int current = -1;
    DPO_CUDA_CHECK(cudaGetDevice(&current));
    DPO_ASSERT(current == device_, "make_nccl_communicator: device " + std::to_string(device_) +
                                       " is not the current device (" + std::to_string(current) +
                                       "); select it first (cudaSetDevice, or create the CUDA backend on it)");
    // CUDA resources first, so that nothing can fail by throwing once the NCCL communicator exists (the destructor,
    // which aborts it, does not run for a half-built object).
    create_cuda_resources();
    ncclUniqueId id{};
    if (host_->rank() == 0) DPO_NCCL_CHECK(ncclGetUniqueId(&id));
    host_->broadcast_bytes(&id, static_cast<int64_t>(sizeof id), 0);
    // Non-blocking: ncclCommInitRankConfig returns at once (ncclInProgress) and the wait below is bounded, so a
    // rank that never joins ends as a timeout instead of a hang.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t rc = ncclCommInitRankConfig(&comm_, host_->size(), id, host_->rank(), &config);
    if (rc != ncclSuccess && rc != ncclInProgress) {
      // Failed before a communicator existed: nothing to abort.
      comm_ = nullptr;
      fail("NCCL", ncclGetErrorString(rc), "ncclCommInitRankConfig(&comm_, host_->size(), id, host_->rank(), &config)",
           __FILE__, __LINE__);
    }
    wait_ready("ncclCommInitRankConfig", __FILE__, __LINE__, options_.init_timeout_s);
  }

  ~NcclCommunicator() override {
    // Destructors must not throw; failures here are ignored deliberately. During unwinding (an error on this rank)
    // abort at once: a peer may never come to finish anything.
    if (comm_ != nullptr) {
      bool clean = std::uncaught_exceptions() == 0;
      if (clean) {
        ncclResult_t rc = ncclCommFinalize(comm_), state = rc;
        const auto t0 = Clock::now();
        while (rc == ncclSuccess || rc == ncclInProgress) {
          rc = ncclCommGetAsyncError(comm_, &state);
          if (rc != ncclSuccess || state != ncclInProgress || seconds_since(t0) > options_.timeout_s) break;
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        clean = rc == ncclSuccess && state == ncclSuccess;
      }
      if (clean) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    if (comm_done_ != nullptr) cudaEventDestroy(comm_done_);
    if (comm_stream_ != nullptr) cudaStreamDestroy(comm_stream_);
  }

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string name() const override { return "nccl"; }

  void ordered_fold(const Tensor& acc, const std::vector<Tensor>& terms) override {
    DPO_NVTX_RANGE("nccl ordered_fold");
    comm_detail::check_fold_args(acc, terms);
    if (!on_device("ordered_fold", acc)) return host_->ordered_fold(acc, terms);
    require_live();
    if (rank() != 0) DPO_CUDA_CHECK(cudaMemsetAsync(acc.raw(), 0, static_cast<size_t>(acc.nbytes()), stream_));
    for (const Tensor& t : terms) launch_add_into(acc.dtype(), acc.raw(), t.raw(), acc.numel(), stream_);
    allreduce_in_place(acc);
  }

  void allreduce_sum(const Tensor& t) override {
    DPO_NVTX_RANGE("nccl allreduce_sum");
    DPO_ASSERT(t.defined(), "allreduce_sum: undefined tensor");
    comm_detail::check_sum_dtype("allreduce_sum", t);
    if (!on_device("allreduce_sum", t)) return host_->allreduce_sum(t);
    require_live();
    allreduce_in_place(t);
  }
  void allreduce_sum(double* v, int64_t n) override { host_->allreduce_sum(v, n); }

  // On comm_stream_, after an event recorded on the compute stream now: the backward pass goes on while the
  // bucket is reduced. No host wait here (finish_async waits once for all of them).
  void allreduce_sum_async(const Tensor& t) override {
    DPO_NVTX_RANGE("nccl allreduce_sum_async");
    DPO_ASSERT(t.defined(), "allreduce_sum_async: undefined tensor");
    comm_detail::check_sum_dtype("allreduce_sum_async", t);
    if (!on_device("allreduce_sum_async", t)) return host_->allreduce_sum(t);
    require_live();
    if (t.numel() == 0) return;
    DPO_CUDA_CHECK(cudaEventRecord(ready_, stream_));
    DPO_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready_, 0));
    DPO_NCCL_COMM_CALL(ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_sum_type(t.dtype()),
                                     ncclSum, comm_, comm_stream_));
    pending_ = true;
  }
  // The compute stream waits (on the device) for the comm stream; the host waits for it with the timeout and
  // the asynchronous-error polling of every other collective, so a dead peer ends as an error, not a hang.
  void finish_async() override {
    DPO_NVTX_RANGE("nccl finish_async");
    if (!pending_) return;
    require_live();
    DPO_CUDA_CHECK(cudaEventRecord(comm_done_, comm_stream_));
    DPO_CUDA_CHECK(cudaStreamWaitEvent(stream_, comm_done_, 0));
    pending_ = false;
    wait_event(comm_done_, "ncclAllReduce (bucketed, overlapped)", __FILE__, __LINE__);
  }

  void reduce_scatter_sum(const Tensor& shard, const Tensor& full) override {
    DPO_NVTX_RANGE("nccl reduce_scatter_sum");
    comm_detail::check_shard_args("reduce_scatter_sum", shard, full, size());
    comm_detail::check_sum_dtype("reduce_scatter_sum", full);
    if (!on_device("reduce_scatter_sum", full)) return host_->reduce_scatter_sum(shard, full);
    require_live();
    if (shard.numel() == 0) return;
    DPO_NCCL_COMM_CALL(ncclReduceScatter(full.raw(), shard.raw(), static_cast<size_t>(shard.numel()),
                                         nccl_sum_type(full.dtype()), ncclSum, comm_, stream_));
    wait_done("ncclReduceScatter", __FILE__, __LINE__);
  }

  void all_gather(const Tensor& full, const Tensor& shard) override {
    DPO_NVTX_RANGE("nccl all_gather");
    comm_detail::check_shard_args("all_gather", shard, full, size());
    if (!on_device("all_gather", full)) return host_->all_gather(full, shard);
    require_live();
    if (shard.numel() == 0) return;
    // Bytes: any dtype moves exactly.
    DPO_NCCL_COMM_CALL(
        ncclAllGather(shard.raw(), full.raw(), static_cast<size_t>(shard.nbytes()), ncclUint8, comm_, stream_));
    wait_done("ncclAllGather", __FILE__, __LINE__);
  }

  void broadcast_bytes(void* data, int64_t bytes, int root) override { host_->broadcast_bytes(data, bytes, root); }
  void barrier() override { host_->barrier(); }
  [[noreturn]] void abort(int code) override {
    host_->abort(code);
    std::_Exit(code);  // not reached (the host communicator's abort does not return)
  }

 private:
  // Events and the communication stream; on failure releases what it made and throws.
  void create_cuda_resources() {
    cudaError_t e = cudaEventCreateWithFlags(&done_, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking);
    if (e == cudaSuccess) return;
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    if (comm_done_ != nullptr) cudaEventDestroy(comm_done_);
    done_ = ready_ = comm_done_ = nullptr;
    DPO_CUDA_CHECK(e);
  }

  static double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }

  // false: a host tensor (handed to the host communicator); true: on this communicator's device.
  bool on_device(const char* what, const Tensor& t) const {
    if (t.device().kind == DeviceKind::CPU) return false;
    DPO_ASSERT(t.device() == (Device{DeviceKind::CUDA, device_}),
               std::string(what) + ": tensor on " + t.device().str() + ", the NCCL communicator is on cuda:" +
                   std::to_string(device_));
    return true;
  }

  void require_live() const {
    DPO_ASSERT(comm_ != nullptr, "the NCCL communicator (rank " + std::to_string(rank()) +
                                     ") was aborted after an earlier error; no further collectives are possible");
  }

  void allreduce_in_place(const Tensor& t) {
    if (t.numel() == 0) return;
    DPO_NCCL_COMM_CALL(ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_sum_type(t.dtype()),
                                     ncclSum, comm_, stream_));
    wait_done("ncclAllReduce", __FILE__, __LINE__);
  }

  void call(ncclResult_t rc, const char* stmt, const char* file, int line) {
    if (rc == ncclSuccess) return;
    if (rc == ncclInProgress) return wait_ready(stmt, file, line, options_.timeout_s);
    fail("NCCL", ncclGetErrorString(rc), stmt, file, line);
  }

  // Until the communicator's state leaves ncclInProgress (initialisation, or a call that was not enqueued yet).
  void wait_ready(const char* stmt, const char* file, int line, double timeout_s) {
    const auto t0 = Clock::now();
    for (;;) {
      if (poll_async_error(stmt, file, line) == ncclSuccess) return;
      check_timeout(t0, timeout_s, stmt, file, line);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // Until the stream has run everything enqueued so far (the collective just issued and the work before it).
  void wait_done(const char* stmt, const char* file, int line) {
    const cudaError_t rec = cudaEventRecord(done_, stream_);
    if (rec != cudaSuccess) fail("CUDA", cuda_status(rec), "cudaEventRecord(done_, stream_)", __FILE__, __LINE__);
    wait_event(done_, stmt, file, line);
  }

  // Until `ev` (already recorded) has completed, polling NCCL's asynchronous error state, within the timeout.
  void wait_event(cudaEvent_t ev, const char* stmt, const char* file, int line) {
    const auto t0 = Clock::now();
    for (;;) {
      const cudaError_t q = cudaEventQuery(ev);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) fail("CUDA", cuda_status(q), stmt, file, line);
      poll_async_error(stmt, file, line);
      check_timeout(t0, options_.timeout_s, stmt, file, line);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  // ncclSuccess or ncclInProgress; anything else aborts and throws.
  ncclResult_t poll_async_error(const char* stmt, const char* file, int line) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t rc = ncclCommGetAsyncError(comm_, &state);
    if (rc != ncclSuccess) fail("NCCL", ncclGetErrorString(rc), stmt, file, line);
    if (state != ncclSuccess && state != ncclInProgress) fail("NCCL", ncclGetErrorString(state), stmt, file, line);
    return state;
  }

  void check_timeout(Clock::time_point t0, double timeout_s, const char* stmt, const char* file, int line) {
    if (seconds_since(t0) <= timeout_s) return;
    char secs[32];
    std::snprintf(secs, sizeof secs, "%g", timeout_s);
    fail("NCCL",
         std::string("timeout: not complete after ") + secs +
             " s (a peer rank may have died, stalled or never joined; NcclOptions)",
         stmt, file, line);
  }

  static std::string cuda_status(cudaError_t e) {
    return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
  }

  // Aborts the communicator (so that no NCCL kernel of this rank waits on a peer any more) and throws dpo::Error
  // on the project's error path, with the NCCL rank and NCCL's own last message.
  [[noreturn]] void fail(const char* library, const std::string& status, const char* stmt, const char* file,
                         int line) {
    std::string detail = status + "; NCCL rank " + std::to_string(host_->rank()) + " of " +
                         std::to_string(host_->size());
    if (comm_ != nullptr) {
      const char* last = ncclGetLastError(comm_);
      if (last != nullptr && *last != '\0') detail += "; NCCL: " + std::string(last);
      ncclCommAbort(comm_);
      comm_ = nullptr;
      detail += "; communicator aborted";
    }
    throw_library_error(library, detail, stmt, file, line, device_);
  }

  std::unique_ptr<Communicator> host_;
  int device_;
  cudaStream_t stream_;
  NcclOptions options_;
  ncclComm_t comm_ = nullptr;
  cudaEvent_t done_ = nullptr;
  // The overlapped all-reduces: their stream, the compute-stream event each waits for, and their completion.
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t ready_ = nullptr, comm_done_ = nullptr;
  bool pending_ = false;
};

#undef DPO_NCCL_COMM_CALL

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host, int device,
                                                     cudaStream_t stream, const NcclOptions& options) {
  return std::make_unique<NcclCommunicator>(std::move(host), device, stream, options);
}

}  // namespace dpo
