// Device helpers shared by the adaLN norm-modulate kernels (cuda/norm): element conversion,
// packed vector loads/stores, row-group reductions, and the host-side choice of a row layout.
// Torch-free: compiled by nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/element.cuh"
#include "difforge/adaln_norm.h"

namespace difforge::norm::detail {

// Largest CTA of the register-resident row kernels (their __launch_bounds__). Long rows get more
// packs per thread rather than more threads: the per-thread overhead (addresses, indices) is paid
// by fewer threads, so a CTA needs fewer registers in all and more rows fit on an SM.
constexpr int kMaxRowThreads = 256;
// Minimum CTAs per SM promised to the compiler for a register-resident kernel, i.e. its register
// cap 65536 / (256 * n): 80 registers for up to 64 bytes of x per thread, 128 when a second row
// (the gated branch o, or dy) is also held, none for longer rows (they need the registers).
constexpr int row_kernel_min_ctas(int bytes_per_thread, bool two_rows) {
  return bytes_per_thread <= 64 ? (two_rows ? 2 : 3) : 1;
}
// CTA size of the kernels that stream a row from global memory/L2 (very large D).
constexpr int kStreamThreads = 512;
// CTA size when several row groups of <= 32 threads share one CTA (small D).
constexpr int kGroupCtaThreads = 128;

// ---- element types ---------------------------------------------------------------------------

using difforge::cuda::elem_t;
using difforge::cuda::pack_two;

// ---- packed vectors --------------------------------------------------------------------------

// Bytes moved by one memory instruction for a pack of `bytes` bytes: at most 16 (LDG.128).
constexpr int word_bytes(int bytes) { return bytes < 16 ? bytes : 16; }

template <int B> struct word_of;
template <> struct word_of<2> { using type = uint16_t; };
template <> struct word_of<4> { using type = uint32_t; };
template <> struct word_of<8> { using type = uint2; };
template <> struct word_of<16> { using type = uint4; };

// V consecutive elements of one row, held as 32-bit words: two 16-bit elements per word, so a
// pack of 8 bf16 costs 4 registers (an array of __nv_bfloat16 would cost one register each).
// Element 2i is the low half of word i (little endian, as in memory).
template <typename T, int V>
struct Pack {
  static constexpr int kBytes = int(sizeof(T)) * V;
  static constexpr int kWords = (kBytes + 3) / 4;
  uint32_t w[kWords];
};

__device__ __forceinline__ float half_to_float(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

template <typename T, int V>
__device__ __forceinline__ float pack_get(const Pack<T, V>& p, int i) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(p.w[i]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t w = p.w[i >> 1];
    return __uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16));  // bf16 is the top half of fp32
  } else {
    const uint32_t w = p.w[i >> 1];
    return half_to_float((i & 1) ? (w >> 16) : (w & 0xffffu));
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> pack_floats(const float (&v)[V]) {
  Pack<T, V> p;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < V; ++i) p.w[i] = __float_as_uint(v[i]);
  } else if constexpr (V == 1) {
    p.w[0] = std::is_same_v<T, __nv_bfloat16> ? uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v[0])))
                                              : uint32_t(__half_as_ushort(__float2half_rn(v[0])));
  } else {
#pragma unroll
    for (int i = 0; i < V / 2; ++i) p.w[i] = pack_two<T>(v[2 * i], v[2 * i + 1]);
  }
  return p;
}

// x_dtype rounding of an fp32 value (the gated residual is stored, then normalized, as x_dtype).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  if constexpr (sizeof(T) == 4) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(__float2bfloat16_rn(v));
  } else {
    return __half2float(__float2half_rn(v));
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  Pack<T, V> r;
  constexpr int kBytes = Pack<T, V>::kBytes, kWord = word_bytes(kBytes);
  if constexpr (kBytes == 2) {
    r.w[0] = *reinterpret_cast<const uint16_t*>(p);
  } else {
    using Word = typename word_of<kWord>::type;
#pragma unroll
    for (int i = 0; i < kBytes / kWord; ++i) {
      const Word v = reinterpret_cast<const Word*>(p)[i];
      memcpy(&r.w[i * (kWord / 4)], &v, kWord);
    }
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& r) {
  constexpr int kBytes = Pack<T, V>::kBytes, kWord = word_bytes(kBytes);
  if constexpr (kBytes == 2) {
    *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(r.w[0]);
  } else {
    using Word = typename word_of<kWord>::type;
#pragma unroll
    for (int i = 0; i < kBytes / kWord; ++i) {
      Word v;
      memcpy(&v, &r.w[i * (kWord / 4)], kWord);
      reinterpret_cast<Word*>(p)[i] = v;
    }
  }
}

template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[V]) {
  const Pack<T, V> r = load_pack<T, V>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = pack_get(r, i);
}

