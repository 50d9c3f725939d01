// One streaming pass over a row of logits, kChunk columns at a time: the online-softmax statistics of the raw
// logits (LaneStats, the header's RowState split over SIMD lanes) and/or the Gumbel race over the allowed columns
// (LaneRace). discrete_step runs both in one pass, or stats first and the race after the filter thresholds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/element.h"
#include "difforge/sampling.h"
#include "sampling/row_math.h"

namespace difforge::sampling::cpu {

// Columns [col0, col0 + n) as fp32, padded with -inf (no mass, never wins) to a whole chunk.
template <typename T>
inline void load_chunk(const T* src, int64_t n, float* l) {
  if (n == kChunk) {
#pragma omp simd
    for (int j = 0; j < kChunk; ++j) l[j] = difforge::cpu::to_acc<float>(src[j]);
    return;
  }
  for (int j = 0; j < kChunk; ++j) l[j] = j < n ? difforge::cpu::to_acc<float>(src[j]) : -INFINITY;
}

// Partial sums of the row statistics per lane, all relative to one running max shared by the lanes (so a chunk
// costs one exp per column and one rescale at most).
struct LaneStats {
  float max = -INFINITY;
  float z[kLanes] = {}, a[kLanes] = {}, z_excl[kLanes] = {};
  float top1[kLanes], top2[kLanes];
  int bad = 0;

  LaneStats() {
    std::fill(top1, top1 + kLanes, -INFINITY);
    std::fill(top2, top2 + kLanes, -INFINITY);
  }

  // Adds chunk l of columns [col0, col0 + kChunk); `point` is left out of z_excl.
  void add_chunk(const float* l, int64_t col0, int64_t point) {
    float chunk_max = -INFINITY;
    int chunk_bad = 0;
#pragma omp simd reduction(max : chunk_max) reduction(| : chunk_bad)
    for (int j = 0; j < kChunk; ++j) {
      chunk_max = l[j] > chunk_max ? l[j] : chunk_max;
      chunk_bad |= !(l[j] < INFINITY);  // NaN or +inf
    }
    bad |= chunk_bad;
    if (chunk_bad) return;  // the row cannot be sampled: its statistics are not used
    if (chunk_max > max) {
      if (max > -INFINITY) {
        const float shift = max - chunk_max, f = exp_nonpositive(shift);
        for (int q = 0; q < kLanes; ++q) {
          a[q] = f * (a[q] + z[q] * shift);
          z[q] *= f;
          z_excl[q] *= f;
        }
      }
      max = chunk_max;
    }
    if (!(max > -INFINITY)) return;  // only -inf so far
    const int64_t point_j = point - col0;
    for (int j0 = 0; j0 < kChunk; j0 += kLanes) {
#pragma omp simd
      for (int q = 0; q < kLanes; ++q) {
        const float x = l[j0 + q];
        const float d = x - max > -88.f ? x - max : -88.f;  // -inf -> -88: e = 0 and e * d = 0, not NaN
        const float e = exp_nonpositive(d);
        z[q] += e;
        a[q] += e * d;
        z_excl[q] += j0 + q == point_j ? 0.f : e;
        const float runner_up = x < top1[q] ? x : top1[q];  // the smaller of x and the lane's top1
        top2[q] = runner_up > top2[q] ? runner_up : top2[q];
        top1[q] = x > top1[q] ? x : top1[q];
      }
    }
  }

  // The lanes merged into the header's state (race fields untouched).
  void fill(RowState& s) const {
    s.max = max;
    s.z = s.a = s.z_excl = 0.f;
    s.top1 = s.top2 = -INFINITY;
    for (int q = 0; q < kLanes; ++q) {
      s.z += z[q];
      s.a += a[q];
      s.z_excl += z_excl[q];
      if (top1[q] > s.top1) {
        s.top2 = std::fmax(s.top1, top2[q]);
        s.top1 = top1[q];
      } else {
        s.top2 = std::fmax(s.top2, top1[q]);
      }
    }
    s.bad = bad != 0;
  }
};

// The race: argmax over allowed columns of l / T + G (noise) or l (greedy); ties to the lower index.
struct RaceSetup {
  uint64_t seed, offset, row;
  float temperature;
  uint32_t threshold;  // the filter keeps ordered_key(l) >= threshold (0 keeps every column)
  int64_t excluded;    // a column left out (the point d of the jump rules), -1 for none
};

struct LaneRace {
  float best_key = -INFINITY;
  int64_t best_idx = -1;

  template <bool kNoise, bool kFiltered>
  void add_chunk(const float* l, int64_t col0, const RaceSetup& r) {
    float key[kChunk];
    if constexpr (kNoise) {
      gumbel_chunk(r.seed, r.offset, r.row, kGumbelStream, col0, key);
      const float t = r.temperature;
#pragma omp simd
      for (int j = 0; j < kChunk; ++j) key[j] = l[j] / t + key[j];
    } else {
      std::copy(l, l + kChunk, key);
    }
    if constexpr (kFiltered) {
      const uint32_t thr = r.threshold;
#pragma omp simd
      for (int j = 0; j < kChunk; ++j) key[j] = ordered_key_finite(l[j]) >= thr ? key[j] : -INFINITY;
    }
    if (r.excluded >= col0 && r.excluded < col0 + kChunk) key[r.excluded - col0] = -INFINITY;
    const ChunkMax m = chunk_argmax(key);
    if (m.value > best_key) {  // strictly: an earlier chunk keeps its tie
      best_key = m.value;
      best_idx = col0 + m.index;
    }
  }
};

// One pass over row[0, vocab): statistics (kStats) and the race (kRace) with noise (kNoise) and the filter
// threshold (kFiltered).
template <bool kStats, bool kRace, bool kNoise, bool kFiltered, typename T>
void scan_row(const T* row, int64_t vocab, int64_t point, const RaceSetup& race, LaneStats& stats,
              LaneRace& winner) {
  float l[kChunk];
  for (int64_t col0 = 0; col0 < vocab; col0 += kChunk) {
    load_chunk(row + col0, std::min<int64_t>(kChunk, vocab - col0), l);
    if constexpr (kStats) stats.add_chunk(l, col0, point);
    if constexpr (kRace) winner.template add_chunk<kNoise, kFiltered>(l, col0, race);
  }
}

}  // namespace difforge::sampling::cpu
