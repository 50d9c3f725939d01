// CPU registration of the sampling family (kernels: cpp/sampling).
#include <torch/library.h>

#include "sampling/sampling_cpu.h"
#include "sampling_ops.h"

namespace {

struct CpuKernels {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void step(const difforge::sampling::StepParams& p) { difforge::sampling::discrete_step_cpu(p); }
  static void tweedie(const difforge::sampling::TweedieParams& p) { difforge::sampling::tweedie_step_cpu(p); }
  static void select(const difforge::sampling::SelectParams& p) { difforge::sampling::select_positions_cpu(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CPU, m) { DIFFORGE_REGISTER_SAMPLING_OPS(m, CpuKernels); }
