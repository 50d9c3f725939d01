// Argument checks, output allocation and entry points of the formats ops, shared by the CPU (formats.cpp) and
// CUDA (formats_cuda.cpp) registrations. A Kernels type supplies hif8(Hif8Params), hif8_decode,
// nvfp4_quantize, nvfp4_dequantize (params structs of difforge/formats.h), the two linears at tensor level
// (hif8_linear, nvfp4_linear: their CPU and CUDA strategies differ) and a device Guard.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "difforge/formats.h"
#include "difforge/nvfp4.h"
#include "dtype.h"

namespace difforge::formats::binding {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using difforge::binding::is_float_type;
using difforge::binding::to_dtype;

inline void check_float(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK(is_float_type(t), op, ": ", name, " must be float32, float16 or bfloat16, got ", t);
}

inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              like.device());
}

inline hif8::Rounding parse_rounding(const char* op, const std::string& rounding) {
  if (rounding == "ta") return hif8::Rounding::ta;
  if (rounding == "hybrid") return hif8::Rounding::hybrid;
  TORCH_CHECK(false, op, ": rounding must be \"ta\" or \"hybrid\", got \"", rounding, "\"");
}

inline void check_target(const char* op, double target) {
  TORCH_CHECK(target > 0 && target <= 32768, op, ": target must be in (0, 32768] (the scaled amax), got ", target);
}

