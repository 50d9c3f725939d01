// Row-level helpers of the CPU norm kernels: vectorizable reductions and dispatch on the norm kind.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/element.h"
#include "difforge/adaln_norm.h"

namespace difforge::norm::cpu {

using difforge::cpu::dispatch_float;
using difforge::cpu::to_acc;
using difforge::cpu::to_elem;

// Fixed lane count: the compiler maps the partial sums onto one SIMD register, and the summation
// order depends only on n, so results are reproducible run to run.
constexpr int kLanes = 8;

template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, F&& term) {
  acc_t part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += term(c + j);
  for (int j = 0; c + j < n; ++j) part[j] += term(c + j);
  acc_t total = 0;
  for (int j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

// Neutral operands for absent inputs, so row loops stay branch-free: an absent weight reads
// ones, an absent bias / scale / shift reads zeros.
template <typename acc_t>
struct Neutral {
  std::vector<acc_t> ones, zeros;
  explicit Neutral(int64_t n) : ones(n, acc_t(1)), zeros(n, acc_t(0)) {}
  const acc_t* or_ones(const acc_t* p) const { return p ? p : ones.data(); }
  const acc_t* or_zeros(const acc_t* p) const { return p ? p : zeros.data(); }
};

// Calls f.template operator()<K>() with the norm kind as a compile-time constant.
template <typename F>
inline void dispatch_norm(NormKind kind, F&& f) {
  if (kind == NormKind::layer) f.template operator()<NormKind::layer>();
  else f.template operator()<NormKind::rms>();
}

}  // namespace difforge::norm::cpu
