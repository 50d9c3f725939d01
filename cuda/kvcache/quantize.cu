// Group quantizer of the KV cache and its inverse: one thread per group (token axis) or per byte of packed
// codes over a token group (channel axis), one thread per packed byte for dequantization. Memory-bound and
// small (one chunk's K/V per call).
#include <cstdint>

#include "common/element.cuh"
#include "difforge/kvcache_cuda.h"

namespace difforge::kvcache {
namespace {

using difforge::cuda::from_float;
using difforge::cuda::to_float;

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return int((n + kThreads - 1) / kThreads); }

// Meta-rounded grid of [lo, hi], read back as float, as the CPU kernel stores it.
template <typename M>
struct StoredGrid {
  M step, zero;
  float step_f, zero_f;
  __device__ StoredGrid(float lo, float hi, int bits)
      : step(from_float<M>(grid_step(lo, hi, bits))), zero(from_float<M>(lo)),
        step_f(to_float(step)), zero_f(to_float(zero)) {}
};

// Groups whose codes end on a byte boundary (group_size * bits % 8 == 0, every practical size) get a thread
// each; otherwise a thread takes a whole row, so that no two threads write one byte.
inline int64_t groups_per_thread(const QuantizeParams& p) {
  return p.group_size * p.bits % 8 == 0 ? 1 : p.head_dim / p.group_size;
}

template <typename T, typename M>
__global__ void quantize_token_kernel(const QuantizeParams p, int64_t span) {
  const int64_t groups = p.head_dim / p.group_size, spans = groups / span;
  const int64_t id = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= p.batch * p.len * p.heads * spans) return;
  const int64_t r = id / spans, h = r % p.heads, l = (r / p.heads) % p.len, b = r / (p.heads * p.len);
  const T* x = static_cast<const T*>(p.x) + p.x_strides.offset(b, l, h);
  uint8_t* codes = p.codes + r * packed_bytes(p.head_dim, p.bits);
  uint32_t packed = 0;  // the byte being filled
  for (int64_t j = (id % spans) * span; j < (id % spans + 1) * span; ++j) {
    const int64_t c0 = j * p.group_size, c1 = c0 + p.group_size;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t c = c0; c < c1; ++c) {
      const float v = to_float(x[c]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    const StoredGrid<M> grid(lo, hi, p.bits);
    static_cast<M*>(p.step)[r * groups + j] = grid.step;
    static_cast<M*>(p.zero)[r * groups + j] = grid.zero;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t bit = c * p.bits;
      packed |= encode(to_float(x[c]), grid.step_f, grid.zero_f, p.bits) << (bit % 8);
      if ((bit + p.bits) % 8 == 0) {
        codes[bit / 8] = uint8_t(packed);
        packed = 0;
      }
    }
  }
}

// Channel axis: thread (b, token group, h, byte) owns the 8 / bits channels of one code byte.
template <typename T, typename M>
__global__ void quantize_channel_kernel(const QuantizeParams p) {
  const int64_t bytes = packed_bytes(p.head_dim, p.bits), token_groups = p.meta_len();
  const int64_t id = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= p.batch * token_groups * p.heads * bytes) return;
  const int64_t byte = id % bytes, t = id / bytes;
  const int64_t h = t % p.heads, tg = (t / p.heads) % token_groups, b = t / (p.heads * token_groups);
  const int64_t l0 = tg * p.group_size, l1 = min(p.len, l0 + p.group_size);
  const int per_byte = 8 / p.bits;
  float step_f[8], zero_f[8];
  for (int k = 0; k < per_byte; ++k) {
    const int64_t c = byte * per_byte + k;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t l = l0; l < l1; ++l) {
      const float v = to_float(static_cast<const T*>(p.x)[p.x_strides.offset(b, l, h) + c]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    const StoredGrid<M> grid(lo, hi, p.bits);
    static_cast<M*>(p.step)[t * p.head_dim + c] = grid.step;
    static_cast<M*>(p.zero)[t * p.head_dim + c] = grid.zero;
    step_f[k] = grid.step_f;
    zero_f[k] = grid.zero_f;
  }
  for (int64_t l = l0; l < l1; ++l) {
    const T* x = static_cast<const T*>(p.x) + p.x_strides.offset(b, l, h);
    uint32_t packed = 0;
    for (int k = 0; k < per_byte; ++k) {
      const int64_t c = byte * per_byte + k;
      packed |= encode(to_float(x[c]), step_f[k], zero_f[k], p.bits) << (k * p.bits);
    }
    p.codes[((b * p.len + l) * p.heads + h) * bytes + byte] = uint8_t(packed);
  }
}

