// Backward pass 1 of the fused adaLN norm-modulate (spec §2): per row, recompute xh and n from
// x, mean and rstd, write dx (and d_o), and add the column gradients into fp32 partial sums.
// One row group owns one block of ReductionPlan and walks its rows in order, each thread
// accumulating its own columns, and writes a slot of partials when a segment ends (modulation
// gradients) and when the block ends (affine gradients): a fixed summation order, no atomics.
// Instantiated per x dtype in adaln_backward_<dtype>.cu.
#pragma once

#include <type_traits>

#include "adaln_kernels.cuh"
#include "adaln_launch.h"

namespace difforge::norm::detail {

// Which column reductions a launch produces: each one's row in the per-thread accumulators (-1:
// absent, neither computed nor written), and where pass 1 writes the modulation quantities.
struct GradSlots {
  int mod[kNumModGrads] = {-1, -1, -1};     // indexed by ModGrad
  int affine[kNumAffineGrads] = {-1, -1};   // indexed by AffineGrad
  int count = 0;
  float* mod_dst[kNumModGrads] = {};        // mod_partials[q], or mod_grads[q] when plan.direct()
};

inline GradSlots grad_slots(const BackwardParams& p, const ReductionPlan& plan) {
  GradSlots q;
  const bool mod_wanted[kNumModGrads] = {p.scale.present(), p.shift.present(), p.o != nullptr && p.gate.present()};
  const bool affine_wanted[kNumAffineGrads] = {p.weight != nullptr, p.bias != nullptr};
  for (int i = 0; i < kNumModGrads; ++i) {
    if (!mod_wanted[i]) continue;
    q.mod[i] = q.count++;
    q.mod_dst[i] = plan.direct() && p.mod_grads[i] != nullptr ? p.mod_grads[i] : p.mod_partials[i];
  }
  for (int i = 0; i < kNumAffineGrads; ++i) {
    if (affine_wanted[i]) q.affine[i] = q.count++;
  }
  return q;
}

// Shared memory holding each thread's column partials. Word w of pack k of quantity qi of lane l
// of warp v is at ((qi*nwarps + v)*NV*kCount + k*kCount + w)*32 + l: a warp's accesses are 32
// consecutive words (no bank conflicts), and a thread reaches all its words of one quantity from
// one base register with compile-time offsets. Only the owning thread ever touches its words, so
// no barriers are needed.
template <int V, int NV>
struct SmemPartials {
  using Words = PackWords<V>;
  using Word = std::conditional_t<Words::kCols == 4, float4, float>;
  static constexpr int kPerThread = NV * Words::kCount;  // words per quantity and thread

  Word* base;        // this thread's word 0 of quantity 0
  int quantity_stride;  // words between quantities: blockDim.x * kPerThread

  __device__ __forceinline__ static SmemPartials make(void* smem) {
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
    return {static_cast<Word*>(smem) + warp * kPerThread * 32 + lane, int(blockDim.x) * kPerThread};
  }
  __device__ __forceinline__ Word& at(int qi, int k, int w) const {
    return base[qi * quantity_stride + (k * Words::kCount + w) * 32];
  }
  __device__ __forceinline__ void add(int qi, int k, int w, const float (&v)[Words::kCols]) const {
    Word& a = at(qi, k, w);
    if constexpr (Words::kCols == 4) {
      a.x += v[0];
      a.y += v[1];
      a.z += v[2];
      a.w += v[3];
    } else {
      a += v[0];
    }
  }
  __device__ __forceinline__ void zero(int qi, int k) const {
#pragma unroll
    for (int w = 0; w < Words::kCount; ++w) {
      if constexpr (Words::kCols == 4) {
        at(qi, k, w) = make_float4(0.f, 0.f, 0.f, 0.f);
      } else {
        at(qi, k, w) = 0.f;
      }
    }
  }
  // Writes pack k of quantity qi to dst (its V columns) and restarts it at zero.
  __device__ __forceinline__ void flush(int qi, int k, float* dst) const {
#pragma unroll
    for (int w = 0; w < Words::kCount; ++w) reinterpret_cast<Word*>(dst)[w] = at(qi, k, w);
    zero(qi, k);
  }
  // Writes this thread's packs of quantity qi into the [dim] row dst.
  __device__ __forceinline__ void flush_row(int qi, float* dst, int lane, int tpr, int nvec) const {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int j = lane + k * tpr;
      if (j < nvec) flush(qi, k, dst + j * V);
    }
  }
};

