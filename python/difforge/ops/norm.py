"""Fused adaLN norm-modulate: ``y = norm(x) * (1 + scale) + shift`` (+ gated residual), one kernel.

Math and layouts: spec ``adaln_norm_and_load_balance.md``. Kernels: ``cpp/norm`` (CPU) and
``cuda/norm`` (CUDA); schemas: ``bindings/schemas.cpp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difforge.ops._autograd import forbid_double_backward

_ops = torch.ops.difforge
_NORMS = ("layernorm", "rmsnorm")


def adaln_modulate(
    x: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    norm: str = "layernorm",
    eps: float = 1e-6,
    batch_repeat: int = 1,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """``y = norm(x) * (1 + scale) + shift`` in one pass over ``x``.

    Args:
        x: ``[B, L, D]`` (or packed ``[N, D]`` with ``cu_seqlens``), float32/float16/bfloat16
            (float64 on CPU). ``y`` has x's shape and dtype; statistics are computed in fp32.
        scale, shift: modulation, each ``None`` (term skipped) or of one shared layout, read in
            place through its strides and never expanded to x's shape:
            ``[D]`` global; ``[B, D]`` or ``[B, 1, D]`` per sample; ``[B, G, D]`` with ``G | L``,
            token ``l`` using row ``l // (L // G)`` (per frame; ``G = L`` per token).
        weight, bias: optional ``[D]`` affine of the norm (``bias`` only for layernorm).
        norm: ``"layernorm"`` (biased variance) or ``"rmsnorm"``; ``eps`` inside the square root.
        batch_repeat: ``R`` when x is ``[R*B, L, D]`` and x batch ``rb`` uses modulation batch
            ``rb % B`` (Skiparse's batch-folded layout).
        cu_seqlens: int32 ``[B+1]`` offsets of packed sequences in ``x [N, D]``; sequence ``b``
            uses modulation row ``b`` (``scale`` ``[B, D]``). ``max_seqlen``: optional bound.

    Differentiable in x, scale, shift, weight and bias; gradients come back in each input's
    dtype and shape, the modulation/affine ones from a deterministic (atomics-free) reduction.
    """
    y, _, _ = _ops.adaln_modulate(
        x, scale, shift, weight, bias, _check_norm(norm), eps, batch_repeat, cu_seqlens, max_seqlen or 0
    )
    return y


def gated_adaln_modulate(
    x: Tensor,
    o: Tensor,
    gate: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    norm: str = "layernorm",
    eps: float = 1e-6,
    batch_repeat: int = 1,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated residual + norm-modulate: ``x_out = x + gate * o``; ``y = adaln_modulate(x_out, ...)``.

    The DiT block step ``x = x + gate * branch(...)`` followed by the next modulated norm, in one
    kernel. ``o`` has x's shape and may have another float dtype (a bf16 branch output on an fp32
    residual stream); ``x_out`` has x's dtype. ``gate`` (``None``: 1) broadcasts like ``scale``
    and shares its layout. Other arguments as in :func:`adaln_modulate`.

    Returns ``(x_out, y)``; differentiable in x, o, gate, scale, shift, weight and bias.
    """
    x_out, y, _, _ = _ops.gated_adaln_modulate(
        x, o, gate, scale, shift, weight, bias, _check_norm(norm), eps, batch_repeat, cu_seqlens, max_seqlen or 0
    )
    return x_out, y


def _check_norm(norm: str) -> str:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    return norm


# ---- fake kernels: shapes and dtypes only, so torch.compile(fullgraph=True) traces through ----


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_stats(x: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    mean = x.new_empty((rows if norm == "layernorm" else 0,), dtype=_stats_dtype(x))
    return mean, x.new_empty((rows,), dtype=_stats_dtype(x))


@torch.library.register_fake("difforge::adaln_modulate")
def _(x, scale, shift, weight, bias, norm, eps, batch_repeat, cu_seqlens, max_seqlen):
    return (x.new_empty(x.shape), *_fake_stats(x, norm))


@torch.library.register_fake("difforge::gated_adaln_modulate")
def _(h, o, gate, scale, shift, weight, bias, norm, eps, batch_repeat, cu_seqlens, max_seqlen):
    return (h.new_empty(h.shape), h.new_empty(h.shape), *_fake_stats(h, norm))


@torch.library.register_fake("difforge::adaln_modulate_backward")
def _(dy, dx_out, x, o, gate, scale, shift, weight, bias, mean, rstd, norm, batch_repeat, cu_seqlens, max_seqlen):
    def like(t: Tensor | None, present: bool = True) -> Tensor:
        return t.new_empty(t.shape) if t is not None and present else x.new_empty((0,))

    return (
        x.new_empty(x.shape),
        like(o),
        like(gate, present=o is not None),
        like(scale),
        like(shift),
        like(weight),
        like(bias),
    )


# ---- autograd: the backward is the registered adaln_modulate_backward op ----


def _grad_or_none(ctx, index: int, grad: Tensor) -> Tensor | None:
    return grad if ctx.needs_input_grad[index] else None


def _setup_adaln(ctx, inputs, output):
    x, scale, shift, weight, bias, norm, _eps, batch_repeat, cu_seqlens, max_seqlen = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, shift, weight, bias, mean, rstd, cu_seqlens)
    ctx.norm, ctx.batch_repeat, ctx.max_seqlen = norm, batch_repeat, max_seqlen


def _backward_adaln(ctx, dy, _dmean, _drstd):
    x, scale, shift, weight, bias, mean, rstd, cu_seqlens = ctx.saved_tensors
    dx, _, _, dscale, dshift, dweight, dbias = _ops.adaln_modulate_backward(
        dy, None, x, None, None, scale, shift, weight, bias, mean, rstd,
        ctx.norm, ctx.batch_repeat, cu_seqlens, ctx.max_seqlen,
    )  # fmt: skip
    grads = (dx, dscale, dshift, dweight, dbias)
    return (*(_grad_or_none(ctx, i, g) for i, g in enumerate(grads)), None, None, None, None, None)


def _setup_gated(ctx, inputs, output):
    _h, o, gate, scale, shift, weight, bias, norm, _eps, batch_repeat, cu_seqlens, max_seqlen = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, o, gate, scale, shift, weight, bias, mean, rstd, cu_seqlens)
    ctx.norm, ctx.batch_repeat, ctx.max_seqlen = norm, batch_repeat, max_seqlen


def _backward_gated(ctx, dx_out, dy, _dmean, _drstd):
    x_out, o, gate, scale, shift, weight, bias, mean, rstd, cu_seqlens = ctx.saved_tensors
    dh, do, dgate, dscale, dshift, dweight, dbias = _ops.adaln_modulate_backward(
        dy, dx_out, x_out, o, gate, scale, shift, weight, bias, mean, rstd,
        ctx.norm, ctx.batch_repeat, cu_seqlens, ctx.max_seqlen,
    )  # fmt: skip
    grads = (dh, do, dgate, dscale, dshift, dweight, dbias)
    return (*(_grad_or_none(ctx, i, g) for i, g in enumerate(grads)), None, None, None, None, None)


torch.library.register_autograd("difforge::adaln_modulate", _backward_adaln, setup_context=_setup_adaln)
torch.library.register_autograd("difforge::gated_adaln_modulate", _backward_gated, setup_context=_setup_gated)


forbid_double_backward("difforge::adaln_modulate_backward", "adaln_modulate / gated_adaln_modulate")
