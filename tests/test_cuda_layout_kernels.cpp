// The batch-layout forms of the encoder and the log-prob ops on CudaBackend (kernels/encoder.cuh encoder_*_pos,
// kernels/logprob.cuh logprob_*_segments) against the CPU backend (the twins) and against the padded CUDA ops, in
// F32 and BF16. Seeded random inputs (BF16 tensors hold bf16-exact values, so both backends read the same numbers),
// every "=" output poisoned (all bytes 0xFF: NaN) before the call, "+=" outputs started from random values, sizes
// that are not multiples of a warp, a tile or a vector (V = 50257 puts BF16 rows at every 2-byte phase).
// Without a GPU every test skips with the reason.
//
// Budgets. eps = FLT_EPSILON. Where the kernels promise the twin's arithmetic and order the check is bitwise:
//   - encoder forward (one fp32 add per element, one rounding in BF16) and the padded-equivalence checks (the same
//     kernels with pos = t / seg = the rows);
//   - encoder dwte, and dwpe while every position has at most max(64, B) slots (one chain in slot order).
// Elsewhere, the fp32 budgets of tests/test_cuda_kernels_b.cpp (the GPU's fp32 log-sum-exp against the twin's
// double one): token log-prob (V/256 + 48) eps + 4 eps (1 + |x_t| + |lp|); a sequence sums |w| times those plus
// 4 eps of its magnitude; a dlogits element |g| ((V/256 + 48) eps + 4 eps); a BF16 dlogits element one bf16 ulp more.
// dwpe with longer position runs (packed rows repeat the low positions): segment sums then their sum, within
// (K + L/K + 2) eps of sum |dout| for a run of L slots against the twin's single chain (kernels/encoder.cuh).
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
#include <vector>

#include "kernels/encoder.cuh"
#include "kernels/seq_stats.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

using test::test_seed;

constexpr double kEps = FLT_EPSILON;

double lse_budget(int64_t V) { return (static_cast<double>(V) / 256.0 + 48.0) * kEps; }

// The spacing of bf16 numbers at |x| (subnormals: that of the smallest normal binade).
double ulp_bf16(double x) {
  x = std::fabs(x);
  if (x == 0.0 || std::isinf(x)) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, std::max(std::ilogb(x), -126) - 7);
}

class CudaLayout : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
    gen_.seed(test_seed());
  }

  // Host tensor of dtype dt (F32 or BF16, BF16 rounded once) holding v, and its device copy.
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
  Tensor dev(const Tensor& h) {
    Tensor t = gpu_->empty(h.shape(), h.dtype());
    gpu_->copy_from_host(t, h);
    return t;
  }
  Tensor dev_poisoned(Shape shape, DType dt) {
    Tensor t = gpu_->empty(std::move(shape), dt);
    DPO_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()),
                                   static_cast<cudaStream_t>(gpu_->native_stream())));
    return t;
  }
  Tensor host_poisoned(Shape shape, DType dt) {
    Tensor t = Tensor::host(std::move(shape), dt);
    std::memset(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()));
    return t;
  }
  // The bytes of a device or host tensor.
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
  std::vector<int32_t> ids(size_t n, int32_t lo, int32_t hi) {
    std::uniform_int_distribution<int32_t> d(lo, hi - 1);
    std::vector<int32_t> v(n);
    for (auto& x : v) x = d(gen_);
    return v;
  }
  std::vector<double> randn(size_t n, double scale = 1.0) { return test::randn<double>(gen_, n, scale); }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::mt19937_64 gen_;
};

