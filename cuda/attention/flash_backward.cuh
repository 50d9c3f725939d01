// Flash attention backward on tensor cores (FA2 scheme, mma.sync m16n8k16, fp32 accumulation):
// one CTA per (block of kBlockN keys, query head, sequence); warp w owns keys [16w, 16w + 16) of
// the block. K and V stay in shared memory while the query blocks that see them stream through
// (Q, dO, lse, delta double-buffered with cp.async). Per query block, in the transposed
// orientation so that every warp's rows are its own keys:
//   S^T = K Q^T,  P^T = 2^(S^T - lse) (masked),  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),
//   dV += P^T dO,  dK += dS^T Q  (registers, written once at the end: scale * dK, dV),
//   dQ += scale * dS K          (dS through shared memory; fp32 atomics into dq_accum),
//   with a bias: dbias_q += dS bias_k (atomics), dbias_k += dS^T bias_q (shared, fixed order).
// dS is the logit gradient. dK / dV (/ dbias_k) are per query head partials (dk_accum, ...),
// summed over each kv head's group by the finishing kernel. Instantiated per dtype in
// flash_backward_<dtype>.cu. Math: difforge/attention.h.
#pragma once

#include "flash_common.cuh"
#include "flash_launch.h"

namespace difforge::attention::detail {

template <typename T, int D>
__global__ void __launch_bounds__(BackwardTiles::kThreads) flash_backward_mma_kernel(const BackwardParams p) {
  using B = BackwardTiles;
  constexpr int kBlockM = B::kBlockM, kBlockN = B::kBlockN, kThreads = B::kThreads, kWarps = B::kWarps;
  constexpr int kDsStride = BackwardSmem::kDsStride;
  extern __shared__ __align__(128) unsigned char smem[];
  const ForwardParams& f = p.fwd;
  const Problem& pr = f.problem;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int j0 = int(blockIdx.x) * kBlockN;
  const SequenceView seq = view_sequence(pr, b);
  if (j0 >= seq.k_stored) return;
  const int hkv = h / int(pr.group_size());
  const int rank = pr.bias_rank;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const int key0 = 16 * warp;  // this warp's first key in the block

  const BackwardSmem layout(D, rank);
  T* k_tile = reinterpret_cast<T*>(smem + layout.k);
  T* v_tile = reinterpret_cast<T*>(smem + layout.v);
  T* ds_tile = reinterpret_cast<T*>(smem + layout.ds);
  float* bias_k_t = reinterpret_cast<float*>(smem + layout.bias_k);
  float* ds_f32 = reinterpret_cast<float*>(smem + layout.ds_f32);
  float* dbias_k_sum = reinterpret_cast<float*>(smem + layout.dbias_k);

  // Keys [k_len, k_stored) (seqused_k tails) see nothing: their partials are written as 0. Causal:
  // query i sees key j iff j <= i + k_len - q_len, so the first query that sees key j0 is
  // j0 + q_len - k_len.
  const int keys = min(kBlockN, seq.k_len - j0);
  const int diag = seq.k_len - seq.q_len;
  int m_begin = 0, m_end = 0;
  if (keys > 0 && seq.q_len > 0) {
    m_begin = (pr.causal ? max(0, j0 - diag) : 0) / kBlockM;
    m_end = (seq.q_len + kBlockM - 1) / kBlockM;
  }

  const T* q = static_cast<const T*>(f.q) + f.q_strides.offset(b, seq.q_begin, h);
  const T* dout = static_cast<const T*>(p.dout) + p.dout_strides.offset(b, seq.q_begin, h);
  const float* lse = f.lse + pr.lse_index(b, h, 0);  // rows of (b, h) are contiguous in lse / delta
  const float* delta = p.delta + pr.lse_index(b, h, 0);

  auto load_query_block = [&](int mb, int stage) {
    const int m0 = mb * kBlockM, rows = min(kBlockM, seq.q_len - m0);
    T* q_dst = reinterpret_cast<T*>(smem + stage_offset(layout.q, stage));
    T* do_dst = reinterpret_cast<T*>(smem + stage_offset(layout.dout, stage));
    float* lse_dst = reinterpret_cast<float*>(smem + stage_offset(layout.lse, stage));
    float* delta_dst = reinterpret_cast<float*>(smem + stage_offset(layout.delta, stage));
    load_tile<kBlockM, D, kThreads>(q_dst, q + m0 * f.q_strides.row, f.q_strides.row, rows);
    load_tile<kBlockM, D, kThreads>(do_dst, dout + m0 * p.dout_strides.row, p.dout_strides.row, rows);
    for (int ii = int(threadIdx.x); ii < kBlockM; ii += kThreads) {
      const bool valid = ii < rows;
      cp_async_4(lse_dst + ii, valid ? lse + m0 + ii : lse, valid);
      cp_async_4(delta_dst + ii, valid ? delta + m0 + ii : delta, valid);
    }
    if (rank > 0) {
      float* bq_dst = reinterpret_cast<float*>(smem + stage_offset(layout.bias_q, stage));
      const float* bq = f.bias.q + ((seq.out_row0 + m0) * pr.heads_q + h) * rank;
      load_features_transposed<kBlockM, kThreads>(bq_dst, bq, pr.heads_q * rank, rank, rows);
    }
  };

  // dbias_k sums: entry idx is owned by thread idx % kThreads from here to the final store.
  for (int idx = int(threadIdx.x); idx < kBlockN * rank; idx += kThreads) dbias_k_sum[idx] = 0.f;
  if (m_begin < m_end) {
    const T* k = static_cast<const T*>(f.k) + f.k_strides.offset(b, seq.k_begin + j0, hkv);
    const T* v = static_cast<const T*>(f.v) + f.v_strides.offset(b, seq.k_begin + j0, hkv);
    load_tile<kBlockN, D, kThreads>(k_tile, k, f.k_strides.row, keys);
    load_tile<kBlockN, D, kThreads>(v_tile, v, f.v_strides.row, keys);
    if (rank > 0) {
      const float* bk = f.bias.k + ((seq.k_row0 + j0) * pr.heads_kv + hkv) * rank;
      load_features_transposed<kBlockN, kThreads>(bias_k_t, bk, pr.heads_kv * rank, rank, keys);
    }
    load_query_block(m_begin, 0);
  }
  cp_async_commit();

  const float scale_log2 = f.scale * kLog2e;
  FragC dk[D / 8], dv[D / 8];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    dk[n].zero();
    dv[n].zero();
  }

