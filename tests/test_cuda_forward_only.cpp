// The GPU side of forward-only mode and of the memory queries. GPT2::ModelMode::ForwardOnly runs the training model's
// forward ops in the same order on the same inputs, only in other buffers, so on the GPU too its scores are bitwise a
// training-mode model's (deterministic kernels; checked first by repeating the training model's pass): BF16 and F32,
// padded and prefix_shared batches, the compacted LM head and the full one, fusions defaults and all, GPT-2 and a
// Llama-family model (grouped-query heads, q/k/v biases, untied head); and its weights, assigned from the training
// model's device master, are bitwise that model's (the same F32 -> BF16 conversion kernel as sync_params).
// Backend::memory_info on CUDA: free <= total, live and peak count exactly the bytes of the tensors the backend makes,
// and reset_peak_memory() brings peak down to live. Skips without a GPU.
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
#include "train/reference.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                       \
  do {                                                                                          \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

GPT2Config config(bool llama) {
  GPT2Config c;
  c.vocab_size = 97;
  c.max_seq_len = 48;
  c.n_embd = 64;
  c.n_head = 4;
  c.n_layer = 5;
  if (llama) {
    c.arch = Arch::Llama;
    c.model_type = "qwen2";
    c.n_kv_head = 2;
    c.intermediate_size = 88;
    c.attention_bias = true;
    c.tie_word_embeddings = false;
    c.rope_scaling = RopeScaling{8, 1, 4, 16};
  }
  return c;
}

std::string bytes_of(Backend& be, const Tensor& t) {
  Tensor h = Tensor::host(t.shape(), t.dtype());
  be.copy_to_host(h, t);
  return std::string(static_cast<const char*>(h.raw()), static_cast<size_t>(h.nbytes()));
}

std::string scores(GPT2& m, const std::vector<Batch>& batches) {
  std::string out;
  for (HeadRows rows : {HeadRows::Scored, HeadRows::All}) {
    m.set_head_rows(rows);
    for (const Batch& b : batches) {
      const std::vector<double> lp = sequence_logps(m, b);
      out += std::string(reinterpret_cast<const char*>(lp.data()), lp.size() * sizeof(double));
    }
  }
  return out;
}

TEST(CudaForwardOnly, ScoresBitwiseThoseOfATrainingModel) {
  DPO_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  std::mt19937_64 g(test::test_seed());
  const auto V = static_cast<int32_t>(config(false).vocab_size);  // the same in both architectures
  const std::vector<PreferencePair> data = test::random_pairs(g, 6, V, 12, 9);
  const std::vector<int64_t> idx = {4, 1, 5, 0, 3, 2};
  for (bool llama : {false, true}) {
    for (DType dt : {DType::BF16, DType::F32}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (llama ? " llama" : " gpt2"));
      const GPT2Config cfg = config(llama);
      GPT2 train(*be, cfg, dt);
      Rng rng(23);
      train.init_random(rng);
      GPT2 fwd(*be, cfg, dt);
      fwd.set_mode(GPT2::ModelMode::ForwardOnly);
      fwd.assign_weights(train.master_params());  // device F32 master -> the forward-only model's weights
      ASSERT_TRUE(bytes_of(*be, fwd.params()) == bytes_of(*be, train.params()));
      for (GPT2* m : {&train, &fwd}) m->set_logits_chunk_rows(24);  // several chunks
      std::vector<Batch> batches;
      for (BatchLayout layout : {BatchLayout::Padded, BatchLayout::PrefixShared})
        batches.push_back(make_layout_batch(data, idx, layout, 64, grad_dtype(dt), 0));
      for (const Fusions& f : {Fusions::defaults(), Fusions::all()}) {
        SCOPED_TRACE(f == Fusions::all() ? "fusions all" : "fusions defaults");
        train.set_fusions(f);
        fwd.set_fusions(f);
        const std::string want = scores(train, batches);
        ASSERT_TRUE(scores(train, batches) == want)
            << "the training model's scores are not bitwise repeatable: the kernels are not deterministic";
        EXPECT_TRUE(scores(fwd, batches) == want) << "forward-only scores differ";
      }
    }
  }
}

TEST(CudaMemoryInfo, CountsTheBackendsTensors) {
  DPO_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  const Backend::MemoryInfo m0 = be->memory_info();
  EXPECT_GT(m0.total, 0);
  EXPECT_GE(m0.free, 0);
  EXPECT_LE(m0.free, m0.total);
  ASSERT_GE(m0.live, 0);
  be->reset_peak_memory();
  EXPECT_EQ(be->memory_info().peak, m0.live);
  {
    // An odd element count (12 MiB + 12 bytes of F32) and 1 MiB of BF16: counted as requested, not as the
    // pool rounds them.
    const int64_t a = 3 * (int64_t{1} << 20) + 3, b = int64_t{1} << 20;
    Tensor ta = be->empty({a}, DType::F32);
    EXPECT_EQ(be->memory_info().live, m0.live + a * 4);
    {
      Tensor tb = be->empty({b / 2}, DType::BF16);
      EXPECT_EQ(be->memory_info().live, m0.live + a * 4 + b);
    }
    const Backend::MemoryInfo m1 = be->memory_info();
    EXPECT_EQ(m1.live, m0.live + a * 4);
    EXPECT_EQ(m1.peak, m0.live + a * 4 + b);
    be->reset_peak_memory();
    EXPECT_EQ(be->memory_info().peak, m1.live);
  }
  be->synchronize();
  EXPECT_EQ(be->memory_info().live, m0.live);
}

}  // namespace
}  // namespace dpo
