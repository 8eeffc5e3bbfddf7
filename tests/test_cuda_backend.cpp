// The whole GPT-2 (model/gpt2.h) on CudaBackend against CpuBackend in float: the same random weights (copied through
// the host), the same batch with left and right padding and fractional completion weights; logits, per-token and
// per-sequence log-probs and every parameter's gradient compared; one AdamW step through each backend; the backend's
// boundary checks, copies with dtype conversion and tensor lifetime. Every CUDA op is exercised here, including the
// matmul, attention and log-prob kernels. CudaPaddedGpt2: two layers at GPT-2 124M's width on right-padded (DPO),
// left-padded and all-padding rows, fp32 and bf16, against the CPU and a double model.
// Without a GPU every test that needs one skips with the reason (ctest shows them as skipped, not passed).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/gpt2.h"
#include "train/loss.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

// Small, but every size is awkward: V and T are odd, hs = 16 with 3 heads, two layers. The logits rows are padded
// to ldv = 128 (model/gpt2.h), so the LM head runs with a row stride of 128 and 31 padding columns per row.
GPT2Config small_config() {
  GPT2Config c;
  c.vocab_size = 97;
  c.max_seq_len = 24;
  c.n_embd = 48;
  c.n_head = 3;
  c.n_layer = 2;
  return c;
}

// Host tensors. Row 0 full, row 1 left-padded by 3, row 2 right-padded by 2; completion weights from t = 3 on, one
// of them 0.5; targets under weight 0 are -1 (the contract says they are never read).
struct Batch {
  Tensor tokens, keymask, targets, weights, dseq;  // I32, I32, I32, F64, F64
  int64_t B = 3, T = 13;
};

Batch make_batch(std::mt19937_64& g, const GPT2Config& c) {
  Batch in;
  const int64_t B = in.B, T = in.T;
  in.tokens = Tensor::host({B, T}, DType::I32);
  in.keymask = Tensor::host({B, T}, DType::I32);
  in.targets = Tensor::host({B, T}, DType::I32);
  in.weights = Tensor::host({B, T}, DType::F64);
  in.dseq = Tensor::host({B}, DType::F64);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(c.vocab_size - 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const bool pad = (b == 1 && t < 3) || (b == 2 && t >= T - 2);
      in.tokens.data<int32_t>()[b * T + t] = pad ? 0 : tok(g);
      in.keymask.data<int32_t>()[b * T + t] = pad ? 0 : 1;
    }
    for (int64_t t = 0; t < T; ++t) {
      const bool real_next = t + 1 < T && in.keymask.data<int32_t>()[b * T + t + 1] == 1;
      const bool scored = real_next && t >= 3;
      in.targets.data<int32_t>()[b * T + t] = scored ? in.tokens.data<int32_t>()[b * T + t + 1] : -1;
      in.weights.data<double>()[b * T + t] = scored ? (t == 6 ? 0.5 : 1.0) : 0.0;
    }
    in.dseq.data<double>()[b] = std::normal_distribution<double>(0, 1)(g);
  }
  return in;
}

// A tensor of `dtype` on `be` holding `host` (converted by the backend).
Tensor put(Backend& be, const Tensor& host, DType dtype) {
  Tensor t = be.empty(host.shape(), dtype);
  be.copy_from_host(t, host);
  return t;
}

// A host F64 copy of `t` (converted by the backend).
Tensor get(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), DType::F64);
  be.copy_to_host(h, t);
  return h;
}

std::vector<double> vec(const Tensor& host_f64) {
  const double* p = host_f64.data<double>();
  return {p, p + host_f64.numel()};
}

