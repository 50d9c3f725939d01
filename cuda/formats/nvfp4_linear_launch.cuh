// Internal launchers of the W4A16 GEMM, one definition per activation dtype in its own .cu (nvfp4_linear_bf16.cu,
// nvfp4_linear_f16.cu) so that the instantiations build in parallel; launch_nvfp4_linear (nvfp4_linear_launch.cu)
// validates the problem and dispatches on the dtype.
#pragma once

#include <cuda_runtime.h>

#include "difforge/formats.h"

namespace difforge::formats::detail {

// p valid: m, n >= 1, n % 16 == 0, k % 16 == 0, dtype bf16 or fp16.
template <DType D>
cudaError_t launch_nvfp4_linear_typed(const Nvfp4LinearParams& p, cudaStream_t stream);

extern template cudaError_t launch_nvfp4_linear_typed<DType::bf16>(const Nvfp4LinearParams&, cudaStream_t);
extern template cudaError_t launch_nvfp4_linear_typed<DType::f16>(const Nvfp4LinearParams&, cudaStream_t);

}  // namespace difforge::formats::detail
