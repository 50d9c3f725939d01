// Tensor-core forward, bf16 inputs, head dims 64 and 128: see flash_forward.cuh.
#include "flash_forward.cuh"

namespace difforge::attention::detail {
template cudaError_t launch_forward_mma<DType::bf16, 64>(const ForwardParams&, cudaStream_t);
template cudaError_t launch_forward_mma<DType::bf16, 128>(const ForwardParams&, cudaStream_t);
}  // namespace difforge::attention::detail
