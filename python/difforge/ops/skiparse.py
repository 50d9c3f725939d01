"""Skiparse sparse attention (OSP-Next Skiparse-2D, Open-Sora Plan v1.3 Skiparse-1D): a permutation of the
tokens that moves G sub-sequences into the batch, after which ordinary dense attention runs on each.

Sparse layout ``[G * B, N' / G, ...]``, row ``s * B + b``. 2D (``dims=2``): G = P^2; the token of grid cell
``(t, h, w)`` goes to sub-sequence ``(h mod P) * P + (w mod P)`` ("token" mode: a dilation-P lattice over all
frames) or ``(floor(h/P) mod P) * P + floor(w/P) mod P`` ("group" mode: P x P patches at stride P^2). H and W
are padded to multiples of P^2; each sub-sequence holds its valid tokens first and zeros after them, so
attention takes one key length per sub-sequence instead of a mask. 1D (``dims=1``, G = P) applies the same
split to the flat token index. Sparse Sequence Parallelism (SSP) over S ranks (S divides G) keeps sub-sequences
``[r * G / S, (r + 1) * G / S)`` on rank r.

Maps: ``cpp/include/difforge/skiparse_index.h``. Kernels: ``cpp/attention/skiparse.cpp`` (CPU) and
``cuda/attention/skiparse.cu``; schemas: ``bindings/schemas.cpp``. Every op moves whole rows (the dims after
the first two), in any dtype, reading and writing each element once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from difforge.ops._autograd import forbid_backward
from difforge.ops.attention import flash_attention

_ops = torch.ops.difforge

Mode = Literal["token", "group"]
Grid = Sequence[int]


def _other(mode: str) -> str:
    return "group" if mode == "token" else "token"


# ---- layout arithmetic (mirrors skiparse_index.h; host-side metadata) ----


def skiparse_groups(sparse_ratio: int, dims: int = 2) -> int:
    """Number of sub-sequences G: P^2 (2D) or P (1D)."""
    return sparse_ratio * sparse_ratio if dims == 2 else sparse_ratio


def _split_extents(grid: Grid, dims: int) -> tuple[int, int, int]:
    T, H, W = (int(g) for g in grid)
    return (T, H, W) if dims == 2 else (1, 1, T * H * W)


def _padded(extent: int, P: int) -> int:
    return -(-extent // (P * P)) * P * P


def skiparse_seq_len(grid: Grid, sparse_ratio: int, dims: int = 2) -> int:
    """Length N'/G of every sub-sequence (valid tokens plus padding)."""
    T, H, W = _split_extents(grid, dims)
    P = sparse_ratio
    sub_h = _padded(H, P) // P if dims == 2 else 1
    return T * sub_h * (_padded(W, P) // P)


def _axis_count(mode: str, extent: int, digit: int, P: int) -> int:
    if mode == "token":
        return -(-(extent - digit) // P) if extent > digit else 0
    rest = extent % (P * P) - digit * P
    return (extent // (P * P)) * P + min(max(rest, 0), P)


def _valid_counts(grid: tuple[int, ...], P: int, mode: str, dims: int) -> tuple[int, ...]:
    T, H, W = _split_extents(grid, dims)
    counts = []
    for s in range(skiparse_groups(P, dims)):
        digit_h, digit_w = divmod(s, P) if dims == 2 else (0, s)
        count_h = _axis_count(mode, H, digit_h, P) if dims == 2 else 1
        counts.append(T * count_h * _axis_count(mode, W, digit_w, P))
    return tuple(counts)


def skiparse_seqlens(
    grid: Grid,
    sparse_ratio: int,
    mode: Mode,
    *,
    dims: int = 2,
    batch: int = 1,
    ssp_rank: int = 0,
    ssp_size: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Valid tokens of every local row of the sparse layout: int32 ``[G_loc * batch]`` (row ``s * B + b``),
    the ``seqused_k`` of the attention over it. Sub-sequences of one mode hold different numbers of tokens
    once H or W is padded; a sub-sequence may hold none (token mode with H < P, say)."""
    check_layout("skiparse_seqlens", grid, sparse_ratio, mode=mode, dims=dims, ssp_rank=ssp_rank, ssp_size=ssp_size)
    counts = _valid_counts(tuple(int(g) for g in grid), int(sparse_ratio), mode, int(dims))
    local = len(counts) // ssp_size
    rows = [c for c in counts[ssp_rank * local : (ssp_rank + 1) * local] for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.int32).to(device or "cpu", non_blocking=True)


def check_layout(
    op: str,
    grid: Grid,
    sparse_ratio: int,
    *,
    mode: str | None = None,
    dims: int = 2,
    ssp_rank: int = 0,
    ssp_size: int = 1,
    tokens: int | None = None,
) -> int:
    """The layout checks of bindings/skiparse_ops.h, for host-side code (Python helpers, SSP, nn): raises
    ValueError naming ``op`` and the argument; returns the local sub-sequence count G / S."""
    if mode is not None and mode not in ("token", "group"):
        raise ValueError(f'{op}: mode must be "token" or "group", got {mode!r}')
    if len(grid) != 3 or min(int(g) for g in grid) < 1:
        raise ValueError(f"{op}: grid must be (T, H, W) with extents >= 1, got {tuple(grid)}")
    if sparse_ratio < 1:
        raise ValueError(f"{op}: sparse_ratio P must be >= 1, got {sparse_ratio}")
    if dims not in (1, 2):
        raise ValueError(f"{op}: dims must be 1 or 2 (Skiparse-1D or -2D), got {dims}")
    groups = skiparse_groups(sparse_ratio, dims)
    if ssp_size < 1 or groups % ssp_size:
        what = f"P^2 = {groups}" if dims == 2 else f"P = {groups}"
        raise ValueError(
            f"{op}: the SSP size (world or group size) S = {ssp_size} must divide {what} (sparse_ratio P = "
            f"{sparse_ratio}, dims = {dims}): SSP shards whole sub-sequences, so S | {groups}"
        )
    if not 0 <= ssp_rank < ssp_size:
        raise ValueError(f"{op}: ssp_rank must be in [0, {ssp_size}), got {ssp_rank}")
    if tokens is not None and tokens != grid[0] * grid[1] * grid[2]:
        raise ValueError(
            f"{op}: the input has {tokens} tokens but grid {tuple(grid)} has T*H*W = {grid[0] * grid[1] * grid[2]}"
        )
    return groups // ssp_size


# ---- ops ----


def skiparse_rearrange(
    x: Tensor, grid: Grid, sparse_ratio: int, mode: Mode = "token", *, dims: int = 2, ssp_rank: int = 0,
    ssp_size: int = 1,
) -> Tensor:  # fmt: skip
    """``[B, N, ...]`` in original token order (N = T*H*W, w fastest) -> the local rows
    ``[G/S * B, N'/G, ...]`` of the sparse layout in ``mode``; padded slots are zeros.

    Differentiable (the backward is :func:`skiparse_restore`). The dims after the first two move as one row
    and must be dense; the first two may have any strides (a view of a fused QKV projection is read in place).
    """
    return _ops.skiparse_rearrange(x, list(grid), sparse_ratio, mode, dims, ssp_rank, ssp_size)


def skiparse_restore(
    xs: Tensor, grid: Grid, sparse_ratio: int, mode: Mode = "token", *, dims: int = 2, ssp_rank: int = 0,
    ssp_size: int = 1,
) -> Tensor:  # fmt: skip
    """Inverse of :func:`skiparse_rearrange`: local sparse rows ``[G/S * B, N'/G, ...]`` -> ``[B, N, ...]`` in
    original order, padding dropped; with ``ssp_size > 1`` the tokens other ranks hold are zeros.
    Differentiable (the backward is :func:`skiparse_rearrange`)."""
    return _ops.skiparse_restore(xs, list(grid), sparse_ratio, mode, dims, ssp_rank, ssp_size)


def skiparse_switch(xs: Tensor, grid: Grid, sparse_ratio: int, from_mode: Mode, *, dims: int = 2) -> Tensor:
    """All rows of the sparse layout in ``from_mode`` -> the same tokens in the other mode, in one pass
    (token <-> group; an involution, so its backward is the switch the other way). Under SSP use
    :func:`difforge.parallel.ssp_switch`."""
    return _ops.skiparse_switch(xs, list(grid), sparse_ratio, from_mode, dims)


def skiparse_exchange_send(
    xs: Tensor, grid: Grid, sparse_ratio: int, from_mode: Mode, *, dims: int = 2, ssp_rank: int = 0,
    ssp_size: int = 1,
) -> Tensor:  # fmt: skip
    """First step of the SSP switch on rank ``ssp_rank``: local rows in ``from_mode`` -> the all_to_all send
    buffer ``[S, G_loc^2 * B * base, ...]`` whose chunk ``j`` goes to rank ``j`` (base = T * H'/P^2 * W'/P^2).
    Not differentiable on its own: :func:`difforge.parallel.ssp_switch` wraps the exchange and its backward."""
    return _ops.skiparse_exchange_send(xs, list(grid), sparse_ratio, from_mode, dims, ssp_rank, ssp_size)


def skiparse_exchange_receive(
    received: Tensor, grid: Grid, sparse_ratio: int, from_mode: Mode, *, dims: int = 2, ssp_rank: int = 0,
    ssp_size: int = 1,
) -> Tensor:  # fmt: skip
    """Last step of the SSP switch on rank ``ssp_rank``: the buffer received from the all_to_all of
    :func:`skiparse_exchange_send` -> local rows ``[G_loc * B, N'/G, ...]`` in the other mode."""
    return _ops.skiparse_exchange_receive(received, list(grid), sparse_ratio, from_mode, dims, ssp_rank, ssp_size)


def skiparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grid: Grid,
    sparse_ratio: int,
    mode: Mode,
    dims: int = 2,
    scale: float | None = None,
) -> Tensor:
    """Skiparse self-attention in original token order: q, k, v ``[B, N, H, D]`` -> ``[B, N, H, D]``.

    Query ``(t, h, w)`` attends exactly the valid keys of its sub-sequence: same ``(h mod P, w mod P)``
    (token) or same ``(floor(h/P) mod P, floor(w/P) mod P)`` (group), over all frames. Runs as rearrange ->
    :func:`flash_attention` on ``[G*B, N'/G, H, D]`` with one key length per sub-sequence -> restore, so the
    cost is ~N^2/G and no mask is built. ``sparse_ratio=1`` is dense attention. Differentiable in q, k, v.
    """
    if q.dim() != 4:
        raise ValueError(f"skiparse_attention: q must be [B, N, H, D], got shape {tuple(q.shape)}")
    check_layout("skiparse_attention", grid, sparse_ratio, mode=mode, dims=dims, tokens=q.shape[1])
    if sparse_ratio == 1:
        return flash_attention(q, k, v, scale=scale)[0]
    layout = dict(grid=grid, sparse_ratio=sparse_ratio, mode=mode, dims=dims)
    qs, ks, vs = (skiparse_rearrange(t, **layout) for t in (q, k, v))
    seqused = skiparse_seqlens(grid, sparse_ratio, mode, dims=dims, batch=q.shape[0], device=q.device)
    out, _ = flash_attention(qs, ks, vs, scale=scale, seqused_k=seqused)
    return skiparse_restore(out, **layout)


# ---- fake kernels ----


def _local_groups(sparse_ratio: int, dims: int, ssp_size: int) -> int:
    return skiparse_groups(sparse_ratio, dims) // ssp_size


def _base(grid: Grid, sparse_ratio: int, dims: int) -> int:
    return skiparse_seq_len(grid, sparse_ratio, dims) // skiparse_groups(sparse_ratio, dims)


@torch.library.register_fake("difforge::skiparse_rearrange")
def _(x, grid, sparse_ratio, mode, dims, ssp_rank, ssp_size):
    rows = _local_groups(sparse_ratio, dims, ssp_size) * x.shape[0]
    return x.new_empty((rows, skiparse_seq_len(grid, sparse_ratio, dims), *x.shape[2:]))


@torch.library.register_fake("difforge::skiparse_restore")
def _(xs, grid, sparse_ratio, mode, dims, ssp_rank, ssp_size):
    batch = xs.shape[0] // _local_groups(sparse_ratio, dims, ssp_size)
    return xs.new_empty((batch, grid[0] * grid[1] * grid[2], *xs.shape[2:]))


@torch.library.register_fake("difforge::skiparse_switch")
def _(xs, grid, sparse_ratio, from_mode, dims):
    return xs.new_empty(xs.shape)


@torch.library.register_fake("difforge::skiparse_exchange_send")
def _(xs, grid, sparse_ratio, from_mode, dims, ssp_rank, ssp_size):
    local = _local_groups(sparse_ratio, dims, ssp_size)
    per_rank = local * xs.shape[0] * _base(grid, sparse_ratio, dims)
    return xs.new_empty((ssp_size, per_rank, *xs.shape[2:]))


@torch.library.register_fake("difforge::skiparse_exchange_receive")
def _(received, grid, sparse_ratio, from_mode, dims, ssp_rank, ssp_size):
    rows = received.shape[1] // (_local_groups(sparse_ratio, dims, ssp_size) * _base(grid, sparse_ratio, dims))
    return received.new_empty((rows, skiparse_seq_len(grid, sparse_ratio, dims), *received.shape[2:]))


# ---- autograd: every op is a permutation (plus zeros), so its backward is the inverse permutation ----


def _setup_layout(ctx, inputs, output):
    ctx.args = inputs[1:]


def _rearrange_backward(ctx, grad):
    return (_ops.skiparse_restore(grad, *ctx.args), None, None, None, None, None, None)


def _restore_backward(ctx, grad):
    return (_ops.skiparse_rearrange(grad, *ctx.args), None, None, None, None, None, None)


def _switch_backward(ctx, grad):
    grid, sparse_ratio, from_mode, dims = ctx.args
    return (_ops.skiparse_switch(grad, grid, sparse_ratio, _other(from_mode), dims), None, None, None, None)


torch.library.register_autograd("difforge::skiparse_rearrange", _rearrange_backward, setup_context=_setup_layout)
torch.library.register_autograd("difforge::skiparse_restore", _restore_backward, setup_context=_setup_layout)
torch.library.register_autograd("difforge::skiparse_switch", _switch_backward, setup_context=_setup_layout)
for _op in ("skiparse_exchange_send", "skiparse_exchange_receive"):
    forbid_backward(
        f"difforge::{_op}",
        f"{_op} is one half of the SSP switch; differentiate through difforge.parallel.ssp_switch, whose "
        "backward is the switch the other way",
    )
