// The BF16 activation dtype of the Backend contract (runtime/backend.h, "Mixed precision") on CudaBackend: every op
// with A = BF16 against a reference computed on the host by the CPU float twins (kernels/*_cpu.cpp) from the same
// BF16-exact inputs, rounded to BF16 where the op's output is BF16; convert() in every direction, with the rounding
// cases (ties to even, carries, overflow, NaN); the dtype rules at the boundary.
// In the shape of ggml's test_case: seeded random inputs rounded to bf16 first (so both sides read the same values),
// outputs poisoned (all bytes 0xFF: NaN in BF16 and F32) before each "=" call, "+=" outputs started from random
// finite values, sizes that are not multiples of a warp, a tile or a vector, parameter views at odd element offsets
// (in BF16 mode the parameters are views into one flat BF16 buffer), bitwise checks where the arithmetic is the
// twin's, and repeated calls that must give the same bits.
// Without a GPU every test skips with the reason; ctest shows them as skipped, not passed.
//
// Error budgets. eps = FLT_EPSILON = 2^-23 = 2u. A BF16 output is the GPU's fp32 result r' rounded once; the
// reference is the CPU twin's fp32 result r rounded once. If |r' - r| <= tol (the op's fp32 budget: the same budget
// the fp32 kernel tests use, as both sides read the same values and differ only by summation order and libm), then
//   |got - bf16(r)| <= |got - r'| + |r' - r| + |r - bf16(r)| <= ulp/2 + tol + ulp/2 = 1 bf16 ulp + tol,
// with ulp the spacing of bf16 numbers at the larger of |got| and |bf16(r)| (the two may straddle a power of two).
// A bf16 ulp is 2^-7 relative (0.4% to 0.8%), far above every fp32 term here, so the check is "equal to the rounded
// reference or one of its neighbours". F32 outputs (parameter gradients, statistics, log-probs) keep the fp32
// budgets of the fp32 kernel tests (tests/test_cuda_kernels_{a,b}.cpp), since the inputs are the same kind of
// values. For the matmul the budgets are per element: a product of two bf16 numbers is exact in fp32 (8 + 8
// significant bits <= 24), so the only difference from the twin is the order of the fp32 sums, bounded by K eps
// times the sum of the magnitudes of the K terms (Higham 3.1; both sides: 2 K u = K eps), which the test gets by
// running the twin on |inputs|. cuBLASLt's bf16 GEMMs run on tensor cores, whose fp32 accumulation may align
// addends by truncation rather than rounding (up to 1 ulp per add instead of 1/2); the matmul budgets are doubled
// for that. A dw that misses one row of a K = N sum is off by a whole term, ~1/sqrt(K) of the magnitude.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/common.h"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "kernels/logprob.h"
#include "kernels/matmul.h"
#include "kernels/residual.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::test_seed;

constexpr double kEps = FLT_EPSILON;

// --- host bf16 ---------------------------------------------------------------------------------------------------
// Written here, independently of the library's host conversion, so that convert() is checked against a second
// implementation of round-to-nearest-even.

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

float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even; NaN -> a quiet NaN. Adding 0x7fff plus the lowest kept bit carries into the kept
// half exactly when the dropped half is above the tie, or at the tie with an odd kept half; a carry out of the
// significand bumps the exponent (and the largest finite values overflow to Inf), as IEEE rounding does.
uint16_t float_to_bf16(float f) {
  const uint32_t b = bits_of(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// The spacing of bf16 numbers at |x|: 2^(e - 7) for x in [2^e, 2^(e+1)); subnormals share the spacing of the
// smallest normal binade.
double ulp_bf16(double x) {
  x = std::fabs(x);
  if (x == 0.0 || std::isinf(x)) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, std::max(std::ilogb(x), -126) - 7);
}

double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

std::vector<float> abs_of(std::vector<float> v) {
  for (auto& x : v) x = std::fabs(x);
  return v;
}

std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = round_bf16(x);
  return v;
}

// Every |got[i] - want[i]| <= tol[i]; NaN fails. Reports the count and the worst element.
void expect_within(const std::vector<float>& got, const std::vector<float>& want, const std::vector<double>& tol,
                   const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(tol.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_ratio = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    const double ratio = std::isnan(err) ? INFINITY : (tol[i] > 0.0 ? err / tol[i] : (err > 0.0 ? INFINITY : 0.0));
    if (!(err <= tol[i])) ++bad;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside the budget; worst at "
                     << worst << ": got " << got[worst] << ", want " << want[worst] << ", budget " << tol[worst];
}

// A BF16 output against the fp32 reference `ref` (unrounded): within one bf16 ulp of bf16(ref) plus the fp32 budget
// fp32_tol[i] (see the top of the file).
void expect_bf16_near(const std::vector<float>& got, const std::vector<float>& ref,
                      const std::vector<double>& fp32_tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const std::vector<float> want = rounded(ref);
  std::vector<double> tol(want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const double mag = std::max(std::fabs(static_cast<double>(want[i])), std::fabs(static_cast<double>(got[i])));
    tol[i] = ulp_bf16(std::isnan(mag) ? 0.0 : mag) + fp32_tol[i];
  }
  expect_within(got, want, tol, what + " (bf16)");
}

std::vector<double> constant_tol(size_t n, double tol) { return std::vector<double>(n, tol); }

// --- fixture ----------------------------------------------------------------------------------------------------

class CudaBf16 : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    gpu_ = make_cuda_backend(0);
    gen_.seed(test_seed());
  }
  Backend& gpu() { return *gpu_; }

  // N(offset, scale) rounded to bf16: values that BF16 storage holds exactly, so that both sides read the same.
  std::vector<float> rand_bf16(size_t n, double scale = 1.0, double offset = 0.0) {
    std::normal_distribution<double> d(offset, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = round_bf16(static_cast<float>(d(gen_)));
    return v;
  }
  std::vector<int32_t> tokens(size_t n, int64_t V) {
    std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(V - 1));
    std::vector<int32_t> t(n);
    for (auto& x : t) x = d(gen_);
    return t;
  }

  // Writes bf16-exact values into a device tensor of dtype BF16 or F32 (no conversion on the way: the host buffer
  // has the tensor's dtype).
  void put(const Tensor& t, const std::vector<float>& v) {
    ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
    Tensor h = Tensor::host(t.shape(), t.dtype());
    if (t.dtype() == DType::BF16) {
      auto* p = static_cast<uint16_t*>(h.raw());
      for (size_t i = 0; i < v.size(); ++i) {
        p[i] = float_to_bf16(v[i]);
        ASSERT_EQ(bf16_to_float(p[i]), v[i]) << "test input " << i << " is not bf16-exact";
      }
    } else {
      ASSERT_EQ(t.dtype(), DType::F32);
      std::memcpy(h.raw(), v.data(), v.size() * sizeof(float));
    }
    gpu().copy_from_host(t, h);
  }
  Tensor make(DType dtype, Shape shape, const std::vector<float>& v) {
    Tensor t = gpu().empty(std::move(shape), dtype);
    put(t, v);
    return t;
  }
  Tensor bf16(Shape shape, const std::vector<float>& v) { return make(DType::BF16, std::move(shape), v); }
  Tensor f32(Shape shape, const std::vector<float>& v) { return make(DType::F32, std::move(shape), v); }
  Tensor i32(Shape shape, const std::vector<int32_t>& v) {
    Tensor h = Tensor::host(shape, DType::I32);
    std::memcpy(h.raw(), v.data(), v.size() * sizeof(int32_t));
    Tensor t = gpu().empty(std::move(shape), DType::I32);
    gpu().copy_from_host(t, h);
    return t;
  }
  // A view of `shape` starting `offset` elements into a fresh flat buffer of `dtype`: a parameter-like view whose
  // address is only element-aligned (offset 1 of BF16: 2 bytes).
  Tensor view_at(DType dtype, int64_t offset, Shape shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    Tensor flat = gpu().empty({n + offset + 8}, dtype);
    return flat.view(offset, std::move(shape));
  }

  // The values of an F32 or BF16 device tensor (exact).
  std::vector<float> read(const Tensor& t) {
    Tensor h = Tensor::host(t.shape(), t.dtype());
    gpu().copy_to_host(h, t);
    std::vector<float> v(static_cast<size_t>(t.numel()));
    if (t.dtype() == DType::BF16) {
      const auto* p = static_cast<const uint16_t*>(h.raw());
      for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_float(p[i]);
    } else {
      EXPECT_EQ(t.dtype(), DType::F32);
      std::memcpy(v.data(), h.raw(), v.size() * sizeof(float));
    }
    return v;
  }
  std::vector<uint16_t> read_bits(const Tensor& t) {
    EXPECT_EQ(t.dtype(), DType::BF16);
    Tensor h = Tensor::host(t.shape(), DType::BF16);
    gpu().copy_to_host(h, t);
    const auto* p = static_cast<const uint16_t*>(h.raw());
    return {p, p + t.numel()};
  }
  // All bytes 0xFF (NaN in F32 and BF16), stream-ordered before the next op.
  void poison(const Tensor& t) {
    DPO_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()),
                                   static_cast<cudaStream_t>(gpu().native_stream())));
  }

  std::unique_ptr<Backend> gpu_;
  std::mt19937_64 gen_;
};

