// CPU flash attention forward: per (sequence, query head, block of query rows), stream the
// visible keys in tiles of kBlockK: S = q_aug k_aug^T (one GEMM, bias included), online softmax,
// O += P V (one GEMM). Memory beyond the inputs: the packed keys/values of one chunk of kv groups
// plus one tile set per thread.
#include <algorithm>
#include <vector>

#include "attention/flash_cpu.h"
#include "attention/kv_pack.h"
#include "attention/tile_gemm.h"
#include "attention/tile_math.h"

namespace difforge::attention {
namespace {

using cpu::kBlockK;
using cpu::kBlockQ;

template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> q_aug, logits, acc;
  std::vector<cpu::OnlineSoftmaxRow<acc_t>> softmax;
  ForwardScratch(int64_t E, int64_t D)
      : q_aug(kBlockQ * E), logits(kBlockQ * kBlockK), acc(kBlockQ * D), softmax(kBlockQ) {}
};

// Packed keys of a chunk: k_aug [n, E] and v [n, D] per group, n = the group's visible key count.
template <typename acc_t>
struct ForwardPack {
  std::vector<acc_t> keys, values;
};

template <typename T, typename acc_t>
void attend_block(const ForwardParamsT<acc_t>& p, const cpu::GroupChunk& chunk, const ForwardPack<acc_t>& pack,
                  const cpu::QueryBlock& blk, ForwardScratch<acc_t>& s) {
  const Problem& pr = p.problem;
  const int64_t D = pr.head_dim, E = D + pr.bias_rank;
  const int64_t b = blk.group / pr.heads_kv, h = blk.head, i0 = blk.i0;
  const int64_t q_len = pr.q_len(b), k_len = pr.k_len(b);
  const int64_t rows = blk.rows;
  const int64_t n_keys = key_end(i0 + rows - 1, q_len, k_len, pr.causal);  // the block's last row sees the most
  const int64_t off = chunk.key_offset[blk.group - chunk.first];
  const acc_t* keys = pack.keys.data() + E * off;
  const acc_t* values = pack.values.data() + D * off;

  cpu::pack_queries<T>(p, b, h, i0, rows, s.q_aug.data());
  std::fill(s.acc.begin(), s.acc.begin() + rows * D, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) s.softmax[r] = {};

  for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, n_keys - j0);
    cpu::tile_gemm<acc_t>(rows, nk, E, {s.q_aug.data(), E}, {keys + j0 * E, E, true}, s.logits.data(), kBlockK,
                          false);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* logit = s.logits.data() + r * kBlockK;
      const int64_t visible = key_end(i0 + r, q_len, k_len, pr.causal) - j0;
      for (int64_t j = std::max<int64_t>(visible, 0); j < nk; ++j) logit[j] = cpu::kNegInf<acc_t>;
      const acc_t rescale = s.softmax[r].update(logit, nk);
      if (rescale != acc_t(1)) {
        acc_t* o = s.acc.data() + r * D;
        for (int64_t c = 0; c < D; ++c) o[c] *= rescale;
      }
    }
    cpu::tile_gemm<acc_t>(rows, D, nk, {s.logits.data(), kBlockK}, {values + j0 * D, D}, s.acc.data(), D, true);
  }

  T* out = static_cast<T*>(p.out);
  for (int64_t r = 0; r < rows; ++r) {
    const cpu::OnlineSoftmaxRow<acc_t>& sm = s.softmax[r];
    const acc_t inv = sm.sum > 0 ? acc_t(1) / sm.sum : acc_t(0);
    T* dst = out + (pr.out_row(b, i0 + r) * pr.heads_q + h) * D;
    const acc_t* o = s.acc.data() + r * D;
    for (int64_t c = 0; c < D; ++c) dst[c] = difforge::cpu::to_elem<T>(o[c] * inv);
    p.lse[pr.lse_index(b, h, i0 + r)] = sm.lse();
  }
}

}  // namespace

template <typename acc_t>
void flash_forward_cpu(const ForwardParamsT<acc_t>& p) {
  const Problem& pr = p.problem;
  const int64_t D = pr.head_dim, E = D + pr.bias_rank;
  difforge::cpu::dispatch_float(pr.dtype, [&]<typename T>() {
    if constexpr (std::is_same_v<acc_t, difforge::cpu::acc_type<T>>) {
      ForwardPack<acc_t> pack;
      const int64_t block_q = cpu::query_block_size(pr);
      const auto tasks_of = [&](int64_t b) { return pr.group_size() * ceil_div(pr.q_len(b), block_q); };
      for (const cpu::GroupChunk& chunk : cpu::chunk_groups(pr, (E + D) * sizeof(acc_t), tasks_of)) {
        cpu::pack_kv<T>(p, chunk, pack.keys, pack.values);
        const std::vector<cpu::QueryBlock> blocks = cpu::query_blocks(pr, chunk, block_q);
        cpu::parallel_tasks(
            static_cast<int64_t>(blocks.size()), [&] { return ForwardScratch<acc_t>(E, D); },
            [&](int64_t t, ForwardScratch<acc_t>& s) { attend_block<T>(p, chunk, pack, blocks[t], s); });
      }
    }
  });
}

template void flash_forward_cpu<float>(const ForwardParamsT<float>&);
template void flash_forward_cpu<double>(const ForwardParamsT<double>&);

}  // namespace difforge::attention
