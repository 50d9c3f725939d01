// Fused adaLN norm-modulate: the math of spec/adaln_norm_and_load_balance.md shared by the
// CPU (cpp/norm) and CUDA (cuda/norm) kernels. Torch-free, header-only.
//
//   x_out = h + g_m * o                          (gated variant only; else x = h)
//   xh    = (x - mu) * rstd   | x * rstd          (layernorm | rmsnorm), statistics in fp32
//   n     = xh * gamma + beta                     (gamma = 1, beta = 0 without affine)
//   y     = n * (1 + s_m) + t_m
//
// m = m(r) is the modulation row of x's row r (ModLayout). Modulation tensors are never
// expanded to x's shape: kernels read them through (batch, group) strides.
#pragma once

#include "difforge/common.h"

namespace difforge::norm {

enum class NormKind : int { layer = 0, rms = 1 };

// A modulation (scale / shift / gate) tensor in the accumulation type (fp32; fp64 on CPU for
// gradcheck) with last stride 1; data == nullptr: absent.
template <typename acc_t>
struct ModTensorT {
  const acc_t* data = nullptr;
  int64_t batch_stride = 0;
  int64_t group_stride = 0;

  DF_INLINE bool present() const { return data != nullptr; }
  DF_INLINE const acc_t* row(int64_t m, int64_t groups) const {
    return data + (m / groups) * batch_stride + (m % groups) * group_stride;
  }
};
using ModTensor = ModTensorT<float>;

// How the rows of x map to modulation rows (spec §1.3). A segment is a maximal run of rows
// sharing one modulation row: a (sample, group) pair, or one packed sequence in varlen mode.
struct ModLayout {
  int64_t rows = 0;        // rows of x (B*L, or total packed tokens)
  int64_t groups = 1;      // G: modulation rows per sample (1 per-sample, F per-frame, L per-token)
  int64_t group_len = 1;   // rows per segment, L / G (unused in varlen mode)
  int64_t mod_batch = 1;   // Bm: batch of the modulation tensors (1 for a global [D] modulation)
  const int32_t* cu_seqlens = nullptr;  // varlen: [num_seqs + 1] row offsets, one modulation row per sequence
  int64_t num_seqs = 0;
  int64_t max_seqlen = 0;

