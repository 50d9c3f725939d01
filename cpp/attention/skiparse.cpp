// Skiparse permutations on CPU: every destination row is one memcpy from its source row (or a memset for padded
// slots), so each op reads and writes the activation once, whatever its dtype.
#include "attention/skiparse_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace difforge::skiparse {

void skiparse_gather_cpu(const GatherParams& p) {
  const auto* src = static_cast<const char*>(p.src);
  auto* dst = static_cast<char*>(p.dst);
  // ~64 KiB of copies per task keeps small rows from drowning in scheduling.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(p.row_bytes, 1));
  at::parallel_for(0, p.dst_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = source_offset(p, row);
      char* out = dst + row * p.row_bytes;
      if (offset < 0) {
        std::memset(out, 0, p.row_bytes);
      } else {
        std::memcpy(out, src + offset, p.row_bytes);
      }
    }
  });
}

}  // namespace difforge::skiparse
