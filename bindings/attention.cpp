// CPU registration of the attention family (kernels: cpp/attention).
#include <torch/library.h>

#include "attention/flash_cpu.h"
#include "attention/skiparse_cpu.h"
#include "attention_ops.h"
#include "skiparse_ops.h"

namespace {

struct CpuKernels {
  static constexpr bool kHasDouble = true;
  static constexpr bool kNeedsWorkspace = false;
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  template <typename acc_t>
  static void forward(const difforge::attention::ForwardParamsT<acc_t>& p) {
    difforge::attention::flash_forward_cpu(p);
  }
  template <typename acc_t>
  static void backward(const difforge::attention::BackwardParamsT<acc_t>& p) {
    difforge::attention::flash_backward_cpu(p);
  }
  static void gather(const difforge::skiparse::GatherParams& p) { difforge::skiparse::skiparse_gather_cpu(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CPU, m) {
  DIFFORGE_REGISTER_ATTENTION_OPS(m, CpuKernels);
  DIFFORGE_REGISTER_SKIPARSE_OPS(m, CpuKernels);
}
