// CUDA matmul (cuBLASLt), attention, log-prob and fused multi-tensor AdamW kernels against their CPU twins in float
// (kernels/<op>.cuh vs kernels/<op>.h). In the shape of ggml's test_case: fresh seeded random inputs, the CPU twin as the reference, device
// outputs poisoned with NaN (cudaMemset 0xFF) before each launch, sizes that are not multiples of a warp or a tile,
// (+=) outputs pre-filled with random values, error budgets derived from fp32 round-off and the reduction length,
// bitwise checks where the kernels promise determinism, and a log-prob case whose logits pass 2^32 elements.
// Without a GPU every test skips with the reason; ctest shows them as skipped, not passed.
//
// Tolerance notation: eps = FLT_EPSILON = 2^-23 = 2u (u: fp32 unit round-off). A fp32 sum of K terms in any order
// (FMA or not, tree or serial) is within gamma_K = K u / (1 - K u) of the exact sum, relative to the sum of the
// magnitudes of the terms (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). GPU and CPU twin each carry
// at most that error, so they differ by at most 2 K u = K eps times the magnitude.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_bf16.h>

#include "kernels/adamw.cuh"
#include "kernels/adamw.h"
#include "kernels/attention.cuh"
#include "kernels/attention.h"
#include "kernels/common.h"
#include "kernels/logprob.cuh"
#include "kernels/logprob.h"
#include "kernels/matmul.cuh"
#include "kernels/matmul.h"
#include "kernels/seq_stats.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::randn;
using test::test_seed;

constexpr double kEps = FLT_EPSILON;

// A device array on the context's stream (non-blocking, so every transfer goes through it and then syncs). `offset`
// shifts the array by that many elements from the allocation, to exercise misaligned views (parameters are views
// into one flat buffer at arbitrary float offsets).
template <class T>
class DeviceArray {
 public:
  DeviceArray(CudaContext& ctx, int64_t n, int64_t offset = 0)
      : ctx_(&ctx), n_(n), offset_(offset), buf_(ctx.alloc((n + offset) * static_cast<int64_t>(sizeof(T)))) {}
  DeviceArray(CudaContext& ctx, const std::vector<T>& h, int64_t offset = 0)
      : DeviceArray(ctx, static_cast<int64_t>(h.size()), offset) {
    upload(h);
  }
  T* get() const { return static_cast<T*>(buf_->data()) + offset_; }
  void upload(const std::vector<T>& h) {
    ASSERT_EQ(static_cast<int64_t>(h.size()), n_);
    if (n_ == 0) return;
    DPO_CUDA_CHECK(cudaMemcpyAsync(get(), h.data(), bytes(), cudaMemcpyHostToDevice, ctx_->stream()));
    ctx_->synchronize();
  }
  std::vector<T> download() const { return download_range(0, n_); }
  std::vector<T> download_range(int64_t first, int64_t count) const {
    std::vector<T> h(static_cast<size_t>(count));
    if (count == 0) return h;
    DPO_CUDA_CHECK(cudaMemcpyAsync(h.data(), get() + first, static_cast<size_t>(count) * sizeof(T),
                                   cudaMemcpyDeviceToHost, ctx_->stream()));
    ctx_->synchronize();
    return h;
  }
  // All bytes 0xFF: NaN as a float, so an element the kernel forgets to write shows up.
  void poison() { DPO_CUDA_CHECK(cudaMemsetAsync(get(), 0xFF, bytes(), ctx_->stream())); }
  void zero() { DPO_CUDA_CHECK(cudaMemsetAsync(get(), 0, bytes(), ctx_->stream())); }

 private:
  size_t bytes() const { return static_cast<size_t>(n_) * sizeof(T); }
  CudaContext* ctx_;
  int64_t n_, offset_;
  std::shared_ptr<Buffer> buf_;
};

// Every |got[i] - want[i]| <= tol[i]; NaN fails. Reports how many failed and the worst (or first NaN) element.
void expect_within(const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& tol,
                   const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(tol.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_ratio = 0.0;
  bool nan_seen = false;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(err <= tol[i])) ++bad;
    if (nan_seen) continue;
    if (std::isnan(err)) {
      nan_seen = true;
      worst = i;
      worst_ratio = err;
    } else if (err > 0.0 && (tol[i] == 0.0 || err / tol[i] > worst_ratio)) {
      worst = i;
      worst_ratio = tol[i] == 0.0 ? INFINITY : err / tol[i];
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside the budget; worst at "
                     << worst << ": got " << got[worst] << ", want " << want[worst] << ", budget " << tol[worst]
                     << " (error/budget " << worst_ratio << ")";
}

std::vector<double> constant_tol(size_t n, double tol) { return std::vector<double>(n, tol); }

// --- padded rows (the LM head's logits layout, model/gpt2.h): `rows` rows of stride ld >= width -------------------
// The dense [rows, width] matrix m spread over rows of stride ld, the padding columns filled with `pad`.
std::vector<float> spread_rows(const std::vector<float>& m, int64_t rows, int64_t width, int64_t ld, float pad) {
  std::vector<float> r(static_cast<size_t>(rows * ld), pad);
  for (int64_t n = 0; n < rows; ++n) std::copy_n(m.begin() + n * width, width, r.begin() + n * ld);
  return r;
}
// Columns [0, width) of each row, packed densely.
std::vector<float> valid_rows(const std::vector<float>& p, int64_t rows, int64_t width, int64_t ld) {
  std::vector<float> r(static_cast<size_t>(rows * width));
  for (int64_t n = 0; n < rows; ++n) std::copy_n(p.begin() + n * ld, width, r.begin() + n * width);
  return r;
}
// Padding elements (columns [width, ld) of every row) whose bits differ between `after` and `before`.
size_t padding_changes(const std::vector<float>& after, const std::vector<float>& before, int64_t rows, int64_t width,
                       int64_t ld) {
  size_t changed = 0;
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = width; j < ld; ++j)
      changed += std::memcmp(&after[n * ld + j], &before[n * ld + j], sizeof(float)) != 0;
  return changed;
}
// The bits DeviceArray::poison writes (all bytes 0xFF), as floats.
std::vector<float> poison_bits(size_t n) {
  std::vector<float> v(n);
  std::memset(v.data(), 0xFF, n * sizeof(float));
  return v;
}

double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

using test::bitwise_equal;

class CudaKernelsB : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    ctx_ = std::make_unique<CudaContext>(0);
    gen_.seed(test_seed());
  }
  CudaContext& ctx() { return *ctx_; }
  std::vector<float> rand(int64_t n, double scale = 1.0) { return randn<float>(gen_, static_cast<size_t>(n), scale); }

  std::unique_ptr<CudaContext> ctx_;  // outlives the DeviceArrays of a test body
  std::mt19937_64 gen_;
};

using CudaMatmul = CudaKernelsB;
using CudaAttention = CudaKernelsB;
using CudaLogprob = CudaKernelsB;
using CudaAdamWSegments = CudaKernelsB;

// --- matmul ---------------------------------------------------------------------------------------------------------
// Budgets are per element and rigorous (see the top): a dot product of length K plus one more add (bias or the
// pre-filled gradient) is within (K + 1) u of the exact value relative to its magnitude sum, on either side, so
// |gpu - cpu| <= (K + 2) eps * (sum_k |a_k b_k| + |added term|). With CUBLAS_COMPUTE_32F there is no TF32 (a TF32
// product would miss this by ~1000x, which is part of what the test checks).

const char* layout_name(WeightLayout l) { return l == WeightLayout::InOut ? "InOut" : "OutIn"; }

// W(c, j), the weight of input channel c for output channel j, in either layout.
float w_at(const std::vector<float>& w, int64_t c, int64_t j, int64_t C, int64_t OC, WeightLayout l) {
  return l == WeightLayout::InOut ? w[c * OC + j] : w[j * C + c];
}
size_t w_index(int64_t c, int64_t j, int64_t C, int64_t OC, WeightLayout l) {
  return static_cast<size_t>(l == WeightLayout::InOut ? c * OC + j : j * C + c);
}

struct MatmulCase {
  int64_t N, C, OC;
  WeightLayout layout;
  bool bias;
  int64_t offset;  // elements by which every device array is shifted from its 256-byte aligned allocation
  int64_t ld = 0;  // row stride of out and dout; 0: dense (OC). Padding columns are poisoned with NaN.
  int64_t row_stride() const { return ld > 0 ? ld : OC; }
};

std::string describe(const MatmulCase& m) {
  return "N=" + std::to_string(m.N) + " C=" + std::to_string(m.C) + " OC=" + std::to_string(m.OC) + " " +
         layout_name(m.layout) + (m.bias ? " bias" : " no bias") + " offset=" + std::to_string(m.offset) +
         " ld=" + std::to_string(m.row_stride());
}

const std::vector<MatmulCase>& matmul_cases() {
  static const std::vector<MatmulCase> cases = {
      {37, 77, 53, WeightLayout::InOut, false, 0}, {37, 77, 53, WeightLayout::InOut, true, 0},
      {37, 77, 53, WeightLayout::OutIn, false, 0}, {37, 77, 53, WeightLayout::OutIn, true, 0},
      {300, 257, 130, WeightLayout::InOut, true, 1}, {300, 257, 130, WeightLayout::OutIn, true, 1},
      {1, 5, 3, WeightLayout::InOut, true, 3},     {4, 0, 6, WeightLayout::OutIn, true, 0},  // C = 0: out = bias
      // Padded out / dout (the LM head: OutIn, OC = V not a multiple of 64, ld = round_up(V, 64)); with a bias, the
      // BIAS epilogue on a padded D; a misaligned base; an ld that is a multiple of 16 bytes but not of 64 elements;
      // C = 0 with padding (the bias-rows kernel's stride).
      {37, 77, 257, WeightLayout::OutIn, false, 0, 320},  {37, 77, 257, WeightLayout::InOut, true, 0, 320},
      {300, 64, 1000, WeightLayout::OutIn, true, 0, 1024}, {300, 64, 1000, WeightLayout::OutIn, false, 1, 1024},
      {45, 33, 130, WeightLayout::InOut, false, 0, 132},  {4, 0, 6, WeightLayout::OutIn, true, 0, 8},
  };
  return cases;
}