template <typename T, typename M>
__global__ void dequantize_kernel(const DequantizeParams p) {
  const int64_t bytes = packed_bytes(p.head_dim, p.bits);
  const int64_t id = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= p.batch * p.len * p.heads * bytes) return;
  const int64_t byte = id % bytes, r = id / bytes;
  const int64_t h = r % p.heads, l = (r / p.heads) % p.len, b = r / (p.heads * p.len);
  const int per_byte = 8 / p.bits;
  const uint8_t* codes = p.codes + r * bytes;
  T* out = static_cast<T*>(p.out) + r * p.head_dim;
  for (int k = 0; k < per_byte; ++k) {
    const int64_t c = byte * per_byte + k, m = p.meta_index(b, l, h, c);
    const float v = decode(unpack_code(codes, c, p.bits), to_float(static_cast<const M*>(p.step)[m]),
                           to_float(static_cast<const M*>(p.zero)[m]));
    out[c] = from_float<T>(v);
  }
}

template <typename T, typename M>
struct Quantize {
  static cudaError_t run(const QuantizeParams& p, cudaStream_t stream) {
    if (p.axis == Axis::token) {
      const int64_t span = groups_per_thread(p);
      const int64_t n = p.batch * p.len * p.heads * (p.head_dim / p.group_size / span);
      if (n == 0) return cudaSuccess;
      quantize_token_kernel<T, M><<<blocks_for(n), kThreads, 0, stream>>>(p, span);
    } else {
      const int64_t n = p.batch * p.meta_len() * p.heads * packed_bytes(p.head_dim, p.bits);
      if (n == 0) return cudaSuccess;
      quantize_channel_kernel<T, M><<<blocks_for(n), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  }
};

template <typename T, typename M>
struct Dequantize {
  static cudaError_t run(const DequantizeParams& p, cudaStream_t stream) {
    const int64_t n = p.batch * p.len * p.heads * packed_bytes(p.head_dim, p.bits);
    if (n == 0) return cudaSuccess;
    dequantize_kernel<T, M><<<blocks_for(n), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

// Op<T, M>::run(p, stream) for the element and meta types (fp32 / fp16 / bf16 each).
template <template <typename, typename> class Op, typename T, typename Params>
cudaError_t with_meta(const Params& p, cudaStream_t stream) {
  switch (p.meta_dtype) {
    case DType::f32: return Op<T, float>::run(p, stream);
    case DType::f16: return Op<T, __half>::run(p, stream);
    case DType::bf16: return Op<T, __nv_bfloat16>::run(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <template <typename, typename> class Op, typename Params>
cudaError_t dispatch_types(const Params& p, cudaStream_t stream) {
  if (!supported_bits(p.bits) || p.group_size < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::f32: return with_meta<Op, float>(p, stream);
    case DType::f16: return with_meta<Op, __half>(p, stream);
    case DType::bf16: return with_meta<Op, __nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_kv_quantize(const QuantizeParams& p, cudaStream_t stream) {
  return dispatch_types<Quantize>(p, stream);
}

cudaError_t launch_kv_dequantize(const DequantizeParams& p, cudaStream_t stream) {
  return dispatch_types<Dequantize>(p, stream);
}

}  // namespace difforge::kvcache
