#include "kernels/encoder.cuh"

#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include <string>

#include "kernels/bf16.cuh"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;  // forward: rows (b,t) per block, one warp each
constexpr int kChannelTile = 128;  // dwte: channels per block (threads per block)
constexpr int kRange = kChannelTile;  // dwte: sorted positions whose segments one block sums (one flag per thread)
static_assert(kRange <= kChannelTile, "each sorted position of a range gets its flag from one thread");

static unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

// One warp per row (b,t): out row = wte row + wpe row, split on its own (kernels/bf16.cuh) since the three row
// addresses depend on the token, the position and C. The position is t, or pos[bt] when pos is given (P: the rows
// of wpe). A token outside [0, V) or a position outside [0, P) gives a NaN row. wpe == nullptr: no position
// embedding, out row = wte row (pos and P unused).
template <class T>
static __global__ void encoder_forward_kernel(T* out, const int32_t* tokens, const int32_t* pos, const T* wte,
                                              const T* wpe, int64_t BT, int64_t T_, int64_t C, int64_t V,
                                              int64_t P) {
  constexpr int G = 16 / sizeof(T);
  const int64_t bt = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (bt >= BT) return;
  const int64_t tok = tokens[bt];
  const int64_t p = wpe == nullptr ? 0 : pos ? static_cast<int64_t>(pos[bt]) : bt % T_;
  T* o = out + bt * C;
  if (tok < 0 || tok >= V || (wpe != nullptr && (p < 0 || p >= P))) {
    const T nan = from_float<T>(__int_as_float(0x7fffffff));
    for (int64_t c = lane; c < C; c += kWarpSize) o[c] = nan;
    return;
  }
  const T* we = wte + tok * C;
  if (wpe == nullptr) {  // a copy of the row (to_float / from_float<T> are exact round trips)
    const VecView views[] = {{o, sizeof(T)}, {we, sizeof(T)}};
    const int64_t head = vec_head(C, G, views, 2);
    split_loop<G>(
        lane, kWarpSize, C, head, [&](int64_t c) { o[c] = we[c]; },
        [&](int64_t c) { store_pack<G>(o, c, load_pack<G>(we, c)); });
    return;
  }
  const T* pe = wpe + p * C;
  const VecView views[] = {{o, sizeof(T)}, {we, sizeof(T)}, {pe, sizeof(T)}};
  const int64_t head = vec_head(C, G, views, 3);
  split_loop<G>(
      lane, kWarpSize, C, head, [&](int64_t c) { o[c] = from_float<T>(to_float(we[c]) + to_float(pe[c])); },
      [&](int64_t c) {
        const Pack<T, G> x = load_pack<G>(we, c), y = load_pack<G>(pe, c);
        Pack<T, G> z;
#pragma unroll
        for (int j = 0; j < G; ++j) z.e[j] = from_float<T>(to_float(x.e[j]) + to_float(y.e[j]));
        store_pack<G>(o, c, z);
      });
}

// One thread per (t,c); sums b = 0..B-1 in order into dwpe[t,c] (the CPU twin's order).
template <class T>
static __global__ void encoder_backward_wpe_kernel(float* dwpe, const T* dout, int64_t B, int64_t T_, int64_t C) {
  const int64_t n = T_ * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc = dwpe[i];
    for (int64_t b = 0; b < B; ++b) acc += to_float(dout[b * T_ * C + i]);  // dout[b,t,c], (b*T + t)*C + c
    dwpe[i] = acc;
  }
}

// --- dst[idx[i]] += dout[i] by sorting: dwte (idx = tokens, V rows) and, with positions, dwpe (idx = pos, P rows) --
// keys[i] = idx[i] (V for an id outside [0, V): sorted last and skipped), vals[i] = i. A stable sort by key then
// lists each id's slots in ascending order: the id's "run" [run_start, run_end) of the sorted arrays. V here is the
// number of rows of dst, K the segment length (kernels/encoder.cuh).

static __global__ void encoder_sort_input_kernel(uint32_t* keys, int32_t* vals, const int32_t* idx, int64_t BT,
                                                 int64_t V) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BT; i += stride) {
    const int64_t id = idx[i];
    keys[i] = static_cast<uint32_t>(id >= 0 && id < V ? id : V);
    vals[i] = static_cast<int32_t>(i);
  }
}

