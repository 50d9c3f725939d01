// CUDA registration of the attention family (kernels: cuda/attention, torch-free launchers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_ops.h"
#include "difforge/flash_attention.h"
#include "difforge/skiparse_cuda.h"
#include "skiparse_ops.h"

namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "difforge ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr bool kHasDouble = false;
  // The backward uses the fp32 workspace of BackwardParams (delta, dq/dk/dv partials).
  static constexpr bool kNeedsWorkspace = true;
  static void forward(const difforge::attention::ForwardParams& p) {
    check_launch(difforge::attention::launch_flash_forward(p, c10::cuda::getCurrentCUDAStream()),
                 "flash_attention forward");
  }
  static void backward(const difforge::attention::BackwardParams& p) {
    check_launch(difforge::attention::launch_flash_backward(p, c10::cuda::getCurrentCUDAStream()),
                 "flash_attention backward");
  }
  static void gather(const difforge::skiparse::GatherParams& p) {
    check_launch(difforge::skiparse::launch_skiparse_gather(p, c10::cuda::getCurrentCUDAStream()), "skiparse");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CUDA, m) {
  DIFFORGE_REGISTER_ATTENTION_OPS(m, CudaKernels);
  DIFFORGE_REGISTER_SKIPARSE_OPS(m, CudaKernels);
}
