// Fused discrete-diffusion sampling steps: the per-row math shared by the CPU (cpp/sampling) and CUDA
// (cuda/sampling) kernels. Torch-free, header-only. Spec: discrete_samplers.md §3 (primitives), §6 (kernels).
//
// discrete_step: every per-position update of a masked or uniform sampler is a three-part mixture
//   q(y) = w_p * softmax_T(filtered l)(y) + w_u * uniform(y) + w_d * 1[y = d]
// over one row of logits l [V], with one point mass d (the current token x_i, or the mask id). The rule
// turns the per-row coefficients into (w_p, w_u, w_d) from the row statistics of one streaming pass:
//   mixture:  (w_p, w_u, w_d) = coef                             (MDLM, ReMDM, DUO, Gibbs, LLaDA, ...)
//   euler:    W = min(c * S', 1); (W, 0, 1 - W)                   (SEDD Euler; c = dt * sigma' / N)
//   tau_leap: L = c * S'; (L e^-L, 0, 1 - L e^-L)                 (Campbell tau-leaping, one jump at most)
//   ctmc:     L = c * (S' + V - 1); jump = L e^-L;                (tau-leap of the uniform CTMC corrector
//             (jump * S'/(S' + V - 1), jump * (V - 1)/(S' + V - 1), 1 - jump)   R^c_iy = sigma'/N (s_iy + 1))
// with c = coef[0] and S' = sum_{y != d} exp(l_y) (l = log concrete scores). The jump rules exclude d from the
// softmax and the uniform parts ("y != x_i"); the mixture rule excludes nothing. Parts are drawn as one
// component draw (stream 1), then a Gumbel race argmax_y (l_y / T + G_y) over the allowed set (stream 0), or
// a uniform index (stream 2). Temperature, top-k and top-p shape the softmax part only; the weights and the
// statistics always use the raw logits (T = 1, unfiltered).
//
// Randomness: Philox4x32-10 with key = seed and counter (col / 4, row, stream, offset), word col % 4, so a
// draw depends on (seed, offset, row, col) only and CPU and CUDA draw the same numbers.
#pragma once

#include <cmath>

#include "difforge/common.h"
#include "difforge/philox.h"

