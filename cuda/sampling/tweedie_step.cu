// tweedie_step on CUDA (math: difforge/sampling.h, tweedie_mass; semantics: the CPU kernel cpp/sampling), the
// two-pass rule: a team (warp or CTA, as discrete_step) reads its row for max and z, then races
// log(mass_y) + G_y over the columns of positive mass, re-reading the row (from L2 for the large rows).
#include "difforge/sampling_cuda.h"
#include "sampling/row_scan.cuh"
#include "sampling/row_team.cuh"

namespace difforge::sampling {
namespace detail {
namespace {

template <typename T, class Team>
__device__ void tweedie_row(const TweedieParams& p, int64_t row, const Team& team) {
  const T* x = static_cast<const T*>(p.log_score) + row * p.row_stride;
  const bool aligned = groups_aligned(x);
  const int64_t groups = ceil_div(p.vocab, 4), current = p.current[row];
  const float e = p.e[row];
  if (current < 0 || current >= p.vocab || !(e > 0.f && e <= 1.f)) {  // not read
    if (team.rank == 0) p.token[row] = -1;
    return;
  }
  RowState s;
  for (int64_t g = team.rank; g < groups; g += team.size) {
    float l[4];
    const int n = load_group(x, g, p.vocab, aligned, l);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < n) push_logit(s, l[j], false);
  }
  s = team.merge(s);
  int64_t token = -1;
  if (!row_is_bad(s)) {
    const NoiseSource src{p.seed, p.offset, row};
    RowState race;
    for (int64_t g = team.rank; g < groups; g += team.size) {
      float l[4], log_mass[4];
      const int n = load_group(x, g, p.vocab, aligned, l);
      const int current_j = point_in_group(current, g);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float mass = j < n ? tweedie_mass(l[j], s.max, s.z, e, p.vocab, j == current_j) : 0.f;
        log_mass[j] = mass > 0.f ? logf(mass) : -INFINITY;  // no positive mass: out of the race
      }
      race_group(race, log_mass, [&](int j) { return log_mass[j]; }, g, src);
    }
    race = team.merge(race);
    token = race.best_idx >= 0 ? race.best_idx : current;
  }
  if (team.rank == 0) p.token[row] = token;
}

template <typename T>
__global__ void __launch_bounds__(kWarpRowThreads, min_resident_ctas(kWarpRowThreads))
    tweedie_warp_kernel(const TweedieParams p) {
  constexpr int kWarps = kWarpRowThreads / 32;
  const WarpTeam team;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + (int(threadIdx.x) >> 5); row < p.rows;
       row += int64_t(gridDim.x) * kWarps)
    tweedie_row<T>(p, row, team);
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, min_resident_ctas(kThreads)) tweedie_cta_kernel(const TweedieParams p) {
  using Team = CtaTeam<kThreads>;
  __shared__ __align__(16) unsigned char scratch[sizeof(typename Team::Scratch)];  // raw: see discrete_step.cuh
  const Team team(reinterpret_cast<typename Team::Scratch*>(scratch));
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) tweedie_row<T>(p, row, team);
}

template <typename T>
cudaError_t launch_tweedie_rows(const TweedieParams& p, cudaStream_t stream) {
  switch (team_kind(p.vocab)) {
    case TeamKind::warp:
      tweedie_warp_kernel<T><<<warp_team_ctas(p.rows), kWarpRowThreads, 0, stream>>>(p);
      break;
    case TeamKind::mid_cta:
      tweedie_cta_kernel<T, kMidRowThreads><<<cta_team_ctas(p.rows), kMidRowThreads, 0, stream>>>(p);
      break;
    case TeamKind::large_cta:
      tweedie_cta_kernel<T, kLargeRowThreads><<<cta_team_ctas(p.rows), kLargeRowThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

cudaError_t launch_tweedie_step(const TweedieParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.vocab < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::f32: return detail::launch_tweedie_rows<float>(p, stream);
    case DType::f16: return detail::launch_tweedie_rows<__half>(p, stream);
    case DType::bf16: return detail::launch_tweedie_rows<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace difforge::sampling
