// Stand-in for torch's c10/cuda/CUDAGuard.h so that `make cuda-check` can syntax-check bindings/*_cuda.cpp
// against a CPU-only torch (which ships no c10/cuda headers). Never used in a real build.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
