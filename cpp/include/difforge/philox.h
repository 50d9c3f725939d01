// Counter-based Philox4x32-10 (Salmon et al., SC'11): the one random stream of the library, so CPU and CUDA
// draw the same numbers for the same (seed, offset, index). Torch-free, header-only.
#pragma once

#include "difforge/common.h"

namespace difforge::philox {

struct Uint4 {
  uint32_t x, y, z, w;
};

DF_INLINE uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

DF_INLINE Uint4 round(Uint4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  const uint32_t hi0 = mul_hi(kMul0, c.x), lo0 = kMul0 * c.x;
  const uint32_t hi1 = mul_hi(kMul1, c.z), lo1 = kMul1 * c.z;
  return {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Ten rounds over a 128-bit counter under the key seed.
DF_INLINE Uint4 philox4x32(uint64_t seed, Uint4 c) {
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    c = round(c, k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// The counter (index, offset): one block per element index of a (seed, offset) stream.
DF_INLINE Uint4 philox4x32(uint64_t seed, uint64_t offset, uint64_t index) {
  return philox4x32(seed, Uint4{uint32_t(index), uint32_t(index >> 32), uint32_t(offset), uint32_t(offset >> 32)});
}

// A uniform in [0, 1) on the 2^-24 grid (exact in fp32), from the first word of the block.
DF_INLINE float uniform24(uint64_t seed, uint64_t offset, uint64_t index) {
  return float(philox4x32(seed, offset, index).x >> 8) * (1.f / 16777216.f);
}

}  // namespace difforge::philox
