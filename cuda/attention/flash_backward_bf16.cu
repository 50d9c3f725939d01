// Tensor-core backward, bf16 inputs, head dims 64 and 128: see flash_backward.cuh.
#include "flash_backward.cuh"

namespace difforge::attention::detail {
template cudaError_t launch_backward_mma<DType::bf16, 64>(const BackwardParams&, cudaStream_t);
template cudaError_t launch_backward_mma<DType::bf16, 128>(const BackwardParams&, cudaStream_t);
}  // namespace difforge::attention::detail