// Every |got - want| <= tol; NaN fails. Reports the count and the worst element.
void expect_within(const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& tol,
                   const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
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

// ============================================================================================== encoder

// pos[b,t] = t: bitwise the padded CUDA ops, forward and backward, with B below and above the segment length 64
// (B = 70: every position has 70 slots, one chain of K_pos = B).
TEST_F(CudaLayout, EncoderPaddedPositionsAreBitwiseThePaddedOps) {
  for (DType A : {DType::F32, DType::BF16}) {
    for (int64_t B : {int64_t{3}, int64_t{70}}) {
      const int64_t T = 37, C = 131, V = 97, P = 45;
      SCOPED_TRACE(std::string(dtype_name(A)) + " B=" + std::to_string(B));
      std::vector<int32_t> p(B * T);
      for (int64_t i = 0; i < B * T; ++i) p[i] = static_cast<int32_t>(i % T);
      const Tensor tokens = dev(host_i32(ids(B * T, 0, V), {B, T})), pos = dev(host_i32(p, {B, T}));
      const Tensor wte = dev(host(randn(V * C), {V, C}, A)), wpe = dev(host(randn(P * C), {P, C}, A));
      Tensor a = dev_poisoned({B, T, C}, A), b = dev_poisoned({B, T, C}, A);
      gpu_->encoder_forward(a, tokens, wte, wpe);
      gpu_->encoder_forward_pos(b, tokens, pos, wte, wpe);
      EXPECT_EQ(bytes(b), bytes(a)) << "forward";
      const Tensor dout = dev(host(randn(B * T * C), {B, T, C}, A));
      const Tensor wte0 = host(randn(V * C), {V, C}, DType::F32), wpe0 = host(randn(P * C), {P, C}, DType::F32);
      Tensor dwte_a = dev(wte0), dwpe_a = dev(wpe0), dwte_b = dev(wte0), dwpe_b = dev(wpe0);
      gpu_->encoder_backward(dwte_a, dwpe_a, dout, tokens);
      gpu_->encoder_backward_pos(dwte_b, dwpe_b, dout, tokens, pos);
      EXPECT_EQ(bytes(dwte_b), bytes(dwte_a)) << "dwte";
      EXPECT_EQ(bytes(dwpe_b), bytes(dwpe_a)) << "dwpe";
    }
  }
}

// Packed positions (sequences of random lengths per row, positions from 0, padding at position 0) against the CPU
// backend: the forward bitwise; the backward, "+=" twice, bitwise while every position has at most max(64, B)
// slots, within the regrouping budget with long runs; two runs bitwise equal.
void encoder_packed_case(CudaLayout& f, DType A, int64_t B, int64_t T, int64_t C, int64_t V, int64_t min_len,
                         int64_t max_len, bool expect_bitwise) {
  SCOPED_TRACE(std::string(dtype_name(A)) + " B=" + std::to_string(B) + " T=" + std::to_string(T) +
               " max_len=" + std::to_string(max_len));
  const int64_t P = max_len + 3;
  std::uniform_int_distribution<int64_t> len(min_len, max_len);
  std::vector<int32_t> p(B * T, 0);
  for (int64_t r = 0; r < B; ++r) {
    int64_t t = 0;
    while (t < T - 2) {  // the last two slots of every row stay padding (position 0)
      const int64_t n = std::min(len(f.gen_), T - 2 - t);
      for (int64_t k = 0; k < n; ++k) p[r * T + t + k] = static_cast<int32_t>(k);
      t += n;
    }
  }
  std::vector<int64_t> run(P, 0);
  for (int32_t x : p) ++run[x];
  const int64_t longest = *std::max_element(run.begin(), run.end());
  ASSERT_EQ(longest <= cuda::encoder_position_segment_rows(B), expect_bitwise) << "the case's runs: " << longest;

  const Tensor h_tok = f.host_i32(f.ids(B * T, 0, V), {B, T}), h_pos = f.host_i32(p, {B, T});
  const Tensor h_wte = f.host(f.randn(V * C), {V, C}, A), h_wpe = f.host(f.randn(P * C), {P, C}, A);
  const Tensor tokens = f.dev(h_tok), pos = f.dev(h_pos);
  Tensor ref = f.host_poisoned({B, T, C}, A), out = f.dev_poisoned({B, T, C}, A);
  f.cpu_->encoder_forward_pos(ref, h_tok, h_pos, h_wte, h_wpe);
  f.gpu_->encoder_forward_pos(out, tokens, pos, f.dev(h_wte), f.dev(h_wpe));
  EXPECT_EQ(f.bytes(out), f.bytes(ref)) << "forward";

  const auto dout_v = f.randn(B * T * C);
  const Tensor h_dout = f.host(dout_v, {B, T, C}, A), dout = f.dev(h_dout);
  const Tensor wte0 = f.host(f.randn(V * C), {V, C}, DType::F32), wpe0 = f.host(f.randn(P * C), {P, C}, DType::F32);
  Tensor rw = Tensor::host({V, C}, DType::F32), rp = Tensor::host({P, C}, DType::F32);
  std::memcpy(rw.raw(), wte0.raw(), static_cast<size_t>(wte0.nbytes()));
  std::memcpy(rp.raw(), wpe0.raw(), static_cast<size_t>(wpe0.nbytes()));
  for (int rep = 0; rep < 2; ++rep) f.cpu_->encoder_backward_pos(rw, rp, h_dout, h_tok, h_pos);
  std::vector<uint8_t> first_wpe;
  for (int trial = 0; trial < 2; ++trial) {
    Tensor dwte = f.dev(wte0), dwpe = f.dev(wpe0);
    for (int rep = 0; rep < 2; ++rep) f.gpu_->encoder_backward_pos(dwte, dwpe, dout, tokens, pos);
    EXPECT_EQ(f.bytes(dwte), f.bytes(rw)) << "dwte (the padded op's sums)";
    if (expect_bitwise) {
      EXPECT_EQ(f.bytes(dwpe), f.bytes(rp)) << "dwpe";
    } else {
      // Per element of position q: (K + L/K + 2) eps * (|start| + 2 sum over its L slots of |dout|), twice.
      const int64_t K = cuda::encoder_position_segment_rows(B);
      const auto d = f.values(h_dout), w0 = f.values(wpe0);
      std::vector<double> tol(P * C, 0.0);
      for (int64_t q = 0; q < P; ++q) {
        const double k = static_cast<double>(K) + static_cast<double>(run[q]) / K + 2.0;
        for (int64_t c = 0; c < C; ++c) {
          double mag = std::fabs(w0[q * C + c]);
          for (int64_t i = 0; i < B * T; ++i)
            if (p[i] == q) mag += 2.0 * std::fabs(d[i * C + c]);
          tol[q * C + c] = 2.0 * k * kEps * mag;
        }
      }
      expect_within(f.values(dwpe), f.values(rp), tol, "dwpe");
    }
    if (trial == 0) first_wpe = f.bytes(dwpe);
    else EXPECT_EQ(f.bytes(dwpe), first_wpe) << "two identical runs differ";
  }
}

TEST_F(CudaLayout, EncoderPackedPositionsMatchTheCpu) {
  for (DType A : {DType::F32, DType::BF16}) {
    // Sequences of 4..17 slots: at most 3 * 13 + 6 = 45 slots at position 0, one chain each (bitwise).
    encoder_packed_case(*this, A, 3, 53, 131, 61, 4, 17, true);
    // Sequences of 1..5 slots in 6 rows of 299: position 0 has at least 6 * 60 slots, regrouped (budget).
    encoder_packed_case(*this, A, 6, 301, 77, 1031, 1, 5, false);
  }
}

// Positions outside [0, P) are not checked on the GPU: their out rows are NaN, every other row is exact, and their
// dout rows add nothing to dwpe (dwte still gets them); no access outside the tables (compute-sanitizer in the GPU
// check).
TEST_F(CudaLayout, EncoderPositionOutsideTheTableGivesNaNRowsAndNoGradient) {
  const int64_t B = 2, T = 19, C = 40, V = 11, P = 19;
  std::vector<int32_t> p(B * T);
  for (int64_t i = 0; i < B * T; ++i) p[i] = static_cast<int32_t>(i % T);
  const std::vector<int64_t> bad_slots = {3, T + 5, 2 * T - 1};
  const int32_t bad_vals[] = {-1, static_cast<int32_t>(P), std::numeric_limits<int32_t>::max()};
  std::vector<int32_t> p_ok = p;
  for (size_t k = 0; k < bad_slots.size(); ++k) p[bad_slots[k]] = bad_vals[k];
  const Tensor h_tok = host_i32(ids(B * T, 0, V), {B, T});
  const Tensor h_wte = host(randn(V * C), {V, C}, DType::F32), h_wpe = host(randn(P * C), {P, C}, DType::F32);
  Tensor ref = host_poisoned({B, T, C}, DType::F32), out = dev_poisoned({B, T, C}, DType::F32);
  cpu_->encoder_forward_pos(ref, h_tok, host_i32(p_ok, {B, T}), h_wte, h_wpe);
  gpu_->encoder_forward_pos(out, dev(h_tok), dev(host_i32(p, {B, T})), dev(h_wte), dev(h_wpe));
  const auto got = values(out), want = values(ref);
  for (int64_t i = 0; i < B * T; ++i) {
    const bool bad = std::find(bad_slots.begin(), bad_slots.end(), i) != bad_slots.end();
    for (int64_t c = 0; c < C; ++c) {
      if (bad) ASSERT_TRUE(std::isnan(got[i * C + c])) << "slot " << i;
      else ASSERT_EQ(got[i * C + c], want[i * C + c]) << "slot " << i;
    }
  }
  // Reference: dwte from every slot; dwpe from the valid slots only (the bad slots' dout rows zeroed, their
  // positions set to a valid one; adding 0 leaves a finite value's bits unchanged).
  auto d = randn(B * T * C);
  const Tensor h_dout = host(d, {B, T, C}, DType::F32);
  for (int64_t i : bad_slots) std::fill(d.begin() + i * C, d.begin() + (i + 1) * C, 0.0);
  Tensor rw = host(std::vector<double>(V * C, 0.0), {V, C}, DType::F32), rp = host(randn(P * C), {P, C}, DType::F32);
  Tensor dwte = dev(rw), dwpe = dev(rp);
  Tensor scratch_w = host(std::vector<double>(V * C, 0.0), {V, C}, DType::F32);
  cpu_->encoder_backward_pos(rw, host(std::vector<double>(P * C, 0.0), {P, C}, DType::F32), h_dout, h_tok,
                             host_i32(p_ok, {B, T}));
  cpu_->encoder_backward_pos(scratch_w, rp, host(d, {B, T, C}, DType::F32), h_tok, host_i32(p_ok, {B, T}));
  gpu_->encoder_backward_pos(dwte, dwpe, dev(h_dout), dev(h_tok), dev(host_i32(p, {B, T})));
  EXPECT_EQ(bytes(dwte), bytes(rw)) << "dwte";
  EXPECT_EQ(bytes(dwpe), bytes(rp)) << "dwpe";
}

// ============================================================================================== log-probs

struct LogprobData {
  int64_t B, T, V;
  std::vector<double> logits, weights;
  std::vector<int32_t> targets;
};

// x cut to a bf16-representable value (the float's upper 16 bits), so that F32 and BF16 runs read the same numbers.
double bf16_exact(double x) {
  const float f = static_cast<float>(x);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b &= 0xFFFF0000u;
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}

// bf16-exact logits at different row levels (one 60 above the rest), weight-0 slots with garbage targets,
// non-unit weights.
LogprobData make_data(CudaLayout& f, int64_t B, int64_t T, int64_t V) {
  LogprobData d{B, T, V, f.randn(B * T * V, 2.0), std::vector<double>(B * T, 1.0), {}};
  std::uniform_int_distribution<int> shift(-5, 5), coin(0, 6);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(V - 1));
  for (int64_t r = 0; r < B * T; ++r) {
    const double s = r == 3 ? 60.0 : shift(f.gen_);
    for (int64_t v = 0; v < V; ++v) {
      d.logits[r * V + v] = bf16_exact(d.logits[r * V + v] + s);
    }
  }
  d.targets.resize(B * T);
  for (int64_t r = 0; r < B * T; ++r) {
    const int c = coin(f.gen_);
    d.weights[r] = c == 0 ? 0.0 : (c == 1 ? 0.5 : 1.0);
    d.targets[r] = d.weights[r] != 0.0 ? tok(f.gen_) : (r % 2 ? -1 : static_cast<int32_t>(V + 17));
  }
  return d;
}

