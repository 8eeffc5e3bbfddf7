// CudaBackend at the shapes GPT-2 124M trains with, each result against a host reference, in fp32 and bf16:
//   - the dense layers' GEMMs (matmul_forward / matmul_backward) with N = 2048 rows, C = 768: c_attn (C -> 3C),
//     attn.c_proj (C -> C), mlp.c_fc (C -> 4C), mlp.c_proj (4C -> C), with and without bias, one case with the
//     weight, bias and their gradients at an odd element offset as views into a flat buffer are (unaligned cuBLASLt
//     operands, the bias-epilogue fallback), and the tied LM head (V = 50257, wte [V, C], OutIn) through LmHead;
//   - attention forward and backward with right-padded rows (real tokens, then padding: how DPO batches are padded),
//     left-padded rows and a row that is all padding, at NH = 12, head size 64, T = 37 and 100, and a small case.
// The GEMM reference is double precision, computed only for sampled rows and columns of each result (64 random rows
// x all columns and all rows x 64 random columns, plus the first and last of each), so the host side stays cheap:
// tests/test_util.h (sampled_gemm, checked against the CPU kernel in tests/test_kernels_cpu.cpp). The attention
// reference is the CPU backend on the same inputs.
// "=" outputs are poisoned (all bytes 0xFF: NaN in F32 and BF16) before each call; "+=" outputs start from random
// finite values; accumulating calls run twice and must give the start plus twice the gradient.
// Without a GPU every test skips with the reason; ctest shows them as skipped, not passed.
//
// GEMM error budgets. eps = FLT_EPSILON = 2^-23 = 2u. Every GEMM here sums K products in fp32 (CUBLAS_COMPUTE_32F;
// K = C forward, OC for dinp, N for dw) plus one more term (the bias, or the gradient being accumulated, through
// beta = 1), in an order cuBLASLt chooses (tiles, tensor-core blocks, split-K partials). The rigorous bound
// (K+1) u sum|terms| (Higham 3.1) is 3e-3 of the magnitude at K = 50257 and could not see a dropped k-tile. With
// random inputs the rounding errors behave as independent zero-mean variables, and the error stays below
// lambda sqrt(K) u sum|terms| except with negligible probability (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019);
// a serial fp32 sum of random-sign terms even stays near u sum|terms| whatever K. Tensor cores (the bf16 GEMMs) may
// truncate instead of rounding when they align and add (Fasi et al., PeerJ CS 2021): a bias toward zero of up to
// 2u per add, which on random-sign partial sums grows like sqrt(K) as well (at most ~0.4 eps sqrt(K) sum|terms|
// even if every add truncated). The budget is
//     |got - exact| <= 4 sqrt(K + 1) eps sum|terms|                                  (fp32 result)
// i.e. lambda = 8 in units of u, and > 10 standard deviations of the truncating model. It still sees one dropped
// product of average size for K <= ~8000 and a dropped block of ~5 products at K = 50257; TF32 inputs (10-bit
// mantissas) fail it at K = 768, and a wrong index, a missing beta (overwrite instead of +=) or a missing bias by far.
// bf16 results (out and dinp with A = BF16): the inputs are bf16 and exact in the reference, products of two bf16
// numbers are exact in fp32, so the fp32 result r' obeys the budget above; the output is r' rounded once to bf16
// (round to nearest), which adds at most half a bf16 ulp at |got| (rounding to nearest never crosses a power of two
// downwards, so ulp(got) >= ulp(r')). Budget: the fp32 budget + ulp_bf16(max(|got|, |exact|)) / 2.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/common.h"
#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::GemmOperands;
using test::SampledGemm;
using test::test_seed;

constexpr double kEps = FLT_EPSILON;
constexpr double kLambda = 4.0;  // in units of eps; see the top
constexpr int64_t kRows = 2048;  // N: GEMM rows (e.g. 2 sequences of 1024 tokens)
constexpr int64_t kSamples = 64;  // random rows and columns per checked matrix

#define DPO_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