  for (int mb = m_begin; mb < m_end; ++mb) {
    const int stage = (mb - m_begin) & 1;
    if (mb + 1 < m_end) load_query_block(mb + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" == this block
    cp_async_wait<1>();
    __syncthreads();

    const int m0 = mb * kBlockM;
    const T* q_tile = reinterpret_cast<const T*>(smem + stage_offset(layout.q, stage));
    const T* do_tile = reinterpret_cast<const T*>(smem + stage_offset(layout.dout, stage));
    const float* lse_s = reinterpret_cast<const float*>(smem + stage_offset(layout.lse, stage));
    const float* delta_s = reinterpret_cast<const float*>(smem + stage_offset(layout.delta, stage));
    const float* bias_q_t = reinterpret_cast<const float*>(smem + stage_offset(layout.bias_q, stage));

    // P^T: fragment entry (n, half hf, e) is key jj = key0 + g + 8 hf, query ii = 8n + 2t + e.
    FragC st[kBlockM / 8];
    warp_gemm_nt<T, D, kBlockM>(st, k_tile, key0, q_tile, lane);  // S^T = K Q^T
#pragma unroll
    for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n].x[e] *= scale_log2;
    }
    if (rank > 0) add_logit_bias<kBlockN, kBlockM>(st, bias_k_t, bias_q_t, rank, key0, lane);
#pragma unroll
    for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ii = n * 8 + 2 * t + e, i = m0 + ii;
        const float row_lse = lse_s[ii];  // -inf: a query without visible keys, P = 0
        const bool query_live = i < seq.q_len && row_lse != neg_inf();
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int j = j0 + key0 + g + 8 * hf;
          const bool visible = query_live && j < seq.k_len && (!pr.causal || j - i <= diag);
          float& x = st[n].x[2 * hf + e];
          x = visible ? fast_exp2(x - row_lse * kLog2e) : 0.f;
        }
      }
    }

    // dS^T = P^T (dP^T - delta), computed in place of dP^T.
    FragC dst[kBlockM / 8];
    warp_gemm_nt<T, D, kBlockM>(dst, v_tile, key0, do_tile, lane);  // dP^T = V dO^T
#pragma unroll
    for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[n].x[e] = st[n].x[e] * (dst[n].x[e] - delta_s[n * 8 + 2 * t + e % 2]);
    }

    // dS (queries x keys) to shared memory for dQ = dS K (which sums over every warp's keys), and
    // in fp32 for the bias gradients.
