// Argument checks, output allocation and entry points of the sampling ops, shared by the CPU (sampling.cpp) and CUDA
// (sampling_cuda.cpp) registrations. A Kernels type supplies step(StepParams), tweedie(TweedieParams),
// select(SelectParams) and a device Guard. Data-dependent failures (NaN logits, invalid coefficients) are never
// checked here (that would sync the device): the kernels mark such rows with token -1.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "difforge/sampling.h"
#include "dtype.h"

namespace difforge::sampling::binding {

using at::Tensor;
using difforge::binding::is_float_type;
using difforge::binding::to_dtype;

inline Rule parse_rule(const std::string& rule) {
  if (rule == "mixture") return Rule::mixture;
  if (rule == "euler") return Rule::euler;
  if (rule == "tau_leap") return Rule::tau_leap;
  if (rule == "ctmc") return Rule::ctmc;
  TORCH_CHECK(false, "discrete_step: rule must be \"mixture\", \"euler\", \"tau_leap\" or \"ctmc\", got \"", rule,
              "\"");
}

inline void check_seed_offset(const char* op, int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(offset >= 0 && offset < (int64_t{1} << 32), op, ": offset must be in [0, 2^32), got ", offset);
}

inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& like, const char* first) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", first, " is on ",
              like.device());
}

// A [..., V] float tensor read as rows of V: the row stride when the leading dims collapse to one stride (views,
// expanded rows), else none (the caller makes it contiguous).
inline std::optional<int64_t> collapsed_row_stride(const Tensor& t) {
  std::optional<int64_t> stride;
  int64_t span = 1;  // rows covered by the dims seen so far
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (stride && t.stride(i) != *stride * span) return std::nullopt;
    if (!stride) stride = t.stride(i);
    span *= t.size(i);
  }
  return stride.value_or(t.size(-1));
}

// The rows of logits / log scores: checks dtype, V and last stride; returns (tensor to read, rows, row stride).
struct Rows {
  Tensor data;
  int64_t rows, vocab, row_stride;
};

inline Rows rows_of(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dim [..., V], got a 0-dim tensor");
  const int64_t V = t.size(-1);
  TORCH_CHECK(V >= 2, op, ": ", name, " must have at least 2 columns (the vocabulary, last dim), got ", V);
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, " must have stride 1 in its last dim, got strides ", t.strides());
  const int64_t rows = t.numel() / V;
  TORCH_CHECK(rows < (int64_t{1} << 32), op, ": at most 2^32 - 1 rows, got ", rows);
  std::optional<int64_t> stride = collapsed_row_stride(t);
  Tensor data = stride ? t : t.contiguous();
  return {data, rows, V, stride.value_or(V)};  // a contiguous copy has row stride V
}

// A per-row tensor: `dtype`, on like's device, of shape lead + tail (`what` says where that shape comes from);
// made contiguous.
inline Tensor per_row(const char* op, const char* name, const Tensor& t, const Tensor& like, const char* first,
                      at::ScalarType dtype, at::IntArrayRef lead, std::vector<int64_t> tail, const char* what) {
  check_device(op, name, t, like, first);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.insert(shape.end(), tail.begin(), tail.end());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape), " (",
              what, "), got ", t.sizes());
  return t.contiguous();
}

template <typename Kernels>
std::tuple<Tensor, Tensor> discrete_step(const Tensor& logits, const Tensor& point, const Tensor& coef,
                                         const std::string& rule, double temperature, bool greedy, int64_t top_k,
                                         double top_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "discrete_step";
  const typename Kernels::Guard guard(logits.device());
  StepParams p;
  p.rule = parse_rule(rule);
  const float temperature_f = static_cast<float>(temperature);  // the kernels divide by the fp32 value
  TORCH_CHECK(std::isfinite(temperature_f) && temperature_f > 0, op,
              ": temperature must be finite and > 0 (in float32), got ", temperature);
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0: off), got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1] (1: off), got ", top_p);
  check_seed_offset(op, seed, offset);
  const Rows rows = rows_of(op, "logits", logits);
  const at::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  const Tensor point_c = per_row(op, "point", point, logits, "logits", at::kLong, lead, {},
                                  "logits.shape[:-1]");
  const Tensor coef_c = per_row(op, "coef", coef, logits, "logits", at::kFloat, lead, {3},
                                 "logits.shape[:-1] + (3,)");

  std::vector<int64_t> stats_shape(lead.begin(), lead.end());
  stats_shape.push_back(kNumStats);
  Tensor token = at::empty(lead, logits.options().dtype(at::kLong));
  Tensor stats = at::empty(stats_shape, logits.options().dtype(at::kFloat));
  p.logits = rows.data.data_ptr();
  p.dtype = to_dtype(logits.scalar_type());
  p.rows = rows.rows;
  p.vocab = rows.vocab;
  p.row_stride = rows.row_stride;
  p.point = point_c.data_ptr<int64_t>();
  p.coef = coef_c.data_ptr<float>();
  p.temperature = temperature_f;
  p.greedy = greedy;
  p.top_k = top_k;
  p.top_p = static_cast<float>(top_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.token = token.data_ptr<int64_t>();
  p.stats = stats.data_ptr<float>();
  if (p.rows > 0) Kernels::step(p);
  return {token, stats};
}

