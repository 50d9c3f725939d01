// Internal launchers of cuda/sampling: discrete_step is instantiated once per logits dtype
// (discrete_step_<dtype>.cu) so the instantiations build in parallel; the public entry points
// (difforge/sampling_cuda.h) dispatch on the dtype in step_launch.cu.
#pragma once

#include <cuda_runtime.h>

#include "difforge/sampling.h"

namespace difforge::sampling::detail {

template <DType D>
cudaError_t launch_discrete_rows(const StepParams& p, cudaStream_t stream);

extern template cudaError_t launch_discrete_rows<DType::f32>(const StepParams&, cudaStream_t);
extern template cudaError_t launch_discrete_rows<DType::f16>(const StepParams&, cudaStream_t);
extern template cudaError_t launch_discrete_rows<DType::bf16>(const StepParams&, cudaStream_t);

}  // namespace difforge::sampling::detail