#pragma unroll
    for (int n = 0; n < kBlockM / 8; ++n) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ii = n * 8 + 2 * t + e, jj = key0 + g + 8 * hf;
          ds_tile[swizzle<kBlockN>(ii, jj)] = from_float<T>(dst[n].x[2 * hf + e]);
          if (rank > 0) ds_f32[ii * kDsStride + jj] = dst[n].x[2 * hf + e];
        }
      }
    }

    FragA pa[kBlockM / 16], dsa[kBlockM / 16];
    a_fragments<T, kBlockM>(pa, st);
    a_fragments<T, kBlockM>(dsa, dst);
    warp_gemm_nn<T, kBlockM, D, D>(dv, pa, do_tile, 0, lane);  // dV += P^T dO
    warp_gemm_nn<T, kBlockM, D, D>(dk, dsa, q_tile, 0, lane);  // dK += dS^T Q
    __syncthreads();  // dS complete in shared memory

    // dQ[16 rows x kCols] += scale * dS K per warp, in 32-column slices (few live accumulators).
    {
      constexpr int kRowTiles = kBlockM / 16, kColSplit = kWarps / kRowTiles, kCols = D / kColSplit;
      static_assert(kWarps % kRowTiles == 0 && kCols % 32 == 0, "dQ warp tiling");
      const int qrow0 = 16 * (warp % kRowTiles), col_begin = (warp / kRowTiles) * kCols;
      FragA a[kBlockN / 16];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        ldmatrix_x4(a[kk].x, ds_tile + swizzle<kBlockN>(qrow0 + lane % 16, kk * 16 + (lane / 16) * 8));
      }
#pragma unroll
      for (int c0 = col_begin; c0 < col_begin + kCols; c0 += 32) {
        FragC dq[4];
#pragma unroll
        for (int n = 0; n < 4; ++n) dq[n].zero();
        warp_gemm_nn<T, kBlockN, 32, D>(dq, a, k_tile, c0, lane);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = m0 + qrow0 + g + 8 * hf;
          if (i >= seq.q_len) continue;
          float* row = p.dq_accum + ((seq.out_row0 + i) * pr.heads_q + h) * D + c0 + 2 * t;
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            atomicAdd(row + n * 8, f.scale * dq[n].x[2 * hf]);
            atomicAdd(row + n * 8 + 1, f.scale * dq[n].x[2 * hf + 1]);
          }
        }
      }
    }

    if (rank > 0) {
      // dbias_q[i, r] += sum_j dS[i, j] bias_k[j, r]  (other key blocks add to the same rows: atomics)
      float* dbq = p.dbias_q + ((seq.out_row0 + m0) * pr.heads_q + h) * rank;
      for (int idx = int(threadIdx.x); idx < kBlockM * rank; idx += kThreads) {
        const int ii = idx % kBlockM, r = idx / kBlockM;
        if (m0 + ii >= seq.q_len) continue;
        float sum = 0.f;
#pragma unroll 4  // dK and dV hold D registers here: a full unroll spills
        for (int jj = 0; jj < kBlockN; ++jj) sum += ds_f32[ii * kDsStride + jj] * bias_k_t[r * kBlockN + jj];
        atomicAdd(dbq + int64_t(ii) * pr.heads_q * rank + r, sum);
      }
      // dbias_k[j, r] += sum_i dS[i, j] bias_q[i, r]  (one owner per entry, query blocks in order)
      for (int idx = int(threadIdx.x); idx < kBlockN * rank; idx += kThreads) {
        const int jj = idx % kBlockN, r = idx / kBlockN;
        float sum = 0.f;
#pragma unroll 4
        for (int ii = 0; ii < kBlockM; ++ii) sum += ds_f32[ii * kDsStride + jj] * bias_q_t[r * kBlockM + ii];
        dbias_k_sum[idx] += sum;
      }
    }
    __syncthreads();  // stage and dS are free for the next block
  }
  cp_async_wait<0>();

  // Per-query-head partials of keys j0 + jj < k_stored (0 for keys that no query sees).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = j0 + key0 + g + 8 * hf;
    if (j >= seq.k_stored) continue;
    const int64_t row = ((seq.k_row0 + j) * pr.heads_q + h) * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<float2*>(p.dk_accum + row + n * 8) =
          make_float2(f.scale * dk[n].x[2 * hf], f.scale * dk[n].x[2 * hf + 1]);
      *reinterpret_cast<float2*>(p.dv_accum + row + n * 8) = make_float2(dv[n].x[2 * hf], dv[n].x[2 * hf + 1]);
    }
  }
  for (int idx = int(threadIdx.x); idx < kBlockN * rank; idx += kThreads) {
    const int jj = idx % kBlockN, r = idx / kBlockN;
    if (j0 + jj < seq.k_stored) {
      p.dbias_k_accum[((seq.k_row0 + j0 + jj) * pr.heads_q + h) * rank + r] = dbias_k_sum[idx];
    }
  }
}

template <DType DT, int D>
cudaError_t launch_backward_mma(const BackwardParams& p, cudaStream_t stream) {
  using T = elem_t<DT>;
  const Problem& pr = p.fwd.problem;
  const int bytes = BackwardSmem(D, pr.bias_rank).bytes;
  const auto kernel = flash_backward_mma_kernel<T, D>;
  cudaError_t err = allow_dynamic_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((pr.seqlen_k + BackwardTiles::kBlockN - 1) / BackwardTiles::kBlockN),
                  unsigned(pr.heads_q), unsigned(pr.batch));
  kernel<<<grid, BackwardTiles::kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace difforge::attention::detail