// Static shared memory of the backward kernels besides the partials (row_sum scratch).
constexpr int kBackwardStaticSmem = 2 * 2 * 32 * int(sizeof(float));

// Register-resident rows: each thread holds NV packs of x and dy (as x_dtype) of the current row.
// OT: dtype of the gated branch o (dx_out, d_o and the gate gradient exist); void when not gated.
template <typename T, int V, int NV, typename OT>
__global__ void __launch_bounds__(kMaxRowThreads, row_kernel_min_ctas(NV * V * int(sizeof(T)), true))
    adaln_backward_kernel(const BackwardParams p, const ReductionPlan plan, const ModIndexer ix, const GradSlots q,
                          const float inv_dim, const int tpr) {
  constexpr bool kGated = !std::is_void_v<OT>;
  using OPack = Pack<std::conditional_t<kGated, OT, T>, V>;
  using Words = PackWords<V>;
  constexpr int E = Words::kCols;
  extern __shared__ float4 dyn_smem[];
  __shared__ float scratch[2 * 2 * 32];
  const RowGroup g = make_row_group(tpr);
  const SmemPartials<V, NV> acc = SmemPartials<V, NV>::make(dyn_smem);
  const int nvec = int(p.dim / V);
  const bool layer = p.norm == NormKind::layer;
  const int64_t num_blocks = plan.num_blocks();
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dx_out = static_cast<const T*>(p.dx_out);
  T* dx = static_cast<T*>(p.dx);
  // beta only enters through n = xh*gamma + beta, which only the scale gradient needs.
  const float* bias_for_n = q.mod[kGradScale] >= 0 ? p.bias : nullptr;
  int phase = 0;

  for (int qi = 0; qi < q.count; ++qi) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (g.lane + k * tpr < nvec) acc.zero(qi, k);
    }
  }

  for (int64_t blk = int64_t(blockIdx.x) * g.groups + g.group; blk < num_blocks;
       blk += int64_t(gridDim.x) * g.groups) {  // block mode: one group, so the exit is CTA-uniform
    const int64_t seg_first = plan.first_segment(blk), seg_last = plan.last_segment(blk);
    const int64_t chunk = plan.chunk(blk);
    for (int64_t s = seg_first; s < seg_last; ++s) {
      const int64_t r0 = plan.segment_rows_begin(blk, s), r1 = plan.segment_rows_end(blk, s);
      const int64_t m = ix.mod_row_of_segment(s);
      const float* scale_row = ix.row(p.scale, m);
      const float* gate_row = ix.row(p.gate, m);

      for (int64_t r = r0; r < r1; ++r) {
        const float* scale = scale_row;
        const float* gate = gate_row;
        const float* weight = p.weight;
        const float* bias = bias_for_n;
        const int64_t base = r * p.dim;
        const RowStats st{layer && p.mean != nullptr ? p.mean[r] : 0.f, p.rstd[r]};
        Pack<T, V> xr[NV], dyr[NV];
        load_row<T, V, NV>(x + base, g.lane, tpr, nvec, xr);
        load_row<T, V, NV>(dy + base, g.lane, tpr, nvec, dyr);

        // Row sums, and every column gradient that does not need them.
        float sums[2] = {0.f, 0.f};  // sum dxh, sum dxh*xh
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int j = g.lane + k * tpr;
          if (j >= nvec) continue;
#pragma unroll
          for (int w = 0; w < Words::kCount; ++w) {
            const int col = j * V + w * E;
            float sc[E], wt[E], b[E], d_scale[E], d_shift[E], d_weight[E], d_bias[E];
            load_param<E>(scale, col, 0.f, sc);
            load_param<E>(weight, col, 1.f, wt);
            load_param<E>(bias, col, 0.f, b);
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const float xh = normalize(pack_get(xr[k], w * E + e), st, p.norm);
              const float dyv = pack_get(dyr[k], w * E + e);
              const float dn = dyv * (1.f + sc[e]);
              const float dxh = dn * wt[e];
              sums[0] += dxh;
              sums[1] += dxh * xh;
              d_scale[e] = dyv * (xh * wt[e] + b[e]);
              d_shift[e] = dyv;
              d_weight[e] = dn * xh;
              d_bias[e] = dn;
            }
            if (q.mod[kGradScale] >= 0) acc.add(q.mod[kGradScale], k, w, d_scale);
            if (q.mod[kGradShift] >= 0) acc.add(q.mod[kGradShift], k, w, d_shift);
            if (q.affine[kGradWeight] >= 0) acc.add(q.affine[kGradWeight], k, w, d_weight);
            if (q.affine[kGradBias] >= 0) acc.add(q.affine[kGradBias], k, w, d_bias);
          }
        }

        // Issued before the reduction's barrier so that their latency overlaps it.
        Pack<T, V> dxo[NV];
        OPack ov[NV];
        if constexpr (kGated) {
          if (dx_out != nullptr) load_row<T, V, NV>(dx_out + base, g.lane, tpr, nvec, dxo);
          if (q.mod[kGradGate] >= 0) load_row<OT, V, NV>(static_cast<const OT*>(p.o) + base, g.lane, tpr, nvec, ov);
        }

        row_sum<2>(sums, g, scratch, phase);
        const float mean_dxh = sums[0] * inv_dim, mean_dxh_xh = sums[1] * inv_dim;

#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int j = g.lane + k * tpr;
          if (j >= nvec) continue;
          float dhn[V];
#pragma unroll
          for (int w = 0; w < Words::kCount; ++w) {
            // Recomputed rather than kept: halves the registers a row needs.
            const int col = j * V + w * E;
            float sc[E], wt[E];
            load_param<E>(scale, col, 0.f, sc);
            load_param<E>(weight, col, 1.f, wt);
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const int i = w * E + e;
              const float xh = normalize(pack_get(xr[k], i), st, p.norm);
              const float dxh = pack_get(dyr[k], i) * (1.f + sc[e]) * wt[e];
              dhn[i] = input_grad(dxh, xh, st.rstd, mean_dxh, mean_dxh_xh, p.norm);
              if constexpr (kGated) {
                if (dx_out != nullptr) dhn[i] += pack_get(dxo[k], i);
              }
            }
            if (kGated && q.mod[kGradGate] >= 0) {
              float d_gate[E];
#pragma unroll
              for (int e = 0; e < E; ++e) d_gate[e] = dhn[w * E + e] * pack_get(ov[k], w * E + e);
              acc.add(q.mod[kGradGate], k, w, d_gate);
            }
          }
          store_floats<T, V>(dx + base + j * V, dhn);
          if constexpr (kGated) {
            if (p.d_o != nullptr) {
#pragma unroll
              for (int w = 0; w < Words::kCount; ++w) {
                float gv[E];
                load_param<E>(gate, j * V + w * E, 1.f, gv);
#pragma unroll
                for (int e = 0; e < E; ++e) dhn[w * E + e] *= gv[e];
              }
              store_floats<OT, V>(static_cast<OT*>(p.d_o) + base + j * V, dhn);
            }
          }
        }
      }

      // The segment's slot, written even when this block held none of its rows (zeros).
      const int64_t slot = plan.slot(s, chunk);
