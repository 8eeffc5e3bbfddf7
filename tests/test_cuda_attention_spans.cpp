// CUDA attention under a batch layout's spans (kernels/attention.cuh, attention_forward_spans; the backward is
// attention_backward's) through CudaBackend::attention_forward_spans / attention_backward_spans, in F32 and BF16,
// against the CPU twins cpu::attention_forward_spans / attention_backward_spans (kernels/attention.h) on the same
// inputs. In the shape of tests/test_cuda_kernels_b.cpp: seeded random inputs (rounded to BF16 first for the BF16
// cases, so both sides read the same values), outputs poisoned (all bytes 0xFF: NaN) before each "=" call, "+="
// outputs started from random values, odd T (37, 100: not multiples of a warp or of the 64-wide tiles), GPT-2's head
// size 64 in one case, repeated calls that must give the same bits. Without a GPU every test skips with the reason.
//
// Budgets (tests/test_cuda_kernels_b.cpp, "attention"): eps = FLT_EPSILON; the forward reduces over hs (scores) and
// over at most T keys (softmax, att @ v) in fp32 against a double CPU twin: (hs + T) eps, absolute for att (p <= 1)
// and relative to max(1, max|ref|) for out; the backward chains one more reduction of each kind: 2 (hs + T) eps
// relative. BF16 outputs: within one BF16 ulp of the rounded reference plus that fp32 budget (tests/test_cuda_bf16.cpp
// derives it). A key seen that should not be (a wrong span rule) moves an output by O(1e-2..1).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/batch_layout.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::bitwise_equal;
using test::test_seed;

constexpr double kEps = FLT_EPSILON;

double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

// The spacing of BF16 numbers at |x|.
double ulp_bf16(double x) {
  x = std::fabs(x);
  if (x == 0.0 || std::isinf(x)) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, std::max(std::ilogb(x), -126) - 7);
}

// v rounded to `dtype` and back (F32: itself), through the library's host conversion.
std::vector<float> rounded(const std::vector<float>& v, DType dtype) {
  if (dtype == DType::F32) return v;
  Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, DType::F32);
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(float));
  const Tensor r = convert_host(convert_host(t, dtype, "test"), DType::F32, "test");
  return {r.data<float>(), r.data<float>() + r.numel()};
}

// Every |got - ref| within tol (F32) or within one BF16 ulp of bf16(ref) plus tol (BF16); NaN fails.
void expect_near(const std::vector<float>& got, const std::vector<float>& ref, double tol, DType dtype,
                 const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const auto want = rounded(ref, dtype);
  size_t bad = 0, worst = 0;
  double worst_ratio = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    double budget = tol;
    if (dtype == DType::BF16)
      budget += ulp_bf16(std::max(std::fabs(double(got[i])), std::fabs(double(want[i]))));
    const double err = std::fabs(double(got[i]) - double(want[i]));
    if (!(err <= budget)) ++bad;
    const double ratio = std::isnan(err) ? INFINITY : err / budget;
    if (ratio > worst_ratio) worst_ratio = ratio, worst = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " outside the budget; worst at " << worst
                     << ": got " << got[worst] << ", want " << want[worst];
}

void set_span(std::vector<int32_t>& span, int64_t slot, int64_t lo, int64_t hl, int64_t hh) {
  span[slot * kSpanWidth + kSpanLo] = static_cast<int32_t>(lo);
  span[slot * kSpanWidth + kSpanHoleLo] = static_cast<int32_t>(hl);
  span[slot * kSpanWidth + kSpanHoleHi] = static_cast<int32_t>(hh);
}

// Rows of T slots: row 0 one prefix_shared segment [prompt | chosen | dup | rejected] then padding; row 1 left
// padding, then two packed segments, then padding (kernels/batch_layout.h; the same construction as
// tests/test_attention_spans.cpp).
std::vector<int32_t> layout_spans(int64_t T) {
  std::vector<int32_t> span(static_cast<size_t>(2 * T * kSpanWidth));
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < T; ++t) set_span(span, b * T + t, t, t, t);
  const int64_t P = T / 4, Ch = T / 3, R = T / 4, dup = P + Ch;
  for (int64_t t = 0; t < dup; ++t) set_span(span, t, 0, t, t);
  set_span(span, dup, 0, P - 1, dup);
  for (int64_t t = dup + 1; t < dup + 1 + R; ++t) set_span(span, t, 0, P, dup + 1);
  const int64_t left = 5, s1 = T / 2;
  for (int64_t t = left; t < left + s1; ++t) set_span(span, T + t, left, t, t);
  for (int64_t t = left + s1; t < T - 2; ++t) set_span(span, T + t, left + s1, t, t);
  return span;
}

