"""Sparse Sequence Parallelism (SSP, OSP-Next; spec ``shared/spec/skiparse_ssp.md`` §5-§7).

Skiparse moves G sub-sequences of the token sequence into the batch: the sparse layout is
``[G * B, N'/G, ...]`` with row ``s * B + b`` (G = P^2 for ``dims=2``, P for ``dims=1``; N' = the padded
token count). SSP over a group of S ranks (S | G) gives rank r the whole sub-sequences
``[r * G_loc, (r + 1) * G_loc)``, G_loc = G / S, i.e. local rows ``[G_loc * B, N'/G, ...]`` with all heads.
Consequences:

* attention, cross-attention and FFN inside a sparse block need no communication (:func:`ssp_attention`);
* switching token <-> group mode between sparse blocks costs exactly one all_to_all (:func:`ssp_switch`),
  forward and backward, against Ulysses' four;
* the boundaries with full (sequence-sharded) blocks are :func:`ssp_enter` and :func:`ssp_exit`
  (all_gather based, like the reference implementation).

Sequence shards are contiguous: rank r holds tokens ``[r * N/S, (r + 1) * N/S)`` of the original (t, h, w)
order (:func:`shard_sequence`, :func:`gather_sequence`). ``group=None`` means the default process group; without
an initialised process group everything runs as S = 1 (plain Skiparse ops, no communication).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from difforge.ops.attention import flash_attention
from difforge.ops.skiparse import (
    _other,
    check_layout,
    skiparse_exchange_receive,
    skiparse_exchange_send,
    skiparse_rearrange,
    skiparse_restore,
    skiparse_seq_len,
    skiparse_seqlens,
    skiparse_switch,
)
from difforge.parallel import comm
from difforge.parallel.comm import BACKWARD_SUFFIX

__all__ = ["gather_sequence", "shard_sequence", "ssp_attention", "ssp_enter", "ssp_exit", "ssp_switch"]

# ---- validation ----


def _check_layout(fn: str, grid: Sequence[int], sparse_ratio: int, mode: str, dims: int, size: int) -> int:
    """Validates the layout arguments against an SSP group of ``size`` ranks; returns G_loc = G / S."""
    return check_layout(fn, grid, int(sparse_ratio), mode=mode, dims=dims, ssp_size=size)


def _check_rows(fn: str, name: str, t: Tensor, grid, sparse_ratio: int, dims: int, local_groups: int) -> int:
    """Checks ``t`` is ``[G_loc * B, N'/G, ...]``; returns B."""
    seq = skiparse_seq_len(grid, sparse_ratio, dims)
    if t.dim() < 2 or t.shape[1] != seq or t.shape[0] == 0 or t.shape[0] % local_groups != 0:
        raise ValueError(
            f"{fn}: {name} must be the local sparse rows [G_loc * B, N'/G, ...] = [{local_groups} * B, {seq}, ...] "
            f"for grid {tuple(grid)}, P = {sparse_ratio}, dims = {dims}; got shape {tuple(t.shape)}"
        )
    return t.shape[0] // local_groups


def _tokens(grid: Sequence[int]) -> int:
    return int(grid[0]) * int(grid[1]) * int(grid[2])


def _check_shard(fn: str, x: Tensor, n_tokens: int, size: int) -> int:
    """Checks ``x`` is a sequence shard ``[B, N/S, ...]``; returns N/S."""
    if n_tokens % size != 0:
        raise ValueError(
            f"{fn}: the sequence length N = {n_tokens} must be divisible by the world size / group size S = {size} "
            "(contiguous equal sequence shards)"
        )
    if x.dim() < 2 or x.shape[1] * size != n_tokens:
        raise ValueError(
            f"{fn}: x_shard must be this rank's sequence shard [B, N/S, ...] = [B, {n_tokens // size}, ...] "
            f"(N = {n_tokens}, S = {size}), got shape {tuple(x.shape)}"
        )
    return n_tokens // size


# ---- sequence shards ----


def shard_sequence(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's contiguous sequence shard of ``x [B, N, ...]``: ``x[:, r * N/S : (r + 1) * N/S]`` as a
    contiguous ``[B, N/S, ...]`` tensor. Differentiable (the gradient of ``x`` is zero outside the shard).
    Requires N % S == 0."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    if x.dim() < 2:
        raise ValueError(f"shard_sequence: x must be [B, N, ...], got shape {tuple(x.shape)}")
    if x.shape[1] % size != 0:
        raise ValueError(
            f"shard_sequence: the sequence length N = {x.shape[1]} (dim 1 of x) must be divisible by the world "
            f"size / group size S = {size}"
        )
    n = x.shape[1] // size
    return x[:, rank * n : (rank + 1) * n].contiguous()


def _gather_seq(x_shard: Tensor, group, tag: str) -> Tensor:
    """[B, N/S, ...] shards of all ranks -> [B, N, ...] (rank i's shard at tokens [i * N/S, (i + 1) * N/S))."""
    stacked = comm.all_gather(x_shard, group=group, tag=tag)  # [S, B, N/S, ...]
    return stacked.movedim(0, 1).reshape(x_shard.shape[0], -1, *x_shard.shape[2:])


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard: Tensor, group) -> Tensor:
        ctx.group = group
        return _gather_seq(x_shard, group, "gather_sequence")

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank used the whole gathered tensor: my shard's gradient is the sum of every rank's gradient
        # slice for it, a reduce-scatter, done as one all_to_all of the slices and a local sum.
        size = comm.group_size(ctx.group)
        B, n = grad.shape[0], grad.shape[1] // size
        send = grad.reshape(B, size, n, *grad.shape[2:]).movedim(1, 0)  # [S (dest), B, N/S, ...]
        received = comm.all_to_all_single(send, group=ctx.group, tag="gather_sequence" + BACKWARD_SUFFIX)
        return received.sum(0), None


def gather_sequence(x_shard: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All ranks' contiguous sequence shards ``[B, N/S, ...]`` -> the full ``[B, N, ...]`` on every rank (one
    all_gather). Differentiable: the backward sums every rank's gradient of this rank's tokens (one all_to_all)."""
    if x_shard.dim() < 2:
        raise ValueError(f"gather_sequence: x_shard must be [B, N/S, ...], got shape {tuple(x_shard.shape)}")
    if comm.group_size(group) == 1:
        return x_shard
    return _GatherSequence.apply(x_shard, group)


# ---- full <-> sparse boundaries ----


def _enter(x_shard: Tensor, layout: dict, group, rank: int, size: int, tag: str) -> Tensor:
    """Sequence shard [B, N/S, ...] -> local sparse rows [G_loc * B, N'/G, ...] (all_gather + local rearrange)."""
    full = _gather_seq(x_shard, group, tag) if size > 1 else x_shard
    return skiparse_rearrange(full, **layout, ssp_rank=rank, ssp_size=size)


def _exit(xs_local: Tensor, layout: dict, group, rank: int, size: int, tag: str) -> Tensor:
    """Local sparse rows [G_loc * B, N'/G, ...] -> sequence shard [B, N/S, ...] (all_gather + restore + narrow)."""
    if size == 1:
        return skiparse_restore(xs_local, **layout)
    # Rank i holds global rows [i * G_loc * B, (i + 1) * G_loc * B): stacking the ranks gives the global order.
    rows = comm.all_gather(xs_local, group=group, tag=tag).flatten(0, 1)
    full = skiparse_restore(rows, **layout)
    n = full.shape[1] // size
    return full[:, rank * n : (rank + 1) * n].contiguous()


class _SSPEnter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard, layout, group, rank, size):
        ctx.layout, ctx.group, ctx.rank, ctx.size = layout, group, rank, size
        return _enter(x_shard, layout, group, rank, size, "ssp.enter")

    @staticmethod
    def backward(ctx, grad):
        # Both layouts partition the same tokens, so the adjoint of enter is exit (and vice versa).
        grad = _exit(grad, ctx.layout, ctx.group, ctx.rank, ctx.size, "ssp.enter" + BACKWARD_SUFFIX)
        return grad, None, None, None, None


class _SSPExit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs_local, layout, group, rank, size):
        ctx.layout, ctx.group, ctx.rank, ctx.size = layout, group, rank, size
        return _exit(xs_local, layout, group, rank, size, "ssp.exit")

    @staticmethod
    def backward(ctx, grad):
        grad = _enter(grad, ctx.layout, ctx.group, ctx.rank, ctx.size, "ssp.exit" + BACKWARD_SUFFIX)
        return grad, None, None, None, None