#pragma unroll
      for (int gq = 0; gq < kNumModGrads; ++gq) {
        if (q.mod[gq] < 0) continue;
        acc.flush_row(q.mod[gq], q.mod_dst[gq] + slot * p.dim, g.lane, tpr, nvec);
      }
    }

#pragma unroll
    for (int gq = 0; gq < kNumAffineGrads; ++gq) {
      if (q.affine[gq] < 0) continue;
      acc.flush_row(q.affine[gq], p.affine_partials[gq] + blk * p.dim, g.lane, tpr, nvec);
    }
  }
}

// Second half of a streamed row: dx, d_o and the gate gradient, with o of dtype OT.
template <typename T, typename OT, int V>
__device__ __forceinline__ void stream_backward_outputs(const BackwardParams& p, const RowStats& st, float mean_dxh,
                                                        float mean_dxh_xh, const float* scale, const float* gate,
                                                        int64_t base, float* d_gate) {
  const bool gated = p.o != nullptr;  // dx_out and d_o exist only with o (as in the register kernel)
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dx_out = gated ? static_cast<const T*>(p.dx_out) : nullptr;
  const OT* o = static_cast<const OT*>(p.o);
  T* dx = static_cast<T*>(p.dx);
  OT* d_o = gated ? static_cast<OT*>(p.d_o) : nullptr;
  const int64_t nvec = p.dim / V;
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const int64_t col = j * V;
    float xv[V], dyv[V], sc[V], w[V], dhn[V];
    load_floats<T, V>(x + base + col, xv);
    load_floats<T, V>(dy + base + col, dyv);
    load_param<V>(scale, col, 0.f, sc);
    load_param<V>(p.weight, col, 1.f, w);
    if (dx_out != nullptr) {
      load_floats<T, V>(dx_out + base + col, dhn);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) dhn[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float xh = normalize(xv[i], st, p.norm);
      const float dxh = dyv[i] * (1.f + sc[i]) * w[i];
      dhn[i] = input_grad(dxh, xh, st.rstd, mean_dxh, mean_dxh_xh, p.norm) + dhn[i];
    }
    store_floats<T, V>(dx + base + col, dhn);
    if (d_o != nullptr) {
      float gv[V], dov[V];
      load_param<V>(gate, col, 1.f, gv);
#pragma unroll
      for (int i = 0; i < V; ++i) dov[i] = dhn[i] * gv[i];
      store_floats<OT, V>(d_o + base + col, dov);
    }
    if (d_gate != nullptr) {
      float ov[V];
      load_floats<OT, V>(o + base + col, ov);
#pragma unroll
      for (int i = 0; i < V; ++i) ov[i] *= dhn[i];
      add_floats<V>(d_gate + col, ov);
    }
  }
}