void matmul_forward_case(CudaKernelsB& f, const MatmulCase& mc) {
  SCOPED_TRACE(describe(mc));
  const int64_t N = mc.N, C = mc.C, OC = mc.OC;
  const auto inp = f.rand(N * C), w = f.rand(C * OC), bias = f.rand(OC);
  const float* bias_h = mc.bias ? bias.data() : nullptr;
  std::vector<float> ref(static_cast<size_t>(N * OC));
  cpu::matmul_forward<float>(ref.data(), inp.data(), w.data(), bias_h, N, C, OC, mc.layout);

  std::vector<double> tol(ref.size());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < OC; ++j) {
      double mag = mc.bias ? std::fabs(static_cast<double>(bias[j])) : 0.0;
      for (int64_t c = 0; c < C; ++c) mag += std::fabs(double(inp[n * C + c]) * double(w_at(w, c, j, C, OC, mc.layout)));
      tol[n * OC + j] = static_cast<double>(C + 2) * kEps * mag;
    }
  }

  const int64_t ld = mc.row_stride();
  DeviceArray<float> d_inp(f.ctx(), inp, mc.offset), d_w(f.ctx(), w, mc.offset), d_bias(f.ctx(), bias, mc.offset);
  DeviceArray<float> d_out(f.ctx(), N * ld, mc.offset);
  d_out.poison();
  cuda::matmul_forward(f.ctx(), d_out.get(), d_inp.get(), d_w.get(), mc.bias ? d_bias.get() : nullptr, N, C, OC,
                       mc.layout, ld);
  const auto got = d_out.download();
  expect_within(valid_rows(got, N, OC, ld), ref, tol, "out");
  EXPECT_EQ(padding_changes(got, poison_bits(got.size()), N, OC, ld), 0u) << "the forward wrote into the padding";
}

TEST_F(CudaMatmul, ForwardMatchesCpu) {
  for (const auto& mc : matmul_cases()) matmul_forward_case(*this, mc);
}

// All three gradients (+=) into random pre-filled buffers, against the CPU twin from the same start.
void matmul_backward_case(CudaKernelsB& f, const MatmulCase& mc) {
  SCOPED_TRACE(describe(mc));
  const int64_t N = mc.N, C = mc.C, OC = mc.OC;
  const auto inp = f.rand(N * C), w = f.rand(C * OC), dout = f.rand(N * OC);
  const auto dinp0 = f.rand(N * C), dw0 = f.rand(C * OC), dbias0 = f.rand(OC);
  auto ref_dinp = dinp0, ref_dw = dw0, ref_dbias = dbias0;
  cpu::matmul_backward<float>(ref_dinp.data(), ref_dw.data(), ref_dbias.data(), dout.data(), inp.data(), w.data(), N,
                              C, OC, mc.layout);

  std::vector<double> tol_dinp(dinp0.size()), tol_dw(dw0.size()), tol_dbias(dbias0.size());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double mag = std::fabs(double(dinp0[n * C + c]));
      for (int64_t j = 0; j < OC; ++j)
        mag += std::fabs(double(dout[n * OC + j]) * double(w_at(w, c, j, C, OC, mc.layout)));
      tol_dinp[n * C + c] = static_cast<double>(OC + 2) * kEps * mag;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < OC; ++j) {
      const size_t idx = w_index(c, j, C, OC, mc.layout);
      double mag = std::fabs(double(dw0[idx]));
      for (int64_t n = 0; n < N; ++n) mag += std::fabs(double(inp[n * C + c]) * double(dout[n * OC + j]));
      tol_dw[idx] = static_cast<double>(N + 2) * kEps * mag;
    }
  }
  for (int64_t j = 0; j < OC; ++j) {
    double mag = std::fabs(double(dbias0[j]));
    for (int64_t n = 0; n < N; ++n) mag += std::fabs(double(dout[n * OC + j]));
    tol_dbias[j] = static_cast<double>(N + 2) * kEps * mag;
  }

  // dout with NaN in its padding columns: a gradient that reads one is NaN and fails its budget.
  const int64_t ld = mc.row_stride();
  const auto dout_padded = spread_rows(dout, N, OC, ld, std::numeric_limits<float>::quiet_NaN());
  DeviceArray<float> d_inp(f.ctx(), inp, mc.offset), d_w(f.ctx(), w, mc.offset),
      d_dout(f.ctx(), dout_padded, mc.offset);
  DeviceArray<float> d_dinp(f.ctx(), dinp0, mc.offset), d_dw(f.ctx(), dw0, mc.offset),
      d_dbias(f.ctx(), dbias0, mc.offset);
  cuda::matmul_backward(f.ctx(), d_dinp.get(), d_dw.get(), d_dbias.get(), d_dout.get(), d_inp.get(), d_w.get(), N, C,
                        OC, mc.layout, ld);
  expect_within(d_dinp.download(), ref_dinp, tol_dinp, "dinp");
  expect_within(d_dw.download(), ref_dw, tol_dw, "dw");
  expect_within(d_dbias.download(), ref_dbias, tol_dbias, "dbias");
}

TEST_F(CudaMatmul, BackwardAccumulatesAndMatchesCpu) {
  for (const auto& mc : matmul_cases()) matmul_backward_case(*this, mc);
}

// A null gradient is skipped and the others are still computed; a buffer that is not passed is not touched.
TEST_F(CudaMatmul, BackwardSkipsNullOutputs) {
  const int64_t N = 29, C = 41, OC = 23;
  for (WeightLayout layout : {WeightLayout::InOut, WeightLayout::OutIn}) {
    SCOPED_TRACE(layout_name(layout));
    const auto inp = rand(N * C), w = rand(C * OC), dout = rand(N * OC);
    const auto dinp0 = rand(N * C), dw0 = rand(C * OC), dbias0 = rand(OC);
    auto ref_dw = dw0, ref_dbias = dbias0, ref_dinp = dinp0;
    cpu::matmul_backward<float>(nullptr, ref_dw.data(), nullptr, dout.data(), inp.data(), w.data(), N, C, OC, layout);
    cpu::matmul_backward<float>(nullptr, nullptr, ref_dbias.data(), dout.data(), inp.data(), w.data(), N, C, OC,
                                layout);
    cpu::matmul_backward<float>(ref_dinp.data(), nullptr, nullptr, dout.data(), inp.data(), w.data(), N, C, OC,
                                layout);

    DeviceArray<float> d_inp(ctx(), inp), d_w(ctx(), w), d_dout(ctx(), dout);
    DeviceArray<float> d_dinp(ctx(), dinp0), d_dw(ctx(), dw0), d_dbias(ctx(), dbias0);
    // Loose-enough budgets for these sizes from the rigorous form above, with magnitudes bounded by max |.|.
    const double m_in = max_abs(inp), m_w = max_abs(w), m_d = max_abs(dout);
    cuda::matmul_backward(ctx(), nullptr, d_dw.get(), nullptr, d_dout.get(), d_inp.get(), d_w.get(), N, C, OC, layout);
    EXPECT_TRUE(bitwise_equal(d_dinp.download(), dinp0)) << "dinp touched";
    EXPECT_TRUE(bitwise_equal(d_dbias.download(), dbias0)) << "dbias touched";
    expect_within(d_dw.download(), ref_dw,
                  constant_tol(ref_dw.size(), (N + 2) * kEps * (N * m_in * m_d + max_abs(dw0))), "dw");
    cuda::matmul_backward(ctx(), nullptr, nullptr, d_dbias.get(), d_dout.get(), d_inp.get(), d_w.get(), N, C, OC,
                          layout);
    EXPECT_TRUE(bitwise_equal(d_dinp.download(), dinp0)) << "dinp touched";
    expect_within(d_dbias.download(), ref_dbias,
                  constant_tol(ref_dbias.size(), (N + 2) * kEps * (N * m_d + max_abs(dbias0))), "dbias");
    cuda::matmul_backward(ctx(), d_dinp.get(), nullptr, nullptr, d_dout.get(), d_inp.get(), d_w.get(), N, C, OC,
                          layout);
    expect_within(d_dinp.download(), ref_dinp,
                  constant_tol(ref_dinp.size(), (OC + 2) * kEps * (OC * m_d * m_w + max_abs(dinp0))), "dinp");
  }
}

// --- attention ------------------------------------------------------------------------------------------------------
// Budgets. The reductions are over hs (scores, dP) and over T (att @ v and the three gradient products), in fp32;
// the CPU twin works in double and rounds once. Scores carry <= hs u * sum|q||k| / sqrt(hs), which moves each
// probability by about that much relative; out = sum_s p_s v_s then adds <= T u * sum p |v|. With unit-normal inputs
// both are of order (hs + T) u times the output scale, so the forward budget is (hs + T) eps relative to
// max(1, max |ref|); the backward chains one more reduction of each kind (dP over hs, then over T) and gets
// 2 (hs + T) eps. For T = 150, hs = 64 that is 2.6e-5 / 5e-5 relative, while a wrong index, a missing mask or a
// dropped term moves results by 1e-2 or more. (Running these kernels through a CPU thread simulation gave errors of
// 1/25 to 1/100 of these budgets; expf on the GPU is within 2 ulp, which does not change the picture.)

struct AttentionCase {
  int64_t B, T, C, NH;
  std::vector<int64_t> pad;  // left padding per sequence; empty = keymask null
};

std::string describe(const AttentionCase& a) {
  std::string s = "B=" + std::to_string(a.B) + " T=" + std::to_string(a.T) + " C=" + std::to_string(a.C) +
                  " NH=" + std::to_string(a.NH) + " pad=";
  if (a.pad.empty()) return s + "none (keymask null)";
  for (int64_t p : a.pad) s += std::to_string(p) + ",";
  return s;
}

const std::vector<AttentionCase>& attention_cases() {
  static const std::vector<AttentionCase> cases = {
      {3, 19, 48, 3, {0, 4, 11}},   // hs = 16; one partial tile
      {3, 19, 48, 3, {}},           // no keymask
      {2, 19, 48, 3, {19, 3}},      // a sequence that is all padding: every row has no visible key
      {2, 150, 128, 2, {0, 70}},    // hs = 64; three score tiles per side, padding across a whole tile
      {1, 200, 96, 1, {130}},       // hs = 96: two column tiles in att @ v; rows 0..129 see no key
  };
  return cases;
}

