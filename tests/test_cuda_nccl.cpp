// The NCCL communicator (runtime/cuda/nccl_comm.h) as one rank in one process: every device collective against
// the host expectation, bitwise (with one rank NCCL's sums are the one-process fold), outputs poisoned before the
// call; host tensors through the wrapped host communicator; the factory; the timeout path. Several ranks need
// several GPUs and mpirun (the 2-rank check belongs in the GPU validation). Without a GPU, or in a build without
// NCCL, every test skips with the reason.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/comm.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#ifdef DPO_HAVE_NCCL
#include "runtime/cuda/nccl_comm.h"
#endif

namespace dpo {
namespace {

#ifdef DPO_HAVE_NCCL

#define DPO_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine"; \
  } while (0)

// Values whose sums depend on the order of the additions (mixed magnitudes and signs).
Tensor random_host(int64_t n, DType dt, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1, 1), e(-8, 8);
  Tensor t = Tensor::host({n}, dt);
  for (int64_t i = 0; i < n; ++i) {
    const double v = u(g) * std::pow(10.0, e(g));
    if (dt == DType::F32) t.data<float>()[i] = static_cast<float>(v);
    else t.data<double>()[i] = v;
  }
  return t;
}

void expect_bits_equal(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.nbytes(), b.nbytes());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.nbytes())), 0);
}

// One process, device 0: the context first, so that it (and its stream) outlives the communicator and tensors.
struct OneRank {
  explicit OneRank(double timeout_s = 120) : ctx(0) {
    NcclOptions o;
    o.init_timeout_s = 120;
    o.timeout_s = timeout_s;
    comm = make_nccl_communicator(make_local_communicator(), 0, ctx.stream(), o);
  }
  Tensor to_device(const Tensor& h) {
    Tensor d(ctx.alloc(h.nbytes()), 0, h.dtype(), h.shape());
    DPO_CUDA_CHECK(cudaMemcpyAsync(d.raw(), h.raw(), static_cast<size_t>(h.nbytes()), cudaMemcpyHostToDevice,
                                   ctx.stream()));
    ctx.synchronize();
    return d;
  }
  Tensor to_host(const Tensor& d) {
    Tensor h = Tensor::host(d.shape(), d.dtype());
    DPO_CUDA_CHECK(cudaMemcpyAsync(h.raw(), d.raw(), static_cast<size_t>(d.nbytes()), cudaMemcpyDeviceToHost,
                                   ctx.stream()));
    ctx.synchronize();
    return h;
  }
  Tensor poisoned(int64_t n, DType dt) {  // 0xff bytes: NaN in F32 and F64
    Tensor d(ctx.alloc(n * dtype_size(dt)), 0, dt, {n});
    DPO_CUDA_CHECK(cudaMemsetAsync(d.raw(), 0xff, static_cast<size_t>(d.nbytes()), ctx.stream()));
    return d;
  }
  CudaContext ctx;
  std::unique_ptr<Communicator> comm;
};

TEST(CudaNccl, OneRankCommunicatorDescribesItself) {
  DPO_REQUIRE_GPU();
  OneRank o;
  EXPECT_EQ(o.comm->name(), "nccl");
  EXPECT_EQ(o.comm->rank(), 0);
  EXPECT_EQ(o.comm->size(), 1);
  o.comm->barrier();
}

void check_allreduce(DType dt, uint64_t seed) {
  OneRank o;
  const Tensor h = random_host(1001, dt, seed);
  Tensor d = o.to_device(h);
  o.comm->allreduce_sum(d);
  expect_bits_equal(o.to_host(d), h);
}

TEST(CudaNccl, AllreduceSumF32) {
  DPO_REQUIRE_GPU();
  check_allreduce(DType::F32, 1);
}
TEST(CudaNccl, AllreduceSumF64) {
  DPO_REQUIRE_GPU();
  check_allreduce(DType::F64, 2);
}

void check_reduce_scatter(DType dt, int64_t S, uint64_t seed) {
  OneRank o;
  const Tensor h = random_host(S, dt, seed);
  Tensor full = o.to_device(h);
  Tensor shard = o.poisoned(S, dt);
  o.comm->reduce_scatter_sum(shard, full);
  expect_bits_equal(o.to_host(shard), h);
  expect_bits_equal(o.to_host(full), h);  // read only
  o.comm->reduce_scatter_sum(full.view(0, {S}), full);  // in place
  expect_bits_equal(o.to_host(full), h);
}

TEST(CudaNccl, ReduceScatterSumF32) {
  DPO_REQUIRE_GPU();
  check_reduce_scatter(DType::F32, 333, 3);
}
TEST(CudaNccl, ReduceScatterSumF64) {
  DPO_REQUIRE_GPU();
  check_reduce_scatter(DType::F64, 1001, 4);
}

TEST(CudaNccl, AllGatherMovesBytes) {
  DPO_REQUIRE_GPU();
  OneRank o;
  for (DType dt : {DType::F32, DType::F64}) {
    const Tensor h = random_host(517, dt, 5);
    Tensor shard = o.to_device(h);
    Tensor full = o.poisoned(517, dt);
    o.comm->all_gather(full, shard);
    expect_bits_equal(o.to_host(full), h);
    o.comm->all_gather(full, full);  // in place
    expect_bits_equal(o.to_host(full), h);
  }
}

