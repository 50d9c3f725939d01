// The W4A16 GEMM for one activation dtype: the skinny kernel (weight-bandwidth bound) for m <= kSkinnyMaxRows,
// the tiled kernel above. Instantiated in nvfp4_linear_<dtype>.cu.
#pragma once

#include "nvfp4_linear_launch.cuh"
#include "nvfp4_linear_skinny.cuh"
#include "nvfp4_linear_tiled.cuh"

namespace difforge::formats::detail {

constexpr int kTiledBlockM = 128;

inline LinearAccess linear_access(const Nvfp4LinearParams& p) {
  LinearAccess a;
  a.x_vector = aligned_to(p.x, 16) && p.x_row_stride % 8 == 0;
  // 16-byte weight loads start at even 16-blocks: aligned when the row pitch k / 2 is a multiple of 16 bytes.
  a.weight_load_bytes = aligned_to(p.w_packed, 16) && p.k % 32 == 0 ? 16 : aligned_to(p.w_packed, 8) ? 8 : 1;
  a.out_pairs = aligned_to(p.out, 4);
  return a;
}

template <DType D>
cudaError_t launch_nvfp4_linear_typed(const Nvfp4LinearParams& p, cudaStream_t stream) {
  using T = cuda::elem_t<D>;
  const LinearAccess access = linear_access(p);
  if (p.m <= kSkinnyMaxRows) {
    using S = SkinnyTiles;
    const dim3 grid(unsigned(ceil_div(p.n, S::kBlockN)), unsigned(ceil_div(p.m, S::kBlockM)));
    nvfp4_linear_skinny_kernel<T><<<grid, S::kThreads, 0, stream>>>(p, access);
    return cudaGetLastError();
  }
  using Tiles = TiledTiles<kTiledBlockM>;
  const int64_t m_tiles = ceil_div(p.m, Tiles::kBlockM);
  if (m_tiles > 65535) return cudaErrorInvalidValue;  // grid.y
  const auto kernel = nvfp4_linear_tiled_kernel<T, kTiledBlockM>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tiles::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(ceil_div(p.n, Tiles::kBlockN)), unsigned(m_tiles));
  kernel<<<grid, Tiles::kThreads, Tiles::kSmemBytes, stream>>>(p, access);
  return cudaGetLastError();
}

}  // namespace difforge::formats::detail
