// CPU NVFP4 codec: quantization block by block (1 x 16, or 16 x 16 tile amax for 2D weight blocks) and its
// inverse, both parallel over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/element.h"
#include "difforge/nvfp4.h"
#include "formats/formats_cpu.h"
#include "formats/nvfp4_block.h"

namespace difforge::formats {
namespace {

using difforge::cpu::dispatch_float;
using difforge::cpu::to_acc;
using nvfp4::kBlock;

constexpr int64_t kRowGrain = 16;

// max |x| of a block as a bit pattern: non-negative floats order like their patterns and NaN patterns sort
// above Inf, so a NaN in the block yields a NaN amax (hence the NaN scale byte) without a branch.
template <typename T>
uint32_t block_abs_max_bits(const T* x) {
  uint32_t m = 0;
  for (int c = 0; c < kBlock; ++c) m = std::max(m, float_bits(to_acc<float>(x[c])) & 0x7FFFFFFFu);
  return m;
}

struct Quantize {
  const Nvfp4QuantizeParams& p;

  template <typename T>
  void operator()() const {
    const T* x = static_cast<const T*>(p.x);
    const int64_t blocks = p.cols / kBlock;
    const float pts = p.pts ? *p.pts : 0.f;
    // 2D: the amax of every 16 x 16 tile first, then the 1 x 16 algorithm with it.
    std::vector<uint32_t> tile_amax;
    if (p.block_2d) {
      const int64_t tiles = ceil_div(p.rows, kBlock);
      tile_amax.assign(tiles * blocks, 0u);
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          for (int64_t r = t * kBlock; r < std::min(p.rows, (t + 1) * kBlock); ++r)
            for (int64_t j = 0; j < blocks; ++j) {
              uint32_t& m = tile_amax[t * blocks + j];
              m = std::max(m, block_abs_max_bits(x + r * p.x_row_stride + j * kBlock));
            }
      });
    }
    at::parallel_for(0, p.rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < blocks; ++j) {
          const T* xb = x + r * p.x_row_stride + j * kBlock;
          const float amax = bits_float(p.block_2d ? tile_amax[(r / kBlock) * blocks + j] : block_abs_max_bits(xb));
          const nvfp4::BlockScale bs = nvfp4::block_scale(amax, pts);
          p.scales[r * blocks + j] = bs.code;
          uint8_t* out = p.packed + r * (p.cols / 2) + j * (kBlock / 2);
          for (int c = 0; c < kBlock; c += 2) {
            const int64_t index = r * p.cols + j * kBlock + c;
            const float x0 = to_acc<float>(xb[c]), x1 = to_acc<float>(xb[c + 1]);
            const uint32_t lo = p.stochastic ? nvfp4::encode_sr(x0, bs.reciprocal, p.seed, p.offset, index)
                                             : nvfp4::encode_rn(x0, bs.reciprocal);
            const uint32_t hi = p.stochastic ? nvfp4::encode_sr(x1, bs.reciprocal, p.seed, p.offset, index + 1)
                                             : nvfp4::encode_rn(x1, bs.reciprocal);
            out[c / 2] = uint8_t(lo | hi << 4);
          }
        }
    });
  }
};

struct Dequantize {
  const Nvfp4DequantizeParams& p;

  template <typename T>
  void operator()() const {
    T* out = static_cast<T*>(p.out);
    const int64_t blocks = p.cols / kBlock;
    const float pts = p.pts ? *p.pts : 0.f;
    const auto& e2m1 = e2m1_table();
    at::parallel_for(0, p.rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < blocks; ++j) {
          decode_nvfp4_block(p.packed + r * (p.cols / 2) + j * (kBlock / 2),
                             nvfp4::block_decode_scale(p.scales[r * blocks + j], pts), e2m1,
                             out + r * p.cols + j * kBlock);
        }
    });
  }
};

}  // namespace

void nvfp4_quantize_cpu(const Nvfp4QuantizeParams& p) { dispatch_float(p.dtype, Quantize{p}); }

void nvfp4_dequantize_cpu(const Nvfp4DequantizeParams& p) { dispatch_float(p.dtype, Dequantize{p}); }

}  // namespace difforge::formats
