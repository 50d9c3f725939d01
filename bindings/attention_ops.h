// Argument checks, output allocation and entry points of the attention ops, shared by the CPU
// (attention.cpp) and CUDA (attention_cuda.cpp) registrations. A Kernels type supplies
// forward(ForwardParamsT<acc_t>) / backward(BackwardParamsT<acc_t>), a device Guard, kHasDouble, and
// kNeedsWorkspace (allocate the fp32 backward workspace of BackwardParamsT).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "dtype.h"
#include "difforge/attention.h"

namespace difforge::attention::binding {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using difforge::binding::to_dtype;

inline Strides strides_of(const Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Validated arguments; tensors keep their caller's strides (last one 1).
struct AttnArgs {
  Problem problem;
  Tensor q, k, v, cu_q, cu_k, seqused_k, bias_q, bias_k;
  at::ScalarType acc = at::kFloat;
  double scale = 1.0;
  bool varlen = false;
  int64_t total_k = 0;
};

inline void check_qkv_tensor(const char* op, const char* name, const Tensor& t, const Tensor& q, bool varlen) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", q.scalar_type(), "; q, k and v must share one dtype");
  TORCH_CHECK(t.dim() == (varlen ? 3 : 4), op, ": ", name, " must be ",
              varlen ? "packed [total, H, D] (cu_seqlens given)" : "[B, L, H, D]", ", got shape ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have stride 1 in its last (head) dim, got strides ", t.strides());
}

// Returns the host copy of a validated cu_seqlens and the longest sequence.
inline int64_t check_cu_seqlens(const char* op, const char* name, const Tensor& cu, const Tensor& q, int64_t total,
                                int64_t batch) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == q.device(), op, ": ", name, " is on ", cu.device(), " but q is on ", q.device());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, op, ": ", name, " must be 1-D [B + 1] with B >= 1, got shape ",
              cu.sizes());
  TORCH_CHECK(batch < 0 || cu.numel() == batch + 1, op, ": ", name, " has ", cu.numel(),
              " entries but cu_seqlens_q has ", batch + 1, "; both describe the same B sequences");
  // Validated on the host (a device sync on CUDA): bad offsets would index out of bounds in the kernels.
  const Tensor host = cu.cpu().contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  const int64_t B = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, but ", name, "[", b + 1, "] = ", c[b + 1],
                " < ", name, "[", b, "] = ", c[b]);
    longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
  }
  TORCH_CHECK(c[B] == total, op, ": ", name, "[-1] = ", c[B], " must equal the packed length ", total);
  return longest;
}

inline Tensor check_bias(const char* op, const char* name, const Tensor& t, const Tensor& like, at::ScalarType acc,
                         int64_t rank) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but q is on ", like.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == like.dim() && t.sizes().slice(0, like.dim() - 1) == like.sizes().slice(0, like.dim() - 1),
              op, ": ", name, " must be [", like.sizes().slice(0, like.dim() - 1), ", R], got shape ", t.sizes());
  TORCH_CHECK(t.size(-1) == rank, op, ": ", name, " has rank R = ", t.size(-1), " but logit_bias_q has R = ", rank,
              "; both bias features must have the same R");
  return t.to(acc).contiguous();
}

