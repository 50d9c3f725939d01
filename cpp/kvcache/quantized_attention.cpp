// CPU attention over [quantized cache ; sink ; current chunk]: per (sequence, query head, block of query rows),
// stream every segment in key tiles: dequantize the tile (cached keys only), S = q_aug k_aug^T (one GEMM),
// subtract the Jensen bias of cached keys, online softmax, O += P V (one GEMM). The cache is never
// dequantized beyond one tile per thread.
//
// taylor2 uses the appended-channel form (spec §3.3): q_aug = [scale q, -lambda scale^2/24 A_q], k_aug =
// [k^, Delta^2] with A_q[j] = sum_{c in group j} q_c^2, so the GEMM yields the corrected logit directly.
// taylor4 (clamped at 0) and exact need the bias per (query, key) and subtract it after the GEMM.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/kv_pack.h"
#include "attention/tile_gemm.h"
#include "attention/tile_math.h"
#include "common/element.h"
#include "kvcache/code_table.h"
#include "kvcache/kvcache_cpu.h"

namespace difforge::kvcache {
namespace {

using attention::cpu::kBlockK;
using attention::cpu::Operand;
using attention::cpu::OnlineSoftmaxRow;
using attention::cpu::tile_gemm;
using difforge::cpu::to_acc;
using difforge::cpu::to_elem;

struct Scratch {
  std::vector<float> q_aug;     // [rows, E]: scale * q (+ taylor2 bias channels)
  std::vector<float> q_bias;    // taylor4: [rows, 2G] (A_q, B_q); exact: [rows, D] (scale * q / 2)
  std::vector<float> logits;    // [rows, kBlockK]
  std::vector<float> acc;       // [rows, D]
  std::vector<float> keys;      // [kBlockK, E]
  std::vector<float> values;    // [kBlockK, D]
  std::vector<float> steps;     // [G, kBlockK]: Delta of group g of each cached key (rows vectorize over keys)
  std::vector<float> order2, order4;  // [kBlockK]: one row's bias sums (taylor4: both orders; exact: order2)
  std::vector<float> codes;     // [D]: one cached row's codes as floats
  std::vector<OnlineSoftmaxRow<float>> softmax;

  Scratch(int64_t block_q, int64_t E, int64_t D, int64_t G)
      : q_aug(block_q * E), q_bias(block_q * std::max(D, 2 * G)), logits(block_q * kBlockK), acc(block_q * D),
        keys(kBlockK * E), values(kBlockK * D), steps(kBlockK * G), order2(kBlockK), order4(kBlockK),
        codes(D), softmax(block_q) {}
};

struct Task {
  int64_t b, h, i0, rows;
};

template <typename T, typename M>
class QuantizedAttention {
 public:
  explicit QuantizedAttention(const QuantizedAttentionParams& p)
      : p_(p), D_(p.head_dim), G_(p.groups()), E_(D_ + (p.jensen == Jensen::taylor2 ? padded(G_) : 0)) {}

  int64_t augmented_width() const { return E_; }

  // taylor2's bias channels, padded to a multiple of 8 (zeros): sgemm runs ~15% slower on K = D + 4.
  static int64_t padded(int64_t channels) { return (channels + 7) / 8 * 8; }

  void run(const Task& t, Scratch& s) const {
    pack_queries(t, s);
    std::fill(s.acc.begin(), s.acc.begin() + t.rows * D_, 0.f);
    for (int64_t r = 0; r < t.rows; ++r) s.softmax[r] = {};
    const int64_t hkv = p_.kv_head(t.h);
    for (int64_t j0 = 0; j0 < p_.cache_len; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, p_.cache_len - j0);
      load_cached_tile(t.b, hkv, j0, nk, s);
      tile_gemm<float>(t.rows, nk, E_, {s.q_aug.data(), E_}, {s.keys.data(), E_, true}, s.logits.data(), kBlockK,
                       false);
      if (p_.jensen == Jensen::taylor4) subtract_taylor4_bias(t.rows, nk, s);
      if (p_.jensen == Jensen::exact) subtract_exact_bias(t.rows, nk, s);
      accumulate(t.rows, nk, s);
    }
    attend_dense(t, p_.k_sink, p_.v_sink, p_.sink_len, s);
    attend_dense(t, p_.k_cur, p_.v_cur, p_.cur_len, s);
    write_out(t, s);
  }

