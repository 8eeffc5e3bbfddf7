#include "kernels/adamw.cuh"

#include <cmath>
#include <string>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/cuda_context.h"
#include "runtime/cuda/nvtx.h"

namespace dpo::cuda {

constexpr int kThreads = 256;

// Per-step scalars, computed once on the host in double (as kernels/adamw_cpu.cpp does) and rounded to float.
struct AdamWScalars {
  float decay;         // 1 - lr * weight_decay
  float step_size;     // lr / (1 - beta1^step)
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float w1;            // 1 - beta1 (lerp weight)
  float one_minus_w1;  // 1 - w1, ATen's second lerp branch
  float beta2;
  float w2;  // 1 - beta2
  float eps;
  float grad_scale;
};

static __global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, AdamWScalars s) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = grad[i] * s.grad_scale;
  float x = param[i] * s.decay;  // param.mul_(1 - lr * weight_decay)
  const float m0 = m[i];
  // exp_avg.lerp_(grad, 1 - beta1), ATen's two branches (exact at both ends).
  const float mi = fabsf(s.w1) < 0.5f ? m0 + s.w1 * (g - m0) : g - (g - m0) * s.one_minus_w1;
  float vi = v[i] * s.beta2;  // exp_avg_sq.mul_(beta2)
  vi = vi + s.w2 * g * g;     //   .addcmul_(grad, grad, value=1 - beta2)
  const float denom = sqrtf(vi) / s.bc2_sqrt + s.eps;
  x = x + (-s.step_size) * mi / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  param[i] = x;
  m[i] = mi;
  v[i] = vi;
}

void adamw_update(CudaContext& ctx, float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& p) {
  DPO_NVTX_RANGE("adamw_update");
  if (n <= 0) return;
  const double bias_correction1 = 1.0 - std::pow(p.beta1, static_cast<double>(p.step));
  const double bias_correction2 = 1.0 - std::pow(p.beta2, static_cast<double>(p.step));
  const double w1 = 1.0 - p.beta1;
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  s.step_size = static_cast<float>(p.lr / bias_correction1);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  s.w1 = static_cast<float>(w1);
  s.one_minus_w1 = static_cast<float>(1.0 - w1);
  s.beta2 = static_cast<float>(p.beta2);
  s.w2 = static_cast<float>(1.0 - p.beta2);
  s.eps = static_cast<float>(p.eps);
  s.grad_scale = static_cast<float>(p.grad_scale);
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  DPO_ASSERT(blocks <= INT32_MAX, "adamw_update: n = " + std::to_string(n) + " exceeds one launch");
  adamw_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream()>>>(param, grad, m, v, n, s);
  DPO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dpo::cuda