std::vector<int32_t> left_pad_mask(const AttentionCase& a) {
  std::vector<int32_t> m(static_cast<size_t>(a.B * a.T));
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t t = 0; t < a.T; ++t) m[b * a.T + t] = t >= a.pad[b] ? 1 : 0;
  return m;
}

void attention_forward_case(CudaKernelsB& f, const AttentionCase& ac) {
  SCOPED_TRACE(describe(ac));
  const int64_t B = ac.B, T = ac.T, C = ac.C, NH = ac.NH, hs = C / NH;
  const auto qkv = f.rand(B * T * 3 * C);
  const auto mask = ac.pad.empty() ? std::vector<int32_t>{} : left_pad_mask(ac);
  const int32_t* mask_h = ac.pad.empty() ? nullptr : mask.data();
  std::vector<float> ref_out(static_cast<size_t>(B * T * C)), ref_att(static_cast<size_t>(B * NH * T * T));
  cpu::attention_forward<float>(ref_out.data(), ref_att.data(), qkv.data(), mask_h, B, T, C, NH);

  DeviceArray<float> d_qkv(f.ctx(), qkv), d_out(f.ctx(), B * T * C), d_att(f.ctx(), B * NH * T * T);
  DeviceArray<int32_t> d_mask(f.ctx(), mask);
  d_out.poison();
  d_att.poison();
  cuda::attention_forward(f.ctx(), d_out.get(), d_att.get(), d_qkv.get(), mask_h ? d_mask.get() : nullptr, B, T, C,
                          NH);
  const double budget = static_cast<double>(hs + T) * kEps;
  const auto out = d_out.download(), att = d_att.download();
  expect_within(att, ref_att, constant_tol(ref_att.size(), budget), "att");
  expect_within(out, ref_out, constant_tol(ref_out.size(), budget * std::max(1.0, max_abs(ref_out))), "out");
  // Exact zeros where the contract says so (above the diagonal, masked keys, rows with no visible key).
  size_t nonzero = 0;
  for (size_t i = 0; i < att.size(); ++i) nonzero += (ref_att[i] == 0.0f && att[i] != 0.0f);
  EXPECT_EQ(nonzero, 0u) << "att entries that must be exactly 0";

  // Same inputs, same bits.
  d_out.poison();
  d_att.poison();
  cuda::attention_forward(f.ctx(), d_out.get(), d_att.get(), d_qkv.get(), mask_h ? d_mask.get() : nullptr, B, T, C,
                          NH);
  EXPECT_TRUE(bitwise_equal(d_out.download(), out)) << "out differs between two identical calls";
  EXPECT_TRUE(bitwise_equal(d_att.download(), att)) << "att differs between two identical calls";
}

TEST_F(CudaAttention, ForwardMatchesCpu) {
  for (const auto& ac : attention_cases()) attention_forward_case(*this, ac);
}

// The backward reads the probabilities: both sides get the CPU forward's att, so only the backward is compared.
void attention_backward_case(CudaKernelsB& f, const AttentionCase& ac) {
  SCOPED_TRACE(describe(ac));
  const int64_t B = ac.B, T = ac.T, C = ac.C, NH = ac.NH, hs = C / NH;
  const auto qkv = f.rand(B * T * 3 * C), dout = f.rand(B * T * C), dqkv0 = f.rand(B * T * 3 * C);
  const auto mask = ac.pad.empty() ? std::vector<int32_t>{} : left_pad_mask(ac);
  std::vector<float> out(static_cast<size_t>(B * T * C)), att(static_cast<size_t>(B * NH * T * T));
  cpu::attention_forward<float>(out.data(), att.data(), qkv.data(), ac.pad.empty() ? nullptr : mask.data(), B, T, C,
                                NH);
  auto ref = dqkv0;
  cpu::attention_backward<float>(ref.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH);

  DeviceArray<float> d_qkv(f.ctx(), qkv), d_dout(f.ctx(), dout), d_att(f.ctx(), att), d_dqkv(f.ctx(), dqkv0);
  cuda::attention_backward(f.ctx(), d_dqkv.get(), d_dout.get(), d_qkv.get(), d_att.get(), B, T, C, NH);
  const double budget = 2.0 * static_cast<double>(hs + T) * kEps * std::max(1.0, max_abs(ref));
  expect_within(d_dqkv.download(), ref, constant_tol(ref.size(), budget), "dqkv");
}

TEST_F(CudaAttention, BackwardAccumulatesAndMatchesCpu) {
  for (const auto& ac : attention_cases()) attention_backward_case(*this, ac);
}

// From zero: one call gives g; a second call into the same buffer must give exactly 2g (each element receives one
// `+=` of the same bits, and g + g is exact); a third call from zero in a fresh buffer gives g again.
TEST_F(CudaAttention, BackwardIsBitwiseDeterministic) {
  const AttentionCase ac{2, 150, 128, 2, {0, 70}};
  const int64_t B = ac.B, T = ac.T, C = ac.C, NH = ac.NH;
  const auto qkv = rand(B * T * 3 * C), dout = rand(B * T * C);
  const auto mask = left_pad_mask(ac);
  DeviceArray<float> d_qkv(ctx(), qkv), d_dout(ctx(), dout), d_out(ctx(), B * T * C), d_att(ctx(), B * NH * T * T);
  DeviceArray<int32_t> d_mask(ctx(), mask);
  cuda::attention_forward(ctx(), d_out.get(), d_att.get(), d_qkv.get(), d_mask.get(), B, T, C, NH);

  DeviceArray<float> g1(ctx(), B * T * 3 * C), g2(ctx(), B * T * 3 * C);
  g1.zero();
  cuda::attention_backward(ctx(), g1.get(), d_dout.get(), d_qkv.get(), d_att.get(), B, T, C, NH);
  const auto once = g1.download();
  cuda::attention_backward(ctx(), g1.get(), d_dout.get(), d_qkv.get(), d_att.get(), B, T, C, NH);
  auto twice_expected = once;
  for (auto& x : twice_expected) x *= 2.0f;
  EXPECT_TRUE(bitwise_equal(g1.download(), twice_expected)) << "second accumulation is not exactly 2x the first";
  g2.zero();
  cuda::attention_backward(ctx(), g2.get(), d_dout.get(), d_qkv.get(), d_att.get(), B, T, C, NH);
  EXPECT_TRUE(bitwise_equal(g2.download(), once)) << "two identical calls differ";
  EXPECT_GT(max_abs(once), 0.0);
}

// --- attention, key/value cache (incremental decoding) --------------------------------------------------------------
// The step against its CPU twin (which is bitwise the full attention's row, tests/test_kernels_cpu.cpp). Budget as
// for the forward above: the scores are hs-term dot products, the softmax sum and the weighted sum have pos + 1 <= Tc
// terms, so (hs + Tc) eps relative to max(1, max |ref|). The caches are compared bitwise: the step copies k and v
// into position pos[b] and must leave every other position's bits alone. Positions past pos[b] hold NaN, so a key
// read beyond the sequence turns its output NaN.

struct DecodeCase {
  int64_t B, Tc, C, NH;
  std::vector<int32_t> pos;
};

std::string describe(const DecodeCase& d) {
  std::string s = "B=" + std::to_string(d.B) + " Tc=" + std::to_string(d.Tc) + " C=" + std::to_string(d.C) +
                  " NH=" + std::to_string(d.NH) + " pos=";
  for (int32_t p : d.pos) s += std::to_string(p) + ",";
  return s;
}

// Random caches with NaN at the positions past pos[b] (where pos[b] is in range).
std::pair<std::vector<float>, std::vector<float>> decode_caches(CudaKernelsB& f, const DecodeCase& d) {
  auto kc = f.rand(d.B * d.Tc * d.C), vc = f.rand(d.B * d.Tc * d.C);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t s = std::max<int64_t>(d.pos[b] + 1, 0); s < d.Tc; ++s)
      for (int64_t c = 0; c < d.C; ++c) {
        kc[(b * d.Tc + s) * d.C + c] = std::numeric_limits<float>::quiet_NaN();
        vc[(b * d.Tc + s) * d.C + c] = std::numeric_limits<float>::quiet_NaN();
      }
  return {kc, vc};
}

void attention_decode_case(CudaKernelsB& f, const DecodeCase& dc) {
  SCOPED_TRACE(describe(dc));
  const int64_t B = dc.B, Tc = dc.Tc, C = dc.C, NH = dc.NH, hs = C / NH;
  const auto qkv = f.rand(B * 3 * C);
  const auto [kc, vc] = decode_caches(f, dc);
  auto ref_kc = kc, ref_vc = vc;
  std::vector<float> ref(static_cast<size_t>(B * C));
  cpu::attention_decode_forward<float>(ref.data(), ref_kc.data(), ref_vc.data(), qkv.data(), dc.pos.data(), B, Tc, C,
                                       NH);

  DeviceArray<float> d_qkv(f.ctx(), qkv), d_kc(f.ctx(), kc), d_vc(f.ctx(), vc), d_out(f.ctx(), B * C);
  DeviceArray<int32_t> d_pos(f.ctx(), dc.pos);
  d_out.poison();
  cuda::attention_decode_forward(f.ctx(), d_out.get(), d_kc.get(), d_vc.get(), d_qkv.get(), d_pos.get(), B, Tc, C, NH);
  const auto out = d_out.download();
  const double budget = static_cast<double>(hs + Tc) * kEps * std::max(1.0, max_abs(ref));
  expect_within(out, ref, constant_tol(ref.size(), budget), "out");
  EXPECT_TRUE(bitwise_equal(d_kc.download(), ref_kc)) << "kcache: the new keys, and nothing else";
  EXPECT_TRUE(bitwise_equal(d_vc.download(), ref_vc)) << "vcache: the new values, and nothing else";

  d_out.poison();  // same inputs (the cache now holds the step's k, v at pos, which it rewrites), same bits
  cuda::attention_decode_forward(f.ctx(), d_out.get(), d_kc.get(), d_vc.get(), d_qkv.get(), d_pos.get(), B, Tc, C, NH);
  EXPECT_TRUE(bitwise_equal(d_out.download(), out)) << "out differs between two identical calls";
}

