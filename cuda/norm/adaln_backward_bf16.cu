// Backward pass-1 kernels for x dtype bf16 (all o dtypes): see adaln_backward.cuh.
#include "adaln_backward.cuh"

namespace difforge::norm::detail {
template cudaError_t launch_backward_rows<DType::bf16>(const BackwardParams&, const ReductionPlan&, cudaStream_t);
}  // namespace difforge::norm::detail
