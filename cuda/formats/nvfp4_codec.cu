// NVFP4 quantizer and dequantizer (spec §4), one thread per 1 x 16 block: 16 elements read with vector loads,
// 8 packed bytes written with one store. The per-element math is nvfp4.h's, so the codes and scale bytes are
// those of the CPU kernel bit for bit. 2D blocks: one thread per 16 x 16 tile, which finds the tile amax once
// and then quantizes the tile's (up to 16) 1 x 16 blocks with it.
#include <climits>

#include "difforge/formats_cuda.h"
#include "difforge/nvfp4.h"
#include "elementwise.cuh"

namespace difforge::formats {
namespace {

using namespace detail;

constexpr int kBlock = nvfp4::kBlock;

// The 16 elements of one block, widened to fp32; vector: src 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_block(const T* src, bool vector, float (&v)[kBlock]) {
  if (vector) {
    float half[kChunk];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_chunk(src + h * kChunk, half);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) v[h * kChunk + i] = half[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kBlock; ++i) v[i] = to_float(src[i]);
  }
}

// max |v| as a bit-pattern max: a NaN in the block survives (fmaxf would drop it) and gives the NaN scale byte.
__device__ __forceinline__ uint32_t block_amax_bits(const float (&v)[kBlock]) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kBlock; ++i) m = max(m, float_bits(v[i]) & 0x7FFFFFFFu);
  return m;
}

// Scale byte and the 8 packed bytes of block (row, j).
__device__ __forceinline__ void quantize_block(const Nvfp4QuantizeParams& p, const float (&v)[kBlock], float amax,
                                               float pts, int64_t row, int64_t j, bool vector_store) {
  const nvfp4::BlockScale bs = nvfp4::block_scale(amax, pts);
  p.scales[row * (p.cols / kBlock) + j] = bs.code;
  uint32_t words[2] = {0u, 0u};  // element c in bits 4 (c % 8) of word c / 8: byte b = code 2b | code 2b+1 << 4
  const int64_t index0 = row * p.cols + j * kBlock;
#pragma unroll
  for (int c = 0; c < kBlock; ++c) {
    const uint32_t code = p.stochastic ? nvfp4::encode_sr(v[c], bs.reciprocal, p.seed, p.offset, uint64_t(index0 + c))
                                       : nvfp4::encode_rn(v[c], bs.reciprocal);
    words[c / 8] |= code << (4 * (c % 8));
  }
  uint8_t* dst = p.packed + row * (p.cols / 2) + j * (kBlock / 2);
  if (vector_store) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  } else {
#pragma unroll
    for (int b = 0; b < kBlock / 2; ++b) dst[b] = uint8_t(words[b / 4] >> (8 * (b % 4)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_kernel(const Nvfp4QuantizeParams p, bool vector_load,
                                                                  bool vector_store) {
  const int64_t blocks_per_row = p.cols / kBlock;
  const int64_t row_groups = p.block_2d ? ceil_div(p.rows, kBlock) : p.rows;
  const int64_t id = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= row_groups * blocks_per_row) return;
  const int64_t j = id % blocks_per_row, group = id / blocks_per_row;
  const float pts = p.pts ? *p.pts : 0.f;
  const T* x = static_cast<const T*>(p.x) + j * kBlock;
  float v[kBlock];
  if (!p.block_2d) {
    load_block(x + group * p.x_row_stride, vector_load, v);
    quantize_block(p, v, bits_float(block_amax_bits(v)), pts, group, j, vector_store);
    return;
  }
  const int64_t row0 = group * kBlock, row_end = min(p.rows, row0 + kBlock);
  uint32_t tile_amax = 0;
  for (int64_t r = row0; r < row_end; ++r) {
    load_block(x + r * p.x_row_stride, vector_load, v);
    tile_amax = max(tile_amax, block_amax_bits(v));
  }
  for (int64_t r = row0; r < row_end; ++r) {  // the second read of the tile hits L1
    load_block(x + r * p.x_row_stride, vector_load, v);
    quantize_block(p, v, bits_float(tile_amax), pts, r, j, vector_store);
  }
}

// out[row, 16 j .. 16 j + 15] = e2m1 value * block decode scale, rounded to T.
template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_dequantize_kernel(const Nvfp4DequantizeParams p, bool vector_io) {
  const int64_t blocks_per_row = p.cols / kBlock;
  const int64_t id = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= p.rows * blocks_per_row) return;
  const int64_t j = id % blocks_per_row, row = id / blocks_per_row;
  const float scale = nvfp4::block_decode_scale(p.scales[id], p.pts ? *p.pts : 0.f);  // scales: [rows, cols/16]
  const uint8_t* src = p.packed + row * (p.cols / 2) + j * (kBlock / 2);
  T* dst = static_cast<T*>(p.out) + row * p.cols + j * kBlock;
  uint8_t bytes[kChunk];
  if (vector_io) {
    load_bytes(src, bytes);
  } else {
#pragma unroll
    for (int b = 0; b < kChunk; ++b) bytes[b] = src[b];
  }
  float v[kBlock];
#pragma unroll
  for (int b = 0; b < kChunk; ++b) {
    v[2 * b] = nvfp4::e2m1_value(bytes[b] & 0xFu) * scale;
    v[2 * b + 1] = nvfp4::e2m1_value(bytes[b] >> 4) * scale;
  }
  if (vector_io) {
    float half[kChunk];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) half[i] = v[h * kChunk + i];
      store_chunk(dst + h * kChunk, half);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kBlock; ++i) dst[i] = from_float<T>(v[i]);
  }
}

int one_thread_per_item_blocks(int64_t items) { return int(ceil_div(items, kThreads)); }

template <typename T>
cudaError_t quantize(const Nvfp4QuantizeParams& p, cudaStream_t stream) {
  // Vector loads need every block start 16-byte aligned: the base and the row stride in bytes.
  const bool vector_load = aligned_to(p.x, 16) && (p.x_row_stride * int64_t(sizeof(T))) % 16 == 0;
  const int64_t row_groups = p.block_2d ? ceil_div(p.rows, kBlock) : p.rows;
  const int64_t threads = row_groups * (p.cols / kBlock);
  if (ceil_div(threads, kThreads) > INT32_MAX) return cudaErrorInvalidValue;
  nvfp4_quantize_kernel<T><<<one_thread_per_item_blocks(threads), kThreads, 0, stream>>>(p, vector_load,
                                                                                        aligned_to(p.packed, 8));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dequantize(const Nvfp4DequantizeParams& p, cudaStream_t stream) {
  const bool vector_io = aligned_to(p.packed, 8) && aligned_to(p.out, 16);
  const int64_t threads = p.rows * (p.cols / kBlock);
  if (ceil_div(threads, kThreads) > INT32_MAX) return cudaErrorInvalidValue;
  nvfp4_dequantize_kernel<T><<<one_thread_per_item_blocks(threads), kThreads, 0, stream>>>(p, vector_io);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_nvfp4_quantize(const Nvfp4QuantizeParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.cols % kBlock != 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::f32: return quantize<float>(p, stream);
    case DType::f16: return quantize<__half>(p, stream);
    case DType::bf16: return quantize<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_nvfp4_dequantize(const Nvfp4DequantizeParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.cols % kBlock != 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::f32: return dequantize<float>(p, stream);
    case DType::f16: return dequantize<__half>(p, stream);
    case DType::bf16: return dequantize<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace difforge::formats
