// The fused per-tensor HiF8 pass (spec §2, §3): s -> c = hif8::encode(fp32(x * s)) -> codes, fake quantization
// decode(c) / s, E4M3 bytes of decode(c) * 2^shift. When s comes from the tensor's amax, a reduction into
// p.scratch runs first and every thread of the encode pass reads it back: no host round trip.
#include "hif8_amax.cuh"
#include "difforge/formats_cuda.h"
#include "difforge/nvfp4.h"

namespace difforge::formats {
namespace {

using namespace detail;

__device__ __forceinline__ float resolve_scale(const Hif8Params& p) {
  if (p.scale_in) return *p.scale_in;
  return p.target > 0.f ? hif8::scale_for(bits_float(*p.scratch), p.target) : 1.f;
}

template <typename T, typename Q>
__global__ void __launch_bounds__(kThreads) hif8_encode_kernel(const Hif8Params p, const int64_t chunks) {
  const float s = resolve_scale(p);
  const float e4m3_factor = ldexpf(1.f, p.shift);  // exact: the E4M3 bytes hold decode(c) * 2^shift
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (p.scale_out) *p.scale_out = s;
    if (p.e4m3_scale_inv) *p.e4m3_scale_inv = 1.f / (s * e4m3_factor);
  }
  const T* x = static_cast<const T*>(p.x);
  Q* qdq = static_cast<Q*>(p.qdq);
  const auto code_of = [&](float v) { return hif8::encode(v * s, p.saturate, p.rounding); };
  for_each_chunk(
      p.n, chunks,
      [&](int64_t i) {
        float v[kChunk];
        load_chunk(x + i * kChunk, v);
        uint8_t c[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) c[j] = code_of(v[j]);
        if (p.codes) store_bytes(p.codes + i * kChunk, c);
        if (qdq) {
          float q[kChunk];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) q[j] = hif8::decode(c[j]) / s;
          store_chunk(qdq + i * kChunk, q);
        }
        if (p.e4m3) {
          uint8_t e[kChunk];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) e[j] = nvfp4::e4m3_satfinite(hif8::decode(c[j]) * e4m3_factor);
          store_bytes(p.e4m3 + i * kChunk, e);
        }
      },
      [&](int64_t i) {
        const uint8_t c = code_of(to_float(x[i]));
        if (p.codes) p.codes[i] = c;
        if (qdq) qdq[i] = from_float<Q>(hif8::decode(c) / s);
        if (p.e4m3) p.e4m3[i] = nvfp4::e4m3_satfinite(hif8::decode(c) * e4m3_factor);
      });
}

template <typename T, typename Q>
struct Hif8Pass {
  static cudaError_t run(const Hif8Params& p, cudaStream_t stream) {
    const bool vector_io = aligned_to(p.x, 16) && null_or_aligned_to(p.codes, 8) &&
                           null_or_aligned_to(p.qdq, 16) && null_or_aligned_to(p.e4m3, 8);
    const int64_t chunks = vector_io ? p.n / kChunk : 0;
    if (!p.scale_in && p.target > 0.f) {
      if (!p.scratch) return cudaErrorInvalidValue;
      const int64_t amax_chunks = aligned_to(p.x, 16) ? p.n / kChunk : 0;
      const TensorValues<T> x{static_cast<const T*>(p.x), p.n, amax_chunks};
      const cudaError_t err = launch_amax(x, p.scratch, stream);
      if (err != cudaSuccess) return err;
    }
    hif8_encode_kernel<T, Q><<<grid_stride_blocks(work_items(p.n, chunks)), kThreads, 0, stream>>>(p, chunks);
    return cudaGetLastError();
  }
};

template <typename T>
cudaError_t with_qdq_type(const Hif8Params& p, cudaStream_t stream) {
  switch (p.qdq_dtype) {
    case DType::f32: return Hif8Pass<T, float>::run(p, stream);
    case DType::f16: return Hif8Pass<T, __half>::run(p, stream);
    case DType::bf16: return Hif8Pass<T, __nv_bfloat16>::run(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_hif8(const Hif8Params& p, cudaStream_t stream) {
  if (p.n < 0) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::f32: return with_qdq_type<float>(p, stream);
    case DType::f16: return with_qdq_type<__half>(p, stream);
    case DType::bf16: return with_qdq_type<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace difforge::formats
