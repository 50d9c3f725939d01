// One NVFP4 block (16 codes, 8 bytes) decoded on the CPU: a table of the 16 E2M1 values instead of the header's
// branchy e2m1_value, so the loop vectorizes. Shared by nvfp4_dequantize and the blocked nvfp4_linear.
#pragma once

#include <array>

#include "common/element.h"
#include "difforge/nvfp4.h"

namespace difforge::formats {

inline const std::array<float, 16>& e2m1_table() {
  static const std::array<float, 16> table = [] {
    std::array<float, 16> t{};
    for (uint32_t c = 0; c < 16; ++c) t[c] = nvfp4::e2m1_value(c);
    return t;
  }();
  return table;
}

// out[0..16) = e2m1(code) * scale, scale = nvfp4::block_decode_scale(...): the same fp32 product as the header.
template <typename T>
inline void decode_nvfp4_block(const uint8_t* packed, float scale, const std::array<float, 16>& e2m1, T* out) {
  for (int c = 0; c < nvfp4::kBlock / 2; ++c) {
    out[2 * c] = cpu::to_elem<T>(e2m1[packed[c] & 15u] * scale);
    out[2 * c + 1] = cpu::to_elem<T>(e2m1[packed[c] >> 4] * scale);
  }
}

}  // namespace difforge::formats
