// W4A16 GEMM, fp16 activations: see nvfp4_linear.cuh.
#include "nvfp4_linear.cuh"

namespace difforge::formats::detail {
template cudaError_t launch_nvfp4_linear_typed<DType::f16>(const Nvfp4LinearParams&, cudaStream_t);
}  // namespace difforge::formats::detail
