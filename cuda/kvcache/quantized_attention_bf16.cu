// quantized_kv_attention for __nv_bfloat16 elements (every meta type): see quantized_attention.cuh.
#include "quantized_attention.cuh"

namespace difforge::kvcache::detail {
template cudaError_t launch_quantized_attention_for<__nv_bfloat16>(const QuantizedAttentionParams&, cudaStream_t);
}  // namespace difforge::kvcache::detail
