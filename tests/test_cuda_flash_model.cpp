// The flash attention kernels inside the CUDA backend and the GPT-2 model (attn_implementation flash,
// Backend::set_attention_impl; runtime/cuda/cuda_backend.h): the key-mask spans kernel against its CPU twin, the
// backend's flash ops (saved state, refusals, the padded layout's contract), and the whole BF16 model with flash
// against the same model with the eager kernels on the GPU and the CPU's BF16 model: per-sequence log-probs and
// gradients on left- and right-padded key-mask batches and on packed and prefix_shared layouts, with activation
// recomputation, and two runs bitwise equal. The kernels' own tests are tests/test_cuda_flash.cpp (against the CPU
// twin, per element) and tests/test_flash_emulation.cpp (the host emulation). Skips without a GPU.
//
// Budgets (norm-wise relative, ||got - ref|| / ||ref||): the bf16 model budgets of
// CudaBackend.Bf16ModelMatchesTheCpuBf16ModelAndTheDoubleOracle and tests/test_gpt2_bf16.cpp: sequence log-probs
// 2e-3, gradients 3e-2. They apply unchanged because the flash path changes only where bf16 rounding happens
// inside attention, not how much: it rounds each probability to bf16 before P.V (at most u = 2^-8 of each weight, so
// u max|v| per output, the size of the one rounding of out that both paths make) and dS before its products,
// where the eager path rounds the saved probabilities; both stay a few bf16 roundings per op away from the CPU's
// bf16 model, which is what those budgets were measured for (there: 9e-5 and 6e-3 against budgets 2e-3 and 3e-2).
// A wrong mask, a dropped tile or a wrong saved state moves the log-probs by whole percents (one key of a row of n
// keys carries ~1/n of the weight), far outside them.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/attention.cuh"
#include "kernels/attention.h"
#include "kernels/batch_layout.h"
#include "kernels/seq_stats.h"
#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                       \
  do {                                                                                          \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

constexpr double kLogpTol = 2e-3;  // bf16 model budgets (header comment)
constexpr double kGradTol = 3e-2;

// GPT-2's head size (64; the flash kernels take 64 and 128) with 6 heads, two layers, an odd vocabulary; positions
// for rows longer than two key tiles.
GPT2Config flash_config() {
  GPT2Config c;
  c.vocab_size = 1031;
  c.max_seq_len = 192;
  c.n_embd = 384;
  c.n_head = 6;
  c.n_layer = 2;
  return c;
}

Tensor put(Backend& be, const Tensor& host, DType dtype) {
  Tensor t = be.empty(host.shape(), dtype);
  be.copy_from_host(t, host);
  return t;
}

std::vector<double> vec(Backend& be, const Tensor& t) { return to_host_f64(be, t); }

// An I32 device tensor's values (copy_to_host converts between floating dtypes only).
std::vector<int32_t> ints(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), DType::I32);
  be.copy_to_host(h, t);
  return std::vector<int32_t>(h.data<int32_t>(), h.data<int32_t>() + h.numel());
}

std::string bytes_of(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), t.dtype());
  be.copy_to_host(h, t);
  return std::string(static_cast<const char*>(h.raw()), static_cast<size_t>(h.nbytes()));
}

