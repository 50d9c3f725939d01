// Argument checks, output allocation and entry points of the Skiparse permutation ops (attention family),
// shared by the CPU (attention.cpp) and CUDA (attention_cuda.cpp) registrations. A Kernels type supplies
// gather(GatherParams) and a device Guard. Every op moves whole feature rows: any dtype, trailing dims
// flattened into one row (they must be dense; other strides are free).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "difforge/skiparse_index.h"

namespace difforge::skiparse::binding {

using at::Tensor;

inline Mode parse_mode(const char* op, const std::string& mode) {
  if (mode == "token") return Mode::token;
  if (mode == "group") return Mode::group;
  TORCH_CHECK(false, op, ": mode must be \"token\" or \"group\", got \"", mode, "\"");
}

inline Layout layout_of(const char* op, c10::IntArrayRef grid, int64_t sparse_ratio, int64_t dims, int64_t ssp_rank,
                        int64_t ssp_size) {
  TORCH_CHECK(grid.size() == 3, op, ": grid must be (T, H, W), got ", grid);
  TORCH_CHECK(grid[0] >= 1 && grid[1] >= 1 && grid[2] >= 1, op, ": grid extents must be >= 1, got ", grid);
  TORCH_CHECK(sparse_ratio >= 1, op, ": sparse_ratio must be >= 1, got ", sparse_ratio);
  TORCH_CHECK(dims == 1 || dims == 2, op, ": dims must be 1 or 2, got ", dims);
  Layout l;
  l.split_h = dims == 2;
  l.T = l.split_h ? grid[0] : 1;
  l.H = l.split_h ? grid[1] : 1;
  l.W = l.split_h ? grid[2] : grid[0] * grid[1] * grid[2];
  l.P = sparse_ratio;
  TORCH_CHECK(ssp_size >= 1 && l.groups() % ssp_size == 0, op, ": ssp_size must divide the ", l.groups(),
              " sub-sequences (", dims == 2 ? "P^2" : "P", " with P = ", sparse_ratio, "), got ", ssp_size);
  TORCH_CHECK(ssp_rank >= 0 && ssp_rank < ssp_size, op, ": ssp_rank must be in [0, ", ssp_size, "), got ", ssp_rank);
  l.ssp_rank = ssp_rank;
  l.ssp_size = ssp_size;
  return l;
}

// x viewed as [outer, inner, row]: the dims after the first two must be dense, else x is copied.
inline Tensor with_dense_rows(const Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return x.contiguous();
    expected *= x.size(d);
  }
  return x;
}

inline int64_t row_elements(const Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 2; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

inline std::vector<int64_t> shape_with(int64_t outer, int64_t inner, const Tensor& like) {
  std::vector<int64_t> shape = {outer, inner};
  for (int64_t d = 2; d < like.dim(); ++d) shape.push_back(like.size(d));
  return shape;
}

template <typename Kernels>
Tensor gather(Gather kind, const Layout& l, Mode mode, const Tensor& src, std::vector<int64_t> out_shape) {
  const typename Kernels::Guard guard(src.device());
  Tensor out = at::empty(out_shape, src.options());
  GatherParams p;
  p.kind = kind;
  p.layout = l;
  p.mode = mode;
  p.src = src.data_ptr();
  p.src_outer_stride = src.stride(0) * static_cast<int64_t>(src.element_size());
  p.src_inner_stride = src.stride(1) * static_cast<int64_t>(src.element_size());
  p.dst = out.data_ptr();
  p.dst_rows = out_shape[0] * out_shape[1];
  p.dst_inner = out_shape[1];
  p.row_bytes = row_elements(src) * static_cast<int64_t>(src.element_size());
  if (out.numel() > 0) Kernels::gather(p);
  return out;
}

inline void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() >= 2, op, ": ", name, " must have at least 2 dims ([rows, sequence, ...]), got shape ",
              t.sizes());
}

template <typename Kernels>
Tensor skiparse_rearrange(const Tensor& x, c10::IntArrayRef grid, int64_t sparse_ratio, const std::string& mode,
                          int64_t dims, int64_t ssp_rank, int64_t ssp_size) {
  constexpr const char* op = "skiparse_rearrange";
  check_rows(op, "x", x);
  Layout l = layout_of(op, grid, sparse_ratio, dims, ssp_rank, ssp_size);
  TORCH_CHECK(x.size(1) == l.tokens(), op, ": x has ", x.size(1), " tokens but grid ", grid, " has T*H*W = ",
              l.tokens());
  l.batch = x.size(0);
  const Tensor src = with_dense_rows(x);
  return gather<Kernels>(Gather::pack, l, parse_mode(op, mode), src, shape_with(l.local_rows(), l.seq_len(), src));
}

