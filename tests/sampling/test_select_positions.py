"""select_positions against per-row references written here and in sampling_testlib (torch.topk for distinct keys; a
stable sort with NaN lowest for ties; the same Philox words for the Gumbel-top-k noise): ties to the lower index,
k beyond the eligible count, k = 0, NaN keys, thresholds, and the Gumbel-top-k law by chi-square."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from sampling_testlib import ref_select_positions

difforge = pytest.importorskip("difforge")
ops = difforge.ops


def assert_selects(key, eligible, k, **kw):
    got = ops.select_positions(key, eligible, k, **kw)
    ref = ref_select_positions(key, eligible, k, **kw)
    bad = (got != ref).nonzero()
    assert bad.numel() == 0, f"{len(bad)} position(s) differ, first at {bad[0].tolist()} ({kw})"
    return got


def test_distinct_keys_match_torch_topk():
    gen = torch.Generator().manual_seed(0)
    B, L = 6, 900
    key = torch.randn(B, L, generator=gen)
    eligible = torch.rand(B, L, generator=gen) < 0.6
    k = torch.tensor([0, 1, 7, 100, 540, 900])
    got = ops.select_positions(key, eligible, k)
    for b in range(B):
        n = min(int(k[b]), int(eligible[b].sum()))
        masked = torch.where(eligible[b], key[b], torch.tensor(-math.inf))
        want = torch.zeros(L, dtype=torch.bool)
        want[torch.topk(masked, n).indices] = True
        assert torch.equal(got[b], want), b


def test_ties_go_to_the_lower_index():
    key = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    eligible = torch.tensor([[True, True, False, True, True, True], [False, True, True, True, True, True]])
    got = assert_selects(key, eligible, torch.tensor([2, 3]))
    assert got.tolist() == [[False, True, False, False, True, False], [False, True, True, True, False, False]]


def test_k_beyond_eligible_zero_and_negative():
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(3, 40, generator=gen)
    eligible = torch.rand(3, 40, generator=gen) < 0.3
    got = assert_selects(key, eligible, torch.tensor([1000, 0, -5]))
    assert torch.equal(got[0], eligible[0]) and not got[1:].any()
    assert not ops.select_positions(key, eligible, 0).any()


def test_nan_and_infinite_keys_rank_lowest():
    key = torch.tensor([[math.nan, -math.inf, 1.0, math.nan, math.inf, -2.0]])
    eligible = torch.ones(1, 6, dtype=torch.bool)
    for k in range(7):
        got = assert_selects(key, eligible, k)
        order = [4, 2, 5, 1, 0, 3]  # +inf, 1, -2, -inf, then the NaNs by index
        assert got[0, order[:k]].all() and got.sum() == k


def test_threshold_union():
    gen = torch.Generator().manual_seed(2)
    key = torch.rand(4, 30, generator=gen)
    eligible = torch.rand(4, 30, generator=gen) < 0.7
    assert_selects(key, eligible, 1, threshold=0.8)  # Fast-dLLM: top-1 plus every confident position
    thr = torch.tensor([0.5, math.nan, 2.0, -1.0])
    got = assert_selects(key, eligible, torch.tensor([0, 2, 1, 0]), threshold=thr)
    assert torch.equal(got[3], eligible[3]) and got[1].sum() == 2


@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_gumbel_top_k_matches_reference(tau):
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(8, 333, generator=gen) * 2
    eligible = torch.rand(8, 333, generator=gen) < 0.8
    k = torch.randint(0, 200, (8,), generator=gen)
    assert_selects(key, eligible, k, gumbel_tau=tau, seed=2**62 + 5, offset=77)
    assert_selects(key, eligible, k, gumbel_tau=tau, threshold=1.5, seed=5, offset=2**32 - 1)


def test_gumbel_top_one_law():
    """k = 1 with noise: the selected position is a draw from softmax(key / tau) over the eligible ones."""
    rows, tau = 100_000, 0.7
    key = torch.tensor([0.5, -1.0, 0.0, 2.0, -3.0, 1.0])
    eligible = torch.tensor([True, True, False, True, True, True])
    got = ops.select_positions(key.expand(rows, 6), eligible.expand(rows, 6), 1, gumbel_tau=tau, seed=11)
    assert torch.equal(got.sum(1), torch.ones(rows, dtype=torch.long))
    counts = got.sum(0).numpy()
    law = torch.softmax(torch.where(eligible, key / tau, -math.inf).double(), 0).numpy()
    assert counts[2] == 0
    p = sps.chisquare(counts[law > 0], law[law > 0] * rows).pvalue
    assert p > 1e-3, (counts, np.round(law * rows))


@given(
    batch=st.integers(1, 5),
    length=st.integers(1, 150),
    distinct=st.booleans(),
    k=st.integers(-1, 160),
    threshold=st.sampled_from([None, 0.0, 2.0]),
    tau=st.sampled_from([0.0, 0.0, 0.5, 2.0]),
    seed=st.integers(0, 10_000),
)
def test_matches_reference_hypothesis(batch, length, distinct, k, threshold, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        key = torch.randn(batch, length, generator=gen)
    else:  # a few values: many ties
        key = torch.randint(-2, 3, (batch, length), generator=gen).float()
    key[torch.rand(batch, length, generator=gen) < 0.05] = math.nan
    eligible = torch.rand(batch, length, generator=gen) < 0.7
    ks = torch.randint(-1, k + 2, (batch,), generator=gen)
    assert_selects(key, eligible, ks, threshold=threshold, gumbel_tau=tau, seed=seed)
