// The Llama-family ops on CudaBackend (kernels/rmsnorm.cuh, rope.cuh, swiglu.cuh, repeat_kv.cuh) against the CPU
// backend (the twins of kernels/*_cpu.cpp) on the same inputs, in F32 and BF16: seeded random inputs (BF16 tensors
// hold bf16-exact values, so both backends read the same numbers), every "=" output poisoned (all bytes 0xFF: NaN)
// before the call, "+=" outputs started from random values, odd sizes (C = 13, D = 6 / 10, I = 11, n_head 6 with
// n_kv_head 1, 2, 3, 6), the Llama shapes (C 2048, 32 heads, 8 kv heads, D 64, I 8192), the Qwen2-0.5B shapes (C 896,
// 14 heads, 2 kv heads, D 64, I 4864), views at an odd element offset (the scalar paths), bitwise determinism.
// Without a GPU every test skips with the reason.
//
// Budgets. eps = FLT_EPSILON; ulp_bf16(x) the spacing of bf16 numbers at x (a BF16 output may round the other way
// when the fp32 values of the two backends straddle a rounding boundary: one ulp).
//   RMSNorm: the GPU sums C squares in fp32, C/32 per lane then a 5-level tree: the mean of squares is within
//     (C/32 + 7) eps relative, rstd within half of that plus 2 eps; out and the dinp terms add a few roundings.
//     kr = (C/32 + 16) eps bounds every relative error below with a 2x margin. out: kr |out|; dinp (terms
//     s g_i and s xn_i m, m = mean(g xn)): kr (|s g_i| + |s xn_i| mean|g xn| + |dinp before|); dw: a chain of
//     N/8 + chunks + 16 additions plus kr: (N/8 + chunks + 16) eps + kr, times (sum_n |dout xn| + |dw before|).
//     BF16 out: HF's order rounds x * rstd to bf16 first: one ulp of that times |w|, plus one ulp of out.
//   RoPE: per element two products and an fma against the twin's double: 3 eps (|x_i| + |x_{i+D/2}|); v heads bitwise.
//   SwiGLU: expf within 2 ulp and about 6 roundings: 12 eps times the magnitude of each term.
//   repeat_kv: bitwise (the same fp32 additions in the same order as the CPU backend).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::test_seed;

constexpr double kEps = FLT_EPSILON;

double ulp_bf16(double x) {
  x = std::fabs(x);
  if (x == 0.0 || std::isinf(x)) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, std::max(std::ilogb(x), -126) - 7);
}

void expect_within(const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& tol,
                   const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(tol.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_ratio = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
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

class CudaLlama : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
    gen_.seed(test_seed());
  }

  Tensor host(const std::vector<double>& v, Shape shape, DType dt) {
    Tensor t = Tensor::host(std::move(shape), DType::F64);
    std::memcpy(t.raw(), v.data(), v.size() * sizeof(double));
    return convert_host(t, dt, "test input");
  }
  Tensor host_i32(const std::vector<int32_t>& v, Shape shape) {
    Tensor t = Tensor::host(std::move(shape), DType::I32);
    std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
    return t;
  }
  Tensor host_poisoned(Shape shape, DType dt) {
    Tensor t = Tensor::host(std::move(shape), dt);
    std::memset(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()));
    return t;
  }
  // A device tensor of `shape`; offset 1 places it one element into its buffer (not 16-byte aligned: the kernels'
  // scalar paths).
  Tensor dev_empty(const Shape& shape, DType dt, int64_t offset) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return gpu_->empty({n + offset}, dt).view(offset, shape);
  }
  Tensor dev(const Tensor& h, int64_t offset = 0) {
    Tensor t = dev_empty(h.shape(), h.dtype(), offset);
    gpu_->copy_from_host(t, h);
    return t;
  }
  Tensor dev_poisoned(const Shape& shape, DType dt, int64_t offset = 0) {
    Tensor t = dev_empty(shape, dt, offset);
    DPO_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()),
                                   static_cast<cudaStream_t>(gpu_->native_stream())));
    return t;
  }
  std::vector<uint8_t> bytes(const Tensor& t) {
    Tensor h = t;
    if (t.device().kind != DeviceKind::CPU) {
      h = Tensor::host(t.shape(), t.dtype());
      gpu_->copy_to_host(h, t);
    }
    const auto* p = static_cast<const uint8_t*>(h.raw());
    return {p, p + h.nbytes()};
  }
  std::vector<double> values(const Tensor& t) {
    Tensor h = t;
    if (t.device().kind != DeviceKind::CPU) {
      h = Tensor::host(t.shape(), t.dtype());
      gpu_->copy_to_host(h, t);
    }
    const Tensor d = convert_host(h, DType::F64, "test output");
    const double* p = d.data<double>();
    return {p, p + d.numel()};
  }
  // Values exactly representable in dt (BF16 rounded once), as doubles.
  std::vector<double> randn_in(DType dt, size_t n, double scale = 1.0) {
    const auto v = test::randn<double>(gen_, n, scale);
    return values(host(v, {static_cast<int64_t>(n)}, dt));
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::mt19937_64 gen_;
};

