// Backward pass 2 (spec §2): sum the fp32 partials of pass 1 in a fixed, shape-only order.
//   mod_grads[q][m][c]  = sum over i ascending of mod_partials[q][plan.slot_of_mod_row(m, i)][c]
//   affine_grads[q][c]  = sum over blocks b ascending of affine_partials[q][b][c]
// One thread per output element; the threads of a warp take consecutive columns, so each step of
// the sequential sum is one coalesced load per warp.
#include "adaln_kernels.cuh"
#include "adaln_launch.h"

namespace difforge::norm::detail {
namespace {

struct ReduceArgs {
  ReductionPlan plan;
  // The quantities to reduce, packed: [0, n_mod) modulation, then [0, n_affine) affine.
  const float* mod_src[kNumModGrads] = {};
  float* mod_dst[kNumModGrads] = {};
  int n_mod = 0;
  const float* affine_src[kNumAffineGrads] = {};
  float* affine_dst[kNumAffineGrads] = {};
  int n_affine = 0;
  int64_t dim = 0;
};

// Sum of `count` rows of `src` spaced `stride` floats apart, in ascending order.
__device__ __forceinline__ float sum_rows(const float* src, int64_t count, int64_t stride, float acc) {
#pragma unroll 8
  for (int64_t i = 0; i < count; ++i) acc += src[i * stride];
  return acc;
}

__global__ void __launch_bounds__(256) adaln_reduce_partials_kernel(const ReduceArgs a) {
  const ReductionPlan& plan = a.plan;
  const ModLayout& L = plan.layout;
  const int64_t mod_rows = L.mod_rows(), num_blocks = plan.num_blocks();
  const int64_t cps = plan.chunks_per_segment;
  const int64_t mod_outputs = a.n_mod * mod_rows;
  const int64_t total = (mod_outputs + a.n_affine) * a.dim;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t out = t / a.dim, c = t % a.dim;
    if (out < mod_outputs) {
      const int64_t q = out / mod_rows, m = out % mod_rows;
      const float* src = a.mod_src[q] + c;
      float acc = 0.f;
      if (L.varlen()) {
        acc = sum_rows(src + plan.slot(m, 0) * a.dim, cps, a.dim, acc);
      } else {
        // slot_of_mod_row(m, i) for i = rep * cps + chunk: the chunks of one segment are adjacent.
        const int64_t b = m / L.groups, gidx = m % L.groups, reps = L.repeat();
        for (int64_t rep = 0; rep < reps; ++rep) {
          const int64_t segment = (rep * L.mod_batch + b) * L.groups + gidx;
          acc = sum_rows(src + plan.slot(segment, 0) * a.dim, cps, a.dim, acc);
        }
      }
      a.mod_dst[q][m * a.dim + c] = acc;
    } else {
      const int64_t q = out - mod_outputs;
      a.affine_dst[q][c] = sum_rows(a.affine_src[q] + c, num_blocks, a.dim, 0.f);
    }
  }
}

}  // namespace

cudaError_t launch_reduce_partials(const BackwardParams& p, const ReductionPlan& plan, cudaStream_t stream) {
  ReduceArgs a;
  a.plan = plan;
  a.dim = p.dim;
  const bool mod_wanted[kNumModGrads] = {p.scale.present(), p.shift.present(), p.o != nullptr && p.gate.present()};
  const bool affine_wanted[kNumAffineGrads] = {p.weight != nullptr, p.bias != nullptr};
  for (int q = 0; q < kNumModGrads; ++q) {
    if (!mod_wanted[q] || plan.direct()) continue;  // direct: pass 1 already wrote the gradients
    a.mod_src[a.n_mod] = p.mod_partials[q];
    a.mod_dst[a.n_mod++] = p.mod_grads[q];
  }
  for (int q = 0; q < kNumAffineGrads; ++q) {
    if (!affine_wanted[q]) continue;
    a.affine_src[a.n_affine] = p.affine_partials[q];
    a.affine_dst[a.n_affine++] = p.affine_grads[q];
  }
  const int64_t total = (a.n_mod * plan.layout.mod_rows() + a.n_affine) * p.dim;
  if (total == 0) return cudaSuccess;

  int sms = 0;
  const cudaError_t err = device_attribute(cudaDevAttrMultiProcessorCount, &sms);
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  const int64_t ctas = ceil_div(total, kThreads), cap = int64_t(sms > 0 ? sms : 1) * 16;
  adaln_reduce_partials_kernel<<<grid_for(ctas < cap ? ctas : cap), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace difforge::norm::detail