// ||got - ref|| / ||ref||; NaN anywhere (or a size mismatch) gives NaN, which fails every `<=`.
double rel_norm_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double d = 0, r = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    d += (got[i] - ref[i]) * (got[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return got.size() == ref.size() ? std::sqrt(d) / std::sqrt(r) : std::nan("");
}

// The same BF16-exact weights, N(0, 0.2) from the seed, for every model.
Tensor bf16_exact_weights(std::mt19937_64& g, Backend& cpu, int64_t n) {
  Tensor p = Tensor::host({n}, DType::F32);
  const auto r = test::randn<double>(g, static_cast<size_t>(n), 0.2);
  for (int64_t i = 0; i < n; ++i) p.data<float>()[i] = static_cast<float>(r[static_cast<size_t>(i)]);
  Tensor p16 = Tensor::host({n}, DType::BF16);
  cpu.convert(p16, p);
  cpu.convert(p, p16);
  return p;
}

void load(GPT2& m, const Tensor& host_f32) {
  m.backend().copy_from_host(m.master_params(), host_f32);
  m.sync_params();
}

// --- the key-mask spans kernel --------------------------------------------------------------------------------------

// cuda::attention_keymask_spans against cpu::attention_keymask_spans (the same integers), from both mask forms, with
// the float copy of the mask; rows full, left-padded, right-padded, all padding, and B not a multiple of the kernel's
// rows per block; T = 1, one below a warp's stride and one well above it. Outputs poisoned first.
TEST(CudaFlashModel, KeymaskSpansMatchTheCpuTwin) {
  DPO_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  CudaContext& ctx = static_cast<CudaBackend&>(*be).context();
  std::mt19937_64 g(test::test_seed());
  for (int64_t T : {int64_t{1}, int64_t{31}, int64_t{150}}) {
    SCOPED_TRACE("T = " + std::to_string(T));
    const int64_t B = 7;
    std::vector<int32_t> mask(static_cast<size_t>(B * T), 1);
    std::uniform_int_distribution<int64_t> cut(0, T);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t k = cut(g);
      for (int64_t t = 0; t < T; ++t) {
        int32_t& m = mask[static_cast<size_t>(b * T + t)];
        if (b % 4 == 1) m = t >= k ? 1 : 0;  // left padding (k may be T: all padding)
        if (b % 4 == 2) m = t < k ? 1 : 0;   // right padding
        if (b == 3) m = 0;                   // all padding
      }
    }
    std::vector<int32_t> want(static_cast<size_t>(B * T * kSpanWidth));
    cpu::attention_keymask_spans(want.data(), mask.data(), B, T);
    for (int64_t i = 0; i < B * T; ++i) ASSERT_TRUE(span_valid(&want[static_cast<size_t>(i * kSpanWidth)], i % T));

    Tensor hm = Tensor::host({B, T}, DType::I32);
    std::memcpy(hm.raw(), mask.data(), mask.size() * sizeof(int32_t));
    const Tensor d_mask = put(*be, hm, DType::I32);
    Tensor span = be->empty({B, T, kSpanWidth}, DType::I32), copy = be->empty({B * T}, DType::F32);
    const cudaStream_t st = ctx.stream();
    ASSERT_EQ(cudaMemsetAsync(span.raw(), 0x7F, static_cast<size_t>(span.nbytes()), st), cudaSuccess);
    ASSERT_EQ(cudaMemsetAsync(copy.raw(), 0xFF, static_cast<size_t>(copy.nbytes()), st), cudaSuccess);
    cuda::attention_keymask_spans(ctx, static_cast<int32_t*>(span.raw()), static_cast<float*>(copy.raw()),
                                  static_cast<const int32_t*>(d_mask.raw()), B, T);
    const auto got = ints(*be, span);
    const auto got_copy = vec(*be, copy);
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "span entry " << i;
    for (size_t i = 0; i < mask.size(); ++i) ASSERT_EQ(got_copy[i], mask[i] != 0 ? 1.0 : 0.0) << "mask copy " << i;

    ASSERT_EQ(cudaMemsetAsync(span.raw(), 0x7F, static_cast<size_t>(span.nbytes()), st), cudaSuccess);
    cuda::attention_keymask_spans(ctx, static_cast<int32_t*>(span.raw()), static_cast<const float*>(copy.raw()), B,
                                  T);
    const auto again = ints(*be, span);
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(again[i], want[i]) << "span entry " << i << " (float mask)";

    // A null key mask: every slot real.
    std::vector<int32_t> all(static_cast<size_t>(B * T * kSpanWidth));
    cpu::attention_keymask_spans(all.data(), nullptr, B, T);
    cuda::attention_keymask_spans(ctx, static_cast<int32_t*>(span.raw()), nullptr, nullptr, B, T);
    const auto got_all = ints(*be, span);
    for (size_t i = 0; i < all.size(); ++i) ASSERT_EQ(got_all[i], all[i]) << "span entry " << i << " (no mask)";
  }
}