// ============================================================================================== RMSNorm

struct NormShape {
  int64_t N, C, offset;
};

// Forward (out, rstd) and backward (dinp += from random values, dinp = over poison, dw += from random values) against
// the CPU backend, and the GPU run twice for bitwise determinism.
TEST_F(CudaLlama, RmsNormMatchesTheCpuTwin) {
  const NormShape shapes[] = {{7, 13, 0},  {64, 2048, 0}, {50, 896, 0}, {40, 8192, 0},
                              {33, 2048, 1}, {9, 13, 1},  {300, 96, 0}};
  for (DType A : {DType::F32, DType::BF16}) {
    for (const NormShape& s : shapes) {
      const int64_t N = s.N, C = s.C;
      SCOPED_TRACE(std::string(dtype_name(A)) + " N=" + std::to_string(N) + " C=" + std::to_string(C) +
                   " offset=" + std::to_string(s.offset));
      const double eps_norm = 1e-6;
      const auto x = randn_in(A, N * C, 2.0), w = randn_in(A, C), dy = randn_in(A, N * C);
      const auto d0 = randn_in(A, N * C), dw0 = randn_in(DType::F32, C);
      const Tensor hx = host(x, {N, C}, A), hw = host(w, {C}, A), hdy = host(dy, {N, C}, A);
      const Tensor hd0 = host(d0, {N, C}, A), hdw0 = host(dw0, {C}, DType::F32);
      // CPU.
      Tensor c_out = host_poisoned({N, C}, A), c_rstd = host_poisoned({N}, DType::F32);
      cpu_->rmsnorm_forward(c_out, c_rstd, hx, hw, eps_norm);
      Tensor c_dx = host(d0, {N, C}, A), c_dw = host(dw0, {C}, DType::F32), c_dxo = host_poisoned({N, C}, A);
      cpu_->rmsnorm_backward(c_dx, c_dw, hdy, hx, hw, c_rstd, GradWrite::Accumulate);
      Tensor c_dw2 = host(std::vector<double>(C, 0.0), {C}, DType::F32);
      cpu_->rmsnorm_backward(c_dxo, c_dw2, hdy, hx, hw, c_rstd, GradWrite::Overwrite);
      // GPU, twice.
      std::vector<uint8_t> first[5];
      for (int rep = 0; rep < 2; ++rep) {
        const Tensor gx = dev(hx, s.offset), gw = dev(hw), gdy = dev(hdy, s.offset);
        Tensor g_out = dev_poisoned({N, C}, A, s.offset), g_rstd = dev_poisoned({N}, DType::F32);
        gpu_->rmsnorm_forward(g_out, g_rstd, gx, gw, eps_norm);
        Tensor g_dx = dev(hd0, s.offset), g_dw = dev(hdw0), g_dxo = dev_poisoned({N, C}, A, s.offset);
        gpu_->rmsnorm_backward(g_dx, g_dw, gdy, gx, gw, g_rstd, GradWrite::Accumulate);
        Tensor g_dw2 = dev(host(std::vector<double>(C, 0.0), {C}, DType::F32));
        gpu_->rmsnorm_backward(g_dxo, g_dw2, gdy, gx, gw, g_rstd, GradWrite::Overwrite);
        const Tensor outs[5] = {g_out, g_rstd, g_dx, g_dw, g_dxo};
        if (rep == 1) {
          for (int k = 0; k < 5; ++k) EXPECT_EQ(bytes(outs[k]), first[k]) << "run-to-run, output " << k;
          break;
        }
        for (int k = 0; k < 5; ++k) first[k] = bytes(outs[k]);
        const double kr = (static_cast<double>(C) / 32.0 + 16.0) * kEps;
        const auto rs = values(c_rstd), out = values(c_out);
        std::vector<double> t_out(N * C), t_rstd(N), t_dx(N * C), t_dxo(N * C), t_dw(C), t_dw2(C);
        const int64_t chunk_rows = std::max<int64_t>(32, (N + 511) / 512), chunks = (N + chunk_rows - 1) / chunk_rows;
        const double kw = (static_cast<double>(N) / 8.0 + static_cast<double>(chunks) + 16.0) * kEps + kr;
        std::vector<double> dw_mag(C, 0.0);
        for (int64_t n = 0; n < N; ++n) {
          t_rstd[n] = kr * rs[n];
          double m = 0.0;
          for (int64_t c = 0; c < C; ++c) m += std::fabs(w[c] * dy[n * C + c] * x[n * C + c] * rs[n]);
          m /= static_cast<double>(C);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = n * C + c;
            const double xn = x[i] * rs[n], g = w[c] * dy[i];
            t_out[i] = kr * std::fabs(out[i]) +
                       (A == DType::BF16 ? ulp_bf16(xn) * std::fabs(w[c]) + ulp_bf16(out[i]) : 0.0);
            const double term = kr * (std::fabs(rs[n] * g) + std::fabs(rs[n] * xn) * m);
            t_dx[i] = term + kr * std::fabs(d0[i]);
            t_dxo[i] = term;
            dw_mag[c] += std::fabs(dy[i] * xn);
          }
        }
        const auto c_dx_v = values(c_dx), c_dxo_v = values(c_dxo);
        if (A == DType::BF16)
          for (int64_t i = 0; i < N * C; ++i) {
            t_dx[i] += ulp_bf16(c_dx_v[i]);
            t_dxo[i] += ulp_bf16(c_dxo_v[i]);
          }
        for (int64_t c = 0; c < C; ++c) {
          t_dw[c] = kw * (dw_mag[c] + std::fabs(dw0[c]));
          t_dw2[c] = kw * dw_mag[c];
        }
        expect_within(values(g_out), out, t_out, "rmsnorm out");
        expect_within(values(g_rstd), rs, t_rstd, "rmsnorm rstd");
        expect_within(values(g_dx), c_dx_v, t_dx, "rmsnorm dinp (+=)");
        expect_within(values(g_dxo), c_dxo_v, t_dxo, "rmsnorm dinp (= over NaN)");
        expect_within(values(g_dw), values(c_dw), t_dw, "rmsnorm dw (+=)");
        expect_within(values(g_dw2), values(c_dw2), t_dw2, "rmsnorm dw (from 0)");
      }
    }
  }
}

