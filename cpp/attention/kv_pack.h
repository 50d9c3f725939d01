// Key/value packing of the CPU flash attention kernels. Work is split into kv groups (sequence b,
// kv head): each group's keys are converted once to acc_t in the layouts the tile GEMMs read, with
// the bias features appended as extra channels (spec kv_cache_jensen §3.3's appended-channel form):
//   q_aug = [scale * q, bias_q]  (E = D + R channels),  k_aug = [k, bias_k],
// so q_aug . k_aug = scale * q.k + bias in one GEMM, and the gradients of the bias features come out
// of the same GEMMs as dq and dk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common/element.h"
#include "difforge/attention.h"

namespace difforge::attention::cpu {

// Query rows and keys per tile (the sizes ATen's CPU flash attention uses for long sequences).
inline constexpr int64_t kBlockQ = 256;
inline constexpr int64_t kBlockK = 512;
// Packed copies are made per chunk of kv groups: a chunk grows until it holds enough tasks to keep
// every thread busy, and never (beyond one group) past the byte budget. Extra memory is then
// O(threads * L * D) however many heads and sequences there are.
inline constexpr int64_t kPackBudgetBytes = int64_t(256) << 20;
inline constexpr int64_t kTasksPerThread = 4;

// A contiguous range of kv groups [first, last) and where each group's keys start in the packs.
struct GroupChunk {
  int64_t first = 0, last = 0;
  std::vector<int64_t> key_offset;  // per group in the chunk, + total at the end
  int64_t keys() const { return key_offset.back(); }
};

// Splits the kv groups (b * Hkv + hkv) into chunks; bytes_per_key: pack bytes per key of a group,
// tasks_of(b): the tasks a group of sequence b yields.
template <typename TasksOf>
inline std::vector<GroupChunk> chunk_groups(const Problem& pr, int64_t bytes_per_key, TasksOf&& tasks_of) {
  std::vector<GroupChunk> chunks;
  const int64_t groups = pr.batch * pr.heads_kv;
  const int64_t enough_tasks = kTasksPerThread * at::get_num_threads();
  GroupChunk c;
  c.key_offset = {0};
  int64_t tasks = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b = g / pr.heads_kv, keys = pr.k_len(b);
    const bool full = tasks >= enough_tasks || (c.keys() + keys) * bytes_per_key > kPackBudgetBytes;
    if (c.last > c.first && full) {
      chunks.push_back(c);
      c.first = g;
      c.key_offset = {0};
      tasks = 0;
    }
    c.key_offset.push_back(c.keys() + keys);
    c.last = g + 1;
    tasks += tasks_of(b);
  }
  if (c.last > c.first) chunks.push_back(c);
  return chunks;
}

// Converts keys [j_begin, j_end) of group (b, hkv) to acc_t rows of width D (+ R with_bias) at
// dst + j * width: channel c < D of key j from x (k or v), channel D + r from bias_k.
template <typename T, typename acc_t>
inline void pack_keys(const ForwardParamsT<acc_t>& p, const void* x, const Strides& st, int64_t b, int64_t hkv,
                      int64_t j_begin, int64_t j_end, bool with_bias, acc_t* dst) {
  const Problem& pr = p.problem;
  const int64_t D = pr.head_dim, R = with_bias ? pr.bias_rank : 0, width = D + R;
  for (int64_t j = j_begin; j < j_end; ++j) {
    const T* row = static_cast<const T*>(x) + st.offset(b, pr.k_begin(b) + j, hkv);
    acc_t* out = dst + j * width;
    for (int64_t c = 0; c < D; ++c) out[c] = difforge::cpu::to_acc<acc_t>(row[c]);
    if (R > 0) {
      const acc_t* feat = p.bias.k + (pr.k_row(b, j) * pr.heads_kv + hkv) * R;
      for (int64_t r = 0; r < R; ++r) out[D + r] = feat[r];
    }
  }
}

// Runs f(g, j_begin, j_end) in parallel over slabs of keys [0, keys_of(b)) of every group g of the
// chunk: a chunk may be one long sequence, so splitting by group alone would leave threads idle.
template <typename KeysOf, typename F>
inline void parallel_key_slabs(const Problem& pr, const GroupChunk& chunk, KeysOf&& keys_of, F&& f) {
  constexpr int64_t kSlab = 256;
  std::vector<std::pair<int64_t, int64_t>> slabs;  // (group, first key)
  for (int64_t g = chunk.first; g < chunk.last; ++g)
    for (int64_t j = 0; j < keys_of(g / pr.heads_kv); j += kSlab) slabs.emplace_back(g, j);
  at::parallel_for(0, static_cast<int64_t>(slabs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const auto [g, j] = slabs[s];
      f(g, j, std::min(j + kSlab, keys_of(g / pr.heads_kv)));
    }
  });
}

