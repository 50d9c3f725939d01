// Argument checks, output allocation and entry points of the kvcache ops, shared by the CPU (kvcache.cpp) and
// CUDA (kvcache_cuda.cpp) registrations. A Kernels type supplies quantize(QuantizeParams) -> bool (false: a
// non-finite grid), dequantize(DequantizeParams), attention(QuantizedAttentionParams) and a device Guard.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/logical_and.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "difforge/kvcache.h"
#include "dtype.h"

namespace difforge::kvcache::binding {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using difforge::binding::is_float_type;
using difforge::binding::to_dtype;

inline attention::Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

inline void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK(supported_bits(bits), op, ": bits must be 2, 4 or 8, got ", bits);
}

inline Axis parse_axis(const char* op, const std::string& axis) {
  if (axis == "token") return Axis::token;
  if (axis == "channel") return Axis::channel;
  TORCH_CHECK(false, op, ": axis must be \"token\" or \"channel\", got \"", axis, "\"");
}

inline Jensen parse_jensen(const char* op, const std::string& mode) {
  if (mode == "none") return Jensen::none;
  if (mode == "taylor2") return Jensen::taylor2;
  if (mode == "taylor4") return Jensen::taylor4;
  if (mode == "exact") return Jensen::exact;
  TORCH_CHECK(false, op, ": jensen must be \"none\", \"taylor2\", \"taylor4\" or \"exact\", got \"", mode, "\"");
}

// A [B, L, H, X] tensor with stride 1 in its last dim.
inline void check_rows(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              like.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [B, L, H, ...], got shape ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have stride 1 in its last dim, got strides ", t.strides());
}

inline QuantLayout layout_of(at::ScalarType meta_dtype, int64_t B, int64_t L, int64_t H, int64_t D, int64_t bits,
                             int64_t group_size, Axis axis) {
  QuantLayout l;
  l.meta_dtype = to_dtype(meta_dtype);
  l.batch = B;
  l.len = L;
  l.heads = H;
  l.head_dim = D;
  l.bits = static_cast<int>(bits);
  l.group_size = static_cast<int>(group_size);
  l.axis = axis;
  return l;
}

inline void check_group_size(const char* op, int64_t group_size, int64_t D, Axis axis) {
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  TORCH_CHECK(axis == Axis::channel || D % group_size == 0, op, ": group_size = ", group_size,
              " must divide the head dim D = ", D);
}

// Steps must be finite and >= 0 (0: a constant group): one fused pass and, on CUDA, one device sync.
inline void check_steps(const char* op, const char* name, const Tensor& step) {
  if (step.numel() == 0 || at::logical_and(at::isfinite(step), at::ge(step, 0)).all().item<bool>()) return;
  TORCH_CHECK(at::isfinite(step).all().item<bool>(), op, ": ", name, " has non-finite entries");
  TORCH_CHECK(false, op, ": ", name, " has negative entries (a step is the grid spacing >= 0)");
}