using CudaBf16Convert = CudaBf16;
using CudaBf16Ops = CudaBf16;

// --- padded rows (the LM head's logits layout, model/gpt2.h) ------------------------------------------------------
constexpr uint16_t kBf16PoisonBits = 0xFFFF;  // what CudaBf16::poison writes: a NaN

// A BF16 device tensor of `shape` (last dim ld) whose rows hold the bf16-exact dense [rows, width] values v in
// columns [0, width) and NaN bits (kBf16PoisonBits) in columns [width, ld).
Tensor padded_bf16(CudaBf16& f, const Shape& shape, int64_t width, const std::vector<float>& v) {
  const int64_t ld = shape.back();
  Tensor h = Tensor::host(shape, DType::BF16);
  const int64_t rows = h.numel() / ld;
  EXPECT_EQ(static_cast<int64_t>(v.size()), rows * width);
  auto* p = static_cast<uint16_t*>(h.raw());
  std::fill(p, p + h.numel(), kBf16PoisonBits);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j) {
      p[n * ld + j] = float_to_bf16(v[n * width + j]);
      EXPECT_EQ(bf16_to_float(p[n * ld + j]), v[n * width + j]) << "test input is not bf16-exact";
    }
  Tensor t = f.gpu().empty(shape, DType::BF16);
  f.gpu().copy_from_host(t, h);
  return t;
}

// Columns [0, width) of every row of the BF16 bits, as floats, packed densely; and the number of padding elements
// whose bits are not kBf16PoisonBits.
std::vector<float> valid_of(const std::vector<uint16_t>& bits, int64_t width, int64_t ld) {
  const int64_t rows = static_cast<int64_t>(bits.size()) / ld;
  std::vector<float> r(static_cast<size_t>(rows * width));
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < width; ++j) r[n * width + j] = bf16_to_float(bits[n * ld + j]);
  return r;
}
size_t padding_not_poison(const std::vector<uint16_t>& bits, int64_t width, int64_t ld) {
  size_t bad = 0;
  for (size_t i = 0; i < bits.size(); ++i) bad += static_cast<int64_t>(i) % ld >= width && bits[i] != kBf16PoisonBits;
  return bad;
}

// --- convert, fill_zero, copy ------------------------------------------------------------------------------------

// F32 -> BF16 must give exactly the host rounding's bits, and BF16 -> F32 must be exact. Random significands (so
// all 16 dropped bits vary: ties and near-ties occur) over every binade from subnormals to the largest, the
// specials, and n not a multiple of the block.
TEST_F(CudaBf16Convert, F32RoundTripMatchesHostRoundingBitwise) {
  const int64_t n = 100003;
  std::vector<float> x(static_cast<size_t>(n));
  std::uniform_real_distribution<double> e(-140.0, 127.0);
  std::uniform_int_distribution<uint32_t> mant(0, (1u << 23) - 1);
  for (auto& v : x) {
    const float m = float_of(0x3f800000u | mant(gen_));  // [1, 2)
    v = std::ldexp(m, static_cast<int>(std::floor(e(gen_))));
    if (mant(gen_) & 1u) v = -v;
  }
  x[0] = 0.0f, x[1] = -0.0f, x[2] = INFINITY, x[3] = -INFINITY, x[4] = FLT_MAX, x[5] = -FLT_MAX;
  x[6] = FLT_MIN, x[7] = std::numeric_limits<float>::denorm_min();
  Tensor src = gpu().empty({n}, DType::F32), dst = gpu().empty({n}, DType::BF16), back = gpu().empty({n}, DType::F32);
  Tensor h = Tensor::host({n}, DType::F32);
  std::memcpy(h.raw(), x.data(), x.size() * sizeof(float));
  gpu().copy_from_host(src, h);
  poison(dst);
  gpu().convert(dst, src);
  const auto bits = read_bits(dst);
  size_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += bits[i] != float_to_bf16(x[i]);
  EXPECT_EQ(bad, 0u) << "F32 -> BF16 differs from round-to-nearest-even";
  poison(back);
  gpu().convert(back, dst);
  const auto y = read(back);
  bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += bits_of(y[i]) != (static_cast<uint32_t>(bits[i]) << 16);
  EXPECT_EQ(bad, 0u) << "BF16 -> F32 is not exact";
  EXPECT_EQ(bits[2], 0x7f80u);
  EXPECT_EQ(bits[3], 0xff80u);
  EXPECT_EQ(bits[4], 0x7f80u) << "FLT_MAX is above the largest bf16's rounding boundary: +Inf";
  EXPECT_EQ(bits[1], 0x8000u) << "-0 keeps its sign";
}

