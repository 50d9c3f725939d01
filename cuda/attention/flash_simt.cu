// SIMT kernels for every dtype (fallback forward / backward, delta, finishing): see flash_simt.cuh.
#include "flash_simt.cuh"

namespace difforge::attention::detail {
#define DIFFORGE_ATTENTION_SIMT_INSTANTIATE(T)                                              \
  template cudaError_t launch_forward_simt<T>(const ForwardParams&, cudaStream_t);         \
  template cudaError_t launch_backward_simt<T>(const BackwardParams&, cudaStream_t);       \
  template cudaError_t launch_backward_delta<T>(const BackwardParams&, cudaStream_t);      \
  template cudaError_t launch_backward_finish<T>(const BackwardParams&, cudaStream_t)
DIFFORGE_ATTENTION_SIMT_INSTANTIATE(DType::f32);
DIFFORGE_ATTENTION_SIMT_INSTANTIATE(DType::f16);
DIFFORGE_ATTENTION_SIMT_INSTANTIATE(DType::bf16);
#undef DIFFORGE_ATTENTION_SIMT_INSTANTIATE
}  // namespace difforge::attention::detail
