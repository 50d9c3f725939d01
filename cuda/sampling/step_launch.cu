// Public launcher of discrete_step (difforge/sampling_cuda.h): checks what the kernels rely on and picks the
// logits dtype's instantiation.
#include "difforge/sampling_cuda.h"

#include "sampling/launch.h"

namespace difforge::sampling {

cudaError_t launch_discrete_step(const StepParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.vocab < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::f32: return detail::launch_discrete_rows<DType::f32>(p, stream);
    case DType::f16: return detail::launch_discrete_rows<DType::f16>(p, stream);
    case DType::bf16: return detail::launch_discrete_rows<DType::bf16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace difforge::sampling
