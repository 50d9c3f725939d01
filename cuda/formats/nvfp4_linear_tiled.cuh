// W4A16 GEMM for many rows: a tiled mma.sync m16n8k16 kernel. CTA tile kBlockM x 128 columns, K steps of 64;
// 8 warps as 2 (M) x 4 (N), warp tile (kBlockM / 2) x 32. Per K step, the x tile arrives by cp.async in a swizzled
// shared tile, and the weight tile (128 rows x 32 bytes + scales) goes from global memory into registers (one
// 16-byte load per thread), is dequantized exactly and stored as 16-bit T into a swizzled B tile that the warps
// read with ldmatrix like any K-contiguous operand (x Wᵀ is the flash kernels' "NT" product). Both tiles are
// double-buffered, so one barrier per K step suffices: it publishes A and B of this step and retires every read of
// the other stage, which this step then refills while its mma runs. The weight is read once per M tile, and no
// dequantized weight ever reaches global memory.
#pragma once

#include "nvfp4_weight.cuh"

namespace difforge::formats::detail {

using attention::detail::cp_async_16;
using attention::detail::cp_async_commit;
using attention::detail::cp_async_wait;
using attention::detail::ldmatrix_x4;
using attention::detail::swizzle;

template <int kBlockM_>
struct TiledTiles {
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = 128;
  static constexpr int kBlockK = 64;
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kBlockM / kWarpsM, kWarpN = kBlockN / kWarpsN;
  static constexpr int kRowBlocks = kWarpM / 16, kColBlocks = kWarpN / 8;
  static constexpr int kATileElems = kBlockM * kBlockK, kBTileElems = kBlockN * kBlockK;
  // Dynamic shared memory: two A stages, two B stages (16-bit elements), then the e2m1 table.
  static constexpr int kSmemBytes = 2 * (kATileElems + kBTileElems) * 2 + 16 * int(sizeof(float));
  static_assert(kBlockN * kBlockK / 32 == kThreads, "each thread dequantizes 32 codes of a weight tile");
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tiles of whole ldmatrix.x4 blocks");
};

// x[m0 .. m0 + kBlockM, k0 .. k0 + kBlockK] into the swizzled tile; rows past m and 8-element chunks past k are
// zero. Misaligned x rows take element loads and plain shared stores instead of cp.async.
template <typename Tiles, typename T>
__device__ __forceinline__ void load_x_tile(T* tile, const Nvfp4LinearParams& p, const LinearAccess& access,
                                            int64_t m0, int64_t k0) {
  constexpr int kChunks = Tiles::kBlockK / 8;
  static_assert(Tiles::kBlockM * kChunks % Tiles::kThreads == 0, "every thread moves the same number of chunks");
  const T* x = static_cast<const T*>(p.x);
#pragma unroll
  for (int it = 0; it < Tiles::kBlockM * kChunks / Tiles::kThreads; ++it) {
    const int idx = int(threadIdx.x) + it * Tiles::kThreads, row = idx / kChunks, c = idx % kChunks;
    const bool valid = m0 + row < p.m && k0 + 8 * c < p.k;  // k % 16 == 0: chunks are whole
    const T* src = valid ? x + (m0 + row) * p.x_row_stride + k0 + 8 * c : x;
    T* dst = tile + swizzle<Tiles::kBlockK>(row, 8 * c);
    if (access.x_vector) {
      cp_async_16(dst, src, valid);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (valid) {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = bits16(src[2 * i]) | bits16(src[2 * i + 1]) << 16;
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// This thread's 32 weight codes of K step `step`: row n0 + thread / 2, columns 32 (thread % 2) .. + 31.
template <typename Tiles>
__device__ __forceinline__ WeightCodes32 tile_weight_codes(const Nvfp4LinearParams& p, const LinearAccess& access,
                                                           int64_t n0, int64_t step) {
  const int64_t block = step * (Tiles::kBlockK / kCodesPerScale) + 2 * (threadIdx.x % 2);
  return load_weight_codes32(p, n0 + threadIdx.x / 2, block, access.weight_load_bytes);
}

template <typename Tiles, typename T>
__device__ __forceinline__ void store_dequantized(T* tile, const WeightCodes32& w, const float* e2m1_table) {
  const int row = int(threadIdx.x) / 2, col0 = 32 * (int(threadIdx.x) % 2);
  const float block_scale[2] = {nvfp4::e4m3_value(uint8_t(w.scales)), nvfp4::e4m3_value(uint8_t(w.scales >> 8))};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // word i: codes 8i .. 8i + 7, in 16-block i / 2
    const uint32_t word = word_of(w.codes, i);
    const float sf = block_scale[i / 2];
    uint32_t pairs[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) pairs[b] = dequantize_pair<T>((word >> (8 * b)) & 0xFFu, sf, e2m1_table);
    *reinterpret_cast<uint4*>(tile + swizzle<Tiles::kBlockK>(row, col0 + 8 * i)) =
        make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
}

// acc += A[a_row0 .., 0 .. W) B[b_row0 .., 0 .. W)^T over a warp tile of kRowBlocks x 16 rows and kColBlocks x 8
// columns, both tiles swizzled rows of W elements. warp_gemm_nt's ldmatrix addressing, but accumulating across K
// steps and sharing every B fragment among the warp's row blocks (warp_gemm_nt zeroes C, one 16-row block).
template <typename T, int W, int kRowBlocks, int kColBlocks>
__device__ __forceinline__ void warp_tile_mma_nt(FragC (&acc)[kRowBlocks][kColBlocks], const T* a_tile, int a_row0,
                                                 const T* b_tile, int b_row0, int lane) {
  static_assert(kColBlocks % 2 == 0, "B fragments come in pairs of 8-column blocks");
#pragma unroll
  for (int kk = 0; kk < W / 16; ++kk) {
    FragA a[kRowBlocks];
#pragma unroll
    for (int i = 0; i < kRowBlocks; ++i) {
      ldmatrix_x4(a[i].x, a_tile + swizzle<W>(a_row0 + 16 * i + lane % 16, kk * 16 + (lane / 16) * 8));
    }
#pragma unroll
    for (int np = 0; np < kColBlocks / 2; ++np) {
      uint32_t b[4];
      const int b_row = b_row0 + np * 16 + (lane / 16) * 8 + lane % 8;
      ldmatrix_x4(b, b_tile + swizzle<W>(b_row, kk * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
      for (int i = 0; i < kRowBlocks; ++i) {
        mma_16816<T>(acc[i][2 * np], a[i], b[0], b[1]);
        mma_16816<T>(acc[i][2 * np + 1], a[i], b[2], b[3]);
      }
    }
  }
}

// Two CTAs per SM (<= 128 registers: ptxas spills 8 bytes, against 172 registers and one CTA unbounded), so that
// one CTA's mma covers the other's barrier and global loads.
template <typename T, int kBlockM>
__global__ void __launch_bounds__(TiledTiles<kBlockM>::kThreads, 2)
    nvfp4_linear_tiled_kernel(const Nvfp4LinearParams p, const LinearAccess access) {
  using Tiles = TiledTiles<kBlockM>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* a_tiles = reinterpret_cast<T*>(smem);
  T* b_tiles = a_tiles + 2 * Tiles::kATileElems;
  float* e2m1_table = reinterpret_cast<float*>(b_tiles + 2 * Tiles::kBTileElems);
  fill_e2m1_table(e2m1_table);
  __syncthreads();
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int warp_m = warp / Tiles::kWarpsN, warp_n = warp % Tiles::kWarpsN;
  const int64_t n0 = int64_t(blockIdx.x) * Tiles::kBlockN, m0 = int64_t(blockIdx.y) * kBlockM;
  const int64_t steps = ceil_div(p.k, Tiles::kBlockK);

  FragC acc[Tiles::kRowBlocks][Tiles::kColBlocks];
#pragma unroll
  for (int i = 0; i < Tiles::kRowBlocks; ++i) {
#pragma unroll
    for (int j = 0; j < Tiles::kColBlocks; ++j) acc[i][j].zero();
  }
  if (steps > 0) {
    load_x_tile<Tiles>(a_tiles, p, access, m0, 0);
    cp_async_commit();
    store_dequantized<Tiles>(b_tiles, tile_weight_codes<Tiles>(p, access, n0, 0), e2m1_table);
  }
  for (int64_t step = 0; step < steps; ++step) {
    const int stage = int(step & 1);
    cp_async_wait<0>();
    __syncthreads();
    const bool more = step + 1 < steps;
    WeightCodes32 next{};
    if (more) {  // loads of step + 1 in flight during this step's mma
      load_x_tile<Tiles>(a_tiles + (stage ^ 1) * Tiles::kATileElems, p, access, m0, (step + 1) * Tiles::kBlockK);
      cp_async_commit();
      next = tile_weight_codes<Tiles>(p, access, n0, step + 1);
    }
    warp_tile_mma_nt<T, Tiles::kBlockK>(acc, a_tiles + stage * Tiles::kATileElems, warp_m * Tiles::kWarpM,
                                        b_tiles + stage * Tiles::kBTileElems, warp_n * Tiles::kWarpN, lane);
    if (more) store_dequantized<Tiles>(b_tiles + (stage ^ 1) * Tiles::kBTileElems, next, e2m1_table);
  }

  const float alpha = linear_alpha(p);
  const int g = lane / 4, t = lane % 4;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < Tiles::kRowBlocks; ++i) {
#pragma unroll
    for (int j = 0; j < Tiles::kColBlocks; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // C fragment halves: rows g and g + 8
        const int64_t row = m0 + warp_m * Tiles::kWarpM + 16 * i + 8 * h + g;
        const int64_t col = n0 + warp_n * Tiles::kWarpN + 8 * j + 2 * t;  // even; n even, so col + 1 < n too
        if (row >= p.m || col >= p.n) continue;
        const float v0 = linear_output<T>(p, alpha, acc[i][j].x[2 * h], col);
        const float v1 = linear_output<T>(p, alpha, acc[i][j].x[2 * h + 1], col + 1);
        T* dst = out + row * p.n + col;
        if (access.out_pairs) {
          *reinterpret_cast<uint32_t*>(dst) = pack_two<T>(v0, v1);
        } else {
          dst[0] = from_float<T>(v0);
          dst[1] = from_float<T>(v1);
        }
      }
    }
  }
}

}  // namespace difforge::formats::detail
