// Internal launchers of cuda/attention, one definition per dtype (and head dim) in its own .cu so
// that instantiations build in parallel; the public entry points (difforge/flash_attention.h) dispatch in
// flash_launch.cu. Also the tile shapes and shared memory layouts of the tensor-core kernels, which
// the dispatcher needs to check that a launch fits the device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "difforge/attention.h"

namespace difforge::attention::detail {

// ---- tensor-core kernels (fp16 / bf16, head dims kMmaHeadDims) ----------------------------------

// Forward: one warp per 16 query rows, kBlockN keys per tile.
struct ForwardTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = 64;
};

// Backward: one CTA per kBlockN keys (16 per warp), streaming kBlockM queries per step. The dK and
// dV accumulators (D floats per thread) stay live throughout; 32-query steps keep the S^T and dP^T
// fragments (kBlockM / 2 floats per thread) small enough to stay within 255 registers without
// spills at D = 128 (64-query steps spill at both D = 64 and D = 128).
struct BackwardTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kBlockM = 32;
};

// The offset of a double-buffered tile for `stage` (a select: indexing the pair with a runtime
// stage would put the layout in local memory).
DF_INLINE int stage_offset(const int (&offsets)[2], int stage) { return stage ? offsets[1] : offsets[0]; }

// Byte offsets of the forward's dynamic shared memory: Q [kBlockM][D]; two stages of
// {K, V} [kBlockN][D]; with a bias, bias_q^T [R][kBlockM] and two stages of bias_k^T [R][kBlockN].
struct ForwardSmem {
  int q, k[2], v[2], bias_q, bias_k[2], bytes;

  DF_HOST_DEVICE ForwardSmem(int d, int rank) {
    using F = ForwardTiles;
    const int q_bytes = F::kBlockM * d * 2, kv_bytes = F::kBlockN * d * 2;
    q = 0;
    k[0] = q_bytes;
    v[0] = k[0] + kv_bytes;
    k[1] = v[0] + kv_bytes;
    v[1] = k[1] + kv_bytes;
    bias_q = v[1] + kv_bytes;
    bias_k[0] = bias_q + rank * F::kBlockM * 4;
    bias_k[1] = bias_k[0] + rank * F::kBlockN * 4;
    bytes = bias_k[1] + rank * F::kBlockN * 4;
  }
};

// Byte offsets of the backward's dynamic shared memory: K, V [kBlockN][D]; two stages of {Q, dO}
// [kBlockM][D]; dS [kBlockM][kBlockN] in the input dtype (dQ = dS K); two stages of {lse, delta}
// [kBlockM]. With a bias: bias_k^T [R][kBlockN], two stages of bias_q^T [R][kBlockM], dS in fp32
// [kBlockM][kBlockN + 1] (the bias gradients) and the dbias_k sums [R][kBlockN].
struct BackwardSmem {
  static constexpr int kDsStride = BackwardTiles::kBlockN + 1;  // padded: column reads conflict-free
  int k, v, q[2], dout[2], lse[2], delta[2], ds, bias_k, bias_q[2], ds_f32, dbias_k, bytes;

  DF_HOST_DEVICE BackwardSmem(int d, int rank) {
    using B = BackwardTiles;
    const int kv_bytes = B::kBlockN * d * 2, q_bytes = B::kBlockM * d * 2, row_bytes = B::kBlockM * 4;
    k = 0;
    v = k + kv_bytes;
    q[0] = v + kv_bytes;
    q[1] = q[0] + q_bytes;
    dout[0] = q[1] + q_bytes;
    dout[1] = dout[0] + q_bytes;
    ds = dout[1] + q_bytes;
    lse[0] = ds + B::kBlockM * B::kBlockN * 2;
    lse[1] = lse[0] + row_bytes;
    delta[0] = lse[1] + row_bytes;
    delta[1] = delta[0] + row_bytes;
    bias_k = delta[1] + row_bytes;
    bias_q[0] = bias_k + rank * B::kBlockN * 4;
    bias_q[1] = bias_q[0] + rank * B::kBlockM * 4;
    ds_f32 = bias_q[1] + rank * B::kBlockM * 4;
    dbias_k = ds_f32 + (rank > 0 ? B::kBlockM * kDsStride * 4 : 0);
    bytes = dbias_k + rank * B::kBlockN * 4;
  }
};

template <DType T, int D>
cudaError_t launch_forward_mma(const ForwardParams& p, cudaStream_t stream);

// dq_accum (atomics), dk_accum / dv_accum (and dbias_q, dbias_k_accum) for every key block.
template <DType T, int D>
cudaError_t launch_backward_mma(const BackwardParams& p, cudaStream_t stream);

#define DIFFORGE_ATTENTION_MMA_EXTERN(T, D)                                                    \
  extern template cudaError_t launch_forward_mma<T, D>(const ForwardParams&, cudaStream_t);   \
  extern template cudaError_t launch_backward_mma<T, D>(const BackwardParams&, cudaStream_t)
DIFFORGE_ATTENTION_MMA_EXTERN(DType::f16, 64);
DIFFORGE_ATTENTION_MMA_EXTERN(DType::f16, 128);
DIFFORGE_ATTENTION_MMA_EXTERN(DType::bf16, 64);
DIFFORGE_ATTENTION_MMA_EXTERN(DType::bf16, 128);
#undef DIFFORGE_ATTENTION_MMA_EXTERN

// ---- SIMT kernels (every dtype, D <= kMaxHeadDim): the fallback, and the backward's edges -------

template <DType T>
cudaError_t launch_forward_simt(const ForwardParams& p, cudaStream_t stream);

// dq_accum (plain stores, scaled), dbias_q, and dk_accum / dv_accum / dbias_k_accum.
template <DType T>
cudaError_t launch_backward_simt(const BackwardParams& p, cudaStream_t stream);

// delta = rowsum(dout * out) - dlse, indexed like lse.
template <DType T>
cudaError_t launch_backward_delta(const BackwardParams& p, cudaStream_t stream);

// dq from dq_accum; dk, dv (and dbias_k) as the fixed-order sums of the per-query-head partials.
template <DType T>
cudaError_t launch_backward_finish(const BackwardParams& p, cudaStream_t stream);

#define DIFFORGE_ATTENTION_SIMT_EXTERN(T)                                                           \
  extern template cudaError_t launch_forward_simt<T>(const ForwardParams&, cudaStream_t);          \
  extern template cudaError_t launch_backward_simt<T>(const BackwardParams&, cudaStream_t);        \
  extern template cudaError_t launch_backward_delta<T>(const BackwardParams&, cudaStream_t);       \
  extern template cudaError_t launch_backward_finish<T>(const BackwardParams&, cudaStream_t)
DIFFORGE_ATTENTION_SIMT_EXTERN(DType::f32);
DIFFORGE_ATTENTION_SIMT_EXTERN(DType::f16);
DIFFORGE_ATTENTION_SIMT_EXTERN(DType::bf16);
#undef DIFFORGE_ATTENTION_SIMT_EXTERN

// ---- host helpers ------------------------------------------------------------------------------

inline cudaError_t device_attribute(cudaDeviceAttr attr, int* value) {
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(value, attr, dev);
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KiB.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace difforge::attention::detail