namespace difforge::sampling {

enum class Rule : int { mixture = 0, euler = 1, tau_leap = 2, ctmc = 3 };

// Philox streams: one per independent use, so changing one use never shifts another's numbers.
enum Stream : uint32_t { kGumbelStream = 0, kComponentStream = 1, kUniformStream = 2, kPositionStream = 3 };

// Per-row statistics written by discrete_step, over the raw logits.
enum Stat : int { kLogpToken = 0, kLse = 1, kEntropy = 2, kTop1 = 3, kTop2 = 4, kNumStats = 5 };

// The four Philox words of columns [4 * col4, 4 * col4 + 4) of one row in one stream.
DF_INLINE philox::Uint4 row_block(uint64_t seed, uint64_t offset, uint64_t row, uint32_t stream, uint64_t col4) {
  return philox::philox4x32(seed, philox::Uint4{uint32_t(col4), uint32_t(row), stream, uint32_t(offset)});
}

DF_INLINE uint32_t word(const philox::Uint4& b, int j) { return j == 0 ? b.x : j == 1 ? b.y : j == 2 ? b.z : b.w; }

DF_INLINE uint32_t draw_word(uint64_t seed, uint64_t offset, uint64_t row, uint32_t stream, uint64_t col) {
  return word(row_block(seed, offset, row, stream, col >> 2), int(col & 3));
}

// Gumbel noise G = -log E, E = -log(1 - v) ~ Exp(1), v = (w + 1/2) 2^-32. fp32 -log(-log u) loses the upper
// tail (arXiv 2409.02908); here small v goes through log1p and large v through the exact complement
// 1 - v = (~w + 1/2) 2^-32, so both tails keep full relative precision: G in [-3.1, 22.87].
DF_INLINE float gumbel(uint32_t w) {
  constexpr float kTwoM32 = 2.3283064365386963e-10f;
  const float e = w < 0x80000000u ? -log1pf(-(float(w) + 0.5f) * kTwoM32) : -logf((float(~w) + 0.5f) * kTwoM32);
  return -logf(e);
}

// A uniform in [0, 1) on the 2^-24 grid.
DF_INLINE float uniform01(uint32_t w) { return float(w >> 8) * (1.f / 16777216.f); }

// An index in [0, n), n < 2^32 (multiply-shift: bias < n / 2^32).
DF_INLINE int64_t index_below(uint32_t w, int64_t n) { return int64_t((uint64_t(w) * uint64_t(n)) >> 32); }

// Order-preserving map float -> uint32 (a < b <=> key(a) < key(b)); NaN maps below -inf.
DF_INLINE uint32_t ordered_key(float x) {
  if (x != x) return 0u;
  const uint32_t b = float_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// One radix-select digit (8 bits, most significant first): hist[d] is the count or mass of the candidates
// whose current digit is d, `above` what already lies above the candidates. Returns the largest d with
// above + sum_{d' >= d} hist[d'] >= target and adds sum_{d' > d} hist[d'] to `above`; 0 if none reaches it.
template <typename Acc>
DF_INLINE int radix_pick_digit(const Acc* hist, Acc target, Acc& above) {
  Acc cum = above;
  for (int d = 255; d > 0; --d) {
    if (cum + hist[d] >= target) {
      above = cum;
      return d;
    }
    cum += hist[d];
  }
  above = cum;
  return 0;
}

// The streaming state of one row: online softmax statistics, top-2, the Gumbel race and the mass without d.
// Merging two states (a split row, a block reduction) gives the state of the concatenated columns.
struct RowState {
  float max = -INFINITY;   // running max of the finite logits
  float z = 0.f;           // sum exp(l - max)
  float a = 0.f;           // sum exp(l - max) * (l - max): the entropy log z - a / z adds two terms >= 0, where
                           // lse - (sum e * l) / z would cancel for large logits
  float z_excl = 0.f;      // sum exp(l - max) over y != d
  float top1 = -INFINITY, top2 = -INFINITY;
  float best_key = -INFINITY;
  int64_t best_idx = -1;   // the race winner (-1: no allowed column)
  bool bad = false;        // a NaN or +inf logit
};

// Moves the state to a larger max: every term exp(l - max) scales by f = exp(old - new) and a's offsets
// (l - max) shift by (old - new). A state without a finite logit holds zeros and stays so.
DF_INLINE void rescale(RowState& s, float new_max) {
  if (new_max > s.max) {
    if (s.max > -INFINITY) {
      const float shift = s.max - new_max;
      const float f = expf(shift);
      s.a = f * (s.a + s.z * shift);
      s.z *= f;
      s.z_excl *= f;
    }
    s.max = new_max;
  }
}

// Adds logit l of a column that is (or is not) the point d to the statistics.
DF_INLINE void push_logit(RowState& s, float l, bool is_point) {
  if (!(l < INFINITY)) {  // NaN or +inf
    s.bad = true;
    return;
  }
  if (l == -INFINITY) return;
  if (l > s.top1) {
    s.top2 = s.top1;
    s.top1 = l;
  } else if (l > s.top2) {
    s.top2 = l;
  }
  rescale(s, l);
  const float e = expf(l - s.max);
  s.z += e;
  s.a += e * (l - s.max);
  if (!is_point) s.z_excl += e;
}

// A race candidate: the larger key wins, ties go to the lower index; -inf (probability 0) never wins.
DF_INLINE void offer(RowState& s, float key, int64_t idx) {
  if (!(key > -INFINITY)) return;
  if (s.best_idx < 0 || key > s.best_key || (key == s.best_key && idx < s.best_idx)) {
    s.best_key = key;
    s.best_idx = idx;
  }
}

DF_INLINE RowState merge(RowState a, const RowState& b) {
  const float m = a.max > b.max ? a.max : b.max;
  rescale(a, m);
  if (b.max > -INFINITY) {
    const float shift = b.max - m;
    const float f = expf(shift);
    a.z += b.z * f;
    a.a += f * (b.a + b.z * shift);
    a.z_excl += b.z_excl * f;
  }
  if (b.top1 > a.top1) {
    a.top2 = a.top1 > b.top2 ? a.top1 : b.top2;
    a.top1 = b.top1;
  } else if (b.top1 > a.top2) {
    a.top2 = b.top1;
  }
  if (b.best_idx >= 0) offer(a, b.best_key, b.best_idx);
  a.bad = a.bad || b.bad;
  return a;
}

DF_INLINE float row_lse(const RowState& s) { return s.max + logf(s.z); }

// Entropy of softmax(l): lse - E[l] = log z - E[l - max]; 0 when one column holds all the mass.
DF_INLINE float row_entropy(const RowState& s) { return logf(s.z) - s.a / s.z; }

// A row without a finite logit, or with a NaN / +inf one, cannot be sampled.
DF_INLINE bool row_is_bad(const RowState& s) { return s.bad || !(s.z > 0.f); }

struct Mixture {
  float w_p, w_u, w_d;  // unnormalized weights of the softmax, uniform and point parts
  bool exclude_point;   // softmax and uniform parts range over y != d
};

// l * exp(-l), the probability of exactly one jump of a Poisson(l) count; 0 for l = inf.
DF_INLINE float one_jump_probability(float lambda) {
  return lambda > 0.f && lambda < INFINITY ? lambda * expf(-lambda) : 0.f;
}

// The rule's weights from its coefficients and log S' = log sum_{y != d} exp(l_y) (-inf when S' = 0).
// The jump rules read coef[0] = c only, a rate factor that must be finite and >= 0 (else the weights are NaN,
// which weights_valid rejects).
DF_INLINE Mixture mixture_weights(Rule rule, const float* coef, float log_s_excl, int64_t vocab) {
  if (rule == Rule::mixture) return {coef[0], coef[1], coef[2], false};
  const float c = coef[0];
  if (!(c >= 0.f && c < INFINITY)) return {NAN, NAN, NAN, true};
  const float s_excl = expf(log_s_excl);
  if (rule == Rule::euler) {
    const float w = c > 0.f ? fminf(c * s_excl, 1.f) : 0.f;
    return {w, 0.f, 1.f - w, true};
  }
  if (rule == Rule::tau_leap) {
    const float jump = c > 0.f ? one_jump_probability(c * s_excl) : 0.f;
    return {jump, 0.f, 1.f - jump, true};
  }
  const float others = float(vocab - 1);  // ctmc
  const float jump = c > 0.f ? one_jump_probability(c * (s_excl + others)) : 0.f;
  const float share = s_excl < INFINITY ? s_excl / (s_excl + others) : 1.f;
  return {jump * share, jump * (1.f - share), 1.f - jump, true};
}

// Weights a row can be sampled from: finite, non-negative, positive sum.
DF_INLINE bool weights_valid(const Mixture& m) {
  const float total = m.w_p + m.w_u + m.w_d;
  return m.w_p >= 0.f && m.w_u >= 0.f && m.w_d >= 0.f && total > 0.f && total < INFINITY;
}

enum Component : int { kSoftmaxPart = 0, kUniformPart = 1, kPointPart = 2 };

// The part a row draws from, by a uniform u in [0, 1) against the normalized weights.
DF_INLINE int choose_component(const Mixture& m, float u) {
  const float x = u * (m.w_p + m.w_u + m.w_d);
  if (x < m.w_p) return kSoftmaxPart;
  if (x < m.w_p + m.w_u) return kUniformPart;
  return kPointPart;
}

// A uniform token in [0, V), or in [0, V) \ {d} when the point is excluded and lies in range.
DF_INLINE int64_t uniform_token(uint32_t w, int64_t vocab, int64_t point, bool exclude_point) {
  const bool skip = exclude_point && point >= 0 && point < vocab;
  const int64_t y = index_below(w, skip ? vocab - 1 : vocab);
  return skip && y >= point ? y + 1 : y;
}

// Tweedie tau-leaping (SEDD "analytic", uniform process), the two-pass rule: with e = exp(-(sigma_t - sigma_s)),
// s = exp(l) and S = sum_z s_z, p_y = [s_y / e + (e - 1) / (N e) * S] * [(1 - e) / N + e * 1[y = x]], and the
// token is drawn from max(p, 0). Scaled by exp(-max l) (the argmax is scale-free): s_y = exp(l_y - max),
// S = z of the first pass.
// The same from s = exp(l - row_max) already computed (the CPU kernel's vectorized exp).
DF_INLINE float tweedie_mass_scaled(float s, float z, float e, int64_t vocab, bool is_current) {
  const float n = float(vocab);
  const float score_part = s / e + (e - 1.f) / (n * e) * z;
  return score_part * ((1.f - e) / n + (is_current ? e : 0.f));
}

DF_INLINE float tweedie_mass(float l, float row_max, float z, float e, int64_t vocab, bool is_current) {
  return tweedie_mass_scaled(expf(l - row_max), z, e, vocab, is_current);
}

// ---- kernel parameters (raw pointers; the bindings check shapes, dtypes and devices) ----

// One discrete_step call over `rows` rows of `vocab` logits.
struct StepParams {
  const void* logits;      // [rows, vocab] in `dtype`, rows `row_stride` elements apart, last stride 1
  DType dtype;             // f32, f16 or bf16
  int64_t rows, vocab, row_stride;
  const int64_t* point;    // [rows] the point mass d (any value; excluded from the parts only in [0, vocab))
  const float* coef;       // [rows, 3] rule coefficients
  Rule rule;
  float temperature;       // > 0; the softmax part races l / T + G
  bool greedy;             // the softmax part takes argmax l (ties: lowest index), no noise
  int64_t top_k;           // 0: off; else keep l >= the k-th largest logit (ties kept)
  float top_p;             // 1: off; else keep the smallest top set of softmax(l / T) with mass >= p (ties kept)
  uint64_t seed, offset;
  int64_t* token;          // [rows] out; -1 for a row that cannot be sampled (bad logits or weights)
  float* stats;            // [rows, kNumStats] out; NaN for rows not read or bad
};

// A row is read only when its softmax part can be drawn or its weights need the logits.
DF_INLINE bool row_needs_logits(Rule rule, const float* coef) { return rule != Rule::mixture || coef[0] > 0.f; }

struct TweedieParams {
  const void* log_score;   // [rows, vocab] log concrete scores in `dtype`, rows `row_stride` apart
  DType dtype;
  int64_t rows, vocab, row_stride;
  const int64_t* current;  // [rows] x in [0, vocab)
  const float* e;          // [rows] exp(-(sigma_t - sigma_s)) in (0, 1]
  uint64_t seed, offset;
  int64_t* token;          // [rows] out; -1 for bad logits; x when no mass is positive
};

// Per-row top-k (k[b] clipped to the eligible count; ties to the lower index) of key / tau + G (tau > 0) or of
// key (tau = 0), united with {eligible, key >= threshold[b]} when threshold is given.
struct SelectParams {
  const float* key;        // [batch, len] contiguous
  const bool* eligible;    // [batch, len]
  const int64_t* k;        // [batch], >= 0
  const float* threshold;  // [batch] or null
  int64_t batch, len;
  float gumbel_tau;        // 0: no noise
  uint64_t seed, offset;
  bool* selected;          // [batch, len] out
};

}  // namespace difforge::sampling
