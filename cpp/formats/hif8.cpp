// CPU HiF8 codec: the fused per-tensor pass (amax -> scale -> encode -> codes / fake quantization / E4M3) and
// the decoder (a 256-entry table divided by the scale once per call).
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>

#include "common/element.h"
#include "difforge/nvfp4.h"
#include "formats/formats_cpu.h"

namespace difforge::formats {
namespace {

using difforge::cpu::dispatch_float;
using difforge::cpu::to_acc;
using difforge::cpu::to_elem;

constexpr int64_t kGrain = 1 << 14;

// max |x| as a bit pattern: non-negative floats order like their patterns, and NaN patterns sort above Inf,
// so a NaN anywhere reads as a non-finite amax (scale 1) without a branch in the loop.
template <typename T>
float abs_max(const T* x, int64_t n) {
  const uint32_t bits = at::parallel_reduce(
      0, n, kGrain, uint32_t(0),
      [&](int64_t begin, int64_t end, uint32_t m) {
        for (int64_t i = begin; i < end; ++i) m = std::max(m, float_bits(to_acc<float>(x[i])) & 0x7FFFFFFFu);
        return m;
      },
      [](uint32_t a, uint32_t b) { return std::max(a, b); });
  return bits_float(bits);
}

struct Hif8Pass {
  const Hif8Params& p;
  float s;

  template <typename T>
  void operator()() const {
    dispatch_float(p.qdq ? p.qdq_dtype : DType::f32, Writer<T>{p, s});
  }

  template <typename T>
  struct Writer {
    const Hif8Params& p;
    float s;

    template <typename Q>
    void operator()() const {
      const T* x = static_cast<const T*>(p.x);
      Q* qdq = static_cast<Q*>(p.qdq);
      const float pow2 = ldexpf(1.f, p.shift);
      at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const uint8_t c = hif8::encode(to_acc<float>(x[i]) * s, p.saturate, p.rounding);
          const float value = hif8::decode(c);
          if (p.codes) p.codes[i] = c;
          if (qdq) qdq[i] = to_elem<Q>(value / s);
          if (p.e4m3) p.e4m3[i] = nvfp4::e4m3_satfinite(value * pow2);
        }
      });
    }
  };
};

struct DecodeRows {
  const Hif8DecodeParams& p;

  template <typename T>
  void operator()() const {
    const float s = p.scale ? *p.scale : 1.f;
    std::array<T, 256> table;
    for (int c = 0; c < 256; ++c) table[c] = to_elem<T>(hif8::decode(uint8_t(c)) / s);
    T* out = static_cast<T*>(p.out);
    at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = table[p.codes[i]];
    });
  }
};

struct AbsMax {
  const Hif8Params& p;
  float& amax;

  template <typename T>
  void operator()() const {
    amax = abs_max(static_cast<const T*>(p.x), p.n);
  }
};

}  // namespace

void hif8_cpu(const Hif8Params& p) {
  float s = 1.f;
  if (p.scale_in) {
    s = *p.scale_in;
  } else if (p.target > 0.f) {
    float amax = 0.f;
    dispatch_float(p.dtype, AbsMax{p, amax});
    s = hif8::scale_for(amax, p.target);
  }
  if (p.scale_out) *p.scale_out = s;
  if (p.e4m3_scale_inv) *p.e4m3_scale_inv = 1.f / (s * ldexpf(1.f, p.shift));
  dispatch_float(p.dtype, Hif8Pass{p, s});
}

void hif8_decode_cpu(const Hif8DecodeParams& p) { dispatch_float(p.dtype, DecodeRows{p}); }

}  // namespace difforge::formats
