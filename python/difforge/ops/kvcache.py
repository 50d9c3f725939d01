"""Quantized KV cache: INT2/INT4/INT8 group quantization of keys and values, and attention over a quantized
cache with the Jensen-bias correction ("Quantized Keys Steal Attention", arXiv 2605.26266).

Math: ``cpp/include/difforge/kvcache.h``. Kernels: ``cpp/kvcache`` (CPU) and ``cuda/kvcache`` (CUDA);
schemas: ``bindings/schemas.cpp``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from difforge.ops._autograd import forbid_backward

_ops = torch.ops.difforge

JENSEN_MODES = ("none", "taylor2", "taylor4", "exact")
AXES = ("token", "channel")


def kv_quantize(
    x: Tensor, *, bits: int = 2, group_size: int = 32, axis: str = "token", meta_dtype: torch.dtype = torch.float16
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max round-to-nearest quantization of keys or values ``x [B, L, H, D]``.

    Each group of ``group_size`` values gets its own grid: ``zero`` = the group minimum, ``step`` =
    ``(max - min) / (2**bits - 1)`` (the grid spacing, not twice it), both rounded to ``meta_dtype``;
    ``code = clamp(round_half_even((x - zero) / step), 0, 2**bits - 1)`` (0 when ``step == 0``) and the
    dequantized value is ``zero + step * code``, so ``|x - x^| <= step / 2`` up to the meta rounding.

    Args:
        x: ``[B, L, H, D]`` float32/float16/bfloat16, finite (last stride 1, other strides free).
        bits: 2, 4 or 8; codes are packed 4, 2 or 1 per byte, little-endian along D (channel ``c`` sits at
            bits ``[bits*c % 8, +bits)`` of byte ``bits*c // 8``). ``D * bits`` must be a multiple of 8.
        group_size: values per group. ``axis="token"``: consecutive channels of one (token, head), must
            divide D (32 is the paper's setting). ``axis="channel"``: consecutive tokens of one (head,
            channel) (KIVI-style keys); the last group of a sequence may be shorter.
        meta_dtype: dtype of step and zero (float16 default: 3.0 effective bits at INT2, g = 32).

    Returns:
        ``(codes, step, zero)``: codes uint8 ``[B, L, H, D*bits/8]``; step, zero ``[B, L, H, D/group_size]``
        (token) or ``[B, ceil(L/group_size), H, D]`` (channel).
    """
    return _ops.kv_quantize(x, bits, group_size, axis, meta_dtype)


