// discrete_step kernels for f32 logits: see discrete_step.cuh.
#include "sampling/discrete_step.cuh"

namespace difforge::sampling::detail {
template cudaError_t launch_discrete_rows<DType::f32>(const StepParams&, cudaStream_t);
}  // namespace difforge::sampling::detail
