// Flash attention forward on tensor cores (FA2 scheme, mma.sync m16n8k16, fp32 accumulation):
// one CTA per (block of kBlockM queries, query head, sequence); warp w owns query rows
// [16w, 16w + 16) of the block and streams the visible keys in tiles of kBlockN:
//   S = Q K^T (exp2 domain: scale * log2(e) folded in, + log2(e) * bias_q bias_k^T),
//   online softmax (running row max m and row sum l), O = O * 2^(m_old - m_new) + P V.
// K/V tiles are double-buffered in shared memory (cp.async: tile t + 1 loads while tile t
// computes); the causal / key-length mask is applied only on the tiles that cross the block's
// first row's key_end, and tiles past the last row's key_end are never loaded.
// Instantiated per dtype in flash_forward_<dtype>.cu. Math: difforge/attention.h.
#pragma once

#include "flash_common.cuh"
#include "flash_launch.h"

namespace difforge::attention::detail {

// Online softmax over one tile for this thread's two rows (h = 0: row g, h = 1: row g + 8):
// s (exp2-domain logits, -inf where masked) becomes P = 2^(s - m_new) in place, the row sums and
// O are rescaled by 2^(m_old - m_new). Each row is spread over the 4 lanes of a group: the max is
// reduced over them, the sums stay per lane until the end (their rescale factors agree).
template <int D, int kBlockN>
__device__ __forceinline__ void online_softmax_update(FragC (&s)[kBlockN / 8], float (&row_max)[2],
                                                      float (&row_sum)[2], FragC (&o)[D / 8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = row_max[h];
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) m = fmaxf(m, fmaxf(s[n].x[2 * h], s[n].x[2 * h + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    // A row that has seen only masked logits keeps max -inf: subtract 0 (its weights are 2^-inf = 0).
    const float ref = m == neg_inf() ? 0.f : m;
    const float rescale = fast_exp2(row_max[h] - ref);
    row_max[h] = m;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
      s[n].x[2 * h] = fast_exp2(s[n].x[2 * h] - ref);
      s[n].x[2 * h + 1] = fast_exp2(s[n].x[2 * h + 1] - ref);
      sum += s[n].x[2 * h] + s[n].x[2 * h + 1];
    }
    row_sum[h] = row_sum[h] * rescale + sum;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n].x[2 * h] *= rescale;
      o[n].x[2 * h + 1] *= rescale;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(ForwardTiles::kThreads) flash_forward_mma_kernel(const ForwardParams p) {
  using F = ForwardTiles;
  constexpr int kBlockM = F::kBlockM, kBlockN = F::kBlockN, kThreads = F::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  const Problem& pr = p.problem;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  // The last query blocks see the most keys under a causal mask: schedule them first.
  const int m0 = int(gridDim.x - 1 - blockIdx.x) * kBlockM;
  const SequenceView seq = view_sequence(pr, b);
  if (m0 >= seq.q_len) return;
  const int hkv = h / int(pr.group_size());
  const int rank = pr.bias_rank;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = 16 * warp;  // this warp's first row in the block

  const ForwardSmem layout(D, rank);
  T* q_tile = reinterpret_cast<T*>(smem + layout.q);
  float* bias_q_t = reinterpret_cast<float*>(smem + layout.bias_q);

  const int rows = min(kBlockM, seq.q_len - m0);
  // Keys seen by the block's last row (the most) and by its first row (seen by every row).
  const int n_keys = visible_key_end(m0 + rows - 1, seq.q_len, seq.k_len, pr.causal);
  const int unmasked_keys = visible_key_end(m0, seq.q_len, seq.k_len, pr.causal);
  const int n_tiles = (n_keys + kBlockN - 1) / kBlockN;

  const T* q = static_cast<const T*>(p.q) + p.q_strides.offset(b, seq.q_begin + m0, h);
  const T* k = static_cast<const T*>(p.k) + p.k_strides.offset(b, seq.k_begin, hkv);
  const T* v = static_cast<const T*>(p.v) + p.v_strides.offset(b, seq.k_begin, hkv);

  auto load_kv = [&](int tile, int stage) {
    const int j0 = tile * kBlockN, valid = min(kBlockN, seq.k_len - j0);
    T* k_dst = reinterpret_cast<T*>(smem + stage_offset(layout.k, stage));
    T* v_dst = reinterpret_cast<T*>(smem + stage_offset(layout.v, stage));
    load_tile<kBlockN, D, kThreads>(k_dst, k + j0 * p.k_strides.row, p.k_strides.row, valid);
    load_tile<kBlockN, D, kThreads>(v_dst, v + j0 * p.v_strides.row, p.v_strides.row, valid);
    if (rank > 0) {
      float* bk_dst = reinterpret_cast<float*>(smem + stage_offset(layout.bias_k, stage));
      const float* bk = p.bias.k + ((seq.k_row0 + j0) * pr.heads_kv + hkv) * rank;
      load_features_transposed<kBlockN, kThreads>(bk_dst, bk, pr.heads_kv * rank, rank, valid);
    }
  };

  load_tile<kBlockM, D, kThreads>(q_tile, q, p.q_strides.row, rows);
  if (rank > 0) {
    const float* bq = p.bias.q + ((seq.out_row0 + m0) * pr.heads_q + h) * rank;
    load_features_transposed<kBlockM, kThreads>(bias_q_t, bq, pr.heads_q * rank, rank, rows);
  }
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f};
  FragC o[D / 8];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n].zero();

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) load_kv(tile + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" == this tile
    cp_async_wait<1>();
    __syncthreads();

    const T* k_tile = reinterpret_cast<const T*>(smem + stage_offset(layout.k, stage));
    const T* v_tile = reinterpret_cast<const T*>(smem + stage_offset(layout.v, stage));
    const float* bias_k_t = reinterpret_cast<const float*>(smem + stage_offset(layout.bias_k, stage));
    FragC s[kBlockN / 8];
    warp_gemm_nt<T, D, kBlockN>(s, q_tile, row0, k_tile, lane);  // S = Q K^T
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n].x[e] *= scale_log2;
    }
    if (rank > 0) add_logit_bias<kBlockM, kBlockN>(s, bias_q_t, bias_k_t, rank, row0, lane);
    const int j0 = tile * kBlockN;
    if (j0 + kBlockN > unmasked_keys) {  // the tile crosses some row's key_end (causal diagonal, k_len)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int end = visible_key_end(m0 + row0 + g + 8 * hf, seq.q_len, seq.k_len, pr.causal) - j0;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (n * 8 + 2 * t + e >= end) s[n].x[2 * hf + e] = neg_inf();
          }
        }
      }
    }
    online_softmax_update<D, kBlockN>(s, row_max, row_sum, o);
    FragA pa[kBlockN / 16];
    a_fragments<T, kBlockN>(pa, s);
    warp_gemm_nn<T, kBlockN, D, D>(o, pa, v_tile, 0, lane);  // O += P V
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
  // The Q tile is rewritten below: every thread's copies into it must have landed (without a
  // visible key the loop, and its barriers, never ran).
  cp_async_wait<0>();
  __syncthreads();

  // Normalize and write: O rows go through this warp's own Q rows in shared memory (no other warp
  // reads them), then out in 16-byte stores. Rows without a visible key: out 0, lse -inf.
  float inv[2], lse[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = row_sum[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[hf] = l > 0.f ? 1.f / l : 0.f;
    lse[hf] = l > 0.f ? row_max[hf] * kLn2 + logf(l) : neg_inf();
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      *reinterpret_cast<uint32_t*>(q_tile + swizzle<D>(row0 + g + 8 * hf, n * 8 + 2 * t)) =
          pack_two<T>(o[n].x[2 * hf] * inv[hf], o[n].x[2 * hf + 1] * inv[hf]);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out);
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int k2 = 0; k2 < 16 * kChunks / 32; ++k2) {
    const int idx = lane + 32 * k2;
    const int r = idx / kChunks, c = idx % kChunks;
    const int i = m0 + row0 + r;
    if (i < seq.q_len) {
      *reinterpret_cast<uint4*>(out + ((seq.out_row0 + i) * pr.heads_q + h) * D + c * 8) =
          *reinterpret_cast<const uint4*>(q_tile + swizzle<D>(row0 + r, c * 8));
    }
  }
  if (t == 0) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = m0 + row0 + g + 8 * hf;
      if (i < seq.q_len) p.lse[pr.lse_index(b, h, i)] = lse[hf];
    }
  }
}

template <DType DT, int D>
cudaError_t launch_forward_mma(const ForwardParams& p, cudaStream_t stream) {
  using T = elem_t<DT>;
  const Problem& pr = p.problem;
  const int bytes = ForwardSmem(D, pr.bias_rank).bytes;
  const auto kernel = flash_forward_mma_kernel<T, D>;
  cudaError_t err = allow_dynamic_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((pr.seqlen_q + ForwardTiles::kBlockM - 1) / ForwardTiles::kBlockM), unsigned(pr.heads_q),
                  unsigned(pr.batch));
  kernel<<<grid, ForwardTiles::kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace difforge::attention::detail
