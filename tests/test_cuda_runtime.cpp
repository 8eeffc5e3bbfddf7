// CUDA runtime pieces: the per-device context and the error path. On a machine without a GPU every test here
// skips with the reason; ctest reports them as skipped, never as passed.
#include <gtest/gtest.h>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo {
namespace {

// device_count() throws (and so fails the test) when a GPU is there but unusable, e.g. a driver older than the
// toolkit: only a machine without a GPU skips.
#define DPO_REQUIRE_GPU()                                                                         \
  do {                                                                                            \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message; \
  } while (0)

// Runs everywhere: the query either finds devices or says why there are none, and only "no GPU" is a 0 from
// device_count(); any other CUDA error must carry the error's name.
TEST(CudaRuntime, DeviceQueryExplainsItself) {
  const CudaContext::DeviceQuery q = CudaContext::query_devices();
  ASSERT_FALSE(q.error_name.empty());
  ASSERT_FALSE(q.message.empty());
  if (q.count > 0) {
    EXPECT_EQ(q.error_name, "cudaSuccess");
    EXPECT_FALSE(q.no_gpu);
    EXPECT_EQ(CudaContext::device_count(), q.count);
  } else if (q.no_gpu) {
    EXPECT_NE(q.message.find("no CUDA device"), std::string::npos) << q.message;
    EXPECT_EQ(CudaContext::device_count(), 0);
  } else {
    EXPECT_NE(q.message.find(q.error_name), std::string::npos) << q.message;
    try {
      CudaContext::device_count();
      ADD_FAILURE() << "device_count() returned although the query failed: " << q.message;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(q.error_name), std::string::npos) << e.what();
    }
  }
}

#ifdef DPO_HAVE_CUDNN
// The context creates no cuDNN handle until one is asked for (a cuDNN that fails to load must break only its
// users), then keeps the one it made.
TEST(CudaRuntime, CudnnHandleIsCreatedOnFirstUse) {
  DPO_REQUIRE_GPU();
  CudaContext ctx(0);
  cudnnHandle_t h = ctx.cudnn();
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(ctx.cudnn(), h);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudnnGetStream(h, &s), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ(s, ctx.stream());
}
#endif

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