// Padded ranges on the GPU: bitwise the padded CUDA ops (every output, the backward out of place and in place).
TEST_F(CudaLayout, LogprobPaddedRangesAreBitwiseThePaddedOps) {
  for (DType A : {DType::F32, DType::BF16}) {
    for (int64_t V : {int64_t{1003}, int64_t{50257}}) {
      const int64_t B = 3, T = 7;
      SCOPED_TRACE(std::string(dtype_name(A)) + " V=" + std::to_string(V));
      const auto d = make_data(*this, B, T, V);
      std::vector<int32_t> sg(2 * B);
      for (int64_t b = 0; b < B; ++b) {
        sg[2 * b] = static_cast<int32_t>(b * T);
        sg[2 * b + 1] = static_cast<int32_t>((b + 1) * T);
      }
      const Tensor logits = dev(host(d.logits, {B, T, V}, A)), targets = dev(host_i32(d.targets, {B, T}));
      const Tensor weights = dev(host(d.weights, {B, T}, DType::F32)), seg = dev(host_i32(sg, {B, 2}));
      Backend::LogprobOutputs a{dev_poisoned({B}, DType::F32), dev_poisoned({B, T}, DType::F32),
                                dev_poisoned({B, kSeqStatsWidth}, DType::F32)};
      Backend::LogprobOutputs b{dev_poisoned({B}, DType::F32), dev_poisoned({B, T}, DType::F32),
                                dev_poisoned({B, kSeqStatsWidth}, DType::F32)};
      gpu_->logprob_forward(a, logits, targets, weights, V);
      gpu_->logprob_forward_segments(b, logits, targets, weights, seg, V);
      EXPECT_EQ(bytes(b.seq_logp), bytes(a.seq_logp)) << "seq_logp";
      EXPECT_EQ(bytes(b.token_logp), bytes(a.token_logp)) << "token_logp";
      EXPECT_EQ(bytes(b.seq_stats), bytes(a.seq_stats)) << "seq_stats";
      const Tensor dseq = dev(host(randn(B), {B}, DType::F32));
      Tensor da = dev_poisoned({B, T, V}, A), db = dev_poisoned({B, T, V}, A);
      gpu_->logprob_backward(da, logits, targets, weights, dseq, V);
      gpu_->logprob_backward_segments(db, logits, targets, weights, seg, dseq, V);
      EXPECT_EQ(bytes(db), bytes(da)) << "dlogits";
      Tensor inplace = dev(host(d.logits, {B, T, V}, A));
      gpu_->logprob_backward_segments(inplace, inplace, targets, weights, seg, dseq, V);
      EXPECT_EQ(bytes(inplace), bytes(da)) << "dlogits in place";
    }
  }
}