// --- the backend's flash ops ----------------------------------------------------------------------------------------

// The setting's contract on the backend: the saved state is [B*NH*T + B*T] F32 (the CPU blocked kernels' layout) with
// flash, the probabilities with eager; F32 activations and a missing `out` are refused with flash; a head size the
// kernels do not take is refused before anything runs; the key-mask form's per-slot entries are the mask (1 / 0) and
// the spans form's are 2; left-padding query slots (which see only themselves) are finite; two calls are bitwise
// equal; the backward accumulates (twice the gradient from a zeroed start within one bf16 rounding per element).
TEST(CudaFlashModel, BackendFlashOpsContract) {
  DPO_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  Backend& gpu = *be;
  const int64_t B = 3, T = 100, NH = 2, D = 64, C = NH * D;
  EXPECT_EQ(gpu.attention_impl(), AttentionImpl::Eager);
  EXPECT_EQ(gpu.attention_saved_shape(B, T, NH), (Shape{B, NH, T, T}));
  gpu.set_attention_impl(AttentionImpl::Flash);
  EXPECT_EQ(gpu.attention_impl(), AttentionImpl::Flash);
  EXPECT_EQ(gpu.attention_saved_shape(B, T, NH), (Shape{B * NH * T + B * T}));
  EXPECT_EQ(gpu.attention_saved_dtype(DType::BF16), DType::F32);
  EXPECT_EQ(gpu.attention_saved_shape(B, T, NH), make_cpu_backend()->attention_saved_shape(B, T, NH));

  std::mt19937_64 g(test::test_seed());
  const auto r = test::randn<double>(g, static_cast<size_t>(B * T * 3 * C), 1.0);
  Tensor hq = Tensor::host({B, T, 3 * C}, DType::F32);
  for (int64_t i = 0; i < hq.numel(); ++i) hq.data<float>()[i] = static_cast<float>(r[static_cast<size_t>(i)]);
  const auto rd = test::randn<double>(g, static_cast<size_t>(B * T * C), 1.0);
  Tensor hd = Tensor::host({B, T, C}, DType::F32);
  for (int64_t i = 0; i < hd.numel(); ++i) hd.data<float>()[i] = static_cast<float>(rd[static_cast<size_t>(i)]);
  Tensor hm = Tensor::host({B, T}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      hm.data<int32_t>()[b * T + t] = b == 1 ? (t >= 9 ? 1 : 0) : b == 2 ? (t < 71 ? 1 : 0) : 1;
  const Tensor qkv = put(gpu, hq, DType::BF16), dout = put(gpu, hd, DType::BF16), mask = put(gpu, hm, DType::I32);
  const Tensor out = gpu.empty({B, T, C}, DType::BF16);
  const Tensor saved = gpu.empty(gpu.attention_saved_shape(B, T, NH), DType::F32);
  const cudaStream_t st = static_cast<CudaBackend&>(gpu).context().stream();
  ASSERT_EQ(cudaMemsetAsync(out.raw(), 0xFF, static_cast<size_t>(out.nbytes()), st), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(saved.raw(), 0xFF, static_cast<size_t>(saved.nbytes()), st), cudaSuccess);
  gpu.attention_forward(out, saved, qkv, mask, NH);
  const auto o1 = vec(gpu, out), s1 = vec(gpu, saved);
  for (size_t i = 0; i < o1.size(); ++i) ASSERT_TRUE(std::isfinite(o1[i])) << "out " << i;
  for (int64_t i = 0; i < B * NH * T; ++i) ASSERT_TRUE(std::isfinite(s1[static_cast<size_t>(i)])) << "lse " << i;
  for (int64_t i = 0; i < B * T; ++i)
    ASSERT_EQ(s1[static_cast<size_t>(B * NH * T + i)], hm.data<int32_t>()[i] != 0 ? 1.0 : 0.0) << "mask entry " << i;
  gpu.attention_forward(out, saved, qkv, mask, NH);
  EXPECT_EQ(vec(gpu, out), o1) << "two identical forwards differ";

  Tensor dqkv = gpu.zeros({B, T, 3 * C}, DType::BF16);
  gpu.attention_backward(dqkv, dout, qkv, out, saved, NH);
  const auto d1 = vec(gpu, dqkv);
  for (size_t i = 0; i < d1.size(); ++i) ASSERT_TRUE(std::isfinite(d1[i])) << "dqkv " << i;
  gpu.attention_backward(dqkv, dout, qkv, out, saved, NH);  // += the same gradient: 2 g, rounded twice
  const auto d2 = vec(gpu, dqkv);
  for (size_t i = 0; i < d1.size(); ++i)
    ASSERT_LE(std::fabs(d2[i] - 2 * d1[i]), std::ldexp(std::fabs(d2[i]), -7) + 1e-30) << "dqkv " << i;
  Tensor dq2 = gpu.zeros({B, T, 3 * C}, DType::BF16);
  gpu.attention_backward(dq2, dout, qkv, out, saved, NH);
  EXPECT_EQ(vec(gpu, dq2), d1) << "two identical backwards differ";

  // The spans form marks its state with 2.
  Tensor hs = Tensor::host({B, T, kSpanWidth}, DType::I32);
  cpu::attention_keymask_spans(hs.data<int32_t>(), hm.data<int32_t>(), B, T);
  gpu.attention_forward_spans(out, saved, qkv, put(gpu, hs, DType::I32), NH);
  const auto o2 = vec(gpu, out), s2 = vec(gpu, saved);
  for (int64_t i = 0; i < B * T; ++i) ASSERT_EQ(s2[static_cast<size_t>(B * NH * T + i)], 2.0) << "mark " << i;
  // The spans of the mask give the key-mask form's results bitwise: the same kernel on the same spans.
  EXPECT_EQ(o2, o1);

  auto expect_error = [](const auto& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const Tensor q32 = put(gpu, hq, DType::F32), o32 = gpu.empty({B, T, C}, DType::F32);
  expect_error([&] { gpu.attention_forward(o32, saved, q32, mask, NH); }, "attn_implementation");
  expect_error([&] { gpu.attention_backward(dqkv, dout, qkv, Tensor(), saved, NH); }, "out");
  const Tensor q_hs32 = gpu.empty({B, T, 3 * C}, DType::BF16);  // 4 heads of 32: not a flash head size
  const Tensor s_hs32 = gpu.empty(gpu.attention_saved_shape(B, T, 4), DType::F32);
  expect_error([&] { gpu.attention_forward(out, s_hs32, q_hs32, mask, 4); }, "head_dim");
  gpu.set_attention_impl(AttentionImpl::Eager);
  EXPECT_EQ(gpu.attention_saved_shape(B, T, NH), (Shape{B, NH, T, T}));
}

// --- the model --------------------------------------------------------------------------------------------------------

// Row b: real tokens at [rows[b].first, rows[b].second), padding (token 0, keymask 0) elsewhere; completion weights
// from the third real token on wherever the next token is real, one of them 0.5; target -1 under weight 0; a
// per-sequence loss gradient dseq of mixed signs.
struct Rows {
  Tensor tokens, keymask, targets, weights;  // I32, I32, I32, F64
  std::vector<double> dseq;
  int64_t B = 0, T = 0;
};

Rows padded_rows(std::mt19937_64& g, const GPT2Config& c, int64_t T,
                 const std::vector<std::pair<int64_t, int64_t>>& rows) {
  Rows in;
  const int64_t B = static_cast<int64_t>(rows.size());
  in.B = B, in.T = T;
  in.tokens = Tensor::host({B, T}, DType::I32);
  in.keymask = Tensor::host({B, T}, DType::I32);
  in.targets = Tensor::host({B, T}, DType::I32);
  in.weights = Tensor::host({B, T}, DType::F64);
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
      const double w = scored ? (t == begin + 4 ? 0.5 : 1.0) : 0.0;
      in.weights.data<double>()[b * T + t] = w;
      in.targets.data<int32_t>()[b * T + t] = w > 0 ? in.tokens.data<int32_t>()[b * T + t + 1] : -1;
    }
    in.dseq.push_back((b % 2 ? -0.7 : 0.9) * (1.0 + 0.25 * static_cast<double>(b)));
  }
  return in;
}

