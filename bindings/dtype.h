// The torch dtype -> difforge::DType map of every binding (the kernels take DType, not torch types).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "difforge/common.h"

namespace difforge::binding {

// The float types every kernel takes (fp64 only where an op says so).
inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// t must already be checked to be one of the four float types.
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

}  // namespace difforge::binding
