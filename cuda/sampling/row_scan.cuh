// Reading a row in groups of 4 consecutive columns (one Philox block per group, difforge/sampling.h), and the
// Gumbel race over a group with a cheap pre-test: most columns of a large row cannot beat the thread's best
// key, so their Philox block and exact noise (two accurate logs) are skipped. The pre-test is a strict
// upper bound, so the winner is the one the exact race over every column gives, on any device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/element.cuh"
#include "difforge/sampling.h"

namespace difforge::sampling::detail {

using difforge::cuda::to_float;

// Whether a row's groups can be read with one vector load each (rows need not be 4-element aligned:
// V = 50257 is odd, so consecutive rows start at every alignment).
template <typename T>
__device__ __forceinline__ bool groups_aligned(const T* row) {
  return reinterpret_cast<uintptr_t>(row) % (4 * sizeof(T)) == 0;
}

// Columns [4g, 4g + 4) of the row as floats; n (1..4) of them lie inside the row, the rest read as -inf.
template <typename T>
__device__ __forceinline__ int load_group(const T* row, int64_t g, int64_t vocab, bool aligned, float (&l)[4]) {
  const int64_t col0 = 4 * g;
  const int n = vocab - col0 >= 4 ? 4 : int(vocab - col0);
  if (n == 4 && aligned) {
    if constexpr (sizeof(T) == 4) {
      const float4 v = *reinterpret_cast<const float4*>(row + col0);
      l[0] = v.x, l[1] = v.y, l[2] = v.z, l[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(row + col0);
      T e[4];
      memcpy(e, &v, sizeof v);
#pragma unroll
      for (int j = 0; j < 4; ++j) l[j] = to_float(e[j]);
    }
    return 4;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) l[j] = j < n ? to_float(row[col0 + j]) : -INFINITY;
  return n;
}

// The column of group g (0..3) that is the point d, or -1.
__device__ __forceinline__ int point_in_group(int64_t point, int64_t g) {
  return point >= 0 && (point >> 2) == g ? int(point & 3) : -1;
}

// Larger than any gumbel(w): gumbel(0) = 22.87.
constexpr float kGumbelCeiling = 23.f;

// An upper bound of gumbel(w) from one fast log: E = -log1p(-v) >= v, so G = -log E <= -log v.
__device__ __forceinline__ float gumbel_upper(uint32_t w) {
  constexpr float kTwoM32 = 2.3283064365386963e-10f, kLn2 = 0.693147182f;
  return -kLn2 * __log2f((float(w) + 0.5f) * kTwoM32);
}

// Whether a key base + noise, with noise <= noise_upper, may reach `best` (win or tie). The slack covers the
// fast log (__log2f: 2 ulp, 2^-22 near 1), the accurate logs' ulps and the float roundings on both sides,
// and the base's own error when it is computed as l * (1 / T) instead of l / T.
__device__ __forceinline__ bool may_reach(float base, float noise_upper, float best) {
  const float slack = 3e-5f + 1e-6f * (fabsf(base) + fabsf(best));
  return base + noise_upper + slack >= best;
}

// Where a row's Gumbel noise comes from: column y uses word y % 4 of row_block(seed, offset, row, stream 0, y / 4).
struct NoiseSource {
  uint64_t seed, offset;
  int64_t row;
};

// Offers the columns of group g to the race of `s` with keys exact(j) + gumbel(w_j). fast[j] bounds exact(j)
// within may_reach's slack; -inf marks a column out of the race. Columns that cannot reach the thread's best
// key are skipped before their noise is drawn (the whole group before its Philox block).
template <class Exact>
__device__ __forceinline__ void race_group(RowState& s, const float (&fast)[4], Exact exact, int64_t g,
                                           const NoiseSource& src) {
  const float top = fmaxf(fmaxf(fast[0], fast[1]), fmaxf(fast[2], fast[3]));
  if (!may_reach(top, kGumbelCeiling, s.best_key)) return;
  const philox::Uint4 block = row_block(src.seed, src.offset, uint64_t(src.row), kGumbelStream, uint64_t(g));
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w = word(block, j);
    if (may_reach(fast[j], gumbel_upper(w), s.best_key)) offer(s, exact(j) + gumbel(w), 4 * g + j);
  }
}

}  // namespace difforge::sampling::detail