// Rows too long for registers / shared memory: the same walk over a block's rows, each row read
// twice (the second time from L2), the partials accumulated in place in their global slots by
// the thread that owns the columns (same summation order as the register kernel).
template <typename T, int V>
__global__ void __launch_bounds__(kStreamThreads)
    adaln_backward_stream_kernel(const BackwardParams p, const ReductionPlan plan, const ModIndexer ix,
                                 const GradSlots q, const float inv_dim) {
  __shared__ float scratch[2 * 2 * 32];
  const RowGroup g = make_row_group(int(blockDim.x));
  const int64_t nvec = p.dim / V;
  const bool layer = p.norm == NormKind::layer;
  const int64_t num_slots = plan.num_slots(), num_blocks = plan.num_blocks();
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const float* bias_for_n = q.mod[kGradScale] >= 0 ? p.bias : nullptr;
  int phase = 0;

  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    float* d_weight = q.affine[kGradWeight] >= 0 ? p.affine_partials[kGradWeight] + blk * p.dim : nullptr;
    float* d_bias = q.affine[kGradBias] >= 0 ? p.affine_partials[kGradBias] + blk * p.dim : nullptr;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      if (d_weight != nullptr) zero_floats<V>(d_weight + j * V);
      if (d_bias != nullptr) zero_floats<V>(d_bias + j * V);
    }
    const int64_t seg_first = plan.first_segment(blk), seg_last = plan.last_segment(blk);
    const int64_t chunk = plan.chunk(blk);
    for (int64_t s = seg_first; s < seg_last; ++s) {
      const int64_t r0 = plan.segment_rows_begin(blk, s), r1 = plan.segment_rows_end(blk, s);
      const int64_t m = ix.mod_row_of_segment(s);
      const float* scale = ix.row(p.scale, m);
      const float* gate = ix.row(p.gate, m);
      const int64_t slot_offset = plan.slot(s, chunk) * p.dim;
      float* d_scale = q.mod[kGradScale] >= 0 ? q.mod_dst[kGradScale] + slot_offset : nullptr;
      float* d_shift = q.mod[kGradShift] >= 0 ? q.mod_dst[kGradShift] + slot_offset : nullptr;
      float* d_gate = q.mod[kGradGate] >= 0 ? q.mod_dst[kGradGate] + slot_offset : nullptr;
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        if (d_scale != nullptr) zero_floats<V>(d_scale + j * V);
        if (d_shift != nullptr) zero_floats<V>(d_shift + j * V);
        if (d_gate != nullptr) zero_floats<V>(d_gate + j * V);
      }

      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * p.dim;
        const RowStats st{layer && p.mean != nullptr ? p.mean[r] : 0.f, p.rstd[r]};
        float sums[2] = {0.f, 0.f};
        for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
          const int64_t col = j * V;
          float xv[V], dyv[V], sc[V], w[V], b[V], d_a[V], d_b[V];
          load_floats<T, V>(x + base + col, xv);
          load_floats<T, V>(dy + base + col, dyv);
          load_param<V>(scale, col, 0.f, sc);
          load_param<V>(p.weight, col, 1.f, w);
          load_param<V>(bias_for_n, col, 0.f, b);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const float xh = normalize(xv[i], st, p.norm);
            const float dn = dyv[i] * (1.f + sc[i]);
            const float dxh = dn * w[i];
            sums[0] += dxh;
            sums[1] += dxh * xh;
            d_a[i] = dyv[i] * (xh * w[i] + b[i]);  // scale gradient
            d_b[i] = dn * xh;                      // weight gradient
            xv[i] = dn;                            // bias gradient
          }
          if (d_scale != nullptr) add_floats<V>(d_scale + col, d_a);
          if (d_shift != nullptr) add_floats<V>(d_shift + col, dyv);
          if (d_weight != nullptr) add_floats<V>(d_weight + col, d_b);
          if (d_bias != nullptr) add_floats<V>(d_bias + col, xv);
        }
        row_sum<2>(sums, g, scratch, phase);
        const float mean_dxh = sums[0] * inv_dim, mean_dxh_xh = sums[1] * inv_dim;
        switch (p.o_dtype) {
          case DType::f16:
            stream_backward_outputs<T, __half, V>(p, st, mean_dxh, mean_dxh_xh, scale, gate, base, d_gate);
            break;
          case DType::bf16:
            stream_backward_outputs<T, __nv_bfloat16, V>(p, st, mean_dxh, mean_dxh_xh, scale, gate, base, d_gate);
            break;
          default:
            stream_backward_outputs<T, float, V>(p, st, mean_dxh, mean_dxh_xh, scale, gate, base, d_gate);
            break;
        }
      }
    }
  }
}

