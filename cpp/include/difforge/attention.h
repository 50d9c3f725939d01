// Flash attention: the problem description shared by the CPU (cpp/attention) and CUDA
// (cuda/attention) kernels. Torch-free, header-only.
//
//   logit[i, j] = scale * q_i . k_j  +  sum_r bias_q[i, r] * bias_k[j, r]     (bias optional)
//   visible(i, j) = j < k_len  and  (not causal or j <= i + k_len - q_len)   (bottom-right causal)
//   lse_i = log sum_{visible j} exp(logit[i, j]),   out_i = sum_{visible j} exp(logit[i, j] - lse_i) v_j
//
// A query row with no visible key gets out_i = 0 and lse_i = -inf (its gradients are 0).
// The bias is a rank-R bilinear form of small per-query and per-key features, evaluated per tile,
// never an Lq x Lk tensor: the quantized-KV-cache Jensen correction is one instance
// (bias_q = -lambda * s^2/24 * A_q, bias_k = Delta^2 on quantized keys and 0 elsewhere).
//
// Layouts. Batch: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]. Varlen: q [total_q, Hq, D] with sequence b in rows
// [cu_seqlens_q[b], cu_seqlens_q[b+1]), k/v likewise with cu_seqlens_k. Any strides with the last one 1;
// out is contiguous. GQA: query head h reads kv head h / (Hq / Hkv). seqused_k[b] (optional) caps the keys
// of sequence b, so padded key tails cost nothing. lse is [B, Hq, Lq] (batch) or [Hq, total_q] (varlen), in
// the accumulation type (fp32; fp64 for fp64 inputs).
#pragma once

#include "difforge/common.h"

namespace difforge::attention {

inline constexpr int kMaxHeadDim = 256;
inline constexpr int kMaxBiasRank = 32;

// Element strides of a [batch, row, head, D] (or packed [row, head, D], batch_stride 0) tensor.
struct Strides {
  int64_t batch = 0, row = 0, head = 0;

  DF_INLINE int64_t offset(int64_t b, int64_t row_index, int64_t h) const {
    return b * batch + row_index * row + h * head;
  }
};

// One attention problem: everything a kernel needs to find the rows of sequence b, head h.
struct Problem {
  DType dtype = DType::f32;
  int64_t batch = 0;                   // B, or the number of packed sequences
  int64_t heads_q = 0, heads_kv = 0;   // Hq, Hkv with Hkv | Hq
  int64_t head_dim = 0;                // D
  int64_t seqlen_q = 0, seqlen_k = 0;  // batch layout: Lq, Lk; varlen: max over sequences (grid sizing)
  int64_t total_q = 0;                 // rows of out / lse: B*Lq (batch) or total packed queries
  const int32_t* cu_seqlens_q = nullptr;  // varlen: [batch + 1]; null: batch layout
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;     // optional [batch]: keys of sequence b are [0, seqused_k[b])
  bool causal = false;
  int bias_rank = 0;  // R; 0: no bias

  DF_INLINE bool varlen() const { return cu_seqlens_q != nullptr; }
  DF_INLINE int64_t group_size() const { return heads_q / heads_kv; }
  DF_INLINE int64_t kv_head(int64_t h) const { return h / group_size(); }

