#include "runtime/comm.h"

#include <unistd.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#ifdef DPO_HAVE_MPI
#include "runtime/mpi_check.h"
#endif
#ifdef DPO_HAVE_NCCL
#include "runtime/cuda/nccl_comm.h"
#endif

namespace dpo {

namespace comm_detail {

void check_fold_args(const Tensor& acc, const std::vector<Tensor>& terms) {
  DPO_ASSERT(acc.defined(), "ordered_fold: acc is undefined");
  check_sum_dtype("ordered_fold", acc);
  for (const Tensor& t : terms) {
    DPO_ASSERT(t.dtype() == acc.dtype() && t.numel() == acc.numel() && t.device() == acc.device(),
               "ordered_fold: every term must match acc's dtype, numel and device");
  }
}

void check_sum_dtype(const char* what, const Tensor& t) {
  DPO_ASSERT(t.dtype() == DType::F32 || t.dtype() == DType::F64,
             std::string(what) + ": tensors must be F32 or F64, got " + dtype_name(t.dtype()));
}

void check_shard_args(const char* what, const Tensor& shard, const Tensor& full, int ranks) {
  DPO_ASSERT(shard.defined() && full.defined(), std::string(what) + ": shard or full is undefined");
  DPO_ASSERT(shard.dtype() == full.dtype() && shard.device() == full.device(),
             std::string(what) + ": shard and full must have the same dtype and device, got " +
                 dtype_name(shard.dtype()) + " on " + shard.device().str() + " and " + dtype_name(full.dtype()) +
                 " on " + full.device().str());
  DPO_ASSERT(full.numel() == static_cast<int64_t>(ranks) * shard.numel(),
             std::string(what) + ": full has " + std::to_string(full.numel()) + " elements, expected " +
                 std::to_string(ranks) + " ranks x " + std::to_string(shard.numel()) + " (shard)");
}

}  // namespace comm_detail

namespace {

using comm_detail::check_fold_args;
using comm_detail::check_shard_args;
using comm_detail::check_sum_dtype;

// The MPI communicator moves host memory only.
[[maybe_unused]] void check_host(const char* what, const Tensor& t) {  // unused without MPI
  DPO_ASSERT(t.device().kind == DeviceKind::CPU,
             std::string(what) + ": the MPI communicator takes host tensors, got one on " + t.device().str() +
                 " (device tensors go through the NCCL communicator)");
}

// The local communicator's reduce-scatter and all-gather: with one rank both are a copy of shard.numel() elements.
void local_copy(const char* what, const Tensor& dst, const Tensor& src) {
  if (dst.raw() == src.raw() || dst.nbytes() == 0) return;
  DPO_ASSERT(dst.device().kind == DeviceKind::CPU,
             std::string(what) + ": the local communicator copies host tensors only; on " + dst.device().str() +
                 " call it in place (shard = full with one rank) or use the NCCL communicator "
                 "(make_device_communicator with NcclUse::kAlways)");
  std::memmove(dst.raw(), src.raw(), static_cast<size_t>(dst.nbytes()));
}

template <class T>
void add_into(T* acc, const T* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

// acc[0, n) += x[0, n) elementwise in `dt` (F32 or F64): the one addition every host fold uses.
void add_raw(DType dt, void* acc, const void* x, int64_t n) {
  if (dt == DType::F32) add_into(static_cast<float*>(acc), static_cast<const float*>(x), n);
  else add_into(static_cast<double*>(acc), static_cast<const double*>(x), n);
}

void fold_local(const Tensor& acc, const std::vector<Tensor>& terms) {
  for (const Tensor& t : terms) add_raw(acc.dtype(), acc.raw(), t.raw(), acc.numel());
}

std::atomic<int> g_timeout_pauses{0};

int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "local"; }
  void ordered_fold(const Tensor& acc, const std::vector<Tensor>& terms) override {
    check_fold_args(acc, terms);
    if (!terms.empty()) {
      DPO_ASSERT(acc.device().kind == DeviceKind::CPU, "ordered_fold: the local communicator folds host tensors");
      fold_local(acc, terms);
    }
  }
  void allreduce_sum(const Tensor& t) override {}
  void allreduce_sum(double* v, int64_t n) override {}
  void reduce_scatter_sum(const Tensor& shard, const Tensor& full) override {
    check_shard_args("reduce_scatter_sum", shard, full, 1);
    check_sum_dtype("reduce_scatter_sum", full);
    local_copy("reduce_scatter_sum", shard, full);
  }
  void all_gather(const Tensor& full, const Tensor& shard) override {
    check_shard_args("all_gather", shard, full, 1);
    local_copy("all_gather", full, shard);
  }
  void broadcast_bytes(void* data, int64_t bytes, int root) override {
    DPO_ASSERT(root == 0 && bytes >= 0, "broadcast_bytes: root " + std::to_string(root) + " of 1 rank");
  }
  void barrier() override {}
  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(code);
  }
};

