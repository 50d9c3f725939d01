// discrete_step on CUDA (math: difforge/sampling.h; semantics: the CPU kernel cpp/sampling). A team (a warp
// for rows of at most kWarpRowMaxVocab logits, else a CTA) owns a row:
//   1. the component is drawn first when the weights do not need the logits (mixture rule): a row that will
//      not take its softmax part is only read for its statistics, and one that will, unfiltered, is read
//      once for statistics and race together;
//   2. otherwise a statistics pass (RowState), the weights of the rule, the component, and only when it is
//      the softmax part: the top-k / top-p threshold (radix select, re-reading the row from L2) and the race.
// Rows that need no logits are never read. Instantiated per dtype in discrete_step_<dtype>.cu.
#pragma once

#include "sampling/launch.h"
#include "sampling/radix_select.cuh"
#include "sampling/row_scan.cuh"
#include "sampling/row_team.cuh"

namespace difforge::sampling::detail {

// One row of a discrete_step call, as every thread of its team sees it.
template <typename T>
struct StepRow {
  const T* x;          // the row's logits
  int64_t row, vocab, groups, point;
  bool aligned;        // groups load as one vector each
  bool exclude_point;  // jump rules: d takes no part in the softmax and uniform parts
};

// Fixed-point scale of the top-p masses exp(l / T - max / T) in [0, 1]: a row's total stays below 2^62.
__device__ __forceinline__ float mass_scale(int64_t vocab) {
  int bits = 0;
  while (bits < 62 && (int64_t(1) << bits) < vocab) ++bits;
  return ldexpf(1.f, 62 - bits);
}

// One streaming pass: the statistics (kStats) and/or the race over the allowed columns (kRace): kept by the
// filter (ordered_key(l) >= keep_from) and not the excluded point.
template <bool kStats, bool kRace, typename T, class Team>
__device__ __forceinline__ RowState scan_row(const StepParams& p, const StepRow<T>& r, uint32_t keep_from,
                                             const Team& team) {
  const float inv_t = 1.f / p.temperature;
  const NoiseSource src{p.seed, p.offset, r.row};
  RowState s;
  for (int64_t g = team.rank; g < r.groups; g += team.size) {
    float l[4];
    const int n = load_group(r.x, g, r.vocab, r.aligned, l);
    const int point_j = point_in_group(r.point, g);
    if constexpr (kStats) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < n) push_logit(s, l[j], j == point_j);
    }
    if constexpr (kRace) {
      bool allowed[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        allowed[j] = j < n && (keep_from == 0 || ordered_key(l[j]) >= keep_from) && !(r.exclude_point && j == point_j);
      if (p.greedy) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (allowed[j]) offer(s, l[j], 4 * g + j);
      } else {
        float fast[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) fast[j] = allowed[j] ? l[j] * inv_t : -INFINITY;
        race_group(s, fast, [&](int j) { return l[j] / p.temperature; }, g, src);
      }
    }
  }
  return s;
}

// The smallest ordered key kept by top-k and top-p (0: everything), from the raw logits of a good row.
// Top-k: the k-th largest logit's key (ties kept). Top-p: over the top-k survivors, with masses
// exp(l / T - max / T) in fixed point, the largest key whose survivors at or above it hold >= top_p of the mass.
template <typename T, class Team>
__device__ __forceinline__ uint32_t filter_threshold(const StepParams& p, const StepRow<T>& r, float row_max,
                                                     const Team& team, RadixScratch& sm) {
  uint32_t keep_k = 0, keep_p = 0;
  if (p.top_k > 0 && p.top_k < r.vocab) {
    const auto visit = [&](auto add) {
      for (int64_t g = team.rank; g < r.groups; g += team.size) {
        float l[4];
        const int n = load_group(r.x, g, r.vocab, r.aligned, l);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (j < n) add(ordered_key(l[j]), Weight(1));
      }
    };
    keep_k = radix_select(team, sm, visit, [&](Weight) { return Weight(p.top_k); });
  }
  if (p.top_p < 1.f) {
    const float max_t = row_max / p.temperature, scale = mass_scale(r.vocab);
    const auto visit = [&](auto add) {
      for (int64_t g = team.rank; g < r.groups; g += team.size) {
        float l[4];
        const int n = load_group(r.x, g, r.vocab, r.aligned, l);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t key = ordered_key(l[j]);
          if (j < n && key >= keep_k) add(key, Weight(__float2ull_rz(expf(l[j] / p.temperature - max_t) * scale)));
        }
      }
    };
    // An integer sum reaches top_p * total exactly when it reaches its ceiling.
    const auto target = [&](Weight total) { return Weight(ceil(double(p.top_p) * double(total))); };
    keep_p = radix_select(team, sm, visit, target);
  }
  return keep_k > keep_p ? keep_k : keep_p;
}

// The part a row draws from (softmax, uniform or point), or -1 when its weights cannot be sampled.
__device__ __forceinline__ int draw_part(const Mixture& m, uint32_t component_word) {
  return weights_valid(m) ? choose_component(m, uniform01(component_word)) : -1;
}