// ||got - ref|| / ||ref|| (2-norms); NaN anywhere gives NaN, which fails every `<=`.
double rel_norm_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double d = 0, r = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    d += (got[i] - ref[i]) * (got[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return std::sqrt(d) / std::sqrt(r);
}

// Whole-model tolerance. The float CPU model is within ~5e-7 (logits) and ~1.5e-6 (gradients) relative of HF's
// float64 model (docs/architecture.md). The CUDA path is another float computation of the same functions with other
// summation orders (cuBLASLt GEMMs, warp reductions, fp32 LayerNorm statistics and log-sum-exp), so its distance to
// the exact result is of the same order and the two differ by a few 1e-6. 1e-4 norm-wise leaves a >10x margin; a
// wrong op (a dropped term, a swapped index, a missing mask) moves results by 1e-2 or more.
constexpr double kModelTol = 1e-4;

// Both models with the same float weights: random N(0, 0.2) in double on the host, rounded to float by each
// backend's copy_from_host (exercising the F64 -> F32 conversion). 0.2 rather than GPT-2's 0.02 so that attention
// is far from uniform and GELU far from linear.
struct TwoModels {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<Backend> gpu = make_cuda_backend(0);
  GPT2Config cfg = small_config();
  GPT2 mc{*cpu, cfg, DType::F32};
  GPT2 mg{*gpu, cfg, DType::F32};

  explicit TwoModels(std::mt19937_64& g) {
    Tensor p = Tensor::host({mc.params().numel()}, DType::F64);
    auto r = test::randn<double>(g, static_cast<size_t>(p.numel()), 0.2);
    std::memcpy(p.raw(), r.data(), r.size() * sizeof(double));
    cpu->copy_from_host(mc.params(), p);
    gpu->copy_from_host(mg.params(), p);
  }
};

TEST(CudaBackend, Gpt2LogprobsAndGradientsMatchCpu) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  TwoModels m(g);
  Batch in = make_batch(g, m.cfg);
  Backend &cpu = *m.cpu, &gpu = *m.gpu;
  // The CPU model takes host tensors (F32 weights); the GPU model device ones.
  const Tensor c_w = put(cpu, in.weights, DType::F32), c_dseq = put(cpu, in.dseq, DType::F32);
  const Tensor g_tok = put(gpu, in.tokens, DType::I32), g_mask = put(gpu, in.keymask, DType::I32);
  const Tensor g_tgt = put(gpu, in.targets, DType::I32), g_w = put(gpu, in.weights, DType::F32);
  const Tensor g_dseq = put(gpu, in.dseq, DType::F32);

  // Logits: [B,T,ldv] on both backends; the padding columns are zero from allocation and never written.
  const int64_t V = m.cfg.vocab_size, ldv = m.mg.logits_stride();
  ASSERT_EQ(ldv, 128);
  const auto ref_logits = vec(get(cpu, m.mc.forward(in.tokens, in.keymask)));
  const Tensor g_logits = m.mg.forward(g_tok, g_mask);  // the model's buffer: backward() reuses it below
  const auto got_logits = vec(get(gpu, g_logits));
  ASSERT_EQ(got_logits.size(), static_cast<size_t>(in.B * in.T * ldv));
  EXPECT_LE(rel_norm_err(got_logits, ref_logits), kModelTol);
  auto padding_is_zero = [&](const std::vector<double>& rows) {
    for (size_t r = 0; r < rows.size() / static_cast<size_t>(ldv); ++r)
      for (int64_t v = V; v < ldv; ++v)
        if (rows[r * static_cast<size_t>(ldv) + static_cast<size_t>(v)] != 0.0) return false;
    return true;
  };
  EXPECT_TRUE(padding_is_zero(got_logits)) << "the LM-head GEMM wrote into the padding columns";

  // Per-sequence and per-token log-probs (outputs poisoned first on the device).
  Tensor c_seq = cpu.empty({in.B}, DType::F32), c_tok = cpu.empty({in.B, in.T}, DType::F32);
  Tensor g_seq = gpu.empty({in.B}, DType::F32), g_tokl = gpu.empty({in.B, in.T}, DType::F32);
  for (const Tensor* t : {&g_seq, &g_tokl})
    ASSERT_EQ(cudaMemsetAsync(t->raw(), 0xFF, static_cast<size_t>(t->nbytes()),
                              static_cast<CudaBackend&>(gpu).context().stream()),
              cudaSuccess);
  m.mc.sequence_logprobs(in.tokens, in.keymask, in.targets, c_w, c_seq, c_tok);
  m.mg.sequence_logprobs(g_tok, g_mask, g_tgt, g_w, g_seq, g_tokl);
  const auto ref_seq = vec(get(cpu, c_seq)), got_seq = vec(get(gpu, g_seq));
  EXPECT_LE(rel_norm_err(got_seq, ref_seq), kModelTol);
  EXPECT_LE(rel_norm_err(vec(get(gpu, g_tokl)), vec(get(cpu, c_tok))), kModelTol);
  for (int64_t b = 0; b < in.B; ++b) EXPECT_LT(ref_seq[b], 0.0) << "log-probs are negative";

  // Gradients, accumulated from zero; per parameter so that a failure names it.
  m.mc.zero_grad();
  m.mg.zero_grad();
  m.mc.backward(c_dseq);
  m.mg.backward(g_dseq);
  // backward() turned the stored logits into dlogits in place: still nothing in the padding columns.
  EXPECT_TRUE(padding_is_zero(vec(get(gpu, g_logits))));
  const auto ref_grad = vec(get(cpu, m.mc.grads())), got_grad = vec(get(gpu, m.mg.grads()));
  EXPECT_LE(rel_norm_err(got_grad, ref_grad), kModelTol);
  for (const auto& s : m.mc.specs()) {
    const auto r = vec(get(cpu, m.mc.grad(s.name))), q = vec(get(gpu, m.mg.grad(s.name)));
    EXPECT_LE(rel_norm_err(q, r), kModelTol) << s.name;
  }
  double norm = 0;
  for (double v : ref_grad) norm += v * v;
  EXPECT_GT(norm, 1e-3) << "the gradient is not trivially zero";

  // The backend's sum of squares (the grad-norm clip) on the two gradients: they differ by the gradients' own
  // differences (<~ 2 * kModelTol relative).
  EXPECT_NEAR(gpu.sum_squares(m.mg.grads()), cpu.sum_squares(m.mc.grads()), 2 * kModelTol * norm);
}

