"""Bad input to the Skiparse ops raises a clear error naming the op and the argument (spec §11,
bindings/skiparse_ops.h), never a crash or a silent answer.

Every layout check runs on all five ops through the raw torch.ops.difforge overloads (the Python wrappers forward
their arguments unchanged): grid not (T, H, W) or not matching N, extents < 1, sparse_ratio < 1, unknown mode,
dims not 1 / 2, ssp_size not dividing G, ssp_rank out of range, inputs in the sparse layout with the wrong sequence
length or row count, exchange_receive with a wrong buffer shape, and backward through the exchange halves. Then
skiparse_attention (mode, q not 4-D, the layout checks) and skiparse_seqlens.
"""

from __future__ import annotations

import pytest
import torch

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge

ERRORS = (RuntimeError, ValueError)
GRID, P, B, C = [1, 3, 5], 2, 2, 3  # N = 15, G = 4, N'/G = 8
OPS = ("skiparse_rearrange", "skiparse_restore", "skiparse_switch", "skiparse_exchange_send",
       "skiparse_exchange_receive")  # fmt: skip


def raises(match):
    return pytest.raises(ERRORS, match=match)


def _valid_input(op: str, ssp_size: int = 1) -> torch.Tensor:
    """An input of the right shape for (GRID, P, dims=2, ssp_size)."""
    gl = 4 // ssp_size
    if op == "skiparse_rearrange":
        return torch.randn(B, 15, C)
    if op == "skiparse_exchange_receive":
        return torch.randn(ssp_size, gl * gl * B * 2, C)  # base = T * H'/P^2 * W'/P^2 = 2
    return torch.randn(gl * B, 8, C)


def call(op: str, x=None, *, grid=GRID, P=P, mode="token", dims=2, rank=0, S=1):
    """The raw op with schema arguments; ``x`` defaults to a valid input for the default layout."""
    x = _valid_input(op) if x is None else x
    if op == "skiparse_switch":
        return getattr(raw, op)(x, list(grid), P, mode, dims)
    return getattr(raw, op)(x, list(grid), P, mode, dims, rank, S)


def test_valid_baseline_runs():
    """The unmodified inputs of this file are valid (so every raise below is due to the one change)."""
    for op in OPS:
        call(op)
        if op != "skiparse_switch":
            call(op, _valid_input(op, 2), S=2, rank=1)
    q = torch.randn(B, 15, 2, 8)
    ops.skiparse_attention(q, q, q, grid=GRID, sparse_ratio=P, mode="group")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("grid", [[4, 4], [1, 1, 3, 5], []], ids=["2 entries", "4 entries", "empty"])
def test_grid_not_three_entries(op, grid):
    with raises(rf"{op}: grid must be \(T, H, W\)"):
        call(op, grid=grid)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("grid", [[0, 3, 5], [1, -3, 5], [1, 3, 0]], ids=["T=0", "H<0", "W=0"])
def test_grid_extents_below_one(op, grid):
    with raises(rf"{op}: grid extents must be >= 1"):
        call(op, grid=grid)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("grid", [[1, 3, 4], [1, 4, 5], [2, 3, 5]], ids=["fewer", "more", "T"])
def test_grid_not_matching_tokens(grid, dims):
    with raises(r"skiparse_rearrange: x has 15 tokens but grid \[\d, \d, \d\] has T\*H\*W = \d+"):
        call("skiparse_rearrange", grid=grid, dims=dims)
    with raises(r"x has 15 tokens"):
        ops.skiparse_rearrange(torch.randn(B, 15, C), grid, P, "token", dims=dims)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad_p", [0, -1])
def test_sparse_ratio_below_one(op, bad_p):
    with raises(rf"{op}: sparse_ratio must be >= 1, got {bad_p}"):
        call(op, P=bad_p)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", ["tok", "Token", ""])
def test_unknown_mode(op, mode):
    with raises(rf'{op}: mode must be "token" or "group", got "{mode}"'):
        call(op, mode=mode)


