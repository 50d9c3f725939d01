// Internal launchers of cuda/norm, one definition per x dtype (adaln_forward_<dtype>.cu,
// adaln_backward_<dtype>.cu) so that instantiations build in parallel. The public entry points
// (difforge/norm.h) dispatch on the dtype in adaln_launch.cu.
#pragma once

#include <cuda_runtime.h>

#include "difforge/adaln_norm.h"

namespace difforge::norm::detail {

// Forward over all rows (x_out, y, mean, rstd).
template <DType X>
cudaError_t launch_forward_rows(const ForwardParams& p, cudaStream_t stream);

// Backward pass 1: dx, d_o, and the modulation / affine partial sums of `plan`.
template <DType X>
cudaError_t launch_backward_rows(const BackwardParams& p, const ReductionPlan& plan, cudaStream_t stream);

// Backward pass 2: the modulation gradients (unless plan.direct()) and the affine gradients.
cudaError_t launch_reduce_partials(const BackwardParams& p, const ReductionPlan& plan, cudaStream_t stream);

extern template cudaError_t launch_forward_rows<DType::f32>(const ForwardParams&, cudaStream_t);
extern template cudaError_t launch_forward_rows<DType::f16>(const ForwardParams&, cudaStream_t);
extern template cudaError_t launch_forward_rows<DType::bf16>(const ForwardParams&, cudaStream_t);
extern template cudaError_t launch_backward_rows<DType::f32>(const BackwardParams&, const ReductionPlan&,
                                                             cudaStream_t);
extern template cudaError_t launch_backward_rows<DType::f16>(const BackwardParams&, const ReductionPlan&,
                                                             cudaStream_t);
extern template cudaError_t launch_backward_rows<DType::bf16>(const BackwardParams&, const ReductionPlan&,
                                                              cudaStream_t);

}  // namespace difforge::norm::detail
