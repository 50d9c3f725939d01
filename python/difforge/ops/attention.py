"""Flash attention: tiled online-softmax attention that never materializes the Lq x Lk matrix.

Math: ``cpp/include/difforge/attention.h``. Kernels: ``cpp/attention`` (CPU) and ``cuda/attention``
(CUDA); schemas: ``bindings/schemas.cpp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difforge.ops._autograd import forbid_double_backward

_ops = torch.ops.difforge


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_k: Tensor | None = None,
    logit_bias_q: Tensor | None = None,
    logit_bias_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``softmax(scale * q k^T + bias) v`` per head, with its log-sum-exp.

    Args:
        q: ``[B, Lq, Hq, D]``, or packed ``[total_q, Hq, D]`` with ``cu_seqlens_q``.
        k, v: ``[B, Lk, Hkv, D]``, or packed ``[total_k, Hkv, D]`` with ``cu_seqlens_k``; ``Hkv`` divides
            ``Hq`` (grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``).
            q, k, v share one dtype (float32, float16, bfloat16; float64 on CPU) and need stride 1 in
            the last dim only (views of a fused QKV projection are read in place). ``D <= 256``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        causal: bottom-right aligned mask: key ``j`` is visible to query ``i`` iff ``j <= i + Lk - Lq``
            (flash-attn's convention; equals ``torch``'s ``is_causal`` when ``Lq == Lk``).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` offsets of the packed sequences (both or neither).
        max_seqlen_q, max_seqlen_k: longest sequences, when known (saves a device-to-host copy on CUDA).
        seqused_k: optional int32 ``[B]``: sequence ``b`` attends to its first ``seqused_k[b]`` keys only
            (padded key tails cost nothing).
        logit_bias_q, logit_bias_k: optional rank-R bias features ``[..., Lq, Hq, R]`` and
            ``[..., Lk, Hkv, R]`` (q's and k's leading layout, R <= 32): logit ``(i, j)`` gains
            ``sum_r logit_bias_q[i, r] * logit_bias_k[j, r]``, evaluated per tile inside the kernel
            (never an ``Lq x Lk`` tensor). The quantized KV cache uses it for the Jensen correction.

    Returns:
        ``(out, lse)``: out in q's shape and dtype; lse float32 (float64 for float64 inputs)
        ``[B, Hq, Lq]`` (``[Hq, total_q]`` when packed), the natural-log partition function of each row.
        A row with no visible key (causal with ``Lq > Lk``, or ``seqused_k`` 0) gets out 0 and lse ``-inf``.

    Differentiable in q, k, v and both bias features (through out and lse) through the registered
    backward op. The CPU kernels work in fp32 tiles (memory O(L * D) beyond the inputs); dk and dv are
    deterministic.
    """
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("flash_attention: give both cu_seqlens_q and cu_seqlens_k, or neither")
    if (logit_bias_q is None) != (logit_bias_k is None):
        raise ValueError("flash_attention: give both logit_bias_q and logit_bias_k, or neither")
    return _ops.flash_attention(
        q, k, v, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q or 0, max_seqlen_k or 0,
        seqused_k, logit_bias_q, logit_bias_k,
    )  # fmt: skip


# ---- fake kernels: shapes and dtypes only, so torch.compile(fullgraph=True) traces through ----


def _fake_lse(q: Tensor, varlen: bool) -> Tensor:
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(shape, dtype=dtype)


@torch.library.register_fake("difforge::flash_attention")
def _(q, k, v, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, bias_q, bias_k):
    return q.new_empty(q.shape), _fake_lse(q, cu_seqlens_q is not None)


@torch.library.register_fake("difforge::flash_attention_backward")
def _(dout, dlse, q, k, v, out, lse, scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
      bias_q, bias_k):  # fmt: skip
    def like(t: Tensor | None) -> Tensor:
        return t.new_empty(t.shape) if t is not None else q.new_empty((0,))

    return like(q), like(k), like(v), like(bias_q), like(bias_k)


# ---- autograd: the backward is the registered flash_attention_backward op ----


def _setup(ctx, inputs, output):
    q, k, v, scale, causal, cu_q, cu_k, max_q, max_k, seqused_k, bias_q, bias_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seqused_k, bias_q, bias_k)
    ctx.scale, ctx.causal, ctx.max_q, ctx.max_k = scale, causal, max_q, max_k


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, seqused_k, bias_q, bias_k = ctx.saved_tensors
    dq, dk, dv, dbias_q, dbias_k = _ops.flash_attention_backward(
        dout, dlse, q, k, v, out, lse, ctx.scale, ctx.causal, cu_q, cu_k, ctx.max_q, ctx.max_k, seqused_k,
        bias_q, bias_k,
    )  # fmt: skip
    need = ctx.needs_input_grad
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        None, None, None, None, None, None, None,
        dbias_q if need[10] else None,
        dbias_k if need[11] else None,
    )  # fmt: skip


torch.library.register_autograd("difforge::flash_attention", _backward, setup_context=_setup)


forbid_double_backward("difforge::flash_attention_backward", "flash_attention")
