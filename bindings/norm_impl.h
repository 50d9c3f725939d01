// Argument checks and output allocation of the norm ops, shared by the CPU (norm.cpp) and CUDA
// (norm_cuda.cpp) registrations. A Kernels type supplies forward(params) and backward(params).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "dtype.h"
#include "difforge/adaln_norm.h"

namespace difforge::norm::binding {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using difforge::binding::to_dtype;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Validated, canonical arguments: row tensors contiguous, modulation/affine tensors in the
// accumulation dtype with last stride 1 (a chunk view of Wan's [B, 6, D] table is read in place).
struct NormArgs {
  Tensor x, o;
  std::array<Tensor, kNumModGrads> mods;           // indexed by ModGrad: scale, shift, gate (undefined: absent)
  std::array<std::vector<int64_t>, kNumModGrads> mod_shapes;
  std::array<at::ScalarType, kNumModGrads> mod_dtypes{};
  Tensor weight, bias, cu_seqlens;
  at::ScalarType weight_dtype = at::kFloat, bias_dtype = at::kFloat;  // gradients come back in these
  at::ScalarType acc = at::kFloat;
  ModLayout layout;
  int64_t dim = 0;
  NormKind norm = NormKind::layer;

  template <typename acc_t>
  ModTensorT<acc_t> mod(int q) const {
    ModTensorT<acc_t> t;
    if (!mods[q].defined()) return t;
    t.data = mods[q].data_ptr<acc_t>();
    t.batch_stride = mods[q].dim() >= 2 ? mods[q].stride(0) : 0;
    t.group_stride = mods[q].dim() == 3 ? mods[q].stride(1) : 0;
    return t;
  }
  template <typename acc_t>
  const acc_t* ptr(const Tensor& t) const { return t.defined() ? t.data_ptr<acc_t>() : nullptr; }
};

inline NormKind parse_norm(const std::string& norm) {
  TORCH_CHECK(norm == "layernorm" || norm == "rmsnorm", "difforge norm: norm must be \"layernorm\" or \"rmsnorm\", got \"",
              norm, "\"");
  return norm == "layernorm" ? NormKind::layer : NormKind::rms;
}

inline void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// Validates everything but dy/mean/rstd and returns the canonical form. o defined: gated.
inline NormArgs prepare(const char* op, const Tensor& x, const OptTensor& o, const OptTensor& gate,
                        const OptTensor& scale, const OptTensor& shift, const OptTensor& weight,
                        const OptTensor& bias, const std::string& norm, int64_t batch_repeat,
                        const OptTensor& cu_seqlens, int64_t max_seqlen) {
  NormArgs a;
  a.norm = parse_norm(norm);
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16 (float64 on CPU), got ",
              x.scalar_type());
  TORCH_CHECK(x.scalar_type() != at::kDouble || x.device().is_cpu(), op, ": float64 x is supported on CPU only");
  a.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool varlen = cu_seqlens.has_value();
  if (varlen) {
    TORCH_CHECK(x.dim() == 2, op, ": with cu_seqlens, x must be packed [N, D], got shape ", x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 3, op, ": x must be [B, L, D] (or packed [N, D] with cu_seqlens), got shape ", x.sizes());
  }
  a.dim = x.size(-1);
  TORCH_CHECK(a.dim > 0, op, ": x has D = 0 features; D must be >= 1");
  TORCH_CHECK(batch_repeat >= 1, op, ": batch_repeat must be >= 1, got ", batch_repeat);
  a.x = x.contiguous();
  const int64_t rows = x.numel() / a.dim;

  if (o.has_value()) {
    TORCH_CHECK(o->sizes() == x.sizes(), op, ": o must have x's shape ", x.sizes(), ", got ", o->sizes());
    TORCH_CHECK(is_supported_float(o->scalar_type()), op, ": o must be a float tensor, got ", o->scalar_type());
    TORCH_CHECK((o->scalar_type() == at::kDouble) == (x.scalar_type() == at::kDouble), op,
                ": o and x must both be float64 or neither, got o ", o->scalar_type(), " and x ", x.scalar_type());
    check_same_device(op, "o", *o, x);
    a.o = o->contiguous();
  }

