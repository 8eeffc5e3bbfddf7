// The NCCL communicator (runtime/cuda/nccl_comm.h) as one rank in one process: every device collective against
// the host expectation, bitwise (with one rank NCCL's sums are the one-process fold), outputs poisoned before the
// call; host tensors through the wrapped host communicator; the factory; the timeout paths. Without a GPU, or in a
// build without NCCL, every test skips with the reason.
//
// What one rank can show: the layouts (a rank's range [rank*S, (rank+1)*S) of full, views at odd element offsets,
// counts that are not multiples of anything, the bytes around each view untouched), in place and out of place, the
// dtypes each collective takes (sums: F32 and F64, BF16 rejected by the contract; all_gather: any dtype, BF16
// included), the ordering of the overlapped all-reduce (allreduce_sum_async returns without a host wait and
// finish_async waits for the stream work queued before it), and the timeout path of both the blocking and the
// overlapped collectives (a host function that sleeps on the stream stands in for a peer that never arrives).
// What needs two GPUs (two ranks under mpirun, one GPU each; the GPU validation's 2-rank check): that a sum adds the
// ranks' values at all (with one rank an all-reduce or reduce-scatter is the identity, so a wrong reduction, a
// wrong operand order or a missing rank is invisible); that reduce-scatter hands rank r the slice
// [r*S, (r+1)*S) and all-gather puts rank r's shard there (with one rank r = 0 and the slice is all of full); the
// agreement of the ranks' results bit for bit; the NCCL algorithm's summation order against the host fold; and
// the asynchronous-error path (ncclCommGetAsyncError reporting a peer's failure), which only a peer that dies or
// aborts can trigger.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <utility>
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
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
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

// --- layouts at odd offsets ---------------------------------------------------------------------------------------

// A view of n elements at element offset `front` inside an allocation of front + n + back elements that is all 0xff
// bytes first; the bytes around the view must keep that pattern.
struct Guarded {
  Tensor whole, view;
  int64_t front = 0, n = 0;
};

Guarded guarded(OneRank& o, int64_t n, DType dt, int64_t front, int64_t back) {
  Guarded g;
  g.whole = o.poisoned(front + n + back, dt);
  g.view = g.whole.view(front, {n});
  g.front = front;
  g.n = n;
  return g;
}

void fill(OneRank& o, const Tensor& view, const Tensor& host) {
  ASSERT_EQ(view.nbytes(), host.nbytes());
  if (host.nbytes() == 0) return;
  DPO_CUDA_CHECK(cudaMemcpyAsync(view.raw(), host.raw(), static_cast<size_t>(host.nbytes()), cudaMemcpyHostToDevice,
                                 o.ctx.stream()));
  o.ctx.synchronize();
}

void expect_guards_intact(OneRank& o, const Guarded& g, const char* what) {
  const Tensor h = o.to_host(g.whole);
  const auto* b = static_cast<const unsigned char*>(h.raw());
  const int64_t es = dtype_size(h.dtype()), begin = g.front * es, end = (g.front + g.n) * es;
  int64_t touched = 0;
  for (int64_t i = 0; i < h.nbytes(); ++i) touched += (i < begin || i >= end) && b[i] != 0xff;
  EXPECT_EQ(touched, 0) << what << ": bytes outside the view were written";
}

// n elements of any dtype from random bytes (all_gather moves bytes; NaN patterns included).
Tensor random_bytes(int64_t n, DType dt, uint64_t seed) {
  std::mt19937_64 g(seed);
  Tensor t = Tensor::host({n}, dt);
  auto* b = static_cast<unsigned char*>(t.raw());
  for (int64_t i = 0; i < t.nbytes(); ++i) b[i] = static_cast<unsigned char>(g());
  return t;
}

// Host bytes of elements [first, first + count) of a host tensor.
Tensor slice_host(const Tensor& h, int64_t first, int64_t count) {
  Tensor s = Tensor::host({count}, h.dtype());
  const int64_t es = dtype_size(h.dtype());
  if (count > 0) std::memcpy(s.raw(), static_cast<const char*>(h.raw()) + first * es, static_cast<size_t>(count * es));
  return s;
}