TEST_F(CudaAttention, DecodeStepMatchesCpuTwin) {
  const std::vector<DecodeCase> cases = {
      {3, 19, 48, 3, {0, 18, 7}},           // hs = 16; the first and the last position
      {4, 150, 128, 2, {149, 0, 64, 100}},  // hs = 64 (GPT-2): many keys per warp, a partial last round
      {2, 300, 96, 1, {299, 257}},          // hs = 96: three channel rounds per lane
      {5, 7, 40, 5, {6, 1, 2, 3, 0}},       // hs = 8: fewer channels than lanes
      {1, 40, 2048, 2, {39}},               // hs = 1024 = kDecodeMaxHeadSize: the most shared memory
  };
  for (const auto& dc : cases) attention_decode_case(*this, dc);
}

// A position outside [0, Tc) cannot throw on the device: that sequence's row is NaN and its cache untouched, the
// other sequences are computed as usual.
TEST_F(CudaAttention, DecodeStepWithAPositionOutsideTheCacheGivesANaNRow) {
  const DecodeCase dc{3, 9, 48, 3, {4, 9, -1}};
  const int64_t B = dc.B, Tc = dc.Tc, C = dc.C, NH = dc.NH;
  const auto qkv = rand(B * 3 * C);
  const auto [kc, vc] = decode_caches(*this, dc);
  // The twin throws on the bad positions; its reference for sequence 0 alone.
  auto ref_kc = kc, ref_vc = vc;
  std::vector<float> ref(static_cast<size_t>(C));
  cpu::attention_decode_forward<float>(ref.data(), ref_kc.data(), ref_vc.data(), qkv.data(), dc.pos.data(), 1, Tc, C,
                                       NH);
  DeviceArray<float> d_qkv(ctx(), qkv), d_kc(ctx(), kc), d_vc(ctx(), vc), d_out(ctx(), B * C);
  DeviceArray<int32_t> d_pos(ctx(), dc.pos);
  d_out.zero();
  cuda::attention_decode_forward(ctx(), d_out.get(), d_kc.get(), d_vc.get(), d_qkv.get(), d_pos.get(), B, Tc, C, NH);
  const auto out = d_out.download();
  const std::vector<float> row0(out.begin(), out.begin() + C);
  expect_within(row0, ref, constant_tol(ref.size(), (C / NH + Tc) * kEps * std::max(1.0, max_abs(ref))), "row 0");
  for (int64_t i = C; i < B * C; ++i) ASSERT_TRUE(std::isnan(out[i])) << "element " << i << " of the bad rows";
  // Sequence 0's cache got its step; sequences 1 and 2 are as they were.
  const auto tail = [&](const std::vector<float>& v) { return std::vector<float>(v.begin() + Tc * C, v.end()); };
  const std::vector<float> ref_row0(ref_kc.begin(), ref_kc.begin() + Tc * C);
  EXPECT_TRUE(bitwise_equal(d_kc.download_range(0, Tc * C), ref_row0));
  EXPECT_TRUE(bitwise_equal(d_kc.download_range(Tc * C, 2 * Tc * C), tail(kc)));
  EXPECT_TRUE(bitwise_equal(d_vc.download_range(Tc * C, 2 * Tc * C), tail(vc)));
}

TEST_F(CudaAttention, CacheStoreCopiesTheKeysAndValuesBitwise) {
  for (const auto& [B, T, Tc, C] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {3, 7, 10, 48}, {2, 150, 150, 128}, {1, 0, 4, 16}}) {
    SCOPED_TRACE("B=" + std::to_string(B) + " T=" + std::to_string(T) + " Tc=" + std::to_string(Tc));
    const auto qkv = rand(B * T * 3 * C);
    std::vector<float> kc(static_cast<size_t>(B * Tc * C)), vc(kc.size());
    std::memset(kc.data(), 0xFF, kc.size() * sizeof(float));  // the device poison's bits: untouched positions keep it
    std::memset(vc.data(), 0xFF, vc.size() * sizeof(float));
    cpu::attention_cache_store<float>(kc.data(), vc.data(), qkv.data(), B, T, Tc, C);
    DeviceArray<float> d_qkv(ctx(), qkv), d_kc(ctx(), B * Tc * C), d_vc(ctx(), B * Tc * C);
    d_kc.poison();
    d_vc.poison();
    cuda::attention_cache_store(ctx(), d_kc.get(), d_vc.get(), d_qkv.get(), B, T, Tc, C);
    EXPECT_TRUE(bitwise_equal(d_kc.download(), kc));
    EXPECT_TRUE(bitwise_equal(d_vc.download(), vc));
  }
}

// --- logprob --------------------------------------------------------------------------------------------------------
// Budgets. The sum of exponentials is a sum of positive terms, so its relative error is bounded by the number of
// roundings on any path to the result: a block of >= 256 threads leaves each thread at most V/256 terms (each term
// carries a few roundings from the subtraction and expf, and a running rescale), plus a log2(threads)-level tree.
// (V/256 + 48) eps covers that with margin and is the absolute error of log(sum); the gather and the final
// subtraction add a few eps times |x_t| + |lp|. The per-sequence sum is in double on both sides.
// For dlogits = g (onehot - p): |dp| <= p * (error of log sum) + a few eps, and p <= 1.

double lse_budget(int64_t V) { return (static_cast<double>(V) / 256.0 + 48.0) * kEps; }

struct LogprobData {
  int64_t B, T, V;
  std::vector<float> logits, weights;
  std::vector<int32_t> targets;
};

// Rows at different absolute levels (one 60 above the rest: the log-sum-exp must subtract the max), a prompt
// prefix and a padded tail with weight 0 and garbage targets (-1, V + 17), and non-unit weights.
LogprobData make_logprob_data(CudaKernelsB& f, int64_t B, int64_t T, int64_t V) {
  LogprobData d{B, T, V, f.rand(B * T * V, 2.0), std::vector<float>(static_cast<size_t>(B * T), 1.0f), {}};
  std::uniform_real_distribution<double> shift(-5.0, 5.0);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  for (int64_t r = 0; r < B * T; ++r) {
    const float s = static_cast<float>(r == 3 ? 60.0 : shift(f.gen_));
    for (int64_t v = 0; v < V; ++v) d.logits[r * V + v] += s;
  }
  for (int64_t b = 0; b < B; ++b) {
    d.weights[b * T + 0] = 0.0f;  // prompt
    d.weights[b * T + 1] = 0.0f;
  }
  d.weights[(B - 1) * T + T - 1] = 0.0f;  // padding
  d.weights[T - 1] = 0.5f;
  d.weights[T + 3] = 2.0f;
  d.targets.resize(static_cast<size_t>(B * T));
  for (int64_t r = 0; r < B * T; ++r) {
    d.targets[r] = d.weights[r] != 0.0f ? tok(f.gen_) : (r % 2 ? -1 : static_cast<int32_t>(V + 17));
  }
  return d;
}

// Per-row lp budgets; 0 where the weight is 0 (the result must be exactly 0 there).
std::vector<double> lp_budgets(const LogprobData& d, const std::vector<float>& ref_lp) {
  std::vector<double> tol(ref_lp.size(), 0.0);
  for (int64_t r = 0; r < d.B * d.T; ++r) {
    if (d.weights[r] == 0.0f) continue;
    const double xt = d.logits[r * d.V + d.targets[r]];
    tol[r] = lse_budget(d.V) + 4.0 * kEps * (1.0 + std::fabs(xt) + std::fabs(double(ref_lp[r])));
  }
  return tol;
}

std::vector<double> seq_budgets(const LogprobData& d, const std::vector<float>& ref_lp,
                                const std::vector<double>& lp_tol) {
  std::vector<double> tol(static_cast<size_t>(d.B), 0.0);
  for (int64_t b = 0; b < d.B; ++b) {
    double mag = 0.0;
    for (int64_t t = 0; t < d.T; ++t) {
      const double w = std::fabs(double(d.weights[b * d.T + t]));
      tol[b] += w * lp_tol[b * d.T + t];
      mag += w * std::fabs(double(ref_lp[b * d.T + t]));
    }
    tol[b] += 4.0 * kEps * mag;
  }
  return tol;
}

// ld > V: the device logits are rows of stride ld with NaN in the padding (the CPU reference reads dense rows).
void logprob_forward_case(CudaKernelsB& f, int64_t B, int64_t T, int64_t V, int64_t ld = 0) {
  if (ld == 0) ld = V;
  SCOPED_TRACE("B=" + std::to_string(B) + " T=" + std::to_string(T) + " V=" + std::to_string(V) +
               " ld=" + std::to_string(ld));
  const auto d = make_logprob_data(f, B, T, V);
  std::vector<float> ref_seq(static_cast<size_t>(B)), ref_lp(static_cast<size_t>(B * T));
  cpu::logprob_forward<float>(ref_seq.data(), ref_lp.data(), d.logits.data(), d.targets.data(), d.weights.data(), B, T,
                              V);
  const auto lp_tol = lp_budgets(d, ref_lp);
  const auto seq_tol = seq_budgets(d, ref_lp, lp_tol);

  DeviceArray<float> d_logits(f.ctx(), spread_rows(d.logits, B * T, V, ld, std::numeric_limits<float>::quiet_NaN()));
  DeviceArray<float> d_weights(f.ctx(), d.weights);
  DeviceArray<int32_t> d_targets(f.ctx(), d.targets);
  DeviceArray<float> d_seq(f.ctx(), B), d_lp(f.ctx(), B * T);
  d_seq.poison();
  d_lp.poison();
  cuda::logprob_forward(f.ctx(), d_seq.get(), d_lp.get(), d_logits.get(), d_targets.get(), d_weights.get(), B, T, V,
                        ld);
  const auto seq = d_seq.download(), lp = d_lp.download();
  expect_within(lp, ref_lp, lp_tol, "token_logp");
  expect_within(seq, ref_seq, seq_tol, "seq_logp");

  // token_logp null (the launcher uses a scratch): same sequence sums, bit for bit.
  d_seq.poison();
  cuda::logprob_forward(f.ctx(), d_seq.get(), nullptr, d_logits.get(), d_targets.get(), d_weights.get(), B, T, V,
                        ld);
  EXPECT_TRUE(bitwise_equal(d_seq.download(), seq)) << "seq_logp differs without token_logp";

  // Determinism: the same call again gives the same bits.
  d_seq.poison();
  d_lp.poison();
  cuda::logprob_forward(f.ctx(), d_seq.get(), d_lp.get(), d_logits.get(), d_targets.get(), d_weights.get(), B, T, V,
                        ld);
  EXPECT_TRUE(bitwise_equal(d_seq.download(), seq)) << "seq_logp differs between two identical calls";
  EXPECT_TRUE(bitwise_equal(d_lp.download(), lp)) << "token_logp differs between two identical calls";
}

