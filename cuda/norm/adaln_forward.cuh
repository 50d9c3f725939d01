// Forward kernels of the fused adaLN norm-modulate (spec/adaln_norm_and_load_balance.md §1):
//   x = h + g*o (gated; written to x_out, rounded to x_dtype) | h ;  statistics in fp32 ;
//   y = (normalize(x) * weight + bias) * (1 + scale_m) + shift_m.
// A row is read once and written once: it stays in registers between the statistics and the
// output (adaln_forward_kernel), unless D is too large, then it is re-read from L2
// (adaln_forward_stream_kernel). Instantiated per x dtype in adaln_forward_<dtype>.cu.
#pragma once

#include "adaln_kernels.cuh"
#include "adaln_launch.h"

namespace difforge::norm::detail {

// 1 / sqrt(mean square + eps), correctly rounded (<= 1 ulp from the CPU's 1 / std::sqrt). The
// divisions by D are multiplications by inv_dim = 1/D: IEEE div and sqrt would each add a
// slow-path subroutine call, and with it register spills, to the row loop.
__device__ __forceinline__ float rstd_from(float sum_sq, float inv_dim, float eps) {
  return __frsqrt_rn(sum_sq * inv_dim + eps);
}

// One row per group of tpr threads; each thread keeps NV packs of V elements of x in registers,
// as x_dtype (x is exactly representable: it is h, or x_out rounded to x_dtype).
// OT: dtype of the gated branch o; void when not gated.
template <typename T, int V, int NV, typename OT>
__global__ void __launch_bounds__(kMaxRowThreads, row_kernel_min_ctas(NV * V * int(sizeof(T)), !std::is_void_v<OT>))
    adaln_forward_kernel(const ForwardParams p, const ModIndexer ix, const float inv_dim, const int tpr) {
  using Words = PackWords<V>;
  __shared__ float scratch[2 * 32];
  const RowGroup g = make_row_group(tpr);
  const int64_t rows = p.layout.rows;
  const int nvec = int(p.dim / V);
  const bool layer = p.norm == NormKind::layer;
  const bool modulated = p.gate.present() || p.scale.present() || p.shift.present();
  const T* h = static_cast<const T*>(p.h);
  T* x_out = static_cast<T*>(p.x_out);
  T* y = static_cast<T*>(p.y);
  int phase = 0;

  for (int64_t first = int64_t(blockIdx.x) * g.groups; first < rows; first += int64_t(gridDim.x) * g.groups) {
    const int64_t row = first + g.group;
    if (row >= rows) break;  // group mode only (block mode has one group): no barrier is skipped
    const int64_t m = modulated ? ix.mod_row(row) : 0;
    const int64_t base = row * p.dim;

    Pack<T, V> xr[NV];
    load_row<T, V, NV>(h + base, g.lane, tpr, nvec, xr);
    if constexpr (!std::is_void_v<OT>) {
      Pack<OT, V> ov[NV];
      load_row<OT, V, NV>(static_cast<const OT*>(p.o) + base, g.lane, tpr, nvec, ov);
      const float* gate = ix.row(p.gate, m);
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int j = g.lane + k * tpr;
        if (j >= nvec) continue;
        float xv[V];
#pragma unroll
        for (int w = 0; w < Words::kCount; ++w) {
          float gv[Words::kCols];
          load_param<Words::kCols>(gate, j * V + w * Words::kCols, 1.f, gv);
#pragma unroll
          for (int e = 0; e < Words::kCols; ++e) {
            const int i = w * Words::kCols + e;
            xv[i] = pack_get(xr[k], i) + gv[e] * pack_get(ov[k], i);
          }
        }
        xr[k] = pack_floats<T, V>(xv);  // rounded to x_dtype: the x that is stored is the x normalized
        store_pack<T, V>(x_out + base + j * V, xr[k]);
      }
    }

    // Two-pass statistics from registers: mean, then sum of squared deviations (never E[x^2]-mu^2).
    float mean = 0.f;
    float acc[1] = {0.f};
    if (layer) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (g.lane + k * tpr >= nvec) continue;
#pragma unroll
        for (int i = 0; i < V; ++i) acc[0] += pack_get(xr[k], i);
      }
      row_sum<1>(acc, g, scratch, phase);
      mean = acc[0] * inv_dim;
      acc[0] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (g.lane + k * tpr >= nvec) continue;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = pack_get(xr[k], i) - mean;
        acc[0] += d * d;
      }
    }
    row_sum<1>(acc, g, scratch, phase);
    const RowStats st{mean, rstd_from(acc[0], inv_dim, p.eps)};

    const float* scale = ix.row(p.scale, m);
    const float* shift = ix.row(p.shift, m);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int j = g.lane + k * tpr;
      if (j >= nvec) continue;
      float out[V];
