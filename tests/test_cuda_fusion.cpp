// The fused ops of the training step on the GPU (docs/architecture.md, "Fusions"), through the Backend interface: each
// fused op against the GPU's unfused ops and against the CPU twin, in fp32 and bf16, at GPT-2 124M's width and at
// an odd width (C = 771: no vector width divides it), with views at odd element offsets; every output poisoned with
// NaN before the call; determinism (the same call twice gives the same bits). Then the two-stage bias gradient at
// large N, and the whole GPT-2 step with every fusion on against every fusion off (model/gpt2.h, Fusions).
// Without a GPU every test skips with the reason (ctest shows them as skipped, not passed).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/matmul.cuh"
#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                         \
  do {                                                                                            \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

using test::randn;
using test::test_seed;

// --- host <-> backend helpers ---------------------------------------------------------------------------------

// A tensor of `dtype` and `shape` on `be` holding v (converted by the backend: one rounding to bf16), placed at
// element `offset` of a larger buffer whose other elements are NaN, so that a view at an odd offset is exercised
// and a write outside the view would show.
Tensor put_at(Backend& be, const std::vector<double>& v, Shape shape, DType dtype, int64_t offset = 0) {
  const int64_t n = static_cast<int64_t>(v.size());
  Tensor host = Tensor::host({n + offset}, DType::F64);
  for (int64_t i = 0; i < offset; ++i) host.data<double>()[i] = std::nan("");
  std::memcpy(host.data<double>() + offset, v.data(), v.size() * sizeof(double));
  Tensor buf = be.empty({n + offset}, dtype);
  be.copy_from_host(buf, host);
  return buf.view(offset, std::move(shape));
}
// A NaN-filled ("poisoned") tensor on `be`.
Tensor poisoned(Backend& be, Shape shape, DType dtype, int64_t offset = 0) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return put_at(be, std::vector<double>(static_cast<size_t>(n), std::nan("")), std::move(shape), dtype, offset);
}
std::vector<double> get(Backend& be, const Tensor& t) { return to_host_f64(be, t); }
std::vector<uint8_t> bytes(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), t.dtype());
  be.copy_to_host(h, t);
  const auto* p = static_cast<const uint8_t*>(h.raw());
  return {p, p + h.nbytes()};
}
bool all_finite(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}
double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}
// max_i |got_i - ref_i| / (rel * |ref_i| + abs): <= 1 passes. NaN gives NaN, which fails every `<=`.
// ||got - ref|| / ||ref|| (2-norms), as test_cuda_backend measures whole-model results; NaN fails every `<=`.
double rel_norm_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double d = 0, r = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    d += (got[i] - ref[i]) * (got[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return std::sqrt(d) / std::sqrt(r);
}
double budget_ratio(const std::vector<double>& got, const std::vector<double>& ref, double rel, double abs) {
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double r = std::fabs(got[i] - ref[i]) / (rel * std::fabs(ref[i]) + abs);
    if (!(r <= worst)) worst = r;  // NaN sticks
  }
  return worst;
}

struct Backends {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<Backend> gpu = make_cuda_backend(0);
  CudaContext& ctx() { return static_cast<CudaBackend&>(*gpu).context(); }
};

// --- residual + LayerNorm ---------------------------------------------------------------------------------------

struct RlnOut {
  Tensor res, ln, mean, rstd;
};