// First index in sorted keys[0, n) whose key is >= x (lower) or > x (upper).
static __device__ int64_t bound(const uint32_t* keys, int64_t n, uint32_t x, bool upper) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < x || (upper && keys[mid] == x)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The slot of a segment of a long run in the partials (see encoder.cuh): 2 * (start / K) + (full length ? 1 : 0).
// In one aligned block of K sorted positions at most two segments of long runs start, and then the first is the
// short last segment of one run and the second the full first segment of the next, so slots never collide.
static __device__ __forceinline__ int64_t segment_slot(int64_t start, int64_t len, int64_t K) {
  return 2 * (start / K) + (len == K ? 1 : 0);
}

// Block (j, tile) sums every segment that starts at a sorted position in [j*kRange, (j+1)*kRange), for its tile of
// channels. A segment is [s, min(s + K, run_end)) with s = run_start + m*K. A run of at most K positions is one
// segment, added onto dst in the twin's order (bitwise the twin); a longer run's segments go, summed from 0, to
// their partial slots for encoder_backward_combine_kernel. The flags come from one binary-search pair per thread;
// the segment loop is uniform over the block.
template <class T>
static __global__ void encoder_backward_segments_kernel(float* dst, float* partial, const T* dout,
                                                        const uint32_t* keys, const int32_t* slot, int64_t BT,
                                                        int64_t C, int64_t V, int64_t K) {
  __shared__ int64_t s_end[kRange];  // run end of the segment starting at this position, or -1 when none starts
  __shared__ int64_t s_len[kRange];  // its run's length
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRange;
  if (threadIdx.x < kRange) {
    const int64_t i = i0 + threadIdx.x;
    int64_t end = -1, len = 0;
    if (i < BT && keys[i] < static_cast<uint64_t>(V)) {
      const int64_t rs = bound(keys, BT, keys[i], false), re = bound(keys, BT, keys[i], true);
      if ((i - rs) % K == 0) {
        end = re;
        len = re - rs;
      }
    }
    s_end[threadIdx.x] = end;
    s_len[threadIdx.x] = len;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kChannelTile + threadIdx.x;
  if (c >= C) return;  // no barrier below
  for (int k = 0; k < kRange; ++k) {
    if (s_end[k] < 0) continue;
    const int64_t s = i0 + k;
    const int64_t e = s + K < s_end[k] ? s + K : s_end[k];
    const int64_t v = keys[s];
    const bool whole_run = s_len[k] <= K;
    float acc = whole_run ? dst[v * C + c] : 0.0f;
    // Unrolled so that several rows' loads are in flight ahead of the (serial, ordered) adds.
#pragma unroll 8
    for (int64_t q = s; q < e; ++q) acc += to_float(dout[static_cast<int64_t>(slot[q]) * C + c]);
    if (whole_run) dst[v * C + c] = acc;
    else partial[segment_slot(s, e - s, K) * C + c] = acc;
  }
}

// Block (j, tile): for every run longer than K that starts at a sorted position in [j*kRange, (j+1)*kRange),
// dst[v, c] += its segments' partials, in segment order.
static __global__ void encoder_backward_combine_kernel(float* dst, const float* partial, const uint32_t* keys,
                                                       int64_t BT, int64_t C, int64_t V, int64_t K) {
  __shared__ int64_t s_end[kRange];  // run end when a run longer than K starts here, else -1
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRange;
  if (threadIdx.x < kRange) {
    const int64_t i = i0 + threadIdx.x;
    int64_t end = -1;
    if (i < BT && keys[i] < static_cast<uint64_t>(V) && (i == 0 || keys[i - 1] != keys[i])) {
      const int64_t re = bound(keys, BT, keys[i], true);
      if (re - i > K) end = re;
    }
    s_end[threadIdx.x] = end;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kChannelTile + threadIdx.x;
  if (c >= C) return;
  for (int k = 0; k < kRange; ++k) {
    const int64_t re = s_end[k];
    if (re < 0) continue;
    const int64_t v = keys[i0 + k];
    float acc = dst[v * C + c];
    for (int64_t s = i0 + k; s < re; s += K) {
      const int64_t len = re - s < K ? re - s : K;
      acc += partial[segment_slot(s, len, K) * C + c];
    }
    dst[v * C + c] = acc;
  }
}

template <class T>
static void encoder_forward_impl(CudaContext& ctx, T* out, const int32_t* tokens, const int32_t* pos, const T* wte,
                                 const T* wpe, int64_t B, int64_t T_, int64_t C, int64_t V, int64_t P) {
  DPO_NVTX_RANGE(pos ? "encoder_forward_pos" : "encoder_forward");
  if (B * T_ * C <= 0) return;
  const int64_t blocks = (B * T_ + kWarpsPerBlock - 1) / kWarpsPerBlock;
  DPO_ASSERT(blocks <= INT32_MAX, "encoder_forward: B*T = " + std::to_string(B * T_) + " exceeds one launch");
  encoder_forward_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, ctx.stream()>>>(
      out, tokens, pos, wte, wpe, B * T_, T_, C, V, P);
  DPO_CUDA_CHECK(cudaGetLastError());
}

// dst[idx[i], :] += dout[i, :] over the BT slots, for ids in [0, V) (others skipped), with segments of K slots
// (kernels/encoder.cuh, "dwte").
template <class T>
static void sorted_row_sums(CudaContext& ctx, float* dst, const T* dout, const int32_t* idx, int64_t BT, int64_t C,
                            int64_t V, int64_t K) {
  DPO_ASSERT(BT <= INT32_MAX && V < INT32_MAX,
             "encoder_backward: B*T = " + std::to_string(BT) + ", rows = " + std::to_string(V) + " exceed one sort");
  const int64_t ranges = (BT + kRange - 1) / kRange;
  const int64_t channel_tiles = (C + kChannelTile - 1) / kChannelTile;
  DPO_ASSERT(ranges <= INT32_MAX && channel_tiles <= 65535,
             "encoder_backward: B*T = " + std::to_string(BT) + ", C = " + std::to_string(C) + " exceed one launch");
  // Scratch, stream-ordered (freed after the launches below): sort input and output (separate allocations, each
  // aligned as the allocator aligns), the sort's workspace, and two partial slots per K sorted positions.
  const int64_t id_bytes = BT * static_cast<int64_t>(sizeof(int32_t));
  auto keys_in_buf = ctx.alloc(id_bytes), keys_buf = ctx.alloc(id_bytes);
  auto vals_in_buf = ctx.alloc(id_bytes), slot_buf = ctx.alloc(id_bytes);
  uint32_t* keys_in = static_cast<uint32_t*>(keys_in_buf->data());
  uint32_t* keys = static_cast<uint32_t*>(keys_buf->data());
  int32_t* vals_in = static_cast<int32_t*>(vals_in_buf->data());
  int32_t* slot = static_cast<int32_t*>(slot_buf->data());
  encoder_sort_input_kernel<<<grid_for(BT), kThreads, 0, ctx.stream()>>>(keys_in, vals_in, idx, BT, V);
  DPO_CUDA_CHECK(cudaGetLastError());
  int end_bit = 1;  // keys are in [0, V]: sort only the bits that can be set
  while (end_bit < 32 && (int64_t{1} << end_bit) <= V) ++end_bit;
  size_t temp_bytes = 0;
  DPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys, vals_in, slot,
                                                 static_cast<int>(BT), 0, end_bit, ctx.stream()));
  auto temp = ctx.alloc(static_cast<int64_t>(std::max<size_t>(temp_bytes, 1)));
  DPO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp->data(), temp_bytes, keys_in, keys, vals_in, slot,
                                                 static_cast<int>(BT), 0, end_bit, ctx.stream()));

  const int64_t slots = 2 * ((BT + K - 1) / K);
  auto partial_buf = ctx.alloc(slots * C * static_cast<int64_t>(sizeof(float)));
  float* partial = static_cast<float*>(partial_buf->data());
  const dim3 grid(static_cast<unsigned>(ranges), static_cast<unsigned>(channel_tiles));
  encoder_backward_segments_kernel<T><<<grid, kChannelTile, 0, ctx.stream()>>>(dst, partial, dout, keys, slot, BT, C,
                                                                               V, K);
  DPO_CUDA_CHECK(cudaGetLastError());
  encoder_backward_combine_kernel<<<grid, kChannelTile, 0, ctx.stream()>>>(dst, partial, keys, BT, C, V, K);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void encoder_backward_impl(CudaContext& ctx, float* dwte, float* dwpe, const T* dout, const int32_t* tokens,
                                  int64_t B, int64_t T_, int64_t C, int64_t V) {
  DPO_NVTX_RANGE("encoder_backward");
  if (B * T_ * C <= 0 || V <= 0) return;
  sorted_row_sums(ctx, dwte, dout, tokens, B * T_, C, V, kEncoderSegmentRows);
  if (dwpe == nullptr) return;  // no position embedding
  encoder_backward_wpe_kernel<T><<<grid_for(T_ * C), kThreads, 0, ctx.stream()>>>(dwpe, dout, B, T_, C);
  DPO_CUDA_CHECK(cudaGetLastError());
}

