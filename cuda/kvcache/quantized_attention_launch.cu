// Public launcher of quantized_kv_attention (difforge/kvcache_cuda.h): validates the problem and picks the
// element type's instantiation.
#include <climits>

#include "quantized_attention.cuh"

namespace difforge::kvcache {

cudaError_t launch_quantized_kv_attention(const QuantizedAttentionParams& p, cudaStream_t stream) {
  const bool ok = supported_bits(p.bits) && p.group_size >= 1 && p.head_dim >= 1 &&
                  p.head_dim <= attention::kMaxHeadDim && p.head_dim % p.group_size == 0 && p.heads_kv >= 1 &&
                  p.heads_q % p.heads_kv == 0 && p.heads_q <= 65535 && p.batch <= 65535 && p.q_len <= INT_MAX;
  if (!ok) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.q_len == 0 || p.heads_q == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::f32: return detail::launch_quantized_attention_for<float>(p, stream);
    case DType::f16: return detail::launch_quantized_attention_for<__half>(p, stream);
    case DType::bf16: return detail::launch_quantized_attention_for<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace difforge::kvcache