  // Modulation tensors: [D] global, [B, D] / [B, 1, D] per-sample, [B, G, D] per-group; one layout for all.
  const std::array<const OptTensor*, kNumModGrads> mods = {&scale, &shift, &gate};
  const char* names[kNumModGrads] = {"scale", "shift", "gate"};
  int64_t mod_batch = -1, groups = -1;
  const char* first = nullptr;
  for (int q = 0; q < kNumModGrads; ++q) {
    if (!mods[q]->has_value()) continue;
    const Tensor& t = **mods[q];
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", names[q], " must be a float tensor, got ",
                t.scalar_type());
    check_same_device(op, names[q], t, x);
    TORCH_CHECK(t.dim() >= 1 && t.dim() <= 3 && t.size(-1) == a.dim, op, ": ", names[q],
                " must be [D], [B, D] or [B, G, D] with D = ", a.dim, ", got shape ", t.sizes());
    const int64_t tb = t.dim() == 1 ? 0 : t.size(0);  // 0: global
    const int64_t tg = t.dim() == 3 ? t.size(1) : 1;
    if (first == nullptr) {
      first = names[q];
      mod_batch = tb;
      groups = tg;
    } else {
      TORCH_CHECK(tb == mod_batch && tg == groups, op, ": ", names[q], " has shape ", t.sizes(),
                  " but ", first, " has a different modulation layout; scale, shift and gate must share one layout");
    }
    a.mod_shapes[q] = t.sizes().vec();
    a.mod_dtypes[q] = t.scalar_type();
    Tensor c = t.to(a.acc);
    if (c.stride(-1) != 1) c = c.contiguous();
    if (c.dim() == 3 && c.size(1) == 1) c = c.select(1, 0);  // [B, 1, D] is per-sample
    a.mods[q] = c;
  }

  // Row -> modulation row map.
  ModLayout& l = a.layout;
  l.rows = rows;
  if (varlen) {
    const Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu.scalar_type());
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, op, ": cu_seqlens must be 1-D [B + 1] with B >= 1, got shape ",
                cu.sizes());
    check_same_device(op, "cu_seqlens", cu, x);
    TORCH_CHECK(batch_repeat == 1, op, ": batch_repeat is not supported with cu_seqlens");
    a.cu_seqlens = cu.contiguous();
    // Validated on the host: bad offsets would index out of bounds in the kernels.
    const Tensor host = a.cu_seqlens.cpu();
    const int32_t* c = host.data_ptr<int32_t>();
    const int64_t B = cu.numel() - 1;
    TORCH_CHECK(c[0] == 0, op, ": cu_seqlens[0] must be 0, got ", c[0]);
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(c[b + 1] >= c[b], op, ": cu_seqlens must be non-decreasing, but cu_seqlens[", b + 1, "] = ", c[b + 1],
                  " < cu_seqlens[", b, "] = ", c[b]);
      longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
    }
    TORCH_CHECK(c[B] == rows, op, ": cu_seqlens[-1] = ", c[B], " must equal the number of packed rows N = ", rows);
    TORCH_CHECK(max_seqlen <= 0 || max_seqlen >= longest, op, ": max_seqlen = ", max_seqlen,
                " is shorter than the longest sequence (", longest, ")");
    TORCH_CHECK(mod_batch <= 0 || (mod_batch == B && groups == 1), op,
                ": with cu_seqlens the modulation must be [D] or [B, D] with B = ", B, " sequences, got batch ",
                mod_batch, " and ", groups, " groups");
    if (mod_batch > 0) {
      l.cu_seqlens = a.cu_seqlens.data_ptr<int32_t>();
      l.num_seqs = B;
      l.max_seqlen = longest;
    } else {
      l.group_len = std::max<int64_t>(rows, 1);  // a global modulation: the packed rows are one segment
    }
  } else {
    const int64_t B = x.size(0), L = x.size(1);
    if (mod_batch <= 0) {  // absent or global: every row reads modulation row 0
      l.group_len = std::max<int64_t>(rows, 1);
    } else {
      TORCH_CHECK(B == mod_batch * batch_repeat, op, ": x has batch ", B, " but the modulation has batch ", mod_batch,
                  batch_repeat > 1 ? " times batch_repeat " + std::to_string(batch_repeat) : std::string(""),
                  "; expected x batch = modulation batch * batch_repeat");
      // L = 0 allows G = 0 (a per-token modulation of an empty sequence): there are no rows.
      TORCH_CHECK(L == 0 ? groups >= 0 : groups >= 1 && L % groups == 0, op, ": the modulation has G = ", groups,
                  " groups, which must divide the sequence length L = ", L);
      l.groups = groups;
      l.group_len = std::max<int64_t>(L / groups, 1);
      l.mod_batch = mod_batch;
    }
  }

  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == a.dim, op, ": weight must be [D] with D = ", a.dim,
                ", got shape ", weight->sizes());
    TORCH_CHECK(is_supported_float(weight->scalar_type()), op, ": weight must be a float tensor");
    check_same_device(op, "weight", *weight, x);
    a.weight = weight->to(a.acc).contiguous();
    a.weight_dtype = weight->scalar_type();
  }
  if (bias.has_value()) {
    TORCH_CHECK(a.norm == NormKind::layer, op, ": bias is only defined for norm=\"layernorm\" (rmsnorm has no bias)");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.dim, op, ": bias must be [D] with D = ", a.dim, ", got shape ",
                bias->sizes());
    TORCH_CHECK(is_supported_float(bias->scalar_type()), op, ": bias must be a float tensor");
    check_same_device(op, "bias", *bias, x);
    a.bias = bias->to(a.acc).contiguous();
    a.bias_dtype = bias->scalar_type();
  }
  return a;
}

