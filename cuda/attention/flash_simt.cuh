// Flash attention on CUDA cores, one warp per row: correct rather than fast. The fallback for
// fp32, for head dims without a tensor-core instantiation and for unaligned inputs (any dtype,
// D <= kMaxHeadDim, R <= kMaxBiasRank), and the backward's edges shared by both paths: delta
// (rowsum(dout * out) - dlse) and the finishing kernel (dq from dq_accum, deterministic
// dk / dv / dbias_k as fixed-order sums over each kv head's query heads).
// A row of D elements is spread over the lanes, column c = lane + 32 k; lane r < R holds feature r
// of the bias. Logits and weights are in the natural-log domain (expf), like the CPU reference.
// Instantiated per dtype in flash_simt.cu. Math: difforge/attention.h.
#pragma once

#include "flash_common.cuh"
#include "flash_launch.h"

namespace difforge::attention::detail {

constexpr int kSimtWarps = 4;                   // rows per CTA, one warp each
constexpr int kLaneCols = kMaxHeadDim / 32;     // columns of a row held by one lane
static_assert(kMaxBiasRank <= 32, "one bias feature per lane");

template <typename T>
__device__ __forceinline__ void load_row(float (&x)[kLaneCols], const T* row, int d, int lane, float mul = 1.f) {
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) {
    const int c = lane + 32 * k;
    x[k] = c < d ? to_float(row[c]) * mul : 0.f;
  }
}

__device__ __forceinline__ float lane_dot(const float (&x)[kLaneCols], const float (&y)[kLaneCols]) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < kLaneCols; ++k) s += x[k] * y[k];
  return s;
}

// Butterfly sums over the warp: every lane gets the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ void warp_sum2(float& a, float& b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
}

// Feature `lane` of a rank-R bias row (0 on lanes >= R or without a bias).
__device__ __forceinline__ float bias_feature(const float* row, int rank, int lane) {
  return lane < rank ? row[lane] : 0.f;
}

// out / lse of query (b, h, i): the online softmax over the visible keys, one key at a time.
template <typename T>
__global__ void __launch_bounds__(32 * kSimtWarps) flash_forward_simt_kernel(const ForwardParams p) {
  const Problem& pr = p.problem;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int lane = int(threadIdx.x) % 32;
  const int i = int(blockIdx.x) * kSimtWarps + int(threadIdx.x) / 32;
  const SequenceView seq = view_sequence(pr, b);
  if (i >= seq.q_len) return;
  const int hkv = h / int(pr.group_size()), d = int(pr.head_dim), rank = pr.bias_rank;

  float q[kLaneCols];  // scale * q, as the CPU kernels fold it
  load_row(q, static_cast<const T*>(p.q) + p.q_strides.offset(b, seq.q_begin + i, h), d, lane, p.scale);
  const float bq = rank > 0 ? bias_feature(p.bias.q + ((seq.out_row0 + i) * pr.heads_q + h) * rank, rank, lane) : 0.f;
  const T* k = static_cast<const T*>(p.k) + p.k_strides.offset(b, seq.k_begin, hkv);
  const T* v = static_cast<const T*>(p.v) + p.v_strides.offset(b, seq.k_begin, hkv);
  const float* bk = rank > 0 ? p.bias.k + (seq.k_row0 * pr.heads_kv + hkv) * rank : nullptr;

  float m = neg_inf(), l = 0.f, acc[kLaneCols] = {};
  const int end = visible_key_end(i, seq.q_len, seq.k_len, pr.causal);
  for (int j = 0; j < end; ++j) {
    float kj[kLaneCols], vj[kLaneCols];
    load_row(kj, k + j * p.k_strides.row, d, lane);
    float part = lane_dot(q, kj);
    if (rank > 0) part += bq * bias_feature(bk + int64_t(j) * pr.heads_kv * rank, rank, lane);
    const float s = warp_sum(part);
    const float m_new = fmaxf(m, s);
    const float rescale = expf(m - m_new), w = expf(s - m_new);  // m = -inf on the first key: rescale 0
    l = l * rescale + w;
    load_row(vj, v + j * p.v_strides.row, d, lane);
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) acc[c] = acc[c] * rescale + w * vj[c];
    m = m_new;
  }

  const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: out 0, lse -inf
  T* out = static_cast<T*>(p.out) + ((seq.out_row0 + i) * pr.heads_q + h) * d;
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    if (lane + 32 * c < d) out[lane + 32 * c] = from_float<T>(acc[c] * inv);
  }
  if (lane == 0) p.lse[pr.lse_index(b, h, i)] = l > 0.f ? m + logf(l) : neg_inf();
}

