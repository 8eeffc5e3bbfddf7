// The communicator's collectives: reductions are a left fold in rank order, the same bits on every rank and the
// same bits as the fold done in one process; reduce-scatter gives each rank its slice of that fold; all-gather and
// broadcast move bytes exactly. Run by ctest on 2 ranks (mpirun); passes on 1 rank too.
#include <gtest/gtest.h>

#include <cstdlib>

#include <cmath>
#include <cstring>
#include <random>

#include "test_mpi_util.h"

namespace dpo {
namespace {

using test::world;

// Terms whose sum depends on the order of the additions (mixed magnitudes and signs).
std::vector<Tensor> global_terms(int n_terms, int64_t n, DType dt, uint64_t seed = 42) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1, 1), e(-8, 8);
  std::vector<Tensor> out;
  for (int k = 0; k < n_terms; ++k) {
    Tensor t = Tensor::host({n}, dt);
    for (int64_t i = 0; i < n; ++i) {
      const double v = u(g) * std::pow(10.0, e(g));
      if (dt == DType::F32) t.data<float>()[i] = static_cast<float>(v);
      else t.data<double>()[i] = v;
    }
    out.push_back(t);
  }
  return out;
}

void expect_bits_equal(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.nbytes(), b.nbytes());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.nbytes())), 0);
}

void check_fold(DType dt, int n_terms) {
  Communicator& c = world();
  const int64_t n = 1000;
  auto terms = global_terms(n_terms + 1, n, dt);  // terms[0] is rank 0's initial value
  // Expected: the left fold in one process.
  Tensor expect = Tensor::host({n}, dt);
  std::memcpy(expect.raw(), terms[0].raw(), static_cast<size_t>(expect.nbytes()));
  auto local = make_local_communicator();
  local->ordered_fold(expect, std::vector<Tensor>(terms.begin() + 1, terms.end()));
  // Distributed: contiguous uneven shards of the terms, rank order.
  const int R = c.size(), r = c.rank();
  const int64_t base = n_terms / R, extra = n_terms % R;
  const int64_t b = r * base + std::min<int64_t>(r, extra), e = b + base + (r < extra ? 1 : 0);
  Tensor acc = Tensor::host({n}, dt);
  if (r == 0) std::memcpy(acc.raw(), terms[0].raw(), static_cast<size_t>(acc.nbytes()));
  else std::memset(acc.raw(), 0x7f, static_cast<size_t>(acc.nbytes()));  // ignored: only rank 0's acc counts
  c.ordered_fold(acc, std::vector<Tensor>(terms.begin() + 1 + b, terms.begin() + 1 + e));
  expect_bits_equal(acc, expect);
}

TEST(MpiComm, OrderedFoldMatchesOneProcessF32) { check_fold(DType::F32, 7); }
TEST(MpiComm, OrderedFoldMatchesOneProcessF64) { check_fold(DType::F64, 5); }
TEST(MpiComm, OrderedFoldWithFewerTermsThanRanks) { check_fold(DType::F32, 1); }
TEST(MpiComm, OrderedFoldWithNoTerms) { check_fold(DType::F64, 0); }

TEST(MpiComm, AllreduceSumIsInRankOrder) {
  Communicator& c = world();
  const int64_t n = 257;
  auto per_rank = global_terms(c.size(), n, DType::F32);
  Tensor t = Tensor::host({n}, DType::F32);
  std::memcpy(t.raw(), per_rank[static_cast<size_t>(c.rank())].raw(), static_cast<size_t>(t.nbytes()));
  c.allreduce_sum(t);
  std::vector<float> expect(per_rank[0].data<float>(), per_rank[0].data<float>() + n);
  for (int k = 1; k < c.size(); ++k)
    for (int64_t i = 0; i < n; ++i) expect[static_cast<size_t>(i)] += per_rank[static_cast<size_t>(k)].data<float>()[i];
  EXPECT_EQ(std::memcmp(t.raw(), expect.data(), static_cast<size_t>(t.nbytes())), 0);

  double v[3] = {1.0 * (c.rank() + 1), 0.5, -2.0};
  c.allreduce_sum(v, 3);
  const double R = c.size();
  EXPECT_EQ(v[0], R * (R + 1) / 2);
  EXPECT_EQ(v[1], 0.5 * R);
  EXPECT_EQ(v[2], -2.0 * R);
  c.barrier();
}

Tensor copy_of(const Tensor& t) {
  Tensor c = Tensor::host(t.shape(), t.dtype());
  std::memcpy(c.raw(), t.raw(), static_cast<size_t>(t.nbytes()));
  return c;
}

void poison(const Tensor& t) { std::memset(t.raw(), 0xff, static_cast<size_t>(t.nbytes())); }  // NaN for F32/F64