template <typename T, int V>
__device__ __forceinline__ void store_floats(T* p, const float (&v)[V]) {
  store_pack<T, V>(p, pack_floats<T, V>(v));
}

// fp32 parameters (weight, bias, modulation rows) through the read-only path; they are reused
// by every row of a segment and stay in L1/L2. p == nullptr: the parameter is absent.
template <int V>
__device__ __forceinline__ void load_param(const float* p, int64_t col, float absent, float (&out)[V]) {
  if (p == nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = absent;
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int w = 0; w < V / 4; ++w) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p + col) + w);
      out[4 * w + 0] = f.x;
      out[4 * w + 1] = f.y;
      out[4 * w + 2] = f.z;
      out[4 * w + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = __ldg(p + col + i);
  }
}

// fp32 partial sums owned by one thread (read-modify-write, never shared): plain accesses, so a
// thread always reads back what it wrote itself.
template <int V>
__device__ __forceinline__ void add_floats(float* p, const float (&v)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int w = 0; w < V / 4; ++w) {
      float4* q = reinterpret_cast<float4*>(p) + w;
      float4 a = *q;
      a.x += v[4 * w + 0];
      a.y += v[4 * w + 1];
      a.z += v[4 * w + 2];
      a.w += v[4 * w + 3];
      *q = a;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] += v[i];
  }
}

template <int V>
__device__ __forceinline__ void zero_floats(float* p) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int w = 0; w < V / 4; ++w) reinterpret_cast<float4*>(p)[w] = make_float4(0.f, 0.f, 0.f, 0.f);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = 0.f;
  }
}

// Packs are processed in words of 4 columns (one float4 of each fp32 parameter) to keep few
// temporaries live; scalar packs (V == 1) are one word of one column.
template <int V> struct PackWords {
  static constexpr int kCols = V % 4 == 0 ? 4 : 1;  // columns per word
  static constexpr int kCount = V / kCols;         // words per pack
};

// ---- rows of NV packs per thread -------------------------------------------------------------

// Thread `lane` of a row group of `tpr` threads owns the packs j = lane + k * tpr, k < NV, of a
// row (pack j covers columns [j*V, j*V + V)); j >= nvec is outside the row. Consecutive lanes
// touch consecutive packs, so every access is coalesced.
template <typename T, int V, int NV>
__device__ __forceinline__ void load_row(const T* row, int lane, int tpr, int nvec, Pack<T, V> (&out)[NV]) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + k * tpr;
    if (j < nvec) out[k] = load_pack<T, V>(row + int64_t(j) * V);
  }
}

// ---- modulation rows -------------------------------------------------------------------------

// ModLayout::mod_row and ModTensor::row in 32-bit arithmetic when the host found every index
// small enough (`narrow`): a 64-bit division is a subroutine call on the GPU, and its calling
// convention costs spills in these register-heavy kernels. Same results as the shared header.
struct ModIndexer {
  ModLayout layout;
  bool narrow = false;

  __device__ __forceinline__ int64_t mod_row(int64_t r) const {
    if (!narrow || layout.varlen()) return layout.mod_row(r);
    const uint32_t s = uint32_t(r) / uint32_t(layout.group_len);
    return mod_row_of_segment(s);
  }
  __device__ __forceinline__ int64_t mod_row_of_segment(int64_t s) const {
    if (!narrow || layout.varlen()) return layout.mod_row_of_segment(s);
    const uint32_t groups = uint32_t(layout.groups);
    return int64_t((uint32_t(s) / groups) % uint32_t(layout.mod_batch) * groups + uint32_t(s) % groups);
  }
  __device__ __forceinline__ const float* row(const ModTensor& t, int64_t m) const {
    if (!t.present()) return nullptr;
    if (!narrow) return t.row(m, layout.groups);
    const uint32_t groups = uint32_t(layout.groups);
    return t.data + int64_t(uint32_t(m) / groups) * t.batch_stride + int64_t(uint32_t(m) % groups) * t.group_stride;
  }
};

inline ModIndexer make_mod_indexer(const ModLayout& l) {
  constexpr int64_t kMax = 0x7fffffff;
  ModIndexer ix;
  ix.layout = l;
  ix.narrow = l.rows <= kMax && l.group_len >= 1 && l.group_len <= kMax && l.groups >= 1 && l.groups <= kMax &&
              l.mod_batch >= 1 && l.mod_batch <= kMax && l.mod_rows() <= kMax && l.num_segments() <= kMax;
  return ix;
}