def test_unknown_mode_wrappers():
    x = torch.randn(B, 15, C)
    with raises(r'mode must be "token" or "group"'):
        ops.skiparse_rearrange(x, GRID, P, "sparse")
    with raises(r'mode must be "token" or "group"'):
        ops.skiparse_switch(torch.randn(8, 8, C), GRID, P, "both")
    with raises(r'mode must be "token" or "group"'):
        ops.skiparse_seqlens(GRID, P, "tok")
    q = torch.randn(B, 15, 2, 8)
    for P_ in (1, 2):  # P = 1 takes the dense path, it still checks the mode
        with raises(r'skiparse_attention: mode must be "token" or "group", got \'tokens\''):
            ops.skiparse_attention(q, q, q, grid=GRID, sparse_ratio=P_, mode="tokens")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dims", [0, 3, -1])
def test_dims_not_1_or_2(op, dims):
    with raises(rf"{op}: dims must be 1 or 2, got {dims}"):
        call(op, dims=dims)


@pytest.mark.parametrize("op", [o for o in OPS if o != "skiparse_switch"])
@pytest.mark.parametrize("dims,S,G", [(2, 3, 4), (1, 4, 2), (2, 8, 4), (2, 0, 4), (2, -2, 4)],
                         ids=["3 at P2 2d", "4 at P2 1d", "8 > G", "0", "negative"])  # fmt: skip
def test_ssp_size_not_dividing_groups(op, dims, S, G):
    what = r"P\^2" if dims == 2 else "P"
    with raises(rf"{op}: ssp_size must divide the {G} sub-sequences \({what} with P = 2\), got {S}"):
        call(op, dims=dims, S=S)


@pytest.mark.parametrize("op", [o for o in OPS if o != "skiparse_switch"])
@pytest.mark.parametrize("rank,S", [(-1, 2), (2, 2), (4, 4), (1, 1)])
def test_ssp_rank_out_of_range(op, rank, S):
    with raises(rf"{op}: ssp_rank must be in \[0, {S}\), got {rank}"):
        call(op, _valid_input(op, S), rank=rank, S=S)


@pytest.mark.parametrize("op", ["skiparse_restore", "skiparse_switch", "skiparse_exchange_send"])
def test_sparse_input_wrong_sequence_length(op):
    for L in (7, 9, 15):
        with raises(rf"{op}: xs has sequence length {L} but the sparse layout of this grid has N'/G = 8"):
            call(op, torch.randn(4 * B, L, C))
    with raises(rf"{op}: xs has sequence length 8 but the sparse layout of this grid has N'/G = 16"):
        call(op, torch.randn(4 * B, 8, C), grid=[2, 3, 5])  # the layout of another grid


@pytest.mark.parametrize("op", ["skiparse_restore", "skiparse_switch", "skiparse_exchange_send"])
def test_sparse_input_rows_not_multiple_of_local_groups(op):
    for rows in (3, 5, 6):
        with raises(rf"{op}: xs has {rows} rows, not a multiple of the 4 local sub-sequences"):
            call(op, torch.randn(rows, 8, C))
    if op != "skiparse_switch":  # with SSP the local count is G / S
        with raises(rf"{op}: xs has 3 rows, not a multiple of the 2 local sub-sequences"):
            call(op, torch.randn(3, 8, C), S=2)


@pytest.mark.parametrize("op", ["skiparse_rearrange", "skiparse_restore", "skiparse_switch",
                                "skiparse_exchange_send", "skiparse_exchange_receive"])  # fmt: skip
def test_input_with_fewer_than_two_dims(op):
    with raises(rf"{op}: \w+ must have at least 2 dims"):
        call(op, torch.randn(15))


@pytest.mark.parametrize("shape", [(1, 16, 3), (3, 8, 3), (2, 7, 3), (2, 10, 3), (8, 3)],
                         ids=["S rows wrong", "3 ranks", "not multiple", "not multiple 2", "flat"])  # fmt: skip
