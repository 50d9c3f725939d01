// NVFP4 codec shared by the CPU (cpp/formats) and CUDA (cuda/formats) kernels. Torch-free, header-only.
// Spec: hif8_nvfp4.md §4 (format, torchao op order, stochastic rounding, 2D blocks, worked examples).
//
// 16 consecutive elements along K share one E4M3 block scale; an optional fp32 per-tensor scale pts sits over
// it. Elements are E2M1 (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), two per byte: element 2j in the low nibble.
// Op order (torchao's, each line one fp32 rounding):
//   sbs = (amax_b / 6) / pts;  sf = e4m3_rne(clamp(sbs, 2^-6, 448));  r = (1 / pts) / sf
//   code = e2m1_rne(clamp(x * r, -6, 6));  x^ = e2m1(code) * (pts * sf)
// One-level (no pts): sf = e4m3_rne(clamp(amax_b / 6, 2^-6, 448)), r = 1 / sf, x^ = e2m1(code) * sf.
#pragma once

#include <cmath>

#include "difforge/common.h"
#include "difforge/philox.h"

namespace difforge::nvfp4 {

constexpr int kBlock = 16;
constexpr float kE2M1Max = 6.f;
constexpr float kE4M3Max = 448.f;
constexpr float kE4M3MinNormal = 0.015625f;  // 2^-6: torchao's lower clamp of the block scale
constexpr uint8_t kE4M3NaN = 0x7F;
constexpr float kTensorScaleDivisor = kE4M3Max * kE2M1Max;  // pts = amax / 2688

DF_INLINE bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// ---- E4M3 (fn: bias 7, no Inf, 0x7F NaN) ----

// Round a finite value in [0, 448] to E4M3, ties to even (subnormals below 2^-6, step 2^-9).
DF_INLINE uint8_t e4m3_rne(float v) {
  if (!(v == v)) return kE4M3NaN;
  if (v < kE4M3MinNormal) return uint8_t(rintf(v * 512.f));  // q = 8 is the min normal 0x08 as well
  uint32_t b = float_bits(v);
  b += 0x7FFFFu + ((b >> 20) & 1u);
  const int e = int(b >> 23) - 127;
  const uint32_t code = uint32_t(e + 7) << 3 | ((b >> 20) & 7u);
  return uint8_t(code > 0x7E ? 0x7E : code);
}

// Any float to E4M3, nearest even, saturating to +-448 (cvt.rn.satfinite); NaN -> 0x7F.
DF_INLINE uint8_t e4m3_satfinite(float v) {
  if (!(v == v)) return kE4M3NaN;
  return uint8_t((float_bits(v) >> 24) & 0x80) | e4m3_rne(fminf(fabsf(v), kE4M3Max));
}

DF_INLINE float e4m3_value(uint8_t c) {
  const uint32_t e = (c >> 3) & 15u, m = c & 7u;
  const float sign = (c & 0x80) ? -1.f : 1.f;
  if (e == 15 && m == 7) return bits_float(0x7FC00000u);
  if (e == 0) return sign * float(m) * (1.f / 512.f);
  return sign * bits_float((e + 120u) << 23 | m << 20);
}

// ---- E2M1 ----

DF_INLINE float e2m1_magnitude(uint32_t code) {
  const uint32_t m = code & 7u;
  return m < 4 ? 0.5f * float(m) : float(1u << ((m >> 1) - 1)) * (1.f + 0.5f * float(m & 1u));  // 2 3 4 6
}

DF_INLINE float e2m1_value(uint32_t code) { return (code & 8u) ? -e2m1_magnitude(code) : e2m1_magnitude(code); }

// Nearest E2M1 magnitude code of a in [0, 6], ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, ...).
DF_INLINE uint32_t e2m1_rne_magnitude(float a) {
  return a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
       : a <= 2.5f ? 4u : a < 3.5f ? 5u : a <= 5.f ? 6u : 7u;
}

// Stochastic rounding between the two magnitudes around a: up with probability (a - lo) / (hi - lo),
// u a 24-bit uniform in [0, 1).
DF_INLINE uint32_t e2m1_sr_magnitude(float a, float u) {
  if (a >= kE2M1Max) return 7u;
  uint32_t lo = 0;
  while (lo < 6 && e2m1_magnitude(lo + 1) <= a) ++lo;
  const float below = e2m1_magnitude(lo), above = e2m1_magnitude(lo + 1);
  return u < (a - below) / (above - below) ? lo + 1 : lo;
}

// The sign bit is kept, so small negatives encode to 0x8 (-0) as in torchao.
DF_INLINE uint32_t with_sign(float y, uint32_t magnitude) { return (float_bits(y) >> 31) << 3 | magnitude; }

// ---- Block scales ----

struct BlockScale {
  uint8_t code;      // the stored E4M3 byte
  float reciprocal;  // r: the factor that maps the block into [-6, 6]
};

// pts <= 0 means one-level scaling (no per-tensor scale). A non-finite block amax gives the NaN byte.
DF_INLINE BlockScale block_scale(float amax_block, float pts) {
  const bool two_level = pts > 0.f;
  const float sbs = two_level ? (amax_block / kE2M1Max) / pts : amax_block / kE2M1Max;
  if (!is_finite(sbs)) return {kE4M3NaN, bits_float(0x7FC00000u)};
  const uint8_t code = e4m3_rne(fminf(fmaxf(sbs, kE4M3MinNormal), kE4M3Max));
  const float sf = e4m3_value(code);
  return {code, two_level ? (1.f / pts) / sf : 1.f / sf};
}

// Decode factor of a block: pts * sf (two-level) or sf.
DF_INLINE float block_decode_scale(uint8_t code, float pts) {
  return pts > 0.f ? pts * e4m3_value(code) : e4m3_value(code);
}

// ---- Element codes ----

DF_INLINE uint32_t encode_rn(float x, float r) {
  const float y = fminf(fmaxf(x * r, -kE2M1Max), kE2M1Max);
  return with_sign(y, e2m1_rne_magnitude(fabsf(y)));
}

// Stochastic rounding: the uniform comes from Philox(seed, offset) at the element's linear index.
DF_INLINE uint32_t encode_sr(float x, float r, uint64_t seed, uint64_t offset, uint64_t index) {
  const float y = fminf(fmaxf(x * r, -kE2M1Max), kE2M1Max);
  return with_sign(y, e2m1_sr_magnitude(fabsf(y), philox::uniform24(seed, offset, index)));
}

}  // namespace difforge::nvfp4