// Ties go to the even neighbour; a hair above or below a tie goes to the nearer one; a tie whose even neighbour is
// the next binade carries into the exponent; the largest finite tie overflows to Inf. NaN stays NaN both ways.
TEST_F(CudaBf16Convert, TiesToEvenCarriesAndNaN) {
  struct Case {
    uint32_t f32;
    uint16_t want;     // the bf16 bits, unless nan
    bool nan = false;  // any NaN will do
  };
  const std::vector<Case> cases = {
      {0x3f808000u, 0x3f80u},  // 1 + 2^-8: tie between 1 (even) and 1 + 2^-7 (odd) -> 1
      {0x3f818000u, 0x3f82u},  // tie between 0x3f81 (odd) and 0x3f82 (even) -> up
      {0x3f808001u, 0x3f81u},  // just above the tie -> up
      {0x3f817fffu, 0x3f81u},  // just below the tie -> down
      {0xbf818000u, 0xbf82u},  // negative tie: the magnitude rounds to even
      {0x3f7f8000u, 0x3f80u},  // 0x3f7f is odd: the tie rounds up, carrying into the exponent (-> 1.0)
      {0x7f7f8000u, 0x7f80u},  // the largest finite bf16 + half an ulp: tie to even overflows to +Inf
      {0x7f7f7fffu, 0x7f7fu},  // just below that: the largest finite bf16
      {0x00008000u, 0x0000u},  // subnormal tie: 0 is even
      {0x00018000u, 0x0002u},  // subnormal tie, odd below -> up
      {0x7fc00000u, 0, true},  // quiet NaN
      {0x7f800001u, 0, true},  // signalling NaN whose payload is all in the dropped half: must not become Inf
      {0xffffffffu, 0, true},  // negative NaN
  };
  const int64_t n = static_cast<int64_t>(cases.size());
  Tensor h = Tensor::host({n}, DType::F32);
  for (int64_t i = 0; i < n; ++i) static_cast<uint32_t*>(h.raw())[i] = cases[i].f32;
  Tensor src = gpu().empty({n}, DType::F32), dst = gpu().empty({n}, DType::BF16);
  gpu().copy_from_host(src, h);
  poison(dst);
  gpu().convert(dst, src);
  const auto bits = read_bits(dst);
  for (int64_t i = 0; i < n; ++i) {
    if (cases[i].nan) {
      EXPECT_TRUE(std::isnan(bf16_to_float(bits[i]))) << std::hex << cases[i].f32 << " -> " << bits[i];
    } else {
      EXPECT_EQ(bits[i], cases[i].want) << std::hex << cases[i].f32;
      EXPECT_EQ(float_to_bf16(float_of(cases[i].f32)), cases[i].want) << "host reference, " << std::hex << cases[i].f32;
    }
  }
  // BF16 NaNs (quiet, signalling-looking, negative) widen to NaN.
  Tensor hb = Tensor::host({3}, DType::BF16);
  const uint16_t nans[3] = {0x7fc0u, 0x7f81u, 0xffffu};
  std::memcpy(hb.raw(), nans, sizeof(nans));
  Tensor b = gpu().empty({3}, DType::BF16), f = gpu().empty({3}, DType::F32), d = gpu().empty({3}, DType::F64);
  gpu().copy_from_host(b, hb);
  gpu().convert(f, b);
  gpu().convert(d, b);
  for (float v : read(f)) EXPECT_TRUE(std::isnan(v));
  for (double v : to_host_f64(gpu(), d)) EXPECT_TRUE(std::isnan(v));
}

// The F64 directions: F64 -> BF16 rounds once, directly (kernels/elementwise.cuh); F64 -> F32 rounds to nearest;
// the widening ones are exact. The first value lies just above a bf16 tie that float rounding would land on.
TEST_F(CudaBf16Convert, F64Directions) {
  const std::vector<double> x = {1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40),  // -> 1 + 2^-7 (one rounding)
                                 1.0 + std::ldexp(1.0, -8),                         // exact tie -> 1 (even)
                                 -3.0e-3, 1.0 / 3.0, 65504.123, 0.0, -0.0, 1e300, std::nan("")};
  const int64_t n = static_cast<int64_t>(x.size());
  Tensor h = Tensor::host({n}, DType::F64);
  std::memcpy(h.raw(), x.data(), x.size() * sizeof(double));
  Tensor d64 = gpu().empty({n}, DType::F64), b = gpu().empty({n}, DType::BF16), f = gpu().empty({n}, DType::F32);
  Tensor b64 = gpu().empty({n}, DType::F64), f64 = gpu().empty({n}, DType::F64);
  gpu().copy_from_host(d64, h);
  gpu().convert(b, d64);
  gpu().convert(f, d64);
  gpu().convert(b64, b);
  gpu().convert(f64, f);
  const auto bv = read(b), fv = read(f);
  const auto bw = to_host_f64(gpu(), b64), fw = to_host_f64(gpu(), f64);
  EXPECT_EQ(bv[0], 1.0f + 0.0078125f) << "F64 -> BF16 must round once";
  EXPECT_EQ(bv[1], 1.0f);
  EXPECT_TRUE(std::isinf(bv[7]) && bv[7] > 0);
  EXPECT_TRUE(std::isnan(bv[8]) && std::isnan(fv[8]));
  EXPECT_TRUE(std::signbit(bv[6]) && bv[6] == 0.0f);
  for (int64_t i = 2; i < 6; ++i) {
    EXPECT_EQ(bv[i], round_bf16(static_cast<float>(x[i]))) << i;  // no double-rounding case among these
    EXPECT_EQ(fv[i], static_cast<float>(x[i])) << i;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) continue;
    EXPECT_EQ(bw[i], static_cast<double>(bv[i])) << "BF16 -> F64 exact, " << i;
    EXPECT_EQ(fw[i], static_cast<double>(fv[i])) << "F32 -> F64 exact, " << i;
  }
}

TEST_F(CudaBf16Convert, SameDtypeIsACopyAndMismatchesThrow) {
  const auto v = rand_bf16(77);
  Tensor a = bf16({7, 11}, v), b = gpu().empty({77}, DType::BF16);
  poison(b);
  gpu().convert(b, a);  // same numel, other shape: allowed
  EXPECT_EQ(read(b), v);
  EXPECT_THROW(gpu().convert(gpu().empty({76}, DType::F32), a), Error);
  EXPECT_THROW(gpu().convert(gpu().empty({77}, DType::I32), a), Error);
  Tensor flat = gpu().empty({100}, DType::F32);
  EXPECT_THROW(gpu().convert(flat.view(0, {77}), flat.view(10, {77})), Error) << "overlap (same dtype: copy)";
}

TEST_F(CudaBf16Convert, FillZeroAndCopy) {
  const auto v = rand_bf16(1001);
  Tensor a = bf16({1001}, v), b = gpu().empty({1001}, DType::BF16);
  poison(b);
  gpu().copy(b, a);
  EXPECT_EQ(read(b), v);
  gpu().fill_zero(b);
  for (uint16_t x : read_bits(b)) ASSERT_EQ(x, 0u) << "fill_zero must give +0";
}

// --- encoder -----------------------------------------------------------------------------------------------------
// Forward: one fp32 add per output on both sides, then one rounding: bitwise equal to the rounded twin. Backward:
// dout is read exactly and summed in fp32 in the twin's order into the F32 dwte/dwpe: bitwise equal to the twin.

TEST_F(CudaBf16Ops, EncoderForwardIsTheRoundedTwinBitwise) {
  const int64_t B = 3, T = 13, C = 77, V = 53, maxT = 20;
  const auto tok = tokens(B * T, V);
  const auto wte = rand_bf16(V * C), wpe = rand_bf16(maxT * C);
  std::vector<float> ref(B * T * C);
  cpu::encoder_forward<float>(ref.data(), tok.data(), wte.data(), wpe.data(), B, T, C);
  Tensor out = gpu().empty({B, T, C}, DType::BF16);
  poison(out);
  gpu().encoder_forward(out, i32({B, T}, tok), bf16({V, C}, wte), bf16({maxT, C}, wpe));
  EXPECT_TRUE(test::bitwise_equal(read(out), rounded(ref)));
}

TEST_F(CudaBf16Ops, EncoderBackwardAccumulatesIntoF32BitwiseAndDeterministically) {
  const int64_t B = 5, T = 233, C = 130, V = 1031, maxT = 240;  // several row blocks, token chunks, channel tiles
  auto tok = tokens(B * T, V);
  tok[B * T - 1] = tok[0];
  const auto dout = rand_bf16(B * T * C), dwte0 = rand_bf16(V * C), dwpe0 = rand_bf16(maxT * C);
  std::vector<float> ref_wte = dwte0, ref_wpe = dwpe0;
  for (int rep = 0; rep < 2; ++rep)
    cpu::encoder_backward<float>(ref_wte.data(), ref_wpe.data(), dout.data(), tok.data(), B, T, C);
  const Tensor d_tok = i32({B, T}, tok), d_dout = bf16({B, T, C}, dout);
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    Tensor dwte = f32({V, C}, dwte0), dwpe = f32({maxT, C}, dwpe0);
    for (int rep = 0; rep < 2; ++rep) gpu().encoder_backward(dwte, dwpe, d_dout, d_tok);  // += twice
    const auto got_wte = read(dwte);
    EXPECT_TRUE(test::bitwise_equal(got_wte, ref_wte)) << "dwte, run " << run;
    EXPECT_TRUE(test::bitwise_equal(read(dwpe), ref_wpe)) << "dwpe, run " << run;
    if (run == 0) {
      first = got_wte;
    } else {
      EXPECT_TRUE(test::bitwise_equal(got_wte, first)) << "two identical runs differ";
    }
  }
}