def ssp_enter(
    x_shard: Tensor,
    grid: Sequence[int],
    sparse_ratio: int,
    mode: str,
    *,
    dims: int = 2,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Full -> sparse boundary: this rank's sequence shard ``x_shard [B, N/S, ...]`` (tokens
    ``[r * N/S, (r + 1) * N/S)``, N = T*H*W) -> its local sparse rows ``[G_loc * B, N'/G, ...]`` in ``mode``.

    One all_gather of the shards (S units, spec §7) then :func:`~difforge.ops.skiparse_rearrange` of rank r's
    rows. Backward: all_gather of the local row gradients, restore to ``[B, N, ...]``, this rank's shard.
    Requires S | G and N % S == 0."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    _check_layout("ssp_enter", grid, sparse_ratio, mode, dims, size)
    _check_shard("ssp_enter", x_shard, _tokens(grid), size)
    layout = dict(grid=[int(g) for g in grid], sparse_ratio=int(sparse_ratio), mode=mode, dims=dims)
    return _SSPEnter.apply(x_shard, layout, group, rank, size)


def ssp_exit(
    xs_local: Tensor,
    grid: Sequence[int],
    sparse_ratio: int,
    mode: str,
    *,
    dims: int = 2,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Sparse -> full boundary: local sparse rows ``[G_loc * B, N'/G, ...]`` in ``mode`` -> this rank's sequence
    shard ``[B, N/S, ...]`` in original token order (padding dropped).

    One all_gather of the rows (S units) then :func:`~difforge.ops.skiparse_restore` and a narrow. Backward:
    all_gather of the shard gradients, rearrange of this rank's rows. Requires S | G and N % S == 0."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    local_groups = _check_layout("ssp_exit", grid, sparse_ratio, mode, dims, size)
    _check_rows("ssp_exit", "xs_local", xs_local, grid, sparse_ratio, dims, local_groups)
    if _tokens(grid) % size != 0:
        raise ValueError(
            f"ssp_exit: the sequence length N = T*H*W = {_tokens(grid)} must be divisible by the world size / "
            f"group size S = {size} (contiguous equal sequence shards)"
        )
    layout = dict(grid=[int(g) for g in grid], sparse_ratio=int(sparse_ratio), mode=mode, dims=dims)
    return _SSPExit.apply(xs_local, layout, group, rank, size)


# ---- the switch between sparse blocks ----


def _switch(xs: Tensor, layout: dict, from_mode: str, group, rank: int, size: int, tag: str) -> Tensor:
    if size == 1:
        return skiparse_switch(xs, from_mode=from_mode, **layout)
    # Pre-permutation (chunk j of the buffer goes to rank j), ONE all_to_all_single, post-permutation.
    send = skiparse_exchange_send(xs, from_mode=from_mode, **layout, ssp_rank=rank, ssp_size=size)
    received = comm.all_to_all_single(send, group=group, tag=tag)
    return skiparse_exchange_receive(received, from_mode=from_mode, **layout, ssp_rank=rank, ssp_size=size)


class _SSPSwitch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, layout, from_mode, group, rank, size):
        ctx.layout, ctx.from_mode, ctx.group, ctx.rank, ctx.size = layout, from_mode, group, rank, size
        return _switch(xs, layout, from_mode, group, rank, size, "ssp.switch")

    @staticmethod
    def backward(ctx, grad):
        # The switch is an involution (a permutation that is its own inverse): its adjoint is the switch the
        # other way, again one all_to_all.
        grad = grad.contiguous()
        to_mode = _other(ctx.from_mode)
        out = _switch(grad, ctx.layout, to_mode, ctx.group, ctx.rank, ctx.size, "ssp.switch" + BACKWARD_SUFFIX)
        return out, None, None, None, None, None


def ssp_switch(
    xs_local: Tensor,
    grid: Sequence[int],
    sparse_ratio: int,
    from_mode: str,
    *,
    dims: int = 2,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Token <-> group switch of the local sparse rows under SSP: ``xs_local [G_loc * B, N'/G, ...]`` in
    ``from_mode`` -> the local rows ``[G_loc * B, N'/G, ...]`` of the other mode.

    S = 1: :func:`~difforge.ops.skiparse_switch`. S > 1: :func:`~difforge.ops.skiparse_exchange_send` -> exactly
    one ``all_to_all_single`` (M * (S-1)/S bytes off-rank, M = B*N'*C/S elements) ->
    :func:`~difforge.ops.skiparse_exchange_receive`. Bitwise equal to the global switch restricted to this rank.
    Differentiable; the backward is the switch the other way (one all_to_all). Requires S | G."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    local_groups = _check_layout("ssp_switch", grid, sparse_ratio, from_mode, dims, size)
    _check_rows("ssp_switch", "xs_local", xs_local, grid, sparse_ratio, dims, local_groups)
    layout = dict(grid=[int(g) for g in grid], sparse_ratio=int(sparse_ratio), dims=dims)
    return _SSPSwitch.apply(xs_local, layout, from_mode, group, rank, size)


# ---- attention inside a sparse block ----


def ssp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grid: Sequence[int],
    sparse_ratio: int,
    mode: str,
    dims: int = 2,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
) -> Tensor:
    """Skiparse self-attention on this rank's local sparse rows, with no communication.

    q, k, v: ``[G_loc * B, N'/G, H, D]`` (k, v may have fewer heads, GQA) in ``mode``; returns
    ``[G_loc * B, N'/G, H, D]``. Each row attends only the valid keys of its sub-sequence
    (``seqused_k`` from :func:`~difforge.ops.skiparse_seqlens` for this rank); rows of padded slots get
    well-defined values that no valid token reads. Differentiable in q, k, v."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    local_groups = _check_layout("ssp_attention", grid, sparse_ratio, mode, dims, size)
    if q.dim() != 4:
        raise ValueError(f"ssp_attention: q must be [G_loc * B, N'/G, H, D], got shape {tuple(q.shape)}")
    batch = _check_rows("ssp_attention", "q", q, grid, sparse_ratio, dims, local_groups)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"ssp_attention: {name} must be [G_loc * B, N'/G, H_kv, D] with the rows and length of q "
                f"{tuple(q.shape[:2])}, got shape {tuple(t.shape)}"
            )
    seqused = skiparse_seqlens(
        [int(g) for g in grid], int(sparse_ratio), mode, dims=dims, batch=batch, ssp_rank=rank, ssp_size=size,
        device=q.device,
    )  # fmt: skip
    out, _ = flash_attention(q, k, v, scale=scale, seqused_k=seqused)
    return out
