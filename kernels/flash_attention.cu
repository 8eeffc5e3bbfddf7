// The flash attention forward and backward on the GPU (contract: kernels/flash_attention.h): the tile code of
// kernels/flash_tile.h and kernels/flash_tile_bwd.h with the device warp policy below (one thread is one lane; the
// warp instructions are the real ones). The host emulation (kernels/flash_emulation.h) runs the same tile code with
// the lanes emulated.
//
// Forward launch: one block of 128 threads (4 warps x 16 query rows) per (query block of 64, b, h); dynamic shared
// memory 2 x 64 x (D + 8) bf16 (18 KiB at D = 64, 34 KiB at D = 128: under the 48 KiB default, no opt-in needed).
// Registers per thread at D = 128: Q fragments 32, accumulators 64, scores 32, P fragments 16; ptxas (CUDA 13,
// sm_90) gives 243 registers at D = 128 and 146 at D = 64, no local memory (every loop over fragments unrolled).
//
// Backward launch, three kernels in stream order: the preprocess (one thread per (b, h, t), 256 per block); the
// dk/dv pass (128 threads per (key tile, kv head, b)); the dq pass (128 threads per (query block, h, b)). Both
// passes use 4 x 64 x (D + 8) bf16 of dynamic shared memory plus 20 bytes per query for the dk/dv pass's lse,
// delta and span (37 KiB at D = 64, 69 KiB at D = 128: the limit is raised with cudaFuncSetAttribute before the
// first launch). Registers, ptxas (CUDA 13, sm_90), no local memory in any: dk/dv pass 248 at D = 128 (dk and dv
// accumulators 128, one half block of scores and dP 32, P / dS fragments 8; the loop over the two halves is kept
// rolled) and 167 at D = 64; dq pass 204 at D = 128 and 168 at D = 64; preprocess 30.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "kernels/flash_attention.h"
#include "kernels/flash_tile.h"
#include "kernels/flash_tile_bwd.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"

namespace dpo::flash {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

struct DeviceWarp {
  template <class T, int N>
  struct Regs {
    T v[N];
    __device__ __forceinline__ T& operator()(int, int i) { return v[i]; }
    __device__ __forceinline__ const T& operator()(int, int i) const { return v[i]; }
  };

  template <class F>
  __device__ __forceinline__ static void warps(F&& f) {
    f(static_cast<int>(threadIdx.x >> 5), 0);
  }
  template <class F>
  __device__ __forceinline__ static void each(F&& f) {
    f(static_cast<int>(threadIdx.x & 31));
  }
  __device__ __forceinline__ static void sync() { __syncthreads(); }
  template <class F>
  __device__ __forceinline__ static bool any(F&& f) {
    return __any_sync(kFullMask, f(static_cast<int>(threadIdx.x & 31))) != 0;
  }

  template <int NC, int NA, int NB>
  __device__ __forceinline__ static void mma(Regs<float, NC>& c, int ci, const Regs<uint32_t, NA>& a, int ai,
                                             const Regs<uint32_t, NB>& b, int bi) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c.v[ci]), "+f"(c.v[ci + 1]), "+f"(c.v[ci + 2]), "+f"(c.v[ci + 3])
        : "r"(a.v[ai]), "r"(a.v[ai + 1]), "r"(a.v[ai + 2]), "r"(a.v[ai + 3]), "r"(b.v[bi]), "r"(b.v[bi + 1]));
  }

  template <bool Trans, int N, class Addr>
  __device__ __forceinline__ static void ldmatrix_x4(Regs<uint32_t, N>& r, int ri, Addr&& addr) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(addr(static_cast<int>(threadIdx.x & 31))));
    if constexpr (Trans) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r.v[ri]), "=r"(r.v[ri + 1]), "=r"(r.v[ri + 2]), "=r"(r.v[ri + 3])
                   : "r"(s)
                   : "memory");
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r.v[ri]), "=r"(r.v[ri + 1]), "=r"(r.v[ri + 2]), "=r"(r.v[ri + 3])
                   : "r"(s)
                   : "memory");
    }
  }

  template <int N>
  __device__ __forceinline__ static void shfl_xor(const Regs<float, N>& x, int i, int mask, Regs<float, 1>& y) {
    y.v[0] = __shfl_xor_sync(kFullMask, x.v[i], mask);
  }

  __device__ __forceinline__ static float exp2(float x) { return exp2f(x); }
  __device__ __forceinline__ static float log(float x) { return logf(x); }
  __device__ __forceinline__ static uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo: the low 16 bits
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
  __device__ __forceinline__ static void copy16(uint16_t* dst, const uint16_t* src) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
  __device__ __forceinline__ static void zero16(uint16_t* dst) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  __device__ __forceinline__ static void store_u32(uint16_t* dst, uint32_t v) {
    *reinterpret_cast<uint32_t*>(dst) = v;
  }
  __device__ __forceinline__ static uint32_t load_u32(const uint16_t* src) {
    return *reinterpret_cast<const uint32_t*>(src);
  }
  __device__ __forceinline__ static float lo(uint32_t x) { return __uint_as_float(x << 16); }
  __device__ __forceinline__ static float hi(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }
};