// The fused residual add is bitwise residual_forward + rmsnorm_forward on the GPU, with res_out separate and
// aliasing a.
TEST_F(CudaLlama, ResidualRmsNormIsBitwiseThePair) {
  const NormShape shapes[] = {{7, 13, 0}, {64, 2048, 0}, {21, 896, 1}, {5, 8192, 0}};
  for (DType A : {DType::F32, DType::BF16}) {
    for (const NormShape& s : shapes) {
      const int64_t N = s.N, C = s.C;
      SCOPED_TRACE(std::string(dtype_name(A)) + " N=" + std::to_string(N) + " C=" + std::to_string(C));
      const Tensor ha = host(randn_in(A, N * C), {N, C}, A), hb = host(randn_in(A, N * C), {N, C}, A);
      const Tensor hw = host(randn_in(A, C), {C}, A);
      const Tensor a = dev(ha, s.offset), b = dev(hb, s.offset), w = dev(hw);
      Tensor sum = dev_poisoned({N, C}, A, s.offset), out = dev_poisoned({N, C}, A);
      Tensor rstd = dev_poisoned({N}, DType::F32);
      gpu_->residual_forward(sum, a, b);
      gpu_->rmsnorm_forward(out, rstd, sum, w, 1e-5);
      Tensor res2 = dev_poisoned({N, C}, A, s.offset), out2 = dev_poisoned({N, C}, A),
             rstd2 = dev_poisoned({N}, DType::F32);
      gpu_->residual_rmsnorm_forward(res2, out2, rstd2, a, b, w, 1e-5);
      EXPECT_EQ(bytes(res2), bytes(sum));
      EXPECT_EQ(bytes(out2), bytes(out));
      EXPECT_EQ(bytes(rstd2), bytes(rstd));
      const Tensor a2 = dev(ha, s.offset);
      Tensor out3 = dev_poisoned({N, C}, A), rstd3 = dev_poisoned({N}, DType::F32);
      gpu_->residual_rmsnorm_forward(a2, out3, rstd3, a2, b, w, 1e-5);
      EXPECT_EQ(bytes(a2), bytes(sum));
      EXPECT_EQ(bytes(out3), bytes(out));
      // And the CPU's pair within the forward's budget (the CPU backend's own fused op is its pair, bitwise).
      Tensor c_res = host_poisoned({N, C}, A), c_out = host_poisoned({N, C}, A), c_r = host_poisoned({N}, DType::F32);
      cpu_->residual_rmsnorm_forward(c_res, c_out, c_r, ha, hb, hw, 1e-5);
      EXPECT_EQ(bytes(res2), bytes(c_res));  // one fp32 add (and one rounding) per element on both
    }
  }
}