// ---- row groups and their reductions ---------------------------------------------------------

// The threads that share one row. tpr <= 32 (a power of two): several groups per CTA, reduced
// with shuffles inside the group's lanes only, no barrier. tpr > 32: the whole CTA is one group
// (tpr == blockDim.x, a multiple of 32), reduced through shared memory.
struct RowGroup {
  int tpr;
  int lane;     // thread index inside the group
  int group;    // group index inside the CTA
  int groups;   // groups per CTA
  unsigned mask;  // this group's lanes of its warp
};

__device__ __forceinline__ RowGroup make_row_group(int tpr) {
  RowGroup g;
  g.tpr = tpr;
  if (tpr > 32) {
    g.lane = int(threadIdx.x);
    g.group = 0;
    g.groups = 1;
    g.mask = 0xffffffffu;
  } else {
    g.lane = int(threadIdx.x) & (tpr - 1);
    g.group = int(threadIdx.x) / tpr;
    g.groups = int(blockDim.x) / tpr;
    g.mask = tpr == 32 ? 0xffffffffu : ((1u << tpr) - 1u) << ((threadIdx.x & 31u) & ~unsigned(tpr - 1));
  }
  return g;
}

// Sums N values over the row group; every thread of the group gets the same bits (xor butterfly,
// then warp totals added in warp order). The order depends only on tpr, itself a function of the
// shape. scratch: 2 * N * 32 floats; `phase` alternates its halves so that one barrier per call
// suffices (a thread can reuse a half only after every thread passed the next call's barrier).
template <int N>
__device__ __forceinline__ void row_sum(float (&v)[N], const RowGroup& g, float* scratch, int& phase) {
  const int width = g.tpr < 32 ? g.tpr : 32;
  for (int off = width >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(g.mask, v[i], off);
  }
  if (g.tpr <= 32) return;
  float* buf = scratch + phase * (N * 32);
  phase ^= 1;
  const int warp = int(threadIdx.x) >> 5, nwarps = int(blockDim.x) >> 5;
  if ((threadIdx.x & 31u) == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) buf[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += buf[i * 32 + w];
    v[i] = s;
  }
}

// ---- host side -------------------------------------------------------------------------------

// How a row is spread over threads. nv == 0: the row does not fit in registers; stream it.
struct RowConfig {
  int nv = 0;       // packs per thread
  int tpr = 0;      // threads per row group
  int threads = 0;  // CTA size
};

// nvec packs per row; NV is instantiated for the powers of two up to max_nv. Small rows: groups
// of <= 32 threads (one pack each, or 2-4 for a full warp). Otherwise one row per CTA with the
// fewest packs per thread that keep it within kMaxRowThreads (so 129-256 threads: enough warps
// to hide latency, short reductions). Rows longer than max_nv * kMaxRowThreads packs are streamed.
inline RowConfig choose_row_config(int64_t nvec, int max_nv) {
  if (nvec <= 32) {
    int tpr = 1;
    while (tpr < nvec) tpr *= 2;
    return {1, tpr, kGroupCtaThreads};
  }
  for (int nv = 2; nv <= max_nv && nv <= 4; nv *= 2) {
    if (nvec <= 32 * nv) return {nv, 32, kGroupCtaThreads};
  }
  for (int nv = 1; nv <= max_nv; nv *= 2) {
    const int64_t t = ceil_div(ceil_div(nvec, nv), 32) * 32;
    if (t <= kMaxRowThreads) return {nv, int(t), int(t)};
  }
  return {};
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0;
}

// Modulation rows are read as float4 in the vectorized kernels: base and strides must keep every
// row 16-byte aligned.
inline bool mod_aligned(const ModTensor& t) {
  return !t.present() || (is_aligned(t.data, 16) && t.batch_stride % 4 == 0 && t.group_stride % 4 == 0);
}

// Grid size for `work` independent items, capped at the grid limit (kernels loop over the rest).
inline unsigned grid_for(int64_t work) {
  constexpr int64_t kMaxGrid = 0x7fffffff;
  return unsigned(work < 1 ? 1 : (work < kMaxGrid ? work : kMaxGrid));
}

inline int64_t dtype_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

// Alignment a pack of V elements of dtype dt needs (it is moved in words of at most 16 bytes).
inline int64_t pack_alignment(DType dt, int v) { return word_bytes(int(dtype_size(dt)) * v); }

inline cudaError_t device_attribute(cudaDeviceAttr attr, int* value) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(value, attr, dev);
}

}  // namespace difforge::norm::detail
