// Row math of the CPU flash attention tiles: a vectorizable exp and the online-softmax row update.
// acc_t is float (fp32/fp16/bf16 inputs) or double (fp64 inputs).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace difforge::attention::cpu {

// exp(x) for x <= 0 (softmax numerators), branch-free so loops over a row vectorize: Cody-Waite
// reduction x = n ln2 + r, a degree-6 polynomial on |r| <= ln2/2 (relative error < 2e-7), and 2^n
// through the exponent bits. x < -87 (including -inf from masks) gives exactly 0.
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (clamped * 1.44269504088896341f + kRound) - kRound;
  float r = std::fma(n, -0.693145751953125f, clamped);
  r = std::fma(n, -1.428606765330187045e-06f, r);
  float p = 1.0f / 720.0f;
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const float two_n = std::bit_cast<float>(static_cast<int32_t>(n + 127.0f) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename acc_t>
inline constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Online softmax over one query row, one key tile at a time (logits s[0, n) of the tile):
// rescales the running sum by exp(m_old - m_new), turns s into exp(s - m_new) in place and returns
// the factor the row's output accumulator must be multiplied by. A row that has seen only -inf
// logits keeps max -inf, sum 0 and zero weights.
template <typename acc_t>
struct OnlineSoftmaxRow {
  acc_t max = kNegInf<acc_t>;
  acc_t sum = 0;

  acc_t update(acc_t* s, int64_t n) {
    acc_t tile_max = kNegInf<acc_t>;
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < n; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
    const acc_t new_max = tile_max > max ? tile_max : max;
    if (new_max == kNegInf<acc_t>) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0;
      return 1;
    }
    acc_t tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_nonpositive(s[j] - new_max);
      tile_sum += s[j];
    }
    const acc_t rescale = exp_nonpositive(max - new_max);
    sum = sum * rescale + tile_sum;
    max = new_max;
    return rescale;
  }
  // log of the partition function; -inf for a row without visible keys.
  acc_t lse() const { return sum > 0 ? max + std::log(sum) : kNegInf<acc_t>; }
};

}  // namespace difforge::attention::cpu
