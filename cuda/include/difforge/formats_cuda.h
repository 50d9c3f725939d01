// Launchers of the formats CUDA kernels (cuda/formats). Torch-free: raw pointers in, cudaError_t out.
// Parameters: difforge/formats.h; math: difforge/hif8.h, difforge/nvfp4.h.
#pragma once

#include <cuda_runtime.h>

#include "difforge/formats.h"

namespace difforge::formats {

// The fused HiF8 pass (amax -> scale -> encode -> codes / fake quantization / E4M3). p.scratch must point to
// one device word; the launcher zeroes it. No host synchronisation.
cudaError_t launch_hif8(const Hif8Params& p, cudaStream_t stream);

cudaError_t launch_hif8_decode(const Hif8DecodeParams& p, cudaStream_t stream);

cudaError_t launch_hif8_to_e4m3(const Hif8ToE4m3Params& p, cudaStream_t stream);

cudaError_t launch_nvfp4_quantize(const Nvfp4QuantizeParams& p, cudaStream_t stream);

cudaError_t launch_nvfp4_dequantize(const Nvfp4DequantizeParams& p, cudaStream_t stream);

// W4A16 GEMM: NVFP4 weights dequantized exactly to bf16/fp16 inside the main loop (never to memory).
cudaError_t launch_nvfp4_linear(const Nvfp4LinearParams& p, cudaStream_t stream);

}  // namespace difforge::formats
