// The communicator's reductions: a left fold in rank order, the same bits on every rank and the same bits as the
// fold done in one process. Run by ctest on 2 ranks (mpirun); passes on 1 rank too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "test_mpi_util.h"

namespace dpo {
namespace {

using test::world;

// Terms whose sum depends on the order of the additions (mixed magnitudes and signs).
std::vector<Tensor> global_terms(int n_terms, int64_t n, DType dt) {
  std::mt19937_64 g(42);
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
