"""Modulated norm layers for DiT blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difforge.ops import norm as norm_ops


class AdaLNModulate(nn.Module):
    """``norm(x) * (1 + scale) + shift`` as one fused kernel (see :func:`difforge.ops.adaln_modulate`).

    Parameters are named like ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` of the same
    configuration (``weight``, and ``bias`` for layernorm with ``bias=True``), so their
    state dicts load in either direction.

    ``forward(x, scale, shift)`` returns ``y``; ``forward_gated(x, o, gate, scale, shift)``
    returns ``(x + gate * o, y)`` with the residual add fused in.
    """

    def __init__(
        self,
        dim: int,
        norm: str = "layernorm",
        elementwise_affine: bool = False,
        eps: float = 1e-6,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.norm, self.eps, self.elementwise_affine = dim, norm, eps, elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, **factory))
            has_bias = bias and norm == "layernorm"
            self.bias = nn.Parameter(torch.zeros(dim, **factory)) if has_bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, scale: Tensor | None, shift: Tensor | None, **layout) -> Tensor:
        return norm_ops.adaln_modulate(
            x, scale, shift, weight=self.weight, bias=self.bias, norm=self.norm, eps=self.eps, **layout
        )

    def forward_gated(
        self, x: Tensor, o: Tensor, gate: Tensor | None, scale: Tensor | None, shift: Tensor | None, **layout
    ) -> tuple[Tensor, Tensor]:
        return norm_ops.gated_adaln_modulate(
            x, o, gate, scale, shift, weight=self.weight, bias=self.bias, norm=self.norm, eps=self.eps, **layout
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, norm={self.norm}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
