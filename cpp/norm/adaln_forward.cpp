// Forward: one read of each input row into an fp32 (fp64) row buffer, two-pass statistics from
// that buffer, one write of y (and x_out). Parallel over rows.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "norm/adaln_cpu.h"
#include "norm/row_math.h"

namespace difforge::norm {
namespace {

template <NormKind K, bool kGated, typename T, typename To, typename acc_t>
void forward_rows(const ForwardParamsT<acc_t>& p) {
  const int64_t D = p.dim, G = p.layout.groups;
  const auto* h = static_cast<const T*>(p.h);
  const auto* o = static_cast<const To*>(p.o);
  auto* x_out = static_cast<T*>(p.x_out);
  auto* y = static_cast<T*>(p.y);
  const cpu::Neutral<acc_t> neutral(D);
  const acc_t* w = neutral.or_ones(p.weight);
  const acc_t* b = neutral.or_zeros(p.bias);
  const int64_t grain = std::max<int64_t>(1, 16384 / D);

  at::parallel_for(0, p.layout.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xrow(D);
    acc_t* xr = xrow.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = p.layout.mod_row(r);
      const T* hr = h + r * D;
      if constexpr (kGated) {
        const To* orow = o + r * D;
        const acc_t* g = neutral.or_ones(p.gate.present() ? p.gate.row(m, G) : nullptr);
        T* xo = x_out + r * D;
        // Normalize the residual stream as stored (rounded to T), exactly what the backward recomputes from.
        for (int64_t c = 0; c < D; ++c) {
          xo[c] = cpu::to_elem<T>(cpu::to_acc<acc_t>(hr[c]) + g[c] * cpu::to_acc<acc_t>(orow[c]));
          xr[c] = cpu::to_acc<acc_t>(xo[c]);
        }
      } else {
        for (int64_t c = 0; c < D; ++c) xr[c] = cpu::to_acc<acc_t>(hr[c]);
      }

      RowStatsT<acc_t> st{acc_t(0), acc_t(0)};
      if constexpr (K == NormKind::layer) {
        st.mean = cpu::lane_sum<acc_t>(D, [&](int64_t c) { return xr[c]; }) / acc_t(D);
        const acc_t var = cpu::lane_sum<acc_t>(D, [&](int64_t c) { const acc_t d = xr[c] - st.mean; return d * d; }) / acc_t(D);
        st.rstd = acc_t(1) / std::sqrt(var + p.eps);
        p.mean[r] = st.mean;
      } else {
        const acc_t ms = cpu::lane_sum<acc_t>(D, [&](int64_t c) { return xr[c] * xr[c]; }) / acc_t(D);
        st.rstd = acc_t(1) / std::sqrt(ms + p.eps);
      }
      p.rstd[r] = st.rstd;

      const acc_t* s = neutral.or_zeros(p.scale.present() ? p.scale.row(m, G) : nullptr);
      const acc_t* t = neutral.or_zeros(p.shift.present() ? p.shift.row(m, G) : nullptr);
      T* yr = y + r * D;
      for (int64_t c = 0; c < D; ++c) yr[c] = cpu::to_elem<T>(modulate(normalize(xr[c], st, K) * w[c] + b[c], s[c], t[c]));
    }
  });
}

}  // namespace

template <typename acc_t>
void adaln_forward_cpu(const ForwardParamsT<acc_t>& p) {
  if (p.layout.rows == 0 || p.dim == 0) return;
  constexpr bool kDouble = std::is_same_v<acc_t, double>;
  cpu::dispatch_norm(p.norm, [&]<NormKind K>() {
    cpu::dispatch_float(p.x_dtype, [&]<typename T>() {
      if constexpr (kDouble == std::is_same_v<T, double>) {
        if (p.o == nullptr) return forward_rows<K, false, T, T, acc_t>(p);
        cpu::dispatch_float(p.o_dtype, [&]<typename To>() {
          if constexpr (kDouble == std::is_same_v<To, double>) forward_rows<K, true, T, To, acc_t>(p);
        });
      }
    });
  });
}

template void adaln_forward_cpu<float>(const ForwardParamsT<float>&);
template void adaln_forward_cpu<double>(const ForwardParamsT<double>&);

}  // namespace difforge::norm