// The logit gradient dS_ij = P_ij (dP_ij - delta_i) of one (query, key) pair, with everything the
// two backward kernels share: s = (scale q) . k + bias, P = exp(s - lse), dP = dout . v.
struct PairGradient {
  float p, ds;
};

__device__ __forceinline__ PairGradient pair_gradient(const float (&q_scaled)[kLaneCols], const float (&k)[kLaneCols],
                                                      const float (&dout)[kLaneCols], const float (&v)[kLaneCols],
                                                      float bias_part, float lse, float delta) {
  float s = lane_dot(q_scaled, k) + bias_part, dp = lane_dot(dout, v);
  warp_sum2(s, dp);
  const float p = expf(s - lse);
  return {p, p * (dp - delta)};
}

// dq (into dq_accum, scaled, plain stores) and dbias_q of query (b, h, i): one warp per query.
template <typename T>
__global__ void __launch_bounds__(32 * kSimtWarps) flash_backward_dq_simt_kernel(const BackwardParams p) {
  const ForwardParams& f = p.fwd;
  const Problem& pr = f.problem;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int lane = int(threadIdx.x) % 32;
  const int i = int(blockIdx.x) * kSimtWarps + int(threadIdx.x) / 32;
  const SequenceView seq = view_sequence(pr, b);
  if (i >= seq.q_len) return;
  const int hkv = h / int(pr.group_size()), d = int(pr.head_dim), rank = pr.bias_rank;
  const int64_t row = (seq.out_row0 + i) * pr.heads_q + h;

  const float lse = f.lse[pr.lse_index(b, h, i)], delta = p.delta[pr.lse_index(b, h, i)];
  float q[kLaneCols], dout[kLaneCols];
  load_row(q, static_cast<const T*>(f.q) + f.q_strides.offset(b, seq.q_begin + i, h), d, lane, f.scale);
  load_row(dout, static_cast<const T*>(p.dout) + p.dout_strides.offset(b, seq.q_begin + i, h), d, lane);
  const float bq = rank > 0 ? bias_feature(f.bias.q + row * rank, rank, lane) : 0.f;
  const T* k = static_cast<const T*>(f.k) + f.k_strides.offset(b, seq.k_begin, hkv);
  const T* v = static_cast<const T*>(f.v) + f.v_strides.offset(b, seq.k_begin, hkv);
  const float* bk = rank > 0 ? f.bias.k + (seq.k_row0 * pr.heads_kv + hkv) * rank : nullptr;

  float dq[kLaneCols] = {}, dbq = 0.f;
  // A query without visible keys (lse = -inf) has zero gradients.
  const int end = lse == neg_inf() ? 0 : visible_key_end(i, seq.q_len, seq.k_len, pr.causal);
  for (int j = 0; j < end; ++j) {
    float kj[kLaneCols], vj[kLaneCols];
    load_row(kj, k + j * f.k_strides.row, d, lane);
    load_row(vj, v + j * f.v_strides.row, d, lane);
    const float bkj = rank > 0 ? bias_feature(bk + int64_t(j) * pr.heads_kv * rank, rank, lane) : 0.f;
    const PairGradient pg = pair_gradient(q, kj, dout, vj, bq * bkj, lse, delta);
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) dq[c] += pg.ds * kj[c];
    dbq += pg.ds * bkj;
  }
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    if (lane + 32 * c < d) p.dq_accum[row * d + lane + 32 * c] = f.scale * dq[c];
  }
  if (lane < rank) p.dbias_q[row * rank + lane] = dbq;
}