// --- layernorm ---------------------------------------------------------------------------------------------------
// fp32 budgets as in tests/test_cuda_kernels_a.cpp (kLayerNormTol = 1e-5 relative to max(1, max|ref|) for out,
// mean, rstd and dinp; 2e-5 for dw, db, which sum N rows in chunks); the bf16 outputs add one bf16 ulp.

void layernorm_forward_case(CudaBf16& f, int64_t N, int64_t C, double offset, double spread) {
  SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C) + " offset=" + std::to_string(offset));
  const double eps = 1e-5;
  const auto inp = f.rand_bf16(N * C, spread, offset), w = f.rand_bf16(C), b = f.rand_bf16(C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C, eps);
  Tensor d_out = f.gpu().empty({N, C}, DType::BF16), d_mean = f.gpu().empty({N}, DType::F32),
         d_rstd = f.gpu().empty({N}, DType::F32);
  f.poison(d_out);
  f.poison(d_mean);
  f.poison(d_rstd);
  f.gpu().layernorm_forward(d_out, d_mean, d_rstd, f.bf16({N, C}, inp), f.bf16({C}, w), f.bf16({C}, b), eps);
  expect_bf16_near(f.read(d_out), out, constant_tol(out.size(), 1e-5 * std::max(1.0, max_abs(out))), "out");
  expect_within(f.read(d_mean), mean, constant_tol(mean.size(), 1e-5 * std::max(1.0, max_abs(mean))), "mean");
  expect_within(f.read(d_rstd), rstd, constant_tol(rstd.size(), 1e-5 * std::max(1.0, max_abs(rstd))), "rstd");
}

TEST_F(CudaBf16Ops, LayerNormForward) {
  layernorm_forward_case(*this, 37, 77, 0.5, 2.0);
  layernorm_forward_case(*this, 45, 770, 0.0, 2.0);
  layernorm_forward_case(*this, 37, 770, 100.0, 1.0);  // |mean| >> std (bf16 spacing at 100 is 0.5: spread 1)
  layernorm_forward_case(*this, 1, 1, 0.0, 1.0);       // one channel: var = 0, out = b
}