inline bool backward_vectorizable(const BackwardParams& p, int v) {
  const int64_t xa = pack_alignment(p.x_dtype, v), oa = pack_alignment(p.o_dtype, v);
  bool ok = p.dim % v == 0 && is_aligned(p.x, xa) && is_aligned(p.dy, xa) && is_aligned(p.dx_out, xa) &&
            is_aligned(p.dx, xa) && is_aligned(p.o, oa) && is_aligned(p.d_o, oa) && is_aligned(p.weight, 16) &&
            is_aligned(p.bias, 16) && mod_aligned(p.gate) && mod_aligned(p.scale) && mod_aligned(p.shift);
  for (int i = 0; i < kNumModGrads; ++i) ok = ok && is_aligned(p.mod_partials[i], 16) && is_aligned(p.mod_grads[i], 16);
  for (int i = 0; i < kNumAffineGrads; ++i) ok = ok && is_aligned(p.affine_partials[i], 16);
  return ok;
}

template <typename T, int V, int NV, typename OT>
cudaError_t launch_backward_kernel(const BackwardParams& p, const ReductionPlan& plan, const GradSlots& q,
                                   const RowConfig& c, int smem_bytes, cudaStream_t stream) {
  const auto kernel = adaln_backward_kernel<T, V, NV, OT>;
  cudaError_t err = cudaSuccess;
  if (smem_bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  if (smem_bytes > 0) {
    // Ask for just the shared memory the achievable occupancy needs; the rest stays L1, which
    // serves the modulation / affine rows that every row re-reads. The occupancy is queried with
    // the largest carveout, not with the one an earlier launch of this kernel left set.
    int ctas = 0, smem_per_sm = 0;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, c.threads, smem_bytes);
    if (err == cudaSuccess) err = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, &smem_per_sm);
    if (err != cudaSuccess) return err;
    constexpr int kReservedPerCta = 1024;  // the driver's per-CTA reservation
    const int64_t need = int64_t(ctas > 1 ? ctas : 1) * (smem_bytes + kBackwardStaticSmem + kReservedPerCta);
    const int64_t pct = smem_per_sm > 0 ? ceil_div(100 * need, smem_per_sm) : 100;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(pct < 100 ? pct : 100));
    if (err != cudaSuccess) return err;
  }
  const int groups_per_cta = c.tpr <= 32 ? c.threads / c.tpr : 1;
  kernel<<<grid_for(ceil_div(plan.num_blocks(), groups_per_cta)), c.threads, smem_bytes, stream>>>(
      p, plan, make_mod_indexer(p.layout), q, 1.0f / float(p.dim), c.tpr);
  return cudaGetLastError();
}

