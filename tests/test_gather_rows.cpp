// Backend::gather_rows / scatter_add_rows on the CPU backend (kernels/gather.h, the CPU twins the CUDA kernels are
// tested against in test_cuda_gather.cpp): exact results against plain loops, for F64, F32, BF16 and I32 (gather)
// and F64, F32, BF16 (scatter), row widths that are not multiples of anything, outputs poisoned before the call,
// rows no entry names left bit-for-bit as they were, an accumulating scatter run twice giving twice, and bad index
// lists rejected with the entry named and nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

// A host tensor of dtype dt holding v (BF16: rounded once; the values below are chosen bf16-exact where it matters).
Tensor host_of(const std::vector<double>& v, Shape shape, DType dt) {
  Tensor t = Tensor::host(std::move(shape), DType::F64);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(double));
  return dt == DType::F64 ? t : convert_host(t, dt, "test input");
}
std::vector<double> f64(const Tensor& t) {
  const Tensor d = t.dtype() == DType::F64 ? t : convert_host(t, DType::F64, "test output");
  return std::vector<double>(d.data<double>(), d.data<double>() + d.numel());
}
std::vector<unsigned char> bytes(const Tensor& t) {
  const auto* p = static_cast<const unsigned char*>(t.raw());
  return std::vector<unsigned char>(p, p + t.nbytes());
}
Tensor idx_of(const std::vector<int32_t>& v) {
  Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, DType::I32);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}
void fill_bytes(const Tensor& t, unsigned char b) { std::memset(t.raw(), b, static_cast<size_t>(t.nbytes())); }

// n distinct rows of [0, N) in random order.
std::vector<int32_t> random_index(std::mt19937_64& g, int64_t n, int64_t N) {
  std::vector<int32_t> all(static_cast<size_t>(N));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), g);
  all.resize(static_cast<size_t>(n));
  return all;
}

// Small integers times 1/8: exact in bf16 (8 significant bits), and their sums too.
std::vector<double> dyadic(std::mt19937_64& g, size_t n) {
  std::uniform_int_distribution<int> d(-100, 100);
  std::vector<double> v(n);
  for (auto& x : v) x = d(g) / 8.0;
  return v;
}

TEST(GatherRows, GatherCopiesTheNamedRowsExactly) {
  auto be = make_cpu_backend();
  std::mt19937_64 g(test::test_seed());
  for (DType dt : {DType::F64, DType::F32, DType::BF16, DType::I32})
    for (int64_t C : {1, 3, 7, 16, 13 * 9}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " C=" + std::to_string(C));
      const int64_t N = 37, n = 23;
      std::vector<double> v = dyadic(g, static_cast<size_t>(N * C));
      Tensor inp;
      if (dt == DType::I32) {
        inp = Tensor::host({N, C}, DType::I32);
        for (int64_t i = 0; i < N * C; ++i) inp.data<int32_t>()[i] = static_cast<int32_t>(v[i] * 8);
      } else {
        inp = host_of(v, {N, C}, dt);
      }
      const std::vector<int32_t> idx = random_index(g, n, N);
      Tensor out = Tensor::host({n, C}, dt);
      fill_bytes(out, 0xFF);  // NaN in every floating type
      be->gather_rows(out, inp, idx_of(idx));
      const auto es = static_cast<size_t>(dtype_size(dt));
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(std::memcmp(static_cast<const char*>(out.raw()) + i * C * es,
                              static_cast<const char*>(inp.raw()) + idx[static_cast<size_t>(i)] * C * es, C * es),
                  0)
            << "row " << i;
    }
}

