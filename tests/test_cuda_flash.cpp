// The flash attention forward and backward on the GPU (kernels/flash_attention.h) against the blocked CPU kernel, in
// the cases and budgets the host emulation is checked with (tests/flash_test_cases.h): head dims 64 and 128, T = 1,
// 17, 64, 100, 257, 1024 and one T = 4096, grouped-query heads, padding, packed and prefix_shared spans; outputs
// poisoned (all bytes 0xFF: NaN) before the call; two calls must give the same bits (forward and backward; the
// backward also at T = 2048 and 4096); the backward's "+=" onto random old values. The key tiles a case needs are
// the tiles the host emulation visits (tests/test_flash_emulation.cpp), so here only the values are checked. The
// fp32 part of the budgets is doubled: the tensor cores' internal summation order is not the emulation's. Without a
// GPU every test skips with the reason.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "flash_test_cases.h"
#include "kernels/common.h"
#include "kernels/flash_attention.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "test_util.h"

namespace dpo {
namespace {

using flash_test::Inputs;

// A device copy of a host vector (cudaMalloc: 256-byte aligned), freed on destruction.
template <class T>
class DeviceVec {
 public:
  explicit DeviceVec(size_t n) : n_(n) {
    if (n_ > 0) DPO_CUDA_CHECK(cudaMalloc(&p_, n_ * sizeof(T)));
  }
  explicit DeviceVec(const std::vector<T>& h) : DeviceVec(h.size()) {
    if (n_ > 0) DPO_CUDA_CHECK(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceVec() {
    if (p_) cudaFree(p_);
  }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  T* get() const { return n_ > 0 ? p_ : nullptr; }
  void poison() {
    if (n_ > 0) DPO_CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T)));
  }
  void upload(const std::vector<T>& h) {
    if (n_ > 0) DPO_CUDA_CHECK(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> read() const {
    std::vector<T> h(n_);
    DPO_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  size_t n_;
  T* p_ = nullptr;
};

class CudaFlash : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    ctx_ = std::make_unique<CudaContext>(0);
  }

  // Runs the kernel twice on poisoned outputs; checks the two results are bitwise equal and returns the first.
  void run_and_check(const Inputs& in, const std::string& name) {
    SCOPED_TRACE(name + " D=" + std::to_string(in.D));
    DeviceVec<uint16_t> qkv(in.qkv), q(in.q), k(in.k), v(in.v);
    DeviceVec<int32_t> span(in.span);
    DeviceVec<uint16_t> out(static_cast<size_t>(in.B * in.T * in.C()));
    DeviceVec<float> lse(static_cast<size_t>(in.B * in.NH * in.T));
    const flash::Params p =
        flash_test::params_for(in, qkv.get(), q.get(), k.get(), v.get(), out.get(), lse.get(), span.get());
    std::vector<uint16_t> out1;
    std::vector<float> lse1;
    for (int rep = 0; rep < 2; ++rep) {
      out.poison();
      lse.poison();
      flash::flash_attention_forward(*ctx_, p);
      DPO_CUDA_CHECK(cudaStreamSynchronize(ctx_->stream()));
      if (rep == 0) {
        out1 = out.read();
        lse1 = lse.read();
      } else {
        EXPECT_EQ(out.read(), out1) << "two calls gave different out";
        const auto lse2 = lse.read();
        EXPECT_EQ(std::memcmp(lse2.data(), lse1.data(), lse1.size() * sizeof(float)), 0) << "two calls: lse";
      }
    }
    flash_test::expect_within_budget(in, flash_test::oracle(in), out1, lse1, /*slack=*/2.0);
  }

  // The forward, then the backward twice on poisoned gradients and workspace (Overwrite; the two results must be
  // bitwise equal), checked against the oracle; then Accumulate onto random old values. check_values = false: only
  // the two-run comparison (long rows, where the double-precision budget costs minutes on the host).
  void run_backward_and_check(const Inputs& in, const std::string& name, std::mt19937_64& g,
                              bool check_values = true) {
    SCOPED_TRACE(name + " D=" + std::to_string(in.D) + " (backward)");
    const std::vector<uint16_t> dout_h = flash_test::rand_bf16(g, in.B * in.T * in.C());
    std::vector<float> dout_ref(dout_h.size());
    for (size_t i = 0; i < dout_h.size(); ++i) dout_ref[i] = flash_test::from_bf16(dout_h[i]);
    DeviceVec<uint16_t> qkv(in.qkv), q(in.q), k(in.k), v(in.v), dout(dout_h);
    DeviceVec<int32_t> span(in.span);
    DeviceVec<uint16_t> out(static_cast<size_t>(in.B * in.T * in.C()));
    DeviceVec<float> lse(static_cast<size_t>(in.B * in.NH * in.T)), delta(static_cast<size_t>(in.B * in.NH * in.T));
    const flash::Params fp =
        flash_test::params_for(in, qkv.get(), q.get(), k.get(), v.get(), out.get(), lse.get(), span.get());
    flash::flash_attention_forward(*ctx_, fp);
    const flash_test::Grads shape = flash_test::make_grads(in, 0);
    DeviceVec<uint16_t> dqkv(shape.dqkv.size()), dq(shape.dq.size()), dk(shape.dk.size()), dv(shape.dv.size());
    const auto params = [&](GradWrite w) {
      return flash_test::backward_params_for(in, qkv.get(), q.get(), k.get(), v.get(), out.get(), dout.get(),
                                             lse.get(), span.get(), dqkv.get(), dq.get(), dk.get(), dv.get(),
                                             delta.get(), w);
    };
    const auto read = [&] {
      flash_test::Grads r;
      r.dqkv = dqkv.read(), r.dq = dq.read(), r.dk = dk.read(), r.dv = dv.read();
      return r;
    };
    flash_test::Grads first;
    for (int rep = 0; rep < 2; ++rep) {
      for (auto* d : {&dqkv, &dq, &dk, &dv}) d->poison();
      delta.poison();
      flash::flash_attention_backward(*ctx_, params(GradWrite::Overwrite));
      DPO_CUDA_CHECK(cudaStreamSynchronize(ctx_->stream()));
      if (rep == 0) {
        first = read();
      } else {
        const flash_test::Grads second = read();
        EXPECT_TRUE(first.dqkv == second.dqkv && first.dq == second.dq && first.dk == second.dk &&
                    first.dv == second.dv)
            << "two backward calls gave different gradients";
      }
    }
    if (!check_values) return;
    flash_test::Result ref_fwd = flash_test::oracle(in);
    const std::vector<float> ref = flash_test::backward_oracle(in, dout_ref, ref_fwd);
    flash_test::expect_backward_within_budget(in, dout_ref, ref_fwd, ref, first, nullptr, /*slack=*/2.0);
    flash_test::Grads old = shape;
    for (auto* h : {&old.dqkv, &old.dq, &old.dk, &old.dv})
      *h = flash_test::rand_bf16(g, static_cast<int64_t>(h->size()));
    dqkv.upload(old.dqkv), dq.upload(old.dq), dk.upload(old.dk), dv.upload(old.dv);
    flash::flash_attention_backward(*ctx_, params(GradWrite::Accumulate));
    DPO_CUDA_CHECK(cudaStreamSynchronize(ctx_->stream()));
    flash_test::expect_backward_within_budget(in, dout_ref, ref_fwd, ref, read(), &old, /*slack=*/2.0);
  }

  std::unique_ptr<CudaContext> ctx_;
};

TEST_F(CudaFlash, ForwardHeadDim64MatchesBlockedCpu) {
  std::mt19937_64 g(test::test_seed());
  for (auto& c : flash_test::standard_cases(g, 64, /*long_t=*/true)) run_and_check(c.in, c.name);
}

TEST_F(CudaFlash, ForwardHeadDim128MatchesBlockedCpu) {
  std::mt19937_64 g(test::test_seed());
  for (auto& c : flash_test::standard_cases(g, 128, /*long_t=*/true)) run_and_check(c.in, c.name);
}

TEST_F(CudaFlash, ForwardLongRowT4096) {
  std::mt19937_64 g(test::test_seed());
  run_and_check(flash_test::packed_inputs(g, 1, 4096, 2, 64), "causal T=4096");
}

TEST_F(CudaFlash, BackwardHeadDim64MatchesBlockedCpu) {
  std::mt19937_64 g(test::test_seed());
  for (auto& c : flash_test::standard_cases(g, 64, /*long_t=*/true)) run_backward_and_check(c.in, c.name, g);
}

TEST_F(CudaFlash, BackwardHeadDim128MatchesBlockedCpu) {
  std::mt19937_64 g(test::test_seed());
  for (auto& c : flash_test::standard_cases(g, 128, /*long_t=*/true)) run_backward_and_check(c.in, c.name, g);
}

TEST_F(CudaFlash, BackwardLongRowsAreBitwiseDeterministic) {
  std::mt19937_64 g(test::test_seed());
  run_backward_and_check(flash_test::grouped_inputs(g, 1, 4096, 4, 2, 64), "grouped T=4096", g, false);
  run_backward_and_check(flash_test::packed_inputs(g, 1, 2048, 2, 128), "causal T=2048", g, false);
}

TEST_F(CudaFlash, BadParamsAreErrorsBeforeAnyLaunch) {
  flash::Params p;  // all zero
  EXPECT_THROW(flash::flash_attention_forward(*ctx_, p), Error);
  flash::BackwardParams bp;
  EXPECT_THROW(flash::flash_attention_backward(*ctx_, bp), Error);
}

}  // namespace
}  // namespace dpo