#ifdef DPO_HAVE_MPI

bool mpi_running() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void finalize_at_exit() {
  if (mpi_running()) MPI_Finalize();
}

void ensure_mpi() {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return;
  int provided = 0;
  DPO_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
  DPO_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  std::atexit(finalize_at_exit);
}

// MPI counts are int: move buffers in pieces of at most 1 GiB.
constexpr int64_t kPiece = int64_t{1} << 30;

using Clock = std::chrono::steady_clock;

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    ensure_mpi();
    DPO_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    DPO_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    DPO_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DPO_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    timeout_s_ = mpi_timeout_from_env();
  }
  ~MpiCommunicator() override {
    if (mpi_running()) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void ordered_fold(const Tensor& acc, const std::vector<Tensor>& terms) override {
    check_fold_args(acc, terms);
    check_host("ordered_fold", acc);
    char* p = static_cast<char*>(acc.raw());
    const int64_t bytes = acc.nbytes();
    if (rank_ > 0) recv(p, bytes, rank_ - 1, kTag);
    fold_local(acc, terms);
    if (rank_ + 1 < size_) send(p, bytes, rank_ + 1, kTag);
    bcast(p, bytes, size_ - 1);
  }

  // Pipelined per-shard chain (cost in comm.h). Every rank reads all of `full` before it writes `shard`, so
  // shard may alias full's own slice.
  void reduce_scatter_sum(const Tensor& shard, const Tensor& full) override {
    check_shard_args("reduce_scatter_sum", shard, full, size_);
    check_sum_dtype("reduce_scatter_sum", full);
    check_host("reduce_scatter_sum", full);
    const DType dt = full.dtype();
    const int64_t n = shard.numel(), sb = shard.nbytes();
    const char* in = static_cast<const char*>(full.raw());
    if (size_ == 1) {
      if (shard.raw() != full.raw()) std::memmove(shard.raw(), in, static_cast<size_t>(sb));
      return;
    }
    const int last = size_ - 1;
    if (rank_ == 0) {
      for (int s = 0; s < size_; ++s) send(in + s * sb, sb, 1, kTag);
    } else if (rank_ < last) {
      Tensor run = Tensor::host({n}, dt);  // the running sum of one shard, x_0 + ... + x_{r-1}
      char* p = static_cast<char*>(run.raw());
      for (int s = 0; s < size_; ++s) {
        recv(p, sb, rank_ - 1, kTag);
        add_raw(dt, p, in + s * sb, n);
        send(p, sb, rank_ + 1, kTag);
      }
    } else {
      // The last rank completes every shard's fold, then hands each to its owner. It sends only after the chain
      // is through, so no rank is blocked in a chain send while the last rank waits to hand out (no deadlock).
      Tensor sums = Tensor::host({size_ * n}, dt);
      char* p = static_cast<char*>(sums.raw());
      for (int s = 0; s < size_; ++s) {
        recv(p + s * sb, sb, rank_ - 1, kTag);
        add_raw(dt, p + s * sb, in + s * sb, n);
      }
      for (int s = 0; s < last; ++s) send(p + s * sb, sb, s, kTagScatter);
      std::memcpy(shard.raw(), p + last * sb, static_cast<size_t>(sb));
      return;
    }
    recv(static_cast<char*>(shard.raw()), sb, last, kTagScatter);
  }

  void all_gather(const Tensor& full, const Tensor& shard) override {
    check_shard_args("all_gather", shard, full, size_);
    check_host("all_gather", full);
    const int64_t sb = shard.nbytes();
    char* out = static_cast<char*>(full.raw());
    if (shard.raw() != out + rank_ * sb) std::memmove(out + rank_ * sb, shard.raw(), static_cast<size_t>(sb));
    for (int q = 0; q < size_; ++q) bcast(out + q * sb, sb, q);
  }

  void broadcast_bytes(void* data, int64_t bytes, int root) override {
    DPO_ASSERT(root >= 0 && root < size_ && bytes >= 0,
               "broadcast_bytes: root " + std::to_string(root) + " of " + std::to_string(size_) + " ranks");
    bcast(static_cast<char*>(data), bytes, root);
  }

  void barrier() override {
    MPI_Request r = MPI_REQUEST_NULL;
    DPO_MPI_CHECK(MPI_Ibarrier(comm_, &r));
    wait(&r, "MPI_Ibarrier (barrier)", -1, 0);
  }

  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  static constexpr int kTag = 7001;         // chains (ordered_fold, reduce_scatter_sum)
  static constexpr int kTagScatter = 7002;  // reduce_scatter_sum's hand-out from the last rank
  // The same transfers as MPI_Send / MPI_Recv / MPI_Bcast, each piece waited for with the collective timeout.
  void send(const char* p, int64_t bytes, int to, int tag) {
    for (int64_t off = 0; off < bytes; off += kPiece) {
      MPI_Request r = MPI_REQUEST_NULL;
      DPO_MPI_CHECK(MPI_Isend(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, to, tag, comm_, &r));
      wait(&r, "MPI_Isend (send to rank", to, std::min(kPiece, bytes - off));
    }
  }
  void recv(char* p, int64_t bytes, int from, int tag) {
    for (int64_t off = 0; off < bytes; off += kPiece) {
      MPI_Request r = MPI_REQUEST_NULL;
      DPO_MPI_CHECK(
          MPI_Irecv(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, from, tag, comm_, &r));
      wait(&r, "MPI_Irecv (receive from rank", from, std::min(kPiece, bytes - off));
    }
  }
  void bcast(char* p, int64_t bytes, int root) {
    for (int64_t off = 0; off < bytes; off += kPiece) {
      MPI_Request r = MPI_REQUEST_NULL;
      DPO_MPI_CHECK(MPI_Ibcast(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, root, comm_, &r));
      wait(&r, "MPI_Ibcast (broadcast from rank", root, std::min(kPiece, bytes - off));
    }
  }

  // Polls `r` until it completes. Past the timeout (unless paused) the job ends: a rank that never answers must
  // not leave this one spinning. The first millisecond polls back to back (short messages complete at once);
  // later polls yield the core between tests, as Open MPI's own blocking waits do when oversubscribed.
  // `what` names the operation; with a peer (>= 0) it ends in "rank" and the peer and byte count follow.
  void wait(MPI_Request* r, const char* what, int peer, int64_t bytes) {
    const Clock::time_point t0 = Clock::now();
    for (int64_t polls = 0;; ++polls) {
      int done = 0;
      DPO_MPI_CHECK(MPI_Test(r, &done, MPI_STATUS_IGNORE));
      if (done) return;
      if (polls < 64) continue;
      const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
      if (waited > 1e-3) sched_yield();
      if (timeout_s_ > 0 && waited > timeout_s_ && !CollectiveTimeoutPause::active()) timed_out(what, peer, bytes, waited);
    }
  }

  [[noreturn]] void timed_out(const char* what, int peer, int64_t bytes, double waited) {
    std::string op = what;
    if (peer >= 0) op += " " + std::to_string(peer) + ", " + std::to_string(bytes) + " bytes)";
    std::fprintf(stderr,
                 "dpo: error (rank %d): collective timeout: %s not complete after %.1f s (DPO_MPI_TIMEOUT_S=%g): "
                 "a rank stopped responding; aborting the job\n",
                 rank_, op.c_str(), waited, timeout_s_);
    abort(1);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  double timeout_s_ = 300;
};

#endif  // DPO_HAVE_MPI

}  // namespace

