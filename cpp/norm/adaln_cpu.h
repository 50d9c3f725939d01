// CPU kernels of the fused adaLN norm-modulate family. Reference for the CUDA kernels and the
// path on machines without a GPU. Parameters: cpp/include/difforge/adaln_norm.h.
#pragma once

#include "difforge/adaln_norm.h"

namespace difforge::norm {

template <typename acc_t>
void adaln_forward_cpu(const ForwardParamsT<acc_t>& p);

// Pass 1 (rows, partials) and pass 2 (ordered column sums), as in ReductionPlan.
template <typename acc_t>
void adaln_backward_cpu(const BackwardParamsT<acc_t>& p);

}  // namespace difforge::norm
