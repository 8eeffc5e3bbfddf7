// Shared test helpers: seeded random inputs, poisoning, finite-difference gradient checks in double.
#pragma once

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

namespace dpo::test {

// A fresh seed per test run would make failures unreproducible; a fixed per-test seed that differs between tests
// keeps inputs "fresh" (not hand-picked) and failures replayable. The seed is printed on failure by SCOPED_TRACE.
inline uint64_t test_seed() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "." + info->name();
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

template <class T>
std::vector<T> randn(std::mt19937_64& g, size_t n, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(g));
  return v;
}

template <class T>
void poison(std::vector<T>& v) {
  for (auto& x : v) x = std::numeric_limits<T>::quiet_NaN();
}

// Central differences of a scalar function f(x) w.r.t. every element of x (x is perturbed in place and restored).
// h = 1e-6 in double: truncation error O(h^2 * f''') and round-off O(eps * |f| / h) are both ~1e-10 for O(1) f.
inline std::vector<double> numeric_grad(std::vector<double>& x, const std::function<double()>& f,
                                        double h = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double x0 = x[i];
    x[i] = x0 + h;
    double fp = f();
    x[i] = x0 - h;
    double fm = f();
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

// max |a-b| / max(1, max|b|): relative to the gradient's scale so tiny entries don't blow up the ratio.
inline double max_rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double scale = 1.0, err = 0.0;
  for (size_t i = 0; i < b.size(); ++i) scale = std::max(scale, std::fabs(b[i]));
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    double e = std::fabs(a[i] - b[i]);
    if (!(e <= err)) err = e;  // NaN propagates
  }
  return err / scale;
}

// Sets the OpenMP thread count for a scope (determinism tests run the same kernel at several counts).
class ThreadCount {
 public:
  explicit ThreadCount(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  // memcmp on an empty vector's (possibly null) data() would be undefined even with size 0
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// A fresh directory per test (<TempDir>/<prefix><test name>), removed when the object goes out of scope.
struct ScratchDir {
  std::filesystem::path dir;
  explicit ScratchDir(const std::string& prefix) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir = std::filesystem::path(::testing::TempDir()) / (prefix + info->name());
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~ScratchDir() { std::filesystem::remove_all(dir); }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string operator/(const std::string& s) const { return (dir / s).string(); }
};

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace dpo::test