inline Tensor empty_rows(const NormArgs& a, int64_t n) { return at::empty({n}, a.x.options().dtype(a.acc)); }

template <typename acc_t>
void fill_common(const NormArgs& a, ForwardParamsT<acc_t>& p) {
  p.scale = a.mod<acc_t>(kGradScale);
  p.shift = a.mod<acc_t>(kGradShift);
  p.gate = a.mod<acc_t>(kGradGate);
  p.weight = a.ptr<acc_t>(a.weight);
  p.bias = a.ptr<acc_t>(a.bias);
  p.layout = a.layout;
  p.dim = a.dim;
  p.norm = a.norm;
  p.x_dtype = to_dtype(a.x.scalar_type());
  p.o_dtype = a.o.defined() ? to_dtype(a.o.scalar_type()) : p.x_dtype;
}

// Returns (x_out (gated only), y, mean, rstd).
template <typename Kernels, typename acc_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_typed(const NormArgs& a, double eps) {
  ForwardParamsT<acc_t> p;
  fill_common(a, p);
  p.eps = static_cast<acc_t>(eps);
  Tensor y = at::empty_like(a.x);
  Tensor x_out = a.o.defined() ? at::empty_like(a.x) : Tensor();
  Tensor mean = empty_rows(a, a.norm == NormKind::layer ? a.layout.rows : 0);
  Tensor rstd = empty_rows(a, a.layout.rows);
  p.h = a.x.data_ptr();
  p.o = a.o.defined() ? a.o.data_ptr() : nullptr;
  p.x_out = x_out.defined() ? x_out.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.mean = a.norm == NormKind::layer ? mean.data_ptr<acc_t>() : nullptr;
  p.rstd = rstd.data_ptr<acc_t>();
  Kernels::forward(p);
  return {x_out, y, mean, rstd};
}

template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const NormArgs& a, double eps) {
  TORCH_CHECK(eps >= 0, "difforge norm: eps must be >= 0, got ", eps);
  if (a.acc == at::kDouble) {
    if constexpr (Kernels::kHasDouble) return forward_typed<Kernels, double>(a, eps);
  }
  return forward_typed<Kernels, float>(a, eps);
}