// N = 1041 rows: 33 row chunks of 32 for dw/db, the last partial; C = 77, less than a channel tile.
TEST_F(CudaBf16Ops, LayerNormBackwardAccumulates) {
  const int64_t N = 1041, C = 77;
  const auto inp = rand_bf16(N * C, 1.5, 0.3), w = rand_bf16(C), b = rand_bf16(C), dout = rand_bf16(N * C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  cpu::layernorm_forward<float>(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C, 1e-5);
  const auto dinp0 = rand_bf16(N * C), dw0 = rand_bf16(C), db0 = rand_bf16(C);
  std::vector<float> ref_dinp = dinp0, ref_dw = dw0, ref_db = db0;
  cpu::layernorm_backward<float>(ref_dinp.data(), ref_dw.data(), ref_db.data(), dout.data(), inp.data(), w.data(),
                                 mean.data(), rstd.data(), N, C);
  Tensor dinp = bf16({N, C}, dinp0), dw = f32({C}, dw0), db = f32({C}, db0);
  gpu().layernorm_backward(dinp, dw, db, bf16({N, C}, dout), bf16({N, C}, inp), bf16({C}, w), f32({N}, mean),
                           f32({N}, rstd));
  expect_bf16_near(read(dinp), ref_dinp, constant_tol(ref_dinp.size(), 1e-5 * std::max(1.0, max_abs(ref_dinp))),
                   "dinp");
  expect_within(read(dw), ref_dw, constant_tol(C, 2e-5 * std::max(1.0, max_abs(ref_dw))), "dw");
  expect_within(read(db), ref_db, constant_tol(C, 2e-5 * std::max(1.0, max_abs(ref_db))), "db");
}

// --- matmul ------------------------------------------------------------------------------------------------------
// Per-element budgets: 2 (K + 2) eps times the sum of the magnitudes of the K terms (and of the bias or the
// accumulated start value), the magnitudes computed by the twin on |inputs|; the factor 2 for the tensor cores
// (top of the file). A wrong index or a missing row moves an element by a whole term, ~1/sqrt(K) of its magnitude.

struct MatmulCase {
  int64_t N, C, OC;
  WeightLayout layout;
  bool bias;
  int64_t w_offset;  // element offset of the weight (and bias) views into a flat buffer
};

std::string describe(const MatmulCase& m) {
  return "N=" + std::to_string(m.N) + " C=" + std::to_string(m.C) + " OC=" + std::to_string(m.OC) +
         (m.layout == WeightLayout::InOut ? " InOut" : " OutIn") + (m.bias ? " bias" : "") +
         " offset=" + std::to_string(m.w_offset);
}

const std::vector<MatmulCase>& matmul_cases() {
  static const std::vector<MatmulCase> cases = {
      {37, 77, 45, WeightLayout::InOut, true, 0},
      {37, 77, 45, WeightLayout::OutIn, false, 0},
      {130, 96, 200, WeightLayout::InOut, true, 1},  // 2-byte aligned w, bias at an odd offset too
      {130, 96, 200, WeightLayout::OutIn, true, 3},
  };
  return cases;
}

Shape w_shape(const MatmulCase& m) {
  return m.layout == WeightLayout::InOut ? Shape{m.C, m.OC} : Shape{m.OC, m.C};
}

std::vector<double> scaled(const std::vector<float>& mag, double k) {
  std::vector<double> t(mag.size());
  for (size_t i = 0; i < mag.size(); ++i) t[i] = 2.0 * (k + 2.0) * kEps * mag[i];
  return t;
}

TEST_F(CudaBf16Ops, MatmulForward) {
  for (const auto& m : matmul_cases()) {
    SCOPED_TRACE(describe(m));
    const auto inp = rand_bf16(m.N * m.C), w = rand_bf16(m.C * m.OC), bias = rand_bf16(m.OC);
    std::vector<float> ref(m.N * m.OC), mag(m.N * m.OC);
    const float* bp = m.bias ? bias.data() : nullptr;
    cpu::matmul_forward<float>(ref.data(), inp.data(), w.data(), bp, m.N, m.C, m.OC, m.layout);
    const auto abias = abs_of(bias);
    cpu::matmul_forward<float>(mag.data(), abs_of(inp).data(), abs_of(w).data(), m.bias ? abias.data() : nullptr, m.N,
                               m.C, m.OC, m.layout);
    Tensor d_w = view_at(DType::BF16, m.w_offset, w_shape(m));
    put(d_w, w);
    Tensor d_bias;
    if (m.bias) {
      d_bias = view_at(DType::BF16, m.w_offset, {m.OC});
      put(d_bias, bias);
    }
    Tensor out = gpu().empty({m.N, m.OC}, DType::BF16);
    poison(out);
    gpu().matmul_forward(out, bf16({m.N, m.C}, inp), d_w, d_bias, m.layout);
    const auto got = read(out);
    expect_bf16_near(got, ref, scaled(mag, static_cast<double>(m.C)), "out");
    poison(out);
    gpu().matmul_forward(out, bf16({m.N, m.C}, inp), d_w, d_bias, m.layout);
    EXPECT_TRUE(test::bitwise_equal(read(out), got)) << "two identical calls differ";
  }
}

// dinp (BF16) and dw, dbias (F32) accumulate from random values; dw and dbias at element offsets too.
TEST_F(CudaBf16Ops, MatmulBackwardAccumulates) {
  for (const auto& m : matmul_cases()) {
    SCOPED_TRACE(describe(m));
    const auto inp = rand_bf16(m.N * m.C), w = rand_bf16(m.C * m.OC), dout = rand_bf16(m.N * m.OC);
    const auto dinp0 = rand_bf16(m.N * m.C), dw0 = rand_bf16(m.C * m.OC), dbias0 = rand_bf16(m.OC);
    std::vector<float> ref_dinp = dinp0, ref_dw = dw0, ref_dbias = dbias0;
    cpu::matmul_backward<float>(ref_dinp.data(), ref_dw.data(), ref_dbias.data(), dout.data(), inp.data(), w.data(),
                                m.N, m.C, m.OC, m.layout);
    std::vector<float> mag_dinp = abs_of(dinp0), mag_dw = abs_of(dw0), mag_dbias = abs_of(dbias0);
    cpu::matmul_backward<float>(mag_dinp.data(), mag_dw.data(), mag_dbias.data(), abs_of(dout).data(),
                                abs_of(inp).data(), abs_of(w).data(), m.N, m.C, m.OC, m.layout);
    Tensor d_w = view_at(DType::BF16, m.w_offset, w_shape(m));
    put(d_w, w);
    Tensor dw = view_at(DType::F32, m.w_offset, w_shape(m));
    put(dw, dw0);
    Tensor dbias = view_at(DType::F32, m.w_offset, {m.OC});
    put(dbias, dbias0);
    Tensor dinp = bf16({m.N, m.C}, dinp0);
    gpu().matmul_backward(dinp, dw, m.bias ? dbias : Tensor(), bf16({m.N, m.OC}, dout), bf16({m.N, m.C}, inp), d_w,
                          m.layout);
    expect_bf16_near(read(dinp), ref_dinp, scaled(mag_dinp, static_cast<double>(m.OC)), "dinp");
    expect_within(read(dw), ref_dw, scaled(mag_dw, static_cast<double>(m.N)), "dw");
    if (m.bias) {
      expect_within(read(dbias), ref_dbias, scaled(mag_dbias, static_cast<double>(m.N)), "dbias");
    } else {
      EXPECT_TRUE(test::bitwise_equal(read(dbias), dbias0)) << "an absent dbias was written";
    }
  }
}

// Padded out / dout rows (row stride ld > OC, the LM head's layout): the same budgets on the valid columns; the
// padding, NaN before the call, must come back with the same bits (forward) and must never be read (backward: a
// NaN read shows up in dinp / dw / dbias). The cases: the LM head (OutIn, odd OC, ld = round_up(OC, 64)); a fused
// BIAS epilogue on a padded D (16-byte aligned bias view); the bias fallback's kernel with a padded out (bias view at
// an odd element offset); an ld that is a multiple of 16 bytes but not of 64 elements.
TEST_F(CudaBf16Ops, MatmulWithPaddedRowsMatchesCpuAndLeavesThePadding) {
  struct PaddedCase {
    MatmulCase m;
    int64_t ld;
  };
  const std::vector<PaddedCase> cases = {
      {{37, 77, 257, WeightLayout::OutIn, false, 0}, 320},
      {{64, 64, 1000, WeightLayout::OutIn, false, 0}, 1024},
      {{130, 96, 200, WeightLayout::InOut, true, 0}, 256},
      {{130, 96, 200, WeightLayout::InOut, true, 3}, 256},
      {{45, 40, 100, WeightLayout::OutIn, true, 0}, 104},
  };
  for (const auto& pc : cases) {
    const MatmulCase& m = pc.m;
    const int64_t ld = pc.ld;
    SCOPED_TRACE(describe(m) + " ld=" + std::to_string(ld));
    const auto inp = rand_bf16(m.N * m.C), w = rand_bf16(m.C * m.OC), bias = rand_bf16(m.OC);
    std::vector<float> ref(m.N * m.OC), mag(m.N * m.OC);
    const float* bp = m.bias ? bias.data() : nullptr;
    cpu::matmul_forward<float>(ref.data(), inp.data(), w.data(), bp, m.N, m.C, m.OC, m.layout);
    const auto abias = abs_of(bias);
    cpu::matmul_forward<float>(mag.data(), abs_of(inp).data(), abs_of(w).data(), m.bias ? abias.data() : nullptr, m.N,
                               m.C, m.OC, m.layout);
    Tensor d_w = view_at(DType::BF16, m.w_offset, w_shape(m));
    put(d_w, w);
    Tensor d_bias;
    if (m.bias) {
      d_bias = view_at(DType::BF16, m.w_offset, {m.OC});
      put(d_bias, bias);
    }
    const Tensor d_inp = bf16({m.N, m.C}, inp);
    Tensor out = gpu().empty({m.N, ld}, DType::BF16);
    poison(out);
    gpu().matmul_forward(out, d_inp, d_w, d_bias, m.layout);
    const auto bits = read_bits(out);
    expect_bf16_near(valid_of(bits, m.OC, ld), ref, scaled(mag, static_cast<double>(m.C)), "out");
    EXPECT_EQ(padding_not_poison(bits, m.OC, ld), 0u) << "the forward wrote into the padding";

    const auto dout = rand_bf16(m.N * m.OC);
    const auto dinp0 = rand_bf16(m.N * m.C), dw0 = rand_bf16(m.C * m.OC), dbias0 = rand_bf16(m.OC);
    std::vector<float> ref_dinp = dinp0, ref_dw = dw0, ref_dbias = dbias0;
    cpu::matmul_backward<float>(ref_dinp.data(), ref_dw.data(), ref_dbias.data(), dout.data(), inp.data(), w.data(),
                                m.N, m.C, m.OC, m.layout);
    std::vector<float> mag_dinp = abs_of(dinp0), mag_dw = abs_of(dw0), mag_dbias = abs_of(dbias0);
    cpu::matmul_backward<float>(mag_dinp.data(), mag_dw.data(), mag_dbias.data(), abs_of(dout).data(),
                                abs_of(inp).data(), abs_of(w).data(), m.N, m.C, m.OC, m.layout);
    Tensor dw = view_at(DType::F32, m.w_offset, w_shape(m));
    put(dw, dw0);
    Tensor dbias = f32({m.OC}, dbias0);
    Tensor dinp = bf16({m.N, m.C}, dinp0);
    gpu().matmul_backward(dinp, dw, dbias, padded_bf16(*this, {m.N, ld}, m.OC, dout), d_inp, d_w, m.layout);
    expect_bf16_near(read(dinp), ref_dinp, scaled(mag_dinp, static_cast<double>(m.OC)), "dinp");
    expect_within(read(dw), ref_dw, scaled(mag_dw, static_cast<double>(m.N)), "dw");
    expect_within(read(dbias), ref_dbias, scaled(mag_dbias, static_cast<double>(m.N)), "dbias");
  }
}

// --- attention ---------------------------------------------------------------------------------------------------
// fp32 budgets of tests/test_cuda_kernels_b.cpp: forward (hs + T) eps (att absolute, as p <= 1; out relative to
// max(1, max|ref|)), backward 2 (hs + T) eps relative. Both backwards read the same BF16 probabilities.

struct AttentionCase {
  int64_t B, T, C, NH;
  std::vector<int64_t> pad;  // left padding per sequence; empty = keymask absent
};

const std::vector<AttentionCase>& attention_cases() {
  static const std::vector<AttentionCase> cases = {
      {3, 19, 48, 3, {0, 4, 11}},  // hs = 16; one partial tile
      {3, 19, 48, 3, {}},          // no keymask
      {2, 19, 48, 3, {19, 3}},     // a sequence that is all padding
      {2, 150, 128, 2, {0, 70}},   // hs = 64; three score tiles per side
  };
  return cases;
}

std::string describe(const AttentionCase& a) {
  std::string s = "B=" + std::to_string(a.B) + " T=" + std::to_string(a.T) + " C=" + std::to_string(a.C) +
                  " NH=" + std::to_string(a.NH) + " pad=";
  for (int64_t p : a.pad) s += std::to_string(p) + ",";
  return s;
}

std::vector<int32_t> left_pad_mask(const AttentionCase& a) {
  std::vector<int32_t> m(static_cast<size_t>(a.B * a.T));
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t t = 0; t < a.T; ++t) m[b * a.T + t] = t >= a.pad[b] ? 1 : 0;
  return m;
}