#pragma unroll
      for (int w = 0; w < Words::kCount; ++w) {
        constexpr int E = Words::kCols;
        const int col = j * V + w * E;
        float wt[E], b[E], sc[E], sh[E];
        load_param<E>(p.weight, col, 1.f, wt);
        load_param<E>(p.bias, col, 0.f, b);
        load_param<E>(scale, col, 0.f, sc);
        load_param<E>(shift, col, 0.f, sh);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int i = w * E + e;
          const float n = normalize(pack_get(xr[k], i), st, p.norm) * wt[e] + b[e];
          out[i] = modulate(n, sc[e], sh[e]);
        }
      }
      store_floats<T, V>(y + base + j * V, out);
    }
    if (g.lane == 0) {
      if (layer && p.mean != nullptr) p.mean[row] = st.mean;
      p.rstd[row] = st.rstd;
    }
  }
}

// Gated prologue of the streaming kernel: x_out = h + g*o, returning this thread's share of
// sum x (layernorm) or sum x^2 (rmsnorm). Each thread re-reads later exactly the packs it wrote.
template <typename T, typename OT, int V>
__device__ __forceinline__ float stream_gated_residual(const ForwardParams& p, const float* gate, int64_t base,
                                                       int64_t nvec, bool layer) {
  const T* h = static_cast<const T*>(p.h);
  const OT* o = static_cast<const OT*>(p.o);
  T* x_out = static_cast<T*>(p.x_out);
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const int64_t col = j * V;
    float xv[V], ov[V], gv[V];
    load_floats<T, V>(h + base + col, xv);
    load_floats<OT, V>(o + base + col, ov);
    load_param<V>(gate, col, 1.f, gv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      xv[i] = round_to<T>(xv[i] + gv[i] * ov[i]);
      acc += layer ? xv[i] : xv[i] * xv[i];
    }
    store_floats<T, V>(x_out + base + col, xv);
  }
  return acc;
}

// Rows too long for registers: one CTA per row, three passes over the row (statistics, squared
// deviations, output), the later ones served by L2.
template <typename T, int V>
__global__ void __launch_bounds__(kStreamThreads)
    adaln_forward_stream_kernel(const ForwardParams p, const ModIndexer ix, const float inv_dim) {
  __shared__ float scratch[2 * 32];
  const RowGroup g = make_row_group(int(blockDim.x));
  const int64_t rows = p.layout.rows, nvec = p.dim / V;
  const bool gated = p.o != nullptr;
  const bool layer = p.norm == NormKind::layer;
  const bool modulated = p.gate.present() || p.scale.present() || p.shift.present();
  // Not const-restrict: x_out is re-read after this kernel wrote it (no read-only cache path).
  const T* x = static_cast<const T*>(gated ? p.x_out : p.h);
  T* y = static_cast<T*>(p.y);
  int phase = 0;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t m = modulated ? ix.mod_row(row) : 0;
    const int64_t base = row * p.dim;
    float acc[1] = {0.f};
    if (gated) {
      const float* gate = ix.row(p.gate, m);
      switch (p.o_dtype) {
        case DType::f16: acc[0] = stream_gated_residual<T, __half, V>(p, gate, base, nvec, layer); break;
        case DType::bf16: acc[0] = stream_gated_residual<T, __nv_bfloat16, V>(p, gate, base, nvec, layer); break;
        default: acc[0] = stream_gated_residual<T, float, V>(p, gate, base, nvec, layer); break;
      }
    } else {
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        float xv[V];
        load_floats<T, V>(x + base + j * V, xv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[0] += layer ? xv[i] : xv[i] * xv[i];
      }
    }
    row_sum<1>(acc, g, scratch, phase);
    float mean = 0.f;
    if (layer) {
      mean = acc[0] * inv_dim;
      acc[0] = 0.f;
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        float xv[V];
        load_floats<T, V>(x + base + j * V, xv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = xv[i] - mean;
          acc[0] += d * d;
        }
      }
      row_sum<1>(acc, g, scratch, phase);
    }
    const RowStats st{mean, rstd_from(acc[0], inv_dim, p.eps)};

    const float* scale = ix.row(p.scale, m);
    const float* shift = ix.row(p.shift, m);
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t col = j * V;
      float xv[V], w[V], b[V], sc[V], sh[V], out[V];
      load_floats<T, V>(x + base + col, xv);
      load_param<V>(p.weight, col, 1.f, w);
      load_param<V>(p.bias, col, 0.f, b);
      load_param<V>(scale, col, 0.f, sc);
      load_param<V>(shift, col, 0.f, sh);
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = modulate(normalize(xv[i], st, p.norm) * w[i] + b[i], sc[i], sh[i]);
      store_floats<T, V>(y + base + col, out);
    }
    if (threadIdx.x == 0) {
      if (layer && p.mean != nullptr) p.mean[row] = st.mean;
      p.rstd[row] = st.rstd;
    }
  }
}