// Bitwise: fused = GPU residual_forward + layernorm_forward (same per-element arithmetic, same per-row split), run
// twice (determinism), and with res_out aliasing a. Against the CPU twin: res_out bitwise (one rounding of the same
// float sum), ln_out within fp32 statistics (fp32 here, double on the CPU: ~1e-6 relative of the row's scale) and,
// in bf16, one bf16 rounding (2^-8 relative) either side.
void check_residual_layernorm(Backends& b, DType dt, int64_t N, int64_t C, int64_t off, std::mt19937_64& g) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " N=" + std::to_string(N) + " C=" + std::to_string(C) +
               " offset=" + std::to_string(off));
  Backend& gpu = *b.gpu;
  Backend& cpu = *b.cpu;
  const DType G = grad_dtype(dt);
  auto av = randn<double>(g, N * C, 2.0), bv = randn<double>(g, N * C), wv = randn<double>(g, C),
       biasv = randn<double>(g, C);
  for (auto& x : av) x += 3.0;  // |mean| >> std, as in GPT-2's residual stream
  const Tensor a = put_at(gpu, av, {N, C}, dt, off), bb = put_at(gpu, bv, {N, C}, dt, 2 * off);
  const Tensor w = put_at(gpu, wv, {C}, dt, off), bias = put_at(gpu, biasv, {C}, dt, 3 * off);
  auto fresh = [&](int64_t o) {
    return RlnOut{poisoned(gpu, {N, C}, dt, o), poisoned(gpu, {N, C}, dt, o + 1), poisoned(gpu, {N}, G),
                  poisoned(gpu, {N}, G)};
  };
  RlnOut u = fresh(off), f1 = fresh(0), f2 = fresh(0);
  gpu.residual_forward(u.res, a, bb);
  gpu.layernorm_forward(u.ln, u.mean, u.rstd, u.res, w, bias, 1e-5);
  // The unfused kernel splits its rows by the addresses of (res, ln, w, bias); the fused one by the same four, so
  // use the same offsets for the bitwise comparison.
  RlnOut f0{poisoned(gpu, {N, C}, dt, off), poisoned(gpu, {N, C}, dt, off + 1), poisoned(gpu, {N}, G),
            poisoned(gpu, {N}, G)};
  gpu.residual_layernorm_forward(f0.res, f0.ln, f0.mean, f0.rstd, a, bb, w, bias, 1e-5);
  EXPECT_TRUE(all_finite(get(gpu, f0.ln)));
  EXPECT_EQ(bytes(gpu, f0.res), bytes(gpu, u.res));
  EXPECT_EQ(bytes(gpu, f0.ln), bytes(gpu, u.ln));
  EXPECT_EQ(bytes(gpu, f0.mean), bytes(gpu, u.mean));
  EXPECT_EQ(bytes(gpu, f0.rstd), bytes(gpu, u.rstd));
  // Other offsets: the same values up to the split's float order; twice: the same bits.
  gpu.residual_layernorm_forward(f1.res, f1.ln, f1.mean, f1.rstd, a, bb, w, bias, 1e-5);
  gpu.residual_layernorm_forward(f2.res, f2.ln, f2.mean, f2.rstd, a, bb, w, bias, 1e-5);
  EXPECT_EQ(bytes(gpu, f1.res), bytes(gpu, f2.res));
  EXPECT_EQ(bytes(gpu, f1.ln), bytes(gpu, f2.ln));
  EXPECT_EQ(bytes(gpu, f1.mean), bytes(gpu, f2.mean));
  EXPECT_EQ(bytes(gpu, f1.res), bytes(gpu, u.res));  // the add is elementwise: no order to differ in
  // res_out aliasing a.
  const Tensor a2 = put_at(gpu, av, {N, C}, dt, off);  // at f0.res's offset, so the split is f0's
  RlnOut fa{Tensor(), poisoned(gpu, {N, C}, dt, off + 1), poisoned(gpu, {N}, G), poisoned(gpu, {N}, G)};
  gpu.residual_layernorm_forward(a2, fa.ln, fa.mean, fa.rstd, a2, bb, w, bias, 1e-5);
  EXPECT_EQ(bytes(gpu, a2), bytes(gpu, u.res));
  EXPECT_EQ(bytes(gpu, fa.ln), bytes(gpu, f0.ln));

  // The CPU twin on the same (rounded) inputs.
  const Tensor ca = put_at(cpu, get(gpu, a), {N, C}, dt), cb = put_at(cpu, get(gpu, bb), {N, C}, dt);
  const Tensor cw = put_at(cpu, get(gpu, w), {C}, dt), cbias = put_at(cpu, get(gpu, bias), {C}, dt);
  RlnOut c{poisoned(cpu, {N, C}, dt), poisoned(cpu, {N, C}, dt), poisoned(cpu, {N}, G), poisoned(cpu, {N}, G)};
  cpu.residual_layernorm_forward(c.res, c.ln, c.mean, c.rstd, ca, cb, cw, cbias, 1e-5);
  EXPECT_EQ(get(gpu, f0.res), get(cpu, c.res));
  // ln_out = xn * w + b with |xn| ~ 1..4, |w|, |b| ~ 1: fp32 statistics over C terms (relative ~C * 2^-24 in the
  // worst case, ~1e-5 at C = 771) on O(10) values; in bf16 plus one rounding of ln_out each side (2^-8 relative).
  const bool bf = dt == DType::BF16;
  const auto ref_ln = get(cpu, c.ln);
  EXPECT_LE(budget_ratio(get(gpu, f0.ln), ref_ln, bf ? 0x1p-7 : 1e-5, bf ? 0x1p-7 : 1e-4), 1.0);
  EXPECT_LE(budget_ratio(get(gpu, f0.mean), get(cpu, c.mean), 1e-5, 1e-5), 1.0);
  EXPECT_LE(budget_ratio(get(gpu, f0.rstd), get(cpu, c.rstd), 1e-4, 1e-6), 1.0);
}

