// Unpacking rows of packed codes on the CPU: one table copy per byte instead of shifts and masks per channel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "difforge/kvcache.h"

namespace difforge::kvcache::cpu {

// Every byte value's codes as floats, lowest bits first.
struct CodeTable {
  float codes[256][4] = {};
  explicit CodeTable(int bits) {
    for (int byte = 0; byte < 256; ++byte)
      for (int k = 0; k < 8 / bits; ++k) codes[byte][k] = float((byte >> (k * bits)) & max_code(bits));
  }
};

// The codes of channels [0, d) of a packed row as floats (unpack_code for every channel).
inline void unpack_row(const uint8_t* codes, int64_t d, int bits, float* out) {
  if (bits == 8) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) out[c] = float(codes[c]);
    return;
  }
  static const CodeTable int2(2), int4(4);
  const CodeTable& table = bits == 2 ? int2 : int4;
  const int per_byte = 8 / bits;
  for (int64_t i = 0; i < packed_bytes(d, bits); ++i) std::copy_n(table.codes[codes[i]], per_byte, out + i * per_byte);
}

}  // namespace difforge::kvcache::cpu
