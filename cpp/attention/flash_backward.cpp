// CPU flash attention backward (FlashAttention-2 recurrences on fp32 tiles). One task per
// (sequence, query head) walks its query blocks and visible key tiles:
//   P  = exp(q_aug k_aug^T - lse)          dV_h     += P^T dO
//   dP = dO V^T                            dS        = P * (dP - delta),  delta = rowsum(dO * O) - dlse
//   dq_aug = dS k_aug  -> dq = scale * dq_aug[:, :D], dbias_q = dq_aug[:, D:]
//   dk_aug_h += dS^T q_aug -> dk_h, dbias_k_h
// dq is complete inside its task. dk / dv / dbias_k of a kv head are per-query-head partials reduced
// over the group in head order afterwards: deterministic, no atomics.
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
struct BackwardScratch {
  std::vector<acc_t> q_aug, dout, probs, dlogits, dq_aug, delta, lse;
  BackwardScratch(int64_t E, int64_t D)
      : q_aug(kBlockQ * E), dout(kBlockQ * D), probs(kBlockQ * kBlockK), dlogits(kBlockQ * kBlockK),
        dq_aug(kBlockQ * E), delta(kBlockQ), lse(kBlockQ) {}
};

// Packed keys of a chunk per group (n keys): k_aug [n, E], v [n, D]; and the per-query-head partial
// gradients [n, group_size, E] (dk_aug) and [n, group_size, D] (dv).
template <typename acc_t>
struct BackwardPack {
  std::vector<acc_t> keys, values, dkeys, dvalues;
};

template <typename T, typename acc_t>
void pack_chunk(const BackwardParamsT<acc_t>& p, const cpu::GroupChunk& chunk, BackwardPack<acc_t>& pack) {
  const ForwardParamsT<acc_t>& f = p.fwd;
  const Problem& pr = f.problem;
  const int64_t D = pr.head_dim, E = D + pr.bias_rank, G = pr.group_size(), n_all = chunk.keys();
  cpu::pack_kv<T>(f, chunk, pack.keys, pack.values);
  pack.dkeys.assign(G * E * n_all, acc_t(0));
  pack.dvalues.assign(G * D * n_all, acc_t(0));
}

// Loads dO (acc_t), lse and delta = rowsum(dO * O) - dlse of query rows [i0, i0 + rows).
template <typename T, typename acc_t>
void load_output_grads(const BackwardParamsT<acc_t>& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                       BackwardScratch<acc_t>& s) {
  const Problem& pr = p.fwd.problem;
  const int64_t D = pr.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const T* dout = static_cast<const T*>(p.dout) + p.dout_strides.offset(b, pr.q_begin(b) + i0 + r, h);
    const T* out = static_cast<const T*>(p.fwd.out) + (pr.out_row(b, i0 + r) * pr.heads_q + h) * D;
    acc_t* g = s.dout.data() + r * D;
    acc_t dot = 0;
    for (int64_t c = 0; c < D; ++c) {
      g[c] = difforge::cpu::to_acc<acc_t>(dout[c]);
      dot += g[c] * difforge::cpu::to_acc<acc_t>(out[c]);
    }
    const int64_t li = pr.lse_index(b, h, i0 + r);
    s.lse[r] = p.fwd.lse[li];
    s.delta[r] = dot - (p.dlse != nullptr ? p.dlse[li] : acc_t(0));
  }
}

template <typename T, typename acc_t>
void backward_head(const BackwardParamsT<acc_t>& p, const cpu::GroupChunk& chunk, BackwardPack<acc_t>& pack,
                   int64_t g, int64_t h, BackwardScratch<acc_t>& s) {
  const Problem& pr = p.fwd.problem;
  const int64_t D = pr.head_dim, R = pr.bias_rank, E = D + R, G = pr.group_size();
  const int64_t b = g / pr.heads_kv, local_head = h % G;
  const int64_t q_len = pr.q_len(b), k_len = pr.k_len(b);
  const int64_t off = chunk.key_offset[g - chunk.first];
  const acc_t* keys = pack.keys.data() + E * off;
  const acc_t* values = pack.values.data() + D * off;
  acc_t* dkeys = pack.dkeys.data() + (off * G + local_head) * E;  // row j at dkeys + j * G * E
  acc_t* dvalues = pack.dvalues.data() + (off * G + local_head) * D;

  for (int64_t i0 = 0; i0 < q_len; i0 += kBlockQ) {
    const int64_t rows = std::min(kBlockQ, q_len - i0);
    const int64_t n_keys = key_end(i0 + rows - 1, q_len, k_len, pr.causal);
    cpu::pack_queries<T>(p.fwd, b, h, i0, rows, s.q_aug.data());
    load_output_grads<T>(p, b, h, i0, rows, s);
    std::fill(s.dq_aug.begin(), s.dq_aug.begin() + rows * E, acc_t(0));

    for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, n_keys - j0);
      cpu::tile_gemm<acc_t>(rows, nk, E, {s.q_aug.data(), E}, {keys + j0 * E, E, true}, s.probs.data(), kBlockK,
                            false);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* prob = s.probs.data() + r * kBlockK;
        const int64_t visible = std::clamp<int64_t>(key_end(i0 + r, q_len, k_len, pr.causal) - j0, 0, nk);
        const acc_t lse = s.lse[r];
        if (lse == cpu::kNegInf<acc_t>) {
          std::fill(prob, prob + nk, acc_t(0));
          continue;
        }
        for (int64_t j = 0; j < visible; ++j) prob[j] = cpu::exp_nonpositive(std::min(prob[j] - lse, acc_t(0)));
        std::fill(prob + visible, prob + nk, acc_t(0));
      }
      // dV += P^T dO
      cpu::tile_gemm<acc_t>(nk, D, rows, {s.probs.data(), kBlockK, true}, {s.dout.data(), D}, dvalues + j0 * G * D,
                            G * D, true);
      // dS = P * (dO V^T - delta)
      cpu::tile_gemm<acc_t>(rows, nk, D, {s.dout.data(), D}, {values + j0 * D, D, true}, s.dlogits.data(), kBlockK,
                            false);
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* prob = s.probs.data() + r * kBlockK;
        acc_t* ds = s.dlogits.data() + r * kBlockK;
        for (int64_t j = 0; j < nk; ++j) ds[j] = prob[j] * (ds[j] - s.delta[r]);
      }
      // dq_aug += dS k_aug;  dk_aug += dS^T q_aug
      cpu::tile_gemm<acc_t>(rows, E, nk, {s.dlogits.data(), kBlockK}, {keys + j0 * E, E}, s.dq_aug.data(), E, true);
      cpu::tile_gemm<acc_t>(nk, E, rows, {s.dlogits.data(), kBlockK, true}, {s.q_aug.data(), E}, dkeys + j0 * G * E,
                            G * E, true);
    }

    T* dq = static_cast<T*>(p.dq);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = pr.out_row(b, i0 + r) * pr.heads_q + h;
      const acc_t* src = s.dq_aug.data() + r * E;
      for (int64_t c = 0; c < D; ++c) dq[row * D + c] = difforge::cpu::to_elem<T>(p.fwd.scale * src[c]);
      for (int64_t c = 0; c < R; ++c) p.dbias_q[row * R + c] = src[D + c];
    }
  }
}

