"""discrete_step and tweedie_step against the plain-PyTorch references of sampling_testlib (the same Philox words,
fp64 noise and math): tokens bit-equal for every rule, greedy, temperature, top-k / top-p, excluded and out-of-range
points, unread rows, fp16 / bf16 logits and strided leading dims; statistics to 1e-5; laws by chi-square (with a
rare token); the Gumbel tails through races designed to flip on the noise of one column."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from sampling_testlib import (
    FLOAT_DTYPES,
    GUMBEL_STREAM,
    RULES,
    gumbel64,
    philox4x32_10,
    ref_discrete_step,
    ref_step_law,
    ref_tweedie_law,
    ref_tweedie_step,
    top_p_ambiguous_rows,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

FILTERS = {"none": (0, 1.0), "top_k": (5, 1.0), "top_p": (0, 0.7), "both": (9, 0.85)}


def make_case(rows: int, vocab: int, rule: str, seed: int, dtype=torch.float32, gain: float = 2.0):
    """Logits without near-ties, points in [0, V] (V: a mask id outside the vocabulary) and coefficients that give
    every component a fair share: mixture rows with w_p = 0 every 4th row (never read), jump-rule rate factors
    spread over four decades around 1 / S'."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * gain).to(dtype)
    point = torch.randint(0, vocab + 1, (rows,), generator=gen)
    coef = torch.rand(rows, 3, generator=gen)
    if rule == "mixture":
        coef[::4, 0] = 0
    else:
        coef[:, 0] = 10 ** (4 * torch.rand(rows, generator=gen) - 3) / (vocab * math.exp(gain**2 / 2))
    return logits, point, coef


def assert_step_matches(logits, point, coef, skip_ambiguous=False, **kw):
    """Tokens equal the reference's (with skip_ambiguous, except on rows whose nucleus boundary sits within
    rounding of a cumulative mass: random inputs can hit those; the fixed cases here do not)."""
    token, stats = ops.discrete_step(logits, point, coef, check=False, **kw)
    ref_token, ref_stats = ref_discrete_step(logits, point, coef, **kw)
    if skip_ambiguous:
        ambiguous = top_p_ambiguous_rows(logits, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("temperature", 1.0))
        token, ref_token = token[~ambiguous], ref_token[~ambiguous]
        stats, ref_stats = stats[~ambiguous], ref_stats[~ambiguous]
    bad = (token != ref_token).nonzero()
    assert bad.numel() == 0, f"{len(bad)} token(s) differ from the reference, first at {bad[0].tolist()} ({kw})"
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{kw}: {m}")
    return token, stats


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("greedy,temperature", [(False, 1.0), (False, 0.6), (True, 1.0)])
def test_matches_reference(rule, filt, greedy, temperature):
    top_k, top_p = FILTERS[filt]
    logits, point, coef = make_case(48, 37, rule, seed=len(rule) * 7 + top_k)
    assert_step_matches(logits, point, coef, rule=rule, greedy=greedy, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=1234, offset=5)  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_matches_reference_several_chunks(rule):
    """V = 300: several 64-column chunks and a tail, filters on."""
    logits, point, coef = make_case(16, 300, rule, seed=3)
    for top_k, top_p in ((0, 1.0), (20, 0.9)):
        assert_step_matches(logits, point, coef, rule=rule, top_k=top_k, top_p=top_p, seed=2**40 + 3, offset=2**31)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rule", ["mixture", "ctmc"])
def test_half_precision_logits(dtype, rule):
    """fp16 / bf16 logits are read exactly (converted to fp32 on load), so the reference on their values matches."""
    logits, point, coef = make_case(40, 70, rule, seed=4, dtype=dtype)
    assert_step_matches(logits, point, coef, rule=rule, top_k=11, seed=9)


def test_strided_leading_dims():
    """Leading dims read in place (row slices, a wider last-dim buffer, expanded rows) or copied (a transpose)."""
    B, L, V = 3, 5, 21
    logits, _, coef = make_case(B * L * 2, V + 3, "mixture", seed=5)
    wide = logits.reshape(B, 2 * L, V + 3)
    point = torch.randint(0, V + 1, (B, L), generator=torch.Generator().manual_seed(0))
    coef = coef[: B * L].reshape(B, L, 3)
    cases = {
        "row slice": wide[:, ::2, :V],  # row stride 2 (V + 3): collapsible
        "transpose": wide[:, :L, :V].transpose(0, 1).contiguous().transpose(0, 1),  # not collapsible: copied
        "expanded": wide[:1, :1, :V].expand(B, L, V),  # row stride 0
    }
    for name, x in cases.items():
        assert not x.is_contiguous(), name
        assert_step_matches(x, point, coef, rule="mixture", seed=77)


def test_broadcast_coef_and_scalar_point():
    logits, _, _ = make_case(2 * 6, 10, "mixture", seed=6)
    logits = logits.reshape(2, 6, 10)
    coef = torch.tensor([[[0.5, 0.3, 0.2]], [[0.0, 0.6, 0.4]]])  # [2, 1, 3]
    token, _ = assert_step_matches(logits, torch.full((2, 6), 10), coef.expand(2, 6, 3), seed=8)
    token_b, _ = ops.discrete_step(logits, 10, coef, seed=8)
    assert torch.equal(token, token_b)


