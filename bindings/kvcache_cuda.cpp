// CUDA registration of the kvcache family (kernels: cuda/kvcache, torch-free launchers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "difforge/kvcache_cuda.h"
#include "kvcache_ops.h"

namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "difforge ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;
  // Non-finite input shows up as non-finite steps; checking it would need a device sync per call.
  static bool quantize(const difforge::kvcache::QuantizeParams& p) {
    check_launch(difforge::kvcache::launch_kv_quantize(p, c10::cuda::getCurrentCUDAStream()), "kv_quantize");
    return true;
  }
  static void dequantize(const difforge::kvcache::DequantizeParams& p) {
    check_launch(difforge::kvcache::launch_kv_dequantize(p, c10::cuda::getCurrentCUDAStream()), "kv_dequantize");
  }
  static void attention(const difforge::kvcache::QuantizedAttentionParams& p) {
    check_launch(difforge::kvcache::launch_quantized_kv_attention(p, c10::cuda::getCurrentCUDAStream()),
                 "quantized_kv_attention");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CUDA, m) { DIFFORGE_REGISTER_KVCACHE_OPS(m, CudaKernels); }
