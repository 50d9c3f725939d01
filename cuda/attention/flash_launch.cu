// Public launchers of the flash attention kernels (difforge/flash_attention.h): validate the problem,
// then pick the tensor-core kernels (fp16 / bf16, D in {64, 128}, 16-byte aligned rows, shared
// memory that fits the device) or the SIMT fallback (everything else up to kMaxHeadDim).
#include <climits>
#include <cstdint>

#include "difforge/flash_attention.h"
#include "flash_launch.h"

namespace difforge::attention {
namespace {

using detail::BackwardSmem;
using detail::ForwardSmem;

bool fits_int32(int64_t x) { return x >= 0 && x <= INT32_MAX; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// cp.async moves rows of 16-bit elements in 16-byte chunks: base and every stride must keep them aligned.
bool rows_aligned(const void* p, const Strides& s) {
  return aligned16(p) && s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0;
}

cudaError_t check_problem(const Problem& pr, bool bias_present) {
  const bool ok = pr.dtype != DType::f64 && pr.head_dim >= 1 && pr.head_dim <= kMaxHeadDim && pr.bias_rank >= 0 &&
                  pr.bias_rank <= kMaxBiasRank && (pr.bias_rank == 0 || bias_present) && pr.heads_kv >= 1 &&
                  pr.heads_q % pr.heads_kv == 0 &&
                  // grid y and z; in-sequence indices are int32 in the kernels
                  pr.heads_q <= 65535 && pr.batch <= 65535 && fits_int32(pr.seqlen_q) && fits_int32(pr.seqlen_k);
  return ok ? cudaSuccess : cudaErrorInvalidValue;
}

// Head dim of a tensor-core instantiation for this problem, or 0.
int mma_head_dim(const Problem& pr) {
  const bool half = pr.dtype == DType::f16 || pr.dtype == DType::bf16;
  return half && (pr.head_dim == 64 || pr.head_dim == 128) ? int(pr.head_dim) : 0;
}

bool smem_fits(int bytes) {
  int optin = 0;
  return detail::device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin) == cudaSuccess && bytes <= optin;
}

template <template <DType, int> class Launch, typename Params>
cudaError_t dispatch_mma(const Params& p, DType dt, int d, cudaStream_t stream) {
  if (dt == DType::f16) {
    return d == 64 ? Launch<DType::f16, 64>::run(p, stream) : Launch<DType::f16, 128>::run(p, stream);
  }
  return d == 64 ? Launch<DType::bf16, 64>::run(p, stream) : Launch<DType::bf16, 128>::run(p, stream);
}

template <DType T, int D> struct ForwardMma {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return detail::launch_forward_mma<T, D>(p, s); }
};
template <DType T, int D> struct BackwardMma {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return detail::launch_backward_mma<T, D>(p, s); }
};

template <template <DType> class Launch, typename Params>
cudaError_t dispatch_dtype(const Params& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::f32: return Launch<DType::f32>::run(p, stream);
    case DType::f16: return Launch<DType::f16>::run(p, stream);
    case DType::bf16: return Launch<DType::bf16>::run(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <DType T> struct ForwardSimt {
  static cudaError_t run(const ForwardParams& p, cudaStream_t s) { return detail::launch_forward_simt<T>(p, s); }
};
template <DType T> struct BackwardSimt {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return detail::launch_backward_simt<T>(p, s); }
};
template <DType T> struct BackwardDelta {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return detail::launch_backward_delta<T>(p, s); }
};
template <DType T> struct BackwardFinish {
  static cudaError_t run(const BackwardParams& p, cudaStream_t s) { return detail::launch_backward_finish<T>(p, s); }
};

}  // namespace

cudaError_t launch_flash_forward(const ForwardParams& p, cudaStream_t stream) {
  const Problem& pr = p.problem;
  if (pr.batch == 0 || pr.heads_q == 0 || pr.seqlen_q == 0 || pr.total_q == 0) return cudaSuccess;
  const cudaError_t err = check_problem(pr, p.bias.present() && p.bias.k != nullptr);
  if (err != cudaSuccess) return err;
  const int d = mma_head_dim(pr);
  if (d != 0 && rows_aligned(p.q, p.q_strides) && rows_aligned(p.k, p.k_strides) &&
      rows_aligned(p.v, p.v_strides) && aligned16(p.out) && smem_fits(ForwardSmem(d, pr.bias_rank).bytes)) {
    return dispatch_mma<ForwardMma>(p, pr.dtype, d, stream);
  }
  return dispatch_dtype<ForwardSimt>(p, pr.dtype, stream);
}

cudaError_t launch_flash_backward(const BackwardParams& p, cudaStream_t stream) {
  const Problem& pr = p.fwd.problem;
  if (pr.batch == 0 || pr.heads_q == 0 || (pr.total_q == 0 && p.total_k == 0)) return cudaSuccess;
  cudaError_t err = check_problem(pr, p.fwd.bias.present() && p.fwd.bias.k != nullptr);
  if (err != cudaSuccess) return err;
  const bool workspace = p.delta != nullptr && p.dq_accum != nullptr && p.dk_accum != nullptr && p.dv_accum != nullptr;
  const bool bias_outputs =
      pr.bias_rank == 0 || (p.dbias_q != nullptr && p.dbias_k != nullptr && p.dbias_k_accum != nullptr);
  if (!workspace || !bias_outputs) return cudaErrorInvalidValue;

  err = dispatch_dtype<BackwardDelta>(p, pr.dtype, stream);
  if (err != cudaSuccess) return err;
  const int d = mma_head_dim(pr);
  const ForwardParams& f = p.fwd;
  if (d != 0 && rows_aligned(f.q, f.q_strides) && rows_aligned(f.k, f.k_strides) &&
      rows_aligned(f.v, f.v_strides) && rows_aligned(p.dout, p.dout_strides) &&
      smem_fits(BackwardSmem(d, pr.bias_rank).bytes)) {
    err = pr.seqlen_k > 0 ? dispatch_mma<BackwardMma>(p, pr.dtype, d, stream) : cudaSuccess;
  } else {
    err = dispatch_dtype<BackwardSimt>(p, pr.dtype, stream);
  }
  if (err != cudaSuccess) return err;
  return dispatch_dtype<BackwardFinish>(p, pr.dtype, stream);
}

}  // namespace difforge::attention