struct Result {
  std::vector<double> logp, grads;
  std::string grad_bytes, logp_bytes;
};

// One training pass of the padded (key-mask) form: the chunked forward with its loss gradient, then the backward.
Result run_rows(GPT2& m, const Rows& in) {
  Backend& be = m.backend();
  GPT2::LossHead head;
  head.grad = [&](int64_t s0, int64_t s1, const std::vector<double>&, std::vector<double>& d) {
    for (int64_t s = s0; s < s1; ++s) d[static_cast<size_t>(s)] = in.dseq[static_cast<size_t>(s)];
  };
  m.set_logits_chunk_rows(in.T);  // one sequence per chunk
  m.zero_grad();
  const std::vector<double> lp =
      m.fused_forward(put(be, in.tokens, DType::I32), put(be, in.keymask, DType::I32),
                      put(be, in.targets, DType::I32), put(be, in.weights, grad_dtype(m.dtype())), head);
  m.fused_backward();
  Result r;
  r.logp = lp;
  r.grads = vec(be, m.grads());
  r.grad_bytes = bytes_of(be, m.grads());
  r.logp_bytes = std::string(reinterpret_cast<const char*>(lp.data()), lp.size() * sizeof(double));
  return r;
}

// Left padding (rows 1 and 3), right padding (rows 2 and 3), a full row; T = 150 (two key tiles and a partial
// third). The flash model against the eager GPU model and the CPU BF16 model; with recomputation (interval 1) the
// flash model's gradients and log-probs are bitwise those without it; two runs are bitwise equal.
TEST(CudaFlashModel, PaddedBatchesMatchEagerAndTheCpuModel) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  auto cpu_be = make_cpu_backend();
  auto gpu_be = make_cuda_backend(0);
  Backend &cpu = *cpu_be, &gpu = *gpu_be;
  const GPT2Config cfg = flash_config();
  GPT2 c16(cpu, cfg, DType::BF16);
  const Tensor w = bf16_exact_weights(g, cpu, c16.master_params().numel());
  load(c16, w);
  const int64_t T = 150;
  const Rows in = padded_rows(g, cfg, T, {{0, T}, {37, T}, {0, 83}, {12, 140}});

  const Result want = run_rows(c16, in);
  GPT2 ge(gpu, cfg, DType::BF16);  // eager: the backend's default
  load(ge, w);
  const Result eager = run_rows(ge, in);

  gpu.set_attention_impl(AttentionImpl::Flash);  // before the flash model allocates its activations
  GPT2 gf(gpu, cfg, DType::BF16);
  load(gf, w);
  const Result flash = run_rows(gf, in);
  const Result again = run_rows(gf, in);
  EXPECT_TRUE(again.grad_bytes == flash.grad_bytes && again.logp_bytes == flash.logp_bytes)
      << "two flash runs differ";

  EXPECT_LE(rel_norm_err(eager.logp, want.logp), kLogpTol) << "eager GPU vs CPU bf16 log-probs";
  EXPECT_LE(rel_norm_err(eager.grads, want.grads), kGradTol) << "eager GPU vs CPU bf16 gradient";
  EXPECT_LE(rel_norm_err(flash.logp, want.logp), kLogpTol) << "flash vs CPU bf16 log-probs";
  EXPECT_LE(rel_norm_err(flash.grads, want.grads), kGradTol) << "flash vs CPU bf16 gradient";
  EXPECT_LE(rel_norm_err(flash.logp, eager.logp), kLogpTol) << "flash vs eager log-probs";
  EXPECT_LE(rel_norm_err(flash.grads, eager.grads), kGradTol) << "flash vs eager gradient";
  double norm = 0;
  for (double v : want.grads) norm += v * v;
  EXPECT_GT(norm, 1e-6) << "a vanishing gradient would make the comparison vacuous";
  for (const auto& s : c16.specs()) {  // every parameter, not only the norm of all
    const auto a = vec(gpu, gf.grad(s.name)), b = vec(cpu, c16.grad(s.name));
    EXPECT_LE(rel_norm_err(a, b), 5e-2) << s.name;
  }

  for (int64_t interval : {int64_t{1}, cfg.n_layer}) {
    SCOPED_TRACE("recomputation interval " + std::to_string(interval));
    gf.set_gradient_checkpointing(interval);
    const Result rc = run_rows(gf, in);
    EXPECT_TRUE(rc.logp_bytes == flash.logp_bytes) << "log-probs differ with recomputation";
    EXPECT_TRUE(rc.grad_bytes == flash.grad_bytes) << "gradients differ with recomputation";
  }
  gf.set_gradient_checkpointing(0);
  gpu.set_attention_impl(AttentionImpl::Eager);
}