// Every rank holds a `full` of R*S elements (rank q's is per_rank[q]); rank r's shard must be the left fold
// ((full_0 + full_1) + ...) of slice r, bitwise. S odd, so no slice is aligned to anything in particular.
void check_reduce_scatter(DType dt, int64_t S, bool in_place, uint64_t seed) {
  Communicator& c = world();
  const int R = c.size(), r = c.rank();
  auto per_rank = global_terms(R, R * S, dt, seed);
  Tensor expect = copy_of(per_rank[0].view(r * S, {S}));
  std::vector<Tensor> rest;
  for (int q = 1; q < R; ++q) rest.push_back(per_rank[static_cast<size_t>(q)].view(r * S, {S}));
  make_local_communicator()->ordered_fold(expect, rest);

  Tensor full = copy_of(per_rank[static_cast<size_t>(r)]);
  Tensor shard = in_place ? full.view(r * S, {S}) : Tensor::host({S}, dt);
  if (!in_place) poison(shard);
  c.reduce_scatter_sum(shard, full);
  expect_bits_equal(shard, expect);
  if (!in_place) expect_bits_equal(full, per_rank[static_cast<size_t>(r)]);  // full is read only
}

TEST(MpiComm, ReduceScatterIsTheRankOrderFoldF32) { check_reduce_scatter(DType::F32, 333, false, 7); }
TEST(MpiComm, ReduceScatterIsTheRankOrderFoldF64) { check_reduce_scatter(DType::F64, 1001, false, 8); }
TEST(MpiComm, ReduceScatterInPlace) { check_reduce_scatter(DType::F32, 97, true, 9); }
TEST(MpiComm, ReduceScatterSingleElementShards) { check_reduce_scatter(DType::F64, 1, false, 10); }
TEST(MpiComm, ReduceScatterEmptyShards) { check_reduce_scatter(DType::F32, 0, false, 11); }
// Shards of ~1.2 MB: past MPI's eager limit, so every chain message is a rendezvous (a blocking send waits for its
// receive), which is where a wrong message order would deadlock.
TEST(MpiComm, ReduceScatterLargeShards) { check_reduce_scatter(DType::F32, 300001, false, 17); }

// Rank q contributes global[q*S, (q+1)*S); every rank must end with all of global, bitwise.
void check_all_gather(DType dt, int64_t S, bool in_place, uint64_t seed) {
  Communicator& c = world();
  const int R = c.size(), r = c.rank();
  Tensor global = global_terms(1, R * S, dt == DType::F64 ? DType::F64 : DType::F32, seed)[0];
  if (dt == DType::I32)  // reinterpret the float bits: any dtype moves as bytes
    global = Tensor(global.buffer(), 0, DType::I32, {R * S});
  Tensor full = Tensor::host({R * S}, dt);
  poison(full);
  Tensor shard = in_place ? full.view(r * S, {S}) : Tensor::host({S}, dt);
  std::memcpy(shard.raw(), global.view(r * S, {S}).raw(), static_cast<size_t>(shard.nbytes()));
  c.all_gather(full, shard);
  expect_bits_equal(full, global);
}

TEST(MpiComm, AllGatherF32) { check_all_gather(DType::F32, 333, false, 12); }
TEST(MpiComm, AllGatherF64) { check_all_gather(DType::F64, 1001, false, 13); }
TEST(MpiComm, AllGatherInPlaceAnyDtype) { check_all_gather(DType::I32, 97, true, 14); }

// ZeRO-1's round trip: reduce-scatter then all-gather gives every rank the all-reduce, bitwise.
TEST(MpiComm, ReduceScatterThenAllGatherIsAllreduce) {
  Communicator& c = world();
  const int R = c.size(), r = c.rank();
  const int64_t S = 129;
  auto per_rank = global_terms(R, R * S, DType::F32, 15);
  Tensor reduced = copy_of(per_rank[static_cast<size_t>(r)]);
  c.allreduce_sum(reduced);
  Tensor full = copy_of(per_rank[static_cast<size_t>(r)]);
  c.reduce_scatter_sum(full.view(r * S, {S}), full);
  c.all_gather(full, full.view(r * S, {S}));
  expect_bits_equal(full, reduced);
}

TEST(MpiComm, BroadcastBytesFromEveryRoot) {
  Communicator& c = world();
  for (int root = 0; root < c.size(); ++root) {
    std::vector<unsigned char> v(1037);  // odd length
    std::mt19937 g(100 + root);
    std::vector<unsigned char> expect(v.size());
    for (auto& b : expect) b = static_cast<unsigned char>(g());
    if (c.rank() == root) v = expect;
    else std::fill(v.begin(), v.end(), 0xff);
    c.broadcast_bytes(v.data(), static_cast<int64_t>(v.size()), root);
    EXPECT_EQ(v, expect) << "root " << root;
  }
  c.broadcast_bytes(nullptr, 0, 0);  // nothing to move is fine
}

