// CPU kernels of the flash attention family: tiled online softmax on fp32 (fp64) tiles, never an
// Lq x Lk matrix. Reference for the CUDA kernels and the path on machines without a GPU.
// Parameters and math: cpp/include/difforge/attention.h.
#pragma once

#include "difforge/attention.h"

namespace difforge::attention {

template <typename acc_t>
void flash_forward_cpu(const ForwardParamsT<acc_t>& p);

// Deterministic: every gradient element is summed in a fixed order (no atomics, no thread-dependent
// splits). Uses none of the CUDA workspace in p.
template <typename acc_t>
void flash_backward_cpu(const BackwardParamsT<acc_t>& p);

}  // namespace difforge::attention
