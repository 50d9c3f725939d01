// Public launchers of the fused adaLN norm-modulate kernels (difforge/norm.h): dispatch on the
// x dtype to the per-dtype instantiations; the backward adds pass 2 of the column reductions.
#include "difforge/norm.h"

#include "adaln_launch.h"

namespace difforge::norm {

namespace {

// fp64 is a CPU-only dtype (gradcheck); o's dtype only matters when o is given.
bool cuda_dtypes(DType x, DType o, bool gated) { return x != DType::f64 && (!gated || o != DType::f64); }

}  // namespace

cudaError_t launch_adaln_forward(const ForwardParams& p, cudaStream_t stream) {
  if (p.layout.rows == 0 || p.dim == 0) return cudaSuccess;
  if (!cuda_dtypes(p.x_dtype, p.o_dtype, p.o != nullptr)) return cudaErrorInvalidValue;
  switch (p.x_dtype) {
    case DType::f32: return detail::launch_forward_rows<DType::f32>(p, stream);
    case DType::f16: return detail::launch_forward_rows<DType::f16>(p, stream);
    case DType::bf16: return detail::launch_forward_rows<DType::bf16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_adaln_backward(const BackwardParams& p, cudaStream_t stream) {
  if (p.layout.rows == 0 || p.dim == 0) return cudaSuccess;
  if (!cuda_dtypes(p.x_dtype, p.o_dtype, p.o != nullptr)) return cudaErrorInvalidValue;
  const ReductionPlan plan(p.layout);
  cudaError_t err = cudaErrorInvalidValue;
  switch (p.x_dtype) {
    case DType::f32: err = detail::launch_backward_rows<DType::f32>(p, plan, stream); break;
    case DType::f16: err = detail::launch_backward_rows<DType::f16>(p, plan, stream); break;
    case DType::bf16: err = detail::launch_backward_rows<DType::bf16>(p, plan, stream); break;
    default: break;
  }
  if (err != cudaSuccess) return err;
  return detail::launch_reduce_partials(p, plan, stream);
}

}  // namespace difforge::norm