// --- bf16 on the host (round to nearest even; the inputs are generated bf16-exact) ---------------------------------

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
float round_bf16(float f) {
  const uint32_t b = bits_of(f);
  return float_of(((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) << 16);  // finite inputs only
}
// The spacing of bf16 numbers at |x| (2^(e-7) for |x| in [2^e, 2^(e+1))); NaN gives NaN, so a NaN never passes.
double ulp_bf16(double x) {
  x = std::fabs(x);
  if (std::isnan(x)) return x;
  if (x == 0.0 || std::isinf(x)) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, std::max(std::ilogb(x), -126) - 7);
}

// Value i of a seeded stream: uniform in [-scale, scale) from splitmix64(seed + i), rounded to bf16 when asked. Any
// thread count gives the same values, so the 38.6M weights of the LM head are generated in parallel.
std::vector<float> uniform_values(uint64_t seed, int64_t n, double scale, bool bf16_exact) {
  std::vector<float> v(static_cast<size_t>(n));
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = seed + static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const double u = static_cast<double>(z >> 40) * 0x1p-24 * 2.0 - 1.0;  // 24 bits: exact in float
    const float x = static_cast<float>(u * scale);
    v[static_cast<size_t>(i)] = bf16_exact ? round_bf16(x) : x;
  }
  return v;
}

// --- device tensors through the Backend API ------------------------------------------------------------------------

// A host tensor of `dtype` (F32 or BF16) holding `v` (bf16-exact when dtype is BF16).
Tensor host_tensor(const std::vector<float>& v, DType dtype, Shape shape) {
  Tensor h = Tensor::host(std::move(shape), dtype);
  EXPECT_EQ(h.numel(), static_cast<int64_t>(v.size()));
  if (dtype == DType::BF16) {
    auto* p = static_cast<uint16_t*>(h.raw());
    for (int64_t i = 0; i < h.numel(); ++i) {
      const uint32_t b = bits_of(v[static_cast<size_t>(i)]);
      EXPECT_EQ(b & 0xffffu, 0u) << "input " << i << " is not bf16-exact";
      p[i] = static_cast<uint16_t>(b >> 16);
    }
  } else {
    std::memcpy(h.raw(), v.data(), v.size() * sizeof(float));
  }
  return h;
}

// A host F32 or BF16 tensor's values as floats (bf16 widened exactly).
std::vector<float> host_values(const Tensor& h) {
  std::vector<float> v(static_cast<size_t>(h.numel()));
  if (h.dtype() == DType::BF16) {
    const auto* p = static_cast<const uint16_t*>(h.raw());
#pragma omp parallel for
    for (int64_t i = 0; i < h.numel(); ++i) v[static_cast<size_t>(i)] = float_of(static_cast<uint32_t>(p[i]) << 16);
  } else {
    EXPECT_EQ(h.dtype(), DType::F32);
    std::memcpy(v.data(), h.raw(), v.size() * sizeof(float));
  }
  return v;
}

// A device tensor of `shape`, `offset` elements into its own allocation (a view, like a parameter inside the flat
// parameter buffer).
Tensor alloc(Backend& be, DType dtype, Shape shape, int64_t offset = 0) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return be.empty({n + offset}, dtype).view(offset, std::move(shape));
}

Tensor upload(Backend& be, const std::vector<float>& v, DType dtype, Shape shape, int64_t offset = 0) {
  Tensor t = alloc(be, dtype, shape, offset);
  be.copy_from_host(t, host_tensor(v, dtype, shape));
  return t;
}

Tensor upload_i32(Backend& be, const std::vector<int32_t>& v, Shape shape) {
  Tensor h = Tensor::host(shape, DType::I32);
  EXPECT_EQ(h.numel(), static_cast<int64_t>(v.size()));
  std::memcpy(h.raw(), v.data(), v.size() * sizeof(int32_t));
  Tensor t = be.empty(std::move(shape), DType::I32);
  be.copy_from_host(t, h);
  return t;
}

std::vector<float> download(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), t.dtype());
  be.copy_to_host(h, t);
  return host_values(h);
}

// All bytes 0xFF (NaN in F32 and BF16), on the backend's stream so that it is ordered before the next op.
void poison(Backend& be, const Tensor& t) {
  if (t.device().kind == DeviceKind::CPU) {
    std::memset(t.raw(), 0xff, static_cast<size_t>(t.nbytes()));
    return;
  }
  DPO_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xff, static_cast<size_t>(t.nbytes()),
                                 static_cast<cudaStream_t>(be.native_stream())));
}