def test_exchange_receive_wrong_shape(shape):
    """S = 2 at P = 2: received must be [2, G_loc^2 * base * B] = [2, 8 * B]."""
    with raises(r"skiparse_exchange_receive: received must be \[ssp_size, G_loc\^2 \* B \* base, \.\.\.\] = "
                r"\[2, 8 \* B, \.\.\.\]"):  # fmt: skip
        call("skiparse_exchange_receive", torch.randn(*shape), S=2)


@pytest.mark.parametrize("which", ["send", "receive"])
def test_backward_through_exchange_raises(which):
    """The exchange halves run forward on inputs that require grad, but a backward reaching them raises (use
    difforge.parallel.ssp_switch)."""
    x = torch.randn(B, 15, C, requires_grad=True)
    local = ops.skiparse_rearrange(x, GRID, P, "token", ssp_rank=0, ssp_size=2)
    send = ops.skiparse_exchange_send(local, GRID, P, "token", ssp_rank=0, ssp_size=2)
    out = send
    if which == "receive":
        out = ops.skiparse_exchange_receive(send.detach().requires_grad_(), GRID, P, "token", ssp_rank=0, ssp_size=2)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=rf"skiparse_exchange_{which} is one half of the SSP switch.*ssp_switch"):
        out.sum().backward()


# ---- skiparse_attention -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(B, 15, 16), (15, 2, 8), (1, B, 15, 2, 8)])
def test_attention_q_not_4d(shape):
    q = torch.randn(*shape)
    with raises(r"skiparse_attention: q must be \[B, N, H, D\], got shape"):
        ops.skiparse_attention(q, q, q, grid=GRID, sparse_ratio=P, mode="token")


@pytest.mark.parametrize(
    "kw,match",
    [(dict(grid=[1, 4, 5]), r"has 15 tokens but grid"), (dict(grid=[3, 5]), r"grid must be \(T, H, W\)"),
     (dict(sparse_ratio=0), r"sparse_ratio( P)? must be >= 1"), (dict(sparse_ratio=-1), r"sparse_ratio( P)? must be >= 1"),
     (dict(dims=3), r"dims must be 1 or 2")],
    ids=["grid-N", "grid-2", "P0", "P-1", "dims3"],
)  # fmt: skip
def test_attention_layout_errors(kw, match):
    q = torch.randn(B, 15, 2, 8)
    args = dict(grid=GRID, sparse_ratio=P, mode="group") | kw
    with raises(match):
        ops.skiparse_attention(q, q, q, **args)


# sparse_ratio=1 takes a dense shortcut: it must validate the layout all the same (spec §11).
@pytest.mark.parametrize("kw", [dict(grid=[1, 4, 5]), dict(grid=[3, 5]), dict(dims=3)],
                         ids=["grid-N", "grid-2", "dims3"])  # fmt: skip
def test_attention_p1_validates_layout(kw):
    q = torch.randn(B, 15, 2, 8)
    args = dict(grid=GRID, sparse_ratio=1, mode="token") | kw
    with raises(r"grid|dims"):
        ops.skiparse_attention(q, q, q, **args)


# ---- skiparse_seqlens ------------------------------------------------------------------------------------------

# skiparse_seqlens is host-side arithmetic: it must refuse what the ops refuse.
@pytest.mark.parametrize("kw", [dict(ssp_size=3), dict(ssp_rank=2, ssp_size=2), dict(sparse_ratio=0),
                                dict(sparse_ratio=-1), dict(dims=3)],
                         ids=["S3", "rank2of2", "P0", "P-1", "dims3"])  # fmt: skip
def test_seqlens_validates_layout(kw):
    args = dict(sparse_ratio=P, mode="token") | kw
    with raises(r"ssp_size|ssp_rank|sparse_ratio|dims"):
        ops.skiparse_seqlens([1, 4, 4], **args)