TEST(CudaFusion, ResidualLayerNormIsBitwiseTheGpuPairAndMatchesTheCpuTwin) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  for (DType dt : {DType::F32, DType::BF16}) {
    check_residual_layernorm(b, dt, 4 * 64, 768, 0, g);  // GPT-2 124M width, aligned views
    check_residual_layernorm(b, dt, 4 * 64, 768, 3, g);  // odd offsets: scalar heads, unaligned a / b
    check_residual_layernorm(b, dt, 37, 771, 1, g);      // odd C
  }
}

// --- "=" forms of the backward ops ------------------------------------------------------------------------------

// GradWrite::Overwrite into a NaN-poisoned buffer against fill_zero + Accumulate. GELU and LayerNorm: the same
// arithmetic without the add of 0, so equal values (== treats -0 and +0 alike). matmul: beta = 0 instead of 1, for
// which cuBLASLt may pick another algorithm (another fp32 summation order): fp32 within 1e-6 of the norm (a sum of
// 768 products, ~sqrt(768) * 2^-24 relative), bf16 within one bf16 rounding (2^-8).
TEST(CudaFusion, OverwriteFormsMatchAccumulateIntoZero) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  Backend& gpu = *b.gpu;
  const int64_t N = 2 * 64 + 3, C = 768, OC = 3 * 768;
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const DType G = grad_dtype(dt);
    const bool bf = dt == DType::BF16;
    const Tensor inp = put_at(gpu, randn<double>(g, N * C), {N, C}, dt);
    const Tensor w = put_at(gpu, randn<double>(g, C * OC, 0.05), {C, OC}, dt, 1);
    const Tensor dout = put_at(gpu, randn<double>(g, N * OC), {N, OC}, dt);
    Tensor acc = gpu.zeros({N, C}, dt), ow = poisoned(gpu, {N, C}, dt);
    Tensor dw1 = gpu.zeros({C, OC}, G), dw2 = gpu.zeros({C, OC}, G);
    gpu.matmul_backward(acc, dw1, Tensor(), dout, inp, w, WeightLayout::InOut);
    gpu.matmul_backward(ow, dw2, Tensor(), dout, inp, w, WeightLayout::InOut, GradWrite::Overwrite);
    const auto ref = get(gpu, acc), got = get(gpu, ow);
    ASSERT_TRUE(all_finite(got));
    EXPECT_LE(budget_ratio(got, ref, bf ? 0x1p-8 : 1e-6, (bf ? 0x1p-8 : 1e-6) * max_abs(ref)), 1.0);
    EXPECT_EQ(bytes(gpu, dw1), bytes(gpu, dw2));  // dw accumulates in both calls, through the same GEMM

    const Tensor x = put_at(gpu, randn<double>(g, N * C, 2.0), {N, C}, dt, 3);
    const Tensor d = put_at(gpu, randn<double>(g, N * C), {N, C}, dt, 5);
    Tensor gacc = gpu.zeros({N, C}, dt), gow = poisoned(gpu, {N, C}, dt, 1);
    gpu.gelu_backward(gacc, d, x);
    gpu.gelu_backward(gow, d, x, GradWrite::Overwrite);
    EXPECT_EQ(get(gpu, gow), get(gpu, gacc));

    const Tensor lw = put_at(gpu, randn<double>(g, C), {C}, dt), lb = put_at(gpu, randn<double>(g, C), {C}, dt);
    Tensor out = gpu.empty({N, C}, dt), mean = gpu.empty({N}, G), rstd = gpu.empty({N}, G);
    gpu.layernorm_forward(out, mean, rstd, x, lw, lb, 1e-5);
    Tensor lacc = gpu.zeros({N, C}, dt), low = poisoned(gpu, {N, C}, dt);
    Tensor ldw = gpu.zeros({C}, G), ldb = gpu.zeros({C}, G), ldw2 = gpu.zeros({C}, G), ldb2 = gpu.zeros({C}, G);
    gpu.layernorm_backward(lacc, ldw, ldb, d, x, lw, mean, rstd);
    gpu.layernorm_backward(low, ldw2, ldb2, d, x, lw, mean, rstd, GradWrite::Overwrite);
    EXPECT_EQ(get(gpu, low), get(gpu, lacc));
    EXPECT_EQ(bytes(gpu, ldw), bytes(gpu, ldw2));
    EXPECT_EQ(bytes(gpu, ldb), bytes(gpu, ldb2));
  }
}

