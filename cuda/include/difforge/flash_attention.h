// Launchers of the flash attention CUDA kernels (cuda/attention). Torch-free: raw pointers in,
// cudaError_t out, so the kernels compile and can be tested with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include "difforge/attention.h"

namespace difforge::attention {

// out and lse for every (sequence, query head, query row). Empty problems launch nothing.
cudaError_t launch_flash_forward(const ForwardParams& p, cudaStream_t stream);

// dq, dk, dv (and dbias_q / dbias_k when the bias is present), using p's fp32 workspace.
cudaError_t launch_flash_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace difforge::attention