TEST_F(CudaBf16Ops, AttentionForward) {
  EXPECT_EQ(gpu().attention_saved_dtype(DType::BF16), DType::BF16);
  EXPECT_EQ(gpu().attention_saved_dtype(DType::F32), DType::F32);
  for (const auto& ac : attention_cases()) {
    SCOPED_TRACE(describe(ac));
    const int64_t B = ac.B, T = ac.T, C = ac.C, NH = ac.NH, hs = C / NH;
    const auto qkv = rand_bf16(B * T * 3 * C);
    const auto mask = ac.pad.empty() ? std::vector<int32_t>{} : left_pad_mask(ac);
    std::vector<float> ref_out(B * T * C), ref_att(B * NH * T * T);
    cpu::attention_forward<float>(ref_out.data(), ref_att.data(), qkv.data(), ac.pad.empty() ? nullptr : mask.data(),
                                  B, T, C, NH);
    Tensor out = gpu().empty({B, T, C}, DType::BF16);
    Tensor att = gpu().empty(gpu().attention_saved_shape(B, T, NH), gpu().attention_saved_dtype(DType::BF16));
    const Tensor d_qkv = bf16({B, T, 3 * C}, qkv);
    const Tensor d_mask = ac.pad.empty() ? Tensor() : i32({B, T}, mask);
    poison(out);
    poison(att);
    gpu().attention_forward(out, att, d_qkv, d_mask, NH);
    const double budget = static_cast<double>(hs + T) * kEps;
    const auto got_out = read(out), got_att = read(att);
    expect_bf16_near(got_att, ref_att, constant_tol(ref_att.size(), budget), "att");
    expect_bf16_near(got_out, ref_out, constant_tol(ref_out.size(), budget * std::max(1.0, max_abs(ref_out))), "out");
    size_t nonzero = 0;
    for (size_t i = 0; i < got_att.size(); ++i) nonzero += (ref_att[i] == 0.0f && got_att[i] != 0.0f);
    EXPECT_EQ(nonzero, 0u) << "att entries that must be exactly 0 (above the diagonal, masked keys)";
    poison(out);
    poison(att);
    gpu().attention_forward(out, att, d_qkv, d_mask, NH);
    EXPECT_TRUE(test::bitwise_equal(read(out), got_out)) << "out differs between two identical calls";
    EXPECT_TRUE(test::bitwise_equal(read(att), got_att)) << "att differs between two identical calls";
  }
}

TEST_F(CudaBf16Ops, AttentionBackwardAccumulates) {
  for (const auto& ac : attention_cases()) {
    SCOPED_TRACE(describe(ac));
    const int64_t B = ac.B, T = ac.T, C = ac.C, NH = ac.NH, hs = C / NH;
    const auto qkv = rand_bf16(B * T * 3 * C), dout = rand_bf16(B * T * C), dqkv0 = rand_bf16(B * T * 3 * C);
    const auto mask = ac.pad.empty() ? std::vector<int32_t>{} : left_pad_mask(ac);
    std::vector<float> out(B * T * C), att(B * NH * T * T);
    cpu::attention_forward<float>(out.data(), att.data(), qkv.data(), ac.pad.empty() ? nullptr : mask.data(), B, T,
                                  C, NH);
    att = rounded(att);  // the saved state is BF16: both sides read these probabilities
    std::vector<float> ref = dqkv0;
    cpu::attention_backward<float>(ref.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH);
    const Tensor d_qkv = bf16({B, T, 3 * C}, qkv), d_dout = bf16({B, T, C}, dout), d_att = bf16({B, NH, T, T}, att);
    Tensor dqkv = bf16({B, T, 3 * C}, dqkv0);
    gpu().attention_backward(dqkv, d_dout, d_qkv, Tensor(), d_att, NH);
    const auto got = read(dqkv);
    const double budget = 2.0 * static_cast<double>(hs + T) * kEps * std::max(1.0, max_abs(ref));
    expect_bf16_near(got, ref, constant_tol(ref.size(), budget), "dqkv");
    put(dqkv, dqkv0);
    gpu().attention_backward(dqkv, d_dout, d_qkv, Tensor(), d_att, NH);
    EXPECT_TRUE(test::bitwise_equal(read(dqkv), got)) << "two identical calls differ";
  }
}

// --- gelu, residual ----------------------------------------------------------------------------------------------
// GELU: the fp32 budgets of tests/test_cuda_kernels_a.cpp (tanhf differs by a few ulp between device and host:
// 1e-6 forward, 5e-6 backward, relative to max(1, max|ref|)). Residual: one fp32 add then one rounding on both
// sides: bitwise.

TEST_F(CudaBf16Ops, GeluForwardAndBackward) {
  const int64_t N = 37 * 77 + 5;
  const auto inp = rand_bf16(N, 3.0), dout = rand_bf16(N), dinp0 = rand_bf16(N);
  std::vector<float> ref(N), ref_d = dinp0;
  cpu::gelu_forward<float>(ref.data(), inp.data(), N);
  cpu::gelu_backward<float>(ref_d.data(), dout.data(), inp.data(), N);
  const Tensor d_inp = bf16({N}, inp);
  Tensor out = gpu().empty({N}, DType::BF16);
  poison(out);
  gpu().gelu_forward(out, d_inp);
  expect_bf16_near(read(out), ref, constant_tol(ref.size(), 1e-6 * std::max(1.0, max_abs(ref))), "out");
  Tensor dinp = bf16({N}, dinp0);
  gpu().gelu_backward(dinp, bf16({N}, dout), d_inp);
  expect_bf16_near(read(dinp), ref_d, constant_tol(ref_d.size(), 5e-6 * std::max(1.0, max_abs(ref_d))), "dinp");
  // In place (out aliases inp), as the contract allows.
  Tensor x = bf16({N}, inp);
  gpu().gelu_forward(x, x);
  EXPECT_TRUE(test::bitwise_equal(read(x), read(out))) << "in-place gelu differs";
}

