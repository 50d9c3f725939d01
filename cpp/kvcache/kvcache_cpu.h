// CPU kernels of the quantized KV cache family: the group quantizer and its inverse, and attention over
// [quantized cache ; sink ; current chunk] with dequantization and the Jensen bias fused per key tile.
// Reference for the CUDA kernels (cuda/kvcache). Math: cpp/include/difforge/kvcache.h.
#pragma once

#include "difforge/kvcache.h"

namespace difforge::kvcache {

// Returns false when a group's step or zero is not finite in the meta dtype (non-finite input, or a range
// the meta dtype overflows); the outputs are then unspecified.
bool kv_quantize_cpu(const QuantizeParams& p);

void kv_dequantize_cpu(const DequantizeParams& p);

void quantized_kv_attention_cpu(const QuantizedAttentionParams& p);

}  // namespace difforge::kvcache
