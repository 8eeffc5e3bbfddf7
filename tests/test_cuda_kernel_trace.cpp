// KernelTrace (runtime/kernel_trace.h) on a GPU. Known work goes through the CUDA backend under the trace: kernels
// whose names are fixed by kernels/*.cu (gelu_forward_kernel<float>, residual_forward_kernel<float>), memory sets
// (fill_zero is one cudaMemsetAsync) and device-to-device copies (copy is one cudaMemcpyAsync). The table must count
// exactly the calls made between start() and stop() (none of the identical calls made before start()), with positive
// times that fit inside the host-measured wall time, and shares summing to 1. Then: a second trace in the same
// process works, and two traces at once are refused with a message instead of mixing their records.
// Without a GPU every test skips with the reason.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/kernel_trace.h"

namespace dpo {
namespace {

#define DPO_REQUIRE_TRACE()                                                                  \
  do {                                                                                       \
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;  \
    std::string why_not;                                                                     \
    if (!KernelTrace::built(&why_not)) GTEST_SKIP() << "no kernel trace in this build: " << why_not; \
  } while (0)

// Starts `trace`. CUPTI takes one tracing client per process: when a CUDA tool is injected (Nsight Systems and
// Nsight Compute inject themselves through CUDA_INJECTION64_PATH) and CUPTI refuses, the test skips with CUPTI's
// message; otherwise a refusal is a failure.
#define DPO_START_TRACE(trace)                                                                        \
  do {                                                                                                \
    const std::string dpo_err_ = (trace).start();                                                     \
    if (!dpo_err_.empty() && std::getenv("CUDA_INJECTION64_PATH") != nullptr)                         \
      GTEST_SKIP() << "a CUDA tool is attached and CUPTI could not start: " << dpo_err_;              \
    ASSERT_TRUE(dpo_err_.empty()) << "CUPTI could not start: " << dpo_err_;                           \
  } while (0)

// The one row whose demangled name contains `needle`; nullptr (and a failure naming the rows) otherwise.
const KernelTableRow* row_with(const KernelTable& t, const std::string& needle) {
  const KernelTableRow* found = nullptr;
  int n = 0;
  for (const auto& r : t.rows)
    if (r.full_name.find(needle) != std::string::npos) found = &r, ++n;
  if (n != 1) {
    std::string names;
    for (const auto& r : t.rows) names += "\n  " + r.full_name;
    ADD_FAILURE() << n << " rows match '" << needle << "'; rows:" << names;
    return nullptr;
  }
  return found;
}

// 1000 003 elements (not a multiple of the 256-thread blocks): each kernel runs for microseconds, long enough to
// have a non-zero duration on the GPU clock.
constexpr int64_t kN = 1000003;

TEST(CudaKernelTrace, CountsExactlyTheTracedCalls) {
  DPO_REQUIRE_TRACE();
  auto be = make_cuda_backend(0);
  Tensor a = be->empty({kN}, DType::F32), b = be->empty({kN}, DType::F32), c = be->empty({kN}, DType::F32);
  be->fill_zero(a);
  be->fill_zero(b);
  // The same work before the trace: must not be counted.
  be->gelu_forward(c, a);
  be->residual_forward(c, a, b);
  be->copy(c, a);
  be->synchronize();

  KernelTrace trace;
  DPO_START_TRACE(trace);
  ASSERT_TRUE(trace.running());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) be->gelu_forward(c, a);
  for (int i = 0; i < 5; ++i) be->residual_forward(c, a, b);
  for (int i = 0; i < 4; ++i) be->fill_zero(b);
  for (int i = 0; i < 2; ++i) be->copy(c, a);
  be->synchronize();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const KernelTable t = trace.stop();
  EXPECT_FALSE(trace.running());

  for (const auto& w : t.warnings) ADD_FAILURE() << "warning: " << w;
  EXPECT_EQ(t.dropped_records, 0u);
  EXPECT_EQ(t.untimed_records, 0);
  ASSERT_EQ(t.rows.size(), 4u) << format_kernel_table(t);
  const KernelTableRow* gelu = row_with(t, "gelu_forward_kernel<float>");
  const KernelTableRow* res = row_with(t, "residual_forward_kernel<float>");
  const KernelTableRow* set = row_with(t, "[memset]");
  const KernelTableRow* cpy = row_with(t, "[memcpy DtoD]");
  ASSERT_TRUE(gelu && res && set && cpy);
  EXPECT_EQ(gelu->calls, 3);
  EXPECT_EQ(res->calls, 5);
  EXPECT_EQ(set->calls, 4);
  EXPECT_EQ(cpy->calls, 2);
  EXPECT_EQ(gelu->kind, GpuActivityKind::Kernel);
  EXPECT_EQ(gelu->name, "gelu_forward_kernel<float>");
  EXPECT_EQ(set->kind, GpuActivityKind::Memset);
  EXPECT_EQ(cpy->kind, GpuActivityKind::Memcpy);
  EXPECT_EQ(set->bytes, 4u * kN * sizeof(float));
  EXPECT_EQ(cpy->bytes, 2u * kN * sizeof(float));
  double share = 0;
  for (const auto& r : t.rows) {
    EXPECT_GT(r.total_ms, 0) << r.name;
    EXPECT_GT(r.mean_us, 0) << r.name;
    share += r.share;
  }
  EXPECT_NEAR(share, 1.0, 1e-12);
  EXPECT_GT(t.kernel_ms, 0);
  EXPECT_LT(t.kernel_ms, t.total_ms);
  // One stream, so the activities do not overlap: their summed time fits inside the wall time around them.
  EXPECT_LE(t.total_ms, wall_ms) << format_kernel_table(t);
}

TEST(CudaKernelTrace, RestartsAndRefusesTwoAtOnce) {
  DPO_REQUIRE_TRACE();
  auto be = make_cuda_backend(0);
  Tensor a = be->empty({kN}, DType::F32), c = be->empty({kN}, DType::F32);
  be->fill_zero(a);
  be->synchronize();
  for (int round = 1; round <= 2; ++round) {
    KernelTrace first, second;
    DPO_START_TRACE(first);
    const std::string refused = second.start();
    EXPECT_NE(refused.find("already running"), std::string::npos) << refused;
    EXPECT_FALSE(second.running());
    for (int i = 0; i < round; ++i) be->gelu_forward(c, a);
    be->synchronize();
    EXPECT_TRUE(second.stop().rows.empty());
    const KernelTable t = first.stop();
    const KernelTableRow* gelu = row_with(t, "gelu_forward_kernel<float>");
    ASSERT_TRUE(gelu) << "round " << round;
    EXPECT_EQ(gelu->calls, round);  // nothing carried over from the first round
  }
}

}  // namespace
}  // namespace dpo
