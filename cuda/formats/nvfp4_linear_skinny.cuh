// W4A16 GEMM for few rows (m <= kSkinnyMaxRows), where reading the 4.5-bit weight is the whole cost. One CTA per
// (32 output columns, 16 rows); its 8 warps split K in slices of 128 and each computes the full 16 x 32 tile over
// its slices, with both operands going from global memory straight into mma fragments (no shared-memory staging):
//   lane (g, t) holds, per slice, codes [32 t, 32 t + 32) of weight rows n0 + 8 j + g (one 16-byte load per
//   8-column block j, plus two scale bytes) and x[row][k0 + 32 t .. + 31] for rows g and g + 8 (16-byte loads).
// The product is K-permuted so that these registers are the fragments: mma q (q = 0..7) of a slice takes from
// lane t the physical k = k0 + 32 t + 4 q + {0, 1, 2, 3} in the fragment slots of kk = {2t, 2t+1, 2t+8, 2t+9}.
// A and B use the same relabelling, a bijection onto those 16 k, so each mma still sums x[., k] W[., k] over its
// k: B is bytes 2q, 2q+1 of the lane's codes, dequantized in registers, and A is words 2q, 2q+1 of its x rows.
// The warps' partial tiles are summed in a fixed order through shared memory (deterministic).
#pragma once

#include "nvfp4_weight.cuh"

namespace difforge::formats::detail {

struct SkinnyTiles {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16;
  static constexpr int kBlockN = 32;
  static constexpr int kColBlocks = kBlockN / 8;  // mma column blocks, all of them in every warp
  static constexpr int kSliceK = 128;             // 32 codes per lane
};

// Rows m <= kSkinnyMaxRows take this kernel (one CTA row per 16 rows, the weight re-read from L2); above it, the
// tiled kernel with its 128-row tiles. A guess pending measurements on the device.
constexpr int64_t kSkinnyMaxRows = 64;

// What one lane loads for one K slice.
struct SkinnySlice {
  uint32_t x_words[2][16];  // rows g and g + 8: elements 32 t .. 32 t + 31 of the slice, two per word
  WeightCodes32 w[SkinnyTiles::kColBlocks];
};

// Elements [k_first, k_first + 32) of x row `row` as 16-bit pairs; rows past m and 16-blocks past k are zero.
template <typename T>
__device__ __forceinline__ void load_x32(uint32_t (&words)[16], const Nvfp4LinearParams& p, bool vector, int64_t row,
                                         int64_t k_first) {
#pragma unroll
  for (int i = 0; i < 16; ++i) words[i] = 0u;
  if (row >= p.m) return;
  const T* src = static_cast<const T*>(p.x) + row * p.x_row_stride + k_first;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (k_first + kCodesPerScale * h >= p.k) break;
    const T* half = src + kCodesPerScale * h;
    if (vector) {
      const uint4* chunks = reinterpret_cast<const uint4*>(half);
      const uint4 lo = __ldg(chunks), hi = __ldg(chunks + 1);
      words[8 * h + 0] = lo.x, words[8 * h + 1] = lo.y, words[8 * h + 2] = lo.z, words[8 * h + 3] = lo.w;
      words[8 * h + 4] = hi.x, words[8 * h + 5] = hi.y, words[8 * h + 6] = hi.z, words[8 * h + 7] = hi.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) words[8 * h + i] = bits16(half[2 * i]) | bits16(half[2 * i + 1]) << 16;
    }
  }
}

