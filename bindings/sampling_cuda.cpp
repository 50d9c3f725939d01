// CUDA registration of the sampling family (kernels: cuda/sampling, torch-free launchers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "difforge/sampling_cuda.h"
#include "sampling_ops.h"

namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "difforge ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;
  static void step(const difforge::sampling::StepParams& p) {
    check_launch(difforge::sampling::launch_discrete_step(p, c10::cuda::getCurrentCUDAStream()), "discrete_step");
  }
  static void tweedie(const difforge::sampling::TweedieParams& p) {
    check_launch(difforge::sampling::launch_tweedie_step(p, c10::cuda::getCurrentCUDAStream()), "tweedie_step");
  }
  static void select(const difforge::sampling::SelectParams& p) {
    check_launch(difforge::sampling::launch_select_positions(p, c10::cuda::getCurrentCUDAStream()),
                 "select_positions");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CUDA, m) { DIFFORGE_REGISTER_SAMPLING_OPS(m, CudaKernels); }