def test_unread_rows_never_touch_logits():
    """Mixture rows with w_p = 0 draw from the uniform / point parts without reading their (NaN) logits."""
    logits, point, coef = make_case(32, 16, "mixture", seed=7)
    coef[::2, 0], coef[1::2, 0] = 0.5, 0.0
    logits[1::2] = math.nan
    token, stats = ops.discrete_step(logits, point, coef, seed=5)  # check=True: no row is bad
    ref_token, _ = ref_discrete_step(logits, point, coef, seed=5)
    assert torch.equal(token, ref_token)
    assert stats[1::2].isnan().all() and not stats[::2, 1:].isnan().any()


def test_jump_rules_never_stay_by_the_softmax_part():
    """A sure jump (W = 1) never lands on the excluded point; with top_k = 1 on the point itself nothing is
    allowed and the row falls back to the point."""
    logits = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    point = torch.arange(64) % 12
    coef = torch.tensor([1e6, 0.0, 0.0])
    token, _ = ops.discrete_step(logits, point, coef, rule="euler", seed=3)
    assert (token != point).all()
    logits[torch.arange(64), point] = 10.0  # the point is every row's argmax
    token, _ = ops.discrete_step(logits, point, coef, rule="euler", top_k=1, seed=3)
    assert torch.equal(token, point)


def test_greedy_ties_take_the_lowest_index():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [-math.inf, 1.0, 1.0, -math.inf]])
    token, stats = ops.discrete_step(logits, 4, torch.tensor([1.0, 0.0, 0.0]), greedy=True)
    assert token.tolist() == [1, 0, 1]
    assert stats[:, 3].tolist() == stats[:, 4].tolist() == [3.0, 2.0, 1.0]  # top-2 counts ties


