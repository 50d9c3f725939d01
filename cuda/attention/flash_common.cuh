// Device vocabulary of the flash attention kernels (cuda/attention): element types, the
// mma.sync m16n8k16 fragments and the ldmatrix / cp.async moves that feed them, swizzled shared
// memory tiles, and the visibility rule in 32-bit arithmetic. Torch-free: compiled by nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/element.cuh"
#include "difforge/attention.h"

namespace difforge::attention::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types ---------------------------------------------------------------------------

using difforge::cuda::elem_t;
using difforge::cuda::pack_two;
using difforge::cuda::from_float;
using difforge::cuda::to_float;

// 2^x on the SFU (ex2.approx, flush-to-zero): 2^-inf = +0, which is how masked logits vanish.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// ---- visibility (difforge/attention.h) in 32-bit arithmetic -----------------------------------

// Keys [0, key_end) are visible to query i (bottom-right causal diagonal); lengths fit int32
// (the launchers check).
__device__ __forceinline__ int visible_key_end(int i, int q_len, int k_len, bool causal) {
  if (!causal) return k_len;
  const int end = i + 1 + k_len - q_len;
  return end < 0 ? 0 : (end < k_len ? end : k_len);
}

// Sequence b of a problem, with everything the kernels index by resolved once per CTA.
struct SequenceView {
  int q_len, k_len, k_stored;
  int64_t q_begin, k_begin;  // first packed row (0 in the batch layout)
  int64_t out_row0, k_row0;  // Problem::out_row(b, 0), Problem::k_row(b, 0)
};

__device__ __forceinline__ SequenceView view_sequence(const Problem& pr, int b) {
  SequenceView s;
  s.q_len = int(pr.q_len(b));
  s.k_len = int(pr.k_len(b));
  s.k_stored = int(pr.k_stored(b));
  s.q_begin = pr.q_begin(b);
  s.k_begin = pr.k_begin(b);
  s.out_row0 = pr.out_row(b, 0);
  s.k_row0 = pr.k_row(b, 0);
  return s;
}

// ---- mma.sync m16n8k16, fp32 accumulation ------------------------------------------------------
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// lane = threadIdx.x % 32, g = lane / 4 (the group) and t = lane % 4 (the thread in the group):
//
//   A, 16 x 16 (row-major, M x K), 4 registers of 2 elements (low half = lower column):
//     a[0] = A[g    ][2t, 2t+1]     a[2] = A[g    ][2t+8, 2t+9]
//     a[1] = A[g + 8][2t, 2t+1]     a[3] = A[g + 8][2t+8, 2t+9]
//   B, 16 x 8 (K x N, "col": K contiguous for each column n), 2 registers of 2 elements:
//     b[0] = B[2t, 2t+1  ][g]       b[1] = B[2t+8, 2t+9][g]
//   C, 16 x 8 fp32 (M x N), 4 floats:
//     c[0], c[1] = C[g][2t], C[g][2t+1]          c[2], c[3] = C[g + 8][2t], C[g + 8][2t+1]
//
// So C[r][.] lives in c[2 * (r / 8) + .]: "half" h = 0 holds row g, h = 1 row g + 8.
// Two C fragments of adjacent column blocks n, n + 1 of a product X (16 x 16 in all) are exactly
// the A fragment of X as the left operand of the next product (a_from_c below): the FA2 trick
// that keeps P and dS in registers.
struct FragA { uint32_t x[4]; };
struct FragC {
  float x[4];
  __device__ __forceinline__ void zero() { x[0] = x[1] = x[2] = x[3] = 0.f; }
};

template <typename T>
__device__ __forceinline__ void mma_16816(FragC& c, const FragA& a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c.x[0]), "+f"(c.x[1]), "+f"(c.x[2]), "+f"(c.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16816: fp16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c.x[0]), "+f"(c.x[1]), "+f"(c.x[2]), "+f"(c.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b0), "r"(b1));
  }
}

// The A fragment (16 x 16, rounded to T) of the 16 columns held by the C fragments `lo` (columns
// 0-7) and `hi` (columns 8-15): a[0] = rows g cols 2t.. of lo, a[1] = rows g+8 of lo, a[2], a[3]
// the same of hi (see the layouts above).
template <typename T>
__device__ __forceinline__ FragA a_from_c(const FragC& lo, const FragC& hi) {
  FragA a;
  a.x[0] = pack_two<T>(lo.x[0], lo.x[1]);
  a.x[1] = pack_two<T>(lo.x[2], lo.x[3]);
  a.x[2] = pack_two<T>(hi.x[0], hi.x[1]);
  a.x[3] = pack_two<T>(hi.x[2], hi.x[3]);
  return a;
}

// ---- ldmatrix ----------------------------------------------------------------------------------
//
// ldmatrix.m8n8.x4 loads four 8 x 8 matrices of 16-bit elements; lanes 8i..8i+7 give the
// addresses of the 8 rows (16 contiguous bytes each) of matrix i, and register i receives matrix
// i distributed as a C fragment's half: lane holds row lane/4, columns 2(lane%4), +1. With .trans
// lane holds instead the elements (row 2(lane%4), +1; column lane/4) of the stored matrix, i.e.
// the B fragment of a K x N operand stored N-contiguous (row-major K x N).

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// ---- cp.async ----------------------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1; valid == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}

// 4 bytes global -> shared (scattered destinations: transposed feature tiles); zero when !valid.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- swizzled shared memory tiles --------------------------------------------------------------