TEST(MpiComm, ShardCollectivesRejectBadShapesAndDtypes) {
  Communicator& c = world();
  const int R = c.size();
  Tensor full = Tensor::host({R * 4 + 1}, DType::F32), shard = Tensor::host({4}, DType::F32);
  EXPECT_THROW(c.reduce_scatter_sum(shard, full), Error);
  EXPECT_THROW(c.all_gather(full, shard), Error);
  Tensor full64 = Tensor::host({R * 4}, DType::F64);
  EXPECT_THROW(c.reduce_scatter_sum(shard, full64), Error);
  Tensor fi = Tensor::host({R * 4}, DType::I32), si = Tensor::host({4}, DType::I32);
  EXPECT_THROW(c.reduce_scatter_sum(si, fi), Error);  // sums are F32/F64 only
  EXPECT_THROW(c.broadcast_bytes(nullptr, 0, R), Error);
}

TEST(MpiComm, LocalShardCollectivesCopy) {
  auto local = make_local_communicator();
  auto src = global_terms(1, 33, DType::F64, 16)[0];
  Tensor dst = Tensor::host({33}, DType::F64);
  poison(dst);
  local->reduce_scatter_sum(dst, src);
  expect_bits_equal(dst, src);
  poison(dst);
  local->all_gather(dst, src);
  expect_bits_equal(dst, src);
  local->reduce_scatter_sum(src, src);  // in place: nothing moves
  local->broadcast_bytes(dst.raw(), dst.nbytes(), 0);
  EXPECT_THROW(local->broadcast_bytes(dst.raw(), dst.nbytes(), 1), Error);
}

TEST(MpiComm, DeviceCommunicatorForTheHostIsTheHostOne) {
  auto host = make_local_communicator();
  Communicator* raw = host.get();
  auto dev = make_device_communicator(std::move(host), Device{});
  EXPECT_EQ(dev.get(), raw);
}

#ifndef DPO_HAVE_NCCL
// Without NCCL a CUDA device keeps the host communicator for one rank and is refused for several.
TEST(MpiComm, CudaDeviceWithoutNcclNeedsOneRank) {
  auto make = [] { return make_device_communicator(make_communicator(), Device{DeviceKind::CUDA, 0}); };
  if (world().size() > 1) EXPECT_THROW(make(), Error);
  else EXPECT_EQ(make()->name(), "local");
  DeviceCommOptions forced;
  forced.nccl = NcclUse::kAlways;
  EXPECT_THROW(make_device_communicator(make_local_communicator(), Device{DeviceKind::CUDA, 0}, forced), Error);
}
#endif

TEST(MpiComm, LaunchedRanksMatchTheCommunicator) {
  Communicator& c = world();
  EXPECT_EQ(c.size(), launcher_size());
  if (c.size() > 1) {
    EXPECT_EQ(c.name(), "mpi");
    EXPECT_EQ(c.rank(), launcher_rank());
  } else {
    EXPECT_EQ(c.name(), "local");
  }
}

TEST(MpiComm, NodeLocalRankFromTheLauncherOrFromHostNames) {
  Communicator& comm = test::world();
  // With the launcher's variable (mpirun sets OMPI_COMM_WORLD_LOCAL_RANK): that value.
  const char* ompi = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  if (ompi) EXPECT_EQ(node_local_rank(comm), std::atoi(ompi));
  // Without any: from an all-gather of host names (all ranks of this test are on one host: local rank = rank).
  std::vector<std::pair<std::string, std::string>> saved;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"}) {
    if (const char* v = std::getenv(name)) saved.emplace_back(name, v);
    ::unsetenv(name);
  }
  EXPECT_EQ(node_local_rank(comm), comm.rank());
  for (const auto& [k, v] : saved) ::setenv(k.c_str(), v.c_str(), 1);
  // The rule on given names: two nodes, interleaved ranks.
  const std::vector<std::string> hosts = {"a", "b", "a", "b", "b"};
  const int want[] = {0, 0, 1, 1, 2};
  for (int r = 0; r < 5; ++r) EXPECT_EQ(local_rank_among(hosts, r), want[r]) << r;
}

TEST(MpiComm, RejectsMismatchedTerms) {
  auto local = make_local_communicator();
  Tensor a = Tensor::host({4}, DType::F32), b = Tensor::host({5}, DType::F32), c = Tensor::host({4}, DType::F64);
  EXPECT_THROW(local->ordered_fold(a, {b}), Error);
  EXPECT_THROW(local->ordered_fold(a, {c}), Error);
  Tensor i = Tensor::host({4}, DType::I32);
  EXPECT_THROW(local->ordered_fold(i, {}), Error);
}

}  // namespace
}  // namespace dpo

DPO_MPI_TEST_MAIN()