def test_stats_keep_relative_precision():
    """Entropy from sum e (l - max): no cancellation for large logits or peaked rows (fp64 reference)."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(8, 500, generator=gen)
    cases = [base + 1000.0, base * 30.0, base - 500.0]
    for logits in cases:
        _, stats = ops.discrete_step(logits, 500, torch.tensor([1.0, 0.0, 0.0]), greedy=True)
        lp = torch.log_softmax(logits.double(), -1)
        entropy = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(stats[:, 2].double(), entropy, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats[:, 1].double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=0)


def test_reproducible_and_offset_sensitive():
    logits, point, coef = make_case(256, 50, "mixture", seed=8)
    coef[:, 0] = 1
    a, _ = ops.discrete_step(logits, point, coef, seed=1, offset=0)
    b, _ = ops.discrete_step(logits, point, coef, seed=1, offset=0)
    c, _ = ops.discrete_step(logits, point, coef, seed=1, offset=1)
    d, _ = ops.discrete_step(logits, point, coef, seed=2, offset=0)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.3 and (a != d).float().mean() > 0.3


@given(
    rows=st.integers(1, 12),
    vocab=st.integers(2, 140),
    rule=st.sampled_from(RULES),
    greedy=st.booleans(),
    top_k=st.integers(0, 150),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    seed=st.integers(0, 2**63 - 1),
    offset=st.integers(0, 2**32 - 1),
)
def test_matches_reference_hypothesis(rows, vocab, rule, greedy, top_k, top_p, temperature, seed, offset):
    logits, point, coef = make_case(rows, vocab, rule, seed=seed % 1000)
    assert_step_matches(logits, point, coef, skip_ambiguous=True, rule=rule, greedy=greedy, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, offset=offset)  # fmt: skip


# ---- laws: chi-square of token frequencies against the exact mixture law ----

DRAWS = 200_000
# p(last) ~ 8e-5 under the plain softmax: the rare token of the Gumbel precision check.
LAW_ROW = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.5])

LAW_CASES = {
    "mixture_mask": dict(rule="mixture", point=12, coef=(0.6, 0.25, 0.15)),
    "mixture_filtered": dict(rule="mixture", point=12, coef=(0.8, 0.1, 0.1), temperature=0.8, top_k=8, top_p=0.8),
    "euler": dict(rule="euler", point=2, coef=(0.03, 0.0, 0.0)),
    "tau_leap": dict(rule="tau_leap", point=0, coef=(0.08, 0.0, 0.0)),
    "ctmc": dict(rule="ctmc", point=5, coef=(0.03, 0.0, 0.0), top_p=0.9),
    "softmax_only": dict(rule="mixture", point=12, coef=(1.0, 0.0, 0.0)),
}


def assert_law(counts: np.ndarray, law: np.ndarray, name: str):
    impossible = law == 0
    assert counts[impossible].sum() == 0, f"{name}: tokens drawn with probability 0: {np.nonzero(counts * impossible)}"
    expected = law[~impossible] * counts.sum()
    p = sps.chisquare(counts[~impossible], expected).pvalue
    assert p > 1e-3, f"{name}: chi-square p = {p:.2e}\ncounts   {counts.tolist()}\nexpected {np.round(expected, 1)}"


@pytest.mark.parametrize("name", list(LAW_CASES))
def test_token_law_chi_square(name):
    case = dict(LAW_CASES[name])
    rule, point, coef = case.pop("rule"), case.pop("point"), case.pop("coef")
    V = LAW_ROW.numel()
    logits = LAW_ROW.expand(DRAWS, V)  # one row, read DRAWS times (row stride 0): independent draws
    token, _ = ops.discrete_step(logits, point, torch.tensor(coef), rule=rule, seed=2024, **case)
    counts = np.bincount(token.numpy(), minlength=V + 1)[: V + 1]
    law = ref_step_law(LAW_ROW, point, coef, rule=rule, **case)
    assert_law(counts, law, name)
    if name == "softmax_only":  # the rare token alone, within 4 sigma of its binomial count
        mean = law[V - 1] * DRAWS
        assert abs(counts[V - 1] - mean) < 4 * math.sqrt(mean), (counts[V - 1], mean)


def test_gumbel_tails_by_designed_races():
    """Rows whose word at column c is among the 16 smallest (G ~ 13-15) or largest (G ~ -2.6) of 2^20 words get
    logits that tie every other column's key with column c's reference fp64 key up to a margin of +-1e-4: the
    kernel's token flips exactly where its noise is within 1e-4 of the fp64 value (a truncated or fp32-naive
    Gumbel misses the upper tail by > 1e-2)."""
    seed, rows, V = 31337, 2**18, 4
    words = np.stack(philox4x32_10((np.zeros(rows, np.uint64), np.arange(rows, dtype=np.uint64), GUMBEL_STREAM, 0),
                                   (seed & 0xFFFFFFFF, seed >> 32)), -1)  # fmt: skip
    noise = gumbel64(words)
    flat = np.argsort(words.reshape(-1))
    picks = np.concatenate([flat[:16], flat[-16:]])
    assert noise.reshape(-1)[picks[0]] > 12.5 and noise.reshape(-1)[picks[-1]] < -2.5
    for margin in (1e-4, -1e-4):
        logits = torch.zeros(rows, V)
        for flat_idx in picks:
            r, c = divmod(int(flat_idx), V)
            designed = noise[r, c] - noise[r] - margin  # key_y = G_c - margin for y != c
            designed[c] = 0.0
            logits[r] = torch.from_numpy(designed).float()
        token, _ = ops.discrete_step(logits, V, torch.tensor([1.0, 0.0, 0.0]), seed=seed)
        for flat_idx in picks:
            r, c = divmod(int(flat_idx), V)
            keys = logits[r].double().numpy() + noise[r]  # with the fp32-rounded logits
            assert abs(keys[c] - np.delete(keys, c).max()) > 0.5e-4
            want_c = keys[c] > np.delete(keys, c).max()
            assert (int(token[r]) == c) == want_c, (r, c, noise[r, c], margin)


def test_reference_gumbel_extremes():
    """The spec's range of the noise: G(w = 0) ~ 22.87 and G(w = 2^32 - 1) ~ -3.13 (the reference formula)."""
    g = gumbel64(np.array([0, 2**32 - 1], dtype=np.uint64))
    assert abs(g[0] - 22.8739) < 1e-3 and abs(g[1] + 3.1300) < 1e-3


# ---- tweedie_step ----


def make_tweedie_case(rows, vocab, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    log_score = (torch.randn(rows, vocab, generator=gen) * 1.5).to(dtype)
    current = torch.randint(0, vocab, (rows,), generator=gen)
    e = torch.rand(rows, generator=gen) * 0.98 + 0.01
    e[::5] = 1.0  # no time passes: the row stays
    return log_score, current, e


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab", [7, 300])
def test_tweedie_matches_reference(dtype, vocab):
    log_score, current, e = make_tweedie_case(64, vocab, seed=vocab, dtype=dtype)
    token = ops.tweedie_step(log_score, current, e, seed=99, offset=4)
    ref = ref_tweedie_step(log_score, current, e, seed=99, offset=4)
    assert torch.equal(token, ref), (token != ref).nonzero()[:5]
    assert torch.equal(token[::5], current[::5])


def test_tweedie_scalar_e_and_leading_dims():
    log_score, current, _ = make_tweedie_case(12, 9, seed=1)
    log_score, current = log_score.reshape(3, 4, 9), current.reshape(3, 4)
    token = ops.tweedie_step(log_score, current, 0.3, seed=5)
    assert torch.equal(token, ref_tweedie_step(log_score, current, 0.3, seed=5))


def test_tweedie_law_chi_square():
    """Including negative masses (a very low score), which must never be drawn."""
    row = torch.tensor([1.0, 0.2, -0.3, 0.8, -6.0, 0.0, 1.4, -1.0])
    current, e = 3, 0.55
    token = ops.tweedie_step(row.expand(DRAWS, 8), torch.full((DRAWS,), current), e, seed=7)
    law = ref_tweedie_law(row, current, e)
    assert (law == 0).any()
    assert_law(np.bincount(token.numpy(), minlength=8), law, "tweedie")