// Per-query-head partials dk, dv, dbias_k of key (b, j) for query head h: one warp per key; keys
// in [k_len, k_stored) get zeros.
template <typename T>
__global__ void __launch_bounds__(32 * kSimtWarps) flash_backward_dkv_simt_kernel(const BackwardParams p) {
  const ForwardParams& f = p.fwd;
  const Problem& pr = f.problem;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int lane = int(threadIdx.x) % 32;
  const int j = int(blockIdx.x) * kSimtWarps + int(threadIdx.x) / 32;
  const SequenceView seq = view_sequence(pr, b);
  if (j >= seq.k_stored) return;
  const int hkv = h / int(pr.group_size()), d = int(pr.head_dim), rank = pr.bias_rank;

  float dk[kLaneCols] = {}, dv[kLaneCols] = {}, dbk = 0.f;
  if (j < seq.k_len) {
    float kj[kLaneCols], vj[kLaneCols];
    load_row(kj, static_cast<const T*>(f.k) + f.k_strides.offset(b, seq.k_begin + j, hkv), d, lane);
    load_row(vj, static_cast<const T*>(f.v) + f.v_strides.offset(b, seq.k_begin + j, hkv), d, lane);
    const float bkj = rank > 0 ? bias_feature(f.bias.k + ((seq.k_row0 + j) * pr.heads_kv + hkv) * rank, rank, lane)
                               : 0.f;
    // Query i sees key j iff j <= i + k_len - q_len (causal).
    const int first = pr.causal ? max(0, j - (seq.k_len - seq.q_len)) : 0;
    for (int i = first; i < seq.q_len; ++i) {
      const float lse = f.lse[pr.lse_index(b, h, i)];
      if (lse == neg_inf()) continue;  // no visible keys: no gradient
      const float delta = p.delta[pr.lse_index(b, h, i)];
      const int64_t row = (seq.out_row0 + i) * pr.heads_q + h;
      float q[kLaneCols], dout[kLaneCols];
      load_row(q, static_cast<const T*>(f.q) + f.q_strides.offset(b, seq.q_begin + i, h), d, lane, f.scale);
      load_row(dout, static_cast<const T*>(p.dout) + p.dout_strides.offset(b, seq.q_begin + i, h), d, lane);
      const float bqi = rank > 0 ? bias_feature(f.bias.q + row * rank, rank, lane) : 0.f;
      const PairGradient pg = pair_gradient(q, kj, dout, vj, bqi * bkj, lse, delta);
#pragma unroll
      for (int c = 0; c < kLaneCols; ++c) {
        dv[c] += pg.p * dout[c];
        dk[c] += pg.ds * q[c];  // q holds scale * q: dk = scale * sum_i dS_ij q_i
      }
      dbk += pg.ds * bqi;
    }
  }
  const int64_t row = (seq.k_row0 + j) * pr.heads_q + h;
#pragma unroll
  for (int c = 0; c < kLaneCols; ++c) {
    if (lane + 32 * c < d) {
      p.dk_accum[row * d + lane + 32 * c] = dk[c];
      p.dv_accum[row * d + lane + 32 * c] = dv[c];
    }
  }
  if (lane < rank) p.dbias_k_accum[row * rank + lane] = dbk;
}

// delta_i = rowsum(dout_i * out_i) - dlse_i (out as the forward wrote it), indexed like lse.
template <typename T>
__global__ void __launch_bounds__(32 * kSimtWarps) flash_delta_kernel(const BackwardParams p) {
  const Problem& pr = p.fwd.problem;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int lane = int(threadIdx.x) % 32;
  const int i = int(blockIdx.x) * kSimtWarps + int(threadIdx.x) / 32;
  const SequenceView seq = view_sequence(pr, b);
  if (i >= seq.q_len) return;
  const int d = int(pr.head_dim);
  float dout[kLaneCols], out[kLaneCols];
  load_row(dout, static_cast<const T*>(p.dout) + p.dout_strides.offset(b, seq.q_begin + i, h), d, lane);
  load_row(out, static_cast<const T*>(p.fwd.out) + ((seq.out_row0 + i) * pr.heads_q + h) * d, d, lane);
  const float sum = warp_sum(lane_dot(dout, out));
  if (lane == 0) {
    const int64_t idx = pr.lse_index(b, h, i);
    p.delta[idx] = sum - (p.dlse != nullptr ? p.dlse[idx] : 0.f);
  }
}