inline AttnArgs prepare(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, std::optional<double> scale,
                        bool causal, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                        int64_t max_seqlen_q, int64_t max_seqlen_k, const OptTensor& seqused_k,
                        const OptTensor& bias_q, const OptTensor& bias_k, bool has_double) {
  AttnArgs a;
  Problem& pr = a.problem;
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (dt == at::kDouble && has_double), op,
              ": q must be float32, float16 or bfloat16", has_double ? " (or float64)" : "", ", got ", dt);
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
              ": give both cu_seqlens_q and cu_seqlens_k, or neither");
  TORCH_CHECK(bias_q.has_value() == bias_k.has_value(), op, ": give both bias_q and bias_k, or neither");
  a.varlen = cu_seqlens_q.has_value();
  check_qkv_tensor(op, "q", q, q, a.varlen);
  check_qkv_tensor(op, "k", k, q, a.varlen);
  check_qkv_tensor(op, "v", v, q, a.varlen);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ", k.sizes(), " and v ",
              v.sizes());
  const int64_t D = q.size(-1);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, op, ": head dim D = ", D, " is not supported (1 <= D <= ", kMaxHeadDim,
              ")");
  TORCH_CHECK(k.size(-1) == D, op, ": k has head dim ", k.size(-1), " but q has ", D,
              "; q, k and v must share one head dim");
  const int64_t Hq = q.size(-2), Hkv = k.size(-2);
  TORCH_CHECK(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0, op, ": the number of query heads Hq = ", Hq,
              " must be a positive multiple of the number of kv heads Hkv = ", Hkv);
  a.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  a.q = q;
  a.k = k;
  a.v = v;

  pr.dtype = to_dtype(dt);
  pr.heads_q = Hq;
  pr.heads_kv = Hkv;
  pr.head_dim = D;
  pr.causal = causal;
  a.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK(std::isfinite(a.acc == at::kDouble ? a.scale : static_cast<float>(a.scale)), op,
              ": scale must be finite in the accumulation dtype, got ", a.scale);
  if (a.varlen) {
    pr.total_q = q.size(0);
    a.total_k = k.size(0);
    const int64_t longest_q = check_cu_seqlens(op, "cu_seqlens_q", *cu_seqlens_q, q, pr.total_q, -1);
    pr.batch = cu_seqlens_q->numel() - 1;
    const int64_t longest_k = check_cu_seqlens(op, "cu_seqlens_k", *cu_seqlens_k, q, a.total_k, pr.batch);
    TORCH_CHECK(max_seqlen_q <= 0 || max_seqlen_q >= longest_q, op, ": max_seqlen_q = ", max_seqlen_q,
                " is shorter than the longest query sequence (", longest_q, ")");
    TORCH_CHECK(max_seqlen_k <= 0 || max_seqlen_k >= longest_k, op, ": max_seqlen_k = ", max_seqlen_k,
                " is shorter than the longest key sequence (", longest_k, ")");
    pr.seqlen_q = longest_q;
    pr.seqlen_k = longest_k;
    a.cu_q = cu_seqlens_q->contiguous();
    a.cu_k = cu_seqlens_k->contiguous();
    pr.cu_seqlens_q = a.cu_q.data_ptr<int32_t>();
    pr.cu_seqlens_k = a.cu_k.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), op, ": q has batch ", q.size(0), " but k has batch ", k.size(0));
    pr.batch = q.size(0);
    pr.seqlen_q = q.size(1);
    pr.seqlen_k = k.size(1);
    pr.total_q = pr.batch * pr.seqlen_q;
    a.total_k = pr.batch * pr.seqlen_k;
  }
  if (seqused_k.has_value()) {
    const Tensor& s = *seqused_k;
    TORCH_CHECK(s.scalar_type() == at::kInt, op, ": seqused_k must be int32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == q.device(), op, ": seqused_k is on ", s.device(), " but q is on ", q.device());
    TORCH_CHECK(s.dim() == 1 && s.size(0) == pr.batch, op, ": seqused_k must be [B] with B = ", pr.batch,
                ", got shape ", s.sizes());
    a.seqused_k = s.contiguous();
    pr.seqused_k = a.seqused_k.data_ptr<int32_t>();
  }
  if (bias_q.has_value()) {
    const int64_t R = bias_q->size(-1);
    TORCH_CHECK(R >= 1 && R <= kMaxBiasRank, op, ": bias_q has rank R = ", R, "; 1 <= R <= ", kMaxBiasRank);
    a.bias_q = check_bias(op, "bias_q", *bias_q, q, a.acc, R);
    a.bias_k = check_bias(op, "bias_k", *bias_k, k, a.acc, R);
    pr.bias_rank = static_cast<int>(R);
  }
  return a;
}

template <typename acc_t>
ForwardParamsT<acc_t> forward_params(const AttnArgs& a) {
  ForwardParamsT<acc_t> p;
  p.problem = a.problem;
  p.scale = static_cast<acc_t>(a.scale);
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  p.q_strides = strides_of(a.q, a.varlen);
  p.k_strides = strides_of(a.k, a.varlen);
  p.v_strides = strides_of(a.v, a.varlen);
  if (a.bias_q.defined()) {
    p.bias.q = a.bias_q.data_ptr<acc_t>();
    p.bias.k = a.bias_k.data_ptr<acc_t>();
  }
  return p;
}

inline std::vector<int64_t> lse_shape(const AttnArgs& a) {
  const Problem& pr = a.problem;
  if (a.varlen) return {pr.heads_q, pr.total_q};
  return {pr.batch, pr.heads_q, pr.seqlen_q};
}

