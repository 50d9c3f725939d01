// CPU group quantizer of the KV cache: one pass over each group for its range, one to write the codes.
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/element.h"
#include "kvcache/code_table.h"
#include "kvcache/kvcache_cpu.h"

namespace difforge::kvcache {
namespace {

using difforge::cpu::dispatch_float;
using difforge::cpu::to_acc;
using difforge::cpu::to_elem;

// The grid of values [lo, hi] as stored: step and zero rounded to the meta type M, read back as float.
template <typename M>
struct StoredGrid {
  M step, zero;
  float step_f, zero_f;

  StoredGrid(float lo, float hi, int bits)
      : step(to_elem<M>(grid_step(lo, hi, bits))), zero(to_elem<M>(lo)),
        step_f(to_acc<float>(step)), zero_f(to_acc<float>(zero)) {}
  bool finite() const { return std::isfinite(step_f) && std::isfinite(zero_f); }
};

inline void put_code(uint8_t* row, int64_t c, int bits, uint32_t code) {
  const int64_t bit = c * bits;
  row[bit >> 3] |= static_cast<uint8_t>(code << (bit & 7));
}

// Token axis: every (b, l, h) row holds D / group independent groups.
template <typename T, typename M>
bool quantize_token_groups(const QuantizeParams& p) {
  const int64_t D = p.head_dim, G = p.group_size, groups = D / G, bytes = packed_bytes(D, p.bits);
  const int64_t rows = p.batch * p.len * p.heads;
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % p.heads, l = (r / p.heads) % p.len, b = r / (p.heads * p.len);
      const T* x = static_cast<const T*>(p.x) + p.x_strides.offset(b, l, h);
      uint8_t* codes = p.codes + r * bytes;
      M* step = static_cast<M*>(p.step) + r * groups;
      M* zero = static_cast<M*>(p.zero) + r * groups;
      std::memset(codes, 0, bytes);
      for (int64_t j = 0; j < groups; ++j) {
        float lo = INFINITY, hi = -INFINITY;
        bool all_finite = true;
        for (int64_t c = j * G; c < (j + 1) * G; ++c) {
          const float v = to_acc<float>(x[c]);
          all_finite &= std::isfinite(v);
          lo = std::fmin(lo, v);
          hi = std::fmax(hi, v);
        }
        const StoredGrid<M> grid(lo, hi, p.bits);
        if (!all_finite || !grid.finite()) finite = false;
        step[j] = grid.step;
        zero[j] = grid.zero;
        for (int64_t c = j * G; c < (j + 1) * G; ++c)
          put_code(codes, c, p.bits, encode(to_acc<float>(x[c]), grid.step_f, grid.zero_f, p.bits));
      }
    }
  });
  return finite;
}

// Channel axis: a group is up to `group` consecutive tokens of one (b, h, channel); one task per
// (b, token group, h) computes the D grids, then packs each of its tokens' rows.
template <typename T, typename M>
bool quantize_channel_groups(const QuantizeParams& p) {
  const int64_t D = p.head_dim, G = p.group_size, bytes = packed_bytes(D, p.bits);
  const int64_t token_groups = p.meta_len(), tasks = p.batch * token_groups * p.heads;
  std::atomic<bool> finite{true};
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lo(D), hi(D), step_f(D), zero_f(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % p.heads, tg = (t / p.heads) % token_groups, b = t / (p.heads * token_groups);
      const int64_t l0 = tg * G, l1 = std::min(p.len, l0 + G);
      std::fill(lo.begin(), lo.end(), INFINITY);
      std::fill(hi.begin(), hi.end(), -INFINITY);
      bool all_finite = true;
      for (int64_t l = l0; l < l1; ++l) {
        const T* x = static_cast<const T*>(p.x) + p.x_strides.offset(b, l, h);
        for (int64_t c = 0; c < D; ++c) {
          const float v = to_acc<float>(x[c]);
          all_finite &= std::isfinite(v);
          lo[c] = std::fmin(lo[c], v);
          hi[c] = std::fmax(hi[c], v);
        }
      }
      M* step = static_cast<M*>(p.step) + t * D;
      M* zero = static_cast<M*>(p.zero) + t * D;
      for (int64_t c = 0; c < D; ++c) {
        const StoredGrid<M> grid(lo[c], hi[c], p.bits);
        if (!grid.finite()) all_finite = false;
        step[c] = grid.step;
        zero[c] = grid.zero;
        step_f[c] = grid.step_f;
        zero_f[c] = grid.zero_f;
      }
      if (!all_finite) finite = false;
      for (int64_t l = l0; l < l1; ++l) {
        const T* x = static_cast<const T*>(p.x) + p.x_strides.offset(b, l, h);
        uint8_t* codes = p.codes + ((b * p.len + l) * p.heads + h) * bytes;
        std::memset(codes, 0, bytes);
        for (int64_t c = 0; c < D; ++c)
          put_code(codes, c, p.bits, encode(to_acc<float>(x[c]), step_f[c], zero_f[c], p.bits));
      }
    }
  });
  return finite;
}

}  // namespace

bool kv_quantize_cpu(const QuantizeParams& p) {
  bool finite = true;
  dispatch_float(p.dtype, [&]<typename T>() {
    dispatch_float(p.meta_dtype, [&]<typename M>() {
      if constexpr (!std::is_same_v<T, double> && !std::is_same_v<M, double>) {
        finite = p.axis == Axis::token ? quantize_token_groups<T, M>(p) : quantize_channel_groups<T, M>(p);
      }
    });
  });
  return finite;
}

void kv_dequantize_cpu(const DequantizeParams& p) {
  const int64_t D = p.head_dim, bytes = packed_bytes(D, p.bits), rows = p.batch * p.len * p.heads;
  const int64_t channels_per_grid = p.axis == Axis::token ? p.group_size : 1;  // along a row's step / zero
  dispatch_float(p.dtype, [&]<typename T>() {
    dispatch_float(p.meta_dtype, [&]<typename M>() {
      if constexpr (!std::is_same_v<T, double> && !std::is_same_v<M, double>) {
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          std::vector<float> codes(D);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t h = r % p.heads, l = (r / p.heads) % p.len, b = r / (p.heads * p.len);
            const int64_t m = p.meta_index(b, l, h, 0);
            const M* step = static_cast<const M*>(p.step) + m;
            const M* zero = static_cast<const M*>(p.zero) + m;
            cpu::unpack_row(p.codes + r * bytes, D, p.bits, codes.data());
            T* out = static_cast<T*>(p.out) + r * D;
            for (int64_t c = 0; c < D; ++c) {
              const int64_t j = c / channels_per_grid;
              out[c] = to_elem<T>(decode(uint32_t(codes[c]), to_acc<float>(step[j]), to_acc<float>(zero[j])));
            }
          }
        });
      }
    });
  });
}

}  // namespace difforge::kvcache
