// The threads that own one row of a sampling kernel: a warp (small rows, several rows per CTA) or a whole CTA
// (large rows). Both expose the same interface, so every kernel body is written once:
//   rank / size        this thread's position in the team and the team's thread count
//   sync()             a barrier over the team (with shared-memory ordering)
//   merge(state)       the merged RowState of all team threads, returned to every thread
//   sum(n)             an integer sum over the team, returned to every thread
// Merges run in a fixed tree order, so a row's statistics do not depend on scheduling (reproducible runs).
#pragma once

#include <cuda_runtime.h>

#include <climits>

#include "difforge/sampling.h"

namespace difforge::sampling::detail {

// Team sizes by row length: a warp per row up to kWarpRowMaxVocab (kWarpRowThreads / 32 rows per CTA), a CTA
// of kMidRowThreads up to kMidRowMaxVocab, else kLargeRowThreads.
constexpr int kWarpRowThreads = 256, kMidRowThreads = 256, kLargeRowThreads = 512;
constexpr int64_t kWarpRowMaxVocab = 2048, kMidRowMaxVocab = 16384;

// The minimum resident CTAs (__launch_bounds__) of a row kernel with `threads` per CTA: 1024 threads per SM caps
// the kernels at 64 registers, which they fit without spilling (left to itself, ptxas gave the 256-thread
// discrete_step kernels 48 registers and spills).
constexpr int min_resident_ctas(int threads) { return 1024 / threads; }

enum class TeamKind { warp, mid_cta, large_cta };

inline TeamKind team_kind(int64_t vocab) {
  if (vocab <= kWarpRowMaxVocab) return TeamKind::warp;
  return vocab <= kMidRowMaxVocab ? TeamKind::mid_cta : TeamKind::large_cta;
}

// Grid sizes (the kernels stride over rows, so a grid capped at INT_MAX CTAs still covers every row).
inline unsigned cta_team_ctas(int64_t rows) { return unsigned(rows < INT_MAX ? rows : INT_MAX); }
inline unsigned warp_team_ctas(int64_t rows) { return cta_team_ctas(ceil_div(rows, kWarpRowThreads / 32)); }

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ RowState shfl_down_state(const RowState& s, int delta) {
  RowState o;
  o.max = __shfl_down_sync(kFullMask, s.max, delta);
  o.z = __shfl_down_sync(kFullMask, s.z, delta);
  o.a = __shfl_down_sync(kFullMask, s.a, delta);
  o.z_excl = __shfl_down_sync(kFullMask, s.z_excl, delta);
  o.top1 = __shfl_down_sync(kFullMask, s.top1, delta);
  o.top2 = __shfl_down_sync(kFullMask, s.top2, delta);
  o.best_key = __shfl_down_sync(kFullMask, s.best_key, delta);
  o.best_idx = __shfl_down_sync(kFullMask, static_cast<long long>(s.best_idx), delta);
  o.bad = __shfl_down_sync(kFullMask, int(s.bad), delta) != 0;
  return o;
}

__device__ __forceinline__ RowState shfl_state(const RowState& s, int src) {
  RowState o;
  o.max = __shfl_sync(kFullMask, s.max, src);
  o.z = __shfl_sync(kFullMask, s.z, src);
  o.a = __shfl_sync(kFullMask, s.a, src);
  o.z_excl = __shfl_sync(kFullMask, s.z_excl, src);
  o.top1 = __shfl_sync(kFullMask, s.top1, src);
  o.top2 = __shfl_sync(kFullMask, s.top2, src);
  o.best_key = __shfl_sync(kFullMask, s.best_key, src);
  o.best_idx = __shfl_sync(kFullMask, static_cast<long long>(s.best_idx), src);
  o.bad = __shfl_sync(kFullMask, int(s.bad), src) != 0;
  return o;
}

// The merged state of the warp's 32 lanes, on lane 0 (other lanes hold partial merges). All lanes must call.
__device__ __forceinline__ RowState warp_merge_to_lane0(RowState s) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) s = merge(s, shfl_down_state(s, delta));
  return s;
}

__device__ __forceinline__ long long warp_sum(long long v) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_xor_sync(kFullMask, v, delta);
  return v;
}

// One warp per row. Every lane of the warp must take part in each call.
struct WarpTeam {
  static constexpr bool kIsWarp = true;
  int rank;  // lane
  int size;  // 32

  __device__ explicit WarpTeam() : rank(int(threadIdx.x) & 31), size(32) {}
  __device__ void sync() const { __syncwarp(); }
  __device__ RowState merge(const RowState& s) const { return shfl_state(warp_merge_to_lane0(s), 0); }
  __device__ long long sum(long long v) const { return warp_sum(v); }
};

// One CTA per row, kThreads threads (a multiple of 32, at most 1024). Every thread must take part in each call.
template <int kThreads>
struct CtaTeam {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, one CTA");
  static constexpr bool kIsWarp = false;
  static constexpr int kWarps = kThreads / 32;

  // Shared memory of the cross-warp reductions: one slot per warp and one for the result.
  struct Scratch {
    RowState states[kWarps + 1];
    long long sums[kWarps + 1];
  };

  int rank, size;
  Scratch* scratch;

  __device__ explicit CtaTeam(Scratch* s) : rank(int(threadIdx.x)), size(kThreads), scratch(s) {}
  __device__ void sync() const { __syncthreads(); }

  // Warp partials go to slots [0, kWarps); warp 0 merges them into slot kWarps. The next call's writes to the
  // result slot happen after its first barrier, which every thread reaches only after reading this result.
  __device__ RowState merge(const RowState& s) const {
    const int lane = rank & 31, warp = rank >> 5;
    const RowState w = warp_merge_to_lane0(s);
    if (lane == 0) scratch->states[warp] = w;
    __syncthreads();
    if (warp == 0) {
      const RowState v = warp_merge_to_lane0(lane < kWarps ? scratch->states[lane] : RowState{});
      if (lane == 0) scratch->states[kWarps] = v;
    }
    __syncthreads();
    return scratch->states[kWarps];
  }

  __device__ long long sum(long long v) const {
    const int lane = rank & 31, warp = rank >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch->sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
      const long long t = warp_sum(lane < kWarps ? scratch->sums[lane] : 0);
      if (lane == 0) scratch->sums[kWarps] = t;
    }
    __syncthreads();
    return scratch->sums[kWarps];
  }
};

}  // namespace difforge::sampling::detail
