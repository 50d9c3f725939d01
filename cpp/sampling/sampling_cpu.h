// CPU kernels of the sampling family: the fused discrete-diffusion step, the Tweedie (two-pass) step and
// position selection. Reference for the CUDA kernels (cuda/sampling). Math: cpp/include/difforge/sampling.h.
#pragma once

#include "difforge/sampling.h"

namespace difforge::sampling {

void discrete_step_cpu(const StepParams& p);

void tweedie_step_cpu(const TweedieParams& p);

void select_positions_cpu(const SelectParams& p);

}  // namespace difforge::sampling
