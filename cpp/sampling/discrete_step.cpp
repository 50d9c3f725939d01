// CPU discrete_step: per row, the component draw, the statistics and the Gumbel race of difforge/sampling.h, in one
// streaming pass when no filter is active. Rows run in parallel; the row's draws depend on (seed, offset, row,
// column) only, so any split of the rows gives the same tokens.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/element.h"
#include "sampling/filter_threshold.h"
#include "sampling/row_scan.h"
#include "sampling/sampling_cpu.h"

namespace difforge::sampling {
namespace {

using cpu::FilterScratch;
using cpu::LaneRace;
using cpu::LaneStats;
using cpu::RaceSetup;
using cpu::scan_row;

// The row's statistics and race winner: one pass, or stats then the filtered race over an fp32 copy of the row.
struct RowResult {
  RowState state;
  int64_t winner = -1;  // -1: the race did not run or no column was allowed
};

template <typename T>
void stats_and_race(const T* row, const StepParams& p, int64_t point, const RaceSetup& race, RowResult& out) {
  LaneStats stats;
  LaneRace winner;
  if (p.greedy) scan_row<true, true, false, false>(row, p.vocab, point, race, stats, winner);
  else scan_row<true, true, true, false>(row, p.vocab, point, race, stats, winner);
  stats.fill(out.state);
  out.winner = winner.best_idx;
}

template <typename T>
void stats_only(const T* row, const StepParams& p, int64_t point, RowResult& out) {
  LaneStats stats;
  LaneRace unused;
  scan_row<true, false, false, false>(row, p.vocab, point, RaceSetup{}, stats, unused);
  stats.fill(out.state);
}

void filtered_race(const float* row, const StepParams& p, RaceSetup race, float row_max, FilterScratch& scratch,
                   RowResult& out) {
  race.threshold = cpu::filter_threshold(row, p.vocab, p.top_k, p.top_p, p.temperature, row_max, scratch);
  LaneStats unused;
  LaneRace winner;
  if (p.greedy) scan_row<false, true, false, true>(row, p.vocab, -1, race, unused, winner);
  else scan_row<false, true, true, true>(row, p.vocab, -1, race, unused, winner);
  out.winner = winner.best_idx;
}

struct Scratch {
  std::vector<float> row;  // fp32 copy of a filtered row (read several times)
  FilterScratch filter;
};

// The token of one row (-1 when it cannot be sampled); fills stats for rows it reads.
template <typename T>
int64_t step_row(const StepParams& p, int64_t r, float* stats, Scratch& scratch) {
  const T* row = static_cast<const T*>(p.logits) + r * p.row_stride;
  const float* coef = p.coef + 3 * r;
  const int64_t d = p.point[r], V = p.vocab;
  const float u = uniform01(draw_word(p.seed, p.offset, r, kComponentStream, 0));
  const bool jump_rule = p.rule != Rule::mixture;
  const bool filtered = (p.top_k > 0 && p.top_k < V) || p.top_p < 1.f;

  // The mixture rule's weights are the coefficients: the component is known before the row is read.
  Mixture m{};
  int component = -1;
  if (!jump_rule) {
    m = mixture_weights(p.rule, coef, -INFINITY, V);
    if (!weights_valid(m)) return -1;
    component = choose_component(m, u);
  }
  const bool exclude = jump_rule && d >= 0 && d < V;
  const RaceSetup race{p.seed, p.offset, static_cast<uint64_t>(r), p.temperature, 0u, exclude ? d : -1};

  RowResult res;
  if (row_needs_logits(p.rule, coef)) {
    const float* row_f32 = nullptr;
    if (filtered && (jump_rule || component == kSoftmaxPart)) {
      scratch.row.resize(V);
      for (int64_t y = 0; y < V; ++y) scratch.row[y] = difforge::cpu::to_acc<float>(row[y]);
      row_f32 = scratch.row.data();
      stats_only(row_f32, p, d, res);
    } else if (jump_rule || component == kSoftmaxPart) {
      stats_and_race(row, p, d, race, res);  // jump rules: the race runs before the weights are known
    } else {
      stats_only(row, p, d, res);
    }
    if (row_is_bad(res.state)) return -1;
    if (jump_rule) {
      m = mixture_weights(p.rule, coef, res.state.max + std::log(res.state.z_excl), V);
      if (!weights_valid(m)) return -1;
      component = choose_component(m, u);
    }
    if (filtered && component == kSoftmaxPart) filtered_race(row_f32, p, race, res.state.max, scratch.filter, res);
  }

  int64_t token = d;  // the point part, and the softmax part when no column is allowed
  if (component == kSoftmaxPart && res.winner >= 0) token = res.winner;
  if (component == kUniformPart)
    token = uniform_token(draw_word(p.seed, p.offset, r, kUniformStream, 0), V, d, m.exclude_point);

  if (row_needs_logits(p.rule, coef)) {
    // (l - max) - log z rather than l - lse: no cancellation when the token holds most of the mass.
    const float log_z = std::log(res.state.z);
    stats[kLogpToken] = token >= 0 && token < V ? (difforge::cpu::to_acc<float>(row[token]) - res.state.max) - log_z
                                                : NAN;
    stats[kLse] = row_lse(res.state);
    stats[kEntropy] = row_entropy(res.state);
    stats[kTop1] = res.state.top1;
    stats[kTop2] = res.state.top2;
  }
  return token;
}

template <typename T>
void step_rows(const StepParams& p) {
  // Enough columns per task that small vocabularies still split across threads without per-row overhead.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t r = begin; r < end; ++r) {
      float* stats = p.stats + kNumStats * r;
      std::fill(stats, stats + kNumStats, NAN);
      p.token[r] = step_row<T>(p, r, stats, scratch);
      if (p.token[r] < 0) std::fill(stats, stats + kNumStats, NAN);
    }
  });
}

}  // namespace

void discrete_step_cpu(const StepParams& p) {
  switch (p.dtype) {
    case DType::f32: step_rows<float>(p); break;
    case DType::f16: step_rows<c10::Half>(p); break;
    case DType::bf16: step_rows<c10::BFloat16>(p); break;
    case DType::f64: break;  // rejected by the binding
  }
}

}  // namespace difforge::sampling
