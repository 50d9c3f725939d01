"""Sample metrics vs tiny cases worked out by hand, and state indexing vs its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difforge.samplers.discrete.metrics import (
    duplicate_rate,
    empirical_law,
    index_states,
    kl_divergence,
    marginal_tv,
    nll_per_token,
    pairwise_tv,
    state_index,
    token_entropy,
    total_variation,
    unique_ngram_ratio,
)
from difforge.samplers.discrete.oracle.distributions import Product

# Two independent positions: x_0 ~ (1/2, 1/2), x_1 ~ (1/4, 3/4).
PIS = [[0.5, 0.5], [0.25, 0.75]]
SAMPLES = torch.tensor([[0, 1], [0, 0], [1, 1], [0, 1]])


def test_state_index_is_big_endian():
    assert state_index(torch.tensor([[1, 0, 2], [0, 0, 0], [2, 2, 2]]), 3).tolist() == [9 + 2, 0, 26]
    assert state_index(torch.tensor([3, 1]), 4).item() == 13  # any leading shape


@given(alphabet=st.integers(1, 5), length=st.integers(1, 5))
def test_index_states_inverts_state_index(alphabet, length):
    states = index_states(alphabet**length, length, alphabet)
    assert states.shape == (alphabet**length, length) and states.dtype == torch.long
    assert state_index(states, alphabet).equal(torch.arange(alphabet**length))
    digits = [[(s // alphabet ** (length - 1 - i)) % alphabet for i in range(length)] for s in range(alphabet**length)]
    assert states.tolist() == digits


def test_empirical_law_counts_whole_sequences():
    law = empirical_law(torch.tensor([[0, 1], [0, 1], [1, 1]]), 2)
    assert law.dtype == torch.float64
    torch.testing.assert_close(law, torch.tensor([0, 2 / 3, 0, 1 / 3], dtype=torch.float64))


def test_total_variation_and_kl_divergence():
    assert total_variation([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    assert total_variation(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.2, 0.3, 0.5])) == 0.0
    assert kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence([0.0, 1.0], [0.5, 0.5]) == pytest.approx(math.log(2))  # p = 0 terms contribute nothing
    floored = 0.5 * math.log(0.5 / 1.0) + 0.5 * math.log(0.5 / 1e-6)
    assert kl_divergence([0.5, 0.5], [1.0, 0.0], floor=1e-6) == pytest.approx(floored)
    with pytest.raises(ValueError, match="same shape"):
        total_variation([1.0], [0.5, 0.5])


def test_marginal_and_pairwise_tv_against_hand_counts():
    oracle = Product(torch.tensor(PIS))
    # position 0: empirical (3/4, 1/4) vs (1/2, 1/2) -> 1/4; position 1: (1/4, 3/4) exactly -> 0
    assert marginal_tv(SAMPLES, oracle) == pytest.approx(0.125)
    # pairs 01, 00, 11, 01: empirical [[1/4, 1/2], [0, 1/4]] vs exact [[1/8, 3/8], [1/8, 3/8]]
    assert pairwise_tv(SAMPLES, oracle) == pytest.approx(0.25)


def test_nll_per_token_against_hand_log_probs():
    oracle = Product(torch.tensor(PIS))
    log_p = [math.log(0.5 * 0.75), math.log(0.5 * 0.25), math.log(0.5 * 0.75), math.log(0.5 * 0.75)]
    assert nll_per_token(SAMPLES, oracle) == pytest.approx(-sum(log_p) / 4 / 2)


def test_token_entropy_of_each_sample_histogram():
    samples = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 2, 3]])  # ln 2, 0, ln 4
    assert token_entropy(samples) == pytest.approx((math.log(2) + math.log(4)) / 3)


@given(seed=st.integers(0, 2**16), num=st.integers(1, 6), length=st.integers(1, 12), vocab=st.integers(1, 6))
def test_token_entropy_matches_numpy(seed, num, length, vocab):
    samples = np.random.default_rng(seed).integers(0, vocab, (num, length))
    expected = []
    for row in samples:
        _, counts = np.unique(row, return_counts=True)
        expected.append(-(counts / length * np.log(counts / length)).sum())
    assert token_entropy(torch.from_numpy(samples)) == pytest.approx(np.mean(expected), abs=1e-12)


def test_unique_ngram_ratio_counts_within_samples():
    samples = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    assert unique_ngram_ratio(samples, 2) == pytest.approx(2 / 6)  # only 01 and 10 among 6 bigrams
    assert unique_ngram_ratio(samples, 1) == pytest.approx(2 / 8)
    assert unique_ngram_ratio(samples, 4) == pytest.approx(1.0)
    assert unique_ngram_ratio(torch.tensor([[0, 1], [1, 0]]), 2) == pytest.approx(1.0)  # no bigram spans rows
    with pytest.raises(ValueError, match="n must be"):
        unique_ngram_ratio(samples, 5)


def test_duplicate_rate():
    assert duplicate_rate(torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])) == pytest.approx(0.5)
    assert duplicate_rate(torch.tensor([[0, 1], [1, 0]])) == 0.0


def test_bad_input_is_rejected():
    oracle = Product(torch.tensor(PIS))
    with pytest.raises(ValueError, match="int64"):
        empirical_law(SAMPLES.float(), 2)
    with pytest.raises(ValueError, match="tokens in"):
        marginal_tv(SAMPLES + 1, oracle)
    with pytest.raises(ValueError, match="length"):
        nll_per_token(SAMPLES[:, :1], oracle)
    with pytest.raises(ValueError, match="length >= 2"):
        pairwise_tv(SAMPLES[:, :1], Product(torch.tensor(PIS[:1])))
    with pytest.raises(ValueError, match="at least one"):
        duplicate_rate(SAMPLES[:0])
    with pytest.raises(ValueError, match="exceeds"):
        empirical_law(torch.zeros(1, 21, dtype=torch.long), 2)
