// Shared test helpers: seeded random inputs, poisoning, finite-difference gradient checks in double.
#pragma once

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <sys/wait.h>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "kernels/common.h"

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

// --- Sampled GEMM reference in double --------------------------------------------------------------------------
// For GEMMs too large to check whole against a host product (GPT-2 shapes: K up to 50257, outputs of 10^8
// elements), a few rows and columns of X = A @ B are computed in double, with the sum of the magnitudes of the
// terms that error budgets scale with. Products of two floats are exact in double (24 + 24 <= 53 significant bits)
// and the double sums carry at most K * 2^-53 of the magnitude, ~10^-9 of any fp32 budget.

// A read-only strided view of a float matrix: element (i, k) = p[i * rs + k * cs], rows x cols.
struct MatView {
  const float* p;
  int64_t rows, cols, rs, cs;
  float at(int64_t i, int64_t k) const { return p[i * rs + k * cs]; }
  MatView t() const { return {p, cols, rows, cs, rs}; }  // the transpose, same memory
};

// Rows `rows` of X = A @ B (A rows x K, B K x P), each of length P: val[q * P + j] = X(rows[q], j) and
// mag[q * P + j] = sum_k |A(rows[q], k) B(k, j)|. The loop order follows B's memory: dot products along k (in slabs
// of k, so that the sampled rows' slab stays in cache) when B's columns are contiguous (rs == 1), row updates along
// j (in narrow column blocks, so that the accumulators stay in cache) when its rows are (cs == 1). OpenMP over
// blocks of j; the double sums may be reassociated (simd), which moves them by ~K * 2^-53 of the magnitude.
struct SampledRows {
  std::vector<int64_t> rows;
  int64_t P = 0;
  std::vector<double> val, mag;
};

inline SampledRows sampled_product_rows(const MatView& A, const MatView& B, const std::vector<int64_t>& rows) {
  EXPECT_EQ(A.cols, B.rows) << "inner dimensions";
  const int64_t K = A.cols, P = B.cols, R = static_cast<int64_t>(rows.size());
  SampledRows s;
  s.rows = rows;
  s.P = P;
  s.val.assign(static_cast<size_t>(R * P), 0.0);
  s.mag.assign(static_cast<size_t>(R * P), 0.0);
  std::vector<float> arow(static_cast<size_t>(R * K));  // the sampled rows of A, gathered
  for (int64_t q = 0; q < R; ++q)
    for (int64_t k = 0; k < K; ++k) arow[q * K + k] = A.at(rows[q], k);
  const int64_t jblock = B.rs == 1 ? 64 : 32, kslab = 512;
  const int64_t nblocks = (P + jblock - 1) / jblock;
#pragma omp parallel for schedule(dynamic)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t j0 = blk * jblock, j1 = std::min(P, j0 + jblock);
    if (B.rs == 1) {
      for (int64_t k0 = 0; k0 < K; k0 += kslab) {
        const int64_t k1 = std::min(K, k0 + kslab);
        for (int64_t j = j0; j < j1; ++j) {
          const float* bj = B.p + j * B.cs;
          for (int64_t q = 0; q < R; ++q) {
            const float* a = &arow[q * K];
            double v = 0, m = 0;
#pragma omp simd reduction(+ : v, m)
            for (int64_t k = k0; k < k1; ++k) {
              const double t = static_cast<double>(a[k]) * static_cast<double>(bj[k]);
              v += t;
              m += std::fabs(t);
            }
            s.val[q * P + j] += v;
            s.mag[q * P + j] += m;
          }
        }
      }
    } else if (B.cs == 1) {
      for (int64_t k = 0; k < K; ++k) {
        const float* bk = B.p + k * B.rs;
        for (int64_t q = 0; q < R; ++q) {
          const double a = arow[q * K + k];
          double* v = &s.val[q * P];
          double* m = &s.mag[q * P];
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const double t = a * static_cast<double>(bk[j]);
            v[j] += t;
            m[j] += std::fabs(t);
          }
        }
      }
    } else {
      for (int64_t q = 0; q < R; ++q)
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t k = 0; k < K; ++k) {
            const double t = static_cast<double>(arow[q * K + k]) * static_cast<double>(B.at(k, j));
            s.val[q * P + j] += t;
            s.mag[q * P + j] += std::fabs(t);
          }
    }
  }
  return s;
}