// The chunked LM head (GPT2::score, fused_forward + fused_backward) on the GPU: one sequence per chunk (three
// chunks, each a view at a different offset of the batch's activations), against the CPU model doing the same and
// against the GPU's own unfused path. The loss head is nonlinear in the log-probs (d = dseq * (1 + tanh(lp / 10)))
// so the per-chunk log-probs must be right for the gradient to be.
TEST(CudaBackend, ChunkedLmHeadMatchesCpuAndTheUnfusedPath) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  TwoModels m(g);
  Batch in = make_batch(g, m.cfg);
  Backend &cpu = *m.cpu, &gpu = *m.gpu;
  const Tensor c_w = put(cpu, in.weights, DType::F32);
  const Tensor g_tok = put(gpu, in.tokens, DType::I32), g_mask = put(gpu, in.keymask, DType::I32);
  const Tensor g_tgt = put(gpu, in.targets, DType::I32), g_w = put(gpu, in.weights, DType::F32);
  const std::vector<double> dseq = vec(in.dseq);
  GPT2::LossHead head;
  head.grad = [&](int64_t s0, int64_t s1, const std::vector<double>& lp, std::vector<double>& d) {
    for (int64_t s = s0; s < s1; ++s) d[s] = dseq[s] * (1.0 + std::tanh(lp[s] / 10.0));
  };
  m.mc.set_logits_chunk_rows(in.T);
  m.mg.set_logits_chunk_rows(in.T);

  // score() against sequence_logprobs on the GPU, and against the CPU's score().
  Tensor g_seq = gpu.empty({in.B}, DType::F32), g_full = gpu.empty({in.B}, DType::F32);
  Tensor c_seq = cpu.empty({in.B}, DType::F32);
  ASSERT_EQ(cudaMemsetAsync(g_seq.raw(), 0xFF, static_cast<size_t>(g_seq.nbytes()),
                            static_cast<CudaBackend&>(gpu).context().stream()),
            cudaSuccess);
  m.mg.score(g_tok, g_mask, g_tgt, g_w, g_seq);
  m.mc.score(in.tokens, in.keymask, in.targets, c_w, c_seq);
  const auto sg = vec(get(gpu, g_seq)), sc = vec(get(cpu, c_seq));
  EXPECT_LE(rel_norm_err(sg, sc), kModelTol);
  m.mg.sequence_logprobs(g_tok, g_mask, g_tgt, g_w, g_full);
  EXPECT_LE(rel_norm_err(sg, vec(get(gpu, g_full))), 1e-6) << "same kernels, chunked vs whole-batch GEMM";

  m.mc.zero_grad();
  m.mg.zero_grad();
  const std::vector<double> lc = m.mc.fused_forward(in.tokens, in.keymask, in.targets, c_w, head);
  m.mc.fused_backward();
  const std::vector<double> lg = m.mg.fused_forward(g_tok, g_mask, g_tgt, g_w, head);
  m.mg.fused_backward();
  EXPECT_LE(rel_norm_err(lg, lc), kModelTol);
  const auto ref_grad = vec(get(cpu, m.mc.grads())), got_grad = vec(get(gpu, m.mg.grads()));
  for (const auto& s : m.mc.specs()) {
    const auto r = vec(get(cpu, m.mc.grad(s.name))), q = vec(get(gpu, m.mg.grad(s.name)));
    EXPECT_LE(rel_norm_err(q, r), kModelTol) << s.name;
  }
  double norm = 0;
  for (double v : ref_grad) norm += v * v;
  EXPECT_GT(norm, 1e-3);

  // The GPU's unfused path with the head's gradients gives the same gradient up to float summation order.
  Tensor dh = Tensor::host({in.B}, DType::F64);
  for (int64_t s = 0; s < in.B; ++s) dh.data<double>()[s] = dseq[s] * (1.0 + std::tanh(lg[s] / 10.0));
  Tensor g_d = put(gpu, dh, DType::F32), g_lp = gpu.empty({in.B}, DType::F32);
  m.mg.zero_grad();
  m.mg.sequence_logprobs(g_tok, g_mask, g_tgt, g_w, g_lp);
  m.mg.backward(g_d);
  EXPECT_LE(rel_norm_err(vec(get(gpu, m.mg.grads())), got_grad), 1e-5);
  // Logits buffers, padding included: the chunk (one sequence) plus the unfused path's [B,T,ldv].
  EXPECT_EQ(m.mg.logits_buffer_numel(), (1 + in.B) * in.T * m.mg.logits_stride());
}

