// Radix select of the top-k / top-p threshold (filter_threshold.h): the first digit is picked from a histogram over
// the whole row, then the columns sharing the chosen prefix are gathered and the other three digits are picked
// over those candidates only.
#include "sampling/filter_threshold.h"

#include <algorithm>
#include <cstring>

#include "difforge/sampling.h"
#include "sampling/row_math.h"

namespace difforge::sampling::cpu {
namespace {

constexpr int kBins = 256;

inline int top_digit(uint32_t key) { return static_cast<int>(key >> 24); }
inline int digit_at(uint32_t key, int shift) { return static_cast<int>((key >> shift) & 0xFFu); }

// Digits 2-4 over the candidates cand_keys, which share the first digit of `prefix`, each weighing 1 (top-k counts)
// or its cand_mass entry (top-p masses); `above` holds what lies above the candidates. Candidates off the chosen
// digit are dropped after each pass.
template <typename Acc>
uint32_t pick_lower_digits(std::vector<uint32_t>& cand_keys, std::vector<float>* cand_mass, Acc target, Acc above,
                           uint32_t prefix) {
  Acc hist[kBins];
  for (int shift = 16; shift >= 0; shift -= 8) {
    std::fill(hist, hist + kBins, Acc{0});
    for (size_t i = 0; i < cand_keys.size(); ++i)
      hist[digit_at(cand_keys[i], shift)] += cand_mass ? static_cast<Acc>((*cand_mass)[i]) : Acc{1};
    const int digit = radix_pick_digit(hist, target, above);
    prefix |= static_cast<uint32_t>(digit) << shift;
    size_t kept = 0;
    for (size_t i = 0; i < cand_keys.size(); ++i) {
      if (digit_at(cand_keys[i], shift) != digit) continue;
      cand_keys[kept] = cand_keys[i];
      if (cand_mass) (*cand_mass)[kept] = (*cand_mass)[i];
      ++kept;
    }
    cand_keys.resize(kept);
    if (cand_mass) cand_mass->resize(kept);
  }
  return prefix;
}

// The key of the k-th largest logit (0 < k < vocab), counting ties.
uint32_t kth_largest_key(const uint32_t* keys, int64_t vocab, int64_t k, FilterScratch& s) {
  int64_t hist[kBins] = {};
  for (int64_t y = 0; y < vocab; ++y) ++hist[top_digit(keys[y])];
  int64_t above = 0;
  const int digit = radix_pick_digit(hist, k, above);
  s.cand_keys.clear();
  for (int64_t y = 0; y < vocab; ++y)
    if (top_digit(keys[y]) == digit) s.cand_keys.push_back(keys[y]);
  return pick_lower_digits<int64_t>(s.cand_keys, nullptr, k, above, static_cast<uint32_t>(digit) << 24);
}

// The largest key K with mass{key >= K} >= top_p * total among the columns with key >= kept_from.
uint32_t nucleus_key(const float* l, const uint32_t* keys, int64_t vocab, uint32_t kept_from, float top_p,
                     float temperature, float row_max, FilterScratch& s) {
  s.mass.resize(vocab);
  float* mass = s.mass.data();
  const float scaled_max = row_max / temperature;
#pragma omp simd
  for (int64_t y = 0; y < vocab; ++y)
    mass[y] = keys[y] >= kept_from ? exp_nonpositive(l[y] / temperature - scaled_max) : 0.f;
  float hist[kBins] = {};
  for (int64_t y = 0; y < vocab; ++y) hist[top_digit(keys[y])] += mass[y];
  float total = 0.f;  // summed in the order radix_pick_digit accumulates, so top_p -> 1 keeps everything
  for (int d = kBins - 1; d >= 0; --d) total += hist[d];
  const float target = top_p * total;
  float above = 0.f;
  const int digit = radix_pick_digit(hist, target, above);
  s.cand_keys.clear();
  s.cand_mass.clear();
  for (int64_t y = 0; y < vocab; ++y) {
    if (top_digit(keys[y]) == digit && mass[y] > 0.f) {
      s.cand_keys.push_back(keys[y]);
      s.cand_mass.push_back(mass[y]);
    }
  }
  const uint32_t key =
      pick_lower_digits<float>(s.cand_keys, &s.cand_mass, target, above, static_cast<uint32_t>(digit) << 24);
  return std::max(key, kept_from);  // equal up to fp32 rounding of the sums
}

}  // namespace

uint32_t filter_threshold(const float* l, int64_t vocab, int64_t top_k, float top_p, float temperature,
                          float row_max, FilterScratch& scratch) {
  const bool use_k = top_k > 0 && top_k < vocab, use_p = top_p < 1.f;
  if (!use_k && !use_p) return 0;
  scratch.keys.resize(vocab);
  uint32_t* keys = scratch.keys.data();
#pragma omp simd
  for (int64_t y = 0; y < vocab; ++y) keys[y] = ordered_key_finite(l[y]);
  uint32_t threshold = use_k ? kth_largest_key(keys, vocab, top_k, scratch) : 0u;
  if (use_p) threshold = nucleus_key(l, keys, vocab, threshold, top_p, temperature, row_max, scratch);
  return threshold;
}

}  // namespace difforge::sampling::cpu
