// Radix select over a team's row: the largest 32-bit key K whose candidates at or above K weigh at least a
// target, in 4 passes of 8-bit digits (most significant first) over a 256-bin shared-memory histogram, each
// digit chosen by radix_pick_digit (difforge/sampling.h). Weights are integers (counts, or fixed-point
// masses), so the histogram sums are exact and independent of the order of the atomic adds: the selected key
// is reproducible and equals what any exact sequential summation gives.
#pragma once

#include "sampling/row_team.cuh"

namespace difforge::sampling::detail {

using Weight = unsigned long long;

// Shared memory of one team's radix select.
struct RadixScratch {
  Weight hist[256];
  Weight target;
  int digit;
};

// visit(fn) must call fn(key, weight) once for each candidate this thread owns, in any order; the team reads
// the same candidates in all 4 passes. target_of(total) turns the total weight of all candidates into the
// target (computed once, by rank 0). Returns K on every thread of the team; 0 when no key reaches the target.
template <class Team, class Visit, class TargetOf>
__device__ __forceinline__ uint32_t radix_select(const Team& team, RadixScratch& sm, Visit visit, TargetOf target_of) {
  uint32_t prefix = 0, mask = 0;
  Weight above = 0;  // rank 0 only: the weight of the candidates known to lie above the current prefix
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = team.rank; i < 256; i += team.size) sm.hist[i] = 0;
    team.sync();
    visit([&](uint32_t key, Weight weight) {
      if (weight != 0 && (key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], weight);
    });
    team.sync();
    if (team.rank == 0) {
      if (pass == 0) {
        Weight total = 0;
        for (int i = 0; i < 256; ++i) total += sm.hist[i];
        sm.target = target_of(total);
      }
      sm.digit = radix_pick_digit<Weight>(sm.hist, sm.target, above);
    }
    team.sync();
    prefix |= uint32_t(sm.digit) << shift;
    mask |= 255u << shift;
    team.sync();  // the next pass (or the next select) clears hist and rewrites digit
  }
  return prefix;
}

}  // namespace difforge::sampling::detail
