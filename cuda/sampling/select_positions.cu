// select_positions on CUDA (semantics: the CPU kernel cpp/sampling): one CTA per batch row. The kk-th largest
// perturbed key among the eligible positions (kk = min(k[b], #eligible)) comes from a radix select on ordered
// keys; the positions strictly above it are taken, then the lowest-index ties up to kk (a block prefix scan in
// index order). Perturbed keys (key / tau + G) are recomputed in each pass instead of stored, so any length
// fits; united with {eligible, key >= threshold[b]} on the raw key.
#include <cub/block/block_scan.cuh>

#include "difforge/sampling_cuda.h"
#include "sampling/radix_select.cuh"
#include "sampling/row_team.cuh"

namespace difforge::sampling {
namespace detail {
namespace {

constexpr int kSelectThreads = 256;

// The order-preserving key of position i of batch row b (NaN lowest).
__device__ __forceinline__ uint32_t position_key(const SelectParams& p, int64_t b, int64_t i) {
  float k = p.key[b * p.len + i];
  if (p.gumbel_tau > 0.f) {
    k = k / p.gumbel_tau + gumbel(draw_word(p.seed, p.offset, uint64_t(b), kPositionStream, uint64_t(i)));
  }
  return ordered_key(k);
}

__global__ void __launch_bounds__(kSelectThreads) select_positions_kernel(const SelectParams p) {
  using Team = CtaTeam<kSelectThreads>;
  using Scan = cub::BlockScan<long long, kSelectThreads>;
  __shared__ __align__(16) unsigned char scratch[sizeof(Team::Scratch)];  // raw: see discrete_step.cuh
  __shared__ RadixScratch radix;
  __shared__ typename Scan::TempStorage scan_storage;
  const Team team(reinterpret_cast<Team::Scratch*>(scratch));

  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const bool* eligible = p.eligible + b * p.len;
    long long count = 0;
    for (int64_t i = team.rank; i < p.len; i += team.size) count += eligible[i];
    const long long k = p.k[b] > 0 ? p.k[b] : 0, n_eligible = team.sum(count);
    const long long kk = k < n_eligible ? k : n_eligible;

    uint32_t kth = 0;    // the kk-th largest key
    long long ties = 0;  // how many positions whose key equals kth are taken
    if (kk > 0) {
      const auto visit = [&](auto add) {
        for (int64_t i = team.rank; i < p.len; i += team.size)
          if (eligible[i]) add(position_key(p, b, i), Weight(1));
      };
      kth = radix_select(team, radix, visit, [&](Weight) { return Weight(kk); });
      long long above = 0;
      for (int64_t i = team.rank; i < p.len; i += team.size) above += eligible[i] && position_key(p, b, i) > kth;
      ties = kk - team.sum(above);
    }

    const float threshold = p.threshold != nullptr ? p.threshold[b] : 0.f;
    long long ties_before = 0;  // ties in the earlier tiles
    for (int64_t start = 0; start < p.len; start += kSelectThreads) {
      const int64_t i = start + team.rank;
      const bool e = i < p.len && eligible[i];
      const uint32_t key = e && kk > 0 ? position_key(p, b, i) : 0;
      const bool tie = e && kk > 0 && key == kth;
      long long tie_rank, tile_ties;
      Scan(scan_storage).ExclusiveSum(static_cast<long long>(tie), tie_rank, tile_ties);
      bool selected = e && kk > 0 && (key > kth || (tie && ties_before + tie_rank < ties));
      if (e && p.threshold != nullptr && p.key[b * p.len + i] >= threshold) selected = true;
      if (i < p.len) p.selected[b * p.len + i] = selected;
      ties_before += tile_ties;
      __syncthreads();  // scan_storage is reused by the next tile
    }
  }
}

}  // namespace
}  // namespace detail

cudaError_t launch_select_positions(const SelectParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.len == 0) return cudaSuccess;
  if (p.batch < 0 || p.len < 0) return cudaErrorInvalidValue;
  detail::select_positions_kernel<<<detail::cta_team_ctas(p.batch), detail::kSelectThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace difforge::sampling