// Shared checks of the ops whose input is in the sparse layout ([G_loc * B, N' / G, ...]); sets l.batch.
inline void check_sparse(const char* op, const Tensor& xs, Layout& l) {
  check_rows(op, "xs", xs);
  TORCH_CHECK(xs.size(0) % l.local_groups() == 0, op, ": xs has ", xs.size(0), " rows, not a multiple of the ",
              l.local_groups(), " local sub-sequences");
  TORCH_CHECK(xs.size(1) == l.seq_len(), op, ": xs has sequence length ", xs.size(1), " but the sparse layout of ",
              "this grid has N'/G = ", l.seq_len());
  l.batch = xs.size(0) / l.local_groups();
}

template <typename Kernels>
Tensor skiparse_restore(const Tensor& xs, c10::IntArrayRef grid, int64_t sparse_ratio, const std::string& mode,
                        int64_t dims, int64_t ssp_rank, int64_t ssp_size) {
  constexpr const char* op = "skiparse_restore";
  Layout l = layout_of(op, grid, sparse_ratio, dims, ssp_rank, ssp_size);
  check_sparse(op, xs, l);
  const Tensor src = with_dense_rows(xs);
  return gather<Kernels>(Gather::restore, l, parse_mode(op, mode), src, shape_with(l.batch, l.tokens(), src));
}

template <typename Kernels>
Tensor skiparse_switch(const Tensor& xs, c10::IntArrayRef grid, int64_t sparse_ratio, const std::string& from_mode,
                       int64_t dims) {
  constexpr const char* op = "skiparse_switch";
  Layout l = layout_of(op, grid, sparse_ratio, dims, 0, 1);
  check_sparse(op, xs, l);
  const Tensor src = with_dense_rows(xs);
  return gather<Kernels>(Gather::switch_modes, l, parse_mode(op, from_mode), src,
                         shape_with(xs.size(0), l.seq_len(), src));
}

template <typename Kernels>
Tensor skiparse_exchange_send(const Tensor& xs, c10::IntArrayRef grid, int64_t sparse_ratio,
                              const std::string& from_mode, int64_t dims, int64_t ssp_rank, int64_t ssp_size) {
  constexpr const char* op = "skiparse_exchange_send";
  Layout l = layout_of(op, grid, sparse_ratio, dims, ssp_rank, ssp_size);
  check_sparse(op, xs, l);
  const Tensor src = with_dense_rows(xs);
  const int64_t per_rank = l.local_groups() * l.local_groups() * l.batch * l.base();
  const Tensor flat = gather<Kernels>(Gather::exchange_send, l, parse_mode(op, from_mode), src,
                                     shape_with(1, ssp_size * per_rank, src));
  return flat.view(shape_with(ssp_size, per_rank, src));
}

template <typename Kernels>
Tensor skiparse_exchange_receive(const Tensor& received, c10::IntArrayRef grid, int64_t sparse_ratio,
                                 const std::string& from_mode, int64_t dims, int64_t ssp_rank, int64_t ssp_size) {
  constexpr const char* op = "skiparse_exchange_receive";
  Layout l = layout_of(op, grid, sparse_ratio, dims, ssp_rank, ssp_size);
  check_rows(op, "received", received);
  const int64_t per_batch = l.local_groups() * l.local_groups() * l.base();
  TORCH_CHECK(received.size(0) == ssp_size && received.size(1) % per_batch == 0, op,
              ": received must be [ssp_size, G_loc^2 * B * base, ...] = [", ssp_size, ", ", per_batch,
              " * B, ...] (the all_to_all of skiparse_exchange_send), got shape ", received.sizes());
  l.batch = received.size(1) / per_batch;
  // One flat row index: (source rank, g, sl, b, pos).
  const Tensor src = with_dense_rows(received).flatten(0, 1).unsqueeze(0);
  return gather<Kernels>(Gather::exchange_receive, l, parse_mode(op, from_mode), src,
                         shape_with(l.local_rows(), l.seq_len(), src));
}

#define DIFFORGE_REGISTER_SKIPARSE_OPS(m, Kernels)                                                          \
  m.impl("skiparse_rearrange", &::difforge::skiparse::binding::skiparse_rearrange<Kernels>);                \
  m.impl("skiparse_restore", &::difforge::skiparse::binding::skiparse_restore<Kernels>);                    \
  m.impl("skiparse_switch", &::difforge::skiparse::binding::skiparse_switch<Kernels>);                      \
  m.impl("skiparse_exchange_send", &::difforge::skiparse::binding::skiparse_exchange_send<Kernels>);        \
  m.impl("skiparse_exchange_receive", &::difforge::skiparse::binding::skiparse_exchange_receive<Kernels>)

}  // namespace difforge::skiparse::binding