TEST_F(CudaLogprob, ForwardMatchesCpu) {
  logprob_forward_case(*this, 3, 7, 1000);   // rows 16-byte aligned: the float4 path over whole rows
  logprob_forward_case(*this, 3, 7, 50257);  // odd V: rows start at every 16-byte phase (head / body / tail)
  logprob_forward_case(*this, 2, 5, 3);      // V smaller than a float4 and than the block
}

// Padded rows (the LM head's layout, model/gpt2.h): ld = round_up(V, 64) puts every row on the float4 path; an ld
// that is not a multiple of 4 floats puts rows at every phase again. NaN in the padding must never be read.
TEST_F(CudaLogprob, ForwardWithPaddedRowsMatchesCpu) {
  logprob_forward_case(*this, 3, 7, 50257, 50304);
  logprob_forward_case(*this, 3, 7, 1000, 1024);
  logprob_forward_case(*this, 3, 7, 257, 259);
  logprob_forward_case(*this, 2, 5, 3, 64);
}

// --- per-sequence statistics (kernels/seq_stats.h) ------------------------------------------------------------------
// The row's logit sum is an fp32 sum of V terms over the block (each thread's strided elements, then a 9-level tree):
// at most V/512 + 16 + 9 roundings on any path, so (V/256 + 48) eps times the sum of |x| over the row bounds it, as
// for the log-sum-exp. The per-sequence sums are double on both sides; the CPU twin's result (double, then one
// rounding to float) and the GPU's each add one float rounding of the total. The token count is exact.
std::vector<double> logit_sum_budgets(const LogprobData& d, const std::vector<float>& ref_stats) {
  std::vector<double> tol(ref_stats.size(), 0.0);
  for (int64_t b = 0; b < d.B; ++b) {
    double t = 0.0;
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t r = b * d.T + s;
      if (d.weights[r] == 0.0f) continue;
      double mag = 0.0;
      for (int64_t v = 0; v < d.V; ++v) mag += std::fabs(double(d.logits[r * d.V + v]));
      t += lse_budget(d.V) * mag;
    }
    const double sum = ref_stats[b * kSeqStatsWidth + kSeqLogitSum];
    tol[b * kSeqStatsWidth + kSeqLogitSum] = t + 2.0 * kEps * std::fabs(sum);
  }
  return tol;
}

// bf16 logits: the same values as `logits` when those are already bf16-representable (round_to_bf16 below).
uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>(u >> 16);  // exact: the value is a bf16 already
}
void round_to_bf16(std::vector<float>& v) {
  for (float& x : v) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;  // round to nearest even (finite inputs)
    std::memcpy(&x, &u, sizeof u);
  }
}

// The CUDA forward with seq_stats against the CPU twin's, for fp32 or bf16 logits (Bf16: the logits are rounded to
// bf16 first, and the CPU twin reads the same values in float). ld > V: NaN in the padding (never read).
template <bool Bf16>
void logprob_stats_case(CudaKernelsB& f, int64_t B, int64_t T, int64_t V, int64_t ld = 0) {
  if (ld == 0) ld = V;
  SCOPED_TRACE(std::string(Bf16 ? "bf16" : "fp32") + " B=" + std::to_string(B) + " T=" + std::to_string(T) +
               " V=" + std::to_string(V) + " ld=" + std::to_string(ld));
  auto d = make_logprob_data(f, B, T, V);
  if (Bf16) round_to_bf16(d.logits);
  std::vector<float> ref_seq(static_cast<size_t>(B)), ref_lp(static_cast<size_t>(B * T)),
      ref_stats(static_cast<size_t>(B * kSeqStatsWidth));
  cpu::logprob_forward<float>(ref_seq.data(), ref_lp.data(), ref_stats.data(), d.logits.data(), d.targets.data(),
                              d.weights.data(), B, T, V, V);
  const auto lp_tol = lp_budgets(d, ref_lp);
  const auto seq_tol = seq_budgets(d, ref_lp, lp_tol);
  auto stats_tol = logit_sum_budgets(d, ref_stats);
  for (int64_t b = 0; b < B; ++b) stats_tol[b * kSeqStatsWidth + kSeqLogp] = seq_tol[b];  // kSeqTokens: 0, exact
  // kSeqWpoLogp: per scored row (weight != 0, unweighted) lp - (log s2 - 2 log s); s2, the fp32 sum of the squared
  // exponentials, carries the same relative rounding as s, so log s2 - 2 log s takes up to three log-sum-exp budgets
  // beside lp's own; plus one float rounding of each total.
  for (int64_t b = 0; b < B; ++b) {
    double t = 0.0;
    for (int64_t s = 0; s < T; ++s)
      if (d.weights[b * T + s] != 0.0f) t += lp_tol[b * T + s] + 3.0 * lse_budget(V);
    const double v = ref_stats[b * kSeqStatsWidth + kSeqWpoLogp];
    stats_tol[b * kSeqStatsWidth + kSeqWpoLogp] = t + 2.0 * kEps * std::fabs(v);
  }

  const auto padded = spread_rows(d.logits, B * T, V, ld, std::numeric_limits<float>::quiet_NaN());
  DeviceArray<float> d_logits32(f.ctx(), Bf16 ? std::vector<float>() : padded);
  std::vector<uint16_t> h16;
  if (Bf16) {
    h16.resize(padded.size());
    for (size_t i = 0; i < padded.size(); ++i) h16[i] = std::isnan(padded[i]) ? uint16_t(0x7FC0) : bf16_bits(padded[i]);
  }
  DeviceArray<uint16_t> d_logits16(f.ctx(), h16);
  DeviceArray<float> d_weights(f.ctx(), d.weights);
  DeviceArray<int32_t> d_targets(f.ctx(), d.targets);
  DeviceArray<float> d_seq(f.ctx(), B), d_lp(f.ctx(), B * T), d_stats(f.ctx(), B * kSeqStatsWidth);
  auto run = [&](float* seq, float* lp, float* stats) {
    if constexpr (Bf16) {
      cuda::logprob_forward(f.ctx(), seq, lp, stats, reinterpret_cast<const __nv_bfloat16*>(d_logits16.get()),
                            d_targets.get(), d_weights.get(), B, T, V, ld);
    } else {
      cuda::logprob_forward(f.ctx(), seq, lp, stats, d_logits32.get(), d_targets.get(), d_weights.get(), B, T, V, ld);
    }
  };
  d_seq.poison();
  d_lp.poison();
  d_stats.poison();
  run(d_seq.get(), d_lp.get(), d_stats.get());
  const auto seq = d_seq.download(), lp = d_lp.download(), stats = d_stats.download();
  expect_within(lp, ref_lp, lp_tol, "token_logp");
  expect_within(seq, ref_seq, seq_tol, "seq_logp");
  expect_within(stats, ref_stats, stats_tol, "seq_stats");
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_EQ(std::memcmp(&stats[b * kSeqStatsWidth + kSeqLogp], &seq[b], sizeof(float)), 0)
        << "kSeqLogp of sequence " << b << " is not seq_logp bitwise";
  }

  // Without token_logp (both scratches), without stats, and a second identical call: the same bits.
  d_seq.poison();
  d_stats.poison();
  run(d_seq.get(), nullptr, d_stats.get());
  EXPECT_TRUE(bitwise_equal(d_seq.download(), seq)) << "seq_logp differs without token_logp";
  EXPECT_TRUE(bitwise_equal(d_stats.download(), stats)) << "seq_stats differs without token_logp";
  d_seq.poison();
  run(d_seq.get(), nullptr, nullptr);
  EXPECT_TRUE(bitwise_equal(d_seq.download(), seq)) << "asking for seq_stats changed seq_logp";
  d_stats.poison();
  run(d_seq.get(), d_lp.get(), d_stats.get());
  EXPECT_TRUE(bitwise_equal(d_stats.download(), stats)) << "seq_stats differs between two identical calls";
}

// Sizes as for the forward: whole-vector rows, every 16-byte phase (odd V, odd ld), V below a vector, the LM head's
// padded stride; B * T rows that are not a multiple of anything; weights of 0, 0.5 and 2 (the count is of the
// non-zero ones).
TEST_F(CudaLogprob, SequenceStatsMatchCpu) {
  logprob_stats_case<false>(*this, 3, 7, 1000);
  logprob_stats_case<false>(*this, 3, 7, 50257);
  logprob_stats_case<false>(*this, 2, 5, 3);
  logprob_stats_case<false>(*this, 3, 7, 50257, 50304);
  logprob_stats_case<false>(*this, 3, 7, 257, 259);
  logprob_stats_case<false>(*this, 2, 5, 3, 64);
}

TEST_F(CudaLogprob, SequenceStatsWithBf16LogitsMatchCpu) {
  logprob_stats_case<true>(*this, 3, 7, 1000);
  logprob_stats_case<true>(*this, 3, 7, 50257);
  logprob_stats_case<true>(*this, 2, 5, 3);
  logprob_stats_case<true>(*this, 3, 7, 50257, 50304);  // 100608 bytes per row: 16-byte aligned
  logprob_stats_case<true>(*this, 3, 7, 257, 264);
  logprob_stats_case<true>(*this, 2, 5, 3, 64);
}