// A packed batch of 3 rows of 23 slots (ranges not starting at row starts, slots in no range with garbage targets,
// an empty range, a one-slot range) against the CPU backend's twin, within the fp32 budgets; slots in no range
// give exactly 0 (token_logp, dlogits rows); the empty sequence gives exactly 0.
void logprob_packed_case(CudaLayout& f, DType A, int64_t V) {
  SCOPED_TRACE(std::string(dtype_name(A)) + " V=" + std::to_string(V));
  const int64_t B = 3, T = 23, BT = B * T;
  const std::vector<int32_t> sg = {2, 9, 9, 20, 23, 23, 23, 40, 40, 41, 47, 69};
  const int64_t S = static_cast<int64_t>(sg.size() / 2);
  auto d = make_data(f, B, T, V);
  std::vector<bool> owned(BT, false);
  for (int64_t s = 0; s < S; ++s)
    for (int32_t i = sg[2 * s]; i < sg[2 * s + 1]; ++i) owned[i] = true;
  for (int64_t i = 0; i < BT; ++i)
    if (!owned[i]) d.weights[i] = 1.0, d.targets[i] = static_cast<int32_t>(i % 2 ? -3 : V + 5);
  const Tensor h_logits = f.host(d.logits, {B, T, V}, A), h_targets = f.host_i32(d.targets, {B, T});
  const Tensor h_weights = f.host(d.weights, {B, T}, DType::F32), h_seg = f.host_i32(sg, {S, 2});
  const Tensor logits = f.dev(h_logits), targets = f.dev(h_targets), weights = f.dev(h_weights), seg = f.dev(h_seg);
  Backend::LogprobOutputs ref{f.host_poisoned({S}, DType::F32), f.host_poisoned({B, T}, DType::F32),
                              f.host_poisoned({S, kSeqStatsWidth}, DType::F32)};
  Backend::LogprobOutputs got{f.dev_poisoned({S}, DType::F32), f.dev_poisoned({B, T}, DType::F32),
                              f.dev_poisoned({S, kSeqStatsWidth}, DType::F32)};
  f.cpu_->logprob_forward_segments(ref, h_logits, h_targets, h_weights, h_seg, V);
  f.gpu_->logprob_forward_segments(got, logits, targets, weights, seg, V);
  const auto ref_lp = f.values(ref.token_logp), ref_seq = f.values(ref.seq_logp), ref_st = f.values(ref.seq_stats);
  std::vector<double> lp_tol(BT, 0.0), seq_tol(S, 0.0), st_tol(S * kSeqStatsWidth, 0.0);
  for (int64_t i = 0; i < BT; ++i)
    if (owned[i] && d.weights[i] != 0.0)
      lp_tol[i] = lse_budget(V) + 4.0 * kEps * (1.0 + std::fabs(d.logits[i * V + d.targets[i]]) + std::fabs(ref_lp[i]));
  for (int64_t s = 0; s < S; ++s) {
    double mag = 0.0, xs_tol = 0.0;
    for (int32_t i = sg[2 * s]; i < sg[2 * s + 1]; ++i) {
      seq_tol[s] += std::fabs(d.weights[i]) * lp_tol[i];
      mag += std::fabs(d.weights[i] * ref_lp[i]);
      if (d.weights[i] == 0.0) continue;
      double row = 0.0;  // the row's fp32 logit sum: (V/256 + 48) eps of sum |x| (tests/test_cuda_kernels_b.cpp)
      for (int64_t v = 0; v < V; ++v) row += std::fabs(d.logits[i * V + v]);
      xs_tol += lse_budget(V) * row;
    }
    seq_tol[s] += 4.0 * kEps * mag;
    st_tol[s * kSeqStatsWidth + kSeqLogp] = seq_tol[s];
    const double xs = ref_st[s * kSeqStatsWidth + kSeqLogitSum];
    st_tol[s * kSeqStatsWidth + kSeqLogitSum] = xs_tol + 2.0 * kEps * std::fabs(xs);
  }
  expect_within(f.values(got.token_logp), ref_lp, lp_tol, "token_logp");  // exactly 0 in no range
  expect_within(f.values(got.seq_logp), ref_seq, seq_tol, "seq_logp");
  expect_within(f.values(got.seq_stats), ref_st, st_tol, "seq_stats");  // token counts exact
  EXPECT_EQ(f.values(got.seq_logp)[2], 0.0) << "the empty sequence";

  const auto dseq_v = f.randn(S);
  const Tensor h_dseq = f.host(dseq_v, {S}, DType::F32);
  Tensor ref_d = f.host_poisoned({B, T, V}, A), got_d = f.dev_poisoned({B, T, V}, A);
  f.cpu_->logprob_backward_segments(ref_d, h_logits, h_targets, h_weights, h_seg, h_dseq, V);
  f.gpu_->logprob_backward_segments(got_d, logits, targets, weights, seg, f.dev(h_dseq), V);
  const auto want = f.values(ref_d), g = f.values(got_d);
  std::vector<double> tol(want.size(), 0.0);
  for (int64_t s = 0; s < S; ++s)
    for (int32_t i = sg[2 * s]; i < sg[2 * s + 1]; ++i) {
      const double gs = std::fabs(static_cast<double>(static_cast<float>(dseq_v[s])) * d.weights[i]);
      for (int64_t v = 0; v < V; ++v) {
        double t = gs * (lse_budget(V) + 4.0 * kEps);
        if (A == DType::BF16) t += ulp_bf16(std::max(std::fabs(want[i * V + v]), std::fabs(g[i * V + v])));
        tol[i * V + v] = t;
      }
    }
  expect_within(g, want, tol, "dlogits");  // rows in no range: exactly 0
  Tensor inplace = f.dev(h_logits);
  f.gpu_->logprob_backward_segments(inplace, inplace, targets, weights, seg, f.dev(h_dseq), V);
  EXPECT_EQ(f.bytes(inplace), f.bytes(got_d)) << "in place";
}

