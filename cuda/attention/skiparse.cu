// Skiparse permutations on CUDA: one warp per destination row finds its source row through the shared index
// maps (integer math once per row) and copies it with the widest vector both addresses allow, so every op is
// one read and one write of the activation.
#include <cstdint>

#include "difforge/skiparse_cuda.h"

namespace difforge::skiparse {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename Vec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gather_rows(GatherParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= p.dst_rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t offset = source_offset(p, row);
  const int64_t vectors = p.row_bytes / static_cast<int64_t>(sizeof(Vec));
  Vec* out = reinterpret_cast<Vec*>(static_cast<char*>(p.dst) + row * p.row_bytes);
  if (offset < 0) {
    for (int64_t v = lane; v < vectors; v += 32) out[v] = Vec{};
    return;
  }
  const Vec* in = reinterpret_cast<const Vec*>(static_cast<const char*>(p.src) + offset);
  // Four loads in flight per lane before the stores: a row is only a few KiB, so latency, not issue, bounds it.
  constexpr int kUnroll = 4;
  for (int64_t v = lane; v < vectors; v += 32 * kUnroll) {
    Vec chunk[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * 32 < vectors) chunk[u] = __ldg(in + v + u * 32);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * 32 < vectors) out[v + u * 32] = chunk[u];
    }
  }
}

// The widest access every row start and the row length are aligned to.
int vector_bytes(const GatherParams& p) {
  const auto misaligned = [&](int64_t bytes) {
    return (reinterpret_cast<uintptr_t>(p.src) | reinterpret_cast<uintptr_t>(p.dst)) % bytes != 0 ||
           (p.src_outer_stride | p.src_inner_stride | p.row_bytes) % bytes != 0;
  };
  for (int bytes : {16, 8, 4, 2}) {
    if (!misaligned(bytes)) return bytes;
  }
  return 1;
}

template <typename Vec>
cudaError_t launch(const GatherParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.dst_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gather_rows<Vec><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_skiparse_gather(const GatherParams& p, cudaStream_t stream) {
  if (p.dst_rows == 0 || p.row_bytes == 0) return cudaSuccess;
  if ((p.dst_rows + kWarpsPerBlock - 1) / kWarpsPerBlock > INT32_MAX) return cudaErrorInvalidConfiguration;
  switch (vector_bytes(p)) {
    case 16: return launch<uint4>(p, stream);
    case 8: return launch<uint2>(p, stream);
    case 4: return launch<uint32_t>(p, stream);
    case 2: return launch<uint16_t>(p, stream);
    default: return launch<uint8_t>(p, stream);
  }
}

}  // namespace difforge::skiparse