template <typename Kernels>
std::tuple<Tensor, Tensor> flash_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                           std::optional<double> scale, bool causal, const OptTensor& cu_seqlens_q,
                                           const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                           const OptTensor& seqused_k, const OptTensor& bias_q,
                                           const OptTensor& bias_k) {
  constexpr const char* op = "flash_attention";
  const typename Kernels::Guard guard(q.device());
  const AttnArgs a = prepare(op, q, k, v, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             seqused_k, bias_q, bias_k, Kernels::kHasDouble);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty(lse_shape(a), q.options().dtype(a.acc));
  auto run = [&]<typename acc_t>() {
    ForwardParamsT<acc_t> p = forward_params<acc_t>(a);
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<acc_t>();
    Kernels::forward(p);
  };
  if (a.acc == at::kDouble) {
    if constexpr (Kernels::kHasDouble) run.template operator()<double>();
  } else {
    run.template operator()<float>();
  }
  return {out, lse};
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename Kernels>
BackwardResult flash_attention_backward(const Tensor& dout, const OptTensor& dlse, const Tensor& q, const Tensor& k,
                                        const Tensor& v, const Tensor& out, const Tensor& lse,
                                        std::optional<double> scale, bool causal, const OptTensor& cu_seqlens_q,
                                        const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                        const OptTensor& seqused_k, const OptTensor& bias_q,
                                        const OptTensor& bias_k) {
  constexpr const char* op = "flash_attention_backward";
  const typename Kernels::Guard guard(q.device());
  const AttnArgs a = prepare(op, q, k, v, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             seqused_k, bias_q, bias_k, Kernels::kHasDouble);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.device() == q.device(), op,
              ": dout must match q (shape ", q.sizes(), ", ", q.scalar_type(), ", ", q.device(), "), got shape ",
              dout.sizes(), ", ", dout.scalar_type(), ", ", dout.device());
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(), op,
              ": out must be the contiguous output of flash_attention (q's shape ", q.sizes(), " and dtype)");
  const std::vector<int64_t> lse_sizes = lse_shape(a);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_sizes) && lse.scalar_type() == a.acc && lse.is_contiguous(), op,
              ": lse must be the contiguous ", a.acc, " tensor of shape ", at::IntArrayRef(lse_sizes),
              " returned by flash_attention, got ", lse.scalar_type(), " ", lse.sizes());
  Tensor dout_c = dout.size(-1) <= 1 || dout.stride(-1) == 1 ? dout : dout.contiguous();
  Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes(), op, ": dlse must have lse's shape ", lse.sizes(), ", got ",
                dlse->sizes());
    dlse_c = dlse->to(a.acc).contiguous();
  }

  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  const auto acc_opts = q.options().dtype(a.acc);
  Tensor dbias_q = a.bias_q.defined() ? at::zeros(a.bias_q.sizes(), acc_opts) : at::empty({0}, q.options());
  Tensor dbias_k = a.bias_k.defined() ? at::zeros(a.bias_k.sizes(), acc_opts) : at::empty({0}, q.options());
  Tensor delta, dq_accum, dk_accum, dv_accum, dbias_k_accum;
  const Problem& pr = a.problem;
  if constexpr (Kernels::kNeedsWorkspace) {
    const auto f32 = q.options().dtype(at::kFloat);
    delta = at::empty(lse_sizes, f32);
    dq_accum = at::zeros({pr.total_q, pr.heads_q, pr.head_dim}, f32);
    dk_accum = at::empty({a.total_k, pr.heads_q, pr.head_dim}, f32);
    dv_accum = at::empty({a.total_k, pr.heads_q, pr.head_dim}, f32);
    if (a.bias_k.defined()) dbias_k_accum = at::empty({a.total_k, pr.heads_q, pr.bias_rank}, f32);
  }

  auto run = [&]<typename acc_t>() {
    BackwardParamsT<acc_t> p;
    p.fwd = forward_params<acc_t>(a);
    p.fwd.out = out.data_ptr();
    p.fwd.lse = lse.data_ptr<acc_t>();
    p.dout = dout_c.data_ptr();
    p.dout_strides = strides_of(dout_c, a.varlen);
    p.dlse = dlse_c.defined() ? dlse_c.data_ptr<acc_t>() : nullptr;
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    p.dbias_q = a.bias_q.defined() ? dbias_q.data_ptr<acc_t>() : nullptr;
    p.dbias_k = a.bias_k.defined() ? dbias_k.data_ptr<acc_t>() : nullptr;
    p.total_k = a.total_k;
    if (delta.defined()) {
      p.delta = delta.data_ptr<float>();
      p.dq_accum = dq_accum.data_ptr<float>();
      p.dk_accum = dk_accum.data_ptr<float>();
      p.dv_accum = dv_accum.data_ptr<float>();
      if (dbias_k_accum.defined()) p.dbias_k_accum = dbias_k_accum.data_ptr<float>();
    }
    Kernels::backward(p);
  };
  if (a.acc == at::kDouble) {
    if constexpr (Kernels::kHasDouble) run.template operator()<double>();
  } else {
    run.template operator()<float>();
  }
  if (a.bias_q.defined()) {
    dbias_q = dbias_q.to(bias_q->scalar_type());
    dbias_k = dbias_k.to(bias_k->scalar_type());
  }
  return {dq, dk, dv, dbias_q, dbias_k};
}

// Registers every attention op for one dispatch key with one Kernels backend.
#define DIFFORGE_REGISTER_ATTENTION_OPS(m, Kernels)                                                    \
  m.impl("flash_attention", &::difforge::attention::binding::flash_attention<Kernels>);                \
  m.impl("flash_attention_backward", &::difforge::attention::binding::flash_attention_backward<Kernels>)

}  // namespace difforge::attention::binding