template <typename T>
__device__ __forceinline__ SkinnySlice load_skinny_slice(const Nvfp4LinearParams& p, const LinearAccess& access,
                                                         int64_t m0, int64_t n0, int64_t slice, int lane) {
  const int g = lane / 4, t = lane % 4;
  const int64_t k_first = slice * SkinnyTiles::kSliceK + 32 * t;
  SkinnySlice s;
  load_x32<T>(s.x_words[0], p, access.x_vector, m0 + g, k_first);
  load_x32<T>(s.x_words[1], p, access.x_vector, m0 + g + 8, k_first);
#pragma unroll
  for (int j = 0; j < SkinnyTiles::kColBlocks; ++j) {
    s.w[j] = load_weight_codes32(p, n0 + 8 * j + g, k_first / kCodesPerScale, access.weight_load_bytes);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ void mma_skinny_slice(FragC (&acc)[SkinnyTiles::kColBlocks], const SkinnySlice& s,
                                                 const float* e2m1_table) {
  constexpr int kColBlocks = SkinnyTiles::kColBlocks;
  float block_scale[kColBlocks][2];
#pragma unroll
  for (int j = 0; j < kColBlocks; ++j) {
    block_scale[j][0] = nvfp4::e4m3_value(uint8_t(s.w[j].scales));
    block_scale[j][1] = nvfp4::e4m3_value(uint8_t(s.w[j].scales >> 8));
  }
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    FragA a;
    a.x[0] = s.x_words[0][2 * q];
    a.x[1] = s.x_words[1][2 * q];
    a.x[2] = s.x_words[0][2 * q + 1];
    a.x[3] = s.x_words[1][2 * q + 1];
#pragma unroll
    for (int j = 0; j < kColBlocks; ++j) {
      const uint32_t bytes = word_of(s.w[j].codes, q / 2) >> (16 * (q % 2));  // bytes 2q, 2q + 1 in bits 0-15
      const float sf = block_scale[j][q / 4];                                  // codes 4q.. lie in 16-block q / 4
      mma_16816<T>(acc[j], a, dequantize_pair<T>(bytes & 0xFFu, sf, e2m1_table),
                   dequantize_pair<T>((bytes >> 8) & 0xFFu, sf, e2m1_table));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(SkinnyTiles::kThreads)
    nvfp4_linear_skinny_kernel(const Nvfp4LinearParams p, const LinearAccess access) {
  using S = SkinnyTiles;
  __shared__ float e2m1_table[16];
  __shared__ float partial[S::kWarps][S::kBlockM][S::kBlockN];
  fill_e2m1_table(e2m1_table);
  __syncthreads();
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = int64_t(blockIdx.x) * S::kBlockN, m0 = int64_t(blockIdx.y) * S::kBlockM;
  const int64_t slices = ceil_div(p.k, S::kSliceK);

  FragC acc[S::kColBlocks];
#pragma unroll
  for (int j = 0; j < S::kColBlocks; ++j) acc[j].zero();
  if (warp < slices) {
    // The next slice's loads are issued before this slice's mma: two slices in flight per warp.
    SkinnySlice current = load_skinny_slice<T>(p, access, m0, n0, warp, lane);
    for (int64_t s = warp; s < slices; s += S::kWarps) {
      const bool prefetch = s + S::kWarps < slices;
      SkinnySlice next;
      if (prefetch) next = load_skinny_slice<T>(p, access, m0, n0, s + S::kWarps, lane);
      mma_skinny_slice<T>(acc, current, e2m1_table);
      if (prefetch) current = next;
    }
  }

#pragma unroll
  for (int j = 0; j < S::kColBlocks; ++j) {
    partial[warp][g][8 * j + 2 * t] = acc[j].x[0];
    partial[warp][g][8 * j + 2 * t + 1] = acc[j].x[1];
    partial[warp][g + 8][8 * j + 2 * t] = acc[j].x[2];
    partial[warp][g + 8][8 * j + 2 * t + 1] = acc[j].x[3];
  }
  __syncthreads();
  const float alpha = linear_alpha(p);
  T* out = static_cast<T*>(p.out);
  for (int idx = int(threadIdx.x); idx < S::kBlockM * S::kBlockN; idx += S::kThreads) {
    const int r = idx / S::kBlockN, c = idx % S::kBlockN;
    const int64_t row = m0 + r, col = n0 + c;
    if (row >= p.m || col >= p.n) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) sum += partial[w][r][c];
    out[row * p.n + col] = from_float<T>(linear_output<T>(p, alpha, sum, col));
  }
}

}  // namespace difforge::formats::detail
