// HiF8 codes back to numbers: the fake-quantized tensor decode(c) / s, and the E4M3 operand of the FP8 GEMM
// (spec §3), e4m3(decode(c) * 2^k) with the shift k = hif8::e4m3_shift(max |decode(c)|) found on the device.
#include "hif8_amax.cuh"
#include "difforge/formats_cuda.h"
#include "difforge/nvfp4.h"

namespace difforge::formats {
namespace {

using namespace detail;

template <typename T>
__global__ void __launch_bounds__(kThreads) hif8_decode_kernel(const Hif8DecodeParams p, const int64_t chunks) {
  const float s = p.scale ? *p.scale : 1.f;
  T* out = static_cast<T*>(p.out);
  for_each_chunk(
      p.n, chunks,
      [&](int64_t i) {
        uint8_t c[kChunk];
        load_bytes(p.codes + i * kChunk, c);
        float v[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) v[j] = hif8::decode(c[j]) / s;
        store_chunk(out + i * kChunk, v);
      },
      [&](int64_t i) { out[i] = from_float<T>(hif8::decode(p.codes[i]) / s); });
}

template <typename T>
cudaError_t decode(const Hif8DecodeParams& p, cudaStream_t stream) {
  const int64_t chunks = aligned_to(p.codes, 8) && aligned_to(p.out, 16) ? p.n / kChunk : 0;
  hif8_decode_kernel<T><<<grid_stride_blocks(work_items(p.n, chunks)), kThreads, 0, stream>>>(p, chunks);
  return cudaGetLastError();
}

// Pass 2 of the E4M3 conversion; *p.scratch holds the bits of max |decode(c)| from pass 1.
__global__ void __launch_bounds__(kThreads) hif8_to_e4m3_kernel(const Hif8ToE4m3Params p, const int64_t chunks) {
  const float factor = ldexpf(1.f, hif8::e4m3_shift(bits_float(*p.scratch)));  // 2^k, exact
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.e4m3_scale_inv) {
    *p.e4m3_scale_inv = 1.f / ((p.scale ? *p.scale : 1.f) * factor);
  }
  for_each_chunk(
      p.n, chunks,
      [&](int64_t i) {
        uint8_t c[kChunk];
        load_bytes(p.codes + i * kChunk, c);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) c[j] = nvfp4::e4m3_satfinite(hif8::decode(c[j]) * factor);
        store_bytes(p.e4m3 + i * kChunk, c);
      },
      [&](int64_t i) { p.e4m3[i] = nvfp4::e4m3_satfinite(hif8::decode(p.codes[i]) * factor); });
}

}  // namespace

cudaError_t launch_hif8_decode(const Hif8DecodeParams& p, cudaStream_t stream) {
  if (p.n < 0) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::f32: return decode<float>(p, stream);
    case DType::f16: return decode<__half>(p, stream);
    case DType::bf16: return decode<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_hif8_to_e4m3(const Hif8ToE4m3Params& p, cudaStream_t stream) {
  if (p.n < 0 || !p.scratch) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  const Hif8Values values{p.codes, p.n, aligned_to(p.codes, 8) ? p.n / kChunk : 0};
  const cudaError_t err = launch_amax(values, p.scratch, stream);
  if (err != cudaSuccess) return err;
  const int64_t chunks = aligned_to(p.codes, 8) && aligned_to(p.e4m3, 8) ? p.n / kChunk : 0;
  hif8_to_e4m3_kernel<<<grid_stride_blocks(work_items(p.n, chunks)), kThreads, 0, stream>>>(p, chunks);
  return cudaGetLastError();
}

}  // namespace difforge::formats
