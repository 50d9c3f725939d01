// Stand-in for torch's c10/cuda/CUDAStream.h (see CUDAGuard.h beside it). Never used in a real build.
#pragma once
#include <cuda_runtime.h>
namespace c10::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
