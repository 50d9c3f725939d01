// Macros shared by host (g++) and device (nvcc) code. Torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DF_HOST_DEVICE __host__ __device__
#define DF_DEVICE __device__
#else
#define DF_HOST_DEVICE
#define DF_DEVICE
#endif

#define DF_INLINE DF_HOST_DEVICE inline

namespace difforge {

// Element types crossing the torch-free boundary (cuda/ launchers, shared plans).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };  // f64: CPU only (gradcheck)

DF_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp32 <-> its IEEE bit pattern (the bit-level codecs work on patterns).
DF_INLINE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

DF_INLINE float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

}  // namespace difforge