  DF_INLINE bool varlen() const { return cu_seqlens != nullptr; }
  DF_INLINE int64_t mod_rows() const { return varlen() ? num_seqs : mod_batch * groups; }
  DF_INLINE int64_t num_segments() const { return varlen() ? num_seqs : ceil_div(rows, group_len); }
  // Segments sharing one modulation row: x batch / modulation batch (batch-repeat layout);
  // 0 for an empty per-token layout (L = G = 0), which has no modulation rows.
  DF_INLINE int64_t repeat() const {
    return varlen() ? 1 : mod_rows() > 0 ? num_segments() / mod_rows() : 0;
  }
  DF_INLINE int64_t segment_begin(int64_t s) const { return varlen() ? cu_seqlens[s] : s * group_len; }
  DF_INLINE int64_t segment_end(int64_t s) const { return varlen() ? cu_seqlens[s + 1] : (s + 1) * group_len; }
  DF_INLINE int64_t mod_row_of_segment(int64_t s) const {
    return varlen() ? s : ((s / groups) % mod_batch) * groups + s % groups;
  }
  DF_INLINE int64_t segment_of_row(int64_t r) const {
    if (!varlen()) return r / group_len;
    int64_t lo = 0, hi = num_seqs - 1;  // last s with cu[s] <= r
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (cu_seqlens[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
  DF_INLINE int64_t mod_row(int64_t r) const { return mod_row_of_segment(segment_of_row(r)); }
};

// Rows per reduction block: a function of the row count only, never of the device, so the
// two-pass column reductions give the same bits on every run and every GPU.
DF_INLINE int64_t block_rows_for(int64_t rows) {
  int64_t r = 4;
  while (r < 256 && r * 512 < rows) r *= 2;
  return r;
}

// Modulation-gradient quantities reduced per modulation row, and affine quantities reduced over all rows.
enum ModGrad : int { kGradScale = 0, kGradShift = 1, kGradGate = 2, kNumModGrads = 3 };
enum AffineGrad : int { kGradWeight = 0, kGradBias = 1, kNumAffineGrads = 2 };

// Deterministic two-pass column reduction (spec §2). Pass 1 cuts rows into blocks that never
// straddle a segment: a long segment is cut into chunks of block_rows, short segments are packed
// whole, segments_per_block at a time. Each (segment, chunk) owns one "slot" (a [dim] row) of fp32
// partial sums per modulation quantity; each block owns one row of the affine partials. Pass 2 sums a modulation row's slots in ascending order.
// When every modulation row has exactly one slot (per-token, or short per-sample), slot == m and
// pass 1 already wrote the final gradients ("direct").
struct ReductionPlan {
  ModLayout layout;
  int64_t block_rows = 1;
  int64_t chunks_per_segment = 1;
  int64_t segments_per_block = 1;

  DF_HOST_DEVICE ReductionPlan() {}
  DF_HOST_DEVICE explicit ReductionPlan(const ModLayout& l) : layout(l), block_rows(block_rows_for(l.rows)) {
    const int64_t seg_len = l.varlen() ? l.max_seqlen : l.group_len;
    if (seg_len >= block_rows || l.varlen()) {
      chunks_per_segment = seg_len > 0 ? ceil_div(seg_len, block_rows) : 1;
    } else {
      segments_per_block = seg_len > 0 ? block_rows / seg_len : 1;
    }
  }
  DF_INLINE int64_t num_slots() const { return layout.num_segments() * chunks_per_segment; }
  DF_INLINE int64_t num_blocks() const {
    return segments_per_block > 1 ? ceil_div(layout.num_segments(), segments_per_block) : num_slots();
  }
  DF_INLINE int64_t slots_per_mod_row() const { return layout.repeat() * chunks_per_segment; }
  DF_INLINE bool direct() const { return slots_per_mod_row() == 1; }
  // Segments [first, last) covered by block b; with chunking, one segment and its chunk index.
  DF_INLINE int64_t first_segment(int64_t b) const {
    return segments_per_block > 1 ? b * segments_per_block : b / chunks_per_segment;
  }
  DF_INLINE int64_t last_segment(int64_t b) const {
    if (segments_per_block == 1) return first_segment(b) + 1;
    const int64_t e = (b + 1) * segments_per_block, n = layout.num_segments();
    return e < n ? e : n;
  }
  DF_INLINE int64_t chunk(int64_t b) const { return segments_per_block > 1 ? 0 : b % chunks_per_segment; }
  DF_INLINE int64_t block_begin(int64_t b) const {
    return layout.segment_begin(first_segment(b)) + chunk(b) * block_rows;
  }
  DF_INLINE int64_t block_end(int64_t b) const {
    const int64_t seg_end = layout.segment_end(last_segment(b) - 1);
    if (segments_per_block > 1) return seg_end;
    const int64_t e = block_begin(b) + block_rows;
    return e < seg_end ? e : seg_end;
  }
  // Rows [segment_rows_begin, segment_rows_end) of segment s in block b, s in [first_segment(b), last_segment(b)).
  DF_INLINE int64_t segment_rows_begin(int64_t b, int64_t s) const {
    return segments_per_block > 1 ? layout.segment_begin(s) : block_begin(b);
  }
  DF_INLINE int64_t segment_rows_end(int64_t b, int64_t s) const {
    const int64_t e = segments_per_block > 1 ? layout.segment_end(s) : block_end(b);
    return e < layout.rows ? e : layout.rows;
  }
  DF_INLINE int64_t slot(int64_t segment, int64_t chunk_index) const {
    return segment * chunks_per_segment + chunk_index;
  }
  // The i-th slot (ascending) of modulation row m, i < slots_per_mod_row().
  DF_INLINE int64_t slot_of_mod_row(int64_t m, int64_t i) const {
    const int64_t rep = i / chunks_per_segment, c = i % chunks_per_segment;
    if (layout.varlen()) return slot(m, c);
    const int64_t b = m / layout.groups, g = m % layout.groups;
    return slot((rep * layout.mod_batch + b) * layout.groups + g, c);
  }
};

// Row statistics: two-pass mean / variance over a row already in fp32 registers or cache.
template <typename acc_t>
struct RowStatsT {
  acc_t mean;
  acc_t rstd;
};
using RowStats = RowStatsT<float>;

// Per-element forward, given the row statistics. gamma/beta: 1/0 without affine.
template <typename acc_t>
DF_INLINE acc_t normalize(acc_t x, RowStatsT<acc_t> st, NormKind kind) {
  return kind == NormKind::layer ? (x - st.mean) * st.rstd : x * st.rstd;
}
template <typename acc_t>
DF_INLINE acc_t modulate(acc_t n, acc_t scale, acc_t shift) { return n * (acc_t(1) + scale) + shift; }

// Per-row backward pieces. dxh = dy * (1 + s) * gamma; the row needs two sums:
//   sum_dxh = sum_c dxh_c (layernorm only) and sum_dxh_xh = sum_c dxh_c * xh_c.
template <typename acc_t>
DF_INLINE acc_t input_grad(acc_t dxh, acc_t xh, acc_t rstd, acc_t mean_dxh, acc_t mean_dxh_xh, NormKind kind) {
  return kind == NormKind::layer ? rstd * (dxh - mean_dxh - xh * mean_dxh_xh) : rstd * (dxh - xh * mean_dxh_xh);
}

// Arguments of one forward launch (CPU or CUDA). Rows of h/o/x_out/y are contiguous, dim apart.
// acc_t is float everywhere except the CPU fp64 path (gradcheck), where every input is fp64.
template <typename acc_t>
struct ForwardParamsT {
  const void* h = nullptr;      // input rows (x when not gated), x_dtype
  const void* o = nullptr;      // gated residual branch, o_dtype; nullptr: not gated
  void* x_out = nullptr;        // gated only: h + g * o, x_dtype
  void* y = nullptr;            // x_dtype
  acc_t* mean = nullptr;        // [rows] (layernorm only)
  acc_t* rstd = nullptr;        // [rows]
  ModTensorT<acc_t> gate, scale, shift;  // gate absent with o present: g = 1
  const acc_t* weight = nullptr;
  const acc_t* bias = nullptr;
  ModLayout layout;
  int64_t dim = 0;
  acc_t eps = acc_t(1e-6);
  NormKind norm = NormKind::layer;
  DType x_dtype = DType::f32;
  DType o_dtype = DType::f32;
};
using ForwardParams = ForwardParamsT<float>;

// Arguments of one backward launch: pass 1 (rows) and pass 2 (column reductions).
template <typename acc_t>
struct BackwardParamsT {
  const void* dy = nullptr;      // x_dtype
  const void* dx_out = nullptr;  // gated only: gradient arriving at x_out, x_dtype; nullptr: zero
  const void* x = nullptr;       // the normalized input (x_out when gated), x_dtype
  const void* o = nullptr;       // gated only, o_dtype
  const acc_t* mean = nullptr;
  const acc_t* rstd = nullptr;
  ModTensorT<acc_t> gate, scale, shift;
  const acc_t* weight = nullptr;
  const acc_t* bias = nullptr;
  ModLayout layout;
  int64_t dim = 0;
  NormKind norm = NormKind::layer;
  DType x_dtype = DType::f32;
  DType o_dtype = DType::f32;
  void* dx = nullptr;             // [rows, dim] x_dtype: gradient of h (gated) or x
  void* d_o = nullptr;            // [rows, dim] o_dtype; required when o is given
  // One buffer per quantity (the op returns each gradient as its own tensor).
  acc_t* mod_partials[kNumModGrads] = {};     // each [plan.num_slots()][dim]
  acc_t* mod_grads[kNumModGrads] = {};        // each [layout.mod_rows()][dim]; == mod_partials when plan.direct()
  acc_t* affine_partials[kNumAffineGrads] = {};  // each [plan.num_blocks()][dim]
  acc_t* affine_grads[kNumAffineGrads] = {};     // each [dim]
  // Which reductions to produce: scale.present() -> kGradScale, shift -> kGradShift, o with gate -> kGradGate,
  // weight -> kGradWeight, bias -> kGradBias. Absent quantities are neither read nor written.
};
using BackwardParams = BackwardParamsT<float>;

}  // namespace difforge::norm