// The loss on the device inside the chunked LM head (GPT2::fused_forward_pairs): the CUDA model against the CPU model
// on the same F32 weights, with a loss mix that reads every input (references, ODPO offsets, lengths) over several
// chunks of pairs, and twice on the GPU (bitwise equal: the pair loss sums in a fixed order, no atomics).
// Tolerances: the per-sequence statistics carry the model's float differences (kModelTol relative, as in
// ChunkedLmHeadMatchesCpuAndTheUnfusedPath); the loss, rewards and gradients are smooth in them; the accuracy
// count may differ by a pair whose margin is within that rounding of 0.
TEST(CudaBackend, ChunkedLmHeadWithTheLossOnTheDeviceMatchesCpu) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  TwoModels m(g);
  Backend &cpu = *m.cpu, &gpu = *m.gpu;
  const int64_t P = 5, T = 11;
  const test::PaddedBatch in = test::make_padded_batch(g, m.cfg.vocab_size, 2 * P, T);
  LossConfig lc;
  lc.beta = 0.2;
  lc.odpo_alpha = 0.5;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Ipo, 0.1}, {LossType::Sft, 0.3}};
  Tensor ref = Tensor::host({2 * P}, DType::F32), off = Tensor::host({P}, DType::F32);
  std::normal_distribution<double> nd(0.0, 3.0);
  for (int64_t i = 0; i < 2 * P; ++i) ref.data<float>()[i] = static_cast<float>(-30.0 + nd(g));
  for (int64_t q = 0; q < P; ++q) off.data<float>()[q] = static_cast<float>(odpo_offset(0.5, 1.0 + 0.4 * q, 0.7));
  auto run = [&](GPT2& model, Backend& be) {
    const bool dev = &be == &gpu;
    GPT2::PairLossHead head;
    head.ref_logp = dev ? put(be, ref, DType::F32) : ref;
    head.offset = dev ? put(be, off, DType::F32) : off;
    head.params = pair_loss_params(lc);
    head.normalizer = 2 * P + 1;
    head.sums = be.empty({kPairSumsWidth}, DType::F64);
    head.stats = be.empty({2 * P, kSeqStatsWidth}, DType::F32);
    head.pair_loss = be.empty({P}, DType::F32);
    if (dev) {
      cudaStream_t st = static_cast<CudaBackend&>(gpu).context().stream();
      for (const Tensor* t : {&head.sums, &head.stats, &head.pair_loss})
        EXPECT_EQ(cudaMemsetAsync(t->raw(), 0xFF, static_cast<size_t>(t->nbytes()), st), cudaSuccess);
    }
    model.set_logits_chunk_rows(2 * T);  // one pair per chunk: five chunks, four of them accumulate
    model.zero_grad();
    const Tensor w = put(be, in.weights, DType::F32);
    model.fused_forward_pairs(dev ? put(be, in.tokens, DType::I32) : in.tokens,
                              dev ? put(be, in.keymask, DType::I32) : in.keymask,
                              dev ? put(be, in.targets, DType::I32) : in.targets, w, head);
    model.fused_backward();
    return std::make_tuple(vec(get(be, head.sums)), vec(get(be, head.pair_loss)), vec(get(be, model.grads())));
  };
  const auto [cs, cl, cg] = run(m.mc, cpu);
  const auto [gs, gl, gg] = run(m.mg, gpu);
  const auto [gs2, gl2, gg2] = run(m.mg, gpu);
  EXPECT_EQ(gs, gs2);
  EXPECT_EQ(gl, gl2);
  EXPECT_EQ(gg, gg2);
  EXPECT_LE(rel_norm_err(gl, cl), kModelTol);
  EXPECT_LE(rel_norm_err(gg, cg), kModelTol);
  double norm = 0;
  for (double v : cg) norm += v * v;
  EXPECT_GT(norm, 1e-6);
  for (int k = 0; k < kPairSumsWidth; ++k) {
    const double tol = k == kSumAccuracy ? 1.0 : kModelTol * (std::fabs(cs[k]) + 1e-3);
    EXPECT_NEAR(gs[k], cs[k], tol) << "PairSum column " << k;
  }
  EXPECT_EQ(gs[kSumTokensChosen], cs[kSumTokensChosen]);  // exact integers on both
  EXPECT_GT(cs[kSumTokensChosen], 0);

  // bf16: a BF16 model on each backend with the same bf16-exact weights. Budgets from the bf16 model's measured
  // distances (CudaPaddedGpt2 above): sequence log-probs 2e-3 relative, gradients 3e-2. The loss and term columns
  // move with the log-probs by at most 1 per nat here (sigmoid: beta = 0.2; SFT: 1 / len; IPO: 2|d| / len with
  // |d| ~ 2.5 and completions of >= 6 tokens), so their error is within 2e-3 of the summed |log-probs|; the
  // rewards and margin are beta times log-prob differences; the logit sums carry the logits' budget, 2e-2.
  GPT2 c16(cpu, m.cfg, DType::BF16), g16(gpu, m.cfg, DType::BF16);
  {
    Tensor p = Tensor::host({c16.master_params().numel()}, DType::F32);
    cpu.copy_to_host(p, m.mc.params());
    Tensor p16 = Tensor::host({p.numel()}, DType::BF16);
    cpu.convert(p16, p);
    cpu.convert(p, p16);
    cpu.copy_from_host(c16.master_params(), p);
    gpu.copy_from_host(g16.master_params(), p);
    c16.sync_params();
    g16.sync_params();
  }
  const auto [bs, bl, bg] = run(c16, cpu);
  const auto [hs, hl, hg] = run(g16, gpu);
  EXPECT_LE(rel_norm_err(hg, bg), 3e-2) << "bf16 gradient, GPU vs CPU";
  const double lp_mag = std::fabs(bs[kSumLogpChosen]) + std::fabs(bs[kSumLogpRejected]);
  for (int k = 0; k < kPairSumsWidth; ++k) {
    double tol = 2e-3 * lp_mag;
    // The rewards and the margin are beta times log-prob differences: beta times that budget.
    if (k == kSumRewardChosen || k == kSumRewardRejected || k == kSumMargin) tol = lc.beta * 2e-3 * lp_mag;
    if (k == kSumAccuracy) tol = 1.0;
    if (k == kSumLogitChosen || k == kSumLogitRejected) tol = 2e-2 * std::fabs(bs[k]) + 1e-3;
    if (k == kSumTokensChosen || k == kSumTokensRejected) tol = 0;
    EXPECT_NEAR(hs[k], bs[k], tol) << "bf16 PairSum column " << k;
  }
}

