"""Worker-side scenarios of the distributed tests (run by dist_testlib in every spawned process).

Every rank builds the same inputs from a fixed seed, computes the single-process reference with the S = 1 ops
(``difforge.ops.skiparse_*`` and ``flash_attention`` on the whole tensors, no difforge.parallel code), runs the
same computation under SSP / Ulysses on its shard, and compares its part. Permutations are compared bitwise,
results after attention within a tight fp32 tolerance (the max error is returned for the report).
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from difforge.ops import (
    flash_attention,
    skiparse_attention,
    skiparse_groups,
    skiparse_rearrange,
    skiparse_restore,
    skiparse_seq_len,
    skiparse_seqlens,
    skiparse_switch,
)
from difforge.parallel import (
    CollectiveError,
    count_comm,
    gather_sequence,
    shard_sequence,
    ssp_attention,
    ssp_enter,
    ssp_exit,
    ssp_switch,
    ulysses_attention,
)

ATOL = 2e-6  # fp32 attention on identical rows; the kernel tiles per row, so this is summation-order slack only

PADDED_2D = dict(grid=(2, 5, 6), sparse_ratio=2, dims=2)  # H' = W' = 8: padded slots in every sub-sequence
UNPADDED_2D = dict(grid=(2, 4, 8), sparse_ratio=2, dims=2)
PADDED_1D = dict(grid=(1, 3, 10), sparse_ratio=2, dims=1)  # N = 30 -> N' = 32
EMPTY_2D = dict(grid=(2, 1, 6), sparse_ratio=2, dims=2)  # token sub-sequences 2, 3 hold no token (spec §3.2)


def _tokens(grid) -> int:
    return grid[0] * grid[1] * grid[2]


def _rand(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _my_rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rows [r * G_loc * B, (r + 1) * G_loc * B) of a full sparse tensor [G * B, ...]."""
    n = t.shape[0] // size
    return t[rank * n : (rank + 1) * n]