// --- GELU epilogues -----------------------------------------------------------------------------------------------

struct GeluRun {
  std::vector<double> pre, out, dpre, dw, dbias;
};

// c_fc (inp [N,C] @ W1 [C,H] + b1) with its GELU, then the backward of c_proj (W2 [H,C]) through the GELU, fused or
// unfused, on `be`, from the same host values; outputs poisoned first; dw, dbias pre-filled with `acc0` (+=).
GeluRun run_gelu(Backend& be, DType dt, bool fused, const std::vector<double>& inp, const std::vector<double>& w1,
                 const std::vector<double>& b1, const std::vector<double>& w2, const std::vector<double>& dout,
                 const std::vector<double>& acc0, int64_t N, int64_t C, int64_t H) {
  const DType G = grad_dtype(dt);
  const Tensor x = put_at(be, inp, {N, C}, dt), W1 = put_at(be, w1, {C, H}, dt), B1 = put_at(be, b1, {H}, dt);
  const Tensor W2 = put_at(be, w2, {H, C}, dt), D = put_at(be, dout, {N, C}, dt);
  Tensor pre = poisoned(be, {N, H}, dt), out = poisoned(be, {N, H}, dt), dpre = poisoned(be, {N, H}, dt);
  Tensor dw = put_at(be, std::vector<double>(acc0.begin(), acc0.begin() + H * C), {H, C}, G);
  Tensor db = put_at(be, std::vector<double>(acc0.begin(), acc0.begin() + C), {C}, G);
  if (fused) {
    be.matmul_gelu_forward(out, pre, x, W1, B1, WeightLayout::InOut);
    be.matmul_backward_dgelu(dpre, dw, db, D, out, W2, pre, WeightLayout::InOut);
  } else {
    be.matmul_forward(pre, x, W1, B1, WeightLayout::InOut);
    be.gelu_forward(out, pre);
    Tensor prod = be.zeros({N, H}, dt);
    be.matmul_backward(prod, dw, db, D, out, W2, WeightLayout::InOut);
    be.fill_zero(dpre);
    be.gelu_backward(dpre, prod, pre);
  }
  return {get(be, pre), get(be, out), get(be, dpre), get(be, dw), get(be, db)};
}