template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor> kv_quantize(const Tensor& x, int64_t bits, int64_t group_size,
                                               const std::string& axis_name, at::ScalarType meta_dtype) {
  constexpr const char* op = "kv_quantize";
  const typename Kernels::Guard guard(x.device());
  check_bits(op, bits);
  const Axis axis = parse_axis(op, axis_name);
  check_rows(op, "x", x, x);
  TORCH_CHECK(is_float_type(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(is_float_type(meta_dtype), op, ": meta_dtype must be float16, bfloat16 or float32, got ", meta_dtype);
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  check_group_size(op, group_size, D, axis);
  TORCH_CHECK(D * bits % 8 == 0, op, ": D * bits must be a multiple of 8 (whole bytes per token), got D = ", D,
              ", bits = ", bits);

  QuantizeParams p;
  static_cast<QuantLayout&>(p) = layout_of(meta_dtype, B, L, H, D, bits, group_size, axis);
  p.dtype = to_dtype(x.scalar_type());
  Tensor codes = at::empty({B, L, H, packed_bytes(D, p.bits)}, x.options().dtype(at::kByte));
  Tensor step = at::empty({B, p.meta_len(), H, p.meta_width()}, x.options().dtype(meta_dtype));
  Tensor zero = at::empty_like(step);
  p.x = x.data_ptr();
  p.x_strides = strides_of(x);
  p.codes = codes.data_ptr<uint8_t>();
  p.step = step.data_ptr();
  p.zero = zero.data_ptr();
  if (x.numel() > 0) {
    TORCH_CHECK(Kernels::quantize(p), op, ": x has non-finite values, or a group's range overflows meta_dtype ",
                meta_dtype);
  }
  return {codes, step, zero};
}

template <typename Kernels>
Tensor kv_dequantize(const Tensor& codes, const Tensor& step, const Tensor& zero, int64_t bits, int64_t group_size,
                     const std::string& axis_name, at::ScalarType dtype) {
  constexpr const char* op = "kv_dequantize";
  const typename Kernels::Guard guard(codes.device());
  check_bits(op, bits);
  const Axis axis = parse_axis(op, axis_name);
  check_rows(op, "codes", codes, codes);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(is_float_type(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = codes.size(0), L = codes.size(1), H = codes.size(2), D = codes.size(3) * 8 / bits;
  check_group_size(op, group_size, D, axis);
  const QuantLayout layout = layout_of(at::kHalf, B, L, H, D, bits, group_size, axis);
  const std::vector<int64_t> meta_shape{B, layout.meta_len(), H, layout.meta_width()};
  for (const auto& [name, t] : {std::pair{"step", &step}, std::pair{"zero", &zero}}) {
    TORCH_CHECK(t->device() == codes.device(), op, ": ", name, " is on ", t->device(), " but codes is on ",
                codes.device());
    TORCH_CHECK(is_float_type(t->scalar_type()), op, ": ", name, " must be float16, bfloat16 or float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->sizes() == at::IntArrayRef(meta_shape), op, ": ", name, " must be ", at::IntArrayRef(meta_shape),
                " for codes of shape ", codes.sizes(), " (bits = ", bits, ", group_size = ", group_size,
                ", axis = ", axis_name, "), got ", t->sizes());
  }
  TORCH_CHECK(step.scalar_type() == zero.scalar_type(), op, ": step and zero must share one dtype, got ",
              step.scalar_type(), " and ", zero.scalar_type());
  check_steps(op, "step", step);

  const Tensor codes_c = codes.contiguous(), step_c = step.contiguous(), zero_c = zero.contiguous();
  Tensor out = at::empty({B, L, H, D}, codes.options().dtype(dtype));
  DequantizeParams p;
  static_cast<QuantLayout&>(p) = layout_of(step.scalar_type(), B, L, H, D, bits, group_size, axis);
  p.dtype = to_dtype(dtype);
  p.codes = codes_c.data_ptr<uint8_t>();
  p.step = step_c.data_ptr();
  p.zero = zero_c.data_ptr();
  p.out = out.data_ptr();
  if (out.numel() > 0) Kernels::dequantize(p);
  return out;
}

// The cached K or V of quantized_kv_attention: codes [B, Lc, Hkv, D*bits/8], step / zero [B, Lc, Hkv, D/g].
inline QuantizedSegment check_cache(const char* op, const char* which, const Tensor& codes, const Tensor& step,
                                    const Tensor& zero, const Tensor& q, int64_t Hkv, int64_t bits,
                                    int64_t group_size, at::ScalarType meta_dtype) {
  const std::string c = std::string(which) + "_codes", s = std::string(which) + "_step",
                    z = std::string(which) + "_zero";
  check_rows(op, c.c_str(), codes, q);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": ", c, " must be uint8, got ", codes.scalar_type());
  const int64_t B = q.size(0), D = q.size(3), Lc = codes.size(1);
  const std::vector<int64_t> code_shape{B, Lc, Hkv, packed_bytes(D, static_cast<int>(bits))};
  TORCH_CHECK(codes.sizes() == at::IntArrayRef(code_shape), op, ": ", c, " must be [B, Lc, Hkv, D * bits / 8] = ",
              at::IntArrayRef(code_shape), " for q of shape ", q.sizes(), " and bits = ", bits, ", got ",
              codes.sizes());
  const std::vector<int64_t> meta_shape{B, Lc, Hkv, D / group_size};
  for (const auto& [name, t] : {std::pair{&s, &step}, std::pair{&z, &zero}}) {
    check_rows(op, name->c_str(), *t, q);
    TORCH_CHECK(t->sizes() == at::IntArrayRef(meta_shape), op, ": ", *name, " must be [B, Lc, Hkv, D / group_size] = ",
                at::IntArrayRef(meta_shape), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == meta_dtype, op, ": ", *name, " has dtype ", t->scalar_type(),
                " but k_step has ", meta_dtype, "; every step and zero must share one float dtype");
  }
  check_steps(op, s.c_str(), step);
  QuantizedSegment seg;
  seg.codes = codes.data_ptr<uint8_t>();
  seg.step = step.data_ptr();
  seg.zero = zero.data_ptr();
  seg.codes_strides = strides_of(codes);
  seg.step_strides = strides_of(step);
  seg.zero_strides = strides_of(zero);
  return seg;
}

inline DenseSegment check_dense(const char* op, const char* name, const Tensor& t, const Tensor& q, int64_t Hkv,
                                int64_t len) {
  check_rows(op, name, t, q);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == len && t.size(2) == Hkv && t.size(3) == q.size(3), op, ": ", name,
              " must be [B, L, Hkv, D] = [", q.size(0), ", ", len, ", ", Hkv, ", ", q.size(3), "], got ", t.sizes());
  return {t.data_ptr(), strides_of(t)};
}

template <typename Kernels>
Tensor quantized_kv_attention(const Tensor& q, const Tensor& k_cur, const Tensor& v_cur, const Tensor& k_codes,
                              const Tensor& k_step, const Tensor& k_zero, const Tensor& v_codes, const Tensor& v_step,
                              const Tensor& v_zero, int64_t bits, int64_t group_size, const OptTensor& k_sink,
                              const OptTensor& v_sink, std::optional<double> scale, const std::string& jensen,
                              double jensen_lambda) {
  constexpr const char* op = "quantized_kv_attention";
  const typename Kernels::Guard guard(q.device());
  check_bits(op, bits);
  QuantizedAttentionParams p;
  p.jensen = parse_jensen(op, jensen);
  check_rows(op, "q", q, q);
  TORCH_CHECK(is_float_type(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= attention::kMaxHeadDim, op, ": head dim D = ", D, " is not supported (1 <= D <= ",
              attention::kMaxHeadDim, ")");
  check_group_size(op, group_size, D, Axis::token);
  TORCH_CHECK(D * bits % 8 == 0, op, ": D * bits must be a multiple of 8, got D = ", D, ", bits = ", bits);
  check_rows(op, "k_cur", k_cur, q);
  const int64_t Hkv = k_cur.size(2);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": the query heads Hq = ", Hq,
              " must be a positive multiple of the kv heads Hkv = ", Hkv, " (k_cur's dim 2)");
  TORCH_CHECK(k_sink.has_value() == v_sink.has_value(), op, ": give both k_sink and v_sink, or neither");
  TORCH_CHECK(is_float_type(k_step.scalar_type()), op, ": k_step must be float16, bfloat16 or float32, got ",
              k_step.scalar_type());

  p.dtype = to_dtype(q.scalar_type());
  p.meta_dtype = to_dtype(k_step.scalar_type());
  p.batch = B;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.head_dim = D;
  p.q_len = Lq;
  p.bits = static_cast<int>(bits);
  p.group_size = static_cast<int>(group_size);
  p.q = q.data_ptr();
  p.q_strides = strides_of(q);
  p.cur_len = k_cur.size(1);
  p.k_cur = check_dense(op, "k_cur", k_cur, q, Hkv, p.cur_len);
  p.v_cur = check_dense(op, "v_cur", v_cur, q, Hkv, p.cur_len);
  p.cache_len = k_codes.size(1);
  p.k_cache = check_cache(op, "k", k_codes, k_step, k_zero, q, Hkv, bits, group_size, k_step.scalar_type());
  TORCH_CHECK(v_codes.dim() == 4 && v_codes.size(1) == p.cache_len, op, ": v_codes must hold the same ", p.cache_len,
              " cached tokens as k_codes, got shape ", v_codes.sizes());
  p.v_cache = check_cache(op, "v", v_codes, v_step, v_zero, q, Hkv, bits, group_size, k_step.scalar_type());
  if (k_sink.has_value()) {
    p.sink_len = k_sink->dim() == 4 ? k_sink->size(1) : 0;
    p.k_sink = check_dense(op, "k_sink", *k_sink, q, Hkv, p.sink_len);
    p.v_sink = check_dense(op, "v_sink", *v_sink, q, Hkv, p.sink_len);
  }
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  TORCH_CHECK(std::isfinite(p.scale), op, ": scale must be finite, got ", scale.value_or(0.0));
  p.lambda = static_cast<float>(jensen_lambda);
  TORCH_CHECK(std::isfinite(p.lambda), op, ": jensen_lambda must be finite, got ", jensen_lambda);

  Tensor out = at::empty({B, Lq, Hq, D}, q.options());
  p.out = out.data_ptr();
  if (out.numel() > 0) Kernels::attention(p);
  return out;
}

// Registers every kvcache op for one dispatch key with one Kernels backend.
#define DIFFORGE_REGISTER_KVCACHE_OPS(m, Kernels)                                                 \
  m.impl("kv_quantize", &::difforge::kvcache::binding::kv_quantize<Kernels>);                     \
  m.impl("kv_dequantize", &::difforge::kvcache::binding::kv_dequantize<Kernels>);                 \
  m.impl("quantized_kv_attention", &::difforge::kvcache::binding::quantized_kv_attention<Kernels>)

}  // namespace difforge::kvcache::binding
