// Attention over [quantized cache ; sink ; current chunk] on CUDA cores, one warp per query row, like the
// SIMT flash attention (a row of D elements spread over the lanes, column c = lane + 32 k): each cached key
// is dequantized in registers as it is read and its logit gets the Jensen bias, reduced over the warp with
// the dot product. Correct rather than fast: no shared-memory reuse of key tiles across query rows.
// Instantiated per element type in quantized_attention_<dtype>.cu. Math: difforge/kvcache.h.
#pragma once

#include "attention/flash_simt.cuh"
#include "difforge/kvcache_cuda.h"

namespace difforge::kvcache::detail {

using attention::detail::kLaneCols;
using attention::detail::kSimtWarps;
using attention::detail::lane_dot;
using attention::detail::load_row;
using attention::detail::neg_inf;
using attention::detail::warp_sum;
using attention::detail::warp_sum2;
using difforge::cuda::from_float;
using difforge::cuda::to_float;

// The online softmax state of one query row, the same on every lane.
struct RowSoftmax {
  float max = neg_inf(), sum = 0.f, acc[kLaneCols] = {};

  __device__ void add(float logit, const float (&v)[kLaneCols]) {
    const float m_new = fmaxf(max, logit);
    const float rescale = expf(max - m_new), w = expf(logit - m_new);  // max = -inf first: rescale 0
    sum = sum * rescale + w;
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) acc[c] = acc[c] * rescale + w * v[c];
    max = m_new;
  }
};

// Dequantizes the lane's channels of one cached row; steps[k] gets the step of channel lane + 32 k.
template <typename M>
__device__ __forceinline__ void dequantize_row(float (&x)[kLaneCols], float (&steps)[kLaneCols], const uint8_t* codes,
                                               const M* step, const M* zero, int d, int group_size, int bits,
                                               int lane) {
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) {
    const int c = lane + 32 * k;
    if (c < d) {
      const float st = to_float(step[c / group_size]);
      steps[k] = st;
      x[k] = decode(unpack_code(codes, c, bits), st, to_float(zero[c / group_size]));
    } else {
      steps[k] = 0.f;
      x[k] = 0.f;
    }
  }
}

// The lane's share of the Jensen bias of one cached key: q_raw = q (unscaled), steps of its channels.
__device__ __forceinline__ float lane_bias(Jensen mode, float scale, const float (&q_raw)[kLaneCols],
                                           const float (&steps)[kLaneCols], float& order4) {
  float b = 0.f;
  order4 = 0.f;
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) {
    const float qd = q_raw[k] * steps[k];
    if (mode == Jensen::exact) {
      b += log_sinhc(0.5f * scale * qd);
    } else {
      const float qd2 = qd * qd;
      b += qd2;
      order4 += qd2 * qd2;
    }
  }
  return b;
}

template <typename T, typename M>
__global__ void __launch_bounds__(32 * kSimtWarps) quantized_attention_kernel(const QuantizedAttentionParams p) {
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int lane = int(threadIdx.x) % 32;
  const int i = int(blockIdx.x) * kSimtWarps + int(threadIdx.x) / 32;
  if (i >= p.q_len) return;
  const int hkv = int(p.kv_head(h)), d = int(p.head_dim), g = p.group_size, bits = p.bits;

  float q_raw[kLaneCols], q[kLaneCols];
  load_row(q_raw, static_cast<const T*>(p.q) + p.q_strides.offset(b, i, h), d, lane);
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) q[k] = p.scale * q_raw[k];
  const float c2 = taylor2_coefficient(p.scale), c4 = taylor4_coefficient(p.scale);

  RowSoftmax row;
  for (int64_t j = 0; j < p.cache_len; ++j) {
    const QuantizedSegment& kc = p.k_cache;
    const QuantizedSegment& vc = p.v_cache;
    float kj[kLaneCols], vj[kLaneCols], steps[kLaneCols], v_steps[kLaneCols];
    dequantize_row(kj, steps, kc.codes + kc.codes_strides.offset(b, j, hkv),
                   static_cast<const M*>(kc.step) + kc.step_strides.offset(b, j, hkv),
                   static_cast<const M*>(kc.zero) + kc.zero_strides.offset(b, j, hkv), d, g, bits, lane);
    float logit = lane_dot(q, kj), bias = 0.f;
    if (p.jensen == Jensen::none) {
      logit = warp_sum(logit);
    } else {
      float order4;
      const float part = lane_bias(p.jensen, p.scale, q_raw, steps, order4);
      if (p.jensen == Jensen::taylor2) {
        logit = warp_sum(logit - p.lambda * c2 * part);
      } else {
        float s2 = part, s4 = order4;
        logit = warp_sum(logit);
        warp_sum2(s2, s4);
        bias = p.jensen == Jensen::exact ? s2 : fmaxf(0.f, c2 * s2 - c4 * s4);
        logit -= p.lambda * bias;
      }
    }
    dequantize_row(vj, v_steps, vc.codes + vc.codes_strides.offset(b, j, hkv),
                   static_cast<const M*>(vc.step) + vc.step_strides.offset(b, j, hkv),
                   static_cast<const M*>(vc.zero) + vc.zero_strides.offset(b, j, hkv), d, g, bits, lane);
    row.add(logit, vj);
  }
  // Unquantized segments: the plain product, never biased.
  const DenseSegment* keys[2] = {&p.k_sink, &p.k_cur};
  const DenseSegment* values[2] = {&p.v_sink, &p.v_cur};
  const int64_t lens[2] = {p.sink_len, p.cur_len};
  for (int s = 0; s < 2; ++s) {
    for (int64_t j = 0; j < lens[s]; ++j) {
      float kj[kLaneCols], vj[kLaneCols];
      load_row(kj, static_cast<const T*>(keys[s]->data) + keys[s]->strides.offset(b, j, hkv), d, lane);
      load_row(vj, static_cast<const T*>(values[s]->data) + values[s]->strides.offset(b, j, hkv), d, lane);
      row.add(warp_sum(lane_dot(q, kj)), vj);
    }
  }

  const float inv = row.sum > 0.f ? 1.f / row.sum : 0.f;
  T* out = static_cast<T*>(p.out) + ((int64_t(b) * p.q_len + i) * p.heads_q + h) * d;
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    if (lane + 32 * c < d) out[lane + 32 * c] = from_float<T>(row.acc[c] * inv);
  }
}

// Launches the kernel for element type T, dispatching the meta type.
template <typename T>
cudaError_t launch_quantized_attention_for(const QuantizedAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned((p.q_len + kSimtWarps - 1) / kSimtWarps), unsigned(p.heads_q), unsigned(p.batch));
  switch (p.meta_dtype) {
    case DType::f32: quantized_attention_kernel<T, float><<<grid, 32 * kSimtWarps, 0, stream>>>(p); break;
    case DType::f16: quantized_attention_kernel<T, __half><<<grid, 32 * kSimtWarps, 0, stream>>>(p); break;
    case DType::bf16: quantized_attention_kernel<T, __nv_bfloat16><<<grid, 32 * kSimtWarps, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace difforge::kvcache::detail