// One pass of a data batch (padded, packed or prefix_shared) through the pair loss: the per-sequence statistics
// (their log-prob column) and the gradients.
Result run_pairs(GPT2& m, const Batch& b, const LossConfig& lc) {
  Backend& be = m.backend();
  const int64_t P = b.pairs;
  const PairRows rows = b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
  Tensor ref = Tensor::host({2 * P}, DType::F32);
  for (int64_t q = 0; q < P; ++q) {
    ref.data<float>()[pair_row(rows, P, q, 0)] = -60.0f - static_cast<float>(q);
    ref.data<float>()[pair_row(rows, P, q, 1)] = -58.0f + 0.5f * static_cast<float>(q);
  }
  GPT2::PairLossHead head;
  head.ref_logp = put(be, ref, DType::F32);
  head.params = pair_loss_params(lc);
  head.normalizer = static_cast<double>(P);
  head.sums = be.empty({kPairSumsWidth}, DType::F64);
  head.stats = be.empty({2 * P, kSeqStatsWidth}, DType::F32);
  const LayoutScope scope(m, b);
  m.zero_grad();
  m.fused_forward_pairs(put(be, b.tokens, DType::I32), put(be, b.keymask, DType::I32), put(be, b.targets, DType::I32),
                        put(be, b.weights, DType::F32), head);
  m.fused_backward();
  const auto stats = vec(be, head.stats);
  Result r;
  // By record (the layouts order pairs by row, first-fit; b.indices[q] names pair q's record; distinct here), chosen
  // then rejected, so that every layout's vector lines up with the padded batch's.
  r.logp.assign(static_cast<size_t>(2 * P), std::nan(""));
  for (int64_t q = 0; q < P; ++q)
    for (int64_t side = 0; side < 2; ++side) {
      const auto rec = static_cast<size_t>(b.indices[static_cast<size_t>(q)]);
      r.logp.at(2 * rec + static_cast<size_t>(side)) =
          stats[static_cast<size_t>(pair_row(rows, P, q, side) * kSeqStatsWidth + kSeqLogp)];
    }
  r.grads = vec(be, m.grads());
  r.grad_bytes = bytes_of(be, m.grads());
  r.logp_bytes = bytes_of(be, head.stats);
  return r;
}