std::vector<double> dlogits_budgets(const LogprobData& d, const std::vector<float>& dseq) {
  std::vector<double> tol(d.logits.size(), 0.0);
  for (int64_t r = 0; r < d.B * d.T; ++r) {
    const double g = std::fabs(double(dseq[r / d.T]) * double(d.weights[r]));
    const double t = g * (lse_budget(d.V) + 4.0 * kEps);
    std::fill(tol.begin() + r * d.V, tol.begin() + (r + 1) * d.V, t);
  }
  return tol;
}

// ld > V: logits and dlogits are rows of stride ld; the logits' padding holds NaN (never read), dlogits' padding is
// poisoned and must keep its bits (never written), in place too.
void logprob_backward_case(CudaKernelsB& f, int64_t B, int64_t T, int64_t V, int64_t ld = 0) {
  if (ld == 0) ld = V;
  SCOPED_TRACE("B=" + std::to_string(B) + " T=" + std::to_string(T) + " V=" + std::to_string(V) +
               " ld=" + std::to_string(ld));
  const auto d = make_logprob_data(f, B, T, V);
  const auto dseq = f.rand(B);
  std::vector<float> ref(d.logits.size());
  cpu::logprob_backward<float>(ref.data(), d.logits.data(), d.targets.data(), d.weights.data(), dseq.data(), B, T, V);
  const auto tol = dlogits_budgets(d, dseq);

  const auto logits_padded = spread_rows(d.logits, B * T, V, ld, std::numeric_limits<float>::quiet_NaN());
  DeviceArray<float> d_logits(f.ctx(), logits_padded), d_weights(f.ctx(), d.weights), d_dseq(f.ctx(), dseq);
  DeviceArray<int32_t> d_targets(f.ctx(), d.targets);
  DeviceArray<float> d_dlogits(f.ctx(), B * T * ld);
  d_dlogits.poison();
  cuda::logprob_backward(f.ctx(), d_dlogits.get(), d_logits.get(), d_targets.get(), d_weights.get(), d_dseq.get(), B,
                         T, V, ld);
  const auto got = d_dlogits.download();
  expect_within(valid_rows(got, B * T, V, ld), ref, tol, "dlogits");
  EXPECT_EQ(padding_changes(got, poison_bits(got.size()), B * T, V, ld), 0u) << "the backward wrote into the padding";

  d_dlogits.poison();
  cuda::logprob_backward(f.ctx(), d_dlogits.get(), d_logits.get(), d_targets.get(), d_weights.get(), d_dseq.get(), B,
                         T, V, ld);
  EXPECT_TRUE(bitwise_equal(d_dlogits.download(), got)) << "dlogits differs between two identical calls";

  // In place: dlogits == logits gives the same bits as the out-of-place call on the valid columns, and the logits'
  // NaN padding is left as it was.
  cuda::logprob_backward(f.ctx(), d_logits.get(), d_logits.get(), d_targets.get(), d_weights.get(), d_dseq.get(), B,
                         T, V, ld);
  const auto inplace = d_logits.download();
  EXPECT_TRUE(bitwise_equal(valid_rows(inplace, B * T, V, ld), valid_rows(got, B * T, V, ld)))
      << "in-place dlogits differs from out-of-place";
  EXPECT_EQ(padding_changes(inplace, logits_padded, B * T, V, ld), 0u) << "in place, the padding was written";
}

TEST_F(CudaLogprob, BackwardMatchesCpuAndRunsInPlace) {
  logprob_backward_case(*this, 3, 7, 1000);
  logprob_backward_case(*this, 3, 7, 50257);
  logprob_backward_case(*this, 2, 5, 3);
}

TEST_F(CudaLogprob, BackwardWithPaddedRowsMatchesCpuAndLeavesThePadding) {
  logprob_backward_case(*this, 3, 7, 50257, 50304);
  logprob_backward_case(*this, 3, 7, 1000, 1024);
  logprob_backward_case(*this, 3, 7, 257, 259);
  logprob_backward_case(*this, 2, 5, 3, 64);
}

// A target outside [0, V) with a non-zero weight (the CPU twin throws; the device does not check) must not read or
// write out of bounds: its lp and its sequence's sum are NaN and its dlogits row is NaN; other rows are unaffected.
TEST_F(CudaLogprob, OutOfRangeTargetGivesNaNNotAnOutOfBoundsAccess) {
  const int64_t B = 2, T = 6, V = 1000;
  auto d = make_logprob_data(*this, B, T, V);
  const int64_t bad_hi = 2, bad_lo = 4;  // both in sequence 0, both with weight 1
  ASSERT_NE(d.weights[bad_hi], 0.0f);
  ASSERT_NE(d.weights[bad_lo], 0.0f);
  auto bad_targets = d.targets;
  bad_targets[bad_hi] = static_cast<int32_t>(V + 100000000);
  bad_targets[bad_lo] = -7;
  // The CPU reference for the other rows: the bad rows get weight 0 (lp 0, dlogits 0) and are skipped below.
  auto ref_weights = d.weights;
  ref_weights[bad_hi] = ref_weights[bad_lo] = 0.0f;
  const auto dseq = rand(B);
  std::vector<float> ref_seq(B), ref_lp(B * T), ref_d(d.logits.size());
  cpu::logprob_forward<float>(ref_seq.data(), ref_lp.data(), d.logits.data(), d.targets.data(), ref_weights.data(), B,
                              T, V);
  cpu::logprob_backward<float>(ref_d.data(), d.logits.data(), d.targets.data(), ref_weights.data(), dseq.data(), B, T,
                               V);

  DeviceArray<float> d_logits(ctx(), d.logits), d_weights(ctx(), d.weights), d_dseq(ctx(), dseq);
  DeviceArray<int32_t> d_targets(ctx(), bad_targets);
  DeviceArray<float> d_seq(ctx(), B), d_lp(ctx(), B * T), d_dlogits(ctx(), B * T * V);
  d_seq.poison();
  d_lp.poison();
  d_dlogits.poison();
  cuda::logprob_forward(ctx(), d_seq.get(), d_lp.get(), d_logits.get(), d_targets.get(), d_weights.get(), B, T, V);
  cuda::logprob_backward(ctx(), d_dlogits.get(), d_logits.get(), d_targets.get(), d_weights.get(), d_dseq.get(), B, T,
                         V);
  DPO_CUDA_CHECK(cudaStreamSynchronize(ctx().stream()));  // a fault would surface here
  const auto seq = d_seq.download(), lp = d_lp.download(), dl = d_dlogits.download();
  EXPECT_TRUE(std::isnan(seq[0]));
  EXPECT_TRUE(std::isnan(lp[bad_hi]));
  EXPECT_TRUE(std::isnan(lp[bad_lo]));
  const auto lp_tol = lp_budgets(d, ref_lp);
  EXPECT_NEAR(seq[1], ref_seq[1], seq_budgets(d, ref_lp, lp_tol)[1]);
  const double dtol = lse_budget(V) + 4.0 * kEps;
  for (int64_t r = 0; r < B * T; ++r) {
    if (r == bad_hi || r == bad_lo) {
      for (int64_t v = 0; v < V; ++v) ASSERT_TRUE(std::isnan(dl[r * V + v])) << "row " << r << " v " << v;
      continue;
    }
    EXPECT_NEAR(lp[r], ref_lp[r], lp_tol[r]) << "row " << r;
    const double g = std::fabs(double(dseq[r / T]) * double(d.weights[r]));
    for (int64_t v = 0; v < V; ++v) ASSERT_NEAR(dl[r * V + v], ref_d[r * V + v], g * dtol) << "row " << r << " v " << v;
  }
}