inline Tensor check_row_grad(const char* op, const char* name, const Tensor& g, const Tensor& like) {
  TORCH_CHECK(g.sizes() == like.sizes() && g.scalar_type() == like.scalar_type(), op, ": ", name, " must be ",
              like.scalar_type(), " with shape ", like.sizes(), ", got ", g.scalar_type(), " ", g.sizes());
  check_same_device(op, name, g, like);
  return g.contiguous();
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename Kernels, typename acc_t>
BackwardResult backward_typed(const char* op, const NormArgs& a, const Tensor& dy_in, const OptTensor& dx_out_in,
                              const Tensor& mean, const Tensor& rstd) {
  const int64_t rows = a.layout.rows, D = a.dim;
  const Tensor dy = check_row_grad(op, "dy", dy_in, a.x);
  const Tensor dx_out = dx_out_in.has_value() ? check_row_grad(op, "dx_out", *dx_out_in, a.x) : Tensor();
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == a.acc, op, ": rstd must be [", rows,
              "] ", a.acc, ", got ", rstd.scalar_type(), " ", rstd.sizes());
  if (a.norm == NormKind::layer)
    TORCH_CHECK(mean.dim() == 1 && mean.size(0) == rows && mean.scalar_type() == a.acc, op, ": mean must be [", rows,
                "] ", a.acc, ", got ", mean.scalar_type(), " ", mean.sizes());

  BackwardParamsT<acc_t> p;
  {
    ForwardParamsT<acc_t> f;
    fill_common(a, f);
    p.scale = f.scale, p.shift = f.shift, p.gate = f.gate, p.weight = f.weight, p.bias = f.bias;
    p.layout = f.layout, p.dim = f.dim, p.norm = f.norm, p.x_dtype = f.x_dtype, p.o_dtype = f.o_dtype;
  }
  const ReductionPlan plan(a.layout);
  const auto acc_opts = a.x.options().dtype(a.acc);
  const int64_t mod_rows = a.layout.mod_rows();
  auto fresh = [&](int64_t n) { return rows == 0 ? at::zeros({n, D}, acc_opts) : at::empty({n, D}, acc_opts); };
  // One buffer per gradient, so the returned gradients never share storage.
  std::array<Tensor, kNumModGrads> mod_grads, mod_partials;
  for (int q = 0; q < kNumModGrads; ++q) {
    if (!a.mods[q].defined() || (q == kGradGate && !a.o.defined())) continue;
    mod_grads[q] = fresh(mod_rows);
    mod_partials[q] = plan.direct() || rows == 0 ? mod_grads[q] : at::empty({plan.num_slots(), D}, acc_opts);
    p.mod_grads[q] = mod_grads[q].data_ptr<acc_t>();
    p.mod_partials[q] = mod_partials[q].data_ptr<acc_t>();
  }
  std::array<Tensor, kNumAffineGrads> affine_grads, affine_partials;
  const std::array<const Tensor*, kNumAffineGrads> params = {&a.weight, &a.bias};
  for (int q = 0; q < kNumAffineGrads; ++q) {
    if (!params[q]->defined()) continue;
    affine_grads[q] = fresh(1);
    affine_partials[q] = at::empty({rows == 0 ? 0 : plan.num_blocks(), D}, acc_opts);
    p.affine_grads[q] = affine_grads[q].data_ptr<acc_t>();
    p.affine_partials[q] = affine_partials[q].data_ptr<acc_t>();
  }
  Tensor dx = at::empty_like(a.x);
  Tensor d_o = a.o.defined() ? at::empty_like(a.o) : at::empty({0}, a.x.options());
  p.dy = dy.data_ptr();
  p.dx_out = dx_out.defined() ? dx_out.data_ptr() : nullptr;
  p.x = a.x.data_ptr();
  p.o = a.o.defined() ? a.o.data_ptr() : nullptr;
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  p.mean = a.norm == NormKind::layer ? mean_c.data_ptr<acc_t>() : nullptr;
  p.rstd = rstd_c.data_ptr<acc_t>();
  p.dx = dx.data_ptr();
  p.d_o = a.o.defined() ? d_o.data_ptr() : nullptr;
  Kernels::backward(p);

  auto mod_grad = [&](int q) {
    if (!mod_grads[q].defined()) return at::empty({0}, a.x.options());
    return mod_grads[q].view(a.mod_shapes[q]).to(a.mod_dtypes[q]);
  };
  auto affine_grad = [&](int q, at::ScalarType dtype) {
    if (!affine_grads[q].defined()) return at::empty({0}, a.x.options());
    return affine_grads[q].view({D}).to(dtype);
  };
  return {dx, d_o, mod_grad(kGradGate), mod_grad(kGradScale), mod_grad(kGradShift),
          affine_grad(kGradWeight, a.weight_dtype), affine_grad(kGradBias, a.bias_dtype)};
}

template <typename Kernels>
BackwardResult backward(const char* op, const NormArgs& a, const Tensor& dy, const OptTensor& dx_out,
                        const Tensor& mean, const Tensor& rstd) {
  if (a.acc == at::kDouble) {
    if constexpr (Kernels::kHasDouble) return backward_typed<Kernels, double>(op, a, dy, dx_out, mean, rstd);
  }
  return backward_typed<Kernels, float>(op, a, dy, dx_out, mean, rstd);
}

}  // namespace difforge::norm::binding