// Budgets (runtime/backend.h, kernels/matmul.cuh): pre is one rounding of an fp32 GEMM result whose summation order
// differs between the paths (cuBLASLt algorithms, CPU BLAS): within 2 bf16 roundings (2^-7 relative) plus 2^-7 of
// the largest |pre| for cancellation. out = gelu(pre): the same plus the GELU of the fp32 vs the bf16 pre (|gelu'|
// <= 1.13, half an ulp) and the two tanh evaluations (fp32 round-off): 2^-6 relative plus 2^-7 of the largest.
// dpre: the product kept in fp32 vs rounded (half an ulp times 1.13) plus gelu' of a pre that may differ by an ulp
// (|gelu''| <= 0.8, times |prod|): 2^-5 relative plus 2^-6 of the largest. dw, dbias: sums over N rows of products
// of bf16 values that may differ by an ulp: 2^-6 of the largest. A fusion that drops the bias, the GELU or gelu'
// is off by O(100%) of the largest value.
void expect_gelu_close(const GeluRun& got, const GeluRun& ref, const char* what) {
  SCOPED_TRACE(what);
  ASSERT_TRUE(all_finite(got.out) && all_finite(got.dpre) && all_finite(got.pre));
  EXPECT_LE(budget_ratio(got.pre, ref.pre, 0x1p-7, 0x1p-7 * max_abs(ref.pre)), 1.0) << "pre";
  EXPECT_LE(budget_ratio(got.out, ref.out, 0x1p-6, 0x1p-7 * max_abs(ref.out)), 1.0) << "out";
  EXPECT_LE(budget_ratio(got.dpre, ref.dpre, 0x1p-5, 0x1p-6 * max_abs(ref.dpre)), 1.0) << "dpre";
  EXPECT_LE(budget_ratio(got.dw, ref.dw, 0x1p-6, 0x1p-6 * max_abs(ref.dw)), 1.0) << "dw";
  EXPECT_LE(budget_ratio(got.dbias, ref.dbias, 0x1p-6, 0x1p-6 * max_abs(ref.dbias)), 1.0) << "dbias";
}

void check_gelu_fusions(Backends& b, int64_t N, int64_t C, std::mt19937_64& g) {
  SCOPED_TRACE("N=" + std::to_string(N) + " C=" + std::to_string(C));
  const int64_t H = 4 * C;
  const auto inp = randn<double>(g, N * C), w1 = randn<double>(g, C * H, 0.04), b1 = randn<double>(g, H, 0.5),
             w2 = randn<double>(g, H * C, 0.03), dout = randn<double>(g, N * C), acc0 = randn<double>(g, H * C);
  // fp32 (the parity mode): never fused, so bitwise the unfused GPU path except the product's beta = 0 GEMM.
  {
    const auto u = run_gelu(*b.gpu, DType::F32, false, inp, w1, b1, w2, dout, acc0, N, C, H);
    const auto f = run_gelu(*b.gpu, DType::F32, true, inp, w1, b1, w2, dout, acc0, N, C, H);
    EXPECT_EQ(f.pre, u.pre);
    EXPECT_EQ(f.out, u.out);
    EXPECT_EQ(f.dw, u.dw);
    EXPECT_EQ(f.dbias, u.dbias);
    EXPECT_LE(budget_ratio(f.dpre, u.dpre, 1e-6, 1e-6 * max_abs(u.dpre)), 1.0) << "fp32 dpre";
  }
  const auto u = run_gelu(*b.gpu, DType::BF16, false, inp, w1, b1, w2, dout, acc0, N, C, H);
  const auto f = run_gelu(*b.gpu, DType::BF16, true, inp, w1, b1, w2, dout, acc0, N, C, H);
  const auto f2 = run_gelu(*b.gpu, DType::BF16, true, inp, w1, b1, w2, dout, acc0, N, C, H);
  const auto c = run_gelu(*b.cpu, DType::BF16, true, inp, w1, b1, w2, dout, acc0, N, C, H);
  expect_gelu_close(f, u, "fused vs unfused, GPU");
  expect_gelu_close(f, c, "fused GPU vs the CPU twin's fused order");
  EXPECT_TRUE(f.pre == f2.pre && f.out == f2.out && f.dpre == f2.dpre && f.dw == f2.dw && f.dbias == f2.dbias)
      << "not deterministic";
}

TEST(CudaFusion, GeluEpiloguesMatchTheUnfusedOpsAndTheCpuTwin) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  check_gelu_fusions(b, 2 * 128 + 5, 768, g);  // GPT-2 124M width: the epilogues apply
  check_gelu_fusions(b, 37, 771, g);           // 4C = 3084 is not a multiple of 8: the unfused fallback
}