template <typename Kernels>
Tensor tweedie_step(const Tensor& log_score, const Tensor& current, const Tensor& e, int64_t seed, int64_t offset) {
  constexpr const char* op = "tweedie_step";
  const typename Kernels::Guard guard(log_score.device());
  check_seed_offset(op, seed, offset);
  const Rows rows = rows_of(op, "log_score", log_score);
  const at::IntArrayRef lead = log_score.sizes().slice(0, log_score.dim() - 1);
  const Tensor current_c = per_row(op, "current", current, log_score, "log_score", at::kLong, lead, {},
                                    "log_score.shape[:-1]");
  const Tensor e_c = per_row(op, "e", e, log_score, "log_score", at::kFloat, lead, {}, "log_score.shape[:-1]");

  Tensor token = at::empty(lead, log_score.options().dtype(at::kLong));
  TweedieParams p;
  p.log_score = rows.data.data_ptr();
  p.dtype = to_dtype(log_score.scalar_type());
  p.rows = rows.rows;
  p.vocab = rows.vocab;
  p.row_stride = rows.row_stride;
  p.current = current_c.data_ptr<int64_t>();
  p.e = e_c.data_ptr<float>();
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.token = token.data_ptr<int64_t>();
  if (p.rows > 0) Kernels::tweedie(p);
  return token;
}

template <typename Kernels>
Tensor select_positions(const Tensor& key, const Tensor& eligible, const Tensor& k,
                        const std::optional<Tensor>& threshold, double gumbel_tau, int64_t seed, int64_t offset) {
  constexpr const char* op = "select_positions";
  const typename Kernels::Guard guard(key.device());
  check_seed_offset(op, seed, offset);
  TORCH_CHECK(std::isfinite(gumbel_tau) && gumbel_tau >= 0, op, ": gumbel_tau must be finite and >= 0, got ",
              gumbel_tau);
  TORCH_CHECK(key.scalar_type() == at::kFloat, op, ": key must be float32, got ", key.scalar_type());
  TORCH_CHECK(key.dim() == 2, op, ": key must be 2-D [B, L], got shape ", key.sizes());
  const int64_t B = key.size(0), L = key.size(1);
  TORCH_CHECK(B < (int64_t{1} << 32), op, ": at most 2^32 - 1 rows, got ", B);
  const Tensor key_c = key.contiguous();
  const Tensor eligible_c = per_row(op, "eligible", eligible, key, "key", at::kBool, {B, L}, {}, "key's [B, L]");
  const Tensor k_c = per_row(op, "k", k, key, "key", at::kLong, {B}, {}, "[B], one count per row of key");
  std::optional<Tensor> threshold_c;
  if (threshold)
    threshold_c = per_row(op, "threshold", *threshold, key, "key", at::kFloat, {B}, {}, "[B], one per row of key");

  Tensor selected = at::empty({B, L}, key.options().dtype(at::kBool));
  SelectParams p;
  p.key = key_c.data_ptr<float>();
  p.eligible = eligible_c.data_ptr<bool>();
  p.k = k_c.data_ptr<int64_t>();
  p.threshold = threshold_c ? threshold_c->data_ptr<float>() : nullptr;
  p.batch = B;
  p.len = L;
  p.gumbel_tau = static_cast<float>(gumbel_tau);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.selected = selected.data_ptr<bool>();
  if (selected.numel() > 0) Kernels::select(p);
  return selected;
}

// Registers every sampling op for one dispatch key with one Kernels backend.
#define DIFFORGE_REGISTER_SAMPLING_OPS(m, Kernels)                                         \
  m.impl("discrete_step", &::difforge::sampling::binding::discrete_step<Kernels>);         \
  m.impl("tweedie_step", &::difforge::sampling::binding::tweedie_step<Kernels>);           \
  m.impl("select_positions", &::difforge::sampling::binding::select_positions<Kernels>)

}  // namespace difforge::sampling::binding