// full (R*S elements, a view at an odd offset) -> shard (S elements, another odd offset): the shard is this rank's
// slice of the sum over ranks (with one rank: of full itself), full is read only, nothing around either view moves;
// then in place (shard = full's slice of this rank).
TEST(CudaNccl, ReduceScatterLayoutAtOddOffsetsAndCounts) {
  DPO_REQUIRE_GPU();
  OneRank o;
  const int R = o.comm->size(), r = o.comm->rank();
  for (DType dt : {DType::F32, DType::F64})
    for (int64_t S : {int64_t{1}, int64_t{7}, int64_t{1000003}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " S=" + std::to_string(S));
      const Tensor h = random_host(R * S, dt, 20 + static_cast<uint64_t>(S));
      Guarded full = guarded(o, R * S, dt, 3, 5), shard = guarded(o, S, dt, 1, 2);
      fill(o, full.view, h);
      o.comm->reduce_scatter_sum(shard.view, full.view);
      expect_bits_equal(o.to_host(shard.view), slice_host(h, r * S, S));
      expect_bits_equal(o.to_host(full.view), h);
      expect_guards_intact(o, full, "full");
      expect_guards_intact(o, shard, "shard");
      o.comm->reduce_scatter_sum(full.view.view(r * S, {S}), full.view);  // in place
      expect_bits_equal(o.to_host(full.view), h);
      expect_guards_intact(o, full, "full, in place");
    }
}

// shard (S elements, any dtype: the bytes move) -> full's slice of this rank; in place too.
TEST(CudaNccl, AllGatherLayoutAtOddOffsetsAnyDtype) {
  DPO_REQUIRE_GPU();
  OneRank o;
  const int R = o.comm->size(), r = o.comm->rank();
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::I32})
    for (int64_t S : {int64_t{1}, int64_t{7}, int64_t{100003}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " S=" + std::to_string(S));
      const Tensor h = random_bytes(S, dt, 40 + static_cast<uint64_t>(S));
      Guarded shard = guarded(o, S, dt, 5, 1), full = guarded(o, R * S, dt, 3, 7);
      fill(o, shard.view, h);
      o.comm->all_gather(full.view, shard.view);
      expect_bits_equal(slice_host(o.to_host(full.view), r * S, S), h);
      expect_bits_equal(o.to_host(shard.view), h);
      expect_guards_intact(o, full, "full");
      expect_guards_intact(o, shard, "shard");
      o.comm->all_gather(full.view, full.view.view(r * S, {S}));  // in place
      expect_bits_equal(slice_host(o.to_host(full.view), r * S, S), h);
      expect_guards_intact(o, full, "full, in place");
    }
}

// S = 0 is allowed (comm.h: any S >= 0): nothing is written and nothing fails.
TEST(CudaNccl, EmptyShardsMoveNothing) {
  DPO_REQUIRE_GPU();
  OneRank o;
  Guarded full = guarded(o, 0, DType::F32, 4, 4), shard = guarded(o, 0, DType::F32, 2, 2);
  o.comm->reduce_scatter_sum(shard.view, full.view);
  o.comm->all_gather(full.view, shard.view);
  o.comm->allreduce_sum(full.view);
  o.comm->allreduce_sum_async(full.view);
  o.comm->finish_async();
  expect_guards_intact(o, full, "full");
  expect_guards_intact(o, shard, "shard");
}

// Sums take F32 and F64 only (BF16 gradients are reduced in F32 by contract); shard and full must share a dtype.
TEST(CudaNccl, SumsRejectBf16AndMixedDtypes) {
  DPO_REQUIRE_GPU();
  OneRank o;
  auto expect_error = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no throw, expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  Tensor b16 = o.poisoned(8, DType::BF16), f32 = o.poisoned(8, DType::F32), f64 = o.poisoned(8, DType::F64);
  expect_error([&] { o.comm->allreduce_sum(b16); }, "allreduce_sum: tensors must be F32 or F64, got BF16");
  expect_error([&] { o.comm->allreduce_sum_async(b16); }, "allreduce_sum_async: tensors must be F32 or F64");
  expect_error([&] { o.comm->reduce_scatter_sum(b16, b16); }, "reduce_scatter_sum: tensors must be F32 or F64");
  expect_error([&] { o.comm->reduce_scatter_sum(f32, f64); }, "same dtype");
  expect_error([&] { o.comm->all_gather(f64, f32); }, "same dtype");
  // The communicator is still usable after argument errors (nothing was enqueued).
  Tensor d = o.to_device(random_host(8, DType::F32, 50));
  o.comm->allreduce_sum(d);
}