// Packed and prefix_shared rows (several sequences per row, spans with holes, rows of up to 160 slots) and the padded
// batch of the same pairs: flash against eager on the GPU and the CPU BF16 model in the same layout, the layouts
// against the flash padded batch, recomputation bitwise, two runs bitwise.
TEST(CudaFlashModel, PackedAndPrefixSharedMatchEagerAndTheCpuModel) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed() + 1);
  auto cpu_be = make_cpu_backend();
  auto gpu_be = make_cuda_backend(0);
  Backend &cpu = *cpu_be, &gpu = *gpu_be;
  const GPT2Config cfg = flash_config();
  const std::vector<PreferencePair> data = test::random_pairs(g, 7, static_cast<int32_t>(cfg.vocab_size), 45, 30);
  const std::vector<int64_t> idx = {4, 0, 6, 2, 1, 5, 3};  // a permutation of the records (run_pairs keys by them)
  LossConfig lc;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.2}};
  GPT2 c16(cpu, cfg, DType::BF16), ge(gpu, cfg, DType::BF16);
  const Tensor w = bf16_exact_weights(g, cpu, c16.master_params().numel());
  load(c16, w);
  load(ge, w);
  for (GPT2* m : {&c16, &ge}) m->set_logits_chunk_rows(64);
  const std::vector<BatchLayout> layouts = {BatchLayout::Padded, BatchLayout::Packed, BatchLayout::PrefixShared};
  std::vector<Batch> batches;
  for (BatchLayout layout : layouts) batches.push_back(make_layout_batch(data, idx, layout, 160, DType::F32, 0));
  std::vector<Result> want, eager;
  for (const Batch& b : batches) {
    want.push_back(run_pairs(c16, b, lc));
    eager.push_back(run_pairs(ge, b, lc));
  }
  gpu.set_attention_impl(AttentionImpl::Flash);
  GPT2 gf(gpu, cfg, DType::BF16);
  load(gf, w);
  gf.set_logits_chunk_rows(64);
  Result flash_padded;
  for (size_t i = 0; i < layouts.size(); ++i) {
    SCOPED_TRACE(batch_layout_name(layouts[i]));
    const Result flash = run_pairs(gf, batches[i], lc);
    const Result again = run_pairs(gf, batches[i], lc);
    EXPECT_TRUE(again.grad_bytes == flash.grad_bytes && again.logp_bytes == flash.logp_bytes)
        << "two flash runs differ";
    EXPECT_LE(rel_norm_err(eager[i].logp, want[i].logp), kLogpTol) << "eager GPU vs CPU bf16 log-probs";
    EXPECT_LE(rel_norm_err(eager[i].grads, want[i].grads), kGradTol) << "eager GPU vs CPU bf16 gradient";
    EXPECT_LE(rel_norm_err(flash.logp, want[i].logp), kLogpTol) << "flash vs CPU bf16 log-probs";
    EXPECT_LE(rel_norm_err(flash.grads, want[i].grads), kGradTol) << "flash vs CPU bf16 gradient";
    EXPECT_LE(rel_norm_err(flash.logp, eager[i].logp), kLogpTol) << "flash vs eager log-probs";
    EXPECT_LE(rel_norm_err(flash.grads, eager[i].grads), kGradTol) << "flash vs eager gradient";
    if (i == 0) {
      flash_padded = flash;
    } else {  // the same pairs in another layout: the same functions, other bf16 groupings
      EXPECT_LE(rel_norm_err(flash.logp, flash_padded.logp), kLogpTol) << "flash layout vs flash padded log-probs";
      EXPECT_LE(rel_norm_err(flash.grads, flash_padded.grads), kGradTol) << "flash layout vs flash padded gradient";
    }
    gf.set_gradient_checkpointing(1);
    const Result rc = run_pairs(gf, batches[i], lc);
    gf.set_gradient_checkpointing(0);
    EXPECT_TRUE(rc.logp_bytes == flash.logp_bytes) << "statistics differ with recomputation";
    EXPECT_TRUE(rc.grad_bytes == flash.grad_bytes) << "gradients differ with recomputation";
  }
  gpu.set_attention_impl(AttentionImpl::Eager);
}

}  // namespace
}  // namespace dpo