void Communicator::allreduce_sum(const Tensor& t) {
  if (size() == 1) return;
  if (rank() == 0) {
    ordered_fold(t, {});
  } else {
    Tensor mine = Tensor::host(t.shape(), t.dtype());
    std::memcpy(mine.raw(), t.raw(), static_cast<size_t>(t.nbytes()));
    ordered_fold(t, {mine});
  }
}

void Communicator::allreduce_sum(double* v, int64_t n) {
  if (size() == 1 || n == 0) return;
  Tensor t(std::make_shared<Buffer>(v, n * 8, Device{}, nullptr), 0, DType::F64, {n});
  allreduce_sum(t);
}

double mpi_timeout_from_env() {
  const char* v = std::getenv("DPO_MPI_TIMEOUT_S");
  if (v == nullptr || *v == '\0') return 300;
  char* end = nullptr;
  errno = 0;
  const double t = std::strtod(v, &end);
  if (errno != 0 || end == v || *end != '\0' || !std::isfinite(t) || t < 0)
    throw InputError(std::string("environment variable DPO_MPI_TIMEOUT_S: '") + v +
                     "' is not a number of seconds >= 0 (0: no timeout)");
  return t;
}

CollectiveTimeoutPause::CollectiveTimeoutPause() { g_timeout_pauses.fetch_add(1); }
CollectiveTimeoutPause::~CollectiveTimeoutPause() { g_timeout_pauses.fetch_sub(1); }
bool CollectiveTimeoutPause::active() { return g_timeout_pauses.load() > 0; }

