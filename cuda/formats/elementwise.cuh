// Device vocabulary of the formats family's elementwise kernels (the HiF8 passes, the NVFP4 codec): grid-stride
// loops over 8-element chunks moved with 16-byte loads and stores, and 8-byte code chunks. Torch-free: compiled
// by nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/element.cuh"
#include "difforge/common.h"

namespace difforge::formats::detail {

using difforge::cuda::from_float;
using difforge::cuda::pack_two;
using difforge::cuda::to_float;

constexpr int kThreads = 256;
// Grid-stride kernels stop at this many blocks: several waves of an H100, and few enough that an amax pass ends
// in about a thousand atomics.
constexpr int kMaxBlocks = 1024;
// Elements per vector step: 16 bytes of 16-bit data, two float4 of fp32, 8 bytes of codes.
constexpr int kChunk = 8;

inline bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Outputs that are not requested (null) constrain nothing.
inline bool null_or_aligned_to(const void* p, uintptr_t bytes) { return p == nullptr || aligned_to(p, bytes); }

inline int grid_stride_blocks(int64_t work_items) {
  return int(std::min<int64_t>(ceil_div(work_items, kThreads), kMaxBlocks));
}

// The chunks of n elements a kernel moves with vector loads (0 when some pointer is misaligned) plus the
// elements after them, i.e. the iterations of for_each_chunk.
inline int64_t work_items(int64_t n, int64_t chunks) { return chunks + (n - chunks * kChunk); }

// Grid-stride: chunk_fn(i) for chunks [0, chunks), then element_fn(i) for elements [chunks * kChunk, n).
template <typename ChunkFn, typename ElementFn>
__device__ __forceinline__ void for_each_chunk(int64_t n, int64_t chunks, ChunkFn&& chunk_fn,
                                               ElementFn&& element_fn) {
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < chunks; i += stride) chunk_fn(i);
  for (int64_t i = chunks * kChunk + first; i < n; i += stride) element_fn(i);
}

// ---- 16-bit element bits -------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float float_from_bits16(uint32_t b) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(uint16_t(b)));
  else return __bfloat162float(__ushort_as_bfloat16(uint16_t(b)));
}

template <typename T>
__device__ __forceinline__ uint32_t bits16(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(x);
  else return __bfloat16_as_ushort(x);
}

// ---- chunks of 8 elements --------------------------------------------------------------------------------------

// v = src[0 .. 7] widened to fp32; src 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, float (&v)[kChunk]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(src)), b = __ldg(reinterpret_cast<const float4*>(src) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(src));
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = float_from_bits16<T>(words[i] & 0xFFFFu);
      v[2 * i + 1] = float_from_bits16<T>(words[i] >> 16);
    }
  }
}

// dst[0 .. 7] = v rounded to T (nearest even); dst 16-byte aligned.
template <typename T>
__device__ __forceinline__ void store_chunk(T* dst, const float (&v)[kChunk]) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack_two<T>(v[0], v[1]), pack_two<T>(v[2], v[3]),
                                                 pack_two<T>(v[4], v[5]), pack_two<T>(v[6], v[7]));
  }
}

// Eight bytes (codes) at an 8-byte aligned address.
__device__ __forceinline__ void load_bytes(const uint8_t* src, uint8_t (&b)[kChunk]) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(src));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b[i] = uint8_t(u.x >> (8 * i));
    b[i + 4] = uint8_t(u.y >> (8 * i));
  }
}

__device__ __forceinline__ void store_bytes(uint8_t* dst, const uint8_t (&b)[kChunk]) {
  uint2 u = make_uint2(0u, 0u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    u.x |= uint32_t(b[i]) << (8 * i);
    u.y |= uint32_t(b[i + 4]) << (8 * i);
  }
  *reinterpret_cast<uint2*>(dst) = u;
}

}  // namespace difforge::formats::detail