 private:
  void pack_queries(const Task& t, Scratch& s) const {
    const float scale = p_.scale;
    for (int64_t r = 0; r < t.rows; ++r) {
      const T* q = static_cast<const T*>(p_.q) + p_.q_strides.offset(t.b, t.i0 + r, t.h);
      float* qa = s.q_aug.data() + r * E_;
      for (int64_t c = 0; c < D_; ++c) qa[c] = scale * to_acc<float>(q[c]);
      if (p_.jensen == Jensen::none) continue;
      for (int64_t g = 0; g < G_; ++g) {
        float a = 0.f, b4 = 0.f;
        for (int64_t c = g * p_.group_size; c < (g + 1) * p_.group_size; ++c) {
          const float q2 = to_acc<float>(q[c]) * to_acc<float>(q[c]);
          a += q2;
          b4 += q2 * q2;
        }
        if (p_.jensen == Jensen::taylor2) qa[D_ + g] = -p_.lambda * taylor2_coefficient(scale) * a;  // pad stays 0
        if (p_.jensen == Jensen::taylor4) {
          s.q_bias[r * 2 * G_ + g] = a;
          s.q_bias[r * 2 * G_ + G_ + g] = b4;
        }
      }
      if (p_.jensen == Jensen::exact)
        for (int64_t c = 0; c < D_; ++c) s.q_bias[r * D_ + c] = 0.5f * qa[c];
    }
  }

  // Dequantizes cached keys/values [j0, j0 + nk) of (b, hkv) into the tile buffers.
  void load_cached_tile(int64_t b, int64_t hkv, int64_t j0, int64_t nk, Scratch& s) const {
    for (int64_t j = 0; j < nk; ++j) {
      dequantize_row(p_.k_cache, b, j0 + j, hkv, s.keys.data() + j * E_, s.steps.data() + j, s.codes.data());
      dequantize_row(p_.v_cache, b, j0 + j, hkv, s.values.data() + j * D_, nullptr, s.codes.data());
      if (p_.jensen == Jensen::taylor2) {
        float* extra = s.keys.data() + j * E_ + D_;
        for (int64_t g = 0; g < G_; ++g) extra[g] = s.steps[g * kBlockK + j] * s.steps[g * kBlockK + j];
        std::fill(extra + G_, s.keys.data() + (j + 1) * E_, 0.f);  // padding (dense tiles reuse the buffer)
      }
    }
  }

  // steps (keys only): where the step of group 0 goes, group g at steps[g * kBlockK]. code_values: [D].
  void dequantize_row(const QuantizedSegment& seg, int64_t b, int64_t j, int64_t hkv, float* dst, float* steps,
                      float* code_values) const {
    const uint8_t* codes = seg.codes + seg.codes_strides.offset(b, j, hkv);
    const M* step = static_cast<const M*>(seg.step) + seg.step_strides.offset(b, j, hkv);
    const M* zero = static_cast<const M*>(seg.zero) + seg.zero_strides.offset(b, j, hkv);
    cpu::unpack_row(codes, D_, p_.bits, code_values);
    for (int64_t g = 0; g < G_; ++g) {
      const float st = to_acc<float>(step[g]), z = to_acc<float>(zero[g]);
      if (steps != nullptr) steps[g * kBlockK] = st;
#pragma omp simd
      for (int64_t c = g * p_.group_size; c < (g + 1) * p_.group_size; ++c)
        dst[c] = std::fma(st, code_values[c], z);  // decode(), vectorized
    }
  }

