// Launchers of the fused adaLN norm-modulate CUDA kernels (cuda/norm). Torch-free: raw pointers in,
// cudaError_t out, so the kernels compile and can be tested with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include "difforge/adaln_norm.h"

namespace difforge::norm {

// y (and x_out, mean, rstd) for every row. rows == 0 launches nothing.
cudaError_t launch_adaln_forward(const ForwardParams& p, cudaStream_t stream);

// dx, d_o and the modulation/affine gradients: pass 1 over rows writing the partials of
// ReductionPlan(p.layout), then pass 2 summing them in a fixed order (no atomics).
cudaError_t launch_adaln_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace difforge::norm