// dk / dv / dbias_k of every stored key of the chunk: the group's per-head partials summed in head
// order; keys past k_len (seqused_k) get zeros.
template <typename T, typename acc_t>
void reduce_kv_grads(const BackwardParamsT<acc_t>& p, const cpu::GroupChunk& chunk, const BackwardPack<acc_t>& pack) {
  const Problem& pr = p.fwd.problem;
  const int64_t D = pr.head_dim, R = pr.bias_rank, E = D + R, G = pr.group_size();
  const auto k_stored = [&](int64_t b) { return pr.k_stored(b); };
  cpu::parallel_key_slabs(pr, chunk, k_stored, [&](int64_t g, int64_t j_begin, int64_t j_end) {
    std::vector<acc_t> dk(E), dv(D);
    const int64_t b = g / pr.heads_kv, hkv = g % pr.heads_kv, off = chunk.key_offset[g - chunk.first];
    const int64_t k_len = pr.k_len(b);
    for (int64_t j = j_begin; j < j_end; ++j) {
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for (int64_t l = 0; j < k_len && l < G; ++l) {
        const acc_t* pk = pack.dkeys.data() + ((off + j) * G + l) * E;
        const acc_t* pv = pack.dvalues.data() + ((off + j) * G + l) * D;
        for (int64_t c = 0; c < E; ++c) dk[c] += pk[c];
        for (int64_t c = 0; c < D; ++c) dv[c] += pv[c];
      }
      const int64_t row = pr.k_row(b, j) * pr.heads_kv + hkv;
      T* dk_out = static_cast<T*>(p.dk) + row * D;
      T* dv_out = static_cast<T*>(p.dv) + row * D;
      for (int64_t c = 0; c < D; ++c) {
        dk_out[c] = difforge::cpu::to_elem<T>(dk[c]);
        dv_out[c] = difforge::cpu::to_elem<T>(dv[c]);
      }
      for (int64_t c = 0; c < R; ++c) p.dbias_k[row * R + c] = dk[D + c];
    }
  });
}

}  // namespace

template <typename acc_t>
void flash_backward_cpu(const BackwardParamsT<acc_t>& p) {
  const Problem& pr = p.fwd.problem;
  const int64_t D = pr.head_dim, E = D + pr.bias_rank, G = pr.group_size();
  difforge::cpu::dispatch_float(pr.dtype, [&]<typename T>() {
    if constexpr (std::is_same_v<acc_t, difforge::cpu::acc_type<T>>) {
      BackwardPack<acc_t> pack;
      const int64_t bytes_per_key = (E + D + G * (E + D)) * sizeof(acc_t);
      const auto tasks_of = [&](int64_t) { return G; };
      for (const cpu::GroupChunk& chunk : cpu::chunk_groups(pr, bytes_per_key, tasks_of)) {
        pack_chunk<T>(p, chunk, pack);
        // Tasks: (group, query head), heaviest sequences first.
        std::vector<std::pair<int64_t, int64_t>> tasks;
        for (int64_t g = chunk.first; g < chunk.last; ++g)
          for (int64_t l = 0; l < G; ++l) tasks.emplace_back(g, (g % pr.heads_kv) * G + l);
        std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& x, const auto& y) {
          const int64_t bx = x.first / pr.heads_kv, by = y.first / pr.heads_kv;
          return pr.q_len(bx) * pr.k_len(bx) > pr.q_len(by) * pr.k_len(by);
        });
        cpu::parallel_tasks(
            static_cast<int64_t>(tasks.size()), [&] { return BackwardScratch<acc_t>(E, D); },
            [&](int64_t t, BackwardScratch<acc_t>& s) {
              backward_head<T>(p, chunk, pack, tasks[t].first, tasks[t].second, s);
            });
        reduce_kv_grads<T>(p, chunk, pack);
      }
    }
  });
}

template void flash_backward_cpu<float>(const BackwardParamsT<float>&);
template void flash_backward_cpu<double>(const BackwardParamsT<double>&);

}  // namespace difforge::attention
