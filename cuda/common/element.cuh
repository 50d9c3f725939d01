// Element types of the CUDA kernels, shared by every family: DType -> the device type, and the
// float conversions the kernels accumulate through. Torch-free: compiled by nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

}  // namespace difforge::cuda
