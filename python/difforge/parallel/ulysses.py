"""Ulysses sequence parallelism (DeepSpeed-Ulysses): the baseline SSP is measured against.

Each rank holds a contiguous sequence shard ``[B, N/S, H, D]`` of q, k and v. An all_to_all per tensor scatters
heads and gathers the sequence (``[B, N, H/S, D]``), attention runs over the whole sequence on H/S heads, and one
more all_to_all brings the output back to ``[B, N/S, H, D]``: 4 all_to_alls forward (q, k, v, o) and, through
autograd, 4 backward (spec ``shared/spec/skiparse_ssp.md`` §7: 4 units per block against SSP's 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

from difforge.ops.attention import flash_attention
from difforge.ops.skiparse import skiparse_attention
from difforge.parallel import comm

__all__ = ["ulysses_attention"]


def _seq_to_heads(x: Tensor, size: int, group, tag: str) -> Tensor:
    """[B, N/S, H, D] sequence shard -> [B, N, H/S, D]: head group j goes to rank j, shards arrive in rank order."""
    B, n, H, D = x.shape
    send = x.reshape(B, n, size, H // size, D).permute(2, 0, 1, 3, 4)  # [S (dest), B, N/S, H/S, D]
    received = comm.all_to_all(send.contiguous(), group=group, tag=tag)  # [S (source = shard), B, N/S, H/S, D]
    return received.permute(1, 0, 2, 3, 4).reshape(B, size * n, H // size, D)


def _heads_to_seq(o: Tensor, size: int, group, tag: str) -> Tensor:
    """[B, N, H/S, D] -> [B, N/S, H, D]: sequence shard j goes to rank j, head groups arrive in rank order."""
    B, N, h, D = o.shape
    send = o.reshape(B, size, N // size, h, D).permute(1, 0, 2, 3, 4)  # [S (dest = shard), B, N/S, H/S, D]
    received = comm.all_to_all(send.contiguous(), group=group, tag=tag)  # [S (source = head group), ...]
    return received.permute(1, 2, 0, 3, 4).reshape(B, N // size, size * h, D)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    grid: Sequence[int] | None = None,
    sparse_ratio: int = 1,
    mode: str = "token",
    dims: int = 2,
) -> Tensor:
    """Attention over the whole sequence from contiguous sequence shards, Ulysses style.

    Args:
        q: ``[B, N/S, H, D]``, this rank's tokens ``[r * N/S, (r + 1) * N/S)``.
        k, v: ``[B, N/S, H_kv, D]`` (H_kv divides H, GQA). H and H_kv must be divisible by S.
        group: the sequence-parallel group (default: the default group; none initialised: S = 1).
        scale: softmax scale (``1/sqrt(D)`` when None).
        grid, sparse_ratio, mode, dims: with ``sparse_ratio > 1`` the attention on the gathered sequence is
            :func:`~difforge.ops.skiparse_attention` on ``grid`` (N = T*H*W) instead of dense attention: the
            Ulysses baseline of a Skiparse block (same math and FLOPs as SSP, 4 all_to_alls instead of 1).

    Returns:
        ``[B, N/S, H, D]``, this rank's shard of the output. Differentiable in q, k, v (4 all_to_alls backward).
    """
    size = comm.group_size(group)
    if q.dim() != 4:
        raise ValueError(f"ulysses_attention: q must be a sequence shard [B, N/S, H, D], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[:2] != q.shape[:2] or t.shape[3] != q.shape[3]:
            raise ValueError(
                f"ulysses_attention: {name} must be [B, N/S, H_kv, D] with q's B, N/S and D {tuple(q.shape)}, "
                f"got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"ulysses_attention: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, heads in (("q", q.shape[2]), ("k/v", k.shape[2])):
        if heads % size != 0:
            raise ValueError(
                f"ulysses_attention: the number of heads of {name} ({heads}) must be divisible by the world size / "
                f"group size S = {size} (Ulysses scatters heads across ranks)"
            )
    if sparse_ratio > 1:
        if grid is None or len(grid) != 3:
            raise ValueError(f"ulysses_attention: sparse_ratio > 1 needs grid=(T, H, W), got {grid!r}")
        tokens = int(grid[0]) * int(grid[1]) * int(grid[2])
        if q.shape[1] * size != tokens:
            raise ValueError(
                f"ulysses_attention: grid {tuple(grid)} has N = {tokens} tokens but the shards give "
                f"S * N/S = {size} * {q.shape[1]} = {size * q.shape[1]}"
            )

    def attend(qf: Tensor, kf: Tensor, vf: Tensor) -> Tensor:
        if sparse_ratio > 1:
            layout = dict(grid=grid, sparse_ratio=sparse_ratio, mode=mode, dims=dims)
            return skiparse_attention(qf, kf, vf, **layout, scale=scale)
        return flash_attention(qf, kf, vf, scale=scale)[0]

    if size == 1:
        return attend(q, k, v)
    qf, kf, vf = (_seq_to_heads(t, size, group, f"ulysses.{n}") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    return _heads_to_seq(attend(qf, kf, vf), size, group, "ulysses.out")
