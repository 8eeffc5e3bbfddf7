#include "runtime/comm.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#ifdef DPO_HAVE_MPI
#include "runtime/mpi_check.h"
#endif

namespace dpo {

namespace {

void check_fold_args(const Tensor& acc, const std::vector<Tensor>& terms, bool host_only) {
  DPO_ASSERT(acc.defined(), "ordered_fold: acc is undefined");
  DPO_ASSERT(acc.dtype() == DType::F32 || acc.dtype() == DType::F64,
             std::string("ordered_fold: acc must be F32 or F64, got ") + dtype_name(acc.dtype()));
  if (host_only)
    DPO_ASSERT(acc.device().kind == DeviceKind::CPU,
               "ordered_fold: the " + std::string("MPI communicator takes host tensors, got one on ") +
                   acc.device().str() + " (device tensors go through the NCCL communicator)");
  for (const Tensor& t : terms) {
    DPO_ASSERT(t.dtype() == acc.dtype() && t.numel() == acc.numel() && t.device() == acc.device(),
               "ordered_fold: every term must match acc's dtype, numel and device");
  }
}

template <class T>
void add_into(T* acc, const T* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

void fold_local(const Tensor& acc, const std::vector<Tensor>& terms) {
  for (const Tensor& t : terms) {
    if (acc.dtype() == DType::F32) add_into(acc.data<float>(), t.data<float>(), acc.numel());
    else add_into(acc.data<double>(), t.data<double>(), acc.numel());
  }
}

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
    check_fold_args(acc, terms, /*host_only=*/false);
    if (!terms.empty()) {
      DPO_ASSERT(acc.device().kind == DeviceKind::CPU, "ordered_fold: the local communicator folds host tensors");
      fold_local(acc, terms);
    }
  }
  void allreduce_sum(const Tensor& t) override {}
  void allreduce_sum(double* v, int64_t n) override {}
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

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    ensure_mpi();
    DPO_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    DPO_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    DPO_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DPO_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    if (mpi_running()) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void ordered_fold(const Tensor& acc, const std::vector<Tensor>& terms) override {
    check_fold_args(acc, terms, /*host_only=*/true);
    char* p = static_cast<char*>(acc.raw());
    const int64_t bytes = acc.nbytes();
    if (rank_ > 0) recv(p, bytes, rank_ - 1);
    fold_local(acc, terms);
    if (rank_ + 1 < size_) send(p, bytes, rank_ + 1);
    for (int64_t off = 0; off < bytes; off += kPiece)
      DPO_MPI_CHECK(MPI_Bcast(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, size_ - 1, comm_));
  }

  void barrier() override { DPO_MPI_CHECK(MPI_Barrier(comm_)); }

  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  static constexpr int kTag = 7001;
  void send(const char* p, int64_t bytes, int to) {
    for (int64_t off = 0; off < bytes; off += kPiece)
      DPO_MPI_CHECK(MPI_Send(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, to, kTag, comm_));
  }
  void recv(char* p, int64_t bytes, int from) {
    for (int64_t off = 0; off < bytes; off += kPiece)
      DPO_MPI_CHECK(MPI_Recv(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, from, kTag, comm_,
                             MPI_STATUS_IGNORE));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
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
