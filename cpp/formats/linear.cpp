// CPU quantized linears: the weight is dequantized to fp32 a block of rows at a time and multiplied through
// ATen's GEMM, so the exact fp32 product of the dequantized operands costs one weight block of memory.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <array>

#include "difforge/nvfp4.h"
#include "formats/formats_cpu.h"
#include "formats/nvfp4_block.h"

namespace difforge::formats {
namespace {

constexpr int64_t kWeightRows = 1024;

// fill(w, n0, rows) writes weight rows [n0, n0 + rows) dequantized into w [rows, K].
template <typename Fill>
at::Tensor blocked_linear(const at::Tensor& x_hat, int64_t n, Fill&& fill) {
  const int64_t k = x_hat.size(1);
  if (n <= kWeightRows) {
    at::Tensor w = at::empty({n, k}, x_hat.options());
    fill(w.data_ptr<float>(), int64_t(0), n);
    return at::mm(x_hat, w.t());
  }
  at::Tensor y = at::empty({x_hat.size(0), n}, x_hat.options());
  at::Tensor w = at::empty({kWeightRows, k}, x_hat.options());
  for (int64_t n0 = 0; n0 < n; n0 += kWeightRows) {
    const int64_t rows = std::min(kWeightRows, n - n0);
    at::Tensor block = w.narrow(0, 0, rows);
    fill(block.data_ptr<float>(), n0, rows);
    y.narrow(1, n0, rows).copy_(at::mm(x_hat, block.t()));
  }
  return y;
}

}  // namespace

at::Tensor hif8_linear_cpu(const at::Tensor& x_hat, const at::Tensor& w_codes, const float* w_scale) {
  const int64_t k = w_codes.size(1);
  std::array<float, 256> table;
  for (int c = 0; c < 256; ++c) table[c] = hif8::decode(uint8_t(c)) / *w_scale;
  const uint8_t* codes = w_codes.data_ptr<uint8_t>();
  return blocked_linear(x_hat, w_codes.size(0), [&](float* w, int64_t n0, int64_t rows) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * k; i < end * k; ++i) w[i] = table[codes[n0 * k + i]];
    });
  });
}

at::Tensor nvfp4_linear_cpu(const at::Tensor& x_hat, const at::Tensor& w_scales, const at::Tensor& w_packed,
                            const float* w_pts) {
  const int64_t k = w_packed.size(1) * 2, blocks = k / nvfp4::kBlock;
  const float pts = w_pts ? *w_pts : 0.f;
  const auto& e2m1 = e2m1_table();
  const uint8_t* scales = static_cast<const uint8_t*>(w_scales.data_ptr());
  const uint8_t* packed = w_packed.data_ptr<uint8_t>();
  return blocked_linear(x_hat, w_packed.size(0), [&](float* w, int64_t n0, int64_t rows) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < blocks; ++j) {
          decode_nvfp4_block(packed + (n0 + r) * (k / 2) + j * (nvfp4::kBlock / 2),
                             nvfp4::block_decode_scale(scales[(n0 + r) * blocks + j], pts), e2m1,
                             w + r * k + j * nvfp4::kBlock);
        }
    });
  });
}

}  // namespace difforge::formats