template <int D>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(const Params p) {
  extern __shared__ __align__(16) uint16_t smem[];
  WarpRegs<DeviceWarp, D> regs[1];
  forward_block<DeviceWarp, D>(p, static_cast<int64_t>(blockIdx.x), smem, regs);
}

template <int D>
void launch(CudaContext& ctx, const Params& p) {
  const int64_t blocks = grid_blocks(p);
  if (blocks > INT32_MAX)
    throw Error("flash_attention_forward: " + std::to_string(blocks) + " blocks exceed the grid's x dimension");
  const size_t smem = static_cast<size_t>(smem_elems<D>()) * sizeof(uint16_t);
  flash_forward_kernel<D><<<static_cast<unsigned>(blocks), kThreads, smem, ctx.stream()>>>(p);
  DPO_CUDA_CHECK(cudaGetLastError());
}

constexpr int kDeltaThreads = 256;

__global__ void __launch_bounds__(kDeltaThreads) flash_backward_delta_kernel(const BackwardParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaThreads + threadIdx.x;
  if (row < backward_delta_rows(p)) backward_delta_row<DeviceWarp>(p, row);
}

template <int D>
__global__ void __launch_bounds__(kThreads) flash_dkdv_kernel(const BackwardParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  DkvRegs<DeviceWarp, D> regs[1];
  dkdv_block<DeviceWarp, D>(p, static_cast<int64_t>(blockIdx.x), smem, regs);
}

template <int D>
__global__ void __launch_bounds__(kThreads) flash_dq_kernel(const BackwardParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  DqRegs<DeviceWarp, D> regs[1];
  dq_block<DeviceWarp, D>(p, static_cast<int64_t>(blockIdx.x), smem, regs);
}

unsigned grid_x(int64_t blocks, const char* what) {
  if (blocks > INT32_MAX)
    throw Error(std::string("flash_attention_backward: ") + std::to_string(blocks) + " blocks of the " + what +
                " exceed the grid's x dimension");
  return static_cast<unsigned>(blocks);
}

template <int D>
void launch_backward(CudaContext& ctx, const BackwardParams& p) {
  const int64_t rows = backward_delta_rows(p);
  flash_backward_delta_kernel<<<grid_x((rows + kDeltaThreads - 1) / kDeltaThreads, "preprocess"), kDeltaThreads, 0,
                                ctx.stream()>>>(p);
  DPO_CUDA_CHECK(cudaGetLastError());
  // Above the 48 KiB default at D = 128 (bwd_smem_bytes: 70 KiB), so the limit is raised explicitly for both.
  const int smem = static_cast<int>(bwd_smem_bytes<D>());
  // Once per head dim and process (one device per process here): the first call runs eagerly, before any CUDA
  // graph captures a step (train/trainer.cpp captures a shape's second micro-batch), so the attribute call never
  // falls inside a capture.
  static const bool smem_raised = [smem] {
    DPO_CUDA_CHECK(cudaFuncSetAttribute(flash_dkdv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    DPO_CUDA_CHECK(cudaFuncSetAttribute(flash_dq_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)smem_raised;
  flash_dkdv_kernel<D><<<grid_x(dkdv_grid_blocks(p), "dk/dv pass"), kThreads, smem, ctx.stream()>>>(p);
  DPO_CUDA_CHECK(cudaGetLastError());
  flash_dq_kernel<D><<<grid_x(dq_grid_blocks(p), "dq pass"), kThreads, smem, ctx.stream()>>>(p);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void flash_attention_backward(CudaContext& ctx, const BackwardParams& p) {
  check_backward_params(p, "flash_attention_backward");
  if (p.head_dim == 64)
    launch_backward<64>(ctx, p);
  else
    launch_backward<128>(ctx, p);
}

void flash_attention_forward(CudaContext& ctx, const Params& p) {
  check_params(p, "flash_attention_forward");
  if (p.head_dim == 64)
    launch<64>(ctx, p);
  else
    launch<128>(ctx, p);
}

}  // namespace dpo::flash
