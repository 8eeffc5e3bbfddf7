// AdamW on the GPU. Contract and order of operations: kernels/adamw.h (CPU twin cpu::adamw_update in
// kernels/adamw_cpu.cpp), which is torch.optim.AdamW's single-tensor path:
//     g      = grad * grad_scale
//     param *= 1 - lr * weight_decay
//     m      = lerp(m, g, 1 - beta1)                 (ATen's two-branch lerp)
//     v      = v * beta2 + (1 - beta2) * g * g
//     denom  = sqrt(v) / sqrt(1 - beta2^step) + eps
//     param += (-lr / (1 - beta1^step)) * m / denom
//   param[n], m[n], v[n]: float, read and written in place; grad[n]: float, read only. No two may alias.
//   State (m, v) is fp32 and each element's arithmetic is fp32 (the CPU twin does it in double), so the two differ
//   by float round-off; the scalars (bias corrections, step size, decay) are computed on the host in double, as
//   PyTorch computes them in Python, then rounded to float. One thread per element, so the result does not depend
//   on the launch configuration. p.step is 1-based. Asynchronous on ctx.stream(); 64-bit indices.
#pragma once
#include <cstdint>

#include "kernels/adamw.h"

namespace dpo {
class CudaContext;
}

namespace dpo::cuda {

void adamw_update(CudaContext& ctx, float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& p);

}  // namespace dpo::cuda