struct Case {
  int64_t B, T, C, NH;
};
const Case kCases[] = {{2, 37, 48, 3}, {2, 100, 128, 2}};  // hs = 16; hs = 64 (GPT-2), two partial tiles

std::string describe(const Case& c, DType dt) {
  return std::string(dtype_name(dt)) + " T=" + std::to_string(c.T) + " C=" + std::to_string(c.C) +
         " NH=" + std::to_string(c.NH);
}

class CudaAttentionSpans : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    gpu_ = make_cuda_backend(0);
    gen_.seed(test_seed());
  }
  Backend& gpu() { return *gpu_; }
  // Random values, exact in dtype.
  std::vector<float> rand(int64_t n, DType dtype) {
    return rounded(test::randn<float>(gen_, static_cast<size_t>(n)), dtype);
  }
  Tensor upload(const std::vector<float>& v, Shape shape, DType dtype) {
    Tensor h = Tensor::host(shape, DType::F32);
    std::memcpy(h.raw(), v.data(), v.size() * sizeof(float));
    if (dtype != DType::F32) h = convert_host(h, dtype, "test input");
    Tensor t = gpu().empty(std::move(shape), dtype);
    gpu().copy_from_host(t, h);
    return t;
  }
  Tensor upload_i32(const std::vector<int32_t>& v, Shape shape) {
    Tensor h = Tensor::host(shape, DType::I32);
    std::memcpy(h.raw(), v.data(), v.size() * sizeof(int32_t));
    Tensor t = gpu().empty(std::move(shape), DType::I32);
    gpu().copy_from_host(t, h);
    return t;
  }
  std::vector<float> read(const Tensor& t) {
    Tensor h = Tensor::host(t.shape(), t.dtype());
    gpu().copy_to_host(h, t);
    if (t.dtype() != DType::F32) h = convert_host(h, DType::F32, "test output");
    return {h.data<float>(), h.data<float>() + h.numel()};
  }
  void poison(const Tensor& t) {
    DPO_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()),
                                   static_cast<cudaStream_t>(gpu().native_stream())));
  }
  Tensor poisoned(Shape shape, DType dtype) {
    Tensor t = gpu().empty(std::move(shape), dtype);
    poison(t);
    return t;
  }

  std::unique_ptr<Backend> gpu_;
  std::mt19937_64 gen_;
};

TEST_F(CudaAttentionSpans, ForwardMatchesCpuTwin) {
  for (DType dt : {DType::F32, DType::BF16})
    for (const Case& c : kCases) {
      SCOPED_TRACE(describe(c, dt));
      const int64_t B = c.B, T = c.T, C = c.C, NH = c.NH, hs = C / NH;
      const auto span = layout_spans(T);
      const auto qkv = rand(B * T * 3 * C, dt);
      std::vector<float> ref_out(static_cast<size_t>(B * T * C)), ref_att(static_cast<size_t>(B * NH * T * T));
      cpu::attention_forward_spans<float>(ref_out.data(), ref_att.data(), qkv.data(), span.data(), B, T, C, NH);

      const Tensor d_qkv = upload(qkv, {B, T, 3 * C}, dt), d_span = upload_i32(span, {B, T, kSpanWidth});
      Tensor out = poisoned({B, T, C}, dt), att = poisoned(gpu().attention_saved_shape(B, T, NH), dt);
      gpu().attention_forward_spans(out, att, d_qkv, d_span, NH);
      const auto got_out = read(out), got_att = read(att);
      const double budget = static_cast<double>(hs + T) * kEps;
      expect_near(got_att, ref_att, budget, dt, "att");
      expect_near(got_out, ref_out, budget * std::max(1.0, max_abs(ref_out)), dt, "out");
      size_t nonzero = 0;  // keys outside a query's span (and above the diagonal) are exactly 0
      for (size_t i = 0; i < got_att.size(); ++i) nonzero += ref_att[i] == 0.0f && got_att[i] != 0.0f;
      EXPECT_EQ(nonzero, 0u) << "att entries that must be exactly 0";

      poison(out);
      poison(att);
      gpu().attention_forward_spans(out, att, d_qkv, d_span, NH);
      EXPECT_TRUE(bitwise_equal(read(out), got_out)) << "out differs between two identical calls";
      EXPECT_TRUE(bitwise_equal(read(att), got_att)) << "att differs between two identical calls";
    }
}