// ============================================================================================== RoPE

struct HeadShape {
  int64_t N, n_head, n_kv_head, D, offset;
};
const HeadShape kHeadShapes[] = {{7, 6, 1, 6, 0},   {7, 6, 2, 10, 0},  {9, 6, 3, 6, 0},   {7, 6, 6, 10, 0},
                                 {33, 32, 8, 64, 0}, {33, 14, 2, 64, 0}, {17, 32, 8, 64, 1}, {5, 14, 2, 64, 1},
                                 {11, 4, 2, 16, 0}};

TEST_F(CudaLlama, RopeMatchesTheCpuTwin) {
  for (DType A : {DType::F32, DType::BF16}) {
    for (const HeadShape& s : kHeadShapes) {
      const int64_t N = s.N, nh = s.n_head, nkv = s.n_kv_head, D = s.D, H = D / 2, P = 2 * N + 3;
      const int64_t W = (nh + 2 * nkv) * D;
      SCOPED_TRACE(std::string(dtype_name(A)) + " N=" + std::to_string(N) + " heads " + std::to_string(nh) + "/" +
                   std::to_string(nkv) + " D=" + std::to_string(D) + " offset=" + std::to_string(s.offset));
      std::vector<double> cs(P * H), sn(P * H);
      for (int64_t p = 0; p < P; ++p)
        for (int64_t i = 0; i < H; ++i) {
          const double ang = static_cast<double>(p) * std::pow(10000.0, -2.0 * static_cast<double>(i) / D);
          cs[p * H + i] = static_cast<float>(std::cos(ang));
          sn[p * H + i] = static_cast<float>(std::sin(ang));
        }
      std::uniform_int_distribution<int32_t> pd(0, static_cast<int32_t>(P - 1));
      std::vector<int32_t> pos(N);
      for (auto& p : pos) p = pd(gen_);
      const Tensor hc = host(cs, {P, H}, DType::F32), hs = host(sn, {P, H}, DType::F32), hp = host_i32(pos, {N});
      const auto x = randn_in(A, N * W), dy = randn_in(A, N * W);
      const Tensor hx = host(x, {N, W}, A), hdy = host(dy, {N, W}, A);
      Tensor c_y = host_poisoned({N, W}, A), c_dx = host_poisoned({N, W}, A);
      cpu_->rope_forward(c_y, hx, hc, hs, hp, nh, nkv);
      cpu_->rope_backward(c_dx, hdy, hc, hs, hp, nh, nkv);
      const Tensor gc = dev(hc), gs = dev(hs), gp = dev(hp);
      std::vector<uint8_t> first_y, first_dx;
      for (int rep = 0; rep < 2; ++rep) {
        Tensor g_y = dev_poisoned({N, W}, A, s.offset), g_dx = dev_poisoned({N, W}, A, s.offset);
        gpu_->rope_forward(g_y, dev(hx, s.offset), gc, gs, gp, nh, nkv);
        gpu_->rope_backward(g_dx, dev(hdy, s.offset), gc, gs, gp, nh, nkv);
        Tensor g_in = dev(hx, s.offset);  // in place
        gpu_->rope_forward(g_in, g_in, gc, gs, gp, nh, nkv);
        EXPECT_EQ(bytes(g_in), bytes(g_y)) << "in place";
        if (rep == 1) {
          EXPECT_EQ(bytes(g_y), first_y) << "run-to-run";
          EXPECT_EQ(bytes(g_dx), first_dx) << "run-to-run";
          break;
        }
        first_y = bytes(g_y);
        first_dx = bytes(g_dx);
        const auto cy = values(c_y), cdx = values(c_dx);
        std::vector<double> ty(N * W, 0.0), tdx(N * W, 0.0);  // v heads: 0 (bitwise copies)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h0 = 0; h0 < (nh + nkv) * D; h0 += D)
            for (int64_t i = 0; i < H; ++i) {
              const int64_t a = n * W + h0 + i, b = a + H;
              const double bx = 3 * kEps * (std::fabs(x[a]) + std::fabs(x[b]));
              const double bd = 3 * kEps * (std::fabs(dy[a]) + std::fabs(dy[b]));
              ty[a] = bx + (A == DType::BF16 ? ulp_bf16(cy[a]) : 0.0);
              ty[b] = bx + (A == DType::BF16 ? ulp_bf16(cy[b]) : 0.0);
              tdx[a] = bd + (A == DType::BF16 ? ulp_bf16(cdx[a]) : 0.0);
              tdx[b] = bd + (A == DType::BF16 ? ulp_bf16(cdx[b]) : 0.0);
            }
        expect_within(values(g_y), cy, ty, "rope_forward");
        expect_within(values(g_dx), cdx, tdx, "rope_backward");
      }
    }
  }
}

