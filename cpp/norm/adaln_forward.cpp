// Forward: one read of each input row into an fp32 (fp64) row buffer, two-pass statistics from
// that buffer, one write of y (and x_out). Parallel over rows.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "norm/adaln_cpu.h"
#include "norm/row_math.h"

namespace difforge::norm {
namespace {

template <typename T, typename To, typename acc_t>
void forward_rows(const ForwardParamsT<acc_t>& p) {
  const int64_t D = p.dim;
  const bool gated = p.o != nullptr;
  const auto* h = static_cast<const T*>(p.h);
  const auto* o = static_cast<const To*>(p.o);
  auto* x_out = static_cast<T*>(p.x_out);
  auto* y = static_cast<T*>(p.y);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));

  at::parallel_for(0, p.layout.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xrow(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = p.layout.mod_row(r);
      const int64_t G = p.layout.groups;
      const T* hr = h + r * D;
      if (gated) {
        const To* orow = o + r * D;
        const acc_t* g = p.gate.present() ? p.gate.row(m, G) : nullptr;
        T* xo = x_out + r * D;
        // Normalize the residual stream as stored (rounded to T), exactly what the backward recomputes from.
        for (int64_t c = 0; c < D; ++c) {
          const acc_t gc = g ? g[c] : acc_t(1);
          xo[c] = static_cast<T>(static_cast<acc_t>(hr[c]) + gc * static_cast<acc_t>(orow[c]));
          xrow[c] = static_cast<acc_t>(xo[c]);
        }
      } else {
        for (int64_t c = 0; c < D; ++c) xrow[c] = static_cast<acc_t>(hr[c]);
      }

      const acc_t* xr = xrow.data();
      RowStatsT<acc_t> st{acc_t(0), acc_t(0)};
      if (p.norm == NormKind::layer) {
        st.mean = cpu::lane_sum<acc_t>(D, [&](int64_t c) { return xr[c]; }) / acc_t(D);
        const acc_t var = cpu::lane_sum<acc_t>(D, [&](int64_t c) { const acc_t d = xr[c] - st.mean; return d * d; }) / acc_t(D);
        st.rstd = acc_t(1) / std::sqrt(var + p.eps);
        p.mean[r] = st.mean;
      } else {
        const acc_t ms = cpu::lane_sum<acc_t>(D, [&](int64_t c) { return xr[c] * xr[c]; }) / acc_t(D);
        st.rstd = acc_t(1) / std::sqrt(ms + p.eps);
      }
      p.rstd[r] = st.rstd;

      const acc_t* w = p.weight;
      const acc_t* b = p.bias;
      const acc_t* s = p.scale.present() ? p.scale.row(m, G) : nullptr;
      const acc_t* t = p.shift.present() ? p.shift.row(m, G) : nullptr;
      T* yr = y + r * D;
      for (int64_t c = 0; c < D; ++c) {
        acc_t n = normalize(xr[c], st, p.norm);
        if (w) n *= w[c];
        if (b) n += b[c];
        yr[c] = static_cast<T>(modulate(n, s ? s[c] : acc_t(0), t ? t[c] : acc_t(0)));
      }
    }
  });
}

}  // namespace

template <typename acc_t>
void adaln_forward_cpu(const ForwardParamsT<acc_t>& p) {
  if (p.layout.rows == 0 || p.dim == 0) return;
  cpu::dispatch_float(p.x_dtype, [&]<typename T>() {
    if constexpr (std::is_same_v<acc_t, double> == std::is_same_v<T, double>) {
      if (p.o == nullptr) return forward_rows<T, T, acc_t>(p);
      cpu::dispatch_float(p.o_dtype, [&]<typename To>() {
        if constexpr (std::is_same_v<acc_t, double> == std::is_same_v<To, double>) forward_rows<T, To, acc_t>(p);
      });
    }
  });
}

template void adaln_forward_cpu<float>(const ForwardParamsT<float>&);
template void adaln_forward_cpu<double>(const ForwardParamsT<double>&);

}  // namespace difforge::norm