// Sampled rows and sampled columns of X = A @ B (M x P): rows.val is [rows x P]; the columns are rows of
// X^T = B^T A^T, so cols.val is [cols x M] (cols.val[q * M + i] = X(i, cols.rows[q])).
struct SampledGemm {
  SampledRows rows, cols;
};

inline SampledGemm sampled_gemm(const MatView& A, const MatView& B, const std::vector<int64_t>& rows,
                                const std::vector<int64_t>& cols) {
  return {sampled_product_rows(A, B, rows), sampled_product_rows(B.t(), A.t(), cols)};
}

// The three products of a dense layer (kernels/matmul.h) as A @ B over row-major host data, for sampled_gemm:
//   forward  out[N,OC]         = inp @ W
//   dinp     dinp[N,C]         = dout @ W^T
//   dw       in w's layout:  InOut dw[C,OC] = inp^T @ dout,   OutIn dw[OC,C] = dout^T @ inp
// W(c, j) is w[c * OC + j] (InOut) or w[j * C + c] (OutIn). `ld` is the row stride of out / dout (OC, or a padded
// stride for logits whose rows are padded).
struct GemmOperands {
  MatView A, B;
};
inline GemmOperands forward_operands(const float* inp, const float* w, int64_t N, int64_t C, int64_t OC,
                                     WeightLayout layout) {
  const MatView W = layout == WeightLayout::InOut ? MatView{w, C, OC, OC, 1} : MatView{w, C, OC, 1, C};
  return {MatView{inp, N, C, C, 1}, W};
}
inline GemmOperands dinp_operands(const float* dout, const float* w, int64_t N, int64_t C, int64_t OC, int64_t ld,
                                  WeightLayout layout) {
  const MatView Wt = layout == WeightLayout::InOut ? MatView{w, OC, C, 1, OC} : MatView{w, OC, C, C, 1};
  return {MatView{dout, N, OC, ld, 1}, Wt};
}
inline GemmOperands dw_operands(const float* dout, const float* inp, int64_t N, int64_t C, int64_t OC, int64_t ld,
                                WeightLayout layout) {
  if (layout == WeightLayout::InOut) return {MatView{inp, C, N, 1, C}, MatView{dout, N, OC, ld, 1}};
  return {MatView{dout, OC, N, 1, ld}, MatView{inp, N, C, C, 1}};
}

// `count` distinct indices drawn from [1, n - 1), plus 0 and n - 1; sorted.
inline std::vector<int64_t> sample_indices(std::mt19937_64& g, int64_t n, int64_t count) {
  std::vector<int64_t> all;
  for (int64_t i = 1; i + 1 < n; ++i) all.push_back(i);
  std::shuffle(all.begin(), all.end(), g);
  all.resize(static_cast<size_t>(std::min<int64_t>(count, static_cast<int64_t>(all.size()))));
  all.push_back(0);
  if (n > 1) all.push_back(n - 1);
  std::sort(all.begin(), all.end());
  return all;
}


// A whole file's bytes ("" when it cannot be read).
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// `s` as one single-quoted shell word.
inline std::string shell_quote(const std::string& s) {
  std::string r = "'";
  for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return r + "'";
}

struct CliResult {
  int code = -1;
  std::string out, err;
};

// Runs `binary args` (args already shell-quoted where needed) through the shell in `dir`, with XDG_CACHE_HOME in
// dir/xdg so that no cache outside the test's folder is touched; captures the exit code, stdout and stderr.
inline CliResult run_cli(const std::string& binary, const std::filesystem::path& dir, const std::string& args) {
  CliResult r;
  if (!std::filesystem::exists(binary)) {
    ADD_FAILURE() << "the binary is not built: " << binary;
    return r;
  }
  const std::string out = (dir / "cli.stdout").string(), err = (dir / "cli.stderr").string();
  const std::string cmd = "cd " + shell_quote(dir.string()) + " && XDG_CACHE_HOME=" +
                          shell_quote((dir / "xdg").string()) + " " + shell_quote(binary) + " " + args + " >" +
                          shell_quote(out) + " 2>" + shell_quote(err);
  const int status = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(status)) << cmd;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

}  // namespace dpo::test