template <class T>
static void encoder_backward_pos_impl(CudaContext& ctx, float* dwte, float* dwpe, const T* dout,
                                      const int32_t* tokens, const int32_t* pos, int64_t B, int64_t T_, int64_t C,
                                      int64_t V, int64_t P) {
  DPO_NVTX_RANGE("encoder_backward_pos");
  if (B * T_ * C <= 0) return;
  if (V > 0) sorted_row_sums(ctx, dwte, dout, tokens, B * T_, C, V, kEncoderSegmentRows);
  if (P > 0 && dwpe != nullptr)
    sorted_row_sums(ctx, dwpe, dout, pos, B * T_, C, P, encoder_position_segment_rows(B));
}

void encoder_forward(CudaContext& ctx, float* out, const int32_t* tokens, const float* wte, const float* wpe, int64_t B,
                     int64_t T, int64_t C, int64_t V) {
  encoder_forward_impl(ctx, out, tokens, static_cast<const int32_t*>(nullptr), wte, wpe, B, T, C, V, T);
}
void encoder_forward(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const __nv_bfloat16* wte,
                     const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C, int64_t V) {
  encoder_forward_impl(ctx, out, tokens, static_cast<const int32_t*>(nullptr), wte, wpe, B, T, C, V, T);
}

void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int64_t B,
                      int64_t T, int64_t C, int64_t V) {
  encoder_backward_impl(ctx, dwte, dwpe, dout, tokens, B, T, C, V);
}
void encoder_backward(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout, const int32_t* tokens,
                      int64_t B, int64_t T, int64_t C, int64_t V) {
  encoder_backward_impl(ctx, dwte, dwpe, dout, tokens, B, T, C, V);
}

