// discrete_step kernels for bf16 logits: see discrete_step.cuh.
#include "sampling/discrete_step.cuh"

namespace difforge::sampling::detail {
template cudaError_t launch_discrete_rows<DType::bf16>(const StepParams&, cudaStream_t);
}  // namespace difforge::sampling::detail
