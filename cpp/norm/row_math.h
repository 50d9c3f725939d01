// Row-level helpers of the CPU norm kernels: element conversion and vectorizable reductions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>
#include <utility>
#include <vector>

#include "difforge/adaln_norm.h"

namespace difforge::norm::cpu {

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

// Element type -> acc_t. fp16 goes through _Float16 (vcvtph2ps, vectorizes) where the compiler has it.
template <typename acc_t, typename T>
inline acc_t to_acc(T v) {
#if defined(__F16C__) && defined(__FLT16_MAX__)
  if constexpr (std::is_same_v<T, c10::Half>) return static_cast<acc_t>(std::bit_cast<_Float16>(v.x));
#endif
  return static_cast<acc_t>(v);
}

// acc_t -> element type, rounding as torch does. bf16 gets a branch-free round-to-nearest-even
// (c10's has a NaN branch, which keeps the row loops from vectorizing).
template <typename T, typename acc_t>
inline T to_elem(acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = std::bit_cast<uint32_t>(static_cast<float>(v));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
#if defined(__F16C__) && defined(__FLT16_MAX__)
  } else if constexpr (std::is_same_v<T, c10::Half>) {  // vcvtps2ph: IEEE round-to-nearest-even, vectorizes
    return c10::Half(std::bit_cast<uint16_t>(static_cast<_Float16>(static_cast<float>(v))), c10::Half::from_bits());
#endif
  } else {
    return static_cast<T>(v);
  }
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

// Calls f.template operator()<T>() for the element type named by dtype.
template <typename F>
inline void dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f.template operator()<float>(); break;
    case DType::f16: f.template operator()<c10::Half>(); break;
    case DType::bf16: f.template operator()<c10::BFloat16>(); break;
    case DType::f64: f.template operator()<double>(); break;
  }
}

// Calls f.template operator()<K>() with the norm kind as a compile-time constant.
template <typename F>
inline void dispatch_norm(NormKind kind, F&& f) {
  if (kind == NormKind::layer) f.template operator()<NormKind::layer>();
  else f.template operator()<NormKind::rms>();
}

}  // namespace difforge::norm::cpu