// out[r, c] = sum_{g < group} accum[r * group + g, c], for `rows` rows of `cols` columns, g in
// order: the query heads of kv head hkv are hkv * G + g, and row (k_row * Hq + hkv * G + g) of a
// [rows, Hq, cols] partial is ((k_row * Hkv + hkv) * G + g). group == 1 converts (dq).
template <typename T>
__global__ void __launch_bounds__(256) sum_head_groups_kernel(const float* accum, T* out, int64_t rows, int cols,
                                                              int group) {
  const int lane = int(threadIdx.x) % 32;
  for (int64_t r = int64_t(blockIdx.x) * 8 + threadIdx.x / 32; r < rows; r += int64_t(gridDim.x) * 8) {
    const float* src = accum + r * group * cols;
    for (int c = lane; c < cols; c += 32) {
      float s = 0.f;
      for (int g = 0; g < group; ++g) s += src[int64_t(g) * cols + c];
      out[r * cols + c] = from_float<T>(s);
    }
  }
}

inline dim3 row_grid(int64_t rows_per_sequence, const Problem& pr) {
  return dim3(unsigned((rows_per_sequence + kSimtWarps - 1) / kSimtWarps), unsigned(pr.heads_q),
              unsigned(pr.batch));
}

template <DType DT>
cudaError_t launch_forward_simt(const ForwardParams& p, cudaStream_t stream) {
  flash_forward_simt_kernel<elem_t<DT>><<<row_grid(p.problem.seqlen_q, p.problem), 32 * kSimtWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

template <DType DT>
cudaError_t launch_backward_simt(const BackwardParams& p, cudaStream_t stream) {
  const Problem& pr = p.fwd.problem;
  if (pr.seqlen_q > 0) {
    flash_backward_dq_simt_kernel<elem_t<DT>><<<row_grid(pr.seqlen_q, pr), 32 * kSimtWarps, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (pr.seqlen_k > 0) {
    flash_backward_dkv_simt_kernel<elem_t<DT>><<<row_grid(pr.seqlen_k, pr), 32 * kSimtWarps, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <DType DT>
cudaError_t launch_backward_delta(const BackwardParams& p, cudaStream_t stream) {
  const Problem& pr = p.fwd.problem;
  if (pr.seqlen_q == 0) return cudaSuccess;
  flash_delta_kernel<elem_t<DT>><<<row_grid(pr.seqlen_q, pr), 32 * kSimtWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sum_head_groups(const float* accum, T* out, int64_t rows, int cols, int group, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  constexpr int64_t kMaxBlocks = 1 << 20;  // the kernel strides over the rest
  const int64_t blocks = (rows + 7) / 8;
  sum_head_groups_kernel<T><<<unsigned(blocks < kMaxBlocks ? blocks : kMaxBlocks), 256, 0, stream>>>(accum, out, rows,
                                                                                                     cols, group);
  return cudaGetLastError();
}

template <DType DT>
cudaError_t launch_backward_finish(const BackwardParams& p, cudaStream_t stream) {
  using T = elem_t<DT>;
  const Problem& pr = p.fwd.problem;
  const int d = int(pr.head_dim), group = int(pr.group_size()), rank = pr.bias_rank;
  const int64_t kv_rows = p.total_k * pr.heads_kv;
  cudaError_t err = sum_head_groups(p.dq_accum, static_cast<T*>(p.dq), pr.total_q * pr.heads_q, d, 1, stream);
  if (err == cudaSuccess) err = sum_head_groups(p.dk_accum, static_cast<T*>(p.dk), kv_rows, d, group, stream);
  if (err == cudaSuccess) err = sum_head_groups(p.dv_accum, static_cast<T*>(p.dv), kv_rows, d, group, stream);
  if (err == cudaSuccess && rank > 0) err = sum_head_groups(p.dbias_k_accum, p.dbias_k, kv_rows, rank, group, stream);
  return err;
}

}  // namespace difforge::attention::detail
