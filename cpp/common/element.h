// Element conversions and dtype dispatch shared by every CPU kernel family.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>
#include <type_traits>

#include "difforge/common.h"

namespace difforge::cpu {

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

// The accumulation type of an element type: fp64 for fp64 (gradcheck), else fp32.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace difforge::cpu
