// CUDA graphs (Backend::capture, the trainer's cuda_graphs): a capture runs nothing, a replay runs exactly the
// recorded kernels (bitwise what running the function gives), a capture that synchronises fails cleanly and leaves
// the backend usable, the model's captured micro-batch (chunked LM head with the loss on the device, then the
// backward) replays bitwise for several shapes in turn, and a training run with cuda_graphs gives bitwise the
// weights of one without. Skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "model/gpt2.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/cuda_context.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/config.h"
#include "train/loss.h"
#include "train/trainer.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

Tensor put(Backend& be, const Tensor& host, DType dtype) {
  Tensor t = be.empty(host.shape(), dtype);
  be.copy_from_host(t, host);
  return t;
}

std::vector<double> get(Backend& be, const Tensor& t) { return to_host_f64(be, t); }

Tensor host_randn(std::mt19937_64& g, Shape s, double scale) {
  Tensor t = Tensor::host(s, DType::F64);
  std::normal_distribution<double> d(0.0, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = d(g);
  return t;
}

void poison(Backend& be, const Tensor& t) {
  ASSERT_EQ(cudaMemsetAsync(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()),
                            static_cast<cudaStream_t>(be.native_stream())),
            cudaSuccess);
}

// Elementwise ops at an odd size: nothing runs at capture; each replay computes from the inputs' contents at that
// time, bitwise as the ops run directly.
TEST(CudaGraphs, CaptureRunsNothingAndReplayIsBitwiseTheOps) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  auto be = make_cuda_backend(0);
  const int64_t n = 10007;
  for (DType dt : {DType::F32, DType::BF16}) {
    const Tensor x = put(*be, host_randn(g, {n}, 2.0), dt), y = put(*be, host_randn(g, {n}, 1.0), dt);
    const Tensor h = be->empty({n}, dt), out = be->empty({n}, dt), want = be->empty({n}, dt);
    poison(*be, out);
    auto work = [&] {
      be->gelu_forward(h, x);
      be->residual_forward(out, h, y);
    };
    auto graph = be->capture(work);
    const std::vector<double> before = get(*be, out);
    for (double v : before) ASSERT_TRUE(std::isnan(v)) << "the capture ran the work";
    for (int round = 0; round < 2; ++round) {
      if (round == 1) be->copy_from_host(x, host_randn(g, {n}, 3.0));  // new contents: the replay reads them
      graph->replay();
      const std::vector<double> got = get(*be, out);
      be->gelu_forward(h, x);
      be->residual_forward(want, h, y);
      EXPECT_EQ(got, get(*be, want)) << dtype_name(dt) << " round " << round;
    }
  }
}

// A function that waits for the device cannot be captured: GraphCaptureError, nothing ran, and the stream works
// afterwards.
TEST(CudaGraphs, ASynchronisingCaptureFailsCleanly) {
  DPO_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  const Tensor a = be->empty({257}, DType::F32);
  poison(*be, a);
  Tensor host = Tensor::host({257}, DType::F32);
  EXPECT_THROW(be->capture([&] {
    be->fill_zero(a);
    be->copy_to_host(host, a);
  }),
               GraphCaptureError);
  for (double v : get(*be, a)) ASSERT_TRUE(std::isnan(v)) << "the failed capture ran the work";
  be->fill_zero(a);
  for (double v : get(*be, a)) ASSERT_EQ(v, 0.0);
}

GPT2Config small_config() {
  GPT2Config c;
  c.vocab_size = 97;
  c.max_seq_len = 24;
  c.n_embd = 48;
  c.n_head = 3;
  c.n_layer = 2;
  return c;
}

