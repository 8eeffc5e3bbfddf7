// Activation recomputation on the GPU (GPT2::set_gradient_checkpointing): the model code is the CPU's, so what is
// checked here is the CUDA kernels' side of the promise: the recomputed forward is bitwise the stored one (the
// ops are deterministic, and the unfused ln_1 that starts each recomputed segment is bitwise the fused residual +
// LayerNorm, runtime/backend.h), so BF16 and F32 gradients, per-sequence statistics and loss sums with
// recomputation equal those without it bitwise. Padded and prefix_shared batches, fusions defaults and all
// (gelu_epilogue included), intervals 1, 2 and n_layer. First the stored-activation path is run twice: if that
// alone is not bitwise repeatable the kernels are not deterministic and the message says so. Skips without a GPU.
#include <gtest/gtest.h>

#include <random>
#include <string>
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

#define DPO_REQUIRE_GPU()                                                                       \
  do {                                                                                          \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

constexpr int64_t kLayers = 5;

GPT2Config config() {
  GPT2Config c;
  c.vocab_size = 97;
  c.max_seq_len = 48;
  c.n_embd = 64;
  c.n_head = 4;
  c.n_layer = kLayers;
  return c;
}

Tensor put(Backend& be, const Tensor& host, DType dtype) {
  Tensor t = be.empty(host.shape(), dtype);
  be.copy_from_host(t, host);
  return t;
}

// The raw bytes of a device tensor.
std::string bytes_of(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), t.dtype());
  be.copy_to_host(h, t);
  return std::string(static_cast<const char*>(h.raw()), static_cast<size_t>(h.nbytes()));
}

struct Out {
  std::string grads, stats, sums;
};

Out pass(GPT2& m, const Batch& b, const LossConfig& lc) {
  Backend& be = m.backend();
  const DType gd = grad_dtype(m.dtype());
  const int64_t P = b.pairs;
  const PairRows rows = b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
  Tensor ref = Tensor::host({2 * P}, DType::F64);
  for (int64_t q = 0; q < P; ++q) {
    ref.data<double>()[pair_row(rows, P, q, 0)] = -20.0 - 0.5 * static_cast<double>(q);
    ref.data<double>()[pair_row(rows, P, q, 1)] = -18.0 + 0.25 * static_cast<double>(q);
  }
  auto cast = [&](const Tensor& h, DType dt) {
    if (h.dtype() == dt) return put(be, h, dt);
    Tensor c = Tensor::host(h.shape(), dt);
    for (int64_t i = 0; i < h.numel(); ++i) {
      const double v = h.dtype() == DType::F64 ? h.data<double>()[i] : h.data<float>()[i];
      if (dt == DType::F64) c.data<double>()[i] = v;
      else c.data<float>()[i] = static_cast<float>(v);
    }
    return put(be, c, dt);
  };
  GPT2::PairLossHead head;
  head.ref_logp = cast(ref, gd);
  head.params = pair_loss_params(lc);
  head.normalizer = static_cast<double>(P);
  head.sums = be.empty({kPairSumsWidth}, DType::F64);
  head.stats = be.empty({2 * P, kSeqStatsWidth}, gd);
  const LayoutScope scope(m, b);
  m.zero_grad();
  m.fused_forward_pairs(put(be, b.tokens, DType::I32), put(be, b.keymask, DType::I32), put(be, b.targets, DType::I32),
                        cast(b.weights, gd), head);
  m.fused_backward();
  return {bytes_of(be, m.grads()), bytes_of(be, head.stats), bytes_of(be, head.sums)};
}

TEST(CudaCheckpointing, GradientsBitwiseEqualWithAndWithoutRecomputation) {
  DPO_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  std::mt19937_64 g(test::test_seed());
  const GPT2Config cfg = config();
  const std::vector<PreferencePair> data = test::random_pairs(g, 6, static_cast<int32_t>(cfg.vocab_size), 12, 9);
  LossConfig lc;
  lc.beta = 0.5;
  const std::vector<int64_t> idx = {4, 1, 5, 0, 3, 2};
  for (DType dt : {DType::BF16, DType::F32}) {
    GPT2 m(*be, cfg, dt);
    Rng rng(17);
    m.init_random(rng);
    m.set_logits_chunk_rows(24);  // several chunks
    for (BatchLayout layout : {BatchLayout::Padded, BatchLayout::PrefixShared}) {
      const Batch b = make_layout_batch(data, idx, layout, 64, grad_dtype(dt), 0);
      for (const Fusions& f : {Fusions::defaults(), Fusions::all()}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + ", " + batch_layout_name(layout) + ", fusions " +
                     (f == Fusions::all() ? "all" : "defaults"));
        m.set_fusions(f);
        m.set_gradient_checkpointing(0);
        const Out want = pass(m, b, lc);
        const Out again = pass(m, b, lc);
        ASSERT_TRUE(again.grads == want.grads && again.stats == want.stats && again.sums == want.sums)
            << "the stored-activation path is not bitwise repeatable: the kernels are not deterministic, so "
               "recomputation cannot be compared bitwise";
        for (int64_t interval : {int64_t{1}, int64_t{2}, kLayers}) {
          SCOPED_TRACE("interval " + std::to_string(interval));
          m.set_gradient_checkpointing(interval);
          const Out got = pass(m, b, lc);
          EXPECT_TRUE(got.stats == want.stats) << "per-sequence statistics differ";
          EXPECT_TRUE(got.sums == want.sums) << "loss sums differ";
          EXPECT_TRUE(got.grads == want.grads) << "gradients differ";
        }
        m.set_gradient_checkpointing(0);
      }
    }
  }
}

}  // namespace
}  // namespace dpo