// A position outside [0, P) cannot be reported without a sync: that row of out is NaN (all heads), the others are
// untouched by it.
TEST_F(CudaLlama, RopePositionOutOfRangeGivesANanRow) {
  for (DType A : {DType::F32, DType::BF16}) {
    const int64_t N = 4, nh = 4, nkv = 2, D = 16, H = D / 2, P = 3, W = (nh + 2 * nkv) * D;
    const Tensor hc = host(std::vector<double>(P * H, 1.0), {P, H}, DType::F32);
    const Tensor hs = host(std::vector<double>(P * H, 0.0), {P, H}, DType::F32);
    const Tensor hx = host(randn_in(A, N * W), {N, W}, A);
    for (int32_t bad : {-1, 3, 1 << 30}) {
      SCOPED_TRACE(std::string(dtype_name(A)) + " pos " + std::to_string(bad));
      const Tensor gp = dev(host_i32({0, bad, 2, 1}, {N}));
      Tensor y = dev_poisoned({N, W}, A);
      gpu_->rope_forward(y, dev(hx), dev(hc), dev(hs), gp, nh, nkv);
      const auto v = values(y), xv = values(hx);
      for (int64_t k = 0; k < W; ++k) {
        EXPECT_TRUE(std::isnan(v[W + k])) << k;
        EXPECT_EQ(v[k], xv[k]) << k;  // cos 1, sin 0: the identity
        EXPECT_EQ(v[2 * W + k], xv[2 * W + k]) << k;
      }
    }
  }
}