// Every pointer a pack of V elements touches is aligned for it and rows start on a pack.
inline bool forward_vectorizable(const ForwardParams& p, int v) {
  const int64_t xa = pack_alignment(p.x_dtype, v), oa = pack_alignment(p.o_dtype, v);
  return p.dim % v == 0 && is_aligned(p.h, xa) && is_aligned(p.x_out, xa) && is_aligned(p.y, xa) &&
         is_aligned(p.o, oa) && is_aligned(p.weight, 16) && is_aligned(p.bias, 16) && mod_aligned(p.gate) &&
         mod_aligned(p.scale) && mod_aligned(p.shift);
}

template <typename T, int V, int NV>
cudaError_t launch_forward_registers(const ForwardParams& p, const RowConfig& c, cudaStream_t stream) {
  const int rows_per_cta = c.tpr <= 32 ? c.threads / c.tpr : 1;
  const unsigned grid = grid_for(ceil_div(p.layout.rows, rows_per_cta));
  const ModIndexer ix = make_mod_indexer(p.layout);
  const float inv_dim = 1.0f / float(p.dim);
  if (p.o == nullptr) {
    adaln_forward_kernel<T, V, NV, void><<<grid, c.threads, 0, stream>>>(p, ix, inv_dim, c.tpr);
  } else if (p.o_dtype == DType::f16) {
    adaln_forward_kernel<T, V, NV, __half><<<grid, c.threads, 0, stream>>>(p, ix, inv_dim, c.tpr);
  } else if (p.o_dtype == DType::bf16) {
    adaln_forward_kernel<T, V, NV, __nv_bfloat16><<<grid, c.threads, 0, stream>>>(p, ix, inv_dim, c.tpr);
  } else {
    adaln_forward_kernel<T, V, NV, float><<<grid, c.threads, 0, stream>>>(p, ix, inv_dim, c.tpr);
  }
  return cudaGetLastError();
}

template <typename T, int V>
cudaError_t launch_forward_packs(const ForwardParams& p, cudaStream_t stream) {
  // Packs per thread: <= 64 elements, held as x_dtype (32 registers for 16-bit types).
  constexpr int kMaxNv = V == 1 ? 8 : 64 / V;
  const RowConfig c = choose_row_config(p.dim / V, kMaxNv);
  switch (c.nv) {
    case 1: return launch_forward_registers<T, V, 1>(p, c, stream);
    case 2: return launch_forward_registers<T, V, 2>(p, c, stream);
    case 4: return launch_forward_registers<T, V, 4>(p, c, stream);
    case 8: return launch_forward_registers<T, V, 8>(p, c, stream);
    case 16:
      if constexpr (kMaxNv >= 16) return launch_forward_registers<T, V, 16>(p, c, stream);
      break;
    default: break;
  }
  adaln_forward_stream_kernel<T, V><<<grid_for(p.layout.rows), kStreamThreads, 0, stream>>>(
      p, make_mod_indexer(p.layout), 1.0f / float(p.dim));
  return cudaGetLastError();
}

template <DType X>
cudaError_t launch_forward_rows(const ForwardParams& p, cudaStream_t stream) {
  using T = elem_t<X>;
  constexpr int kVec = 16 / int(sizeof(T));  // one 128-bit access per pack
  if (forward_vectorizable(p, kVec)) return launch_forward_packs<T, kVec>(p, stream);
  return launch_forward_packs<T, 1>(p, stream);
}

}  // namespace difforge::norm::detail
