// The op schemas of torch.ops.difforge: the one place that defines every op's signature.
// Implementations are registered per family (bindings/<family>.cpp, bindings/<family>_cuda.cpp);
// Python wrappers, fake kernels and autograd live in python/difforge/ops/<family>.py.
#include <torch/library.h>

TORCH_LIBRARY(difforge, m) {
  // ---- norm: fused adaLN norm-modulate (spec/adaln_norm_and_load_balance.md) -------------------
  // y = norm(x) * (1 + scale[m(r)]) + shift[m(r)], statistics in fp32, y in x's dtype.
  // norm: "layernorm" (weight, bias optional) | "rmsnorm" (weight optional).
  // scale/shift: None, [D] global, [B, D] or [B, 1, D] per-sample, [B, G, D] with G | L (row l uses l / (L/G)).
  // batch_repeat R: x is [R*B, L, D] and x batch rb reads modulation batch rb % B.
  // cu_seqlens (int32 [B+1]): x is packed [N, D], sequence b reads modulation row b; max_seqlen >= longest.
  // Returns (y, mean [rows] fp32 (layernorm; empty for rmsnorm), rstd [rows] fp32).
  m.def(
      "adaln_modulate(Tensor x, Tensor? scale, Tensor? shift, Tensor? weight, Tensor? bias, str norm, float eps, "
      "int batch_repeat, Tensor? cu_seqlens, int max_seqlen) -> (Tensor y, Tensor mean, Tensor rstd)");
  // x_out = h + gate[m(r)] * o (gate None: 1), then y = adaln_modulate(x_out, ...), in one pass.
  // o may have a different float dtype than h; x_out has h's dtype. Returns (x_out, y, mean, rstd).
  m.def(
      "gated_adaln_modulate(Tensor h, Tensor o, Tensor? gate, Tensor? scale, Tensor? shift, Tensor? weight, "
      "Tensor? bias, str norm, float eps, int batch_repeat, Tensor? cu_seqlens, int max_seqlen) "
      "-> (Tensor x_out, Tensor y, Tensor mean, Tensor rstd)");
  // Backward of both: x is the normalized input (x_out when gated), dx_out the gradient arriving at x_out
  // (gated only; None = 0), o given iff gated. Returns (dx, do, dgate, dscale, dshift, dweight, dbias) in
  // their inputs' dtypes and shapes; a gradient whose input is None comes back as an empty tensor.
  // Modulation and affine gradients use a deterministic two-pass column reduction (no atomics).
  m.def(
      "adaln_modulate_backward(Tensor dy, Tensor? dx_out, Tensor x, Tensor? o, Tensor? gate, Tensor? scale, "
      "Tensor? shift, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, str norm, int batch_repeat, "
      "Tensor? cu_seqlens, int max_seqlen) "
      "-> (Tensor dx, Tensor do, Tensor dgate, Tensor dscale, Tensor dshift, Tensor dweight, Tensor dbias)");

  // ---- attention: flash attention (cpp/include/difforge/attention.h has the exact math) ----------------
  // Batch layout q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; varlen (cu_seqlens_q/k int32 [B+1] given) packed
  // q [total_q, Hq, D], k/v [total_k, Hkv, D]. Hkv | Hq (GQA). Last stride 1, other strides free.
  // scale None: 1/sqrt(D). causal: bottom-right aligned (key j visible to query i iff j <= i + Lk - Lq).
  // max_seqlen_q/k: longest sequence when known (0: computed from cu_seqlens). seqused_k int32 [B]: keys
  // of sequence b are its first seqused_k[b]. bias_q [.., Lq, Hq, R] / bias_k [.., Lk, Hkv, R] (both or
  // neither) add sum_r bias_q[i, r] * bias_k[j, r] to logit (i, j). Returns (out in q's layout and dtype,
  // contiguous; lse fp32 (fp64 for fp64) [B, Hq, Lq] or [Hq, total_q]); a row without visible keys has
  // out 0, lse -inf.
  m.def(
      "flash_attention(Tensor q, Tensor k, Tensor v, float? scale, bool causal, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? seqused_k, Tensor? bias_q, "
      "Tensor? bias_k) -> (Tensor out, Tensor lse)");
  // Gradients of flash_attention given dout (and optionally dlse) and its (out, lse). dq, dk, dv, dbias_q,
  // dbias_k in their inputs' shapes and dtypes (dbias_* empty without a bias). dk/dv are deterministic.
  m.def(
      "flash_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float? scale, bool causal, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, Tensor? seqused_k, Tensor? bias_q, Tensor? bias_k) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias_q, Tensor dbias_k)");

  // ---- kvcache: quantized KV cache + Jensen-bias correction (cpp/include/difforge/kvcache.h) -------------
  // x [B, L, H, D] (fp32/fp16/bf16) -> codes uint8 [B, L, H, D * bits / 8] (packed little-endian along D),
  // step / zero in meta_dtype: [B, L, H, D / group_size] (axis "token") or [B, ceil(L / group_size), H, D]
  // (axis "channel"). bits in {2, 4, 8}. Asymmetric min-max round-to-nearest-even; x^ = zero + step * code.
  m.def(
      "kv_quantize(Tensor x, int bits, int group_size, str axis, ScalarType meta_dtype) "
      "-> (Tensor codes, Tensor step, Tensor zero)");
  // The inverse map: zero + step * code in `dtype`, [B, L, H, D].
  m.def(
      "kv_dequantize(Tensor codes, Tensor step, Tensor zero, int bits, int group_size, str axis, "
      "ScalarType dtype) -> Tensor");
  // softmax over [quantized cache ; sink ; current] keys of the current chunk's queries q [B, Lq, Hq, D].
  // Cache: token-axis codes / step / zero of kv_quantize ([B, Lc, Hkv, ..]), dequantized inside the kernel.
  // k_cur / v_cur [B, Lcur, Hkv, D] and k_sink / v_sink [B, Ls, Hkv, D] (optional) in q's dtype. jensen:
  // "none" | "taylor2" | "taylor4" | "exact": jensen_lambda * b(q, step) is subtracted from the logits of
  // cached keys only. Returns out [B, Lq, Hq, D] in q's dtype. Inference only (no backward).
  m.def(
      "quantized_kv_attention(Tensor q, Tensor k_cur, Tensor v_cur, Tensor k_codes, Tensor k_step, Tensor k_zero, "
      "Tensor v_codes, Tensor v_step, Tensor v_zero, int bits, int group_size, Tensor? k_sink, Tensor? v_sink, "
      "float? scale, str jensen, float jensen_lambda) -> Tensor");
}