// acc = ((a + t_1) + t_2) + t_3 on the device must be bitwise the host fold (one rank: NCCL adds nothing).
void check_ordered_fold(DType dt, int n_terms, uint64_t seed) {
  OneRank o;
  const int64_t n = 777;
  const Tensor a = random_host(n, dt, seed);
  std::vector<Tensor> terms_h, terms_d;
  for (int k = 0; k < n_terms; ++k) {
    terms_h.push_back(random_host(n, dt, seed + 100 + static_cast<uint64_t>(k)));
    terms_d.push_back(o.to_device(terms_h.back()));
  }
  Tensor expect = Tensor::host({n}, dt);
  std::memcpy(expect.raw(), a.raw(), static_cast<size_t>(a.nbytes()));
  make_local_communicator()->ordered_fold(expect, terms_h);
  Tensor acc = o.to_device(a);
  o.comm->ordered_fold(acc, terms_d);
  expect_bits_equal(o.to_host(acc), expect);
}

TEST(CudaNccl, OrderedFoldF32) {
  DPO_REQUIRE_GPU();
  check_ordered_fold(DType::F32, 3, 6);
}
TEST(CudaNccl, OrderedFoldF64) {
  DPO_REQUIRE_GPU();
  check_ordered_fold(DType::F64, 2, 7);
}
TEST(CudaNccl, OrderedFoldWithNoTerms) {
  DPO_REQUIRE_GPU();
  check_ordered_fold(DType::F32, 0, 8);
}

TEST(CudaNccl, HostTensorsGoThroughTheHostCommunicator) {
  DPO_REQUIRE_GPU();
  OneRank o;
  const Tensor a = random_host(64, DType::F64, 9), t = random_host(64, DType::F64, 10);
  Tensor acc = Tensor::host({64}, DType::F64), expect = Tensor::host({64}, DType::F64);
  std::memcpy(acc.raw(), a.raw(), static_cast<size_t>(a.nbytes()));
  std::memcpy(expect.raw(), a.raw(), static_cast<size_t>(a.nbytes()));
  make_local_communicator()->ordered_fold(expect, {t});
  o.comm->ordered_fold(acc, {t});
  expect_bits_equal(acc, expect);
  double v[2] = {1.5, -2.0};
  o.comm->allreduce_sum(v, 2);
  EXPECT_EQ(v[0], 1.5);
  EXPECT_EQ(v[1], -2.0);
  unsigned char bytes[3] = {1, 2, 3};
  o.comm->broadcast_bytes(bytes, 3, 0);
  EXPECT_EQ(bytes[2], 3);
}

TEST(CudaNccl, RejectsBadArguments) {
  DPO_REQUIRE_GPU();
  OneRank o;
  Tensor i32(o.ctx.alloc(16), 0, DType::I32, {4});
  EXPECT_THROW(o.comm->allreduce_sum(i32), Error);
  Tensor full = o.poisoned(10, DType::F32), shard = o.poisoned(4, DType::F32);
  EXPECT_THROW(o.comm->reduce_scatter_sum(shard, full), Error);
  EXPECT_THROW(o.comm->all_gather(full, shard), Error);
  Tensor host = Tensor::host({10}, DType::F32);
  EXPECT_THROW(o.comm->reduce_scatter_sum(host, full), Error);  // mixed host and device
}

TEST(CudaNccl, DeviceCommunicatorFactory) {
  DPO_REQUIRE_GPU();
  CudaContext ctx(0);
  const Device dev{DeviceKind::CUDA, 0};
  DeviceCommOptions opt;
  opt.cuda_stream = ctx.stream();
  EXPECT_EQ(make_device_communicator(make_local_communicator(), dev, opt)->name(), "local");
  EXPECT_EQ(make_device_communicator(make_local_communicator(), Device{}, opt)->name(), "local");
  opt.nccl = NcclUse::kAlways;
  EXPECT_EQ(make_device_communicator(make_local_communicator(), dev, opt)->name(), "nccl");
  opt.nccl = NcclUse::kWhenDistributed;
  ASSERT_EQ(setenv("DPO_FORCE_NCCL", "1", 1), 0);
  const std::string forced = make_device_communicator(make_local_communicator(), dev, opt)->name();
  unsetenv("DPO_FORCE_NCCL");
  EXPECT_EQ(forced, "nccl");
}

// A stream that does not finish within the timeout: the wait gives up, aborts the communicator and says so, with
// the rank; the communicator then refuses further work. (A host function that sleeps stands in for a peer that
// never arrives.)
TEST(CudaNccl, TimeoutAbortsAndNamesTheRank) {
  DPO_REQUIRE_GPU();
  OneRank o(/*timeout_s=*/0.2);
  Tensor d = o.to_device(random_host(64, DType::F32, 11));
  DPO_CUDA_CHECK(cudaLaunchHostFunc(
      o.ctx.stream(), [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(1500)); }, nullptr));
  try {
    o.comm->allreduce_sum(d);
    ADD_FAILURE() << "no timeout";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("timeout"), std::string::npos) << m;
    EXPECT_NE(m.find("NCCL rank 0 of 1"), std::string::npos) << m;
    EXPECT_NE(m.find("ncclAllReduce"), std::string::npos) << m;
    EXPECT_NE(m.find("communicator aborted"), std::string::npos) << m;
  }
  EXPECT_THROW(o.comm->allreduce_sum(d), Error);
  o.ctx.synchronize();
}

#else

TEST(CudaNccl, NeedsNccl) { GTEST_SKIP() << "dpo was built without NCCL (no nccl.h / libnccl found by CMake)"; }

#endif  // DPO_HAVE_NCCL

}  // namespace
}  // namespace dpo
