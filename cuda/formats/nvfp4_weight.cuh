// The NVFP4 weight operand of the W4A16 GEMM (nvfp4_linear_*.cuh) and what both of its kernels share: 32
// consecutive codes of one weight row (two 16-blocks) with their two scale bytes, fetched with one 16-byte load;
// their exact dequantization to 16-bit pairs e2m1_value(code) * e4m3_value(scale) (<= 6 significant bits,
// magnitudes 2^-10 .. 2688: exact in bf16 and fp16); the epilogue alpha * acc + bias. Torch-free.
#pragma once

#include <cstdint>

#include "attention/flash_common.cuh"
#include "difforge/formats.h"
#include "difforge/nvfp4.h"
#include "elementwise.cuh"

namespace difforge::formats::detail {

using attention::detail::FragA;
using attention::detail::FragC;
using attention::detail::mma_16816;

constexpr int kCodesPerScale = nvfp4::kBlock;

// How the kernels may read and write global memory, decided on the host from pointers and strides.
struct LinearAccess {
  bool x_vector;          // x rows 16-byte aligned: 16-byte loads / cp.async, else element loads
  int weight_load_bytes;  // 16, 8 or 1: the widest load the packed weight's alignment allows
  bool out_pairs;         // out 4-byte aligned: two outputs per store
};

struct WeightCodes32 {
  uint4 codes;      // 16 packed bytes: code 2i in the low nibble of byte i
  uint32_t scales;  // scale byte of the first 16-block in bits 0-7, of the second in bits 8-15
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Codes of 16-blocks `block` and `block` + 1 (block even) of weight row `row`; blocks past k and rows past n
// read as zero codes with zero scales, i.e. zero weights.
__device__ __forceinline__ WeightCodes32 load_weight_codes32(const Nvfp4LinearParams& p, int64_t row, int64_t block,
                                                            int load_bytes) {
  WeightCodes32 w{make_uint4(0u, 0u, 0u, 0u), 0u};
  const int64_t blocks_per_row = p.k / kCodesPerScale;
  if (row >= p.n || block >= blocks_per_row) return w;
  const bool second = block + 1 < blocks_per_row;
  const uint8_t* scales = p.w_scales + row * blocks_per_row + block;
  w.scales = __ldg(scales) | (second ? uint32_t(__ldg(scales + 1)) << 8 : 0u);
  const uint8_t* src = p.w_packed + row * (p.k / 2) + block * (kCodesPerScale / 2);
  if (load_bytes == 16 && second) {
    w.codes = __ldg(reinterpret_cast<const uint4*>(src));
  } else if (load_bytes >= 8) {
    const uint2 first_half = __ldg(reinterpret_cast<const uint2*>(src));
    const uint2 second_half = second ? __ldg(reinterpret_cast<const uint2*>(src) + 1) : make_uint2(0u, 0u);
    w.codes = make_uint4(first_half.x, first_half.y, second_half.x, second_half.y);
  } else {
    uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      if (b < 8 || second) words[b / 4] |= uint32_t(__ldg(src + b)) << (8 * (b % 4));
    }
    w.codes = make_uint4(words[0], words[1], words[2], words[3]);
  }
  return w;
}

// e2m1_value of the 16 codes in shared memory: one LDS per code (16 distinct words in 16 banks: conflict-free)
// instead of the selects and int -> float converts of the function. Threads 0-15 fill it; sync before use.
__device__ __forceinline__ void fill_e2m1_table(float* table) {
  if (threadIdx.x < 16) table[threadIdx.x] = nvfp4::e2m1_value(threadIdx.x);
}

// The two codes of `byte` (code 2i low: the element with the smaller k) times their block's e4m3_value, as the
// packed 16-bit pair the mma fragments hold. Both roundings to T are exact.
template <typename T>
__device__ __forceinline__ uint32_t dequantize_pair(uint32_t byte, float block_scale, const float* e2m1_table) {
  return pack_two<T>(e2m1_table[byte & 15u] * block_scale, e2m1_table[(byte >> 4) & 15u] * block_scale);
}

// The per-tensor scale, applied once to the fp32 sums (pts <= 0 or absent: one-level, as block_decode_scale).
__device__ __forceinline__ float linear_alpha(const Nvfp4LinearParams& p) {
  return p.w_pts && *p.w_pts > 0.f ? *p.w_pts : 1.f;
}

template <typename T>
__device__ __forceinline__ float linear_output(const Nvfp4LinearParams& p, float alpha, float acc, int64_t col) {
  return alpha * acc + (p.bias ? to_float(static_cast<const T*>(p.bias)[col]) : 0.f);
}

}  // namespace difforge::formats::detail