TEST_F(CudaBf16Ops, ResidualIsTheRoundedTwinBitwise) {
  const int64_t N = 37 * 77 + 5;
  const auto a = rand_bf16(N, 4.0), b = rand_bf16(N, 0.01), dout = rand_bf16(N), da0 = rand_bf16(N),
             db0 = rand_bf16(N, 100.0);
  std::vector<float> ref(N), ref_da = da0, ref_db = db0;
  cpu::residual_forward<float>(ref.data(), a.data(), b.data(), N);
  cpu::residual_backward<float>(ref_da.data(), ref_db.data(), dout.data(), N);
  Tensor out = gpu().empty({N}, DType::BF16);
  poison(out);
  const Tensor d_a = bf16({N}, a), d_b = bf16({N}, b);
  gpu().residual_forward(out, d_a, d_b);
  EXPECT_TRUE(test::bitwise_equal(read(out), rounded(ref))) << "forward";
  gpu().residual_forward(d_a, d_a, d_b);  // out aliases a
  EXPECT_TRUE(test::bitwise_equal(read(d_a), rounded(ref))) << "forward in place";
  Tensor da = bf16({N}, da0), db = bf16({N}, db0);
  gpu().residual_backward(da, db, bf16({N}, dout));
  EXPECT_TRUE(test::bitwise_equal(read(da), rounded(ref_da))) << "da";
  EXPECT_TRUE(test::bitwise_equal(read(db), rounded(ref_db))) << "db";
}

// --- logprob -----------------------------------------------------------------------------------------------------
// fp32 budgets of tests/test_cuda_kernels_b.cpp: the log-sum-exp (V/256 + 48) eps absolute, plus a few eps of
// |x_t| + |lp|; seq_logp the weighted sum of those; dlogits |g| times that (p <= 1). The logits are BF16, so the
// float4 path becomes 8-element vectors: V = 50257 puts rows at every 2-byte phase of a 16-byte vector.

double lse_budget(int64_t V) { return (static_cast<double>(V) / 256.0 + 48.0) * kEps; }

struct LogprobData {
  int64_t B, T, V;
  std::vector<float> logits, weights;
  std::vector<int32_t> targets;
};

// Rows at different levels (one 60 above the rest), weight-0 prompt and padding with garbage targets, non-unit
// weights. The shifted logits are rounded to bf16 again.
LogprobData make_logprob_data(CudaBf16& f, int64_t B, int64_t T, int64_t V) {
  LogprobData d{B, T, V, f.rand_bf16(B * T * V, 2.0), std::vector<float>(static_cast<size_t>(B * T), 1.0f), {}};
  std::uniform_int_distribution<int32_t> shift(-5, 5);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  for (int64_t r = 0; r < B * T; ++r) {
    const float s = static_cast<float>(r == 3 ? 60 : shift(f.gen_));
    for (int64_t v = 0; v < V; ++v) d.logits[r * V + v] = round_bf16(d.logits[r * V + v] + s);
  }
  for (int64_t b = 0; b < B; ++b) d.weights[b * T + 0] = d.weights[b * T + 1] = 0.0f;
  d.weights[(B - 1) * T + T - 1] = 0.0f;
  d.weights[T - 1] = 0.5f;
  d.weights[T + 3] = 2.0f;
  d.targets.resize(static_cast<size_t>(B * T));
  for (int64_t r = 0; r < B * T; ++r)
    d.targets[r] = d.weights[r] != 0.0f ? tok(f.gen_) : (r % 2 ? -1 : static_cast<int32_t>(V + 17));
  return d;
}

// ld > V: logits and dlogits are [B,T,ld] (the LM head's padded layout); the logits' padding holds NaN (never read),
// dlogits' padding is poisoned and must keep its bits (never written), in place too.
void logprob_case(CudaBf16& f, int64_t B, int64_t T, int64_t V, int64_t ld = 0) {
  if (ld == 0) ld = V;
  SCOPED_TRACE("B=" + std::to_string(B) + " T=" + std::to_string(T) + " V=" + std::to_string(V) +
               " ld=" + std::to_string(ld));
  const auto d = make_logprob_data(f, B, T, V);
  std::vector<float> ref_seq(B), ref_lp(B * T);
  cpu::logprob_forward<float>(ref_seq.data(), ref_lp.data(), d.logits.data(), d.targets.data(), d.weights.data(), B,
                              T, V);
  std::vector<double> lp_tol(B * T, 0.0), seq_tol(B, 0.0);
  for (int64_t r = 0; r < B * T; ++r) {
    if (d.weights[r] == 0.0f) continue;  // exactly 0 there
    const double xt = d.logits[r * V + d.targets[r]];
    lp_tol[r] = lse_budget(V) + 4.0 * kEps * (1.0 + std::fabs(xt) + std::fabs(double(ref_lp[r])));
  }
  for (int64_t b = 0; b < B; ++b) {
    double mag = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const double w = std::fabs(double(d.weights[b * T + t]));
      seq_tol[b] += w * lp_tol[b * T + t];
      mag += w * std::fabs(double(ref_lp[b * T + t]));
    }
    seq_tol[b] += 4.0 * kEps * mag;
  }
  const Tensor logits = padded_bf16(f, {B, T, ld}, V, d.logits), targets = f.i32({B, T}, d.targets),
               weights = f.f32({B, T}, d.weights);
  Tensor seq = f.gpu().empty({B}, DType::F32), lp = f.gpu().empty({B, T}, DType::F32);
  f.poison(seq);
  f.poison(lp);
  f.gpu().logprob_forward(seq, lp, logits, targets, weights, V);
  const auto got_seq = f.read(seq);
  expect_within(f.read(lp), ref_lp, lp_tol, "token_logp");
  expect_within(got_seq, ref_seq, seq_tol, "seq_logp");
  f.poison(seq);
  f.gpu().logprob_forward(seq, Tensor(), logits, targets, weights, V);
  EXPECT_TRUE(test::bitwise_equal(f.read(seq), got_seq)) << "seq_logp differs without token_logp";

  std::uniform_real_distribution<double> ud(-2.0, 2.0);
  std::vector<float> dseq(B);
  for (auto& x : dseq) x = static_cast<float>(ud(f.gen_));
  std::vector<float> ref_d(B * T * V);
  cpu::logprob_backward<float>(ref_d.data(), d.logits.data(), d.targets.data(), d.weights.data(), dseq.data(), B, T,
                               V);
  std::vector<double> d_tol(ref_d.size());
  for (int64_t r = 0; r < B * T; ++r) {
    const double g = std::fabs(double(dseq[r / T]) * double(d.weights[r]));
    std::fill(d_tol.begin() + r * V, d_tol.begin() + (r + 1) * V, g * (lse_budget(V) + 4.0 * kEps));
  }
  const Tensor d_dseq = f.f32({B}, dseq);
  Tensor dlogits = f.gpu().empty({B, T, ld}, DType::BF16);
  f.poison(dlogits);
  f.gpu().logprob_backward(dlogits, logits, targets, weights, d_dseq, V);
  const auto got_bits = f.read_bits(dlogits);
  const auto got = valid_of(got_bits, V, ld);
  expect_bf16_near(got, ref_d, d_tol, "dlogits");
  EXPECT_EQ(padding_not_poison(got_bits, V, ld), 0u) << "the backward wrote into the padding";
  size_t nonzero = 0;
  for (int64_t r = 0; r < B * T; ++r)
    if (d.weights[r] == 0.0f)
      for (int64_t v = 0; v < V; ++v) nonzero += got[r * V + v] != 0.0f;
  EXPECT_EQ(nonzero, 0u) << "rows with weight 0 must be exactly 0";
  // In place: dlogits == logits gives the out-of-place bits; the padding keeps its NaN bits.
  Tensor inplace = padded_bf16(f, {B, T, ld}, V, d.logits);
  f.gpu().logprob_backward(inplace, inplace, targets, weights, d_dseq, V);
  const auto inplace_bits = f.read_bits(inplace);
  EXPECT_TRUE(test::bitwise_equal(valid_of(inplace_bits, V, ld), got)) << "in-place dlogits differs from out-of-place";
  EXPECT_EQ(padding_not_poison(inplace_bits, V, ld), 0u) << "in place, the padding was written";
}

