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

  // ---- attention: Skiparse permutations (cpp/include/difforge/skiparse_index.h has the maps) ---------------
  // grid (T, H, W) with N = T*H*W; dims 2 (Skiparse-2D, G = P^2 sub-sequences) or 1 (1D on the flat index,
  // G = P). Sparse layout [G_loc * B, N'/G, ...], row s * B + b; each sub-sequence holds its valid tokens
  // first (sub-grid row-major) and zeros after them. SSP rank r of S (S | G) holds sub-sequences
  // [r * G / S, (r + 1) * G / S). Rows (dims after the first two) are moved whole, any dtype.
  // x [B, N, ...] -> the local rows of the sparse layout.
  m.def("skiparse_rearrange(Tensor x, int[] grid, int sparse_ratio, str mode, int dims, int ssp_rank, int ssp_size) "
        "-> Tensor");
  // Inverse: local sparse rows -> [B, N, ...] in original order; tokens held by other ranks are zeros.
  m.def("skiparse_restore(Tensor xs, int[] grid, int sparse_ratio, str mode, int dims, int ssp_rank, int ssp_size) "
        "-> Tensor");
  // All sparse rows in mode from_mode -> the same tokens in the other mode (an involution).
  m.def("skiparse_switch(Tensor xs, int[] grid, int sparse_ratio, str from_mode, int dims) -> Tensor");
  // SSP switch around one all_to_all_single: local rows -> send buffer [S, G_loc^2 * B * base, ...] (row
  // (dest rank, dest local sub-sequence, source local sub-sequence, b, pos)), and the received buffer -> local
  // rows in the other mode.
  m.def("skiparse_exchange_send(Tensor xs, int[] grid, int sparse_ratio, str from_mode, int dims, int ssp_rank, "
        "int ssp_size) -> Tensor");
  m.def("skiparse_exchange_receive(Tensor received, int[] grid, int sparse_ratio, str from_mode, int dims, "
        "int ssp_rank, int ssp_size) -> Tensor");

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

  // ---- formats: HiF8 and NVFP4 codecs and quantized GEMMs (cpp/include/difforge/{hif8,nvfp4}.h) ----------
  // HiF8 codes of fp32(x * scale) (scale: fp32 one-element tensor, None = 1), same shape, uint8. rounding:
  // "ta" (ties away from zero) | "hybrid" (TA for |e| < 4, SSR elsewhere). Overflow -> +-Inf (0x6F/0xEF) unless
  // saturate (+-32768); NaN -> 0x80.
  m.def("hif8_encode(Tensor x, Tensor? scale, bool saturate, str rounding) -> Tensor");
  // decode(codes) / scale in `dtype` (scale None = 1).
  m.def("hif8_decode(Tensor codes, Tensor? scale, ScalarType dtype) -> Tensor");
  // Per-tensor scaled encode in one fused pass: s = target / amax(|x|) (1 if amax is 0 or not finite),
  // codes = hif8_encode(x, s). Returns (codes uint8, s fp32 0-dim).
  m.def("hif8_quantize(Tensor x, float target, bool saturate, str rounding) -> (Tensor codes, Tensor scale)");
  // Fake quantization (QDQ) decode(encode(x * s)) / s in `dtype`, s as in hif8_quantize. Autograd: straight
  // through.
  m.def("hif8_fake_quantize(Tensor x, float target, str rounding, ScalarType dtype) -> Tensor");
  // The HiF8 codes of hif8_quantize mapped exactly to E4M3 after the power-of-two shift 2^k (k the largest
  // with target * 2^k <= 448): x ~ e4m3 * scale_inv, scale_inv = 1 / (s * 2^k). Returns (e4m3
  // float8_e4m3fn, scale_inv fp32 0-dim), the operands of torch._scaled_mm.
  m.def("hif8_quantize_e4m3(Tensor x, float target, str rounding) -> (Tensor e4m3, Tensor scale_inv)");
  // y = x^ @ W^T + bias with W^ = decode(w_codes) / w_scale ([N, K], w_scale fp32 one element). x float:
  // x^ = hif8_fake_quantize(x, 15) (per-tensor amax scaling); x uint8 codes: x^ = decode(x) / x_scale.
  // fp32 accumulation; out in out_dtype (None: x's dtype, bf16 for codes). N, K multiples of 16.
  m.def(
      "hif8_linear(Tensor x, Tensor w_codes, Tensor w_scale, Tensor? bias, Tensor? x_scale, ScalarType? out_dtype) "
      "-> Tensor");
  // NVFP4 of x [..., K] (fp32/bf16/fp16, K % 16 == 0) in torchao's op order: block_scales float8_e4m3fn
  // [..., K/16], packed uint8 [..., K/2] (element 2j in the low nibble). per_tensor_scale (fp32 one element,
  // amax / 2688) or None (one-level). block_2d: each scale from the amax of its 16 x 16 tile (rows over the
  // flattened leading dims). stochastic: stochastic rounding from Philox(seed, offset).
  m.def(
      "nvfp4_quantize(Tensor x, Tensor? per_tensor_scale, bool block_2d, bool stochastic, int seed, int offset) "
      "-> (Tensor block_scales, Tensor packed)");
  // e2m1(code) * (per_tensor_scale * block_scale) (or * block_scale), [..., K] in `dtype`.
  m.def("nvfp4_dequantize(Tensor block_scales, Tensor packed, Tensor? per_tensor_scale, ScalarType dtype) -> Tensor");
  // W4A16: y = x @ W^T + bias, x [..., K] bf16/fp16, W the NVFP4 weight [N, K] (block_scales [N, K/16], packed
  // [N, K/2], per-tensor scale or None), dequantized inside the GEMM; fp32 accumulation; y [..., N] in x's
  // dtype. N, K multiples of 16. Inference only (no backward).
  m.def(
      "nvfp4_linear(Tensor x, Tensor w_block_scales, Tensor w_packed, Tensor? w_per_tensor_scale, Tensor? bias) "
      "-> Tensor");

  // ---- sampling: fused discrete-diffusion sampling steps (cpp/include/difforge/sampling.h) -----------------
  // One per-position update of a masked / uniform sampler over rows of logits [..., V] (fp32/fp16/bf16, last stride
  // 1, V >= 2): the row draws from q = w_p softmax_T(filtered l) + w_u uniform + w_d 1[y = point] with weights from
  // the rule and coef [..., 3] fp32 (rows = logits' leading dims; point int64 [...]):
  //   "mixture": (w_p, w_u, w_d) = coef; rows with coef[0] <= 0 are never read (stats NaN)
  //   "euler" (W = min(c S', 1)), "tau_leap" (L = c S', one jump L e^-L), "ctmc" (L = c (S' + V - 1), split
  //   S' : V - 1 between softmax and uniform), c = coef[0] finite >= 0, S' = sum_{y != point} exp(l_y); these
  //   exclude the point from the softmax and uniform parts when 0 <= point < V.
  // Softmax part: argmax over allowed y of l_y / T + Gumbel (greedy: argmax l_y, ties to the lower index), after
  // top_k (0 or >= V: off; ties kept) and top_p (1: off; softmax(l / T) of the top-k set) filters; no allowed
  // column: the point. Philox draws from (seed in [0, 2^63), offset in [0, 2^32), row, column): reproducible and
  // equal on CPU and CUDA. Returns token int64 [...] and stats fp32 [..., 5] over the raw logits: (log softmax at
  // the token (NaN outside [0, V)), lse, entropy, top1, top2). A row that cannot be sampled (NaN / +inf logit,
  // no finite logit, invalid weights) gets token -1 and NaN stats; the op never syncs to report it.
  m.def(
      "discrete_step(Tensor logits, Tensor point, Tensor coef, str rule, float temperature, bool greedy, int top_k, "
      "float top_p, int seed, int offset) -> (Tensor token, Tensor stats)");
  // Tweedie tau-leaping (SEDD analytic, uniform process): log_score [..., N] log concrete scores (float dtypes),
  // current int64 [...] in [0, N), e fp32 [...] = exp(-(sigma_t - sigma_s)) in (0, 1]. Draws y from
  // max(p_y, 0), p_y = [s_y / e + (e - 1) / (N e) sum_z s_z] [(1 - e) / N + e 1[y = current]]; no positive mass:
  // current. Returns token int64 [...]; -1 for a bad row (NaN / +inf / no finite score, current or e out of range).
  m.def("tweedie_step(Tensor log_score, Tensor current, Tensor e, int seed, int offset) -> Tensor");
  // Per row b of key fp32 [B, L]: the min(k[b], #eligible) eligible positions with the largest key / gumbel_tau + G
  // (gumbel_tau > 0; G from Philox stream 3) or key (gumbel_tau = 0), ties to the lower index, NaN lowest, k < 0
  // taken as 0; united with {eligible, key >= threshold[b]} when threshold (fp32 [B]) is given. eligible bool
  // [B, L], k int64 [B]. Returns selected bool [B, L]. No host sync.
  m.def(
      "select_positions(Tensor key, Tensor eligible, Tensor k, Tensor? threshold, float gumbel_tau, int seed, "
      "int offset) -> Tensor");
}