// Mixed precision on the GPU: the same BF16-exact weights in a BF16 model on the GPU, a BF16 model on the CPU (its
// BF16 ops round exactly where the contract says, over the float kernels) and a double model on the CPU (the
// oracle). The GPU's BF16 model must be as close to the double one as the CPU's BF16 model is allowed to be
// (tests/test_gpt2_bf16.cpp: log-probs 2e-3, gradients 3e-2 relative, there measured at 7e-5 and 4.5e-3), and
// close to the CPU's BF16 model. One optimizer-style round trip: master F32 -> convert -> BF16 compute copy.
TEST(CudaBackend, Bf16ModelMatchesTheCpuBf16ModelAndTheDoubleOracle) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  const GPT2Config cfg = small_config();
  GPT2 c64(*cpu, cfg, DType::F64), c16(*cpu, cfg, DType::BF16), g16(*gpu, cfg, DType::BF16);
  Tensor p = Tensor::host({c64.params().numel()}, DType::F64);
  auto r = test::randn<double>(g, static_cast<size_t>(p.numel()), 0.2);
  std::memcpy(p.raw(), r.data(), r.size() * sizeof(double));
  Tensor p16 = Tensor::host({p.numel()}, DType::BF16);
  cpu->convert(p16, p);
  cpu->convert(p, p16);  // BF16-exact weights for all three models
  cpu->copy_from_host(c64.master_params(), p);
  cpu->copy_from_host(c16.master_params(), p);
  gpu->copy_from_host(g16.master_params(), p);
  c16.sync_params();
  g16.sync_params();  // the GPU's convert kernel (F32 -> BF16)
  EXPECT_EQ(vec(get(*gpu, g16.params())), vec(get(*cpu, c16.params()))) << "convert() rounds like the host";

  Batch in = make_batch(g, cfg);
  const std::vector<double> dseq = vec(in.dseq);
  GPT2::LossHead head;
  head.grad = [&](int64_t s0, int64_t s1, const std::vector<double>&, std::vector<double>& d) {
    for (int64_t s = s0; s < s1; ++s) d[s] = dseq[s];
  };
  auto run = [&](GPT2& m, Backend& be, bool device) {
    const DType wd = grad_dtype(m.dtype());
    const Tensor tok = device ? put(be, in.tokens, DType::I32) : in.tokens;
    const Tensor mask = device ? put(be, in.keymask, DType::I32) : in.keymask;
    const Tensor tgt = device ? put(be, in.targets, DType::I32) : in.targets;
    const Tensor w = put(be, in.weights, wd);
    m.set_logits_chunk_rows(in.T);
    m.zero_grad();
    std::vector<double> lp = m.fused_forward(tok, mask, tgt, w, head);
    m.fused_backward();
    return std::make_pair(lp, vec(get(be, m.grads())));
  };
  const auto [lp64, g64] = run(c64, *cpu, false);
  const auto [lpc, gc] = run(c16, *cpu, false);
  const auto [lpg, gg] = run(g16, *gpu, true);
  EXPECT_LE(rel_norm_err(lpc, lp64), 2e-3);
  EXPECT_LE(rel_norm_err(gc, g64), 3e-2);
  EXPECT_LE(rel_norm_err(lpg, lp64), 2e-3) << "GPU bf16 log-probs vs double";
  EXPECT_LE(rel_norm_err(gg, g64), 3e-2) << "GPU bf16 gradient vs double";
  EXPECT_LE(rel_norm_err(lpg, lpc), 2e-3) << "GPU bf16 vs CPU bf16 log-probs";
  EXPECT_LE(rel_norm_err(gg, gc), 3e-2) << "GPU bf16 vs CPU bf16 gradient";
  for (const auto& s : c64.specs()) {
    const auto a = vec(get(*gpu, g16.grad(s.name))), b = vec(get(*cpu, c64.grad(s.name)));
    EXPECT_LE(rel_norm_err(a, b), 5e-2) << s.name;
  }
}

// --- GPT-2 124M's width with padded batches -------------------------------------------------------------------------
// Two of GPT-2 124M's layers at its real width (C = 768, 12 heads of 64, V = 50257) on batches padded the way DPO
// batches are (real tokens, then padding: keymask 1 then 0), with a left-padded row and a row that is all padding
// beside them, at T = 37 and T = 100, in fp32 and bf16. Logits, per-token and per-sequence log-probs and every
// parameter's gradient through the unfused path (sequence_logprobs + backward), against the CPU model in the same
// precision and a double model on the CPU (the oracle), all with the same weights (N(0, 0.2), exact in the dtype);
// then the chunked training path (fused_forward + fused_backward, one sequence per chunk) on the GPU against the
// GPU's unfused path. Padded positions: their logits are computed and not used, but must be finite (a NaN there
// would reach dwte through 0 * NaN in the LM-head backward); their token log-probs are exactly 0 (weight 0) and an
// all-padding row's sequence log-prob is exactly 0.
// Tolerances (norm-wise relative, as kModelTol above), from the CPU models' measured distance to the double one at
// this configuration (seed of these tests, T = 37 and 100). fp32: logits 4.8e-7, token log-probs 7e-8, gradient
// 7e-7, worst parameter 1.1e-6; the GPU is another float computation of the same functions (other summation
// orders), so kModelTol = 1e-4 from the CPU float model and from the double one leaves a ~100x margin. bf16 (every
// activation rounded to 8 significant bits, so the GPU's and the CPU's bf16 models are each that far from the
// oracle and from each other): logits 4.2e-3 (budget 2e-2), sequence log-probs 9e-5 (2e-3), token log-probs 6.7e-4
// (5e-3), gradient 6e-3 (3e-2), worst parameter 1.1e-2 (5e-2, as tests/test_gpt2_bf16.cpp).

struct PaddedCase {
  const char* name;
  int64_t T;
  DType dtype;
};

void PrintTo(const PaddedCase& c, std::ostream* os) { *os << c.name; }

GPT2Config gpt2_small_width() {
  GPT2Config c;
  c.vocab_size = 50257;
  c.max_seq_len = 128;
  c.n_embd = 768;
  c.n_head = 12;
  c.n_layer = 2;
  return c;
}

// Row b holds real tokens at [rows[b].first, rows[b].second), padding (token 0, keymask 0) elsewhere. Completion
// weights from the third real token on wherever the next token is real, one of them 0.5; target -1 under weight 0.
Batch make_padded_rows(std::mt19937_64& g, const GPT2Config& c, int64_t T,
                       const std::vector<std::pair<int64_t, int64_t>>& rows) {
  Batch in;
  const int64_t B = static_cast<int64_t>(rows.size());
  in.B = B;
  in.T = T;
  in.tokens = Tensor::host({B, T}, DType::I32);
  in.keymask = Tensor::host({B, T}, DType::I32);
  in.targets = Tensor::host({B, T}, DType::I32);
  in.weights = Tensor::host({B, T}, DType::F64);
  in.dseq = Tensor::host({B}, DType::F64);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(c.vocab_size - 1));
  for (int64_t b = 0; b < B; ++b) {
    const auto [begin, end] = rows[static_cast<size_t>(b)];
    for (int64_t t = 0; t < T; ++t) {
      const bool real = t >= begin && t < end;
      in.tokens.data<int32_t>()[b * T + t] = real ? tok(g) : 0;
      in.keymask.data<int32_t>()[b * T + t] = real ? 1 : 0;
    }
    for (int64_t t = 0; t < T; ++t) {
      const bool scored = t >= begin + 2 && t + 1 < end;
      in.targets.data<int32_t>()[b * T + t] = scored ? in.tokens.data<int32_t>()[b * T + t + 1] : -1;
      in.weights.data<double>()[b * T + t] = scored ? (t == begin + 4 ? 0.5 : 1.0) : 0.0;
    }
    in.dseq.data<double>()[b] = std::normal_distribution<double>(0, 1)(g);
  }
  return in;
}

