"""Hybrid full / Skiparse self-attention for video DiTs (OSP-Next): the ``dual_end`` layer schedule, a layout
tracker that keeps the activation in the sparse layout across consecutive sparse blocks, and the attention
module itself.

A DiT forward with a hybrid schedule reads::

    layout = SkiparseLayout(grid, sparse_ratio=2, batch=B)          # group=... for SSP
    angles = rope_angles_3d(grid, head_dim)
    for kind, block in zip(dual_end_schedule(len(blocks), 4), blocks):
        x = layout.to(x, kind)              # full -> token: rearrange; token <-> group: one switch
        x = block(x, layout, angles)        # attention via SkiparseAttention; norms/MLP are token-wise
    x = layout.to(x, "full")

Token-wise layers (linears, norms, MLP, cross-attention) run unchanged on the sparse layout; per-sample
inputs (timestep modulation, text) are indexed with sample = row mod B (``layout.batch_repeat``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.nn.rope import apply_rope
from difforge.ops import attention as attention_ops
from difforge.ops import skiparse as skiparse_ops

Kind = Literal["full", "token", "group"]
Backend = Literal["difforge", "sdpa"]


def dual_end_schedule(num_layers: int, num_full_blocks: int) -> list[Kind]:
    """OSP-Next's ``dual_end`` schedule: the first and last ``num_full_blocks / 2`` layers are full, layer ``i``
    in between is ``"token"`` when i is even and ``"group"`` when odd. Wan2.1-14B (40 layers, 8 full):
    ``FFFF TGTG...TG FFFF``. ``num_full_blocks`` must be a multiple of 4 and at most ``num_layers``."""
    if num_layers < 1:
        raise ValueError(f"dual_end_schedule: num_layers must be >= 1, got {num_layers}")
    if num_full_blocks < 0 or num_full_blocks % 4 or num_full_blocks > num_layers:
        raise ValueError(
            f"dual_end_schedule: num_full_blocks must be a multiple of 4 in [0, num_layers = {num_layers}], "
            f"got {num_full_blocks}"
        )
    edge = num_full_blocks // 2
    return [
        "full" if i < edge or i >= num_layers - edge else ("token" if i % 2 == 0 else "group")
        for i in range(num_layers)
    ]


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, seqused_k: Tensor | None = None,
    backend: Backend = "difforge",
) -> Tensor:
    """Attention of ``[rows, Lq, heads, D]`` queries over ``[rows, Lk, heads, D]`` keys/values, row ``r`` seeing
    its first ``seqused_k[r]`` keys (all when None), by difforge's flash attention or by torch SDPA."""
    if backend == "difforge":
        return attention_ops.flash_attention(q, k, v, scale=scale, seqused_k=seqused_k)[0]
    mask = None
    if seqused_k is not None:
        # A row with no valid key holds only padding (discarded): let it see key 0 rather than produce NaN.
        used = seqused_k.to(k.device).clamp_min(1)
        mask = (torch.arange(k.shape[1], device=k.device) < used[:, None])[:, None, None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


class SequenceLayout:
    """The full (dense) layout of a DiT activation: ``[B, N, C]`` in original token order, under sequence
    parallelism this rank's contiguous shard ``[B, N/S, C]`` with attention by Ulysses. The base of
    :class:`SkiparseLayout`, and the layout of a model whose blocks are all full.

    Args:
        grid: latent grid (T, H, W) after patchify, N = T*H*W.
        batch: B.
        group: a torch.distributed process group to shard the sequence over; None for one process.
        backend: ``"difforge"`` (flash attention with per-row key lengths) or ``"sdpa"``
            (``torch.nn.functional.scaled_dot_product_attention`` with a key-padding mask: the plain-PyTorch
            baseline). Ulysses runs under either.
    """

    def __init__(
        self, grid: Sequence[int], *, batch: int, group: object | None = None, backend: Backend = "difforge"
    ) -> None:
        if backend not in ("difforge", "sdpa"):
            raise ValueError(f'{type(self).__name__}: backend must be "difforge" or "sdpa", got {backend!r}')
        self.grid, self.batch, self.group, self.backend = tuple(int(g) for g in grid), batch, group, backend
        comm = None if group is None else self._parallel().comm
        self.ssp_size, self.ssp_rank = (1, 0) if comm is None else (comm.group_size(group), comm.group_rank(group))
        self.kind: Kind = "full"
        # Chunk-wise autoregressive sampling: self-attention goes through the blocks' KV caches instead.
        self.kv_cache = None
        # Block-causal attention over chunks of this many frames (0: bidirectional), for causal video models.
        self.causal_chunk = 0

    @property
    def batch_repeat(self) -> int:
        """Rows per sample in the current layout: row r holds sample ``r % batch``."""
        return 1

    def to(self, x: Tensor, kind: Kind) -> Tensor:
        if kind != "full":
            raise ValueError(f'SequenceLayout.to: a dense layout only has kind "full", got {kind!r}')
        return x

    def seqlens(self, device: torch.device) -> Tensor | None:
        """Valid keys per local row (None: every row attends to all keys)."""
        return None

    def arrange(self, t: Tensor) -> Tensor:
        """A per-token tensor ``[B, N, ...]`` in original order, the same on every rank (e.g. per-token modulation)
        -> the local rows of the current layout, the way x is laid out. Differentiable."""
        return t if self.group is None else t.chunk(self.ssp_size, dim=1)[self.ssp_rank]

    def arrange_angles(self, angles: Tensor) -> Tensor:
        """A per-token table ``[N, X]`` in original order (e.g. RoPE angles) -> the current layout, broadcastable
        against ``[rows, L, heads, X]``: ``[1, N(/S), 1, X]`` full, ``[G/S * B, N'/G, 1, X]`` sparse."""
        return self.arrange(angles[None])[:, :, None]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
        """Self-attention of ``[rows, L, heads, D]`` tensors in the current layout: dense over the sequence
        (Ulysses when sharded) when full, per sub-sequence with its valid keys only when sparse; over the cached
        earlier frames too when :attr:`kv_cache` (a :class:`~difforge.nn.chunk_cache.ChunkKVCache`) is set."""
        if self.kv_cache is not None:
            return self.kv_cache.attend(q, k, v, self)
        if self.causal_chunk and self.causal_chunk < self.grid[0]:
            from difforge.nn.chunk_cache import block_causal_attention

            return block_causal_attention(q, k, v, frames=self.grid[0], chunk_frames=self.causal_chunk, layout=self)
        if self.kind == "full" and self.group:
            return self._parallel().ulysses_attention(q, k, v, group=self.group, scale=scale)
        return attend(q, k, v, scale=scale, seqused_k=self.seqlens(q.device), backend=self.backend)

    @staticmethod
    def _parallel():
        import difforge.parallel as parallel  # torch.distributed only when SSP is used

        return parallel


class SkiparseLayout(SequenceLayout):
    """Where a DiT activation currently lives, and the moves between layouts.

    ``full``: ``[B, N, C]`` in original token order (under SSP, this rank's sequence shard ``[B, N/S, C]``).
    ``token`` / ``group``: the local rows ``[G/S * B, N'/G, C]`` of the Skiparse sparse layout.
    :meth:`to` moves with the cheapest op: rearrange (full -> sparse), one switch (token <-> group, one
    all_to_all under SSP), restore (sparse -> full), nothing when already there.

    Args:
        grid: latent grid (T, H, W) after patchify, N = T*H*W.
        sparse_ratio: P; ``dims=2`` gives G = P^2 sub-sequences (Skiparse-2D), ``dims=1`` G = P.
        batch: B.
        group: a torch.distributed process group for Sparse Sequence Parallelism (its size S divides G);
            None for one process.
        backend: as in :class:`SequenceLayout`.
    """

    def __init__(
        self,
        grid: Sequence[int],
        sparse_ratio: int,
        *,
        batch: int,
        dims: int = 2,
        group: object | None = None,
        backend: Backend = "difforge",
    ) -> None:
        super().__init__(grid, batch=batch, group=group, backend=backend)
        self.sparse_ratio, self.dims = sparse_ratio, dims
        self.local_groups = skiparse_ops.check_layout(
            "SkiparseLayout", grid, sparse_ratio, dims=dims, ssp_rank=self.ssp_rank, ssp_size=self.ssp_size
        )
        self._seqlens: dict[tuple[str, torch.device], Tensor] = {}
        self._angles: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def batch_repeat(self) -> int:
        return 1 if self.kind == "full" else self.local_groups

    def to(self, x: Tensor, kind: Kind) -> Tensor:
        """Moves x from the current layout to ``kind`` and records it."""
        if kind not in ("full", "token", "group"):
            raise ValueError(f'SkiparseLayout.to: kind must be "full", "token" or "group", got {kind!r}')
        if kind == self.kind:
            return x
        if self.kind == "full":
            x = self._enter(x, kind)
        elif kind == "full":
            x = self._exit(x)
        else:
            x = self._switch(x)
        self.kind = kind
        return x

    def _enter(self, x: Tensor, mode: str) -> Tensor:
        if self.group is None:
            return skiparse_ops.skiparse_rearrange(x, self.grid, self.sparse_ratio, mode, dims=self.dims)
        return self._parallel().ssp_enter(x, self.grid, self.sparse_ratio, mode, dims=self.dims, group=self.group)

    def _exit(self, x: Tensor) -> Tensor:
        if self.group is None:
            return skiparse_ops.skiparse_restore(x, self.grid, self.sparse_ratio, self.kind, dims=self.dims)
        return self._parallel().ssp_exit(x, self.grid, self.sparse_ratio, self.kind, dims=self.dims, group=self.group)

    def _switch(self, x: Tensor) -> Tensor:
        if self.group is None:
            return skiparse_ops.skiparse_switch(x, self.grid, self.sparse_ratio, self.kind, dims=self.dims)
        parallel = self._parallel()
        return parallel.ssp_switch(x, self.grid, self.sparse_ratio, self.kind, dims=self.dims, group=self.group)

    def seqlens(self, device: torch.device) -> Tensor | None:
        if self.kind == "full":
            return None
        key = (self.kind, torch.device(device))
        if key not in self._seqlens:
            self._seqlens[key] = skiparse_ops.skiparse_seqlens(
                self.grid, self.sparse_ratio, self.kind, dims=self.dims, batch=self.batch, ssp_rank=self.ssp_rank,
                ssp_size=self.ssp_size, device=device,
            )  # fmt: skip
        return self._seqlens[key]

    def arrange(self, t: Tensor) -> Tensor:
        if self.kind == "full":
            return super().arrange(t)
        return skiparse_ops.skiparse_rearrange(
            t, self.grid, self.sparse_ratio, self.kind, dims=self.dims, ssp_rank=self.ssp_rank, ssp_size=self.ssp_size
        )

    def arrange_angles(self, angles: Tensor) -> Tensor:
        if self.kind == "full":
            return super().arrange_angles(angles)
        # Every block of one kind reuses the table: cached per kind for the same table object.
        source, arranged = self._angles.get(self.kind, (None, None))
        if source is not angles:
            # Rows s * B + b all hold sub-sequence s: arrange one copy, then give each sample its own.
            arranged = self.arrange(angles[None]).repeat_interleave(self.batch, dim=0)[:, :, None]
            self._angles[self.kind] = (angles, arranged)
        return arranged


class SkiparseAttention(nn.Module):
    """Multi-head self-attention that runs in whatever layout a :class:`SkiparseLayout` holds the activation:
    dense in the full layout, Skiparse (token or group) in a sparse one, with RoPE from original positions.

    ``forward(x, layout, angles=None)``: x ``[rows, L, dim]`` in ``layout.kind``; angles an optional RoPE
    table ``[N, head_dim/2]`` in original token order (:func:`difforge.nn.rope.rope_angles_3d`), arranged
    like x by the layout. q and k get an RMSNorm over the head dim when ``qk_norm`` (Wan-style).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_norm: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"SkiparseAttention: num_heads must divide dim = {dim}, got {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **factory) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **factory) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, layout: SequenceLayout, angles: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            arranged = layout.arrange_angles(angles)
            q, k = apply_rope(q, arranged), apply_rope(k, arranged)
        return self.proj(layout.attention(q, k, v).flatten(-2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
