// Types shared by the CPU and CUDA kernels and the backends above them.
#pragma once

namespace dpo {

// Storage layout of a dense layer's weight (see kernels/matmul.h).
//   InOut: w is [C, OC] (HF GPT-2 Conv1D).  OutIn: w is [OC, C] (nn.Linear; the tied LM head, wte [V, C]).
enum class WeightLayout { InOut, OutIn };

// How a backward op writes an activation-gradient output. Accumulate: += (every backward's default contract).
// Overwrite: = (the old contents are never read, NaN included), for a first contribution into a buffer that would
// otherwise be zeroed first (one memset pass saved). The value written is the Accumulate result on a zeroed buffer:
// bitwise so on the CPU; on the GPU through the same arithmetic with the add of 0 left out.
enum class GradWrite { Accumulate, Overwrite };

}  // namespace dpo