// B*T*V = 4.4e9 > 2^32: a row offset computed in 32 bits (signed or unsigned) wraps to another row. All rows are a
// constant (cudaMemset) except a few random rows placed around the 2^31 and 2^32 element boundaries and at the end;
// a wrapped index would read a constant row (or fault) and miss the random row's log-prob by O(1).
TEST_F(CudaLogprob, IndexesPast32BitElementOffsets) {
  const int64_t B = 2, T = 1100, V = 2000000;
  const int64_t n = B * T * V;
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  size_t free_bytes = 0, total_bytes = 0;
  DPO_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < bytes + (size_t{1} << 30)) {
    GTEST_SKIP() << "needs " << (bytes >> 20) + 1024 << " MiB of free device memory, " << (free_bytes >> 20)
                 << " MiB free";
  }
  DeviceArray<float> d_logits(ctx(), n);
  DPO_CUDA_CHECK(cudaMemsetAsync(d_logits.get(), 0x3F, bytes, ctx().stream()));
  const uint32_t pattern = 0x3F3F3F3Fu;
  float c = 0.0f;
  std::memcpy(&c, &pattern, sizeof(c));  // 0.747...: every logit of a constant row

  // Rows 1073/1074 straddle element 2^31, rows 2147/2148 straddle 2^32 (V = 2e6).
  const std::vector<int64_t> special = {0, 1, 1073, 1074, 1075, 2147, 2148, 2149, B * T - 1};
  std::vector<std::vector<float>> rows;
  for (int64_t r : special) {
    rows.push_back(rand(V, 3.0));
    DPO_CUDA_CHECK(cudaMemcpyAsync(d_logits.get() + r * V, rows.back().data(), static_cast<size_t>(V) * sizeof(float),
                                   cudaMemcpyHostToDevice, ctx().stream()));
  }
  ctx().synchronize();
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> targets(static_cast<size_t>(B * T));
  std::vector<float> weights(static_cast<size_t>(B * T), 1.0f);
  for (int64_t r = 0; r < B * T; ++r) {
    targets[r] = tok(gen_);
    if (r % 7 == 0) weights[r] = 0.0f;
  }
  for (size_t k = 0; k < special.size(); ++k) {
    // Target the row's maximum: its lp (about -4) is then far from a constant row's -log V (about -14.5).
    weights[special[k]] = 1.0f;
    targets[special[k]] = static_cast<int32_t>(std::max_element(rows[k].begin(), rows[k].end()) - rows[k].begin());
  }
  const int64_t zero_row = 2198;   // 2198 % 7 == 0: weight 0
  const int64_t const_row = 1500;  // weight 1, constant logits
  ASSERT_EQ(weights[zero_row], 0.0f);
  ASSERT_EQ(weights[const_row], 1.0f);

  DeviceArray<float> d_weights(ctx(), weights), d_seq(ctx(), B), d_lp(ctx(), B * T);
  DeviceArray<int32_t> d_targets(ctx(), targets);
  d_seq.poison();
  d_lp.poison();
  cuda::logprob_forward(ctx(), d_seq.get(), d_lp.get(), d_logits.get(), d_targets.get(), d_weights.get(), B, T, V);
  const auto seq = d_seq.download(), lp = d_lp.download();

  // Reference lp per row: a constant row gives exactly -log V; a special row goes through the CPU twin.
  std::vector<double> ref_lp(static_cast<size_t>(B * T)), tol_lp(static_cast<size_t>(B * T));
  for (int64_t r = 0; r < B * T; ++r) {
    ref_lp[r] = weights[r] == 0.0f ? 0.0 : -std::log(static_cast<double>(V));
    tol_lp[r] = weights[r] == 0.0f ? 0.0 : lse_budget(V) + 4.0 * kEps * (1.0 + c + std::fabs(ref_lp[r]));
  }
  for (size_t k = 0; k < special.size(); ++k) {
    const int64_t r = special[k];
    float s = 0.0f, l = 0.0f;
    const float w = 1.0f;
    cpu::logprob_forward<float>(&s, &l, rows[k].data(), &targets[r], &w, 1, 1, V);
    ref_lp[r] = l;
    tol_lp[r] = lse_budget(V) + 4.0 * kEps * (1.0 + std::fabs(double(rows[k][targets[r]])) + std::fabs(double(l)));
    EXPECT_GT(std::fabs(l - (-std::log(static_cast<double>(V)))), 0.1) << "row " << r << " is not distinguishable";
  }
  for (int64_t r = 0; r < B * T; ++r) EXPECT_NEAR(lp[r], ref_lp[r], tol_lp[r]) << "row " << r;
  for (int64_t b = 0; b < B; ++b) {
    double want = 0.0, tol = 0.0, mag = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      want += weights[b * T + t] * ref_lp[b * T + t];
      tol += weights[b * T + t] * tol_lp[b * T + t];
      mag += std::fabs(weights[b * T + t] * ref_lp[b * T + t]);
    }
    EXPECT_NEAR(seq[b], want, tol + 4.0 * kEps * mag) << "sequence " << b;
  }

  // Backward in place over the whole 17.6 GB, then read back the special rows, a constant row and a zero-weight row.
  const auto dseq = rand(B);
  DeviceArray<float> d_dseq(ctx(), dseq);
  cuda::logprob_backward(ctx(), d_logits.get(), d_logits.get(), d_targets.get(), d_weights.get(), d_dseq.get(), B, T,
                         V);
  const double dtol = lse_budget(V) + 4.0 * kEps;
  for (size_t k = 0; k < special.size(); ++k) {
    const int64_t r = special[k];
    SCOPED_TRACE("row " + std::to_string(r));
    std::vector<float> ref(static_cast<size_t>(V));
    const float w = 1.0f;
    cpu::logprob_backward<float>(ref.data(), rows[k].data(), &targets[r], &w, &dseq[r / T], 1, 1, V);
    const double g = std::fabs(double(dseq[r / T]));
    expect_within(d_logits.download_range(r * V, V), ref, constant_tol(ref.size(), g * dtol), "dlogits");
  }
  {
    const int64_t r = const_row;
    const double g = dseq[r / T];
    std::vector<float> ref(static_cast<size_t>(V));
    for (int64_t v = 0; v < V; ++v) ref[v] = static_cast<float>(g * ((v == targets[r] ? 1.0 : 0.0) - 1.0 / double(V)));
    expect_within(d_logits.download_range(r * V, V), ref, constant_tol(ref.size(), std::fabs(g) * dtol),
                  "dlogits, constant row");
  }
  EXPECT_TRUE(bitwise_equal(d_logits.download_range(zero_row * V, V), std::vector<float>(static_cast<size_t>(V), 0.0f)))
      << "a weight-0 row past 2^32 elements is not zeroed";
}


// --- adamw_update_segments ------------------------------------------------------------------------------------------
// The fused multi-tensor kernel against (a) one single-tensor cuda::adamw_update per segment: bitwise, since both
// run the same device function on the same float scalars; (b) the CPU twin cpu::adamw_update_segments: within the
// budget of the single-tensor test (test_cuda_kernels_a.cpp, CudaAdamW.UpdateMatchesCpu: three steps of ~10 float
// roundings, 2e-6 of max(1, max |ref|)). Elements in the gaps between segments are NaN in param, m, v and grad and
// must come back bitwise unchanged.

// A layout of segments with the given sizes (0 allowed), random gaps of 0..3 elements before each, a gap of 2 at
// the start and 3 at the end, random decay flags (the first two fixed: one of each).
struct SegmentLayout {
  std::vector<AdamWSegment> segs;
  int64_t n = 0;
  std::vector<char> inside;  // [n]: 1 where some segment covers the element
};

SegmentLayout make_layout(std::mt19937_64& g, const std::vector<int64_t>& sizes) {
  std::uniform_int_distribution<int> gap(0, 3), coin(0, 1);
  SegmentLayout L;
  int64_t at = 2;
  for (size_t k = 0; k < sizes.size(); ++k) {
    if (k > 0) at += gap(g);
    const bool decay = k < 2 ? k == 0 : coin(g) == 1;
    L.segs.push_back({at, sizes[k], decay});
    at += sizes[k];
  }
  L.n = at + 3;
  L.inside.assign(static_cast<size_t>(L.n), 0);
  for (const AdamWSegment& sg : L.segs)
    for (int64_t i = sg.offset; i < sg.offset + sg.numel; ++i) L.inside[static_cast<size_t>(i)] = 1;
  return L;
}

// Host state of one AdamW run: random param, grad, m, v >= 0, NaN in the gaps.
struct AdamWState {
  std::vector<float> p, g, m, v;
};

AdamWState make_state(CudaKernelsB& f, const SegmentLayout& L) {
  AdamWState s{f.rand(L.n), f.rand(L.n), f.rand(L.n, 0.1), f.rand(L.n, 0.1)};
  for (auto& x : s.v) x = x * x;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t i = 0; i < L.inside.size(); ++i)
    if (!L.inside[i]) s.p[i] = s.g[i] = s.m[i] = s.v[i] = nan;
  return s;
}

struct DeviceAdamW {
  DeviceArray<float> p, g, m, v;
  DeviceAdamW(CudaContext& ctx, const AdamWState& s, int64_t offset)
      : p(ctx, s.p, offset), g(ctx, s.g, offset), m(ctx, s.m, offset), v(ctx, s.v, offset) {}
};

// The reference on the device: one single-tensor launch per non-empty segment, decay by flag.
void per_segment_launches(CudaContext& ctx, DeviceAdamW& d, const std::vector<AdamWSegment>& segs,
                          const AdamWParams& hp) {
  for (const AdamWSegment& sg : segs) {
    AdamWParams q = hp;
    q.weight_decay = sg.weight_decay ? hp.weight_decay : 0.0;
    const int64_t o = sg.offset;
    cuda::adamw_update(ctx, d.p.get() + o, d.g.get() + o, d.m.get() + o, d.v.get() + o, sg.numel, q);
  }
}

void fused_launch(CudaContext& ctx, cuda::AdamWSegmentTable& table, DeviceAdamW& d, int64_t n,
                  const std::vector<AdamWSegment>& segs, const AdamWParams& hp) {
  cuda::adamw_update_segments(ctx, table, d.p.get(), d.g.get(), d.m.get(), d.v.get(), n, segs.data(),
                              static_cast<int64_t>(segs.size()), hp);
}

std::vector<double> inside_only(const std::vector<float>& x, const std::vector<char>& inside) {
  std::vector<double> r;
  for (size_t i = 0; i < x.size(); ++i)
    if (inside[i]) r.push_back(x[i]);
  return r;
}

// Gap elements bitwise equal to their (NaN) initial values.
void expect_gaps_untouched(const std::vector<float>& got, const std::vector<float>& before,
                           const std::vector<char>& inside, const char* what) {
  int64_t changed = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (!inside[i] && std::memcmp(&got[i], &before[i], sizeof(float)) != 0) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++changed;
    }
  EXPECT_EQ(changed, 0) << what << ": " << changed << " gap elements were written, the first at " << first;
}

AdamWParams segment_test_params() {
  AdamWParams p;
  p.lr = 1e-2;
  p.weight_decay = 0.1;
  p.grad_scale = 0.7;
  return p;
}

// Many segments of odd sizes: 1 (several), 0, around a block (255, 256, 257), around and past a chunk, plus 40
// random sizes; arrays shifted by one float from the allocation, as parameter views are.
TEST_F(CudaAdamWSegments, MatchesCpuTwinAndSingleTensorKernel) {
  using cuda::kAdamWChunk;
  std::vector<int64_t> sizes = {1, 17, 0, kAdamWChunk + 3, 1, 255, 256, 257, 2 * kAdamWChunk - 1, 1,
                                3 * kAdamWChunk, kAdamWChunk, 5, 1};
  std::uniform_int_distribution<int64_t> size(1, 3000);
  for (int k = 0; k < 40; ++k) sizes.push_back(size(gen_));
  const SegmentLayout L = make_layout(gen_, sizes);
  const AdamWState s0 = make_state(*this, L);
  DeviceAdamW fused(ctx(), s0, 1), single(ctx(), s0, 1);
  AdamWState ref = s0;
  cuda::AdamWSegmentTable table;
  AdamWParams hp = segment_test_params();
  for (int64_t step = 4; step <= 6; ++step) {
    hp.step = step;
    fused_launch(ctx(), table, fused, L.n, L.segs, hp);
    per_segment_launches(ctx(), single, L.segs, hp);
    cpu::adamw_update_segments<float>(ref.p.data(), ref.g.data(), ref.m.data(), ref.v.data(), L.n, L.segs.data(),
                                      static_cast<int64_t>(L.segs.size()), hp);
  }
  EXPECT_EQ(table.uploads(), 1) << "the segment table is uploaded once, not per step";
  const auto fp = fused.p.download(), fm = fused.m.download(), fv = fused.v.download();
  EXPECT_TRUE(bitwise_equal(fp, single.p.download())) << "param vs the single-tensor kernel";
  EXPECT_TRUE(bitwise_equal(fm, single.m.download())) << "m vs the single-tensor kernel";
  EXPECT_TRUE(bitwise_equal(fv, single.v.download())) << "v vs the single-tensor kernel";
  EXPECT_LE(test::max_rel_err(inside_only(fp, L.inside), inside_only(ref.p, L.inside)), 2e-6) << "param vs CPU";
  EXPECT_LE(test::max_rel_err(inside_only(fm, L.inside), inside_only(ref.m, L.inside)), 2e-6) << "m vs CPU";
  EXPECT_LE(test::max_rel_err(inside_only(fv, L.inside), inside_only(ref.v, L.inside)), 2e-6) << "v vs CPU";
  expect_gaps_untouched(fp, s0.p, L.inside, "param");
  expect_gaps_untouched(fm, s0.m, L.inside, "m");
  expect_gaps_untouched(fv, s0.v, L.inside, "v");
  EXPECT_TRUE(bitwise_equal(fused.g.download(), s0.g)) << "grad is read only";
}

