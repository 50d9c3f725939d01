// Forward kernels for x dtype f32 (all o dtypes): see adaln_forward.cuh.
#include "adaln_forward.cuh"

namespace difforge::norm::detail {
template cudaError_t launch_forward_rows<DType::f32>(const ForwardParams&, cudaStream_t);
}  // namespace difforge::norm::detail
