// CPU tweedie_step (SEDD analytic, uniform process): pass 1 takes the row's max and z = sum exp(l - max), pass 2
// races log(max(p_y, 0)) + G_y with the masses of difforge/sampling.h (tweedie_mass_scaled).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "sampling/row_scan.h"
#include "sampling/sampling_cpu.h"

namespace difforge::sampling {
namespace {

using cpu::kChunk;

// log(x) for x > 0 including subnormals (the masses of far-below-max columns), which log_positive does not take.
inline float log_mass(float x) {
  const bool tiny = x < 1e-30f;
  const float scaled = tiny ? x * 0x1p64f : x;
  return cpu::log_positive(scaled) - (tiny ? 44.3614195558365f : 0.f);  // 64 ln 2
}

template <typename T>
int64_t tweedie_row(const TweedieParams& p, int64_t r) {
  const T* row = static_cast<const T*>(p.log_score) + r * p.row_stride;
  const int64_t x = p.current[r], V = p.vocab;
  const float e = p.e[r];
  if (x < 0 || x >= V || !(e > 0.f && e <= 1.f)) return -1;

  cpu::LaneStats stats;
  cpu::LaneRace unused;
  cpu::scan_row<true, false, false, false>(row, V, -1, cpu::RaceSetup{}, stats, unused);
  RowState s;
  stats.fill(s);
  if (row_is_bad(s)) return -1;

  float l[kChunk], g[kChunk], key[kChunk];
  float best_key = -INFINITY;
  int64_t best_idx = -1;
  for (int64_t col0 = 0; col0 < V; col0 += kChunk) {
    cpu::load_chunk(row + col0, std::min<int64_t>(kChunk, V - col0), l);
    cpu::gumbel_chunk(p.seed, p.offset, r, kGumbelStream, col0, g);
    const int64_t current_j = x - col0;
#pragma omp simd
    for (int j = 0; j < kChunk; ++j) {
      const float mass = tweedie_mass_scaled(cpu::exp_nonpositive(l[j] - s.max), s.z, e, V, j == current_j);
      key[j] = mass > 0.f ? log_mass(mass) + g[j] : -INFINITY;
    }
    const cpu::ChunkMax m = cpu::chunk_argmax(key);
    if (m.value > best_key) {
      best_key = m.value;
      best_idx = col0 + m.index;
    }
  }
  return best_idx >= 0 ? best_idx : x;  // no positive mass: stay
}

template <typename T>
void tweedie_rows(const TweedieParams& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) p.token[r] = tweedie_row<T>(p, r);
  });
}

}  // namespace

void tweedie_step_cpu(const TweedieParams& p) {
  switch (p.dtype) {
    case DType::f32: tweedie_rows<float>(p); break;
    case DType::f16: tweedie_rows<c10::Half>(p); break;
    case DType::bf16: tweedie_rows<c10::BFloat16>(p); break;
    case DType::f64: break;  // rejected by the binding
  }
}

}  // namespace difforge::sampling
