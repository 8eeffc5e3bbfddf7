// Backend::gather_rows / scatter_add_rows on CudaBackend (kernels/gather.cuh) against the CPU backend (the twins,
// kernels/gather.h), in F32 and BF16 (gather also I32). Both are exact operations (a copy; one addition per
// element in fp32, rounded once for BF16), so every check is bitwise. Seeded random inputs (BF16 tensors hold
// bf16-exact values, so both backends read the same numbers), gather outputs poisoned (all bytes 0xFF) before the
// call, scatter targets started from random values, row widths that are not multiples of a 16-byte group (C = 1, 3,
// 13, 769) and views at odd element offsets (every row at another 16-byte phase, so the scalar head, the 128-bit
// body and the tail all run), the LM head's real width (C = 768, n in the hundreds), and out-of-range entries (the
// documented all-one-bits row and no addition, never an out-of-bounds access). Without a GPU every test skips with
// the reason.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

class CudaGather : public ::testing::Test {
 public:
  void SetUp() override {
    if (CudaContext::device_count() == 0) GTEST_SKIP() << CudaContext::query_devices().message;
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
    gen_.seed(test::test_seed());
  }

  // A host tensor [rows, C] of dtype dt with random bf16-exact values (I32: random ids).
  Tensor random_host(int64_t rows, int64_t C, DType dt) {
    Tensor t = Tensor::host({rows, C}, dt == DType::I32 ? DType::I32 : DType::F64);
    std::normal_distribution<double> d(0.0, 1.0);
    std::uniform_int_distribution<int32_t> id(-5, 50256);
    for (int64_t i = 0; i < rows * C; ++i) {
      if (dt == DType::I32) t.data<int32_t>()[i] = id(gen_);
      else t.data<double>()[i] = d(gen_);
    }
    if (dt == DType::I32) return t;
    const Tensor b = convert_host(t, DType::BF16, "test input");  // bf16-exact values for both dtypes
    return dt == DType::BF16 ? b : convert_host(b, DType::F32, "test input");
  }
  // The device copy of h, `off` elements into a larger buffer (a view at another alignment phase).
  Tensor dev_at(const Tensor& h, int64_t off) {
    Tensor buf = gpu_->empty({h.numel() + off}, h.dtype());
    Tensor t = buf.view(off, h.shape());
    gpu_->copy_from_host(t, h);
    return t;
  }
  Tensor host_of(const Tensor& dev) {
    Tensor h = Tensor::host(dev.shape(), dev.dtype());
    gpu_->copy_to_host(h, dev);
    return h;
  }
  static std::vector<unsigned char> bytes(const Tensor& t) {
    const auto* p = static_cast<const unsigned char*>(t.raw());
    return std::vector<unsigned char>(p, p + t.nbytes());
  }
  Tensor idx_host(const std::vector<int32_t>& v) {
    Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, DType::I32);
    std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
    return t;
  }
  std::vector<int32_t> random_index(int64_t n, int64_t N) {
    std::vector<int32_t> all(static_cast<size_t>(N));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), gen_);
    all.resize(static_cast<size_t>(n));
    return all;
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::mt19937_64 gen_;
};

TEST_F(CudaGather, GatherIsBitwiseTheTwin) {
  for (DType dt : {DType::F32, DType::BF16, DType::I32})
    for (int64_t C : {1, 3, 13, 768, 769})
      for (int64_t off : {0, 1, 3}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " C=" + std::to_string(C) + " offset " + std::to_string(off));
        const int64_t N = 611, n = 263;
        const Tensor inp = random_host(N, C, dt);
        const Tensor idx = idx_host(random_index(n, N));
        Tensor want = Tensor::host({n, C}, dt);
        cpu_->gather_rows(want, inp, idx);
        Tensor poisoned = Tensor::host({n, C}, dt);
        std::memset(poisoned.raw(), 0xFF, static_cast<size_t>(poisoned.nbytes()));
        const Tensor out = dev_at(poisoned, off + 1);  // out and inp at different phases
        gpu_->gather_rows(out, dev_at(inp, off), dev_at(idx, 0));
        EXPECT_EQ(bytes(host_of(out)), bytes(want));
      }
}

TEST_F(CudaGather, ScatterAddIsBitwiseTheTwin) {
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t C : {1, 3, 13, 768, 769})
      for (int64_t off : {0, 1, 5}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " C=" + std::to_string(C) + " offset " + std::to_string(off));
        const int64_t N = 611, n = 263;
        const Tensor dinp = random_host(N, C, dt), dout = random_host(n, C, dt);
        const Tensor idx = idx_host(random_index(n, N));
        const Tensor d_dev = dev_at(dinp, off);
        gpu_->scatter_add_rows(d_dev, dev_at(dout, off + 2), dev_at(idx, 0));
        cpu_->scatter_add_rows(dinp, dout, idx);  // rows no entry names stay as they were on both
        EXPECT_EQ(bytes(host_of(d_dev)), bytes(dinp));
      }
}

// The compacted LM head's use: a scatter into zeros stores the rows exactly (gathering them back gives dout), and
// two runs give the same bits (deterministic: no atomics, distinct rows).
TEST_F(CudaGather, ScatterIntoZerosThenAgainIsDeterministic) {
  const int64_t N = 2 * 463, n = 300, C = 768;
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor dout = random_host(n, C, dt);
    const Tensor idx = idx_host(random_index(n, N));
    Tensor a = gpu_->zeros({N, C}, dt), b = gpu_->zeros({N, C}, dt);
    const Tensor dd = dev_at(dout, 0), id = dev_at(idx, 0);
    gpu_->scatter_add_rows(a, dd, id);
    gpu_->scatter_add_rows(b, dd, id);
    EXPECT_EQ(bytes(host_of(a)), bytes(host_of(b)));
    Tensor back = gpu_->empty({n, C}, dt);
    gpu_->gather_rows(back, a, id);
    EXPECT_EQ(bytes(host_of(back)), bytes(dout));
  }
}

// Out-of-range entries (not checked on the GPU): the gathered row is all-one bits, the scatter adds nothing, and
// the in-range entries are unaffected.
TEST_F(CudaGather, OutOfRangeEntriesArePoisonedOrSkipped) {
  const int64_t N = 50, C = 7;
  const Tensor inp = random_host(N, C, DType::F32);
  const std::vector<int32_t> v = {3, N, -1, 10, 1 << 30};
  const Tensor idx = dev_at(idx_host(v), 0);
  Tensor out = gpu_->zeros({5, C}, DType::F32);
  gpu_->gather_rows(out, dev_at(inp, 0), idx);
  const Tensor h = host_of(out);
  const auto* u = static_cast<const uint32_t*>(h.raw());
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const int32_t r = v[static_cast<size_t>(i)];
      if (r >= 0 && r < N) EXPECT_EQ(h.data<float>()[i * C + c], inp.data<float>()[r * C + c]);
      else EXPECT_EQ(u[i * C + c], 0xFFFFFFFFu) << "entry " << i;
    }
  const Tensor table = dev_at(inp, 0);
  gpu_->scatter_add_rows(table, dev_at(random_host(5, C, DType::F32), 0), idx);
  const Tensor t = host_of(table);
  for (int64_t r = 0; r < N; ++r)
    if (r != 3 && r != 10)
      for (int64_t c = 0; c < C; ++c) EXPECT_EQ(t.data<float>()[r * C + c], inp.data<float>()[r * C + c]) << r;
}

}  // namespace
}  // namespace dpo