// Both sides read the CPU forward's probabilities (rounded to the storage type), so only the backward is compared.
TEST_F(CudaAttentionSpans, BackwardAccumulatesAndMatchesCpuTwin) {
  for (DType dt : {DType::F32, DType::BF16})
    for (const Case& c : kCases) {
      SCOPED_TRACE(describe(c, dt));
      const int64_t B = c.B, T = c.T, C = c.C, NH = c.NH, hs = C / NH;
      const auto span = layout_spans(T);
      const auto qkv = rand(B * T * 3 * C, dt), dout = rand(B * T * C, dt), dqkv0 = rand(B * T * 3 * C, dt);
      std::vector<float> out(static_cast<size_t>(B * T * C)), att(static_cast<size_t>(B * NH * T * T));
      cpu::attention_forward_spans<float>(out.data(), att.data(), qkv.data(), span.data(), B, T, C, NH);
      att = rounded(att, dt);
      auto ref = dqkv0;
      cpu::attention_backward_spans<float>(ref.data(), dout.data(), qkv.data(), att.data(), span.data(), B, T, C, NH);

      const Tensor d_qkv = upload(qkv, {B, T, 3 * C}, dt), d_dout = upload(dout, {B, T, C}, dt),
                   d_att = upload(att, {B, NH, T, T}, dt), d_span = upload_i32(span, {B, T, kSpanWidth});
      Tensor dqkv = upload(dqkv0, {B, T, 3 * C}, dt);
      gpu().attention_backward_spans(dqkv, d_dout, d_qkv, Tensor(), d_att, d_span, NH);
      const auto got = read(dqkv);
      expect_near(got, ref, 2.0 * static_cast<double>(hs + T) * kEps * std::max(1.0, max_abs(ref)), dt, "dqkv");
      Tensor again = upload(dqkv0, {B, T, 3 * C}, dt);
      gpu().attention_backward_spans(again, d_dout, d_qkv, Tensor(), d_att, d_span, NH);
      EXPECT_TRUE(bitwise_equal(read(again), got)) << "two identical calls differ";
    }
}

// With the spans a left/right-padding key mask implies, att and out of every real query slot are bitwise those of
// attention_forward with the mask (kernels/attention.cuh).
TEST_F(CudaAttentionSpans, MaskImpliedSpansAreBitwiseTheKeyMaskForm) {
  for (DType dt : {DType::F32, DType::BF16})
    for (const Case& c : kCases) {
      SCOPED_TRACE(describe(c, dt));
      const int64_t B = c.B, T = c.T, C = c.C, NH = c.NH;
      std::vector<int32_t> mask(static_cast<size_t>(B * T), 1), span(static_cast<size_t>(B * T * kSpanWidth));
      const int64_t left = 7, right = T / 3;  // row 0 left-padded, row 1 right-padded
      for (int64_t t = 0; t < left; ++t) mask[t] = 0;
      for (int64_t t = T - right; t < T; ++t) mask[T + t] = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t first = b == 0 ? left : 0;
          if (mask[b * T + t]) set_span(span, b * T + t, first, t, t);
          else set_span(span, b * T + t, t, t, t);
        }
      const Tensor d_qkv = upload(rand(B * T * 3 * C, dt), {B, T, 3 * C}, dt);
      Tensor out_m = poisoned({B, T, C}, dt), att_m = poisoned({B, NH, T, T}, dt);
      Tensor out_s = poisoned({B, T, C}, dt), att_s = poisoned({B, NH, T, T}, dt);
      gpu().attention_forward(out_m, att_m, d_qkv, upload_i32(mask, {B, T}), NH);
      gpu().attention_forward_spans(out_s, att_s, d_qkv, upload_i32(span, {B, T, kSpanWidth}), NH);
      const auto om = read(out_m), os = read(out_s), am = read(att_m), as = read(att_s);
      size_t differ = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          if (!mask[b * T + t]) continue;
          differ += std::memcmp(&om[(b * T + t) * C], &os[(b * T + t) * C], C * sizeof(float)) != 0;
          for (int64_t h = 0; h < NH; ++h) {
            const int64_t row = ((b * NH + h) * T + t) * T;
            differ += std::memcmp(&am[row], &as[row], T * sizeof(float)) != 0;
          }
        }
      EXPECT_EQ(differ, 0u) << "real query rows that differ";
    }
}

