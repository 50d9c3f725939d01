// Launcher of the Skiparse permutation CUDA kernel (cuda/attention/skiparse.cu). Torch-free: raw pointers in,
// cudaError_t out. Maps: difforge/skiparse_index.h.
#pragma once

#include <cuda_runtime.h>

#include "difforge/skiparse_index.h"

namespace difforge::skiparse {

// Every destination row of p (pack, restore, switch or an SSP exchange step). Empty problems launch nothing.
cudaError_t launch_skiparse_gather(const GatherParams& p, cudaStream_t stream);

}  // namespace difforge::skiparse
