// Launchers of the sampling CUDA kernels (cuda/sampling). Torch-free: raw pointers in, cudaError_t out.
// Math and parameters: difforge/sampling.h. The draws equal the CPU kernels' for the same inputs.
#pragma once

#include <cuda_runtime.h>

#include "difforge/sampling.h"

namespace difforge::sampling {

cudaError_t launch_discrete_step(const StepParams& p, cudaStream_t stream);

cudaError_t launch_tweedie_step(const TweedieParams& p, cudaStream_t stream);

cudaError_t launch_select_positions(const SelectParams& p, cudaStream_t stream);

}  // namespace difforge::sampling
