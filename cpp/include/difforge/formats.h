// Parameters of the formats family's kernels (HiF8 and NVFP4 codecs, quantized GEMMs), shared by the CPU
// (cpp/formats) and CUDA (cuda/formats) implementations. Torch-free. Math: hif8.h and nvfp4.h.
#pragma once

#include "difforge/common.h"
#include "difforge/hif8.h"

namespace difforge::formats {

// One pass over n elements of x that writes whichever outputs are non-null, all from the same codes
// c = hif8::encode(fp32(x * s)):
//   codes: c;  qdq: decode(c) / s in qdq_dtype (fake quantization);  e4m3: e4m3_rn(decode(c) * 2^shift).
// The scale s is *scale_in when given, else target / amax(|x|) (1 when amax is 0 or not finite) when
// target > 0, else 1. scale_out receives s, e4m3_scale_inv receives 1 / (s * 2^shift).
struct Hif8Params {
  const void* x = nullptr;
  DType dtype = DType::f32;
  int64_t n = 0;
  const float* scale_in = nullptr;
  float target = 0.f;
  bool saturate = false;
  hif8::Rounding rounding = hif8::Rounding::ta;
  uint8_t* codes = nullptr;
  void* qdq = nullptr;
  DType qdq_dtype = DType::f32;
  uint8_t* e4m3 = nullptr;
  int shift = 0;
  float* scale_out = nullptr;
  float* e4m3_scale_inv = nullptr;
  uint32_t* scratch = nullptr;  // CUDA: one zeroed word for the amax reduction
};

// out = decode(codes) / *scale (scale null: 1).
struct Hif8DecodeParams {
  const uint8_t* codes = nullptr;
  int64_t n = 0;
  const float* scale = nullptr;
  void* out = nullptr;
  DType dtype = DType::f32;
};

// HiF8 codes already scaled by s (value = decode(c) / s) to E4M3 for the FP8 GEMM: e4m3 = e4m3_rn(decode(c)
// * 2^k) with k = hif8::e4m3_shift(max |decode(c)|), e4m3_scale_inv = 1 / (s * 2^k).
struct Hif8ToE4m3Params {
  const uint8_t* codes = nullptr;
  int64_t n = 0;
  const float* scale = nullptr;
  uint8_t* e4m3 = nullptr;
  float* e4m3_scale_inv = nullptr;
  uint32_t* scratch = nullptr;  // CUDA: one zeroed word for the amax reduction
};

// x viewed as [rows, cols] (cols % 16 == 0, row stride x_row_stride elements, unit column stride).
// pts: the per-tensor scale (null: one-level). block_2d: the block amax is the amax of its 16 x 16 tile
// (rows 16i .. 16i + 15). stochastic: stochastic rounding of the elements from Philox(seed, offset) at the
// element's linear index row * cols + col.
struct Nvfp4QuantizeParams {
  const void* x = nullptr;
  DType dtype = DType::f32;
  int64_t rows = 0, cols = 0, x_row_stride = 0;
  const float* pts = nullptr;
  bool block_2d = false;
  bool stochastic = false;
  uint64_t seed = 0, offset = 0;
  uint8_t* scales = nullptr;  // [rows, cols / 16] E4M3 bytes
  uint8_t* packed = nullptr;  // [rows, cols / 2]
};

struct Nvfp4DequantizeParams {
  const uint8_t* scales = nullptr;
  const uint8_t* packed = nullptr;
  const float* pts = nullptr;
  int64_t rows = 0, cols = 0;
  void* out = nullptr;
  DType dtype = DType::bf16;
};

// out[m, n] = sum_k x[m, k] * W^[n, k] + bias[n], W^ the NVFP4 weight [n, k] dequantized exactly, fp32
// accumulation; x and out in dtype (bf16 or fp16), x row stride x_row_stride, out contiguous [m, n].
struct Nvfp4LinearParams {
  const void* x = nullptr;
  DType dtype = DType::bf16;
  int64_t m = 0, n = 0, k = 0, x_row_stride = 0;
  const uint8_t* w_scales = nullptr;  // [n, k / 16]
  const uint8_t* w_packed = nullptr;  // [n, k / 2]
  const float* w_pts = nullptr;
  const void* bias = nullptr;  // [n] in dtype, or null
  void* out = nullptr;
};

}  // namespace difforge::formats