// More chunks than the grid has blocks, so blocks loop (grid-stride) and the binary search runs over chunks far
// from a block's first; a segment straddles 2^22 elements. Bitwise against the single-tensor kernel.
TEST_F(CudaAdamWSegments, GridStrideCoversMoreChunksThanBlocks) {
  using cuda::kAdamWChunk;
  const int64_t grid = static_cast<int64_t>(std::max(1, ctx().props().multiProcessorCount)) * cuda::kAdamWBlocksPerSm;
  const std::vector<int64_t> sizes = {1, 7 * kAdamWChunk + 1, (grid + 37) * kAdamWChunk + 12345, 3, kAdamWChunk - 1};
  const SegmentLayout L = make_layout(gen_, sizes);
  const AdamWState s0 = make_state(*this, L);
  DeviceAdamW fused(ctx(), s0, 0), single(ctx(), s0, 0);
  cuda::AdamWSegmentTable table;
  AdamWParams hp = segment_test_params();
  hp.step = 2;
  fused_launch(ctx(), table, fused, L.n, L.segs, hp);
  per_segment_launches(ctx(), single, L.segs, hp);
  const auto fp = fused.p.download(), fm = fused.m.download(), fv = fused.v.download();
  EXPECT_TRUE(bitwise_equal(fp, single.p.download())) << "param";
  EXPECT_TRUE(bitwise_equal(fm, single.m.download())) << "m";
  EXPECT_TRUE(bitwise_equal(fv, single.v.download())) << "v";
  expect_gaps_untouched(fp, s0.p, L.inside, "param");
  expect_gaps_untouched(fv, s0.v, L.inside, "v");
}

// The table is re-uploaded exactly when the segments change (a flag, the offsets, an empty list), a rejected table
// leaves the cached one in place, and every step still matches the single-tensor kernel bitwise.
TEST_F(CudaAdamWSegments, TableUploadsOnlyWhenSegmentsChange) {
  const SegmentLayout L = make_layout(gen_, {300, 500, 100});
  const AdamWState s0 = make_state(*this, L);
  DeviceAdamW fused(ctx(), s0, 0), single(ctx(), s0, 0);
  cuda::AdamWSegmentTable table;
  AdamWParams hp = segment_test_params();
  std::vector<AdamWSegment> flipped = L.segs;
  flipped[1].weight_decay = !flipped[1].weight_decay;
  const std::vector<AdamWSegment> merged = {{L.segs[0].offset, L.segs[2].offset + 100 - L.segs[0].offset, true}};
  const std::vector<AdamWSegment> empty;
  // (segments, uploads expected after the step)
  const std::vector<std::pair<const std::vector<AdamWSegment>*, int64_t>> plan = {
      {&L.segs, 1}, {&L.segs, 1}, {&flipped, 2}, {&flipped, 2}, {&L.segs, 3}, {&empty, 4}, {&L.segs, 5}};
  for (size_t k = 0; k < plan.size(); ++k) {
    SCOPED_TRACE("step " + std::to_string(k + 1));
    hp.step = static_cast<int64_t>(k + 1);
    fused_launch(ctx(), table, fused, L.n, *plan[k].first, hp);
    per_segment_launches(ctx(), single, *plan[k].first, hp);
    EXPECT_EQ(table.uploads(), plan[k].second);
  }
  const std::vector<AdamWSegment> bad = {{0, L.n + 1, true}};
  EXPECT_THROW(fused_launch(ctx(), table, fused, L.n, bad, hp), Error);
  EXPECT_EQ(table.uploads(), 5);
  hp.step = 8;
  fused_launch(ctx(), table, fused, L.n, L.segs, hp);  // still the cached table: no upload
  per_segment_launches(ctx(), single, L.segs, hp);
  EXPECT_EQ(table.uploads(), 5);
  // The merged segment also covers the gaps between the three: NaN there stays NaN, so compare bitwise anyway.
  hp.step = 9;
  fused_launch(ctx(), table, fused, L.n, merged, hp);
  per_segment_launches(ctx(), single, merged, hp);
  EXPECT_EQ(table.uploads(), 6);
  EXPECT_TRUE(bitwise_equal(fused.p.download(), single.p.download())) << "param";
  EXPECT_TRUE(bitwise_equal(fused.m.download(), single.m.download())) << "m";
  EXPECT_TRUE(bitwise_equal(fused.v.download(), single.v.download())) << "v";
}

// --- adamw_dry_run_segments: the numerical guard ---------------------------------------------------------------------
// The device flag against the CPU twin's verdict on the same inputs: clean state (NaN only in the gaps, which are
// not read: AllFinite), one poisoned element (NaN / +Inf / -Inf in grad, param, m or v, at a segment's first or last
// element or deep inside a multi-chunk segment), and overflows of finite inputs (lr 1e39: the float step size is
// Inf; one gradient of 1e30: v = (1 - beta2) g^2 exceeds the float range). Neither verdict is borderline: each case
// is far from FLT_MAX in both float and double arithmetic, so the twins must agree exactly. The dry run writes
// nothing (all four arrays bitwise unchanged), and the flag is re-zeroed by every call (a clean run after a
// poisoned one reads AllFinite).
TEST_F(CudaAdamWSegments, DryRunFlagMatchesCpuTwinOnPoisonedInputs) {
  using cuda::kAdamWChunk;
  const SegmentLayout L = make_layout(gen_, {1, 300, 3 * kAdamWChunk + 7, 0, 257, 2});
  const AdamWState s0 = make_state(*this, L);
  const AdamWParams base = segment_test_params();
  cuda::AdamWSegmentTable table;
  DeviceArray<int> flag(ctx(), 1);
  const int64_t n_segs = static_cast<int64_t>(L.segs.size());

  auto device_verdict = [&](const AdamWState& st, const AdamWParams& hp) {
    DeviceAdamW d(ctx(), st, 1);
    flag.upload({7});  // neither 0 nor 1: the call must overwrite it
    cuda::adamw_dry_run_segments(ctx(), table, flag.get(), d.p.get(), d.g.get(), d.m.get(), d.v.get(), L.n,
                                 L.segs.data(), n_segs, hp);
    const int f = flag.download()[0];
    EXPECT_TRUE(f == 0 || f == 1) << "flag " << f;
    EXPECT_TRUE(bitwise_equal(d.p.download(), st.p)) << "the dry run wrote param";
    EXPECT_TRUE(bitwise_equal(d.g.download(), st.g)) << "the dry run wrote grad";
    EXPECT_TRUE(bitwise_equal(d.m.download(), st.m)) << "the dry run wrote m";
    EXPECT_TRUE(bitwise_equal(d.v.download(), st.v)) << "the dry run wrote v";
    return f != 0 ? AdamWCheck::NonFinite : AdamWCheck::AllFinite;
  };
  auto cpu_verdict = [&](const AdamWState& st, const AdamWParams& hp) {
    return cpu::adamw_dry_run_segments<float>(st.p.data(), st.g.data(), st.m.data(), st.v.data(), L.n,
                                              L.segs.data(), n_segs, hp);
  };
  auto expect_case = [&](const std::string& what, const AdamWState& st, const AdamWParams& hp, AdamWCheck want) {
    SCOPED_TRACE(what);
    EXPECT_EQ(cpu_verdict(st, hp), want) << "CPU twin";
    EXPECT_EQ(device_verdict(st, hp), want) << "device flag";
  };

  expect_case("clean", s0, base, AdamWCheck::AllFinite);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const AdamWSegment& big = L.segs[2];
  const int64_t where[] = {L.segs[0].offset, L.segs[1].offset + 299, big.offset + 2 * kAdamWChunk + 11,
                           L.segs[5].offset + 1};
  const char* names[] = {"param", "grad", "m", "v"};
  for (int a = 0; a < 4; ++a)
    for (float bad : {nan, inf, -inf})
      for (int64_t i : where) {
        AdamWState st = s0;
        std::vector<float>* arr[] = {&st.p, &st.g, &st.m, &st.v};
        (*arr[a])[static_cast<size_t>(i)] = bad;
        expect_case(std::string(names[a]) + "[" + std::to_string(i) + "] = " + std::to_string(bad), st, base,
                    AdamWCheck::NonFinite);
      }
  AdamWParams huge_lr = base;
  huge_lr.lr = 1e39;
  huge_lr.weight_decay = 0.0;  // keeps 1 - lr * wd meaningful; the step size alone overflows
  expect_case("lr 1e39", s0, huge_lr, AdamWCheck::NonFinite);
  AdamWState big_grad = s0;
  big_grad.g[static_cast<size_t>(big.offset + 5)] = 1e30f;
  AdamWParams no_clip = base;
  no_clip.grad_scale = 1.0;
  expect_case("grad 1e30 (v overflows)", big_grad, no_clip, AdamWCheck::NonFinite);
  expect_case("clean again (the flag is re-zeroed)", s0, base, AdamWCheck::AllFinite);
  EXPECT_EQ(table.uploads(), 1) << "one table for every call with the same segments";
}

}  // namespace
}  // namespace dpo
