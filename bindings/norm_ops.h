// The norm op entry points, generic over the kernel backend (CPU or CUDA).
#pragma once

#include "norm_impl.h"

namespace difforge::norm::binding {

template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor> adaln_modulate(const Tensor& x, const OptTensor& scale, const OptTensor& shift,
                                                  const OptTensor& weight, const OptTensor& bias, std::string norm,
                                                  double eps, int64_t batch_repeat, const OptTensor& cu_seqlens,
                                                  int64_t max_seqlen) {
  const typename Kernels::Guard guard(x.device());
  const NormArgs a = prepare("adaln_modulate", x, std::nullopt, std::nullopt, scale, shift, weight, bias, norm,
                             batch_repeat, cu_seqlens, max_seqlen);
  auto [x_out, y, mean, rstd] = forward<Kernels>(a, eps);
  return {y, mean, rstd};
}

template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_adaln_modulate(const Tensor& h, const Tensor& o,
                                                                const OptTensor& gate, const OptTensor& scale,
                                                                const OptTensor& shift, const OptTensor& weight,
                                                                const OptTensor& bias, std::string norm, double eps,
                                                                int64_t batch_repeat, const OptTensor& cu_seqlens,
                                                                int64_t max_seqlen) {
  const typename Kernels::Guard guard(h.device());
  const NormArgs a = prepare("gated_adaln_modulate", h, o, gate, scale, shift, weight, bias, norm, batch_repeat,
                             cu_seqlens, max_seqlen);
  return forward<Kernels>(a, eps);
}

template <typename Kernels>
BackwardResult adaln_modulate_backward(const Tensor& dy, const OptTensor& dx_out, const Tensor& x, const OptTensor& o,
                                       const OptTensor& gate, const OptTensor& scale, const OptTensor& shift,
                                       const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
                                       const Tensor& rstd, std::string norm, int64_t batch_repeat,
                                       const OptTensor& cu_seqlens, int64_t max_seqlen) {
  constexpr const char* op = "adaln_modulate_backward";
  const typename Kernels::Guard guard(x.device());
  TORCH_CHECK(!gate.has_value() || o.has_value(), op, ": gate is given without o");
  TORCH_CHECK(!dx_out.has_value() || o.has_value(), op, ": dx_out is given without o");
  const NormArgs a = prepare(op, x, o, gate, scale, shift, weight, bias, norm, batch_repeat, cu_seqlens, max_seqlen);
  return backward<Kernels>(op, a, dy, dx_out, mean, rstd);
}

// Registers every norm op for one dispatch key with one Kernels backend.
#define DIFFORGE_REGISTER_NORM_OPS(m, Kernels)                                                        \
  m.impl("adaln_modulate", &::difforge::norm::binding::adaln_modulate<Kernels>);                      \
  m.impl("gated_adaln_modulate", &::difforge::norm::binding::gated_adaln_modulate<Kernels>);          \
  m.impl("adaln_modulate_backward", &::difforge::norm::binding::adaln_modulate_backward<Kernels>)

}  // namespace difforge::norm::binding
