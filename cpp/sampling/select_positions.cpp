// CPU select_positions: per batch row, the k eligible positions with the largest score (key / tau + G, or key),
// ties to the lower index, NaN lowest, united with {eligible, key >= threshold}. O(L) per row: nth_element finds
// the k-th largest ordered key, then one pass in index order takes everything above it and the first ties.
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "sampling/row_math.h"
#include "sampling/sampling_cpu.h"

namespace difforge::sampling {
namespace {

using cpu::kChunk;

// Ordered keys of the scores of one row (ordered_key maps NaN to 0, below every number).
void score_keys(const SelectParams& p, int64_t b, uint32_t* okey) {
  const float* key = p.key + b * p.len;
  const float tau = p.gumbel_tau;
  float g[kChunk];
  for (int64_t l0 = 0; l0 < p.len; l0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, p.len - l0);
    if (tau > 0.f) cpu::gumbel_chunk(p.seed, p.offset, b, kPositionStream, l0, g);
    for (int64_t j = 0; j < n; ++j) okey[l0 + j] = ordered_key(tau > 0.f ? key[l0 + j] / tau + g[j] : key[l0 + j]);
  }
}

void select_row(const SelectParams& p, int64_t b, std::vector<uint32_t>& okey, std::vector<uint32_t>& pool) {
  const bool* eligible = p.eligible + b * p.len;
  bool* selected = p.selected + b * p.len;
  std::fill(selected, selected + p.len, false);
  okey.resize(p.len);
  score_keys(p, b, okey.data());
  pool.clear();
  for (int64_t l = 0; l < p.len; ++l)
    if (eligible[l]) pool.push_back(okey[l]);
  const int64_t k = std::clamp<int64_t>(p.k[b], 0, static_cast<int64_t>(pool.size()));
  if (k > 0) {
    std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), std::greater<>());
    const uint32_t kth = pool[k - 1];
    int64_t ties = k - std::count_if(pool.begin(), pool.begin() + (k - 1), [&](uint32_t v) { return v > kth; });
    for (int64_t l = 0; l < p.len; ++l) {
      if (!eligible[l]) continue;
      const bool tie = okey[l] == kth && ties > 0;
      ties -= tie;
      selected[l] = okey[l] > kth || tie;
    }
  }
  if (p.threshold) {
    const float* key = p.key + b * p.len;
    const float thr = p.threshold[b];
    for (int64_t l = 0; l < p.len; ++l) selected[l] = selected[l] || (eligible[l] && key[l] >= thr);
  }
}

}  // namespace

void select_positions_cpu(const SelectParams& p) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(p.len, 1));
  at::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> okey, pool;
    for (int64_t b = begin; b < end; ++b) select_row(p, b, okey, pool);
  });
}

}  // namespace difforge::sampling