// Whether cuBLASLt takes the epilogues at GPT-2 124M's shapes at all (if it does not, the fused ops silently run
// the unfused ones, which is correct but saves nothing): a failure here is a performance finding, not a wrong
// result.
TEST(CudaFusion, GeluEpiloguesAreTakenAtGpt2Shapes) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  Backend& gpu = *b.gpu;
  const int64_t N = 512, C = 768, H = 4 * C;
  const DType dt = DType::BF16;
  const Tensor x = put_at(gpu, randn<double>(g, N * C), {N, C}, dt);
  const Tensor w1 = put_at(gpu, randn<double>(g, C * H, 0.04), {C, H}, dt);
  const Tensor b1 = put_at(gpu, randn<double>(g, H, 0.5), {H}, dt);
  const Tensor w2 = put_at(gpu, randn<double>(g, H * C, 0.03), {H, C}, dt);
  const Tensor dout = put_at(gpu, randn<double>(g, N * C), {N, C}, dt);
  Tensor pre = gpu.empty({N, H}, dt), out = gpu.empty({N, H}, dt), dpre = gpu.empty({N, H}, dt);
  Tensor dw = gpu.zeros({H, C}, DType::F32), db = gpu.zeros({C}, DType::F32);
  using B16 = __nv_bfloat16;
  auto p = [](const Tensor& t) { return static_cast<B16*>(t.raw()); };
  EXPECT_TRUE(cuda::matmul_gelu_forward(b.ctx(), p(out), p(pre), p(x), p(w1), p(b1), N, C, H, WeightLayout::InOut))
      << "GELU_AUX_BIAS refused";
  EXPECT_TRUE(cuda::matmul_backward_dgelu(b.ctx(), p(dpre), static_cast<float*>(dw.raw()),
                                          static_cast<float*>(db.raw()), p(dout), p(out), p(w2), p(pre), N, H, C,
                                          WeightLayout::InOut))
      << "DGELU refused";
  EXPECT_TRUE(all_finite(get(gpu, dpre)));
}

// --- LayerNorm backward ---------------------------------------------------------------------------------------------

// The one-pass backward (kernels/layernorm.cuh) at GPT-2 124M's width (48 KiB of accumulators), at C = 1600 (GPT-2
// XL: above the default 48 KiB, so the opt-in shared memory path) and at C = 4001 (past an H100's shared memory: the
// two-pass form), fp32, against the CPU twin: dinp within test_cuda_kernels_a's kLayerNormTol (1e-5 of
// max(1, max |ref|), justified there); dw, db within 2e-5 of max(1, max |ref|) as there (fp32 sums: 4 rows per
// warp, 8 warps, then 129 chunk partials of magnitude <~ 100 added in order: <~ 140 roundings of <= 6e-6 each,
// about 1e-4 absolute at worst against a scale of ~200 for sums of 4103 O(1) terms). += onto random values, and
// twice bitwise equal.
TEST(CudaFusion, LayerNormBackwardOnePassMatchesTheCpuTwinAndIsDeterministic) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  for (int64_t C : {768, 1600, 4001}) {
    SCOPED_TRACE("C=" + std::to_string(C));
    const int64_t N = 4096 + 7;
    const DType dt = DType::F32;
    auto xv = randn<double>(g, N * C, 1.5), wv = randn<double>(g, C), bv = randn<double>(g, C);
    const auto dv = randn<double>(g, N * C), di0 = randn<double>(g, N * C), dw0 = randn<double>(g, C);
    for (auto& x : xv) x += 0.3;
    auto run = [&](Backend& be) {
      const Tensor x = put_at(be, xv, {N, C}, dt), w = put_at(be, wv, {C}, dt), bias = put_at(be, bv, {C}, dt);
      const Tensor d = put_at(be, dv, {N, C}, dt);
      Tensor out = be.empty({N, C}, dt), mean = be.empty({N}, dt), rstd = be.empty({N}, dt);
      be.layernorm_forward(out, mean, rstd, x, w, bias, 1e-5);
      Tensor di = put_at(be, di0, {N, C}, dt), dw = put_at(be, dw0, {C}, dt), db = put_at(be, dw0, {C}, dt);
      be.layernorm_backward(di, dw, db, d, x, w, mean, rstd);
      return std::vector<std::vector<double>>{get(be, di), get(be, dw), get(be, db)};
    };
    const auto ref = run(*b.cpu), got = run(*b.gpu), again = run(*b.gpu);
    EXPECT_LE(test::max_rel_err(got[0], ref[0]), 1e-5) << "dinp";
    EXPECT_LE(test::max_rel_err(got[1], ref[1]), 2e-5) << "dw";
    EXPECT_LE(test::max_rel_err(got[2], ref[2]), 2e-5) << "db";
    EXPECT_TRUE(got == again) << "not deterministic";
  }
}