// The trainer's graph body (GPT2::fused_forward_pairs + fused_backward) for two shapes in turn, each run eagerly
// once and then captured and replayed: every replay's gradients, sums and statistics are bitwise those of an eager
// run on the same inputs. The shapes alternate, so a replay after the other shape's run also checks that no
// buffer moved (buffers_generation stays put once the larger shape has run).
TEST(CudaGraphs, ModelMicroBatchReplaysBitwiseAcrossShapes) {
  DPO_REQUIRE_GPU();
  std::mt19937_64 g(test::test_seed());
  auto be = make_cuda_backend(0);
  const GPT2Config cfg = small_config();
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    GPT2 m(*be, cfg, dt);
    be->copy_from_host(m.master_params(), host_randn(g, {m.master_params().numel()}, 0.2));
    m.sync_params();
    m.set_logits_chunk_rows(2 * 13);  // several chunks of pairs
    LossConfig lc;
    lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.2}};
    struct Shape2 {
      int64_t P, T;
      Tensor tokens, keymask, targets, weights, ref, sums, stats;
      std::unique_ptr<Backend::Graph> graph;
    };
    std::vector<Shape2> shapes(2);
    shapes[0].P = 4, shapes[0].T = 13;
    shapes[1].P = 3, shapes[1].T = 9;
    for (Shape2& s : shapes) {
      const test::PaddedBatch in = test::make_padded_batch(g, cfg.vocab_size, 2 * s.P, s.T);
      s.tokens = put(*be, in.tokens, DType::I32);
      s.keymask = put(*be, in.keymask, DType::I32);
      s.targets = put(*be, in.targets, DType::I32);
      s.weights = put(*be, in.weights, DType::F32);
      Tensor r = Tensor::host({2 * s.P}, DType::F64);
      for (int64_t i = 0; i < 2 * s.P; ++i) r.data<double>()[i] = -20.0 - static_cast<double>(i);
      s.ref = put(*be, r, DType::F32);
      s.sums = be->empty({kPairSumsWidth}, DType::F64);
      s.stats = be->empty({2 * s.P, kSeqStatsWidth}, DType::F32);
    }
    auto work = [&](Shape2& s) {
      GPT2::PairLossHead head;
      head.ref_logp = s.ref;
      head.params = pair_loss_params(lc);
      head.normalizer = 2.0 * s.P;
      head.sums = s.sums;
      head.stats = s.stats;
      m.fused_forward_pairs(s.tokens, s.keymask, s.targets, s.weights, head);
      m.fused_backward();
    };
    auto outputs = [&](Shape2& s) {
      std::vector<double> o = get(*be, m.grads());
      for (double v : get(*be, s.sums)) o.push_back(v);
      for (double v : get(*be, s.stats)) o.push_back(v);
      return o;
    };
    std::vector<std::vector<double>> eager(2);
    for (int i = 0; i < 2; ++i) {  // eager runs size the buffers
      m.zero_grad();
      work(shapes[static_cast<size_t>(i)]);
      eager[static_cast<size_t>(i)] = outputs(shapes[static_cast<size_t>(i)]);
    }
    const int64_t gen = m.buffers_generation();
    for (Shape2& s : shapes) s.graph = be->capture([&, p = &s] { work(*p); });
    EXPECT_EQ(m.buffers_generation(), gen) << "a capture allocated model buffers";
    for (int round = 0; round < 3; ++round)
      for (int i : {1, 0}) {
        Shape2& s = shapes[static_cast<size_t>(i)];
        m.zero_grad();
        poison(*be, s.sums);
        poison(*be, s.stats);
        s.graph->replay();
        EXPECT_EQ(outputs(s), eager[static_cast<size_t>(i)]) << "shape " << i << ", round " << round;
      }
    double norm = 0;
    for (size_t k = 0; k < 100 && k < eager[0].size(); ++k) norm += eager[0][k] * eager[0][k];
    EXPECT_GT(norm, 0.0);
  }
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A DPO run on the GPU with cuda_graphs on gives bitwise the weights of the same run with it off (the shapes repeat
// through pad_to_multiple_of, so graphs are captured and replayed), in fp32 and bf16.
TEST(CudaGraphs, TrainingWithGraphsIsBitwiseTrainingWithout) {
  DPO_REQUIRE_GPU();
  test::ScratchDir w("dpo_cuda_graphs_");
  test::write_tiny_fixture(w.dir.string(), 22);
  for (const char* precision : {"fp32", "bf16"}) {
    SCOPED_TRACE(precision);
    TrainConfig a;
    a.model = w / "base";
    a.train_file = w / "pref.jsonl";
    a.ref_cache_dir = w / "cache";
    a.device = "cuda";
    a.precision = precision;
    a.max_length = 32;
    a.pad_to_multiple_of = 32;
    a.learning_rate = 1e-2;
    a.per_device_train_batch_size = 4;
    a.gradient_accumulation_steps = 2;
    a.num_train_epochs = 3;
    a.logging_steps = 1;
    a.seed = 7;
    a.cuda_graphs = false;
    a.out_dir = w / (std::string("eager_") + precision);
    TrainConfig b = a;
    b.cuda_graphs = true;
    b.out_dir = w / (std::string("graphs_") + precision);
    RunOptions ro;
    ro.quiet = true;
    const RunSummary ra = run_training(a, RunKind::Dpo, ro);
    const RunSummary rb = run_training(b, RunKind::Dpo, ro);
    ASSERT_EQ(ra.steps, rb.steps);
    const std::string fa = slurp(ra.final_checkpoint + "/model.safetensors");
    ASSERT_FALSE(fa.empty());
    EXPECT_TRUE(fa == slurp(rb.final_checkpoint + "/model.safetensors"));
    EXPECT_EQ(ra.last_log.at("loss"), rb.last_log.at("loss"));
  }
}

}  // namespace
}  // namespace dpo