// ============================================================================================== SwiGLU

TEST_F(CudaLlama, SwigluMatchesTheCpuTwin) {
  struct S {
    int64_t N, I, offset;
  };
  const S shapes[] = {{7, 11, 0}, {16, 8192, 0}, {16, 4864, 0}, {9, 4864, 1}, {3, 1, 0}};
  for (DType A : {DType::F32, DType::BF16}) {
    for (const S& s : shapes) {
      const int64_t N = s.N, I = s.I;
      SCOPED_TRACE(std::string(dtype_name(A)) + " N=" + std::to_string(N) + " I=" + std::to_string(I) +
                   " offset=" + std::to_string(s.offset));
      auto x = randn_in(A, N * 2 * I, 3.0);
      x[0] = -200.0;  // saturated gates: finite on both
      if (I > 1) x[1] = 150.0;
      const auto dy = randn_in(A, N * I);
      const Tensor hx = host(x, {N, 2 * I}, A), hdy = host(dy, {N, I}, A);
      Tensor c_y = host_poisoned({N, I}, A), c_dx = host_poisoned({N, 2 * I}, A);
      cpu_->swiglu_forward(c_y, hx);
      cpu_->swiglu_backward(c_dx, hdy, hx);
      std::vector<uint8_t> first_y, first_dx;
      for (int rep = 0; rep < 2; ++rep) {
        Tensor g_y = dev_poisoned({N, I}, A, s.offset), g_dx = dev_poisoned({N, 2 * I}, A, s.offset);
        const Tensor gx = dev(hx, s.offset);
        gpu_->swiglu_forward(g_y, gx);
        gpu_->swiglu_backward(g_dx, dev(hdy, s.offset), gx);
        if (rep == 1) {
          EXPECT_EQ(bytes(g_y), first_y) << "run-to-run";
          EXPECT_EQ(bytes(g_dx), first_dx) << "run-to-run";
          break;
        }
        first_y = bytes(g_y);
        first_dx = bytes(g_dx);
        const auto cy = values(c_y), cdx = values(c_dx);
        std::vector<double> ty(N * I), tdx(N * 2 * I);
        const bool bf = A == DType::BF16;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < I; ++i) {
            const double gt = x[n * 2 * I + i], u = x[n * 2 * I + I + i], d = dy[n * I + i];
            const double sg = 1.0 / (1.0 + std::exp(-gt));
            ty[n * I + i] = 12 * kEps * std::fabs(gt * sg * u) + (bf ? ulp_bf16(cy[n * I + i]) : 0.0);
            const int64_t a = n * 2 * I + i, b = a + I;
            tdx[a] = 12 * kEps * std::fabs(d * u) * (sg + std::fabs(gt) * sg * (1 - sg)) +
                     (bf ? ulp_bf16(cdx[a]) : 0.0);
            tdx[b] = 12 * kEps * std::fabs(d * gt * sg) + (bf ? ulp_bf16(cdx[b]) : 0.0);
          }
        expect_within(values(g_y), cy, ty, "swiglu_forward");
        expect_within(values(g_dx), cdx, tdx, "swiglu_backward");
      }
    }
  }
}