TEST(GatherRows, ScatterAddsIntoTheNamedRowsOnly) {
  auto be = make_cpu_backend();
  std::mt19937_64 g(test::test_seed());
  for (DType dt : {DType::F64, DType::F32, DType::BF16})
    for (int64_t C : {1, 5, 16, 13 * 9}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " C=" + std::to_string(C));
      const int64_t N = 41, n = 19;
      // Random values: the result is checked against one addition in the storage type (F32 / F64), or one fp32
      // addition rounded once to bf16 (BF16).
      std::vector<double> a = test::randn<double>(g, static_cast<size_t>(N * C), 1.0);
      std::vector<double> d = test::randn<double>(g, static_cast<size_t>(n * C), 1.0);
      Tensor dinp = host_of(a, {N, C}, dt), dout = host_of(d, {n, C}, dt);
      const std::vector<double> a0 = f64(dinp), d0 = f64(dout);
      const std::vector<unsigned char> before = bytes(dinp);
      const std::vector<int32_t> idx = random_index(g, n, N);
      be->scatter_add_rows(dinp, dout, idx_of(idx));
      const std::vector<double> got = f64(dinp);
      std::vector<bool> named(static_cast<size_t>(N), false);
      for (int32_t r : idx) named[static_cast<size_t>(r)] = true;
      const auto es = dtype_size(dt);
      for (int64_t r = 0; r < N; ++r)
        if (!named[static_cast<size_t>(r)])
          ASSERT_EQ(std::memcmp(before.data() + r * C * es, static_cast<const char*>(dinp.raw()) + r * C * es,
                                static_cast<size_t>(C * es)),
                    0)
              << "row " << r << " is named by no entry but changed";
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < C; ++c) {
          const auto at = static_cast<size_t>(idx[static_cast<size_t>(i)] * C + c);
          const double x = a0[at], y = d0[static_cast<size_t>(i * C + c)];
          double want;
          if (dt == DType::F64) {
            want = x + y;
          } else {
            want = static_cast<float>(x) + static_cast<float>(y);
            if (dt == DType::BF16) want = f64(host_of({want}, {1}, DType::BF16))[0];
          }
          ASSERT_EQ(got[at], want) << "entry " << i << " column " << c;
        }
    }
}

TEST(GatherRows, ScatterTwiceAddsTwice) {
  auto be = make_cpu_backend();
  std::mt19937_64 g(test::test_seed());
  for (DType dt : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const int64_t N = 12, n = 7, C = 9;
    Tensor dinp = Tensor::host({N, C}, dt);
    be->fill_zero(dinp);
    const std::vector<double> d = dyadic(g, static_cast<size_t>(n * C));  // exact sums in every dtype
    const Tensor dout = host_of(d, {n, C}, dt);
    const std::vector<int32_t> idx = random_index(g, n, N);
    be->scatter_add_rows(dinp, dout, idx_of(idx));
    be->scatter_add_rows(dinp, dout, idx_of(idx));
    const std::vector<double> got = f64(dinp);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < C; ++c)
        EXPECT_EQ(got[static_cast<size_t>(idx[static_cast<size_t>(i)] * C + c)], 2 * d[static_cast<size_t>(i * C + c)]);
  }
}

TEST(GatherRows, BadIndexListsAreErrorsNamingTheEntryAndWriteNothing) {
  auto be = make_cpu_backend();
  const int64_t N = 6, C = 3;
  Tensor table = host_of(std::vector<double>(N * C, 1.5), {N, C}, DType::F32);
  auto expect_error = [&](const std::vector<int32_t>& idx, const std::string& what) {
    SCOPED_TRACE(what);
    const auto n = static_cast<int64_t>(idx.size());
    Tensor out = Tensor::host({n, C}, DType::F32);
    fill_bytes(out, 0xAB);
    const std::vector<unsigned char> out0 = bytes(out), table0 = bytes(table);
    try {
      be->gather_rows(out, table, idx_of(idx));
      ADD_FAILURE() << "gather_rows accepted it";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_EQ(bytes(out), out0);
    try {
      be->scatter_add_rows(table, out, idx_of(idx));
      ADD_FAILURE() << "scatter_add_rows accepted it";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_EQ(bytes(table), table0);
  };
  expect_error({0, 2, 6}, "index entry 2 is 6");
  expect_error({1, -1}, "index entry 1 is -1");
  expect_error({4, 0, 3, 0}, "index entry 3 is 0, equal to entry 1");
  // Shapes and dtypes, named.
  Tensor out = Tensor::host({2, C}, DType::F32);
  EXPECT_THROW(be->gather_rows(out, table, idx_of({0, 1, 2})), Error);
  EXPECT_THROW(be->gather_rows(Tensor::host({2, C + 1}, DType::F32), table, idx_of({0, 1})), Error);
  EXPECT_THROW(be->gather_rows(Tensor::host({2, C}, DType::F64), table, idx_of({0, 1})), Error);
  Tensor idx64 = Tensor::host({2}, DType::F64);
  EXPECT_THROW(be->gather_rows(out, table, idx64), Error);
  EXPECT_THROW(be->scatter_add_rows(Tensor::host({N, C}, DType::I32), Tensor::host({2, C}, DType::I32), idx_of({0, 1})),
               Error);
}

}  // namespace
}  // namespace dpo
