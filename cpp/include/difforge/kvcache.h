// Quantized KV cache: the group quantizer, the code packing and the Jensen-bias correction shared by the
// CPU (cpp/kvcache) and CUDA (cuda/kvcache) kernels. Torch-free, header-only.
// Spec: kv_cache_jensen.md (§2 quantizer and layout, §3 bias).
//
// Quantizer (asymmetric min-max round-to-nearest, one grid per group of `group_size` values):
//   step = (max - min) / (2^bits - 1)    (the grid spacing Delta), zero = min, both rounded to the meta dtype
//   code = clamp(rint((x - zero) / step), 0, 2^bits - 1)   (0 when step == 0),  x^ = zero + step * code
// axis "token": a group is group_size consecutive channels of one (token, head); axis "channel": a group is
// group_size consecutive tokens of one (head, channel), the last group of a sequence possibly shorter.
// Codes are packed little-endian along the channels of a token: channel c occupies bits
// [bits * c mod 8, + bits) of byte bits * c / 8.
//
// Attention over [quantized cache ; bf16 sink ; current chunk] (one softmax over all keys):
//   logit(i, j) = scale * q_i . k^_j - lambda * b(q_i, Delta_j)   for quantized cached keys j
//   logit(i, j) = scale * q_i . k_j                               for sink and current keys (never biased)
// with x_c = scale * q_c * Delta_{j, c} / 2 and the bias b (spec §3.2):
//   exact:   sum_c log(sinh x_c / x_c)
//   taylor2: sum_c x_c^2 / 6                      = scale^2 / 24 * sum_c q_c^2 Delta_c^2
//   taylor4: max(0, sum_c x_c^2 / 6 - x_c^4 / 180)
// Values are dequantized but never corrected (the output is linear in v).
#pragma once

#include <cmath>

#include "difforge/attention.h"
#include "difforge/common.h"

namespace difforge::kvcache {

enum class Axis : int { token = 0, channel = 1 };
enum class Jensen : int { none = 0, taylor2 = 1, taylor4 = 2, exact = 3 };

DF_INLINE int max_code(int bits) { return (1 << bits) - 1; }
DF_INLINE bool supported_bits(int64_t bits) { return bits == 2 || bits == 4 || bits == 8; }

// step from a group's range, before rounding to the meta dtype.
DF_INLINE float grid_step(float lo, float hi, int bits) { return (hi - lo) / float(max_code(bits)); }

// The code of x on the grid (zero, step) as stored (meta-rounded): round half to even, clamped because
// meta rounding can move the group's extremes just outside the grid.
DF_INLINE uint32_t encode(float x, float step, float zero, int bits) {
  if (!(step > 0.f)) return 0;
  const float c = rintf((x - zero) / step);
  return uint32_t(fminf(fmaxf(c, 0.f), float(max_code(bits))));
}

DF_INLINE float decode(uint32_t code, float step, float zero) { return fmaf(step, float(code), zero); }

// Code of channel c in a packed row of codes.
DF_INLINE uint32_t unpack_code(const uint8_t* row, int64_t c, int bits) {
  const int64_t bit = c * bits;
  return (uint32_t(row[bit >> 3]) >> (bit & 7)) & uint32_t(max_code(bits));
}

// Bytes of one packed row of d channels.
DF_INLINE int64_t packed_bytes(int64_t d, int bits) { return d * bits / 8; }

// F(x) = log(sinh|x| / |x|), even, F(0) = 0; series for small |x|, the log1p form beyond (fp32 relative
// error < 3e-6, spec §3.2).
DF_INLINE float log_sinhc(float x) {
  const float a = fabsf(x);
  if (a < 0.5f) {
    const float x2 = a * a;
    return x2 * (1.f / 6.f + x2 * (-1.f / 180.f + x2 * (1.f / 2835.f)));
  }
  return a - logf(2.f * a) + log1pf(-expf(-2.f * a));
}

// Coefficients of the truncated biases in terms of the per-channel sums sum_c q_c^2 Delta_c^2 (order 2)
// and sum_c q_c^4 Delta_c^4 (order 4): b2 = c2 * S2, b4 = max(0, c2 * S2 - c4 * S4).
DF_INLINE float taylor2_coefficient(float scale) { return scale * scale / 24.f; }
DF_INLINE float taylor4_coefficient(float scale) { return scale * scale * scale * scale / 2880.f; }

// A quantized [B, L, H, D] tensor: its sizes, code width and grouping. step / zero are [B, L, H, D / group]
// (token) or [B, ceil(L / group), H, D] (channel) in the meta dtype, contiguous.
struct QuantLayout {
  DType meta_dtype = DType::f16;
  int64_t batch = 0, len = 0, heads = 0, head_dim = 0;
  int bits = 2, group_size = 32;
  Axis axis = Axis::token;

  DF_INLINE int64_t meta_len() const { return axis == Axis::token ? len : (len + group_size - 1) / group_size; }
  DF_INLINE int64_t meta_width() const { return axis == Axis::token ? head_dim / group_size : head_dim; }
  // Index of the step / zero of value (b, l, h, c).
  DF_INLINE int64_t meta_index(int64_t b, int64_t l, int64_t h, int64_t c) const {
    const int64_t row = (b * meta_len() + (axis == Axis::token ? l : l / group_size)) * heads + h;
    return row * meta_width() + (axis == Axis::token ? c / group_size : c);
  }
};

// kv_quantize: x (any strides, last 1) -> contiguous codes [B, L, H, D * bits / 8], step, zero.
struct QuantizeParams : QuantLayout {
  DType dtype = DType::f32;  // x
  const void* x = nullptr;
  attention::Strides x_strides;
  uint8_t* codes = nullptr;
  void* step = nullptr;
  void* zero = nullptr;
};

// kv_dequantize: contiguous codes / step / zero as kv_quantize writes them -> contiguous out [B, L, H, D].
struct DequantizeParams : QuantLayout {
  DType dtype = DType::f32;  // out
  const uint8_t* codes = nullptr;
  const void* step = nullptr;
  const void* zero = nullptr;
  void* out = nullptr;
};

// A packed quantized K or V segment: codes uint8 [B, L, Hkv, D * bits / 8], step / zero [B, L, Hkv, D / group]
// (token-axis groups) in the meta dtype. Strides in elements (bytes for codes).
struct QuantizedSegment {
  const uint8_t* codes = nullptr;
  const void* step = nullptr;
  const void* zero = nullptr;
  attention::Strides codes_strides, step_strides, zero_strides;
};

// A bf16/fp16/fp32 K or V segment [B, L, Hkv, D] in q's dtype.
struct DenseSegment {
  const void* data = nullptr;
  attention::Strides strides;
};

struct QuantizedAttentionParams {
  DType dtype = DType::bf16;      // q, current and sink keys/values, out
  DType meta_dtype = DType::f16;  // step / zero
  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t q_len = 0, cache_len = 0, sink_len = 0, cur_len = 0;
  int bits = 2, group_size = 32;
  const void* q = nullptr;
  attention::Strides q_strides;
  QuantizedSegment k_cache, v_cache;
  DenseSegment k_sink, v_sink, k_cur, v_cur;
  float scale = 1.f, lambda = 1.f;
  Jensen jensen = Jensen::none;
  void* out = nullptr;  // contiguous [B, Lq, Hq, D]

  DF_INLINE int64_t groups() const { return head_dim / group_size; }
  DF_INLINE int64_t kv_head(int64_t h) const { return h / (heads_q / heads_kv); }
};

}  // namespace difforge::kvcache