// --- the bias gradient --------------------------------------------------------------------------------------------

// The two-stage reduction (kernels/matmul.cu, bias_grad) at GPT-2 batch sizes (N = 8 x 1024 rows) and at an odd
// N and OC with a padded row stride: += into random values, against a double sum on the host (fp32 partial sums of
// <= 128 then <= 64 terms: ~(128 + 64) * 2^-24 relative of the sum of |dout|), twice bitwise equal.
TEST(CudaFusion, BiasGradientTwoStageIsDeterministicAndMatchesDoubleSums) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  Backend& gpu = *b.gpu;
  struct Case {
    int64_t N, C, OC, ld;
  };
  for (const Case cs : {Case{8 * 1024, 64, 768, 768}, Case{5003, 16, 771, 776}}) {
    for (DType dt : {DType::F32, DType::BF16}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " N=" + std::to_string(cs.N) + " OC=" + std::to_string(cs.OC));
      const auto dv = randn<double>(g, cs.N * cs.ld), inv = randn<double>(g, cs.N * cs.C);
      const auto wv = randn<double>(g, cs.C * cs.OC), acc0 = randn<double>(g, cs.OC);
      const Tensor dout = put_at(gpu, dv, {cs.N, cs.ld}, dt), inp = put_at(gpu, inv, {cs.N, cs.C}, dt);
      const Tensor w = put_at(gpu, wv, {cs.C, cs.OC}, dt);
      const auto dout_r = get(gpu, dout);  // the rounded values the kernel reads
      std::vector<double> ref(acc0), mag(cs.OC, 0.0);
      for (int64_t n = 0; n < cs.N; ++n)
        for (int64_t j = 0; j < cs.OC; ++j) {
          ref[j] += dout_r[n * cs.ld + j];
          mag[j] += std::fabs(dout_r[n * cs.ld + j]);
        }
      Tensor db1 = put_at(gpu, acc0, {cs.OC}, DType::F32), db2 = put_at(gpu, acc0, {cs.OC}, DType::F32);
      gpu.matmul_backward(Tensor(), Tensor(), db1, dout, inp, w, WeightLayout::InOut);
      gpu.matmul_backward(Tensor(), Tensor(), db2, dout, inp, w, WeightLayout::InOut);
      EXPECT_EQ(bytes(gpu, db1), bytes(gpu, db2));
      const auto got = get(gpu, db1);
      for (int64_t j = 0; j < cs.OC; ++j)
        ASSERT_LE(std::fabs(got[j] - ref[j]), 256 * 0x1p-24 * (mag[j] + std::fabs(acc0[j]))) << "column " << j;
    }
  }
}

// --- the whole model ----------------------------------------------------------------------------------------------

GPT2Config fusion_config() {
  GPT2Config c;
  c.vocab_size = 97;
  c.max_seq_len = 24;
  c.n_embd = 64;  // 4C = 256: the GELU epilogues apply
  c.n_head = 4;
  c.n_layer = 2;
  return c;
}

struct ModelStep {
  std::vector<double> seq, grads;
};

