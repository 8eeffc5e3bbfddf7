// The flash attention forward on the GPU (kernels/flash_attention.h, flash::flash_attention_forward) against the
// blocked CPU kernel, in the cases and budgets the host emulation is checked with (tests/flash_test_cases.h): head
// dims 64 and 128, T = 1, 17, 64, 100, 257, 1024 and one T = 4096, grouped-query heads, padding, packed and
// prefix_shared spans; outputs poisoned (all bytes 0xFF: NaN) before the call; two calls must give the same bits;
// the key tiles a case needs are the tiles the host emulation visits (tests/test_flash_emulation.cpp), so here only
// the values are checked. The fp32 part of the budgets is doubled: the tensor cores' internal summation order is not
// the emulation's. Without a GPU every test skips with the reason.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "flash_test_cases.h"
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
  void poison() { DPO_CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T))); }
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

TEST_F(CudaFlash, BadParamsAreErrorsBeforeAnyLaunch) {
  flash::Params p;  // all zero
  EXPECT_THROW(flash::flash_attention_forward(*ctx_, p), Error);
}

}  // namespace
}  // namespace dpo