class CudaPaddedGpt2 : public ::testing::TestWithParam<PaddedCase> {
 public:
  void SetUp() override {
    DPO_REQUIRE_GPU();
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }
  std::unique_ptr<Backend> gpu_, cpu_;
};

struct ModelRun {
  std::vector<double> logits, seq, tok, grads;
  std::vector<std::vector<double>> param_grads;  // per spec, in spec order
};

// sequence_logprobs (after a forward() for the logits) and backward from zero gradients. Device outputs are
// poisoned first.
ModelRun run_unfused(GPT2& m, Backend& be, const Batch& in) {
  const bool device = be.device().kind != DeviceKind::CPU;
  const DType wd = grad_dtype(m.dtype());
  const Tensor tok = device ? put(be, in.tokens, DType::I32) : in.tokens;
  const Tensor mask = device ? put(be, in.keymask, DType::I32) : in.keymask;
  const Tensor tgt = device ? put(be, in.targets, DType::I32) : in.targets;
  const Tensor w = put(be, in.weights, wd), dseq = put(be, in.dseq, wd);
  Tensor seq = be.empty({in.B}, wd), tokl = be.empty({in.B, in.T}, wd);
  if (device)
    for (const Tensor* t : {&seq, &tokl})
      EXPECT_EQ(cudaMemsetAsync(t->raw(), 0xFF, static_cast<size_t>(t->nbytes()),
                                static_cast<cudaStream_t>(be.native_stream())),
                cudaSuccess);
  ModelRun r;
  r.logits = vec(get(be, m.forward(tok, mask)));
  m.sequence_logprobs(tok, mask, tgt, w, seq, tokl);
  r.seq = vec(get(be, seq));
  r.tok = vec(get(be, tokl));
  m.zero_grad();
  m.backward(dseq);
  r.grads = vec(get(be, m.grads()));
  for (const auto& s : m.specs()) r.param_grads.push_back(vec(get(be, m.grad(s.name))));
  return r;
}

TEST_P(CudaPaddedGpt2, LogprobsAndGradientsMatchCpuAndDouble) {
  const PaddedCase& pc = GetParam();
  Backend &cpu = *cpu_, &gpu = *gpu_;
  const DType A = pc.dtype;
  const bool bf = A == DType::BF16;
  const int64_t T = pc.T;
  std::mt19937_64 g(test::test_seed());
  const GPT2Config cfg = gpt2_small_width();
  GPT2 c64(cpu, cfg, DType::F64), cA(cpu, cfg, A), gA(gpu, cfg, A);

  // Weights exact in A, the same in all three models.
  Tensor p = Tensor::host({c64.params().numel()}, DType::F64);
  const auto r = test::randn<double>(g, static_cast<size_t>(p.numel()), 0.2);
  std::memcpy(p.raw(), r.data(), r.size() * sizeof(double));
  Tensor pA = Tensor::host({p.numel()}, A);
  cpu.convert(pA, p);
  cpu.convert(p, pA);
  cpu.copy_from_host(c64.master_params(), p);
  cpu.copy_from_host(cA.master_params(), p);
  gpu.copy_from_host(gA.master_params(), p);
  cA.sync_params();
  gA.sync_params();

  // full length, right-padded (two thirds, three tokens), left-padded by a quarter, all padding
  const Batch in = make_padded_rows(g, cfg, T, {{0, T}, {0, 2 * T / 3}, {0, 3}, {T / 4, T}, {0, 0}});
  const ModelRun o = run_unfused(c64, cpu, in), c = run_unfused(cA, cpu, in), d = run_unfused(gA, gpu, in);

  // The contract's exact values on the GPU.
  int64_t non_finite = 0;
  for (double x : d.logits) non_finite += !std::isfinite(x);
  EXPECT_EQ(non_finite, 0) << "logits (padded positions included) must be finite";
  for (int64_t i = 0; i < in.B * in.T; ++i)
    if (in.weights.data<double>()[i] == 0.0) EXPECT_EQ(d.tok[static_cast<size_t>(i)], 0.0) << "token " << i;
  EXPECT_EQ(d.seq[4], 0.0) << "an all-padding row has log-prob 0";

  const double logit_tol = bf ? 2e-2 : kModelTol, seq_tol = bf ? 2e-3 : kModelTol, tok_tol = bf ? 5e-3 : kModelTol;
  const double grad_tol = bf ? 3e-2 : kModelTol, param_tol = bf ? 5e-2 : kModelTol;
  for (const ModelRun* ref : {&c, &o}) {
    const char* vs = ref == &c ? "GPU vs the CPU model in the same dtype" : "GPU vs the double model";
    EXPECT_LE(rel_norm_err(d.logits, ref->logits), logit_tol) << vs << ": logits";
    EXPECT_LE(rel_norm_err(d.seq, ref->seq), seq_tol) << vs << ": sequence log-probs";
    EXPECT_LE(rel_norm_err(d.tok, ref->tok), tok_tol) << vs << ": token log-probs";
    EXPECT_LE(rel_norm_err(d.grads, ref->grads), grad_tol) << vs << ": gradient";
    for (size_t k = 0; k < gA.specs().size(); ++k)
      EXPECT_LE(rel_norm_err(d.param_grads[k], ref->param_grads[k]), param_tol) << vs << ": " << gA.specs()[k].name;
  }

  // The chunked training path on the GPU, one sequence per chunk, against the GPU's unfused path: the same kernels
  // on other row counts, so the fp32 results differ by summation order only (1e-6 log-probs, 1e-5 gradients, as in
  // ChunkedLmHeadMatchesCpuAndTheUnfusedPath); in bf16 the logits of a chunk GEMM may round differently from those of
  // the whole-batch GEMM by one bf16 ulp, which the bf16 budgets above cover.
  const std::vector<double> dseq = vec(in.dseq);
  GPT2::LossHead head;
  head.grad = [&](int64_t s0, int64_t s1, const std::vector<double>&, std::vector<double>& dd) {
    for (int64_t s = s0; s < s1; ++s) dd[s] = dseq[s];
  };
  gA.set_logits_chunk_rows(T);
  gA.zero_grad();
  const std::vector<double> lp = gA.fused_forward(put(gpu, in.tokens, DType::I32), put(gpu, in.keymask, DType::I32),
                                                  put(gpu, in.targets, DType::I32),
                                                  put(gpu, in.weights, grad_dtype(A)), head);
  gA.fused_backward();
  EXPECT_LE(rel_norm_err(lp, d.seq), bf ? seq_tol : 1e-6) << "fused vs unfused log-probs";
  EXPECT_LE(rel_norm_err(vec(get(gpu, gA.grads())), d.grads), bf ? grad_tol : 1e-5) << "fused vs unfused gradient";
  EXPECT_EQ(lp[4], 0.0) << "an all-padding row has log-prob 0";
}

