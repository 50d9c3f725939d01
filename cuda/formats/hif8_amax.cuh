// amax(|v|) of a tensor into one device word, for the per-tensor HiF8 scales (spec §2, §3). The word holds the
// fp32 bit pattern of the amax: non-negative floats order like their patterns, so the reduction is an integer
// max (atomicMax across blocks), and NaN patterns sort above +Inf, so a NaN anywhere reads back as non-finite
// (hif8::scale_for then gives s = 1). The caller zeroes nothing: launch_amax clears the word first.
#pragma once

#include "difforge/hif8.h"
#include "elementwise.cuh"

namespace difforge::formats::detail {

__device__ __forceinline__ uint32_t magnitude_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

// The values of x widened to fp32.
template <typename T>
struct TensorValues {
  const T* x;
  int64_t n, chunks;  // chunks: the leading 8-element chunks read with vector loads (0: x misaligned)

  __device__ __forceinline__ void chunk(int64_t i, float (&v)[kChunk]) const { load_chunk(x + i * kChunk, v); }
  __device__ __forceinline__ float element(int64_t i) const { return to_float(x[i]); }
};

// The values of HiF8 codes (not divided by any scale).
struct Hif8Values {
  const uint8_t* codes;
  int64_t n, chunks;

  __device__ __forceinline__ void chunk(int64_t i, float (&v)[kChunk]) const {
    uint8_t c[kChunk];
    load_bytes(codes + i * kChunk, c);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = hif8::decode(c[j]);
  }
  __device__ __forceinline__ float element(int64_t i) const { return hif8::decode(codes[i]); }
};

// Max of v over the block into *word; every thread of the block calls it.
__device__ __forceinline__ void block_max_into(uint32_t v, uint32_t* word) {
  constexpr int kWarps = kThreads / 32;
  __shared__ uint32_t warp_max[kWarps];
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  v = __reduce_max_sync(0xffffffffu, v);
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = __reduce_max_sync(0xffffffffu, lane < kWarps ? warp_max[lane] : 0u);
    if (lane == 0) atomicMax(word, v);
  }
}

template <typename Values>
__global__ void __launch_bounds__(kThreads) amax_bits_kernel(const Values values, uint32_t* amax_bits) {
  uint32_t m = 0;
  for_each_chunk(
      values.n, values.chunks,
      [&](int64_t i) {
        float v[kChunk];
        values.chunk(i, v);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) m = max(m, magnitude_bits(v[j]));
      },
      [&](int64_t i) { m = max(m, magnitude_bits(values.element(i))); });
  block_max_into(m, amax_bits);
}

// *amax_bits = bits of max |values| (0 first: the word may hold the previous call's amax).
template <typename Values>
cudaError_t launch_amax(const Values& values, uint32_t* amax_bits, cudaStream_t stream) {
  const cudaError_t err = cudaMemsetAsync(amax_bits, 0, sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  amax_bits_kernel<<<grid_stride_blocks(work_items(values.n, values.chunks)), kThreads, 0, stream>>>(values,
                                                                                                   amax_bits);
  return cudaGetLastError();
}

}  // namespace difforge::formats::detail