def _my_shard(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[1] // size
    return t[:, rank * n : (rank + 1) * n]


def _bitwise(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        raise AssertionError(f"{name}: not bitwise equal at {bad.shape[0]} of {got.numel()} elements, first {bad[:4]}")


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> float:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol * max(1.0, want.abs().max().item()), f"{name}: max abs error {err:.3e} > {atol:.1e}"
    return err


def _dense_sparse_attention(q, k, v, layout, mode, batch):
    """Single-process reference: attention over ALL sparse rows with the S = 1 key lengths."""
    seq = skiparse_seqlens(layout["grid"], layout["sparse_ratio"], mode, dims=layout["dims"], batch=batch)
    return flash_attention(q, k, v, seqused_k=seq)[0]


# ---- SSP stack vs single process ----


def check_ssp_stack(rank: int, size: int, layout: dict, group=None, seed: int = 0, batch: int = 2) -> dict:
    """rearrange(token) -> attention -> switch(token -> group) -> attention -> restore, forward and backward,
    single-process S = 1 ops vs ssp_enter / ssp_attention / ssp_switch / ssp_exit on ``size`` ranks."""
    grid, P, dims = layout["grid"], layout["sparse_ratio"], layout["dims"]
    heads, dim = 2, 8
    n_tok = _tokens(grid)
    x = _rand(seed, batch, n_tok, heads, dim)
    w = _rand(seed + 1, batch, n_tok, heads, dim)

    # Reference (one process, whole tensors).
    xr = x.clone().requires_grad_()
    a_ref = skiparse_rearrange(xr, grid, P, "token", dims=dims)
    o1_ref = _dense_sparse_attention(a_ref, a_ref.sin(), a_ref.cos(), layout, "token", batch)
    b_ref = skiparse_switch(o1_ref, grid, P, "token", dims=dims)
    o2_ref = _dense_sparse_attention(b_ref, b_ref.sin(), 2 * b_ref, layout, "group", batch)
    y_ref = skiparse_restore(o2_ref, grid, P, "group", dims=dims)
    (y_ref * w).sum().backward()

    # SSP on this rank's shard.
    sparse = dict(grid=grid, sparse_ratio=P, dims=dims, group=group)
    xs = _my_shard(x, rank, size).clone().requires_grad_()
    a = ssp_enter(xs, grid, P, "token", dims=dims, group=group)
    o1 = ssp_attention(a, a.sin(), a.cos(), mode="token", **sparse)
    b = ssp_switch(o1, grid, P, "token", dims=dims, group=group)
    o2 = ssp_attention(b, b.sin(), 2 * b, mode="group", **sparse)
    y = ssp_exit(o2, grid, P, "group", dims=dims, group=group)
    (y * _my_shard(w, rank, size)).sum().backward()

    _bitwise("ssp_enter output", a, _my_rows(a_ref.detach(), rank, size))
    errs = {
        "attention token": _close("ssp_attention (token)", o1, _my_rows(o1_ref.detach(), rank, size)),
        "switch": _close("ssp_switch after attention", b, _my_rows(b_ref.detach(), rank, size)),
        "attention group": _close("ssp_attention (group)", o2, _my_rows(o2_ref.detach(), rank, size)),
        "output": _close("ssp_exit output", y, _my_shard(y_ref.detach(), rank, size)),
        "grad x": _close("input gradient", xs.grad, _my_shard(xr.grad, rank, size)),
    }
    return {"max_err": max(errs.values()), "bitwise": all(e == 0.0 for e in errs.values()), "errs": errs}


def check_ssp_permutations(rank: int, size: int, layout: dict, group=None, seed: int = 10, batch: int = 2) -> None:
    """enter -> switch and switch -> exit, forward and backward, bitwise against the S = 1 ops."""
    grid, P, dims = layout["grid"], layout["sparse_ratio"], layout["dims"]
    n_tok, channels = _tokens(grid), 6
    x = _rand(seed, batch, n_tok, channels)
    seq = skiparse_seq_len(grid, P, dims)
    groups = skiparse_groups(P, dims)
    wg = _rand(seed + 1, groups * batch, seq, channels)  # weights on the group layout
    w = _rand(seed + 2, batch, n_tok, channels)

    # (1) enter(token) -> switch: the local rows of group mode; gradient = the weights pulled back.
    xr = x.clone().requires_grad_()
    b_ref = skiparse_switch(skiparse_rearrange(xr, grid, P, "token", dims=dims), grid, P, "token", dims=dims)
    (b_ref * wg).sum().backward()
    xs = _my_shard(x, rank, size).clone().requires_grad_()
    a = ssp_enter(xs, grid, P, "token", dims=dims, group=group)
    b = ssp_switch(a, grid, P, "token", dims=dims, group=group)
    (b * _my_rows(wg, rank, size)).sum().backward()
    _bitwise("enter->switch forward", b, _my_rows(b_ref.detach(), rank, size))
    _bitwise("enter->switch forward == rearrange(group)", b,
             _my_rows(skiparse_rearrange(x, grid, P, "group", dims=dims), rank, size))  # fmt: skip
    _bitwise("enter->switch backward", xs.grad, _my_shard(xr.grad, rank, size))

    # (2) switch(group -> token) -> exit(token): back to the sequence shard; gradient through exit and switch.
    full_g = skiparse_rearrange(x, grid, P, "group", dims=dims)
    gr = full_g.clone().requires_grad_()
    y_ref = skiparse_restore(skiparse_switch(gr, grid, P, "group", dims=dims), grid, P, "token", dims=dims)
    (y_ref * w).sum().backward()
    gl = _my_rows(full_g, rank, size).clone().requires_grad_()
    y = ssp_exit(ssp_switch(gl, grid, P, "group", dims=dims, group=group), grid, P, "token", dims=dims, group=group)
    (y * _my_shard(w, rank, size)).sum().backward()
    _bitwise("switch->exit forward", y, _my_shard(y_ref.detach(), rank, size))
    _bitwise("switch->exit forward == x shard", y, _my_shard(x, rank, size))
    _bitwise("switch->exit backward", gl.grad, _my_rows(gr.grad, rank, size))


def check_sequence_helpers(rank: int, size: int, group=None) -> None:
    x = _rand(20, 2, 12 * size, 3)
    shard = shard_sequence(x, group)
    _bitwise("shard_sequence", shard, _my_shard(x, rank, size))
    leaf = shard.clone().requires_grad_()
    full = gather_sequence(leaf, group)
    _bitwise("gather_sequence", full, x)
    # Every rank weights the gathered tensor differently: my shard's gradient is the sum over ranks.
    weights = [_rand(30 + r, *x.shape) for r in range(size)]
    (full * weights[rank]).sum().backward()
    _close("gather_sequence backward", leaf.grad, _my_shard(sum(weights), rank, size), atol=1e-6)


# ---- Ulysses vs single process ----


def check_ulysses(rank: int, size: int, heads: int, kv_heads: int, group=None, sparse: dict | None = None) -> float:
    batch, dim, n_tok = 2, 8, (_tokens(sparse["grid"]) if sparse else 16 * size)
    q = _rand(40, batch, n_tok, heads, dim)
    k = _rand(41, batch, n_tok, kv_heads, dim)
    v = _rand(42, batch, n_tok, kv_heads, dim)
    dout = _rand(43, batch, n_tok, heads, dim)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    if sparse:
        ref = skiparse_attention(*ref_in, grid=sparse["grid"], sparse_ratio=sparse["sparse_ratio"], mode="group")
    else:
        ref = flash_attention(*ref_in)[0]
    (ref * dout).sum().backward()
    mine = [_my_shard(t, rank, size).clone().requires_grad_() for t in (q, k, v)]
    extra = dict(grid=sparse["grid"], sparse_ratio=sparse["sparse_ratio"], mode="group") if sparse else {}
    out = ulysses_attention(*mine, group=group, **extra)
    (out * _my_shard(dout, rank, size)).sum().backward()
    errs = [_close("ulysses output", out, _my_shard(ref.detach(), rank, size))]
    for name, got, want in zip("qkv", mine, ref_in):
        errs.append(_close(f"ulysses grad {name}", got.grad, _my_shard(want.grad, rank, size)))
    return max(errs)


# ---- communication volume ----


def check_bytes(rank: int, size: int, layout: dict, group=None) -> dict:
    """One SSP sparse block (switch + attention) vs one Ulysses block (q, k, v, o all_to_alls), counted."""
    grid, P, dims = layout["grid"], layout["sparse_ratio"], layout["dims"]
    batch, heads, dim, elsize = 2, 4, 8, 4
    channels = heads * dim
    n_tok, seq = _tokens(grid), skiparse_seq_len(grid, P, dims)
    local_rows = skiparse_groups(P, dims) // size * batch
    n_padded = seq * skiparse_groups(P, dims)

    xs = _rand(50, local_rows, seq, channels).requires_grad_()
    with count_comm() as ssp:
        y = ssp_switch(xs, grid, P, "token", dims=dims, group=group).view(local_rows, seq, heads, dim)
        o = ssp_attention(y, 0.5 * y, 2 * y, grid=grid, sparse_ratio=P, mode="group", dims=dims, group=group)
        o.square().sum().backward()
    q, k, v = (_rand(51 + i, batch, n_tok // size, heads, dim).requires_grad_() for i in range(3))
    with count_comm() as uly:
        o = ulysses_attention(q, k, v, group=group)
        o.square().sum().backward()

    M = batch * n_padded * channels // size  # elements per rank of the exchanged (padded) activation
    expect = M * elsize * (size - 1) // size
    got = {
        "ssp_fwd": ssp.total_bytes("forward"), "ssp_bwd": ssp.total_bytes("backward"),
        "uly_fwd": uly.total_bytes("forward"), "uly_bwd": uly.total_bytes("backward"),
        "ssp_calls": [ssp.total_calls("forward"), ssp.total_calls("backward")],
        "uly_calls": [uly.total_calls("forward"), uly.total_calls("backward")],
        "spec_unit": expect, "tags": {**ssp.as_dict(), **uly.as_dict()},
    }  # fmt: skip
    assert got["ssp_calls"] == [1, 1], got
    assert got["uly_calls"] == [4, 4], got
    assert got["ssp_fwd"] == expect and got["ssp_bwd"] == expect, got
    uly_unit = batch * (n_tok // size) * channels * elsize * (size - 1) // size
    assert got["uly_fwd"] == 4 * uly_unit and got["uly_bwd"] == 4 * uly_unit, got
    if n_tok == n_padded:  # same block shape: exactly a quarter of Ulysses
        assert 4 * got["ssp_fwd"] == got["uly_fwd"] and 4 * got["ssp_bwd"] == got["uly_bwd"], got
    return got


# ---- bad input ----


def _expect_error(fn, exc_type, *needles):
    try:
        fn()
    except exc_type as err:
        msg = str(err)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"error message {msg!r} lacks {missing}"
        return msg
    raise AssertionError(f"expected {exc_type.__name__} containing {needles}, nothing raised")


def check_bad_inputs(rank: int, size: int, group=None) -> dict:
    grid, P = UNPADDED_2D["grid"], 2
    n_tok = _tokens(grid)
    msgs = {}
    odd = torch.zeros(1, 4 * size + 1, 3)
    msgs["shard N % S"] = _expect_error(lambda: shard_sequence(odd, group), ValueError, "divisible", f"S = {size}")
    bad_heads = torch.zeros(1, 8, size + 1, 4)
    msgs["ulysses H % S"] = _expect_error(
        lambda: ulysses_attention(bad_heads, bad_heads, bad_heads, group=group), ValueError, "heads", f"S = {size}"
    )
    wrong = torch.zeros(1, n_tok // size + 1, 4)
    msgs["enter shard shape"] = _expect_error(
        lambda: ssp_enter(wrong, grid, P, "token", group=group), ValueError, "x_shard", "[B, N/S, ...]"
    )
    seq = skiparse_seq_len(grid, P, 2)
    rows = torch.zeros(4 // size, seq + 1, 4)
    msgs["switch rows shape"] = _expect_error(
        lambda: ssp_switch(rows, grid, P, "token", group=group), ValueError, "xs_local", str(seq)
    )
    msgs["mode"] = _expect_error(lambda: ssp_switch(rows, grid, P, "diagonal", group=group), ValueError, "mode")
    return msgs


def check_s_not_dividing(rank: int, size: int, group=None) -> dict:
    """S does not divide P^2 = 4 (2D) / P = 2 (1D): every SSP entry point refuses before communicating."""
    grid, P = UNPADDED_2D["grid"], 2
    n_tok = _tokens(grid)
    x = torch.zeros(1, n_tok // size if n_tok % size == 0 else 1, 4)
    rows = torch.zeros(1, skiparse_seq_len(grid, P, 2), 1, 4)
    need = f"S = {size} must divide P^2 = 4"
    msgs = {
        "switch": _expect_error(lambda: ssp_switch(rows[..., 0, :], grid, P, "token", group=group), ValueError, need),
        "enter": _expect_error(lambda: ssp_enter(x, grid, P, "token", group=group), ValueError, need),
        "exit": _expect_error(lambda: ssp_exit(rows[..., 0, :], grid, P, "group", group=group), ValueError, need),
        "attention": _expect_error(
            lambda: ssp_attention(rows, rows, rows, grid=grid, sparse_ratio=P, mode="token", group=group),
            ValueError, need,
        ),  # fmt: skip
        "1d": _expect_error(
            lambda: ssp_switch(rows[..., 0, :], grid, P, "token", dims=1, group=group), ValueError,
            f"S = {size} must divide P = 2",
        ),  # fmt: skip
    }
    return msgs


def check_hybrid_module_stack(rank: int, size: int, layout: dict, group=None, batch: int = 2) -> float:
    """difforge.nn: a dual_end stack of SkiparseAttention blocks (full blocks under Ulysses, sparse blocks under
    SSP, the activation kept in the sparse layout between them) equals the same stack in one process, output and
    input gradient; the reference uses SkiparseLayout without a group."""
    from difforge.nn import SkiparseAttention, SkiparseLayout, dual_end_schedule, rope_angles_3d

    grid, P, dims = layout["grid"], layout["sparse_ratio"], layout["dims"]
    C, heads = 32, 4
    torch.manual_seed(7)
    blocks = [SkiparseAttention(C, heads) for _ in range(6)]
    schedule = dual_end_schedule(6, 4)  # F F T G F F
    angles = rope_angles_3d(grid, C // heads)
    x = _rand(3, batch, _tokens(grid), C)

    def run(x_in, ssp_group):
        state = SkiparseLayout(grid, P, batch=batch, dims=dims, group=ssp_group)
        h = x_in
        for kind, block in zip(schedule, blocks):
            h = state.to(h, kind)
            h = h + block(h, state, angles)
        return state.to(h, "full")

    x_ref = x.clone().requires_grad_()
    ref = run(x_ref, None)
    grad_out = _rand(4, *ref.shape)
    ref.backward(grad_out)
    x_shard = _my_shard(x, rank, size).clone().requires_grad_()
    got = run(x_shard, group or dist.group.WORLD)
    got.backward(_my_shard(grad_out, rank, size))
    return max(
        _close("hybrid stack output", got, _my_shard(ref, rank, size), atol=1e-5),
        _close("hybrid stack grad x", x_shard.grad, _my_shard(x_ref.grad, rank, size), atol=1e-5),
    )


# ---- scenarios (one process group each; see dist_testlib.launch) ----


def world_main(rank: int, world: int, checks, write) -> None:
    """2 or 4 processes: everything that must equal the single-process result, on the default group and (4
    processes) on sub-groups of 2 and 3 ranks."""
    checks("ssp_stack_2d_empty", check_ssp_stack, rank, world, EMPTY_2D)
    for name, layout in (("2d_padded", PADDED_2D), ("2d_unpadded", UNPADDED_2D)):
        checks(f"ssp_stack_{name}", check_ssp_stack, rank, world, layout)
        checks(f"ssp_perm_{name}", check_ssp_permutations, rank, world, layout)
        checks(f"bytes_{name}", check_bytes, rank, world, layout)
    if world == 2:
        checks("ssp_stack_1d", check_ssp_stack, rank, world, PADDED_1D)
        checks("ssp_perm_1d", check_ssp_permutations, rank, world, PADDED_1D)
        checks("bytes_1d", check_bytes, rank, world, PADDED_1D)
    checks("sequence_helpers", check_sequence_helpers, rank, world)
    checks("hybrid_module_stack", check_hybrid_module_stack, rank, world, PADDED_2D)
    checks("ulysses_dense", check_ulysses, rank, world, 4, 4 if world == 4 else 2)
    checks("ulysses_skiparse", check_ulysses, rank, world, 4, 4, sparse=PADDED_2D)
    checks("bad_inputs", check_bad_inputs, rank, world)
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        triple = dist.new_group([0, 1, 2])
        pair = pairs[rank // 2]
        checks("subgroup_ssp_stack", check_ssp_stack, rank % 2, 2, PADDED_2D, group=pair, seed=rank // 2)
        checks("subgroup_ssp_perm", check_ssp_permutations, rank % 2, 2, PADDED_2D, group=pair)
        if rank < 3:
            checks("s3_of_p2", check_s_not_dividing, rank, 3, group=triple)
    if world == 2:
        # A peer that is alive but never joins: the collective must fail after the group's timeout, not hang.
        dist.barrier()  # both ranks create the short-timeout group together
        short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=1.5))
        checks("timeout", _timeout_check, rank, short)


def _timeout_check(rank: int, group) -> dict:
    grid, P = UNPADDED_2D["grid"], 2
    xs = torch.zeros(2, skiparse_seq_len(grid, P, 2), 4)
    if rank == 1:
        time.sleep(3)  # absent past rank 0's 1.5 s timeout, then never calls into this group
        return {}
    start = time.monotonic()
    try:
        ssp_switch(xs, grid, P, "token", group=group)
    except CollectiveError as err:
        return {"message": str(err), "elapsed": time.monotonic() - start, "op": err.op, "tag": err.tag}
    raise AssertionError("ssp_switch with an absent peer returned instead of raising CollectiveError")


def three_main(rank: int, world: int, checks, write) -> None:
    """3 processes: S = 3 refused at P = 2, works at P = 3 (G = 9); then rank 2 dies before a switch and the
    survivors must get CollectiveError."""
    checks("s3_of_p2", check_s_not_dividing, rank, world)
    layout = dict(grid=(1, 9, 9), sparse_ratio=3, dims=2)
    checks("s3_of_p3_perm", check_ssp_permutations, rank, world, layout, batch=1)
    if rank == 2:
        write()
        time.sleep(0.5)  # let the peers drain the last exchange before the connections drop
        os._exit(1)  # dies without a word, before the switch
    checks("dead_peer", _dead_peer_check, layout)


def _dead_peer_check(layout: dict) -> dict:
    grid, P = layout["grid"], layout["sparse_ratio"]
    xs = torch.ones(skiparse_groups(P, 2) // 3, skiparse_seq_len(grid, P, 2), 4)
    start = time.monotonic()
    try:
        ssp_switch(xs, grid, P, "token")
    except CollectiveError as err:
        return {"message": str(err), "elapsed": time.monotonic() - start, "rank": err.rank,
                "world": err.world_size, "op": err.op, "tag": err.tag, "cause": repr(err.__cause__)}  # fmt: skip
    raise AssertionError("ssp_switch returned although rank 2 died")