INSTANTIATE_TEST_SUITE_P(Gpt2SmallWidth, CudaPaddedGpt2,
                         ::testing::Values(PaddedCase{"t37_f32", 37, DType::F32}, PaddedCase{"t100_f32", 100, DType::F32},
                                           PaddedCase{"t37_bf16", 37, DType::BF16},
                                           PaddedCase{"t100_bf16", 100, DType::BF16}),
                         [](const ::testing::TestParamInfo<PaddedCase>& info) { return std::string(info.param.name); });

// One AdamW step through each backend on identical inputs (the CPU model's gradient, random state), then the
// clip-style grad_scale from the backend's own sum of squares. The kernels differ only in float vs double per-element
// arithmetic (kernels/adamw.h), i.e. ~10 float roundings of each quantity. The parameters are compared against the
// size of the update (not of the parameters, which would hide it): the stored float parameter (~0.2, ulp 1.5e-8)
// rounds a ~1e-3 update at ~1e-5 relative; 1e-4 leaves a 10x margin.
TEST(CudaBackend, AdamWStepMatchesCpu) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  TwoModels m(g);
  Batch in = make_batch(g, m.cfg);
  Backend &cpu = *m.cpu, &gpu = *m.gpu;
  const Tensor c_w = put(cpu, in.weights, DType::F32), c_dseq = put(cpu, in.dseq, DType::F32);
  Tensor c_seq = cpu.empty({in.B}, DType::F32);
  m.mc.sequence_logprobs(in.tokens, in.keymask, in.targets, c_w, c_seq);
  m.mc.zero_grad();
  m.mc.backward(c_dseq);

  const int64_t n = m.mc.params().numel();
  const Tensor grad_h = get(cpu, m.mc.grads());
  Tensor mom = Tensor::host({n}, DType::F64), var = Tensor::host({n}, DType::F64);
  auto r1 = test::randn<double>(g, static_cast<size_t>(n), 1e-2),
       r2 = test::randn<double>(g, static_cast<size_t>(n), 1e-2);
  for (int64_t i = 0; i < n; ++i) {
    mom.data<double>()[i] = r1[static_cast<size_t>(i)];
    var.data<double>()[i] = r2[static_cast<size_t>(i)] * r2[static_cast<size_t>(i)];
  }
  const Tensor before = get(cpu, m.mc.params());
  Tensor c_g = put(cpu, grad_h, DType::F32), c_m = put(cpu, mom, DType::F32), c_v = put(cpu, var, DType::F32);
  Tensor g_g = put(gpu, grad_h, DType::F32), g_m = put(gpu, mom, DType::F32), g_v = put(gpu, var, DType::F32);

  // Identical float inputs: only the summation order differs (both accumulate in double).
  const double ss_c = cpu.sum_squares(c_g), ss_g = gpu.sum_squares(g_g);
  EXPECT_NEAR(ss_g, ss_c, 1e-12 * ss_c);
  EXPECT_EQ(gpu.sum_squares(g_g), ss_g) << "sum_squares is not bitwise repeatable";

  AdamWParams p;
  p.lr = 1e-3;
  p.weight_decay = 0.1;
  p.step = 3;
  p.grad_scale = std::min(1.0, 0.5 / std::sqrt(ss_c));  // clip to norm 0.5
  cpu.adamw_update(m.mc.params(), c_g, c_m, c_v, p);
  gpu.adamw_update(m.mg.params(), g_g, g_m, g_v, p);

  const auto b = vec(before), pc = vec(get(cpu, m.mc.params())), pg = vec(get(gpu, m.mg.params()));
  std::vector<double> upd(b.size()), diff(b.size());
  double un = 0, dn = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    un += (pc[i] - b[i]) * (pc[i] - b[i]);
    dn += (pg[i] - pc[i]) * (pg[i] - pc[i]);
  }
  ASSERT_GT(un, 0.0);
  EXPECT_LE(std::sqrt(dn) / std::sqrt(un), 1e-4);
  EXPECT_LE(rel_norm_err(vec(get(gpu, g_m)), vec(get(cpu, c_m))), 1e-5);
  EXPECT_LE(rel_norm_err(vec(get(gpu, g_v)), vec(get(cpu, c_v))), 1e-5);

  // scale: float(double(x) * s) on both sides, bitwise equal.
  cpu.scale(c_g, 0.37);
  gpu.scale(g_g, 0.37);
  EXPECT_EQ(vec(get(gpu, g_g)), vec(get(cpu, c_g)));
}