// The packs every pass reads: each group's visible keys as k_aug rows [n, E] at keys + E * offset and
// its values as rows [n, D] at values + D * offset (offset: the group's GroupChunk::key_offset).
template <typename T, typename acc_t>
inline void pack_kv(const ForwardParamsT<acc_t>& p, const GroupChunk& chunk, std::vector<acc_t>& keys,
                    std::vector<acc_t>& values) {
  const Problem& pr = p.problem;
  const int64_t D = pr.head_dim, E = D + pr.bias_rank;
  keys.resize(E * chunk.keys());
  values.resize(D * chunk.keys());
  const auto k_len = [&](int64_t b) { return pr.k_len(b); };
  parallel_key_slabs(pr, chunk, k_len, [&](int64_t g, int64_t j_begin, int64_t j_end) {
    const int64_t b = g / pr.heads_kv, hkv = g % pr.heads_kv, off = chunk.key_offset[g - chunk.first];
    pack_keys<T>(p, p.k, p.k_strides, b, hkv, j_begin, j_end, p.bias.present(), keys.data() + E * off);
    pack_keys<T>(p, p.v, p.v_strides, b, hkv, j_begin, j_end, false, values.data() + D * off);
  });
}

// Converts query rows [i0, i0 + rows) of sequence b, head h to q_aug = [scale * q, bias_q] ([rows, E]).
template <typename T, typename acc_t>
inline void pack_queries(const ForwardParamsT<acc_t>& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                         acc_t* dst) {
  const Problem& pr = p.problem;
  const int64_t D = pr.head_dim, R = pr.bias_rank, E = D + R;
  const acc_t scale = p.scale;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = static_cast<const T*>(p.q) + p.q_strides.offset(b, pr.q_begin(b) + i0 + r, h);
    acc_t* out = dst + r * E;
    for (int64_t c = 0; c < D; ++c) out[c] = scale * difforge::cpu::to_acc<acc_t>(row[c]);
    if (R > 0) {
      const acc_t* feat = p.bias.q + (pr.out_row(b, i0 + r) * pr.heads_q + h) * R;
      for (int64_t c = 0; c < R; ++c) out[D + c] = feat[c];
    }
  }
}

// Work items of one chunk: (group, query head of the group, first query row), heaviest first
// (causal rows late in a sequence see the most keys), so dynamic scheduling ends evenly.
struct QueryBlock {
  int64_t group, head, i0, rows, cost;
};

// Query rows per work item: kBlockQ for long sequences, fewer for short ones so that they still
// yield a task per thread (ATen's CPU flash attention makes the same choice).
inline int64_t query_block_size(const Problem& pr) {
  return pr.seqlen_q >= 768 ? kBlockQ : (pr.seqlen_q >= 192 ? 64 : 32);
}

inline std::vector<QueryBlock> query_blocks(const Problem& pr, const GroupChunk& chunk, int64_t block_q) {
  std::vector<QueryBlock> blocks;
  for (int64_t g = chunk.first; g < chunk.last; ++g) {
    const int64_t b = g / pr.heads_kv, hkv = g % pr.heads_kv;
    const int64_t q_len = pr.q_len(b), k_len = pr.k_len(b);
    for (int64_t i0 = 0; i0 < q_len; i0 += block_q) {
      const int64_t rows = std::min(block_q, q_len - i0);
      const int64_t cost = rows * (key_end(i0 + rows - 1, q_len, k_len, pr.causal) + 1);
      for (int64_t h = hkv * pr.group_size(); h < (hkv + 1) * pr.group_size(); ++h)
        blocks.push_back({g, h, i0, rows, cost});
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const QueryBlock& a, const QueryBlock& b) { return a.cost > b.cost; });
  return blocks;
}

// Runs f(task) for task in [0, n) on every thread, handing out tasks dynamically: per-task cost varies
// (causal masks, varlen), so a static split would leave threads idle. f(task, scratch) gets a
// per-thread Scratch built once by make_scratch().
template <typename MakeScratch, typename F>
inline void parallel_tasks(int64_t n, MakeScratch&& make_scratch, F&& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t w = begin; w < end; ++w)
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) f(t, scratch);
  });
}

}  // namespace difforge::attention::cpu