// --- checking sampled rows and columns -----------------------------------------------------------------------------

// For every sampled element (i, j) of an M x P result (all of the sampled rows, all of the sampled columns), with
// x = X(i, j) and m = sum|terms| from the sampled reference: want = want_of(i, j, x) and the budget
// budget_of(i, j, m, got, want). `got` is the whole result, row stride ld. Reports the count and the worst element.
template <class Want, class Budget>
void expect_sampled(const std::vector<float>& got, int64_t ld, const SampledGemm& s, Want want_of, Budget budget_of,
                    const std::string& what) {
  const int64_t P = s.rows.P, M = s.cols.P;
  int64_t bad = 0, checked = 0;
  double worst_ratio = -1;
  std::string worst;
  auto check = [&](int64_t i, int64_t j, double x, double m) {
    const double g = got[static_cast<size_t>(i * ld + j)], w = want_of(i, j, x);
    const double err = std::fabs(g - w), tol = budget_of(i, j, m, g, w);
    ++checked;
    if (!(err <= tol)) ++bad;
    const double ratio = std::isnan(err) ? INFINITY : err / tol;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = "(" + std::to_string(i) + ", " + std::to_string(j) + "): got " + std::to_string(g) + ", want " +
              std::to_string(w) + ", budget " + std::to_string(tol) + ", sum|terms| " + std::to_string(m);
    }
  };
  for (size_t q = 0; q < s.rows.rows.size(); ++q)
    for (int64_t j = 0; j < P; ++j) check(s.rows.rows[q], j, s.rows.val[q * P + j], s.rows.mag[q * P + j]);
  for (size_t q = 0; q < s.cols.rows.size(); ++q)
    for (int64_t i = 0; i < M; ++i) check(i, s.cols.rows[q], s.cols.val[q * M + i], s.cols.mag[q * M + i]);
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << checked << " sampled elements outside the budget; worst "
                    << worst << " (error/budget " << worst_ratio << ")";
}

// --- the LM head ---------------------------------------------------------------------------------------------------

// The tied LM head as GPT2 calls it (model/gpt2.cpp): logits[rows, V] = x[rows, C] @ wte[V, C]^T, WeightLayout::OutIn,
// no bias. Everything these tests assume about the logits' layout is here: ldv() is their row stride (V today, rows
// contiguous). When the logits get a padded stride (ldv = round_up(V, 64)), ldv() and the two calls change; the
// checks index the logits and dlogits with ldv() and leave the padding columns (zero in dlogits) alone.
struct LmHead {
  int64_t V;
  int64_t ldv() const { return GPT2::logits_stride(V); }  // the model's padded logits row (50304 for 50257)
  void forward(Backend& be, const Tensor& logits, const Tensor& x, const Tensor& wte) const {
    be.matmul_forward(logits, x, wte, Tensor(), WeightLayout::OutIn);
  }
  void backward(Backend& be, const Tensor& dx, const Tensor& dwte, const Tensor& dlogits, const Tensor& x,
                const Tensor& wte) const {
    be.matmul_backward(dx, dwte, Tensor(), dlogits, x, wte, WeightLayout::OutIn);
  }
};

// --- GEMM cases ----------------------------------------------------------------------------------------------------

struct GemmCase {
  const char* name;
  int64_t C, OC;
  WeightLayout layout;
  bool bias;
  bool lm_head;    // through LmHead (OutIn, no bias, logits row stride ldv())
  int64_t offset;  // element offset of w, bias, dw, dbias in their allocations (parameters and gradients are views
                   // into one flat buffer; activations are allocations of their own, 256-byte aligned)
  DType dtype;
};

void PrintTo(const GemmCase& c, std::ostream* os) { *os << c.name; }  // gtest's name for a failing case

