// HiF8 (Ascend HiFloat8) codec shared by the CPU (cpp/formats) and CUDA (cuda/formats) kernels. Torch-free,
// header-only. Spec: hif8_nvfp4.md §1 (format, encode/decode, test vectors), §2 (per-tensor scaling), §3 (E4M3).
//
// Code = S | Dot (prefix, 2-4 bits) | exponent (D bits, sign-magnitude with implicit leading one) | mantissa.
// Binade e keeps MB(e) mantissa bits: 3 for |e| <= 3, 2 for |e| <= 7, 1 for |e| <= 15; e in [-22, -16] are
// the denormals 2^e (codes 0x01..0x07). 0x00 = 0, 0x80 = NaN, 0x6F / 0xEF = +-Inf, max finite 0x6E = 2^15.
#pragma once

#include "difforge/common.h"

namespace difforge::hif8 {

enum class Rounding : int { ta = 0, hybrid = 1 };  // ties away from zero; TA in |e| < 4, SSR elsewhere

constexpr uint8_t kNaN = 0x80;
constexpr uint8_t kPosInf = 0x6F;
constexpr uint8_t kMaxFinite = 0x6E;
constexpr float kOverflow = 40960.f;        // 1.25 * 2^15: the midpoint between 2^15 and the next step (Inf)
constexpr uint32_t kFlushBits = 0x34000000;  // 2^-23: below it everything encodes to 0x00

// Recipe targets (spec §2): forward operands scaled to amax 15, gradients to amax 224.
constexpr float kForwardTarget = 15.f;
constexpr float kBackwardTarget = 224.f;

DF_INLINE int abs_i(int e) { return e < 0 ? -e : e; }

// Mantissa bits kept in binade e (0: denormal powers of two).
DF_INLINE int mantissa_bits(int e) {
  const int a = abs_i(e);
  return a <= 3 ? 3 : a <= 7 ? 2 : a <= 15 ? 1 : 0;
}

// The 7-bit magnitude code of 2^e * (1 + f / 2^MB(e)), e in [-22, 15].
DF_INLINE uint8_t pack(int e, uint32_t f) {
  if (e <= -16) return uint8_t(e + 23);
  if (e == 0) return uint8_t(0x08 | f);
  const int E = abs_i(e);
  const int D = E == 1 ? 1 : E <= 3 ? 2 : E <= 7 ? 3 : 4;
  const uint32_t dot = D == 1 ? 0x10 : D == 2 ? 0x20 : D == 3 ? 0x40 : 0x60;  // 001, 01, 10, 11 at the top
  const uint32_t exponent = (uint32_t(e < 0) << (D - 1)) | uint32_t(E - (1 << (D - 1)));
  return uint8_t(dot | (exponent << mantissa_bits(e)) | f);
}

DF_INLINE float decode(uint8_t c) {
  if (c == 0x00) return 0.f;
  if (c == kNaN) return bits_float(0x7FC00000u);
  const uint32_t sign = uint32_t(c & 0x80) << 24;
  const uint32_t p = c & 0x7F;
  if (p == kPosInf) return bits_float(sign | 0x7F800000u);
  if (p < 0x08) return bits_float(sign | uint32_t(int(p) - 23 + 127) << 23);
  const int D = p >= 0x60 ? 4 : p >= 0x40 ? 3 : p >= 0x20 ? 2 : p >= 0x10 ? 1 : 0;
  const int m = D >= 3 ? 5 - D : 3;
  const uint32_t f = p & ((1u << m) - 1);
  int e = 0;
  if (D > 0) {
    const uint32_t x = (p >> m) & ((1u << D) - 1);
    const int magnitude = (1 << (D - 1)) + int(x & ((1u << (D - 1)) - 1));
    e = (x >> (D - 1)) ? -magnitude : magnitude;
  }
  return bits_float(sign | uint32_t(e + 127) << 23 | f << (23 - m));
}

// Rounding by the input's binade: add half an ulp of the binade and truncate (ties away from zero); a carry
// into the next binade leaves f = 0, so the binade's old mantissa width is harmless.
DF_INLINE uint8_t round_ties_away(uint32_t a, int e) {
  const int m = mantissa_bits(e);
  const uint32_t u = (a + (1u << (22 - m))) & ~((1u << (23 - m)) - 1);
  return pack(int(u >> 23) - 127, (u >> (23 - m)) & ((1u << m) - 1));
}

// SSR: stochastic rounding whose threshold comes from the input's own low fraction bits (CANN's HR mode).
DF_INLINE uint8_t round_ssr(uint32_t a, int e) {
  const uint32_t F = a & 0x7FFFFF;
  int m = 0;
  uint32_t h = 0, f14, t14;
  if (e == -23) {
    f14 = (F >> 10) + (1u << 13);
    t14 = F & 0x3FFF;
  } else {
    m = mantissa_bits(e);
    h = F >> (23 - m);
    const uint32_t rest = F - (h << (23 - m));
    f14 = rest >> (9 - m);
    t14 = rest & 0x3FFF;
  }
  if (f14 >= t14 && ++h == (1u << m)) {
    e += 1;
    h = 0;
  }
  if (e <= -23) return 0x00;
  if (e > 15 || (e == 15 && h == 1)) return kPosInf;  // (15, 1) is the Inf slot
  return pack(e, h);
}

DF_INLINE uint8_t encode(float x, bool saturate = false, Rounding rounding = Rounding::ta) {
  const uint32_t b = float_bits(x);
  const uint32_t a = b & 0x7FFFFFFF;
  if (a > 0x7F800000u) return kNaN;
  const uint8_t sign = uint8_t((b >> 24) & 0x80);
  if (a >= float_bits(kOverflow)) return sign | (saturate ? kMaxFinite : kPosInf);
  if (a < kFlushBits) return 0x00;
  const int e = int(a >> 23) - 127;
  if (rounding == Rounding::hybrid && abs_i(e) >= 4) {
    const uint8_t c = round_ssr(a, e);
    if (c == 0x00) return 0x00;
    return sign | (saturate && c == kPosInf ? kMaxFinite : c);
  }
  if (e == -23) return sign | 0x01;  // [2^-23, 2^-22) -> 2^-22: the tie with zero goes away
  return sign | round_ties_away(a, e);
}

// Per-tensor scale of the recipe: s = target / amax, 1 when amax is 0 or not finite, or s would overflow
// (an amax of fp32 subnormals: 0 * Inf would turn exact zeros into NaN).
DF_INLINE float scale_for(float amax, float target) {
  constexpr float kMax = 3.4028234663852886e38f;
  const float s = target / amax;
  return (amax > 0.f && amax <= kMax && s <= kMax) ? s : 1.f;
}

// The power-of-two shift k that maps every HiF8 value of magnitude <= amax_code into E4M3 (max 448) exactly
// for all but the smallest values (spec §3): k = 4 for amax 15, k = 1 for amax 224.
DF_INLINE int e4m3_shift(float amax_code) {
  int k = 0;
  if (!(amax_code > 0.f)) return 0;
  while (k < 24 && amax_code * float(1 << (k + 1)) <= 448.f) ++k;
  while (k > -24 && amax_code * (k < 0 ? 1.f / float(1 << -k) : float(1 << k)) > 448.f) --k;
  return k;
}

// The shift for codes scaled to amax `target`: from the largest code such values can round to.
DF_INLINE int e4m3_shift_for_target(float target) { return e4m3_shift(decode(encode(target, true))); }

}  // namespace difforge::hif8
