// Public launcher of the W4A16 GEMM (difforge/formats_cuda.h): validates the problem, dispatches on the dtype.
#include "difforge/formats_cuda.h"
#include "nvfp4_linear_launch.cuh"

namespace difforge::formats {

cudaError_t launch_nvfp4_linear(const Nvfp4LinearParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.n % 16 != 0 || p.k % 16 != 0) return cudaErrorInvalidValue;
  if (p.m == 0 || p.n == 0) return cudaSuccess;  // k == 0 still writes out = bias
  if (!p.out || (p.k > 0 && (!p.x || !p.w_packed || !p.w_scales))) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::bf16: return detail::launch_nvfp4_linear_typed<DType::bf16>(p, stream);
    case DType::f16: return detail::launch_nvfp4_linear_typed<DType::f16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace difforge::formats