void encoder_forward_pos(CudaContext& ctx, float* out, const int32_t* tokens, const int32_t* pos, const float* wte,
                         const float* wpe, int64_t B, int64_t T, int64_t C, int64_t V, int64_t P) {
  encoder_forward_impl(ctx, out, tokens, pos, wte, wpe, B, T, C, V, P);
}
void encoder_forward_pos(CudaContext& ctx, __nv_bfloat16* out, const int32_t* tokens, const int32_t* pos,
                         const __nv_bfloat16* wte, const __nv_bfloat16* wpe, int64_t B, int64_t T, int64_t C,
                         int64_t V, int64_t P) {
  encoder_forward_impl(ctx, out, tokens, pos, wte, wpe, B, T, C, V, P);
}

void encoder_backward_pos(CudaContext& ctx, float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                          const int32_t* pos, int64_t B, int64_t T, int64_t C, int64_t V, int64_t P) {
  encoder_backward_pos_impl(ctx, dwte, dwpe, dout, tokens, pos, B, T, C, V, P);
}
void encoder_backward_pos(CudaContext& ctx, float* dwte, float* dwpe, const __nv_bfloat16* dout,
                          const int32_t* tokens, const int32_t* pos, int64_t B, int64_t T, int64_t C, int64_t V,
                          int64_t P) {
  encoder_backward_pos_impl(ctx, dwte, dwpe, dout, tokens, pos, B, T, C, V, P);
}

}  // namespace dpo::cuda
