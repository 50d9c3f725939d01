"""Hypothesis over Skiparse layouts: grid extents 1..9, P 1..3, dims 1 / 2, both modes, batch 1..3, trailing dims of
rank 0..3, any dtype, SSP size S | G and rank. The permutation ops are compared bitwise with the reference einops maps
of skiparse_testlib (rearrange, restore, switch, exchange through a simulated all_to_all), plus the roundtrip and
switch-involution properties and the valid counts (brute force). Examples are bounded (N <= 729, a few elements per
row) so the "ci" profile runs in a few seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from skiparse_testlib import (
    DTYPE_IDS,
    MODES,
    assert_bitwise,
    brute_counts,
    divisors,
    groups,
    other,
    random_tensor,
    ref_exchange_send,
    ref_rearrange,
    ref_restore,
    ref_switch,
    simulate_all_to_all,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8)
TRAILING = ((), (1,), (3,), (2, 2), (1, 3, 1))


@dataclasses.dataclass
class Layout:
    grid: tuple[int, int, int]
    P: int
    mode: str
    dims: int
    S: int
    rank: int
    x: torch.Tensor

    @property
    def G(self) -> int:
        return groups(self.P, self.dims)

    @property
    def B(self) -> int:
        return self.x.shape[0]


@st.composite
def layouts(draw, device: str = "cpu") -> Layout:
    grid = (draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    P = draw(st.integers(1, 3))
    dims = draw(st.sampled_from((1, 2)))
    mode = draw(st.sampled_from(MODES))
    B = draw(st.integers(1, 3))
    trailing = draw(st.sampled_from(TRAILING))
    dtype = draw(st.sampled_from(DTYPES))
    S = draw(st.sampled_from(divisors(groups(P, dims))))
    rank = draw(st.integers(0, S - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    note(f"{grid=} {P=} {dims=} {mode=} {B=} {trailing=} dtype={DTYPE_IDS[dtype]} {S=} {rank=} {seed=}")
    x = random_tensor((B, grid[0] * grid[1] * grid[2], *trailing), dtype, seed=seed, device=device)
    return Layout(grid, P, mode, dims, S, rank, x)


@given(data=st.data())
def test_rearrange_restore_match_reference(device, data):
    c = data.draw(layouts(device))
    kw = dict(dims=c.dims, ssp_rank=c.rank, ssp_size=c.S)
    local = ops.skiparse_rearrange(c.x, c.grid, c.P, c.mode, **kw)
    assert_bitwise(local, ref_rearrange(c.x, c.grid, c.P, c.mode, c.dims, c.rank, c.S), "rearrange")
    back = ops.skiparse_restore(local, c.grid, c.P, c.mode, **kw)
    assert_bitwise(back, ref_restore(local, c.grid, c.P, c.mode, c.dims, c.rank, c.S), "restore")
    full = ops.skiparse_rearrange(c.x, c.grid, c.P, c.mode, dims=c.dims)
    assert_bitwise(ops.skiparse_restore(full, c.grid, c.P, c.mode, dims=c.dims), c.x, "roundtrip")
    gl = c.G // c.S
    assert_bitwise(local, full[c.rank * gl * c.B : (c.rank + 1) * gl * c.B], "rank slice")


@given(data=st.data())
def test_switch_properties(device, data):
    c = data.draw(layouts(device))
    xs = ops.skiparse_rearrange(c.x, c.grid, c.P, c.mode, dims=c.dims)
    switched = ops.skiparse_switch(xs, c.grid, c.P, c.mode, dims=c.dims)
    assert_bitwise(switched, ref_switch(xs, c.grid, c.P, c.mode, c.dims), "switch vs reference")
    assert_bitwise(switched, ref_rearrange(c.x, c.grid, c.P, other(c.mode), c.dims), "switch == other mode")
    assert_bitwise(ops.skiparse_switch(switched, c.grid, c.P, other(c.mode), dims=c.dims), xs, "involution")


@given(data=st.data())
def test_exchange_equals_switch(device, data):
    c = data.draw(layouts(device))
    xs = ops.skiparse_rearrange(c.x, c.grid, c.P, c.mode, dims=c.dims)
    gl = c.G // c.S
    locals_ = [xs[r * gl * c.B : (r + 1) * gl * c.B] for r in range(c.S)]
    sends = [ops.skiparse_exchange_send(loc, c.grid, c.P, c.mode, dims=c.dims, ssp_rank=r, ssp_size=c.S)
             for r, loc in enumerate(locals_)]  # fmt: skip
    assert_bitwise(sends[c.rank], ref_exchange_send(locals_[c.rank], c.grid, c.P, c.mode, c.dims, c.rank, c.S), "send")
    recv = simulate_all_to_all(sends)[c.rank]
    got = ops.skiparse_exchange_receive(recv, c.grid, c.P, c.mode, dims=c.dims, ssp_rank=c.rank, ssp_size=c.S)
    want = ref_switch(xs, c.grid, c.P, c.mode, c.dims)
    assert_bitwise(got, want[c.rank * gl * c.B : (c.rank + 1) * gl * c.B], "exchange")


@given(grid=st.tuples(st.integers(1, 12), st.integers(1, 30), st.integers(1, 30)), P=st.integers(1, 5),
       dims=st.sampled_from((1, 2)), mode=st.sampled_from(MODES))  # fmt: skip
def test_seqlens_brute_force(grid, P, dims, mode):
    counts = ops.skiparse_seqlens(grid, P, mode, dims=dims).tolist()
    assert counts == brute_counts(grid, P, mode, dims)
    assert sum(counts) == grid[0] * grid[1] * grid[2]