  // First packed row of sequence b (0 in the batch layout, whose batch offset is in the strides).
  DF_INLINE int64_t q_begin(int64_t b) const { return varlen() ? cu_seqlens_q[b] : 0; }
  DF_INLINE int64_t k_begin(int64_t b) const { return varlen() ? cu_seqlens_k[b] : 0; }
  DF_INLINE int64_t q_len(int64_t b) const { return varlen() ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q; }
  // Keys stored for sequence b, and the ones it attends to (capped by seqused_k).
  DF_INLINE int64_t k_stored(int64_t b) const { return varlen() ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k; }
  DF_INLINE int64_t k_len(int64_t b) const {
    const int64_t stored = k_stored(b);
    if (seqused_k == nullptr) return stored;
    const int64_t used = seqused_k[b];
    return used < stored ? (used > 0 ? used : 0) : stored;
  }
  // Row of (b, i) in out / lse-major order: b * Lq + i (batch) or cu_seqlens_q[b] + i (varlen).
  DF_INLINE int64_t out_row(int64_t b, int64_t i) const { return varlen() ? q_begin(b) + i : b * seqlen_q + i; }
  // Row of key (b, j) in dk / dv / bias_k order: b * Lk + j (batch) or cu_seqlens_k[b] + j (varlen).
  DF_INLINE int64_t k_row(int64_t b, int64_t j) const { return varlen() ? k_begin(b) + j : b * seqlen_k + j; }
  // Index of lse[b, h, i] ([B, Hq, Lq]) or lse[h, cu_seqlens_q[b] + i] ([Hq, total_q]).
  DF_INLINE int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return varlen() ? h * total_q + q_begin(b) + i : (b * heads_q + h) * seqlen_q + i;
  }
};

// Keys visible to query i of a sequence with q_len queries and k_len keys: [0, key_end).
DF_INLINE int64_t key_end(int64_t i, int64_t q_len, int64_t k_len, bool causal) {
  if (!causal) return k_len;
  const int64_t end = i + 1 + k_len - q_len;  // bottom-right aligned diagonal
  return end < 0 ? 0 : (end < k_len ? end : k_len);
}

// Optional rank-R logit bias features in the accumulation type, contiguous: bias_q[(out_row, head), r]
// (Problem::out_row) and bias_k[(k_row, kv head), r] (Problem::k_row).
template <typename acc_t>
struct LogitBiasT {
  const acc_t* q = nullptr;  // [rows_q, Hq, R]
  const acc_t* k = nullptr;  // [rows_k, Hkv, R]

  DF_INLINE bool present() const { return q != nullptr; }
};

// acc_t: fp32, or fp64 for fp64 inputs (CPU only, for gradcheck). CUDA kernels take the fp32 aliases.
template <typename acc_t>
struct ForwardParamsT {
  Problem problem;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_strides, k_strides, v_strides;
  acc_t scale = 1;  // in acc_t so fp64 problems keep a double scale
  LogitBiasT<acc_t> bias;
  void* out = nullptr;   // contiguous, q's dtype: [total_q, Hq, D]
  acc_t* lse = nullptr;  // see Problem::lse_index
};
using ForwardParams = ForwardParamsT<float>;

// Gradients of out w.r.t. q, k, v and the bias features. dq/dk/dv are contiguous in q/k/v's dtype
// ([total_q, Hq, D], [total_k, Hkv, D]); dbias_q / dbias_k are acc_t [rows, H, R] like the features,
// zero-filled by the binding (null without bias).
// CUDA workspace (fp32, allocated by the binding for backends that ask for it; uninitialised unless
// stated): delta [indexed like lse] for rowsum(dout * out) - dlse (the logit gradient is
// P * (dP - delta)); dq_accum [total_q, Hq, D], zero-filled (the atomics target); dk_accum / dv_accum
// [total_k, Hq, D]: per-query-head partial dk / dv, summed over each kv head's group in a fixed order,
// so dk / dv are deterministic without atomics; dbias_k_accum [total_k, Hq, R] (with a bias): the same
// per-query-head partials of dbias_k.
template <typename acc_t>
struct BackwardParamsT {
  ForwardParamsT<acc_t> fwd;  // q, k, v, out (as written by the forward), lse, bias
  const void* dout = nullptr;
  Strides dout_strides;
  const acc_t* dlse = nullptr;  // optional gradient of lse (indexed like lse): delta_i -= dlse_i
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  acc_t* dbias_q = nullptr;
  acc_t* dbias_k = nullptr;
  int64_t total_k = 0;  // rows of dk / dv (B*Lk or total packed keys)
  float* delta = nullptr;
  float* dq_accum = nullptr;
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;
  float* dbias_k_accum = nullptr;
};
using BackwardParams = BackwardParamsT<float>;

}  // namespace difforge::attention
