// Vectorizable row math of the CPU sampling kernels: branch-free exp, log and Gumbel noise, and the Philox words of
// a chunk of columns, written so the compiler maps each loop onto SIMD lanes (the header's scalar functions call
// libm, which does not vectorize). Same formulas as difforge/sampling.h to a few ulp: keys differ from the scalar
// math (and from the CUDA kernels) in the last bits only, so the draws agree except on such near-ties.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "difforge/philox.h"
#include "difforge/sampling.h"

namespace difforge::sampling::cpu {

// Columns per step of a row pass: 16 Philox blocks; lanes of the per-row partial sums (one SIMD register).
constexpr int kChunk = 64;
constexpr int kLanes = 8;

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial (truncation < 1e-8
// relative) and 2^n through the exponent bits. x < -87 (and -inf) gives 0. (Selects, not std::fmax: fmaxf is a
// libm call that stops vectorization.)
inline float exp_nonpositive(float x) {
  const float xc = x > -87.f ? x : -87.f;
  constexpr float kShifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = std::fma(xc, 1.44269504088896341f, kShifter) - kShifter;
  float r = std::fma(n, -0.693145751953125f, xc);
  r = std::fma(n, -1.428606765330187045e-6f, r);
  float p = 1.f / 5040.f;
  p = std::fma(p, r, 1.f / 720.f);
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const float two_n = std::bit_cast<float>(static_cast<int32_t>(n + 127.f) << 23);
  return x < -87.f ? 0.f : p * two_n;
}

// log(x) for finite normal x > 0 (garbage, never a trap, otherwise): x = 2^e m with m in [sqrt(1/2), sqrt(2)],
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^9 (truncation < 3e-9 relative).
inline float log_positive(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  float m = std::bit_cast<float>((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1.f : e;
  const float f = m - 1.f;  // exact
  const float s = f / (2.f + f);
  const float s2 = s * s;
  float p = 2.f / 9.f;
  p = std::fma(p, s2, 2.f / 7.f);
  p = std::fma(p, s2, 2.f / 5.f);
  p = std::fma(p, s2, 2.f / 3.f);
  const float log_m = std::fma(s * s2, p, 2.f * s);
  return std::fma(e, 0.693145751953125f, std::fma(e, 1.428606765330187045e-6f, log_m));
}

// difforge::sampling::gumbel(w) without libm: v = (w + 1/2) 2^-32; E = -log1p(-v) for v < 1/2 (through
// log1p(x) = log(1 + x) x / ((1 + x) - 1), exact to rounding), E = -log(1 - v) with 1 - v = (~w + 1/2) 2^-32
// exactly for v >= 1/2; G = -log E. One branch-free log for E, one for G.
inline float gumbel_noise(uint32_t w) {
  constexpr float kTwoM32 = 2.3283064365386963e-10f;
  const bool upper = w >= 0x80000000u;
  const uint32_t t = upper ? ~w : w;  // < 2^31: converts exactly through int32, as the header's float(w)
  const float f = (static_cast<float>(static_cast<int32_t>(t)) + 0.5f) * kTwoM32;  // v, or 1 - v when upper
  const float one_minus_v = 1.f - f;
  const float log_arg = upper ? f : one_minus_v;
  const float lg = log_positive(log_arg);
  const float ratio = one_minus_v == 1.f ? 1.f : lg / (one_minus_v - 1.f);  // log(1 - v) / -v, 1 as v -> 0
  const float e = upper ? -lg : f * ratio;
  return -log_positive(e);
}

// Order-preserving float -> uint32 (difforge::sampling::ordered_key without its NaN branch: callers have ruled
// NaN out or do not care where it lands).
inline uint32_t ordered_key_finite(float x) {
  const uint32_t b = std::bit_cast<uint32_t>(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The Philox words of columns [col0, col0 + kChunk) (col0 % 4 == 0) of one row in one stream: words[j] =
// draw_word(seed, offset, row, stream, col0 + j). The 16 blocks run side by side in SIMD lanes.
inline void philox_chunk(uint64_t seed, uint64_t offset, uint64_t row, uint32_t stream, uint64_t col0,
                         uint32_t* words) {
  constexpr int kBlocks = kChunk / 4;
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u, kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int j = 0; j < kBlocks; ++j) {
    c0[j] = static_cast<uint32_t>((col0 >> 2) + j);
    c1[j] = static_cast<uint32_t>(row);
    c2[j] = stream;
    c3[j] = static_cast<uint32_t>(offset);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
#pragma omp simd
    for (int j = 0; j < kBlocks; ++j) {
      const uint64_t p0 = uint64_t{kMul0} * c0[j], p1 = uint64_t{kMul1} * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  for (int j = 0; j < kBlocks; ++j) {
    words[4 * j] = c0[j];
    words[4 * j + 1] = c1[j];
    words[4 * j + 2] = c2[j];
    words[4 * j + 3] = c3[j];
  }
}

// Gumbel noise of columns [col0, col0 + kChunk) of one row in one stream.
inline void gumbel_chunk(uint64_t seed, uint64_t offset, uint64_t row, uint32_t stream, uint64_t col0, float* g) {
  uint32_t words[kChunk];
  philox_chunk(seed, offset, row, stream, col0, words);
#pragma omp simd
  for (int j = 0; j < kChunk; ++j) g[j] = gumbel_noise(words[j]);
}

// The first index of the largest of v[0, kChunk) and that value; ties go to the lower index, NaN never wins
// (-inf with index 0 when no entry exceeds -inf).
struct ChunkMax {
  float value;
  int index;
};

inline ChunkMax chunk_argmax(const float* v) {
  float best = -INFINITY;
#pragma omp simd reduction(max : best)
  for (int j = 0; j < kChunk; ++j) best = v[j] > best ? v[j] : best;
  int index = 0;
  while (index < kChunk - 1 && !(v[index] == best)) ++index;
  return {best, index};
}

}  // namespace difforge::sampling::cpu
