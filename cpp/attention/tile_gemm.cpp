#include "attention/tile_gemm.h"

#include <ATen/ATen.h>

#include <type_traits>

// Fortran (LP64) sgemm of the BLAS torch links. Weak: a torch that does not export it leaves it null.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace difforge::attention::cpu {
namespace {

template <typename acc_t>
at::Tensor view_of(const Operand<acc_t>& x, int64_t rows, int64_t cols) {
  const auto options = at::TensorOptions().dtype(at::CppTypeToScalarType<acc_t>::value);
  const int64_t row_stride = x.transposed ? 1 : x.ld, col_stride = x.transposed ? x.ld : 1;
  return at::from_blob(const_cast<acc_t*>(x.data), {rows, cols}, {row_stride, col_stride}, options);
}

// Column-major BLAS sees the row-major C as C^T = B^T A^T; a stored-transposed operand is "T".
void blas_sgemm(int64_t M, int64_t N, int64_t K, const Operand<float>& a, const Operand<float>& b, float* c,
                int64_t ldc, bool accumulate) {
  const int m = int(N), n = int(M), k = int(K), lb = int(b.ld), la = int(a.ld), lc = int(ldc);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  sgemm_(b.transposed ? "T" : "N", a.transposed ? "T" : "N", &m, &n, &k, &alpha, b.data, &lb, a.data, &la, &beta,
         c, &lc);
}

}  // namespace

template <typename acc_t>
void tile_gemm(int64_t M, int64_t N, int64_t K, Operand<acc_t> a, Operand<acc_t> b, acc_t* c, int64_t ldc,
               bool accumulate) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr && K > 0) return blas_sgemm(M, N, K, a, b, c, ldc, accumulate);
  }
  at::Tensor out = view_of(Operand<acc_t>{c, ldc}, M, N);
  if (K == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const at::Tensor product = at::mm(view_of(a, M, K), view_of(b, K, N));
  accumulate ? out.add_(product) : out.copy_(product);
}

template void tile_gemm<float>(int64_t, int64_t, int64_t, Operand<float>, Operand<float>, float*, int64_t, bool);
template void tile_gemm<double>(int64_t, int64_t, int64_t, Operand<double>, Operand<double>, double*, int64_t,
                                bool);

}  // namespace difforge::attention::cpu
