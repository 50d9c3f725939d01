"""The Wan-style DiT block, running in whatever layout a :class:`~difforge.nn.SequenceLayout` holds the
activation (dense, Skiparse token/group, sequence-sharded under SSP).

One block (Wan2.1, ``wan/modules/model.py``), with the six modulation vectors
``shift1, scale1, gate1, shift2, scale2, gate2`` of its timestep::

    y = norm1(x) * (1 + scale1) + shift1                 # adaln_modulate
    x, y = x + gate1 * self_attn(y), norm3(x_new)         # gated_adaln_modulate (affine LN, no modulation)
    x, y = x + cross_attn(y, context), norm2(x_new) * (1 + scale2) + shift2   # gated_adaln_modulate, gate 1
    x = x + gate2 * ffn(y)                                # left pending: fused into the next norm1 (or head)

Modulation is per sample (``[B, 1, 6D]`` timestep embedding) or per frame (``[B, F, 6D]``: frames may carry
different noise levels, as in diffusion forcing and chunk-wise autoregressive sampling). It is never expanded to
the activation's shape when the fused norm can read it in place: per sample in any layout (``batch_repeat``),
per frame in the unsharded full layout. Per frame in a permuted or sharded layout becomes a per-token table,
arranged like the activation once per layout kind and shared by every block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.nn.norm import AdaLNModulate
from difforge.nn.skiparse import Backend, SequenceLayout, SkiparseAttention, attend


class FrameModulation:
    """A timestep embedding ``[B, F, K*D]`` (F = 1: per sample; F = latent frames: per frame) viewed in the
    layout of the activation, for any block's own ``[K, D]`` modulation table.

    Args:
        e: ``[B, F, K*D]``.
        layout: where the activation lives; read at every :meth:`chunks` call (the layout moves).
        frame_tokens: tokens per frame in original order (H' * W' after patchify).
    """

    def __init__(self, e: Tensor, layout: SequenceLayout, frame_tokens: int) -> None:
        if e.dim() != 3:
            raise ValueError(f"FrameModulation: e must be [B, F, K*D], got shape {tuple(e.shape)}")
        self.e, self.layout, self.frame_tokens = e, layout, frame_tokens
        self._per_token: dict[str, Tensor] = {}

    @property
    def per_sample(self) -> bool:
        return self.e.shape[1] == 1

    @property
    def batch_repeat(self) -> int:
        """``batch_repeat`` of the fused norm for the chunks (rows per modulation row)."""
        return self.layout.batch_repeat if self.per_sample else 1

    def chunks(self, table: Tensor) -> list[Tensor]:
        """``e + table`` (``table``: ``[K, D]``, broadcast) as K tensors in the fused norm's modulation layouts:
        ``[B, D]`` per sample, ``[B, F, D]`` per frame (full unsharded layout), else ``[rows, L, D]`` per token."""
        K, D = table.shape[-2:]
        if self.per_sample:
            return list((self.e[:, 0].unflatten(-1, (K, D)) + table).unbind(1))
        if self.layout.kind == "full" and self.layout.group is None:
            return list((self.e.unflatten(-1, (K, D)) + table).unbind(2))
        return list((self._arranged().unflatten(-1, (K, D)) + table).unbind(2))

    def _arranged(self) -> Tensor:
        kind = self.layout.kind
        if kind not in self._per_token:
            tokens = self.e.repeat_interleave(self.frame_tokens, dim=1)  # [B, N, K*D] in original token order
            self._per_token[kind] = self.layout.arrange(tokens)
        return self._per_token[kind]


def broadcast_modulation(m: Tensor, x: Tensor, batch_repeat: int = 1) -> Tensor:
    """A modulation chunk of any fused-norm layout (``[B, D]``, ``[B, F, D]``, ``[rows, L, D]``) as a tensor
    broadcastable against ``x [rows, L, D]``: what the fused kernels read in place, materialised for eager math."""
    if m.dim() == 2:
        return m.repeat(batch_repeat, 1)[:, None]  # row r uses sample r % B
    per_row = x.shape[1] // m.shape[1]
    return m.repeat(batch_repeat, 1, 1).repeat_interleave(per_row, dim=1)


class PendingResidual(NamedTuple):
    """A gated residual ``x + gate * o`` not yet added: the next modulated norm fuses it into its own pass
    (``forward_gated``), saving a read and a write of the residual stream per block."""

    o: Tensor
    gate: Tensor
    batch_repeat: int

    def apply(self, x: Tensor) -> Tensor:
        return x + self.o * broadcast_modulation(self.gate, x, self.batch_repeat)


class ModulatedNorm(AdaLNModulate):
    """:class:`AdaLNModulate` with an eager (plain PyTorch) mode, the baseline the fused kernel is compared with
    in training throughput: ``fused=False`` computes the same math as Wan's ``LayerNorm(x.float())`` chain."""

    def __init__(self, dim: int, *, fused: bool = True, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.fused = fused

    def forward(self, x: Tensor, scale: Tensor | None, shift: Tensor | None, *, batch_repeat: int = 1) -> Tensor:
        if self.fused:
            return super().forward(x, scale, shift, batch_repeat=batch_repeat)
        return self._eager(x, scale, shift, batch_repeat)

    def forward_gated(
        self, x: Tensor, o: Tensor, gate: Tensor | None, scale: Tensor | None, shift: Tensor | None, *,
        batch_repeat: int = 1,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        if self.fused:
            return super().forward_gated(x, o, gate, scale, shift, batch_repeat=batch_repeat)
        x = x + (o if gate is None else o * broadcast_modulation(gate, x, batch_repeat))
        return x, self._eager(x, scale, shift, batch_repeat)

    def _eager(self, x: Tensor, scale: Tensor | None, shift: Tensor | None, batch_repeat: int) -> Tensor:
        if self.norm == "layernorm":
            n = F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps)
        else:
            n = F.rms_norm(x.float(), x.shape[-1:], self.weight, self.eps)
        if scale is not None:
            n = n * (1 + broadcast_modulation(scale, x, batch_repeat))
        if shift is not None:
            n = n + broadcast_modulation(shift, x, batch_repeat)
        return n.to(x.dtype)


class CrossAttention(nn.Module):
    """Attention of the activation's tokens (any layout, ``[rows, L, dim]``) to per-sample condition tokens
    ``[B, Lc, dim]``; row r reads sample ``r % B``'s condition. q/k RMSNorm over the head dim like Wan."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = True, backend: Backend = "difforge") -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"CrossAttention: num_heads must divide dim = {dim}, got {num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.o = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor, batch_repeat: int = 1) -> Tensor:
        q = self.q_norm(self.q(x).unflatten(-1, (self.num_heads, self.head_dim)))
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(-3)
        k = self.k_norm(k)
        if batch_repeat > 1:  # the condition of sample b serves rows b, B + b, 2B + b, ...
            k, v = k.repeat(batch_repeat, 1, 1, 1), v.repeat(batch_repeat, 1, 1, 1)
        return self.o(attend(q, k, v, backend=self.backend).flatten(-2))


class HybridDiTBlock(nn.Module):
    """Self-attention (dense or Skiparse, by the layout), cross-attention and MLP, each behind an adaLN-modulated
    norm, with gated residuals: the block of Wan2.1 built on the fused norm kernels.

    ``forward(x, modulation, context, layout, angles)``: x ``[rows, L, dim]`` in ``layout``; ``modulation`` a
    :class:`FrameModulation` of the timestep embedding (``K = 6``); context ``[B, Lc, dim]``; angles the RoPE
    table ``[N, head_dim/2]`` in original token order.

    Args:
        fused_norm: the fused norm kernels (True) or their eager PyTorch composition (the baseline).
        backend: attention backend (``"difforge"`` or ``"sdpa"``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        fused_norm: bool = True,
        backend: Backend = "difforge",
    ) -> None:
        super().__init__()
        self.norm1 = ModulatedNorm(dim, eps=eps, fused=fused_norm)
        self.self_attn = SkiparseAttention(dim, num_heads, qk_norm=qk_norm)
        self.norm3 = ModulatedNorm(dim, eps=eps, elementwise_affine=cross_attn_norm, fused=fused_norm)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm=qk_norm, backend=backend)
        self.norm2 = ModulatedNorm(dim, eps=eps, fused=fused_norm)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        modulation: FrameModulation,
        context: Tensor,
        layout: SequenceLayout,
        angles: Tensor,
        residual: PendingResidual | None = None,
    ) -> tuple[Tensor, PendingResidual]:
        """Returns ``(x, pending)``: the block's last gated residual ``x + gate2 * ffn(...)`` is left pending, for
        the next block (same layout) to fuse into its first norm; :meth:`PendingResidual.apply` adds it. A
        ``residual`` pending from the previous block is fused here the same way."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunks(self.modulation)
        repeat = modulation.batch_repeat
        if residual is None:
            y = self.norm1(x, scale1, shift1, batch_repeat=repeat)
        else:
            x, y = self.norm1.forward_gated(x, residual.o, residual.gate, scale1, shift1, batch_repeat=repeat)
        x, y = self.norm3.forward_gated(x, self.self_attn(y, layout, angles), gate1, None, None, batch_repeat=repeat)
        c = self.cross_attn(y, context, layout.batch_repeat)
        x, y = self.norm2.forward_gated(x, c, None, scale2, shift2, batch_repeat=repeat)
        return x, PendingResidual(self.ffn(y), gate2, repeat)