// A per-tensor scale: fp32, one element, on x's device. Returns its pointer (null for None).
inline const float* scale_ptr(const char* op, const char* name, const OptTensor& scale, const Tensor& like) {
  if (!scale) return nullptr;
  check_device(op, name, *scale, like);
  TORCH_CHECK(scale->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", scale->scalar_type());
  TORCH_CHECK(scale->numel() == 1, op, ": ", name, " must hold one element (a per-tensor scale), got shape ",
              scale->sizes());
  return scale->data_ptr<float>();
}

// One device word for the amax reduction of the CUDA kernels.
inline Tensor scratch_word(const Tensor& like) { return at::zeros({1}, like.options().dtype(at::kInt)); }

// ---- HiF8 --------------------------------------------------------------------------------------------------

// The fused pass over x (contiguous) with the outputs p names; returns nothing, fills p's pointers.
template <typename Kernels>
void run_hif8(Hif8Params& p, const Tensor& x) {
  const Tensor scratch = scratch_word(x);
  p.x = x.data_ptr();
  p.dtype = to_dtype(x.scalar_type());
  p.n = x.numel();
  p.scratch = reinterpret_cast<uint32_t*>(scratch.data_ptr<int>());
  if (p.n > 0) Kernels::hif8(p);
}

template <typename Kernels>
Tensor hif8_encode(const Tensor& x, const OptTensor& scale, bool saturate, const std::string& rounding) {
  constexpr const char* op = "hif8_encode";
  const typename Kernels::Guard guard(x.device());
  check_float(op, "x", x.scalar_type());
  Hif8Params p;
  p.scale_in = scale_ptr(op, "scale", scale, x);
  p.saturate = saturate;
  p.rounding = parse_rounding(op, rounding);
  const Tensor xc = x.contiguous();
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  p.codes = codes.data_ptr<uint8_t>();
  run_hif8<Kernels>(p, xc);
  return codes;
}

template <typename Kernels>
Tensor hif8_decode(const Tensor& codes, const OptTensor& scale, at::ScalarType dtype) {
  constexpr const char* op = "hif8_decode";
  const typename Kernels::Guard guard(codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  check_float(op, "dtype", dtype);
  const Tensor cc = codes.contiguous();
  Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  Hif8DecodeParams p;
  p.codes = cc.data_ptr<uint8_t>();
  p.n = codes.numel();
  p.scale = scale_ptr(op, "scale", scale, codes);
  p.out = out.data_ptr();
  p.dtype = to_dtype(dtype);
  if (p.n > 0) Kernels::hif8_decode(p);
  return out;
}

template <typename Kernels>
std::tuple<Tensor, Tensor> hif8_quantize(const Tensor& x, double target, bool saturate, const std::string& rounding) {
  constexpr const char* op = "hif8_quantize";
  const typename Kernels::Guard guard(x.device());
  check_float(op, "x", x.scalar_type());
  check_target(op, target);
  Hif8Params p;
  p.target = float(target);
  p.saturate = saturate;
  p.rounding = parse_rounding(op, rounding);
  const Tensor xc = x.contiguous();
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  Tensor scale = at::empty({}, x.options().dtype(at::kFloat));
  p.codes = codes.data_ptr<uint8_t>();
  p.scale_out = scale.data_ptr<float>();
  if (x.numel() == 0) scale.fill_(1.0);
  run_hif8<Kernels>(p, xc);
  return {codes, scale};
}

template <typename Kernels>
Tensor hif8_fake_quantize(const Tensor& x, double target, const std::string& rounding, at::ScalarType dtype) {
  constexpr const char* op = "hif8_fake_quantize";
  const typename Kernels::Guard guard(x.device());
  check_float(op, "x", x.scalar_type());
  check_float(op, "dtype", dtype);
  check_target(op, target);
  Hif8Params p;
  p.target = float(target);
  p.rounding = parse_rounding(op, rounding);
  const Tensor xc = x.contiguous();
  Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  p.qdq = out.data_ptr();
  p.qdq_dtype = to_dtype(dtype);
  run_hif8<Kernels>(p, xc);
  return out;
}

template <typename Kernels>
std::tuple<Tensor, Tensor> hif8_quantize_e4m3(const Tensor& x, double target, const std::string& rounding) {
  constexpr const char* op = "hif8_quantize_e4m3";
  const typename Kernels::Guard guard(x.device());
  check_float(op, "x", x.scalar_type());
  check_target(op, target);
  Hif8Params p;
  p.target = float(target);
  p.rounding = parse_rounding(op, rounding);
  p.shift = hif8::e4m3_shift_for_target(p.target);
  const Tensor xc = x.contiguous();
  Tensor e4m3 = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  Tensor scale_inv = at::empty({}, x.options().dtype(at::kFloat));
  p.e4m3 = static_cast<uint8_t*>(e4m3.data_ptr());
  p.e4m3_scale_inv = scale_inv.data_ptr<float>();
  if (x.numel() == 0) scale_inv.fill_(1.0 / double(1 << p.shift));
  run_hif8<Kernels>(p, xc);
  return {e4m3, scale_inv};
}

// [N, K] weight operand of a linear: N and K multiples of 16 (the tensor-core tiles and NVFP4 blocks).
inline void check_weight_shape(const char* op, const char* name, int64_t n, int64_t k) {
  TORCH_CHECK(n % 16 == 0 && k % 16 == 0, op, ": ", name, " must have N and K multiples of 16, got N = ", n,
              ", K = ", k);
}

inline std::vector<int64_t> out_shape(const Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  return shape;
}

inline void check_bias(const char* op, const OptTensor& bias, const Tensor& x, int64_t n) {
  if (!bias) return;
  check_device(op, "bias", *bias, x);
  check_float(op, "bias", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N] = [", n, "], got ", bias->sizes());
}

template <typename Kernels>
Tensor hif8_linear(const Tensor& x, const Tensor& w_codes, const Tensor& w_scale, const OptTensor& bias,
                   const OptTensor& x_scale, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "hif8_linear";
  const typename Kernels::Guard guard(x.device());
  TORCH_CHECK(w_codes.scalar_type() == at::kByte, op, ": w_codes must be uint8 HiF8 codes, got ",
              w_codes.scalar_type());
  TORCH_CHECK(w_codes.dim() == 2, op, ": w_codes must be [N, K], got shape ", w_codes.sizes());
  check_device(op, "w_codes", w_codes, x);
  const int64_t n = w_codes.size(0), k = w_codes.size(1);
  check_weight_shape(op, "w_codes", n, k);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x must be [..., K] with K = ", k, ", got shape ", x.sizes());
  scale_ptr(op, "w_scale", w_scale, x);
  const bool codes_in = x.scalar_type() == at::kByte;
  if (codes_in) {
    TORCH_CHECK(x_scale.has_value(), op, ": x holds uint8 HiF8 codes, so x_scale (its per-tensor scale) is required");
    scale_ptr(op, "x_scale", x_scale, x);
  } else {
    check_float(op, "x", x.scalar_type());
    TORCH_CHECK(!x_scale, op, ": x_scale is only for x given as uint8 codes (float x is quantized on the fly)");
  }
  check_bias(op, bias, x, n);
  const at::ScalarType dtype = out_dtype.value_or(codes_in ? at::kBFloat16 : x.scalar_type());
  check_float(op, "out_dtype", dtype);
  const Tensor x2d = x.reshape({-1, k}).contiguous();
  if (x2d.size(0) == 0) return at::empty(out_shape(x, n), x.options().dtype(dtype));
  return Kernels::hif8_linear(x2d, w_codes.contiguous(), w_scale, x_scale, bias, dtype).view(out_shape(x, n));
}

// ---- NVFP4 -------------------------------------------------------------------------------------------------

template <typename Kernels>
std::tuple<Tensor, Tensor> nvfp4_quantize(const Tensor& x, const OptTensor& per_tensor_scale, bool block_2d,
                                          bool stochastic, int64_t seed, int64_t offset) {
  constexpr const char* op = "nvfp4_quantize";
  const typename Kernels::Guard guard(x.device());
  check_float(op, "x", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % nvfp4::kBlock == 0, op,
              ": the last dim of x must be a multiple of 16 (the NVFP4 block), got shape ", x.sizes());
  TORCH_CHECK(seed >= 0 && offset >= 0, op, ": seed and offset must be >= 0, got ", seed, " and ", offset);
  const int64_t k = x.size(-1);
  std::vector<int64_t> scale_shape(x.sizes().begin(), x.sizes().end()), packed_shape = scale_shape;
  scale_shape.back() = k / nvfp4::kBlock;
  packed_shape.back() = k / 2;
  Tensor scales = at::empty(scale_shape, x.options().dtype(at::kFloat8_e4m3fn));
  Tensor packed = at::empty(packed_shape, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {scales, packed};
  Tensor x2d = x.reshape({-1, k});
  if (x2d.stride(1) != 1) x2d = x2d.contiguous();
  Nvfp4QuantizeParams p;
  p.x = x2d.data_ptr();
  p.dtype = to_dtype(x.scalar_type());
  p.rows = x2d.size(0);
  p.cols = k;
  p.x_row_stride = x2d.stride(0);
  p.pts = scale_ptr(op, "per_tensor_scale", per_tensor_scale, x);
  p.block_2d = block_2d;
  p.stochastic = stochastic;
  p.seed = uint64_t(seed);
  p.offset = uint64_t(offset);
  p.scales = static_cast<uint8_t*>(scales.data_ptr());
  p.packed = packed.data_ptr<uint8_t>();
  Kernels::nvfp4_quantize(p);
  return {scales, packed};
}

// block_scales [..., K/16] float8_e4m3fn and packed [..., K/2] uint8 with the same leading dims.
inline void check_nvfp4_pair(const char* op, const char* scales_name, const Tensor& scales, const char* packed_name,
                             const Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": ", packed_name, " must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat8_e4m3fn, op, ": ", scales_name, " must be float8_e4m3fn, got ",
              scales.scalar_type());
  check_device(op, scales_name, scales, packed);
  TORCH_CHECK(packed.dim() >= 1 && packed.size(-1) % 8 == 0, op, ": the last dim of ", packed_name,
              " must be K/2 with K a multiple of 16, got shape ", packed.sizes());
  std::vector<int64_t> expected(packed.sizes().begin(), packed.sizes().end());
  expected.back() = packed.size(-1) / 8;
  TORCH_CHECK(scales.sizes() == at::IntArrayRef(expected), op, ": ", scales_name, " must be ",
              at::IntArrayRef(expected), " (one scale per 16 elements) for ", packed_name, " of shape ",
              packed.sizes(), ", got ", scales.sizes());
}

template <typename Kernels>
Tensor nvfp4_dequantize(const Tensor& block_scales, const Tensor& packed, const OptTensor& per_tensor_scale,
                        at::ScalarType dtype) {
  constexpr const char* op = "nvfp4_dequantize";
  const typename Kernels::Guard guard(packed.device());
  check_nvfp4_pair(op, "block_scales", block_scales, "packed", packed);
  check_float(op, "dtype", dtype);
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
  shape.back() *= 2;
  Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const Tensor sc = block_scales.contiguous(), pc = packed.contiguous();
  Nvfp4DequantizeParams p;
  p.scales = static_cast<const uint8_t*>(sc.data_ptr());
  p.packed = pc.data_ptr<uint8_t>();
  p.pts = scale_ptr(op, "per_tensor_scale", per_tensor_scale, packed);
  p.cols = shape.back();
  p.rows = out.numel() / p.cols;
  p.out = out.data_ptr();
  p.dtype = to_dtype(dtype);
  Kernels::nvfp4_dequantize(p);
  return out;
}

template <typename Kernels>
Tensor nvfp4_linear(const Tensor& x, const Tensor& w_block_scales, const Tensor& w_packed,
                    const OptTensor& w_per_tensor_scale, const OptTensor& bias) {
  constexpr const char* op = "nvfp4_linear";
  const typename Kernels::Guard guard(x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16 (W4A16), got ", x.scalar_type());
  check_device(op, "w_packed", w_packed, x);
  check_nvfp4_pair(op, "w_block_scales", w_block_scales, "w_packed", w_packed);
  TORCH_CHECK(w_packed.dim() == 2, op, ": w_packed must be [N, K/2], got shape ", w_packed.sizes());
  const int64_t n = w_packed.size(0), k = w_packed.size(1) * 2;
  check_weight_shape(op, "the weight", n, k);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x must be [..., K] with K = ", k, ", got shape ", x.sizes());
  scale_ptr(op, "w_per_tensor_scale", w_per_tensor_scale, x);
  check_bias(op, bias, x, n);
  Tensor x2d = x.reshape({-1, k});
  if (x2d.size(0) == 0) return at::empty(out_shape(x, n), x.options());
  if (x2d.stride(1) != 1) x2d = x2d.contiguous();
  return Kernels::nvfp4_linear(x2d, w_block_scales.contiguous(), w_packed.contiguous(), w_per_tensor_scale, bias)
      .view(out_shape(x, n));
}

#define DIFFORGE_REGISTER_FORMATS_OPS(m, Kernels)                                                 \
  m.impl("hif8_encode", &::difforge::formats::binding::hif8_encode<Kernels>);                     \
  m.impl("hif8_decode", &::difforge::formats::binding::hif8_decode<Kernels>);                     \
  m.impl("hif8_quantize", &::difforge::formats::binding::hif8_quantize<Kernels>);                 \
  m.impl("hif8_fake_quantize", &::difforge::formats::binding::hif8_fake_quantize<Kernels>);       \
  m.impl("hif8_quantize_e4m3", &::difforge::formats::binding::hif8_quantize_e4m3<Kernels>);       \
  m.impl("hif8_linear", &::difforge::formats::binding::hif8_linear<Kernels>);                     \
  m.impl("nvfp4_quantize", &::difforge::formats::binding::nvfp4_quantize<Kernels>);               \
  m.impl("nvfp4_dequantize", &::difforge::formats::binding::nvfp4_dequantize<Kernels>);           \
  m.impl("nvfp4_linear", &::difforge::formats::binding::nvfp4_linear<Kernels>)

}  // namespace difforge::formats::binding