// ============================================================================================== repeat_kv

TEST_F(CudaLlama, RepeatKvIsBitwiseTheCpuTwin) {
  for (DType A : {DType::F32, DType::BF16}) {
    for (const HeadShape& s : kHeadShapes) {
      const int64_t N = s.N, nh = s.n_head, nkv = s.n_kv_head, D = s.D;
      const int64_t W = (nh + 2 * nkv) * D, Wo = 3 * nh * D;
      SCOPED_TRACE(std::string(dtype_name(A)) + " N=" + std::to_string(N) + " heads " + std::to_string(nh) + "/" +
                   std::to_string(nkv) + " D=" + std::to_string(D) + " offset=" + std::to_string(s.offset));
      const Tensor hx = host(randn_in(A, N * W), {N, W}, A), hdy = host(randn_in(A, N * Wo), {N, Wo}, A);
      Tensor c_y = host_poisoned({N, Wo}, A), c_dx = host_poisoned({N, W}, A);
      cpu_->repeat_kv_forward(c_y, hx, nh, nkv);
      cpu_->repeat_kv_backward(c_dx, hdy, nh, nkv);
      Tensor g_y = dev_poisoned({N, Wo}, A, s.offset), g_dx = dev_poisoned({N, W}, A, s.offset);
      gpu_->repeat_kv_forward(g_y, dev(hx, s.offset), nh, nkv);
      gpu_->repeat_kv_backward(g_dx, dev(hdy, s.offset), nh, nkv);
      EXPECT_EQ(bytes(g_y), bytes(c_y));
      EXPECT_EQ(bytes(g_dx), bytes(c_dx));
    }
  }
}

// ============================================================================================== boundary

TEST_F(CudaLlama, BadArgumentsAreRefused) {
  const int64_t N = 4, D = 8;
  const DType A = DType::BF16;
  Tensor kv = gpu_->zeros({N, (4 + 2 * 3) * D}, A), y = gpu_->zeros({N, 3 * 4 * D}, A);
  EXPECT_THROW(gpu_->repeat_kv_forward(y, kv, 4, 3), Error);  // 4 % 3 != 0
  EXPECT_THROW(gpu_->repeat_kv_backward(kv, y, 4, 3), Error);
  Tensor q = gpu_->zeros({N, (4 + 2 * 2) * D}, A), pos = gpu_->zeros({N}, DType::I32);
  Tensor cs = gpu_->zeros({3, D / 2}, DType::F32), wrong = gpu_->zeros({3, D / 2}, A);
  EXPECT_NO_THROW(gpu_->rope_forward(q, q, cs, cs, pos, 4, 2));
  EXPECT_THROW(gpu_->rope_forward(q, q, wrong, cs, pos, 4, 2), Error);          // tables in grad_dtype
  EXPECT_THROW(gpu_->rope_forward(q, q, gpu_->zeros({3, D}, DType::F32), cs, pos, 4, 2), Error);
  EXPECT_THROW(gpu_->rope_forward(q, q, cs, cs, gpu_->zeros({N + 1}, DType::I32), 4, 2), Error);
  EXPECT_THROW(gpu_->swiglu_forward(gpu_->zeros({N, 3}, A), gpu_->zeros({N, 7}, A)), Error);
  EXPECT_THROW(gpu_->rmsnorm_forward(gpu_->zeros({N, 5}, A), gpu_->zeros({N}, DType::F32), gpu_->zeros({N, 5}, A),
                                     gpu_->zeros({6}, A), 1e-5),
               Error);
  EXPECT_THROW(gpu_->rmsnorm_forward(gpu_->zeros({N, 5}, A), gpu_->zeros({N}, A), gpu_->zeros({N, 5}, A),
                                     gpu_->zeros({5}, A), 1e-5),
               Error);  // rstd in grad_dtype
}

}  // namespace
}  // namespace dpo