// --- the overlapped all-reduce ------------------------------------------------------------------------------------

// Buckets of one flat buffer at odd offsets (and an empty one) reduced with allreduce_sum_async after stream work
// that takes 0.4 s and then writes the buffer: the calls return without a host wait, finish_async returns only
// after that work (its event follows the compute stream's), and the result is the buffer as written (with one rank
// the sum is the identity).
TEST(CudaNccl, AsyncAllreduceIsOrderedAfterEarlierStreamWork) {
  DPO_REQUIRE_GPU();
  OneRank o;
  const int64_t n = 1001;
  const Tensor before = random_host(n, DType::F32, 60), after = random_host(n, DType::F32, 61);
  Tensor flat = o.to_device(before), src = o.to_device(after);
  o.comm->allreduce_sum(flat);  // any first-call setup of NCCL happens here, outside the timed part
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  DPO_CUDA_CHECK(cudaLaunchHostFunc(
      o.ctx.stream(), [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(400)); }, nullptr));
  DPO_CUDA_CHECK(cudaMemcpyAsync(flat.raw(), src.raw(), static_cast<size_t>(flat.nbytes()), cudaMemcpyDeviceToDevice,
                                 o.ctx.stream()));
  for (auto [off, len] : {std::pair<int64_t, int64_t>{0, 5}, {5, 500}, {505, 0}, {505, 496}})
    o.comm->allreduce_sum_async(flat.view(off, {len}));
  const double enqueued = std::chrono::duration<double>(Clock::now() - t0).count();
  o.comm->finish_async();
  const double finished = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(enqueued, 0.3) << "allreduce_sum_async waited on the host";
  EXPECT_GE(finished, 0.39) << "finish_async returned before the stream work queued before the all-reduces";
  expect_bits_equal(o.to_host(flat), after);
  o.comm->finish_async();  // nothing pending: returns at once
}

// Host tensors go through the host communicator (local: the identity), and finish_async has nothing to wait for.
TEST(CudaNccl, AsyncAllreduceOfAHostTensor) {
  DPO_REQUIRE_GPU();
  OneRank o;
  const Tensor h = random_host(33, DType::F64, 62);
  Tensor t = Tensor::host({33}, DType::F64);
  std::memcpy(t.raw(), h.raw(), static_cast<size_t>(h.nbytes()));
  o.comm->allreduce_sum_async(t);
  o.comm->finish_async();
  expect_bits_equal(t, h);
}

// The overlapped path's timeout: stream work that outlasts the timeout makes finish_async (the only host wait of
// that path) give up, abort the communicator and say so with the rank and the operation; later calls are refused.
TEST(CudaNccl, AsyncFinishTimeoutAbortsAndNamesTheRank) {
  DPO_REQUIRE_GPU();
  OneRank o(/*timeout_s=*/0.2);
  Tensor d = o.to_device(random_host(64, DType::F32, 63));
  DPO_CUDA_CHECK(cudaLaunchHostFunc(
      o.ctx.stream(), [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(1500)); }, nullptr));
  o.comm->allreduce_sum_async(d);  // no host wait: must not throw
  try {
    o.comm->finish_async();
    ADD_FAILURE() << "no timeout";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("timeout"), std::string::npos) << m;
    EXPECT_NE(m.find("NCCL rank 0 of 1"), std::string::npos) << m;
    EXPECT_NE(m.find("ncclAllReduce (bucketed, overlapped)"), std::string::npos) << m;
    EXPECT_NE(m.find("communicator aborted"), std::string::npos) << m;
  }
  EXPECT_THROW(o.comm->allreduce_sum_async(d), Error);
  EXPECT_THROW(o.comm->allreduce_sum(d), Error);
  o.ctx.synchronize();
}

#else

TEST(CudaNccl, NeedsNccl) { GTEST_SKIP() << "dpo was built without NCCL (no nccl.h / libnccl found by CMake)"; }

#endif  // DPO_HAVE_NCCL

}  // namespace
}  // namespace dpo
