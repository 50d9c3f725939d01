// The GEMM of the CPU flash attention tiles: C[M, N] (+)= A[M, K] B[K, N], row-major, with either
// operand optionally stored transposed (so K and V are packed once, in one layout, for every product).
#pragma once

#include <cstdint>

namespace difforge::attention::cpu {

template <typename acc_t>
struct Operand {
  const acc_t* data = nullptr;
  int64_t ld = 0;            // leading dimension of the stored matrix
  bool transposed = false;   // stored as its transpose: element (i, k) at data[k * ld + i]
};

// acc_t float: the BLAS torch links (MKL sgemm in the x86 wheels) when it exports one, else ATen's
// mm; acc_t double (gradcheck only): ATen's mm.
template <typename acc_t>
void tile_gemm(int64_t M, int64_t N, int64_t K, Operand<acc_t> a, Operand<acc_t> b, acc_t* c, int64_t ldc,
               bool accumulate);

}  // namespace difforge::attention::cpu