std::vector<GemmCase> gemm_cases() {
  const int64_t C = 768, V = 50257;
  const WeightLayout io = WeightLayout::InOut;
  std::vector<GemmCase> cases;
  for (DType dt : {DType::F32, DType::BF16}) {
    const bool bf = dt == DType::BF16;
    cases.push_back({bf ? "qkv_bf16" : "qkv_f32", C, 3 * C, io, true, false, 0, dt});
    cases.push_back({bf ? "qkv_nobias_bf16" : "qkv_nobias_f32", C, 3 * C, io, false, false, 0, dt});
    cases.push_back({bf ? "qkv_offset1_bf16" : "qkv_offset1_f32", C, 3 * C, io, true, false, 1, dt});
    cases.push_back({bf ? "attn_proj_bf16" : "attn_proj_f32", C, C, io, true, false, 0, dt});
    cases.push_back({bf ? "fc_bf16" : "fc_f32", C, 4 * C, io, true, false, 0, dt});
    cases.push_back({bf ? "fc_proj_bf16" : "fc_proj_f32", 4 * C, C, io, true, false, 0, dt});
    cases.push_back({bf ? "fc_proj_nobias_bf16" : "fc_proj_nobias_f32", 4 * C, C, io, false, false, 0, dt});
    cases.push_back({bf ? "lm_head_bf16" : "lm_head_f32", C, V, WeightLayout::OutIn, false, true, 0, dt});
  }
  return cases;
}

class CudaGemmShapes : public ::testing::TestWithParam<GemmCase> {
 public:
  void SetUp() override {
    DPO_REQUIRE_GPU();
    gpu_ = make_cuda_backend(0);
  }
  std::unique_ptr<Backend> gpu_;
};

// fp32 budget of a sum of K terms (see the top), plus half a bf16 ulp when the result is stored in bf16.
double gemm_budget(int64_t K, double magnitude, bool bf16_result, double got, double want) {
  const double fp32 = kLambda * std::sqrt(static_cast<double>(K)) * kEps * magnitude;
  return bf16_result ? fp32 + 0.5 * ulp_bf16(std::max(std::fabs(got), std::fabs(want))) : fp32;
}

