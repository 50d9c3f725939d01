// Launchers of the quantized KV cache CUDA kernels (cuda/kvcache). Torch-free: raw pointers in, cudaError_t
// out, so the kernels compile and can be tested with nvcc alone. Math: difforge/kvcache.h.
#pragma once

#include <cuda_runtime.h>

#include "difforge/kvcache.h"

namespace difforge::kvcache {

// codes, step, zero of every group. Unlike the CPU kernel, non-finite input is not reported: it yields
// non-finite steps.
cudaError_t launch_kv_quantize(const QuantizeParams& p, cudaStream_t stream);

cudaError_t launch_kv_dequantize(const DequantizeParams& p, cudaStream_t stream);

// out of every (sequence, query head, query row).
cudaError_t launch_quantized_kv_attention(const QuantizedAttentionParams& p, cudaStream_t stream);

}  // namespace difforge::kvcache
