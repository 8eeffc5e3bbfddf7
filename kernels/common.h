// Types shared by the CPU and CUDA kernels and the backends above them.
#pragma once

namespace dpo {

// Storage layout of a dense layer's weight (see kernels/matmul.h).
//   InOut: w is [C, OC] (HF GPT-2 Conv1D).  OutIn: w is [OC, C] (nn.Linear; the tied LM head, wte [V, C]).
enum class WeightLayout { InOut, OutIn };

}  // namespace dpo