TEST_F(CudaBf16Ops, LogprobForwardAndBackward) {
  logprob_case(*this, 3, 7, 1000);   // rows 16-byte aligned (1000 * 2 bytes): vectors over whole rows
  logprob_case(*this, 3, 7, 50257);  // odd V: every 2-byte phase (head / body / tail)
  logprob_case(*this, 2, 5, 3);      // V smaller than a vector
}

// The padded LM-head layout: ld = round_up(V, 64) (every row 16-byte aligned: 8-element vectors over whole rows); an
// ld that is a multiple of 16 bytes but not of 64 elements; V smaller than a vector in a padded row.
TEST_F(CudaBf16Ops, LogprobWithPaddedRowsMatchesCpuAndLeavesThePadding) {
  logprob_case(*this, 3, 7, 50257, 50304);
  logprob_case(*this, 3, 7, 1000, 1024);
  logprob_case(*this, 3, 7, 257, 264);
  logprob_case(*this, 2, 5, 3, 64);
}

// The row-stride rule at the boundary (runtime/backend.h, "Padded rows"): ld >= the width, and a padded ld a multiple
// of 16 bytes; a clear error naming the argument otherwise.
TEST_F(CudaBf16Ops, PaddedRowStrideRulesThrowNamingTheArgument) {
  auto expect_error = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no throw, expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const int64_t N = 4, C = 6, OC = 9;
  auto bf = [&](Shape s) { return gpu().zeros(std::move(s), DType::BF16); };
  auto fl = [&](Shape s) { return gpu().zeros(std::move(s), DType::F32); };
  const Tensor x = bf({N, C}), w = bf({OC, C}), tg = gpu().zeros({1, 3}, DType::I32);
  EXPECT_NO_THROW(gpu().matmul_forward(bf({N, 16}), x, w, Tensor(), WeightLayout::OutIn));  // 32-byte rows
  expect_error([&] { gpu().matmul_forward(bf({N, 10}), x, w, Tensor(), WeightLayout::OutIn); }, "matmul out");
  expect_error([&] { gpu().matmul_forward(bf({N, 8}), x, w, Tensor(), WeightLayout::OutIn); }, "matmul out");
  expect_error([&] { gpu().matmul_backward(Tensor(), fl({OC, C}), Tensor(), bf({N, 10}), x, w, WeightLayout::OutIn); },
               "matmul dout");
  EXPECT_NO_THROW(gpu().matmul_forward(fl({N, 12}), fl({N, C}), fl({OC, C}), Tensor(), WeightLayout::OutIn));
  expect_error([&] { gpu().matmul_forward(fl({N, 10}), fl({N, C}), fl({OC, C}), Tensor(), WeightLayout::OutIn); },
               "16 bytes");
  EXPECT_NO_THROW(gpu().logprob_forward(fl({1}), Tensor(), bf({1, 3, 16}), tg, fl({1, 3}), 9));
  expect_error([&] { gpu().logprob_forward(fl({1}), Tensor(), bf({1, 3, 12}), tg, fl({1, 3}), 9); },
               "logprob logits");
  expect_error([&] { gpu().logprob_forward(fl({1}), Tensor(), bf({1, 3, 16}), tg, fl({1, 3}), 17); },
               "logprob logits");
  expect_error([&] { gpu().logprob_forward(fl({1}), Tensor(), bf({1, 3, 16}), tg, fl({1, 3}), 0); }, "V must be");
  expect_error([&] { gpu().logprob_backward(bf({1, 3, 16}), bf({1, 3, 16}), tg, fl({1, 3}), fl({1}), 17); },
               "logprob logits");
}

TEST_F(CudaBf16Ops, LogprobOutOfRangeTargetGivesNaN) {
  const int64_t B = 1, T = 2, V = 37;
  const auto x = rand_bf16(B * T * V);
  const std::vector<int32_t> tgt = {5, static_cast<int32_t>(V)};
  const std::vector<float> w = {1.0f, 1.0f};
  const Tensor logits = bf16({B, T, V}, x), targets = i32({B, T}, tgt), weights = f32({B, T}, w);
  Tensor seq = gpu().empty({B}, DType::F32), lp = gpu().empty({B, T}, DType::F32);
  gpu().logprob_forward(seq, lp, logits, targets, weights);
  EXPECT_TRUE(std::isnan(read(lp)[1]));
  EXPECT_TRUE(std::isnan(read(seq)[0]));
  Tensor dl = gpu().empty({B, T, V}, DType::BF16);
  gpu().logprob_backward(dl, logits, targets, weights, f32({B}, {1.0f}));
  const auto g = read(dl);
  for (int64_t v = 0; v < V; ++v) EXPECT_TRUE(std::isnan(g[V + v])) << v;
}

// --- dtype rules at the boundary ---------------------------------------------------------------------------------

TEST_F(CudaBf16Ops, DtypeRulesThrowNamingTheArgument) {
  auto expect_error = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no throw, expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const int64_t N = 4, C = 6;
  auto bf = [&](Shape s) { return gpu().zeros(std::move(s), DType::BF16); };
  auto fl = [&](Shape s) { return gpu().zeros(std::move(s), DType::F32); };
  // Statistics and parameter gradients are F32 in a BF16 call; activations BF16.
  expect_error([&] { gpu().layernorm_forward(bf({N, C}), bf({N}), fl({N}), bf({N, C}), bf({C}), bf({C}), 1e-5); },
               "layernorm mean");
  expect_error([&] { gpu().layernorm_forward(fl({N, C}), fl({N}), fl({N}), bf({N, C}), bf({C}), bf({C}), 1e-5); },
               "layernorm out");
  expect_error([&] { gpu().matmul_backward(bf({N, C}), bf({C, C}), Tensor(), bf({N, C}), bf({N, C}), bf({C, C}),
                                           WeightLayout::InOut); },
               "matmul dw");
  expect_error([&] { gpu().matmul_backward(bf({N, C}), fl({C, C}), bf({C}), bf({N, C}), bf({N, C}), bf({C, C}),
                                           WeightLayout::InOut); },
               "matmul dbias");
  expect_error([&] { gpu().matmul_forward(bf({N, C}), bf({N, C}), fl({C, C}), Tensor(), WeightLayout::InOut); },
               "matmul w");
  expect_error([&] { gpu().encoder_backward(bf({5, C}), fl({3, C}), bf({1, 3, C}), gpu().zeros({1, 3}, DType::I32)); },
               "encoder dwte");
  expect_error([&] { gpu().attention_forward(bf({1, 3, C}), fl({1, 2, 3, 3}), bf({1, 3, 3 * C}), Tensor(), 2); },
               "attention saved");
  expect_error([&] { gpu().logprob_forward(fl({1}), Tensor(), bf({1, 3, 5}), gpu().zeros({1, 3}, DType::I32),
                                           bf({1, 3})); },
               "logprob weights");
  expect_error([&] { gpu().logprob_backward(fl({1, 3, 5}), bf({1, 3, 5}), gpu().zeros({1, 3}, DType::I32),
                                            fl({1, 3}), fl({1})); },
               "logprob dlogits");
  expect_error([&] { gpu().residual_forward(bf({N}), bf({N}), fl({N})); }, "residual b");
  expect_error([&] { gpu().gelu_forward(bf({N}), gpu().zeros({N}, DType::F64)); }, "gelu inp");
  // The optimizer ops are F32 only (master weights).
  expect_error([&] { gpu().sum_squares(bf({N})); }, "sum_squares x");
  expect_error([&] { gpu().scale(bf({N}), 2.0); }, "scale x");
  expect_error([&] { gpu().adamw_update(bf({N}), bf({N}), bf({N}), bf({N}), AdamWParams{}); }, "adamw param");
}

}  // namespace
}  // namespace dpo