// Spans that break the rules cannot be reported without a sync: their query rows become NaN (att at s <= t and out),
// every other row is bitwise that of the valid spans, and nothing is read or written out of bounds (the spans are
// only compared, never used as addresses; compute-sanitizer memcheck over this file checks the accesses).
TEST_F(CudaAttentionSpans, InvalidSpanGivesANaNRowNeverAnOutOfBoundsAccess) {
  const int64_t B = 2, T = 37, C = 48, NH = 3, hs = C / NH;
  const DType dt = DType::F32;
  const auto span = layout_spans(T);
  auto bad = span;
  struct Slot {
    int64_t slot, lo, hl, hh;
  };
  const Slot bads[] = {{3, INT_MAX, 0, 0},           // lo past the row
                       {T + 10, -1000000, 10, 10},   // lo negative
                       {T + 20, 0, INT_MIN, INT_MAX},  // a hole over everything, the query inside it
                       {12, 0, 14, 11}};             // a hole that ends before it begins
  for (const auto& s : bads) set_span(bad, s.slot, s.lo, s.hl, s.hh);
  const Tensor d_qkv = upload(rand(B * T * 3 * C, dt), {B, T, 3 * C}, dt);
  Tensor out_ok = poisoned({B, T, C}, dt), att_ok = poisoned({B, NH, T, T}, dt);
  Tensor out = poisoned({B, T, C}, dt), att = poisoned({B, NH, T, T}, dt);
  gpu().attention_forward_spans(out_ok, att_ok, d_qkv, upload_i32(span, {B, T, kSpanWidth}), NH);
  gpu().attention_forward_spans(out, att, d_qkv, upload_i32(bad, {B, T, kSpanWidth}), NH);
  gpu().synchronize();
  const auto o = read(out), ook = read(out_ok), a = read(att), aok = read(att_ok);
  for (int64_t slot = 0; slot < B * T; ++slot) {
    const bool is_bad = std::any_of(std::begin(bads), std::end(bads), [&](const Slot& s) { return s.slot == slot; });
    const int64_t b = slot / T, t = slot % T;
    for (int64_t c = 0; c < C; ++c) {
      const float x = o[slot * C + c];
      if (is_bad) ASSERT_TRUE(std::isnan(x)) << "slot " << slot << " c=" << c;
      else ASSERT_EQ(std::memcmp(&x, &ook[slot * C + c], sizeof(float)), 0) << "slot " << slot << " c=" << c;
    }
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t s = 0; s < T; ++s) {
        const size_t i = static_cast<size_t>(((b * NH + h) * T + t) * T + s);
        if (!is_bad) ASSERT_EQ(std::memcmp(&a[i], &aok[i], sizeof(float)), 0) << "slot " << slot << " s=" << s;
        else if (s <= t) ASSERT_TRUE(std::isnan(a[i])) << "slot " << slot << " s=" << s;
        else ASSERT_EQ(a[i], 0.0f) << "slot " << slot << " s=" << s;
      }
  }
  (void)hs;
}

// The boundary checks of the span tensor (device, dtype, shape) name it.
TEST_F(CudaAttentionSpans, SpanTensorIsChecked) {
  const int64_t B = 1, T = 9, C = 12, NH = 3;
  const DType dt = DType::F32;
  const Tensor q = upload(rand(B * T * 3 * C, dt), {B, T, 3 * C}, dt);
  Tensor out = gpu().empty({B, T, C}, dt), att = gpu().empty({B, NH, T, T}, dt);
  Tensor dqkv = gpu().zeros({B, T, 3 * C}, dt);
  const auto expect_error = [](const auto& fn) {
    try {
      fn();
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("span"), std::string::npos) << e.what();
    }
  };
  const std::vector<int32_t> span(static_cast<size_t>(B * T * kSpanWidth), 0);
  expect_error([&] { gpu().attention_forward_spans(out, att, q, upload_i32(span, {B, T * kSpanWidth}), NH); });
  expect_error([&] { gpu().attention_forward_spans(out, att, q, gpu().zeros({B, T, kSpanWidth}, dt), NH); });
  expect_error([&] { gpu().attention_forward_spans(out, att, q, Tensor(), NH); });
  Tensor host_span = Tensor::host({B, T, kSpanWidth}, DType::I32);
  expect_error([&] { gpu().attention_forward_spans(out, att, q, host_span, NH); });
  expect_error([&] { gpu().attention_backward_spans(dqkv, out, q, out, att, upload_i32(span, {B, T, 2}), NH); });
}

}  // namespace
}  // namespace dpo