// The epilogue of a row, on one thread: the token of the drawn part and the row statistics.
template <typename T>
__device__ __forceinline__ void finish_row(const StepParams& p, const StepRow<T>& r, const RowState& s, bool read,
                                           int part) {
  int64_t token = -1;
  if (part == kSoftmaxPart) {
    token = s.best_idx >= 0 ? s.best_idx : r.point;  // no allowed column: the point mass
  } else if (part == kUniformPart) {
    const uint32_t w = draw_word(p.seed, p.offset, uint64_t(r.row), kUniformStream, 0);
    token = uniform_token(w, r.vocab, r.point, r.exclude_point);
  } else if (part == kPointPart) {
    token = r.point;
  }
  p.token[r.row] = token;
  float* stats = p.stats + r.row * kNumStats;
  const bool sampled = read && token >= 0;  // a negative token (bad row, or a negative point drawn): NaN stats
  const bool in_row = token >= 0 && token < r.vocab;
  // (l - max) - log z rather than l - lse: no cancellation when the token holds most of the mass.
  stats[kLogpToken] = sampled && in_row ? (to_float(r.x[token]) - s.max) - logf(s.z) : NAN;
  stats[kLse] = sampled ? row_lse(s) : NAN;
  stats[kEntropy] = sampled ? row_entropy(s) : NAN;
  stats[kTop1] = sampled ? s.top1 : NAN;
  stats[kTop2] = sampled ? s.top2 : NAN;
}

// One row, on every thread of its team (team-uniform control flow: every branch depends on merged state only).
template <typename T, class Team>
__device__ __forceinline__ void discrete_row(const StepParams& p, int64_t row, const Team& team,
                                             RadixScratch& radix) {
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const StepRow<T> r{x, row, p.vocab, ceil_div(p.vocab, 4), p.point[row], groups_aligned(x), p.rule != Rule::mixture};
  const float* coef = p.coef + 3 * row;
  const uint32_t component_word = draw_word(p.seed, p.offset, uint64_t(row), kComponentStream, 0);
  const bool filtered = (p.top_k > 0 && p.top_k < p.vocab) || p.top_p < 1.f;
  // The mixture rule's weights are its coefficients: the part is known before the row is read, and a row whose
  // weights cannot be sampled is not read. (Jump rules always read the row and draw the part after it.)
  int part = r.exclude_point ? -1 : draw_part(mixture_weights(p.rule, coef, -INFINITY, p.vocab), component_word);
  const bool read = row_needs_logits(p.rule, coef) && (r.exclude_point || part >= 0);
  RowState s;
  if (read) {
    const bool fused = !r.exclude_point && !filtered && part == kSoftmaxPart;
    if (fused) {
      s = team.merge(scan_row<true, true>(p, r, 0, team));
    } else {
      s = team.merge(scan_row<true, false>(p, r, 0, team));
    }
    if (row_is_bad(s)) {
      part = -1;
    } else {
      if (r.exclude_point) {
        const float log_s_excl = s.max + logf(s.z_excl);
        part = draw_part(mixture_weights(p.rule, coef, log_s_excl, p.vocab), component_word);
      }
      if (part == kSoftmaxPart && !fused) {
        const uint32_t keep_from = filtered ? filter_threshold(p, r, s.max, team, radix) : 0;
        const RowState race = team.merge(scan_row<false, true>(p, r, keep_from, team));
        s.best_key = race.best_key;
        s.best_idx = race.best_idx;
      }
    }
  }
  if (team.rank == 0) finish_row(p, r, s, read, part);
}

template <typename T>
__global__ void __launch_bounds__(kWarpRowThreads, min_resident_ctas(kWarpRowThreads))
    discrete_step_warp_kernel(const StepParams p) {
  constexpr int kWarps = kWarpRowThreads / 32;
  __shared__ RadixScratch radix[kWarps];
  const WarpTeam team;
  const int warp = int(threadIdx.x) >> 5;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + warp; row < p.rows; row += int64_t(gridDim.x) * kWarps)
    discrete_row<T>(p, row, team, radix[warp]);
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, min_resident_ctas(kThreads)) discrete_step_cta_kernel(const StepParams p) {
  using Team = CtaTeam<kThreads>;
  // Raw storage: RowState's member initializers would make a typed __shared__ declaration dynamic.
  __shared__ __align__(16) unsigned char scratch[sizeof(typename Team::Scratch)];
  __shared__ RadixScratch radix;
  const Team team(reinterpret_cast<typename Team::Scratch*>(scratch));
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) discrete_row<T>(p, row, team, radix);
}

template <DType D>
cudaError_t launch_discrete_rows(const StepParams& p, cudaStream_t stream) {
  using T = difforge::cuda::elem_t<D>;
  switch (team_kind(p.vocab)) {
    case TeamKind::warp:
      discrete_step_warp_kernel<T><<<warp_team_ctas(p.rows), kWarpRowThreads, 0, stream>>>(p);
      break;
    case TeamKind::mid_cta:
      discrete_step_cta_kernel<T, kMidRowThreads><<<cta_team_ctas(p.rows), kMidRowThreads, 0, stream>>>(p);
      break;
    case TeamKind::large_cta:
      discrete_step_cta_kernel<T, kLargeRowThreads><<<cta_team_ctas(p.rows), kLargeRowThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace difforge::sampling::detail
