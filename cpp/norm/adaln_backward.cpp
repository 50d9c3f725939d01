// Backward: pass 1 walks each reduction block's rows in order (dx, do and fp32 column partials),
// pass 2 sums a modulation row's partials in ascending slot order. No atomics: the same bits on
// every run and any thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "norm/adaln_cpu.h"
#include "norm/row_math.h"

namespace difforge::norm {
namespace {

template <typename acc_t>
struct Wanted {  // which column reductions this call produces
  bool mod[kNumModGrads];
  bool affine[kNumAffineGrads];
  explicit Wanted(const BackwardParamsT<acc_t>& p)
      : mod{p.scale.present(), p.shift.present(), p.o != nullptr && p.gate.present()},
        affine{p.weight != nullptr, p.bias != nullptr} {}
};

// One row's x_hat and d(x_hat), and its terms of the column partials. Restrict-qualified
// parameters: eleven pointers are past the compiler's runtime alias checks, and without the
// promise that they do not overlap this loop would not vectorize.
template <NormKind K, bool kAffine, typename T, typename acc_t>
inline void row_terms(int64_t D, const T* __restrict dy, const T* __restrict x, RowStatsT<acc_t> st,
                      const acc_t* __restrict scale, const acc_t* __restrict w, const acc_t* __restrict bias,
                      acc_t* __restrict xh, acc_t* __restrict dxh, acc_t* __restrict dw, acc_t* __restrict db,
                      acc_t* __restrict ds, acc_t* __restrict dt) {
  for (int64_t c = 0; c < D; ++c) {
    const acc_t dyc = cpu::to_acc<acc_t>(dy[c]);
    xh[c] = normalize(cpu::to_acc<acc_t>(x[c]), st, K);
    const acc_t dn = dyc * (acc_t(1) + scale[c]);
    dxh[c] = dn * w[c];
    if constexpr (kAffine) {  // elementwise_affine=False, the adaLN default, skips two column streams
      dw[c] += dn * xh[c];
      db[c] += dn;
    }
    ds[c] += dyc * (xh[c] * w[c] + bias[c]);
    dt[c] += dyc;
  }
}

// Gated rows: dh = dx (+ the gradient flowing into x_out), d_o = gate * dh, and dh * o into the
// gate partials. Restrict-qualified for the same reason as row_terms.
template <NormKind K, bool kExt, typename T, typename To, typename acc_t>
inline void gated_row_grads(int64_t D, const acc_t* __restrict xh, const acc_t* __restrict dxh, acc_t rstd,
                            acc_t mean_dxh, acc_t mean_dxh_xh, const T* __restrict dx_out, const To* __restrict o,
                            const acc_t* __restrict gate, T* __restrict dh, To* __restrict d_o,
                            acc_t* __restrict dg) {
  for (int64_t c = 0; c < D; ++c) {
    acc_t g = input_grad(dxh[c], xh[c], rstd, mean_dxh, mean_dxh_xh, K);
    if constexpr (kExt) g += cpu::to_acc<acc_t>(dx_out[c]);
    dh[c] = cpu::to_elem<T>(g);
    dg[c] += g * cpu::to_acc<acc_t>(o[c]);
    d_o[c] = cpu::to_elem<To>(g * gate[c]);
  }
}

template <NormKind K, bool kGated, typename T, typename To, typename acc_t>
void backward_rows(const BackwardParamsT<acc_t>& p, const ReductionPlan& plan) {
  const int64_t D = p.dim, G = p.layout.groups;
  const Wanted<acc_t> want(p);
  const auto* dy = static_cast<const T*>(p.dy);
  const auto* dx_out = static_cast<const T*>(p.dx_out);
  const auto* x = static_cast<const T*>(p.x);
  const auto* o = static_cast<const To*>(p.o);
  auto* dx = static_cast<T*>(p.dx);
  auto* d_o = static_cast<To*>(p.d_o);
  const int64_t blocks = plan.num_blocks();
  const cpu::Neutral<acc_t> neutral(D);
  const acc_t* w = neutral.or_ones(p.weight);
  const acc_t* bias = neutral.or_zeros(p.bias);
  const bool affine = want.affine[kGradWeight] || want.affine[kGradBias];

  at::parallel_for(0, blocks, 1, [&](int64_t block_lo, int64_t block_hi) {
    std::vector<acc_t> xh_row(D), dxh_row(D);
    // Column partials: scale/shift/gate are always accumulated (branch-free loops), weight/bias only
    // with an affine; only wanted quantities are stored.
    std::vector<acc_t> mod_acc(kNumModGrads * D), affine_acc(kNumAffineGrads * D);
    acc_t* ds = &mod_acc[kGradScale * D];
    acc_t* dt = &mod_acc[kGradShift * D];
    acc_t* dg = &mod_acc[kGradGate * D];
    acc_t* dw = &affine_acc[kGradWeight * D];
    acc_t* db = &affine_acc[kGradBias * D];
    for (int64_t b = block_lo; b < block_hi; ++b) {
      std::fill(affine_acc.begin(), affine_acc.end(), acc_t(0));
      for (int64_t seg = plan.first_segment(b); seg < plan.last_segment(b); ++seg) {
        std::fill(mod_acc.begin(), mod_acc.end(), acc_t(0));
        const int64_t m = p.layout.mod_row_of_segment(seg);
        const acc_t* s = neutral.or_zeros(p.scale.present() ? p.scale.row(m, G) : nullptr);
        const acc_t* g = neutral.or_ones(p.gate.present() ? p.gate.row(m, G) : nullptr);
        for (int64_t r = plan.segment_rows_begin(b, seg); r < plan.segment_rows_end(b, seg); ++r) {
          const RowStatsT<acc_t> st{K == NormKind::layer ? p.mean[r] : acc_t(0), p.rstd[r]};
          const T* xr = x + r * D;
          const T* dyr = dy + r * D;
          acc_t* xh = xh_row.data();
          acc_t* dxh = dxh_row.data();
          if (affine) row_terms<K, true>(D, dyr, xr, st, s, w, bias, xh, dxh, dw, db, ds, dt);
          else row_terms<K, false>(D, dyr, xr, st, s, w, bias, xh, dxh, dw, db, ds, dt);
          const acc_t mean_dxh =
              K == NormKind::layer ? cpu::lane_sum<acc_t>(D, [&](int64_t c) { return dxh[c]; }) / acc_t(D) : acc_t(0);
          const acc_t mean_dxh_xh = cpu::lane_sum<acc_t>(D, [&](int64_t c) { return dxh[c] * xh[c]; }) / acc_t(D);

          T* dxr = dx + r * D;
          if constexpr (kGated) {
            const auto grads = [&]<bool kExt>() {
              gated_row_grads<K, kExt>(D, xh, dxh, st.rstd, mean_dxh, mean_dxh_xh, kExt ? dx_out + r * D : nullptr,
                                       o + r * D, g, dxr, d_o + r * D, dg);
            };
            if (dx_out) grads.template operator()<true>();
            else grads.template operator()<false>();
          } else {
            for (int64_t c = 0; c < D; ++c)
              dxr[c] = cpu::to_elem<T>(input_grad(dxh[c], xh[c], st.rstd, mean_dxh, mean_dxh_xh, K));
          }
        }
        // Every slot is written, an empty one (a varlen chunk past a short sequence) with zeros.
        const int64_t slot = plan.slot(seg, plan.chunk(b));
        for (int q = 0; q < kNumModGrads; ++q)
          if (want.mod[q]) std::memcpy(p.mod_partials[q] + slot * D, &mod_acc[q * D], D * sizeof(acc_t));
      }
      for (int q = 0; q < kNumAffineGrads; ++q)
        if (want.affine[q])
          std::memcpy(p.affine_partials[q] + b * D, &affine_acc[q * D], D * sizeof(acc_t));
    }
  });
}

// Pass 2: fixed ascending order over slots (per modulation row) and blocks (affine). Parallel
// over column chunks too: a per-sample modulation of batch 1 has a single row.
template <typename acc_t>
void reduce_columns(const BackwardParamsT<acc_t>& p, const ReductionPlan& plan) {
  constexpr int64_t kCols = 256;
  const int64_t D = p.dim, chunks = ceil_div(D, kCols), blocks = plan.num_blocks();
  const int64_t mod_rows = plan.direct() ? 0 : p.layout.mod_rows(), per_row = plan.slots_per_mod_row();
  const Wanted<acc_t> want(p);
  // Tasks [0, mod_rows * chunks) are modulation (row, chunk) pairs, the last `chunks` the affine chunks.
  at::parallel_for(0, (mod_rows + 1) * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t m = task / chunks, c0 = (task % chunks) * kCols, c1 = std::min(D, c0 + kCols);
      const bool affine = m == mod_rows;
      for (int q = 0; q < (affine ? int(kNumAffineGrads) : int(kNumModGrads)); ++q) {
        if (!(affine ? want.affine[q] : want.mod[q])) continue;
        acc_t* out = affine ? p.affine_grads[q] : p.mod_grads[q] + m * D;
        std::fill(out + c0, out + c1, acc_t(0));
        for (int64_t i = 0; i < (affine ? blocks : per_row); ++i) {
          const acc_t* part = affine ? p.affine_partials[q] + i * D : p.mod_partials[q] + plan.slot_of_mod_row(m, i) * D;
          for (int64_t c = c0; c < c1; ++c) out[c] += part[c];
        }
      }
    }
  });
}

}  // namespace

template <typename acc_t>
void adaln_backward_cpu(const BackwardParamsT<acc_t>& p) {
  if (p.layout.rows == 0 || p.dim == 0) return;
  const ReductionPlan plan(p.layout);
  constexpr bool kDouble = std::is_same_v<acc_t, double>;
  cpu::dispatch_norm(p.norm, [&]<NormKind K>() {
    cpu::dispatch_float(p.x_dtype, [&]<typename T>() {
      if constexpr (kDouble == std::is_same_v<T, double>) {
        if (p.o == nullptr) return backward_rows<K, false, T, T, acc_t>(p, plan);
        cpu::dispatch_float(p.o_dtype, [&]<typename To>() {
          if constexpr (kDouble == std::is_same_v<To, double>) backward_rows<K, true, T, To, acc_t>(p, plan);
        });
      }
    });
  });
  reduce_columns(p, plan);
}

template void adaln_backward_cpu<float>(const BackwardParamsT<float>&);
template void adaln_backward_cpu<double>(const BackwardParamsT<double>&);

}  // namespace difforge::norm
