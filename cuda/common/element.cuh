// Element types of the CUDA kernels, shared by every family: DType -> the device type, and the
// float conversions the kernels accumulate through. Torch-free: compiled by nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "difforge/common.h"

namespace difforge::cuda {

template <DType D> struct dtype_traits;
template <> struct dtype_traits<DType::f32> { using type = float; };
template <> struct dtype_traits<DType::f16> { using type = __half; };
template <> struct dtype_traits<DType::bf16> { using type = __nv_bfloat16; };
template <DType D> using elem_t = typename dtype_traits<D>::type;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Two floats rounded (nearest even) to the 16-bit T and packed into one 32-bit word, `lo` in the low
// half: the element with the smaller index, as vector stores, ldmatrix and the mma fragments expect.
template <typename T>
__device__ __forceinline__ uint32_t pack_two(float lo, float hi) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  uint32_t u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h2 = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h2, 4);
  } else {
    const __half2 h2 = __floats2half2_rn(lo, hi);
    memcpy(&u, &h2, 4);
  }
  return u;
}

}  // namespace difforge::cuda