TEST_P(CudaGemmShapes, ForwardAndBackwardMatchSampledDoubleReference) {
  const GemmCase& gc = GetParam();
  Backend& gpu = *gpu_;
  const int64_t N = kRows, C = gc.C, OC = gc.OC, off = gc.offset;
  const bool bf = gc.dtype == DType::BF16;
  const DType A = gc.dtype, G = grad_dtype(A);
  const LmHead head{OC};
  const int64_t ld = gc.lm_head ? head.ldv() : OC;  // row stride of out and dout
  const Shape w_shape = gc.layout == WeightLayout::InOut ? Shape{C, OC} : Shape{OC, C};
  const uint64_t seed = test_seed();
  std::mt19937_64 g(seed);

  // Inputs in [-1, 1) (bf16-exact for bf16); the added terms at the scale of the products' sums (~sqrt(K) / 3) so
  // that a missing or doubled one is far outside the budget. Gradients (F32) need not be bf16-exact.
  const auto inp = uniform_values(seed + 1, N * C, 1.0, bf), w = uniform_values(seed + 2, C * OC, 1.0, bf);
  const auto bias = uniform_values(seed + 3, OC, std::sqrt(double(C)) / 3, bf);
  auto dout = uniform_values(seed + 4, N * ld, 1.0, bf);
  // Padding columns of dlogits are NaN: a backward GEMM that read them would spread NaN into dinp and dw.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = OC; j < ld; ++j) dout[n * ld + j] = std::numeric_limits<float>::quiet_NaN();
  const auto dinp0 = uniform_values(seed + 5, N * C, std::sqrt(double(OC)) / 3, bf);
  const auto dw0 = uniform_values(seed + 6, C * OC, std::sqrt(double(N)) / 3, false);
  const auto db0 = uniform_values(seed + 7, OC, std::sqrt(double(N)) / 3, false);

  const Tensor d_inp = upload(gpu, inp, A, {N, C}), d_w = upload(gpu, w, A, w_shape, off);
  const Tensor d_bias = gc.bias ? upload(gpu, bias, A, {OC}, off) : Tensor();
  const Tensor d_out = alloc(gpu, A, {N, ld});

  // --- forward (=): twice from poison; the second must repeat the first bitwise (matmul.cuh promises it).
  std::vector<float> out[2];
  for (int rep = 0; rep < 2; ++rep) {
    poison(gpu, d_out);
    if (gc.lm_head) head.forward(gpu, d_out, d_inp, d_w);
    else gpu.matmul_forward(d_out, d_inp, d_w, d_bias, gc.layout);
    out[rep] = download(gpu, d_out);
  }
  EXPECT_TRUE(test::bitwise_equal(out[0], out[1])) << "two identical forward calls differ";
  if (ld > OC) {  // the padding columns, poisoned before the call, are never written (backend.h "Padded rows")
    int64_t written = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = OC; j < ld; ++j) written += std::isnan(out[0][n * ld + j]) ? 0 : 1;
    EXPECT_EQ(written, 0) << "padding columns of out written by the forward";
  }
  {
    const GemmOperands ops = test::forward_operands(inp.data(), w.data(), N, C, OC, gc.layout);
    const SampledGemm ref = test::sampled_gemm(ops.A, ops.B, test::sample_indices(g, N, kSamples),
                                               test::sample_indices(g, OC, kSamples));
    const int64_t K = C + (gc.bias ? 1 : 0);
    expect_sampled(
        out[0], ld, ref, [&](int64_t, int64_t j, double x) { return x + (gc.bias ? double(bias[j]) : 0.0); },
        [&](int64_t, int64_t j, double m, double got, double want) {
          return gemm_budget(K, m + (gc.bias ? std::fabs(double(bias[j])) : 0.0), bf, got, want);
        },
        "out");
  }

  // --- backward (+=): dinp, dw, dbias from random starts; then dw and dbias once more (dinp not passed).
  const Tensor d_dout = upload(gpu, dout, A, {N, ld});
  const Tensor d_dinp = upload(gpu, dinp0, A, {N, C}), d_dw = upload(gpu, dw0, G, w_shape, off);
  const Tensor d_db = gc.bias ? upload(gpu, db0, G, {OC}, off) : Tensor();
  if (gc.lm_head) head.backward(gpu, d_dinp, d_dw, d_dout, d_inp, d_w);
  else gpu.matmul_backward(d_dinp, d_dw, d_db, d_dout, d_inp, d_w, gc.layout);
  const auto dinp = download(gpu, d_dinp), dw1 = download(gpu, d_dw);
  if (gc.lm_head) head.backward(gpu, Tensor(), d_dw, d_dout, d_inp, d_w);
  else gpu.matmul_backward(Tensor(), d_dw, d_db, d_dout, d_inp, d_w, gc.layout);
  const auto dw2 = download(gpu, d_dw);

  {  // dinp = dinp0 + dout @ W^T: OC products + the start, rounded once to bf16 for bf16 storage
    const GemmOperands ops = test::dinp_operands(dout.data(), w.data(), N, C, OC, ld, gc.layout);
    const SampledGemm ref = test::sampled_gemm(ops.A, ops.B, test::sample_indices(g, N, kSamples),
                                               test::sample_indices(g, C, kSamples));
    expect_sampled(
        dinp, C, ref, [&](int64_t i, int64_t j, double x) { return double(dinp0[i * C + j]) + x; },
        [&](int64_t i, int64_t j, double m, double got, double want) {
          return gemm_budget(OC + 1, m + std::fabs(double(dinp0[i * C + j])), bf, got, want);
        },
        "dinp");
  }
  {  // dw (F32, in w's layout): dw0 + G after one call, dw0 + 2G after two; N products + the start per call. The
     // second call's start is dw0 + G, so over both calls the budget's magnitude is 3 sum|terms| + 2 |dw0|.
    const int64_t R = w_shape[0], P = w_shape[1];
    const GemmOperands ops = test::dw_operands(dout.data(), inp.data(), N, C, OC, ld, gc.layout);
    const SampledGemm ref = test::sampled_gemm(ops.A, ops.B, test::sample_indices(g, R, kSamples),
                                               test::sample_indices(g, P, kSamples));
    expect_sampled(
        dw1, P, ref, [&](int64_t i, int64_t j, double x) { return double(dw0[i * P + j]) + x; },
        [&](int64_t i, int64_t j, double m, double got, double want) {
          return gemm_budget(N + 1, m + std::fabs(double(dw0[i * P + j])), false, got, want);
        },
        "dw after one call");
    expect_sampled(
        dw2, P, ref, [&](int64_t i, int64_t j, double x) { return double(dw0[i * P + j]) + 2.0 * x; },
        [&](int64_t i, int64_t j, double m, double got, double want) {
          return gemm_budget(N + 1, 3.0 * m + 2.0 * std::fabs(double(dw0[i * P + j])), false, got, want);
        },
        "dw after two calls (twice the gradient)");
  }
  if (gc.bias) {  // dbias = db0 + 2 * column sums of dout, every column (N * OC adds: cheap)
    const auto db = download(gpu, d_db);
    std::vector<double> sum(static_cast<size_t>(OC), 0.0), mag(static_cast<size_t>(OC), 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < OC; ++j) {
        sum[j] += dout[n * ld + j];
        mag[j] += std::fabs(double(dout[n * ld + j]));
      }
    int64_t bad = 0;
    for (int64_t j = 0; j < OC; ++j) {
      const double want = double(db0[j]) + 2.0 * sum[j];
      const double tol = gemm_budget(N + 1, 3.0 * mag[j] + 2.0 * std::fabs(double(db0[j])), false, 0, 0);
      if (!(std::fabs(db[j] - want) <= tol) && bad++ < 5)
        ADD_FAILURE() << "dbias[" << j << "] = " << db[j] << ", want " << want << ", budget " << tol;
    }
    EXPECT_EQ(bad, 0) << "dbias elements outside the budget";
  }
}

