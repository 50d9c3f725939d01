// CPU kernels of the formats family: the HiF8 and NVFP4 codecs (parallel, branch-light per element) and the
// quantized linears (blocked dequantize + fp32 GEMM through ATen). Reference for cuda/formats.
// Math: cpp/include/difforge/hif8.h, nvfp4.h; parameters: formats.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "difforge/formats.h"

namespace difforge::formats {

void hif8_cpu(const Hif8Params& p);

void hif8_decode_cpu(const Hif8DecodeParams& p);

void nvfp4_quantize_cpu(const Nvfp4QuantizeParams& p);

void nvfp4_dequantize_cpu(const Nvfp4DequantizeParams& p);

// The linears return fp32 [M, N] = x_hat [M, K] (fp32) @ W^T, W^ dequantized 1024 weight rows at a time (no
// full fp32 copy of the weight). HiF8: W^ = decode(w_codes) / *w_scale.
at::Tensor hif8_linear_cpu(const at::Tensor& x_hat, const at::Tensor& w_codes, const float* w_scale);

// NVFP4: W^ = e2m1 * (pts * block scale), torchao's order (w_pts null: one-level).
at::Tensor nvfp4_linear_cpu(const at::Tensor& x_hat, const at::Tensor& w_scales, const at::Tensor& w_packed,
                            const float* w_pts);

}  // namespace difforge::formats