  void subtract_taylor4_bias(int64_t rows, int64_t nk, Scratch& s) const {
    const float c2 = taylor2_coefficient(p_.scale), c4 = taylor4_coefficient(p_.scale), lambda = p_.lambda;
    float* s2 = s.order2.data();
    float* s4 = s.order4.data();
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = s.q_bias.data() + r * 2 * G_;
      const float* b4 = a + G_;
      std::fill(s2, s2 + nk, 0.f);
      std::fill(s4, s4 + nk, 0.f);
      for (int64_t g = 0; g < G_; ++g) {
        const float* step = s.steps.data() + g * kBlockK;
#pragma omp simd
        for (int64_t j = 0; j < nk; ++j) {
          const float d2 = step[j] * step[j];
          s2[j] += a[g] * d2;
          s4[j] += b4[g] * d2 * d2;
        }
      }
      float* logit = s.logits.data() + r * kBlockK;
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) logit[j] -= lambda * std::max(0.f, c2 * s2[j] - c4 * s4[j]);
    }
  }

  void subtract_exact_bias(int64_t rows, int64_t nk, Scratch& s) const {
    float* bias = s.order2.data();
    for (int64_t r = 0; r < rows; ++r) {
      const float* half_q = s.q_bias.data() + r * D_;  // scale * q_c / 2
      std::fill(bias, bias + nk, 0.f);
      for (int64_t c = 0; c < D_; ++c) {
        const float* step = s.steps.data() + (c / p_.group_size) * kBlockK;
        for (int64_t j = 0; j < nk; ++j) bias[j] += log_sinhc(half_q[c] * step[j]);
      }
      float* logit = s.logits.data() + r * kBlockK;
      for (int64_t j = 0; j < nk; ++j) logit[j] -= p_.lambda * bias[j];
    }
  }

  // Unquantized keys [0, len) of a sink or current segment, never biased: the plain D-channel product.
  void attend_dense(const Task& t, const DenseSegment& k, const DenseSegment& v, int64_t len, Scratch& s) const {
    const int64_t hkv = p_.kv_head(t.h);
    for (int64_t j0 = 0; j0 < len; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, len - j0);
      for (int64_t j = 0; j < nk; ++j) {
        const T* kr = static_cast<const T*>(k.data) + k.strides.offset(t.b, j0 + j, hkv);
        const T* vr = static_cast<const T*>(v.data) + v.strides.offset(t.b, j0 + j, hkv);
        float* kd = s.keys.data() + j * D_;
        float* vd = s.values.data() + j * D_;
        for (int64_t c = 0; c < D_; ++c) {
          kd[c] = to_acc<float>(kr[c]);
          vd[c] = to_acc<float>(vr[c]);
        }
      }
      tile_gemm<float>(t.rows, nk, D_, {s.q_aug.data(), E_}, {s.keys.data(), D_, true}, s.logits.data(), kBlockK,
                       false);
      accumulate(t.rows, nk, s);
    }
  }

  // Online softmax over the tile's logits, then O += P V.
  void accumulate(int64_t rows, int64_t nk, Scratch& s) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float rescale = s.softmax[r].update(s.logits.data() + r * kBlockK, nk);
      if (rescale != 1.f) {
        float* o = s.acc.data() + r * D_;
        for (int64_t c = 0; c < D_; ++c) o[c] *= rescale;
      }
    }
    tile_gemm<float>(rows, D_, nk, {s.logits.data(), kBlockK}, {s.values.data(), D_}, s.acc.data(), D_, true);
  }

  void write_out(const Task& t, const Scratch& s) const {
    T* out = static_cast<T*>(p_.out);
    for (int64_t r = 0; r < t.rows; ++r) {
      const float sum = s.softmax[r].sum, inv = sum > 0.f ? 1.f / sum : 0.f;
      T* dst = out + ((t.b * p_.q_len + t.i0 + r) * p_.heads_q + t.h) * D_;
      const float* o = s.acc.data() + r * D_;
      for (int64_t c = 0; c < D_; ++c) dst[c] = to_elem<T>(o[c] * inv);
    }
  }

  const QuantizedAttentionParams& p_;
  const int64_t D_, G_, E_;
};

// Query rows per task: long chunks get ATen-sized blocks, short ones smaller blocks so every thread has work.
int64_t query_block_size(int64_t q_len) { return q_len >= 768 ? 256 : (q_len >= 192 ? 64 : 32); }

}  // namespace

void quantized_kv_attention_cpu(const QuantizedAttentionParams& p) {
  const int64_t block_q = query_block_size(p.q_len);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t i0 = 0; i0 < p.q_len; i0 += block_q) tasks.push_back({b, h, i0, std::min(block_q, p.q_len - i0)});
  difforge::cpu::dispatch_float(p.dtype, [&]<typename T>() {
    difforge::cpu::dispatch_float(p.meta_dtype, [&]<typename M>() {
      if constexpr (!std::is_same_v<T, double> && !std::is_same_v<M, double>) {
        const QuantizedAttention<T, M> kernel(p);
        attention::cpu::parallel_tasks(
            static_cast<int64_t>(tasks.size()),
            [&] { return Scratch(block_q, kernel.augmented_width(), p.head_dim, p.groups()); },
            [&](int64_t i, Scratch& s) { kernel.run(tasks[i], s); });
      }
    });
  });
}

}  // namespace difforge::kvcache
