// CUDA runtime pieces: the per-device context and the error path. On a machine without a GPU every test here
// skips with the reason; ctest reports them as skipped, never as passed.
#include <gtest/gtest.h>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine"; \
  } while (0)

TEST(CudaRuntime, ContextCreatesStreamHandlesAndWorkspace) {
  DPO_REQUIRE_GPU();
  CudaContext ctx(0);
  EXPECT_NE(ctx.stream(), nullptr);
  EXPECT_NE(ctx.cublaslt(), nullptr);
  EXPECT_NE(ctx.workspace(), nullptr);
  EXPECT_GE(ctx.props().major, 7);
  auto buf = ctx.alloc(1 << 20);
  EXPECT_EQ(buf->device().kind, DeviceKind::CUDA);
  // Round trip through the device.
  std::vector<float> h(256), back(256, -1.f);
  for (int i = 0; i < 256; ++i) h[i] = 0.5f * static_cast<float>(i) - 3.f;
  DPO_CUDA_CHECK(cudaMemcpyAsync(buf->data(), h.data(), 1024, cudaMemcpyHostToDevice, ctx.stream()));
  DPO_CUDA_CHECK(cudaMemcpyAsync(back.data(), buf->data(), 1024, cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  EXPECT_EQ(h, back);
}

TEST(CudaRuntime, ErrorsNameLibraryStatementAndDevice) {
  DPO_REQUIRE_GPU();
  CudaContext ctx(0);
  void* p = nullptr;
  try {
    DPO_CUDA_CHECK(cudaMalloc(&p, size_t{1} << 62));  // 4 EiB: always fails
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("CUDA error cudaErrorMemoryAllocation"), std::string::npos) << m;
    EXPECT_NE(m.find("cudaMalloc(&p, size_t{1} << 62)"), std::string::npos) << m;
    EXPECT_NE(m.find("device 0"), std::string::npos) << m;
  }
  cudaGetLastError();  // clear the sticky-free error state for later tests
}

TEST(CudaRuntime, InvalidDeviceIsAClearError) {
  DPO_REQUIRE_GPU();
  EXPECT_THROW(CudaContext(CudaContext::device_count() + 7), Error);
}

}  // namespace
}  // namespace dpo
