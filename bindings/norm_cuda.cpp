// CUDA registration of the norm family (kernels: cuda/norm, torch-free launchers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "difforge/norm.h"
#include "norm_ops.h"

namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "difforge ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

struct CudaKernels {
  static constexpr bool kHasDouble = false;
  using Guard = c10::cuda::CUDAGuard;
  static void forward(const difforge::norm::ForwardParams& p) {
    check_launch(difforge::norm::launch_adaln_forward(p, c10::cuda::getCurrentCUDAStream()), "adaln forward");
  }
  static void backward(const difforge::norm::BackwardParams& p) {
    check_launch(difforge::norm::launch_adaln_backward(p, c10::cuda::getCurrentCUDAStream()), "adaln backward");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CUDA, m) { DIFFORGE_REGISTER_NORM_OPS(m, CudaKernels); }
