// The Llama-family decoder on the GPU against HF transformers (tests/llama_fixture.h: the tiny fixtures of
// tests/fixtures/gen_llama.py), in F32 and BF16, and its backward twice bitwise. Skips without a GPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>

#include "llama_fixture.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo {
namespace {

using namespace llama_test;

// The same parity on the GPU (skipped without one). F32: the CUDA path is another float computation of the same
// functions (cuBLASLt GEMMs, warp reductions, fp32 statistics), whose distance to the exact result is of the CPU
// float model's order (a few 1e-6 here): 1e-4 as for the CPU and as tests/test_cuda_backend.cpp's GPT-2 bound.
// BF16 (parameters and activations rounded to 8-bit mantissas, unit roundoff 3.9e-3; F32 statistics, softmax and
// gradients): each of the ~10 roundings per layer adds up to 3.9e-3 relative, so logits and log-probs within a few
// 1e-2; 0.1 norm-wise still fails for a wrong rotation, grouping or norm (errors of order 1). The backward is run
// twice: bitwise the same gradients (no atomics in the Llama ops).
TEST(LlamaCuda, MatchesHfInF32AndBf16) {
  if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Result f = run(name, DType::F32, make_cuda_backend(0));
    EXPECT_LT(f.logits_err, 1e-4);
    EXPECT_LT(f.seq_err, 1e-4);
    EXPECT_LT(f.max_grad_err, 1e-4) << "worst parameter: " << f.worst_grad;
    const Result h = run(name, DType::BF16, make_cuda_backend(0));
    EXPECT_LT(h.logits_err, 0.1);
    EXPECT_LT(h.seq_err, 0.1);
    EXPECT_LT(h.max_grad_err, 0.25) << "worst parameter: " << h.worst_grad;  // as Bf16WithinItsRounding
    std::printf("%s CUDA vs HF float64: f32 logits %.2e seq %.2e grads %.2e; bf16 logits %.2e seq %.2e grads %.2e\n",
                name, f.logits_err, f.seq_err, f.max_grad_err, h.logits_err, h.seq_err, h.max_grad_err);
  }
  // Determinism: two backward passes of the same batch give bitwise the same gradients.
  Fixture fx("llama_gqa");
  auto be = make_cuda_backend(0);
  auto model = load_gpt2_checkpoint(*be, fx.dir, DType::BF16);
  Tensor weights = be->empty({fx.B, fx.T}, DType::F32), seq = be->empty({fx.B}, DType::F32),
         dseq = be->empty({fx.B}, DType::F32);
  be->copy_from_host(weights, fx.weights64);
  fill(*be, dseq, 1.0);
  const Tensor tokens = to_backend(*be, fx.tokens), keymask = to_backend(*be, fx.keymask),
               targets = to_backend(*be, fx.targets);
  auto grads = [&]() {
    model->zero_grad();
    model->sequence_logprobs(tokens, keymask, targets, weights, seq);
    model->backward(dseq);
    Tensor h = Tensor::host({model->grads().numel()}, DType::F32);
    be->copy_to_host(h, model->grads());
    return h;
  };
  const Tensor g0 = grads(), g1 = grads();
  EXPECT_EQ(std::memcmp(g0.raw(), g1.raw(), static_cast<size_t>(g0.nbytes())), 0);
}

}  // namespace
}  // namespace dpo