template <typename T, int V, int NV>
cudaError_t launch_backward_registers(const BackwardParams& p, const ReductionPlan& plan, const GradSlots& q,
                                      const RowConfig& c, int smem_bytes, cudaStream_t stream) {
  if (p.o == nullptr) return launch_backward_kernel<T, V, NV, void>(p, plan, q, c, smem_bytes, stream);
  switch (p.o_dtype) {
    case DType::f16: return launch_backward_kernel<T, V, NV, __half>(p, plan, q, c, smem_bytes, stream);
    case DType::bf16: return launch_backward_kernel<T, V, NV, __nv_bfloat16>(p, plan, q, c, smem_bytes, stream);
    default: return launch_backward_kernel<T, V, NV, float>(p, plan, q, c, smem_bytes, stream);
  }
}

template <typename T, int V>
cudaError_t launch_backward_packs(const BackwardParams& p, const ReductionPlan& plan, cudaStream_t stream) {
  // Packs per thread: <= 128 bytes of each of x, dy (and dx_out, o) held in registers; longer
  // rows spill, and are streamed instead.
  constexpr int kMaxNv = V == 1 ? 8 : 128 / (V * int(sizeof(T)));
  const GradSlots q = grad_slots(p, plan);
  RowConfig c = choose_row_config(p.dim / V, kMaxNv);
  int smem_bytes = 0;
  if (c.nv != 0) {
    int optin = 0;
    const cudaError_t err = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin);
    if (err != cudaSuccess) return err;
    const int64_t bytes = int64_t(q.count) * c.nv * V * c.threads * int64_t(sizeof(float));
    if (bytes + kBackwardStaticSmem > optin) {
      c = RowConfig{};  // too many partials for shared memory: stream
    } else {
      smem_bytes = int(bytes);
    }
  }
  switch (c.nv) {
    case 1: return launch_backward_registers<T, V, 1>(p, plan, q, c, smem_bytes, stream);
    case 2: return launch_backward_registers<T, V, 2>(p, plan, q, c, smem_bytes, stream);
    case 4: return launch_backward_registers<T, V, 4>(p, plan, q, c, smem_bytes, stream);
    case 8: return launch_backward_registers<T, V, 8>(p, plan, q, c, smem_bytes, stream);
    case 16:
      if constexpr (kMaxNv >= 16) return launch_backward_registers<T, V, 16>(p, plan, q, c, smem_bytes, stream);
      break;
    default: break;
  }
  adaln_backward_stream_kernel<T, V><<<grid_for(plan.num_blocks()), kStreamThreads, 0, stream>>>(
      p, plan, make_mod_indexer(p.layout), q, 1.0f / float(p.dim));
  return cudaGetLastError();
}

template <DType X>
cudaError_t launch_backward_rows(const BackwardParams& p, const ReductionPlan& plan, cudaStream_t stream) {
  using T = elem_t<X>;
  constexpr int kVec = 16 / int(sizeof(T));
  if (backward_vectorizable(p, kVec)) return launch_backward_packs<T, kVec>(p, plan, stream);
  return launch_backward_packs<T, 1>(p, plan, stream);
}

}  // namespace difforge::norm::detail