def kv_dequantize(
    codes: Tensor,
    step: Tensor,
    zero: Tensor,
    *,
    bits: int,
    group_size: int = 32,
    axis: str = "token",
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """``zero + step * code`` for codes from :func:`kv_quantize`, as ``dtype`` ``[B, L, H, D]``.

    step must be finite and >= 0 (0 is a constant group, whose values are exactly ``zero``).
    """
    return _ops.kv_dequantize(codes, step, zero, bits, group_size, axis, dtype)


def quantized_kv_attention(
    q: Tensor,
    k_cur: Tensor,
    v_cur: Tensor,
    k_codes: Tensor,
    k_step: Tensor,
    k_zero: Tensor,
    v_codes: Tensor,
    v_step: Tensor,
    v_zero: Tensor,
    *,
    bits: int,
    group_size: int = 32,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
    scale: float | None = None,
    jensen: str = "none",
    jensen_lambda: float = 1.0,
) -> Tensor:
    """Attention of the current chunk's queries over ``[quantized cache ; sink ; current chunk]`` keys.

    One softmax over every key (the order of segments does not matter). Cached keys and values are
    dequantized inside the kernel, tile by tile: no dequantized copy of the cache is ever made.

    With ``jensen != "none"`` the Jensen bias ``b`` (spec kv_cache_jensen §3.2) is subtracted from the
    logits of the quantized cached keys only, never from the sink or the current chunk; values are not
    corrected (the output is linear in v). With ``x_c = scale * q_c * step_c / 2``:
    ``"exact"`` ``b = sum_c log(sinh(x_c) / x_c)``; ``"taylor2"`` ``sum_c x_c**2 / 6`` (the paper's form,
    an over-correction of 5% at x ~ 1.25); ``"taylor4"`` ``max(0, sum_c x_c**2/6 - x_c**4/180)``.
    ``jensen_lambda`` multiplies b.

    Args:
        q: ``[B, Lq, Hq, D]`` float32/float16/bfloat16 (last stride 1).
        k_cur, v_cur: the current chunk ``[B, Lcur, Hkv, D]`` in q's dtype (``Hkv`` divides ``Hq``).
        k_codes, k_step, k_zero, v_codes, v_step, v_zero: the cache as returned by :func:`kv_quantize`
            with ``axis="token"`` (``[B, Lc, Hkv, D*bits/8]`` and ``[B, Lc, Hkv, D/group_size]``); views
            of a larger buffer (e.g. the filled part of a ring) are read in place.
        bits, group_size: as given to :func:`kv_quantize`.
        k_sink, v_sink: optional unquantized keys/values ``[B, Ls, Hkv, D]`` in q's dtype (sink frames,
            a bf16 window of recent frames), never biased.
        scale: softmax scale (``1/sqrt(D)`` when None); the bias uses the same scale.

    Returns:
        out ``[B, Lq, Hq, D]`` in q's dtype. An inference op: not differentiable.
    """
    if jensen not in JENSEN_MODES:
        raise ValueError(f"quantized_kv_attention: jensen must be one of {JENSEN_MODES}, got {jensen!r}")
    if (k_sink is None) != (v_sink is None):
        raise ValueError("quantized_kv_attention: give both k_sink and v_sink, or neither")
    return _ops.quantized_kv_attention(
        q, k_cur, v_cur, k_codes, k_step, k_zero, v_codes, v_step, v_zero, bits, group_size, k_sink, v_sink,
        scale, jensen, float(jensen_lambda),
    )  # fmt: skip


def effective_bits(bits: int, group_size: int, meta_dtype: torch.dtype = torch.float16) -> float:
    """Stored bits per cached element: the code plus step and zero shared by ``group_size`` values
    (INT2, g = 32, fp16 meta: 3.0; INT4: 5.0)."""
    meta_bits = torch.finfo(meta_dtype).bits
    return bits + 2 * meta_bits / group_size


@functools.lru_cache(maxsize=16)
def _hadamard(d: int, device: torch.device) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


def hadamard_rotate(x: Tensor) -> Tensor:
    """``x @ R`` over the last dim with R the normalized (orthogonal, symmetric) Sylvester Hadamard matrix
    of size D (a power of two): QuaRot's rotation. Rotate queries and keys alike (``q' . k' = q . k``) before
    quantizing the keys, so that outlier channels are spread over every group; the Jensen bias then uses the
    rotated query, as :func:`quantized_kv_attention` does when given rotated q and keys. Computed in fp32,
    returned in x's dtype. R is its own inverse: ``hadamard_rotate(hadamard_rotate(x)) == x``."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard_rotate: the last dim must be a power of two, got {d}")
    return (x.float() @ _hadamard(d, x.device)).to(x.dtype)


# ---- fake kernels: shapes and dtypes only, so torch.compile(fullgraph=True) traces through ----


@torch.library.register_fake("difforge::kv_quantize")
def _(x, bits, group_size, axis, meta_dtype):
    B, L, H, D = x.shape
    codes = x.new_empty((B, L, H, D * bits // 8), dtype=torch.uint8)
    if axis == "token":
        meta_shape = (B, L, H, D // group_size)
    else:
        meta_shape = (B, (L + group_size - 1) // group_size, H, D)
    return codes, x.new_empty(meta_shape, dtype=meta_dtype), x.new_empty(meta_shape, dtype=meta_dtype)


@torch.library.register_fake("difforge::kv_dequantize")
def _(codes, step, zero, bits, group_size, axis, dtype):
    B, L, H, packed = codes.shape
    return codes.new_empty((B, L, H, packed * 8 // bits), dtype=dtype)


@torch.library.register_fake("difforge::quantized_kv_attention")
def _(q, k_cur, v_cur, k_codes, k_step, k_zero, v_codes, v_step, v_zero, bits, group_size, k_sink, v_sink, scale,
      jensen, jensen_lambda):  # fmt: skip
    return q.new_empty(q.shape)


# ---- autograd: inference ops; a backward through them is an error, not a silent zero gradient ----

forbid_backward("difforge::kv_quantize", "kv_quantize is not differentiable (rounding to integer codes)")
forbid_backward("difforge::kv_dequantize", "kv_dequantize is not differentiable (an inference op)")
forbid_backward(
    "difforge::quantized_kv_attention",
    "quantized_kv_attention is an inference op (the quantized cache is not differentiable); "
    "use flash_attention to train",
)