TEST_F(CudaLayout, LogprobPackedSequencesMatchTheCpu) {
  logprob_packed_case(*this, DType::F32, 1003);
  logprob_packed_case(*this, DType::BF16, 1003);
  logprob_packed_case(*this, DType::BF16, 50257);
}

// Ranges the CPU would reject (outside [0, B*T), reversed, overlapping, unsorted) are not checked on the GPU: the
// kernels clamp every access (compute-sanitizer in the GPU check sees none outside the buffers) and the results are
// deterministic: two runs give the same bits.
TEST_F(CudaLayout, LogprobInvalidRangesStayInBoundsAndDeterministic) {
  const int64_t B = 2, T = 13, V = 301;
  const auto d = make_data(*this, B, T, V);
  const std::vector<int32_t> sg = {-7, 4, 3, 2, 1, 9, 20, 1000, 5, 6, std::numeric_limits<int32_t>::min(), 0};
  const int64_t S = static_cast<int64_t>(sg.size() / 2);
  const Tensor logits = dev(host(d.logits, {B, T, V}, DType::F32)), targets = dev(host_i32(d.targets, {B, T}));
  const Tensor weights = dev(host(d.weights, {B, T}, DType::F32)), seg = dev(host_i32(sg, {S, 2}));
  const Tensor dseq = dev(host(randn(S), {S}, DType::F32));
  std::vector<uint8_t> first[3];
  for (int run = 0; run < 2; ++run) {
    Backend::LogprobOutputs o{dev_poisoned({S}, DType::F32), dev_poisoned({B, T}, DType::F32),
                              dev_poisoned({S, kSeqStatsWidth}, DType::F32)};
    gpu_->logprob_forward_segments(o, logits, targets, weights, seg, V);
    Tensor dl = dev_poisoned({B, T, V}, DType::F32);
    gpu_->logprob_backward_segments(dl, logits, targets, weights, seg, dseq, V);
    gpu_->synchronize();
    const std::vector<uint8_t> now[3] = {bytes(o.seq_logp), bytes(o.seq_stats), bytes(dl)};
    for (int k = 0; k < 3; ++k) {
      if (run == 0) first[k] = now[k];
      else EXPECT_EQ(now[k], first[k]) << "output " << k;
    }
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace dpo
