// CPU registration of the kvcache family (kernels: cpp/kvcache).
#include <torch/library.h>

#include "kvcache/kvcache_cpu.h"
#include "kvcache_ops.h"

namespace {

struct CpuKernels {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static bool quantize(const difforge::kvcache::QuantizeParams& p) { return difforge::kvcache::kv_quantize_cpu(p); }
  static void dequantize(const difforge::kvcache::DequantizeParams& p) { difforge::kvcache::kv_dequantize_cpu(p); }
  static void attention(const difforge::kvcache::QuantizedAttentionParams& p) {
    difforge::kvcache::quantized_kv_attention_cpu(p);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CPU, m) { DIFFORGE_REGISTER_KVCACHE_OPS(m, CpuKernels); }