// A tile of rows of W 16-bit elements (W % 64 == 0) in shared memory, in 16-byte chunks of 8
// elements. Chunk c of row r is stored at chunk c ^ (r % 8): the 8 row addresses of one ldmatrix
// matrix (8 consecutive rows, same columns) then hit 8 different 16-byte bank groups, and so do
// the cp.async writes of one row. Element offset of (row, col), col anywhere in the row.
template <int W>
__device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(W % 64 == 0, "swizzled rows hold a multiple of 8 chunks");
  return row * W + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
}

// Asynchronously copies kRows rows of W elements (row r at src + r * row_stride, 16-byte aligned)
// into the swizzled tile; rows >= valid_rows are zero-filled (row 0 of src must be addressable).
template <int kRows, int W, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t row_stride, int valid_rows) {
  constexpr int kChunks = W / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int k = 0; k < kRows * kChunks / kThreads; ++k) {
    const int idx = int(threadIdx.x) + k * kThreads;
    const int row = idx / kChunks, c = idx % kChunks;
    const bool valid = row < valid_rows;
    cp_async_16(tile + swizzle<W>(row, c * 8), valid ? src + row * row_stride + c * 8 : src, valid);
  }
}

// Asynchronously copies the rank-R fp32 features of kRows rows (row r at src + r * row_stride, R
// contiguous) into shared memory transposed, as [R][kRows]: the logit-tile loops read one feature
// of many rows at once. Consecutive threads take consecutive rows (conflict-free shared writes);
// rows >= valid_rows are zero-filled.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_features_transposed(float* tile, const float* src, int64_t row_stride,
                                                         int rank, int valid_rows) {
  for (int idx = int(threadIdx.x); idx < kRows * rank; idx += kThreads) {
    const int row = idx % kRows, r = idx / kRows;
    const bool valid = row < valid_rows;
    cp_async_4(tile + idx, valid ? src + row * row_stride + r : src, valid);
  }
}


// ---- warp-level tile products ------------------------------------------------------------------

// C[16 x kN] = A[a_row0 : a_row0 + 16, 0 : W] B[0 : kN, 0 : W]^T, A and B swizzled tiles of rows of W
// elements (the "NT" product: both operands K-contiguous). Per 16-wide K slice: one ldmatrix.x4
// for A (lanes 0-15 address rows 0-15 at column 0, lanes 16-31 the same rows at column 8: matrices
// = a[0..3]) and, per pair of 8-row blocks of B, one ldmatrix.x4 giving both B fragments (matrices:
// rows +0..7 x k +0..7, rows +0..7 x k +8..15, rows +8..15 x k +0..7, rows +8..15 x k +8..15).
template <typename T, int W, int kN>
__device__ __forceinline__ void warp_gemm_nt(FragC (&c)[kN / 8], const T* a_tile, int a_row0, const T* b_tile,
                                             int lane) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) c[n].zero();
#pragma unroll
  for (int kk = 0; kk < W / 16; ++kk) {
    FragA a;
    ldmatrix_x4(a.x, a_tile + swizzle<W>(a_row0 + lane % 16, kk * 16 + (lane / 16) * 8));
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + swizzle<W>(np * 16 + (lane / 16) * 8 + lane % 8, kk * 16 + ((lane / 8) % 2) * 8));
      mma_16816<T>(c[2 * np], a, b[0], b[1]);
      mma_16816<T>(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// C[16 x kN] += A[16 x kK] B[0 : kK, col0 : col0 + kN], A given as kK / 16 fragments, B a swizzled
// tile of rows of W elements stored K x N (row = k, N contiguous): its B fragments come from
// ldmatrix.trans (matrices: k +0..7 x n +0..7, k +8..15 x n +0..7, k +0..7 x n +8..15,
// k +8..15 x n +8..15, i.e. b[0], b[1] of column block n and then of n + 1).
template <typename T, int kK, int kN, int W>
__device__ __forceinline__ void warp_gemm_nn(FragC (&c)[kN / 8], const FragA (&a)[kK / 16], const T* b_tile,
                                             int col0, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + swizzle<W>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8,
                                               col0 + np * 16 + (lane / 16) * 8));
      mma_16816<T>(c[2 * np], a[kk], b[0], b[1]);
      mma_16816<T>(c[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// The kN / 16 A fragments of a 16 x kN product held as C fragments (P, dS), rounded to T.
template <typename T, int kN>
__device__ __forceinline__ void a_fragments(FragA (&a)[kN / 16], const FragC (&c)[kN / 8]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) a[kk] = a_from_c<T>(c[2 * kk], c[2 * kk + 1]);
}

// s += log2(e) * sum_r f_row[row, r] f_col[col, r] over this warp's 16 x kN logit fragment (rows
// row0 + 0..15 of a tile of kRows rows, columns 0..kN-1): the rank-R logit bias, symmetric in its
// two feature sets, so the forward (rows = queries) and the backward (rows = keys) share it. The
// features are stored transposed, [R][kRows] and [R][kN]: per feature, a lane reads its 2 row
// values and one float2 of column values per 8-column block.
template <int kRows, int kN>
__device__ __forceinline__ void add_logit_bias(FragC (&s)[kN / 8], const float* f_row_t, const float* f_col_t,
                                               int rank, int row0, int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int r = 0; r < rank; ++r) {
    const float r0 = f_row_t[r * kRows + row0 + g] * kLog2e;
    const float r1 = f_row_t[r * kRows + row0 + g + 8] * kLog2e;
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
      const float2 cf = *reinterpret_cast<const float2*>(f_col_t + r * kN + n * 8 + 2 * t);
      s[n].x[0] += r0 * cf.x;
      s[n].x[1] += r0 * cf.y;
      s[n].x[2] += r1 * cf.x;
      s[n].x[3] += r1 * cf.y;
    }
  }
}

}  // namespace difforge::attention::detail