// Copies: host F64 -> device F32 rounds like a host conversion; I32 and I64 ids; device-to-device copy; fill_zero.
TEST(CudaBackend, CopiesConvertDtypes) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  auto gpu = make_cuda_backend(0);
  EXPECT_EQ(gpu->device(), (Device{DeviceKind::CUDA, 0}));
  const int64_t n = 1000003;
  Tensor h = Tensor::host({n}, DType::F64);
  auto r = test::randn<double>(g, static_cast<size_t>(n));
  std::memcpy(h.raw(), r.data(), r.size() * sizeof(double));
  Tensor d = put(*gpu, h, DType::F32);
  const auto back = vec(get(*gpu, d));
  for (int64_t i = 0; i < n; ++i)
    ASSERT_EQ(back[static_cast<size_t>(i)], static_cast<double>(static_cast<float>(r[static_cast<size_t>(i)]))) << i;
  Tensor hf = Tensor::host({n}, DType::F32);  // same-dtype path
  gpu->copy_to_host(hf, d);
  EXPECT_EQ(hf.data<float>()[n - 1], static_cast<float>(r.back()));

  Tensor d2 = gpu->empty({n}, DType::F32);
  gpu->copy(d2, d);
  EXPECT_EQ(vec(get(*gpu, d2)), back);
  gpu->fill_zero(d2);
  EXPECT_EQ(vec(get(*gpu, d2)), std::vector<double>(static_cast<size_t>(n), 0.0));
  Tensor z = gpu->zeros({3, 5}, DType::F32);
  EXPECT_EQ(vec(get(*gpu, z)), std::vector<double>(15, 0.0));

  Tensor ids = Tensor::host({7}, DType::I64);
  for (int i = 0; i < 7; ++i) ids.data<int64_t>()[i] = 1000 * i - 3;
  Tensor d_ids = put(*gpu, ids, DType::I32);
  Tensor ids_back = Tensor::host({7}, DType::I32);
  gpu->copy_to_host(ids_back, d_ids);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(ids_back.data<int32_t>()[i], 1000 * i - 3);
  gpu->synchronize();
}

// Shapes, dtypes and devices are checked at the boundary, before anything is launched.
TEST(CudaBackend, BoundaryChecksThrowNamingTheArgument) {
  DPO_REQUIRE_GPU();
  auto gpu = make_cuda_backend(0);
  Tensor a = gpu->zeros({4, 6}, DType::F32), b = gpu->zeros({4, 6}, DType::F32);
  Tensor host = Tensor::host({4, 6}, DType::F32);
  Tensor f64 = gpu->zeros({4, 6}, DType::F64);
  auto expect_error = [](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no throw, expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { gpu->residual_forward(a, host, b); }, "residual a");
  expect_error([&] { gpu->residual_forward(a, a, f64); }, "F32");
  expect_error([&] { gpu->residual_forward(gpu->zeros({4, 5}, DType::F32), a, b); }, "residual out");
  expect_error([&] { gpu->gelu_forward(a, gpu->zeros({24}, DType::F32)); }, "gelu out");
  expect_error([&] { gpu->copy_from_host(a, Tensor::host({4, 5}, DType::F32)); }, "copy_from_host");
  expect_error([&] { gpu->copy_to_host(host, f64.view(0, {4, 5})); }, "copy_to_host");
  expect_error([&] { gpu->copy(a, host); }, "copy src");
  expect_error([&] { gpu->sum_squares(host); }, "sum_squares x");
  expect_error([&] { gpu->scale(f64, 2.0); }, "scale x");
  expect_error([&] { gpu->adamw_update(a, b, a.view(0, {4, 6}), b, AdamWParams{}); }, "overlap");
  expect_error([&] { gpu->layernorm_forward(a, a, a, a, a, a, 1e-5); }, "layernorm");
  Tensor tok = gpu->zeros({2, 3}, DType::F32);  // tokens must be I32
  expect_error([&] { gpu->encoder_forward(gpu->zeros({2, 3, 6}, DType::F32), tok, a, a); }, "encoder tokens");
}

// Device tensors keep the context alive: freeing one after its backend is gone is safe.
TEST(CudaBackend, TensorsMayOutliveTheBackend) {
  DPO_REQUIRE_GPU();
  Tensor t;
  {
    auto gpu = make_cuda_backend(0);
    t = gpu->zeros({1 << 20}, DType::F32);
  }
  EXPECT_EQ(t.device().kind, DeviceKind::CUDA);
  t = Tensor();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// Runs with or without a GPU: asking for a device that does not exist is a clear dpo::Error, not a crash.
TEST(CudaBackend, MissingDeviceIsAClearError) {
  const int n = CudaContext::device_count();
  try {
    make_cuda_backend(n + 3);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dpo
