// The top-k / top-p filter of discrete_step's softmax part, as one threshold on order-preserving uint32 keys of the
// raw logits: a column is kept iff ordered_key(l) >= threshold. Radix select (4 passes of 8-bit digits), no sort.
#pragma once

#include <cstdint>
#include <vector>

namespace difforge::sampling::cpu {

// Buffers reused across the rows of one task.
struct FilterScratch {
  std::vector<uint32_t> keys, cand_keys;
  std::vector<float> mass, cand_mass;
};

// The threshold for a row of fp32 logits without NaN / +inf and with row_max its largest finite logit:
//   top-k (0 < top_k < vocab): the key of the k-th largest logit (ties kept);
//   top-p (top_p < 1): among the columns top-k keeps, with p = softmax(l / T) renormalized over them, the largest
//   key K with mass{kept, key >= K} >= top_p * mass{kept} (masses exp(l / T - row_max / T) summed in fp32).
// 0 (keep all) when neither is active.
uint32_t filter_threshold(const float* l, int64_t vocab, int64_t top_k, float top_p, float temperature,
                          float row_max, FilterScratch& scratch);

}  // namespace difforge::sampling::cpu
