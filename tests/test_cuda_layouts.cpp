// Batch layouts on the GPU at the model level (kernels/batch_layout.h): the kernels' own tests are
// test_cuda_attention_spans and test_cuda_layout_kernels; this checks the model's layout path (GPT2::set_layout,
// the chunked LM head over rows) against the padded batch on the GPU and the CPU model. Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

constexpr double kModelTol = 1e-4;  // as tests/test_cuda_backend.cpp: float models on two devices

GPT2Config small_config() {
  GPT2Config c;
  c.vocab_size = 97;
  c.max_seq_len = 24;
  c.n_embd = 48;
  c.n_head = 3;
  c.n_layer = 2;
  return c;
}

Tensor put(Backend& be, const Tensor& host, DType dtype) {
  Tensor t = be.empty(host.shape(), dtype);
  be.copy_from_host(t, host);
  return t;
}

std::vector<double> vec(Backend& be, const Tensor& t) { return to_host_f64(be, t); }

// ||got - ref|| / ||ref||; NaN anywhere gives NaN, which fails every `<=`.
double rel_norm_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double d = 0, r = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    d += (got[i] - ref[i]) * (got[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return got.size() == ref.size() ? std::sqrt(d) / std::sqrt(r) : std::nan("");
}

// Batch layouts on the GPU (kernels/batch_layout.h): packed and prefix_shared batches of random pairs give the
// padded batch's per-sequence log-probs, loss sums and gradients on the GPU (same weights, F32), and match the
// CPU model's layout run. Budget kModelTol: the layouts only reorder float sums (attention over other key slots,
// the LM head over other row groupings), as the CPU test in double shows at 1e-12 (tests/test_batch_layout.cpp).
TEST(CudaLayouts, PackedAndPrefixSharedMatchPadded) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  auto cpu_be = make_cpu_backend();
  auto gpu_be = make_cuda_backend(0);
  Backend &cpu = *cpu_be, &gpu = *gpu_be;
  const GPT2Config cfg = small_config();
  GPT2 mc(cpu, cfg, DType::F32), mg(gpu, cfg, DType::F32);
  {
    Tensor p = Tensor::host({mc.params().numel()}, DType::F64);
    const auto r = test::randn<double>(g, static_cast<size_t>(p.numel()), 0.2);
    std::memcpy(p.raw(), r.data(), r.size() * sizeof(double));
    cpu.copy_from_host(mc.params(), p);
    gpu.copy_from_host(mg.params(), p);
  }
  const std::vector<PreferencePair> data = test::random_pairs(g, 7, static_cast<int32_t>(cfg.vocab_size), 8, 6);
  const std::vector<int64_t> idx = {4, 0, 6, 2, 1, 5, 3};
  LossConfig lc;
  lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.2}};
  auto run = [&](GPT2& model, Backend& be, const Batch& b) {
    const int64_t P = b.pairs;
    const PairRows rows = b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
    Tensor ref = Tensor::host({2 * P}, DType::F32);
    for (int64_t q = 0; q < P; ++q) {
      const auto rec = static_cast<float>(b.indices[static_cast<size_t>(q)]);
      ref.data<float>()[pair_row(rows, P, q, 0)] = -10.0f - rec;
      ref.data<float>()[pair_row(rows, P, q, 1)] = -12.0f + rec;
    }
    GPT2::PairLossHead head;
    head.ref_logp = put(be, ref, DType::F32);
    head.params = pair_loss_params(lc);
    head.normalizer = static_cast<double>(P);
    head.sums = be.empty({kPairSumsWidth}, DType::F64);
    const LayoutScope scope(model, b);
    model.zero_grad();
    model.fused_forward_pairs(put(be, b.tokens, DType::I32), put(be, b.keymask, DType::I32),
                              put(be, b.targets, DType::I32), put(be, b.weights, DType::F32), head);
    model.fused_backward();
    return std::make_pair(vec(be, head.sums), vec(be, model.grads()));
  };
  mg.set_logits_chunk_rows(16);
  mc.set_logits_chunk_rows(16);
  const auto [ps, pg] = run(mg, gpu, make_batch(data, idx, DType::F32, 0));
  for (BatchLayout layout : {BatchLayout::Packed, BatchLayout::PrefixShared}) {
    SCOPED_TRACE(batch_layout_name(layout));
    const Batch b = make_layout_batch(data, idx, layout, 40, DType::F32, 0);
    const auto [gs, gg] = run(mg, gpu, b);
    const auto [cs, cg] = run(mc, cpu, b);
    EXPECT_LE(rel_norm_err(gg, pg), kModelTol) << "GPU layout vs GPU padded gradient";
    EXPECT_LE(rel_norm_err(gg, cg), kModelTol) << "GPU vs CPU in the layout";
    for (int k = 0; k < kPairSumsWidth; ++k)
      EXPECT_NEAR(gs[k], ps[k], k == kSumAccuracy ? 1.0 : kModelTol * (std::fabs(ps[k]) + 1.0)) << "column " << k;
  }
}

}  // namespace
}  // namespace dpo