int local_rank_among(const std::vector<std::string>& hosts, int me) {
  DPO_ASSERT(me >= 0 && me < static_cast<int>(hosts.size()), "local_rank_among: rank out of range");
  int n = 0;
  for (int r = 0; r < me; ++r) n += hosts[static_cast<size_t>(r)] == hosts[static_cast<size_t>(me)];
  return n;
}

int node_local_rank(Communicator& comm) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"})
    if (const char* v = std::getenv(name); v && *v) return std::atoi(v);
  if (comm.size() == 1) return 0;
  // Host names in fixed 256-byte slots (as I32 words: all_gather moves any dtype exactly).
  constexpr int64_t kWords = 64;
  char name[kWords * 4] = {};
  if (::gethostname(name, sizeof name - 1) != 0) throw Error("gethostname failed: " + std::string(std::strerror(errno)));
  Tensor mine = Tensor::host({kWords}, DType::I32), all = Tensor::host({kWords * comm.size()}, DType::I32);
  std::memcpy(mine.raw(), name, sizeof name);
  comm.all_gather(all, mine);
  std::vector<std::string> hosts;
  for (int r = 0; r < comm.size(); ++r) {
    const char* p = static_cast<const char*>(all.raw()) + r * kWords * 4;
    hosts.emplace_back(p, strnlen(p, kWords * 4));
  }
  return local_rank_among(hosts, comm.rank());
}

int launcher_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"}) {
    const int n = env_int(name);
    if (n > 0) return n;
  }
  return 1;
}

std::unique_ptr<Communicator> make_local_communicator() { return std::make_unique<LocalCommunicator>(); }

std::unique_ptr<Communicator> make_communicator() {
  const int n = launcher_size();
  if (n <= 1) return make_local_communicator();
#ifdef DPO_HAVE_MPI
  return std::make_unique<MpiCommunicator>();
#else
  throw Error("this process was started by a parallel launcher with " + std::to_string(n) +
              " processes, but dpo was built without MPI (install an MPI development package and rebuild)");
#endif
}

std::unique_ptr<Communicator> make_device_communicator(std::unique_ptr<Communicator> host, const Device& dev,
                                                       const DeviceCommOptions& options) {
  DPO_ASSERT(host != nullptr, "make_device_communicator: no host communicator");
  if (dev.kind != DeviceKind::CUDA) return host;
  const char* force = std::getenv("DPO_FORCE_NCCL");
  const bool forced =
      options.nccl == NcclUse::kAlways || (force != nullptr && *force != '\0' && std::string(force) != "0");
  if (host->size() == 1 && !forced) return host;
#ifdef DPO_HAVE_NCCL
  NcclOptions o;
  o.init_timeout_s = options.nccl_timeout_s;
  o.timeout_s = options.nccl_timeout_s;
  return make_nccl_communicator(std::move(host), dev.index, static_cast<cudaStream_t>(options.cuda_stream), o);
#else
  throw Error("a CUDA run on " + std::to_string(host->size()) + " ranks" + (forced ? " (DPO_FORCE_NCCL / NcclUse::kAlways)" : "") +
              " needs the NCCL communicator, but dpo was built without NCCL (install NCCL, e.g. libnccl-dev, and "
              "rebuild with CUDA)");
#endif
}

void abort_job_if_distributed(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
#ifdef DPO_HAVE_MPI
  if (mpi_running()) {
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (n > 1) {
      MPI_Abort(MPI_COMM_WORLD, code);
      std::_Exit(code);
    }
  }
#endif
  (void)code;
}

namespace {
[[noreturn]] void on_terminate() {
  const int rank = launcher_rank();
  const std::string who = rank >= 0 ? " (rank " + std::to_string(rank) + ")" : "";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      std::fprintf(stderr, "dpo: uncaught exception%s: %s\n", who.c_str(), x.what());
    } catch (...) {
      std::fprintf(stderr, "dpo: uncaught exception%s\n", who.c_str());
    }
  } else {
    std::fprintf(stderr, "dpo: std::terminate called%s\n", who.c_str());
  }
  abort_job_if_distributed(1);
  std::abort();
}
}  // namespace

void install_terminate_handler() { std::set_terminate(on_terminate); }

}  // namespace dpo
