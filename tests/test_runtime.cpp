// Runtime pieces: tensors and views, the seeded RNG, the error path.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "runtime/backend.h"
#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace dpo {
namespace {

TEST(Tensor, ViewsShareStorageAndAreBoundsChecked) {
  Tensor t = Tensor::host({4, 5}, DType::F32);
  Tensor row = t.view(5, {5});
  row.data<float>()[2] = 3.5f;
  EXPECT_EQ(t.data<float>()[7], 3.5f);
  EXPECT_EQ(row.offset_bytes(), 20);
  EXPECT_THROW(t.view(16, {5}), Error);
  EXPECT_THROW(t.view(-1, {1}), Error);
  EXPECT_THROW(t.data<double>(), Error);  // dtype is checked on access
  EXPECT_EQ(t.size(-1), 5);
  EXPECT_THROW(t.size(2), Error);
}

TEST(Tensor, SizesAre64Bit) {
  // 2^31 + 1 elements of shape product overflow int32; nothing is allocated for a view-less shape check.
  Shape s{65537, 32769};
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  EXPECT_GT(n, int64_t{1} << 31);
  EXPECT_EQ(shape_str(s), "[65537, 32769]");
}

TEST(Tensor, DtypeNamesRoundTrip) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64}) {
    DType u;
    ASSERT_TRUE(dtype_from_name(dtype_name(t), &u));
    EXPECT_EQ(u, t);
  }
  DType u;
  EXPECT_FALSE(dtype_from_name("F8_E4M3", &u));
}

TEST(Rng, SeededAndStateRestorable) {
  Rng a(42), b(42), c(43);
  std::vector<uint64_t> va, vb;
  for (int i = 0; i < 100; ++i) va.push_back(a.next_u64());
  for (int i = 0; i < 100; ++i) vb.push_back(b.next_u64());
  EXPECT_EQ(va, vb);
  EXPECT_NE(va[0], c.next_u64());
  auto st = a.state();
  double x = a.normal();
  a.set_state(st);
  EXPECT_EQ(a.normal(), x);
}

TEST(Rng, XoshiroReferenceValues) {
  // xoshiro256** with state {1, 2, 3, 4}: the first outputs from the reference C implementation
  // (prng.di.unimi.it/xoshiro256starstar.c): 11520, 0, 1509978240, 1215971899390074240.
  Rng r;
  r.set_state({1, 2, 3, 4});
  EXPECT_EQ(r.next_u64(), 11520u);
  EXPECT_EQ(r.next_u64(), 0u);
  EXPECT_EQ(r.next_u64(), 1509978240u);
  EXPECT_EQ(r.next_u64(), 1215971899390074240u);
}

TEST(Rng, MomentsOfUniformAndNormal) {
  Rng r(7);
  const int n = 200000;
  double su = 0, sn = 0, sn2 = 0;
  for (int i = 0; i < n; ++i) {
    double u = r.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    su += u;
    double z = r.normal();
    sn += z;
    sn2 += z * z;
  }
  // Standard errors: uniform mean 0.29/sqrt(n) = 6.5e-4; normal mean 1/sqrt(n) = 2.2e-3; variance sqrt(2/n) = 3.2e-3.
  EXPECT_NEAR(su / n, 0.5, 5 * 6.5e-4);
  EXPECT_NEAR(sn / n, 0.0, 5 * 2.2e-3);
  EXPECT_NEAR(sn2 / n, 1.0, 5 * 3.2e-3);
  std::vector<int> hist(7, 0);
  for (int i = 0; i < 70000; ++i) hist[r.below(7)]++;
  for (int h : hist) EXPECT_NEAR(h, 10000, 5 * 93);  // binomial sd sqrt(70000 * 1/7 * 6/7) = 93
}

TEST(Errors, NameStatementLocationAndRank) {
  setenv("OMPI_COMM_WORLD_RANK", "3", 1);
  try {
    throw_library_error("CUDA", "cudaErrorMemoryAllocation", "cudaMalloc(&p, n)", "x.cu", 12, 1);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("CUDA error cudaErrorMemoryAllocation"), std::string::npos) << m;
    EXPECT_NE(m.find("cudaMalloc(&p, n)"), std::string::npos) << m;
    EXPECT_NE(m.find("x.cu:12"), std::string::npos) << m;
    EXPECT_NE(m.find("device 1"), std::string::npos) << m;
    EXPECT_NE(m.find("rank 3"), std::string::npos) << m;
  }
  unsetenv("OMPI_COMM_WORLD_RANK");
  try {
    DPO_ASSERT(1 + 1 == 3, "arithmetic");
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("1 + 1 == 3"), std::string::npos) << m;
    EXPECT_EQ(m.find("rank"), std::string::npos) << m;
  }
}

TEST(CpuBackend, ChecksShapesAtTheBoundary) {
  auto be = make_cpu_backend();
  Tensor out = be->empty({2, 3, 4}, DType::F32);
  Tensor inp = be->empty({2, 3, 5}, DType::F32);
  Tensor w = be->empty({4}, DType::F32), b = be->empty({4}, DType::F32);
  Tensor mean = be->empty({6}, DType::F32), rstd = be->empty({6}, DType::F32);
  EXPECT_THROW(be->layernorm_forward(out, mean, rstd, inp, w, b, 1e-5), Error);
  Tensor i32 = be->empty({2, 3, 4}, DType::I32);
  EXPECT_THROW(be->gelu_forward(out, i32), Error);
  Tensor w2 = be->empty({5, 7}, DType::F32);
  Tensor o2 = be->empty({2, 3, 7}, DType::F32);
  EXPECT_NO_THROW(be->matmul_forward(o2, inp, w2, Tensor(), WeightLayout::InOut));
  EXPECT_THROW(be->matmul_forward(o2, inp, w2, Tensor(), WeightLayout::OutIn), Error);
  Tensor f64 = be->empty({2, 3, 5}, DType::F64);
  be->copy_from_host(f64, inp);  // converting copy F32 -> F64
  EXPECT_THROW(be->copy(f64, inp), Error);  // plain copy needs equal dtypes
}

}  // namespace
}  // namespace dpo

#ifdef DPO_HAVE_MPI
#include "runtime/mpi_check.h"

namespace dpo {
namespace {

TEST(Errors, MpiFailureNamesStatementAndMpiMessage) {
  // Without MPI_Init (Open MPI would abort in MPI_Error_string) the code is reported by number.
  auto fails = [] { return MPI_ERR_COMM; };
  try {
    DPO_MPI_CHECK(fails());
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("MPI error"), std::string::npos) << m;
    EXPECT_NE(m.find("fails()"), std::string::npos) << m;
    EXPECT_NE(m.find("test_runtime.cpp"), std::string::npos) << m;
    EXPECT_NE(m.find("MPI error code " + std::to_string(MPI_ERR_COMM)), std::string::npos) << m;
  }
  EXPECT_NO_THROW(DPO_MPI_CHECK(MPI_SUCCESS));
}

}  // namespace
}  // namespace dpo
#endif