INSTANTIATE_TEST_SUITE_P(Gpt2Small, CudaGemmShapes, ::testing::ValuesIn(gemm_cases()),
                         [](const ::testing::TestParamInfo<GemmCase>& info) { return std::string(info.param.name); });

// --- attention with padded rows ------------------------------------------------------------------------------------
// Budgets (derived in tests/test_cuda_kernels_b.cpp, "attention"): the reductions are over hs (scores, dP) and T
// (att @ v, the gradient products) in fp32 against the CPU twin (float kernels, double where they say so). Forward:
// (hs + T) eps, absolute on the probabilities and relative to max(1, max|out|) on out. Backward on the same saved
// probabilities: 2 (hs + T) eps relative to max(1, max|dqkv|). The GPU backward on the GPU's own probabilities (fp32
// only): 4 (hs + T) eps, as the forward's differences (relative ~(hs + T) eps per probability) enter dqkv linearly.
// For T = 100, hs = 64 these are 2e-5 / 4e-5 / 8e-5, while a wrong mask or a dropped term moves results by 1e-2.
// bf16: both sides read the same bf16 values (the backward the same saved bf16 probabilities), compute in fp32 and
// round each output once (runtime/backend.h; the CPU backend's bf16 mode is the oracle), so each side is within half
// a bf16 ulp of its fp32 value and the fp32 values differ by the fp32 budget: |gpu - cpu| <= one bf16 ulp at the
// larger of the two + the fp32 budget.
// Exact, from the contract (kernels/attention.h): probabilities are 0 for s > t and for masked keys; a query with no
// visible key (left padding, a row that is all padding) has att = 0 and out = 0, not NaN; every other query's
// probabilities sum to 1, right-padded queries included (they see the real keys before them). In the backward,
// masked keys get exactly zero gradient (their probabilities are 0), and so do queries with no visible key: the
// k and v channels of masked positions and the q channels of key-less queries keep their starting values bitwise.

// Row b's real tokens are [begin, end): right padding is end < T, left padding begin > 0, all padding begin = end.
struct PaddedRow {
  int64_t begin, end;
};

struct AttentionCase {
  const char* name;
  int64_t T, C, NH;
  std::vector<PaddedRow> rows;
  DType dtype;
};

void PrintTo(const AttentionCase& c, std::ostream* os) { *os << c.name; }

std::vector<AttentionCase> attention_cases() {
  std::vector<AttentionCase> cases;
  for (DType dt : {DType::F32, DType::BF16}) {
    const bool bf = dt == DType::BF16;
    // full, right-padded (long, one real token), left-padded, all padding
    cases.push_back({bf ? "t37_nh12_bf16" : "t37_nh12_f32", 37, 768, 12, {{0, 37}, {0, 20}, {0, 1}, {9, 37}, {0, 0}}, dt});
    cases.push_back({bf ? "t100_nh12_bf16" : "t100_nh12_f32", 100, 768, 12, {{0, 100}, {0, 63}, {0, 99}, {40, 100}}, dt});
    cases.push_back({bf ? "t19_nh3_bf16" : "t19_nh3_f32", 19, 48, 3, {{0, 7}, {4, 19}, {0, 19}}, dt});  // hs = 16
  }
  return cases;
}