// sequence_logprobs + backward with `fusions`, on `be`, with the parameters `p` (host F64).
ModelStep model_step(Backend& be, DType dt, const Fusions& fusions, const Tensor& p, std::mt19937_64 g) {
  const GPT2Config cfg = fusion_config();
  GPT2 m(be, cfg, dt);
  m.set_fusions(fusions);
  be.copy_from_host(m.master_params(), p);
  m.sync_params();
  const int64_t B = 3, T = 17;
  Tensor tok = Tensor::host({B, T}, DType::I32), tgt = Tensor::host({B, T}, DType::I32);
  Tensor wts = Tensor::host({B, T}, DType::F64), dseq = Tensor::host({B}, DType::F64);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(cfg.vocab_size - 1));
  for (int64_t i = 0; i < B * T; ++i) {
    tok.data<int32_t>()[i] = d(g);
    tgt.data<int32_t>()[i] = d(g);
    wts.data<double>()[i] = (i % T) >= 4 ? 1.0 : 0.0;
  }
  for (int64_t i = 0; i < B; ++i) dseq.data<double>()[i] = 1.0 - 0.7 * static_cast<double>(i);
  const DType G = grad_dtype(dt);
  auto put = [&](const Tensor& h, DType t) {
    Tensor x = be.empty(h.shape(), t);
    be.copy_from_host(x, h);
    return x;
  };
  const Tensor dtok = put(tok, DType::I32), dtgt = put(tgt, DType::I32), dw = put(wts, G), dd = put(dseq, G);
  Tensor seq = be.empty({B}, G);
  m.zero_grad();
  m.sequence_logprobs(dtok, Tensor(), dtgt, dw, seq);
  m.backward(dd);
  return {to_host_f64(be, seq), to_host_f64(be, m.grads())};
}

// Every fusion on against every fusion off on the GPU, and the fused GPU step against the fused CPU step, norm-wise
// as test_cuda_backend compares whole models. fp32: the residual/LayerNorm fusion is bitwise and the "=" writes
// change only GEMM algorithm choices (beta = 0), so the two GPU runs agree to fp32 round-off (1e-5), and the GPU
// the CPU within test_cuda_backend's whole-model budget (kModelTol = 1e-4, justified there). bf16: the GELU fusion
// moves a few bf16 roundings per layer (2^-9 relative each), within test_cuda_backend's bf16 budget (3e-2 for the
// gradient, 2e-3 for the log-probs); a fusion that drops the bias, the GELU or gelu' is off by O(1).
TEST(CudaFusion, Gpt2StepWithFusionsAgreesWithoutThemAndWithTheCpu) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test_seed());
  Backends b;
  GPT2 shape_only(*b.cpu, fusion_config(), DType::F32);
  Tensor p = Tensor::host({shape_only.params().numel()}, DType::F64);
  const auto r = randn<double>(g, static_cast<size_t>(p.numel()), 0.2);
  std::memcpy(p.raw(), r.data(), r.size() * sizeof(double));
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const ModelStep off = model_step(*b.gpu, dt, Fusions::none(), p, g);
    const ModelStep on = model_step(*b.gpu, dt, Fusions::all(), p, g);
    const ModelStep on2 = model_step(*b.gpu, dt, Fusions::all(), p, g);
    const ModelStep cpu = model_step(*b.cpu, dt, Fusions::all(), p, g);
    ASSERT_TRUE(all_finite(on.grads));
    EXPECT_EQ(on.grads, on2.grads) << "not deterministic";
    EXPECT_EQ(on.seq, on2.seq) << "not deterministic";
    EXPECT_GT(max_abs(off.grads), 1e-3);
    const bool bf = dt == DType::BF16;
    EXPECT_LE(rel_norm_err(on.grads, off.grads), bf ? 3e-2 : 1e-5) << "fused vs unfused gradient";
    EXPECT_LE(rel_norm_err(on.seq, off.seq), bf ? 2e-3 : 1e-6) << "fused vs unfused log-probs";
    EXPECT_LE(rel_norm_err(on.grads, cpu.grads), bf ? 3e-2 : 1e-4) << "GPU vs CPU gradient";
    EXPECT_LE(rel_norm_err(on.seq, cpu.seq), bf ? 2e-3 : 1e-4) << "GPU vs CPU log-probs";
  }
}

}  // namespace
}  // namespace dpo
