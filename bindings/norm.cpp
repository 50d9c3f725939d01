// CPU registration of the norm family (kernels: cpp/norm).
#include <torch/library.h>

#include "norm/adaln_cpu.h"
#include "norm_ops.h"

namespace {

struct CpuKernels {
  static constexpr bool kHasDouble = true;
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  template <typename acc_t>
  static void forward(const difforge::norm::ForwardParamsT<acc_t>& p) { difforge::norm::adaln_forward_cpu(p); }
  template <typename acc_t>
  static void backward(const difforge::norm::BackwardParamsT<acc_t>& p) { difforge::norm::adaln_backward_cpu(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CPU, m) { DIFFORGE_REGISTER_NORM_OPS(m, CpuKernels); }