class CudaAttentionPadding : public ::testing::TestWithParam<AttentionCase> {
 public:
  void SetUp() override {
    DPO_REQUIRE_GPU();
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend(0, CpuAttention::Reference);  // saves the probabilities, as the CUDA backend does
  }
  std::unique_ptr<Backend> gpu_, cpu_;
};

// |got[i] - want[i]| <= budget(i, got[i], want[i]) for every i; NaN fails. Reports the count and the worst element.
template <class Budget>
void expect_close(const std::vector<float>& got, const std::vector<float>& want, Budget budget,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_ratio = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i], err = std::fabs(g - w), tol = budget(i, g, w);
    if (!(err <= tol)) ++bad;
    const double ratio = std::isnan(err) ? INFINITY : err / tol;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside the budget; worst at "
                     << worst << ": got " << got[worst] << ", want " << want[worst] << ", budget "
                     << budget(worst, got[worst], want[worst]) << " (error/budget " << worst_ratio << ")";
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(double(x)));
  return m;
}

TEST_P(CudaAttentionPadding, ForwardAndBackwardMatchCpu) {
  const AttentionCase& ac = GetParam();
  Backend &gpu = *gpu_, &cpu = *cpu_;
  const int64_t B = static_cast<int64_t>(ac.rows.size()), T = ac.T, C = ac.C, NH = ac.NH, hs = C / NH;
  const DType A = ac.dtype;
  const bool bf = A == DType::BF16;
  std::mt19937_64 g(test_seed());
  auto normal = [&](int64_t n) {  // N(0, 1): scores q.k / sqrt(hs) ~ N(0, 1), softmax far from uniform and one-hot
    std::vector<float> v = test::randn<float>(g, static_cast<size_t>(n));
    if (bf)
      for (auto& x : v) x = round_bf16(x);
    return v;
  };
  const auto qkv = normal(B * T * 3 * C), dout = normal(B * T * C), dqkv0 = normal(B * T * 3 * C);
  std::vector<int32_t> mask(static_cast<size_t>(B * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) mask[b * T + t] = (t >= ac.rows[b].begin && t < ac.rows[b].end) ? 1 : 0;
  auto visible = [&](int64_t b, int64_t t) {  // query t of row b has a key s <= t to attend to
    return ac.rows[b].end > ac.rows[b].begin && t >= ac.rows[b].begin;
  };

  const Shape saved_shape = cpu.attention_saved_shape(B, T, NH);
  const DType saved_dtype = cpu.attention_saved_dtype(A);
  ASSERT_EQ(gpu.attention_saved_shape(B, T, NH), saved_shape)
      << "the CUDA backend no longer saves the probabilities [B,NH,T,T]: compare its backward on its own saved "
         "state only (and drop the probability checks)";
  ASSERT_EQ(gpu.attention_saved_dtype(A), saved_dtype);

  // CPU reference on host tensors.
  const Tensor c_qkv = host_tensor(qkv, A, {B, T, 3 * C}), c_dout = host_tensor(dout, A, {B, T, C});
  Tensor c_mask = Tensor::host({B, T}, DType::I32);
  std::memcpy(c_mask.raw(), mask.data(), mask.size() * sizeof(int32_t));
  Tensor c_out = Tensor::host({B, T, C}, A), c_saved = Tensor::host(saved_shape, saved_dtype);
  cpu.attention_forward(c_out, c_saved, c_qkv, c_mask, NH);
  Tensor c_dqkv = host_tensor(dqkv0, A, {B, T, 3 * C});
  cpu.attention_backward(c_dqkv, c_dout, c_qkv, c_out, c_saved, NH);
  const auto ref_out = host_values(c_out), ref_att = host_values(c_saved), ref_dqkv = host_values(c_dqkv);

  // GPU forward from poisoned outputs.
  const Tensor d_qkv = upload(gpu, qkv, A, {B, T, 3 * C}), d_mask = upload_i32(gpu, mask, {B, T});
  const Tensor d_out = alloc(gpu, A, {B, T, C}), d_saved = alloc(gpu, saved_dtype, saved_shape);
  poison(gpu, d_out);
  poison(gpu, d_saved);
  gpu.attention_forward(d_out, d_saved, d_qkv, d_mask, NH);
  const auto out = download(gpu, d_out), att = download(gpu, d_saved);

  const double fwd = static_cast<double>(hs + T) * kEps;
  const double out_scale = std::max(1.0, max_abs(ref_out));
  auto bf16_slack = [&](double got, double want) {
    return bf ? ulp_bf16(std::max(std::fabs(got), std::fabs(want))) : 0.0;
  };
  expect_close(att, ref_att, [&](size_t, double a, double b) { return fwd + bf16_slack(a, b); }, "att");
  expect_close(out, ref_out, [&](size_t, double a, double b) { return fwd * out_scale + bf16_slack(a, b); }, "out");

  // The contract's exact values.
  int64_t wrong_zero = 0, wrong_sum = 0, wrong_out = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* row = &att[static_cast<size_t>(((b * NH + h) * T + t) * T)];
        double sum = 0, slack = 0;
        for (int64_t s = 0; s < T; ++s) {
          const bool open = s <= t && mask[b * T + s] != 0;
          if (!open && row[s] != 0.0f) ++wrong_zero;
          sum += row[s];
          slack += bf ? 0.5 * ulp_bf16(row[s]) : 0.0;
        }
        const double want = visible(b, t) ? 1.0 : 0.0;
        if (!(std::fabs(sum - want) <= fwd + slack)) ++wrong_sum;
      }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      if (!visible(b, t))
        for (int64_t c = 0; c < C; ++c) wrong_out += out[static_cast<size_t>((b * T + t) * C + c)] != 0.0f;
  EXPECT_EQ(wrong_zero, 0) << "probabilities that must be exactly 0 (s > t or a masked key)";
  EXPECT_EQ(wrong_sum, 0) << "probability rows that must sum to 1 (a visible key) or be all 0 (none)";
  EXPECT_EQ(wrong_out, 0) << "outputs of queries with no visible key must be exactly 0";

  // GPU backward (+=) on the CPU's saved probabilities, so that only the backward is compared.
  const Tensor d_dout = upload(gpu, dout, A, {B, T, C});
  const Tensor d_saved_ref = upload(gpu, ref_att, saved_dtype, saved_shape);
  const Tensor d_dqkv = upload(gpu, dqkv0, A, {B, T, 3 * C});
  gpu.attention_backward(d_dqkv, d_dout, d_qkv, d_out, d_saved_ref, NH);
  const auto dqkv = download(gpu, d_dqkv);
  const double bwd = 2.0 * static_cast<double>(hs + T) * kEps * std::max(1.0, max_abs(ref_dqkv));
  expect_close(dqkv, ref_dqkv, [&](size_t, double a, double b) { return bwd + bf16_slack(a, b); }, "dqkv");
  int64_t moved = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const size_t base = static_cast<size_t>((b * T + t) * 3 * C);
      if (!visible(b, t))
        for (int64_t c = 0; c < C; ++c) moved += bits_of(dqkv[base + c]) != bits_of(dqkv0[base + c]);  // q
      if (mask[b * T + t] == 0)
        for (int64_t c = C; c < 3 * C; ++c) moved += bits_of(dqkv[base + c]) != bits_of(dqkv0[base + c]);  // k, v
    }
  EXPECT_EQ(moved, 0) << "gradients of masked keys and of key-less queries must be exactly 0";

  // fp32: the GPU backward on the GPU's own probabilities (the training path) against the CPU's.
  if (!bf) {
    const Tensor d_dqkv2 = upload(gpu, dqkv0, A, {B, T, 3 * C});
    gpu.attention_backward(d_dqkv2, d_dout, d_qkv, d_out, d_saved, NH);
    expect_close(download(gpu, d_dqkv2), ref_dqkv, [&](size_t, double, double) { return 2.0 * bwd; },
                 "dqkv through the GPU's own probabilities");
  }
}

INSTANTIATE_TEST_SUITE_P(Gpt2Small, CudaAttentionPadding, ::testing::ValuesIn(attention_cases()),
                         [](const ::testing::TestParamInfo<AttentionCase>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
}  // namespace dpo
