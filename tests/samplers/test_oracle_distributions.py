"""Exact oracles vs brute-force enumeration written here in numpy: laws, noisy posteriors (denoiser and
leave-one-out, masked and uniform), the spec §2 score identities, marginals and sampling frequencies."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from difforge.samplers.discrete.oracle.distributions import (
    HMM,
    Enumerated,
    Grid2D,
    MarkovChain,
    OracleModel,
    Potts,
    Product,
    oracle_by_name,
)

PROCESSES = ("masked", "uniform")


# ---- brute force ----------------------------------------------------------------------------------------
def all_states(vocab: int, length: int) -> np.ndarray:
    """Every sequence in big-endian state-index order (itertools varies the last position fastest)."""
    return np.array(list(itertools.product(range(vocab), repeat=length)), dtype=np.int64)


def noise_matrix(alpha: float, process: str, vocab: int) -> np.ndarray:
    """q(x_t = column | x0 = row): [N, N] uniform, [N, N + 1] masked (last column the mask)."""
    if process == "uniform":
        return alpha * np.eye(vocab) + (1 - alpha) / vocab
    return np.concatenate([alpha * np.eye(vocab), np.full((vocab, 1), 1 - alpha)], axis=1)


def brute_posteriors(probs: np.ndarray, vocab: int, length: int, x_t: np.ndarray, alpha: np.ndarray, process: str):
    """(p(x0_i = y | x_t), p(x0_i = y | x_t^{-i})) as probabilities [B, L, N], summing over every x0."""
    states = all_states(vocab, length)
    den = np.zeros((len(x_t), length, vocab))
    loo = np.zeros_like(den)
    for b in range(len(x_t)):
        lik = noise_matrix(alpha[b], process, vocab)[states, x_t[b]]  # q(x_t^j | x0^j) per state and position
        for i in range(length):
            others = np.prod(np.delete(lik, i, axis=1), axis=1)
            loo[b, i] = np.bincount(states[:, i], weights=probs * others, minlength=vocab)
            den[b, i] = np.bincount(states[:, i], weights=probs * others * lik[:, i], minlength=vocab)
    return den / den.sum(-1, keepdims=True), loo / loo.sum(-1, keepdims=True)


def noisy_batch(oracle, process: str, batch: int, seed: int, alphas=(0.01, 0.999)):
    """x_t drawn from the forward process at alpha uniform in ``alphas`` (reachable by construction)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = oracle.sample(batch, generator)
    rng = np.random.default_rng(seed)
    alpha = rng.uniform(*alphas, size=batch)
    keep = rng.random(x0.shape) < alpha[:, None]
    if process == "masked":
        noise = np.full(x0.shape, oracle.vocab_size)
    else:
        noise = rng.integers(0, oracle.vocab_size, x0.shape)
    return torch.from_numpy(np.where(keep, x0.numpy(), noise)), torch.from_numpy(alpha)


def simplex(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.dirichlet(np.full(shape[-1], 0.8), size=shape[:-1])


# ---- oracles with known parameters: the law itself, written out here --------------------------------------
def product_case(rng):
    pis = simplex(rng, 4, 3)
    states = all_states(3, 4)
    return Product(torch.from_numpy(pis)), np.prod(pis[np.arange(4), states], axis=1)


def markov_case(rng):
    init, trans = simplex(rng, 3), simplex(rng, 3, 3)
    states = all_states(3, 4)
    law = init[states[:, 0]] * np.prod(trans[states[:, :-1], states[:, 1:]], axis=1)
    return MarkovChain(torch.from_numpy(init), torch.from_numpy(trans), 4), law


def hmm_case(rng):
    init, trans, emit = simplex(rng, 2), simplex(rng, 2, 2), simplex(rng, 2, 3)
    law = np.zeros(3**3)
    for z in itertools.product(range(2), repeat=3):
        for s, x in enumerate(itertools.product(range(3), repeat=3)):
            law[s] += init[z[0]] * trans[z[0], z[1]] * trans[z[1], z[2]] * np.prod(emit[z, x])
    return HMM(torch.from_numpy(init), torch.from_numpy(trans), torch.from_numpy(emit), 3), law


def potts_case(rng):
    field, coupling = rng.normal(size=3), 1.3
    states = all_states(3, 4)  # 2 x 2 grid, row-major: edges 0-1, 2-3 (rows) and 0-2, 1-3 (columns)
    equal = sum((states[:, a] == states[:, b]).astype(float) for a, b in ((0, 1), (2, 3), (0, 2), (1, 3)))
    weight = np.exp(coupling * equal + field[states].sum(1))
    return Potts(side=2, q=3, coupling=coupling, field=torch.from_numpy(field)), weight / weight.sum()


def checkerboard_case(rng):
    board = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=float)
    return Grid2D.checkerboard(4, blocks=2), board.flatten() / board.sum()


def enumerated_case(rng):
    law = rng.dirichlet(np.ones(3**3))
    return Enumerated(torch.from_numpy(law), 3, 3), law


CASES = [product_case, markov_case, hmm_case, potts_case, checkerboard_case, enumerated_case]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_probs_and_log_prob_match_the_written_out_law(case):
    oracle, law = case(np.random.default_rng(7))
    np.testing.assert_allclose(oracle.probs().numpy(), law, rtol=1e-12, atol=1e-15)
    states = all_states(oracle.vocab_size, oracle.length)
    positive = law > 0
    log_prob = oracle.log_prob(torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(log_prob[positive], np.log(law[positive]), rtol=1e-12)
    assert np.all(log_prob[~positive] == -np.inf)


def random_small_oracles(seed: int):
    """Structured oracles with random parameters, and tabulated ones, all with at most 81 states."""
    g = torch.Generator().manual_seed(seed)
    return [
        Product.dirichlet(3, 4, 0.7, g),
        MarkovChain.dirichlet(3, 4, 0.5, g),
        MarkovChain.banded(4, 3, 2, 0.1, g),
        HMM.random(2, 3, 4, g),
        Potts(side=2, q=3, coupling=-0.7),
        Grid2D.checkerboard(6, blocks=3),
        Grid2D.gaussian_mixture(5, g, components=3),
        Grid2D.two_moons(6),
        Enumerated.random(3, 3, g),
    ]


@given(seed=st.integers(0, 2**16), process=st.sampled_from(PROCESSES))
def test_posteriors_match_brute_force_enumeration(seed, process):
    for oracle in random_small_oracles(seed):
        x_t, alpha = noisy_batch(oracle, process, 3, seed)
        den, loo = brute_posteriors(oracle.probs().numpy(), oracle.vocab_size, oracle.length, x_t.numpy(),
                                    alpha.numpy(), process)
        tabulated = Enumerated(oracle.probs(), oracle.vocab_size, oracle.length)
        for candidate in (oracle, tabulated):
            got_den, got_loo = candidate.denoiser(x_t, alpha, process), candidate.loo(x_t, alpha, process)
            assert got_den.dtype == got_loo.dtype == torch.float64
            assert got_den.shape == got_loo.shape == (3, oracle.length, oracle.vocab_size)
            np.testing.assert_allclose(got_den.exp().numpy(), den, atol=1e-12, err_msg=f"{oracle} {process} den")
            np.testing.assert_allclose(got_loo.exp().numpy(), loo, atol=1e-12, err_msg=f"{oracle} {process} loo")


# ---- spec §2 identities on a random joint, N = 4, L = 3 ----------------------------------------------------
def noisy_law(law: np.ndarray, vocab: int, alpha: float, process: str) -> np.ndarray:
    """p_t over all noisy sequences, as an array [V_t, V_t, V_t] (V_t = N, or N + 1 masked)."""
    q = noise_matrix(alpha, process, vocab)
    return np.einsum("abc,ax,by,cz->xyz", law.reshape(vocab, vocab, vocab), q, q, q)


@given(seed=st.integers(0, 2**16), alpha=st.floats(0.02, 0.98), process=st.sampled_from(PROCESSES))
def test_score_is_the_concrete_score_and_gives_the_gibbs_conditional(seed, alpha, process):
    vocab, length = 4, 3
    noisy_vocab = vocab + 1 if process == "masked" else vocab
    law = np.random.default_rng(seed).dirichlet(np.ones(vocab**length))
    states = all_states(noisy_vocab, length)
    model = OracleModel(Enumerated(torch.from_numpy(law), vocab, length), process, output="score", dtype=torch.float64)
    # alpha arrives in float32 from samplers; p_t is built with the same rounded value
    alpha32 = torch.full((len(states),), alpha, dtype=torch.float32)
    p_t = noisy_law(law, vocab, float(alpha32[0]), process).flatten()
    score = model(torch.from_numpy(states), alpha32).exp().numpy()
    assert model.calls == 1
    # p_t(x^{i <- y}) for every state x, position i and noisy token y
    place = noisy_vocab ** np.arange(length - 1, -1, -1)
    changed = np.arange(len(states))[:, None, None] + (np.arange(noisy_vocab) - states[:, :, None]) * place[:, None]
    p_changed = p_t[changed]  # [states, L, noisy_vocab]
    np.testing.assert_allclose(score, p_changed[..., :vocab] / p_t[:, None, None], rtol=1e-9)  # the definition
    conditional = p_changed / p_changed.sum(-1, keepdims=True)
    masked_here = states == vocab
    total = score.sum(-1) + masked_here  # masked: the implicit s_m = 1 joins the sum
    gibbs = masked_here | (process == "uniform")  # where the N columns hold the whole conditional
    expected = np.broadcast_to(conditional[..., :vocab], score.shape)[gibbs]
    np.testing.assert_allclose((score / total[..., None])[gibbs], expected, rtol=1e-9)


@given(seed=st.integers(0, 2**16), alpha=st.floats(0.02, 0.98))
def test_loo_is_the_denoiser_with_the_own_token_logit_shifted(seed, alpha):
    vocab, length = 4, 3
    g = torch.Generator().manual_seed(seed)
    oracle = Enumerated.random(vocab, length, g)
    x_t = torch.randint(vocab, (5, length), generator=g)
    den = OracleModel(oracle, "uniform", "denoiser", dtype=torch.float64)(x_t, alpha)
    loo = OracleModel(oracle, "uniform", "loo", dtype=torch.float64)(x_t, alpha)
    own = torch.nn.functional.one_hot(x_t, vocab).double()
    offset = den - math.log1p(vocab * alpha / (1 - alpha)) * own - loo
    torch.testing.assert_close(offset, offset[..., :1].expand_as(offset), rtol=0, atol=1e-10)


def test_oracle_model_outputs_dtype_and_counts_calls():
    oracle = Enumerated.random(3, 2, torch.Generator().manual_seed(0))
    x_t = torch.tensor([[0, 3], [1, 2]])
    model = OracleModel(oracle, "masked")
    out = model(x_t, torch.tensor([0.3, 0.6]))
    model(x_t, 0.5)
    assert model.calls == 2 and out.dtype == torch.float32
    torch.testing.assert_close(out, oracle.denoiser(x_t, torch.tensor([0.3, 0.6]), "masked").float())
    with pytest.raises(ValueError, match="output"):
        OracleModel(oracle, "masked", output="logits")


# ---- marginals, sampling, long chains ---------------------------------------------------------------------
@pytest.mark.parametrize("index", range(9))
def test_marginals_and_pair_marginals_match_the_law(index):
    oracle = random_small_oracles(3)[index]
    law, vocab, length = oracle.probs().numpy(), oracle.vocab_size, oracle.length
    states = all_states(vocab, length)
    for i in range(length):
        expected = np.bincount(states[:, i], weights=law, minlength=vocab)
        np.testing.assert_allclose(oracle.marginals()[i].numpy(), expected, atol=1e-13)
    for i in range(length - 1):
        pair = np.bincount(states[:, i] * vocab + states[:, i + 1], weights=law, minlength=vocab**2)
        np.testing.assert_allclose(oracle.pair_marginals()[i].numpy(), pair.reshape(vocab, vocab), atol=1e-13)


@pytest.mark.parametrize("index", range(9))
def test_sample_frequencies_follow_the_law(index):
    oracle = random_small_oracles(11)[index]
    samples = oracle.sample(20_000, torch.Generator().manual_seed(index))
    assert samples.dtype == torch.long and samples.shape == (20_000, oracle.length)
    index_of = (samples.numpy() * oracle.vocab_size ** np.arange(oracle.length - 1, -1, -1)).sum(1)
    counts = np.bincount(index_of, minlength=oracle.num_states)
    law = oracle.probs().numpy()
    assert counts[law == 0].sum() == 0
    # states expected fewer than 5 times are pooled into one bin so the chi-square approximation holds
    expected = law * len(samples)
    rare = (expected < 5) & (law > 0)
    observed, predicted = counts[~rare & (law > 0)], expected[~rare & (law > 0)]
    if rare.any():
        observed, predicted = np.append(observed, counts[rare].sum()), np.append(predicted, expected[rare].sum())
    assert stats.chisquare(observed, predicted * observed.sum() / predicted.sum()).pvalue > 1e-4


def scaled_forward_backward(init: np.ndarray, trans: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(denoiser, leave-one-out) probabilities [L, N] of one chain given evidence phi [L, N], by forward-backward
    with messages renormalized at every step (probability space)."""
    length = len(phi)
    forward, backward = np.zeros_like(phi), np.ones_like(phi)
    forward[0] = init
    for j in range(1, length):
        message = (forward[j - 1] * phi[j - 1]) @ trans
        forward[j] = message / message.sum()
    for j in range(length - 2, -1, -1):
        message = trans @ (phi[j + 1] * backward[j + 1])
        backward[j] = message / message.sum()
    loo, den = forward * backward, forward * backward * phi
    return den / den.sum(-1, keepdims=True), loo / loo.sum(-1, keepdims=True)


@pytest.mark.parametrize("process", PROCESSES)
def test_long_chain_posteriors_stay_finite_and_exact(process):
    # Identical transition rows make the chain a product of its rows' law, whose posteriors are written out here;
    # at L = 256 unscaled forward-backward messages would underflow (16^-256 < 1e-308).
    vocab, length, rng = 16, 256, np.random.default_rng(5)
    pi = rng.dirichlet(np.full(vocab, 0.3))
    chain = MarkovChain(torch.from_numpy(pi), torch.from_numpy(np.tile(pi, (vocab, 1))), length)
    x_t, alpha = noisy_batch(chain, process, 4, seed=1, alphas=(0.99, 0.99))
    phi = noise_matrix(0.99, process, vocab)[:, x_t.numpy()].transpose(1, 2, 0)  # q(x_t^j | x0^j = z): [B, L, N]
    for got, expected in ((chain.denoiser(x_t, alpha, process), pi * phi), (chain.loo(x_t, alpha, process), pi)):
        expected = np.broadcast_to(expected, got.shape)
        np.testing.assert_allclose(got.exp().numpy(), expected / expected.sum(-1, keepdims=True), atol=1e-12)
    # A random chain at L = 128 against a per-step-normalized reference.
    init, trans = rng.dirichlet(np.full(vocab, 0.5)), rng.dirichlet(np.full(vocab, 0.2), size=vocab)
    chain = MarkovChain(torch.from_numpy(init), torch.from_numpy(trans), 128)
    x_t, alpha = noisy_batch(chain, process, 4, seed=2)
    den, loo = chain.denoiser(x_t, alpha, process), chain.loo(x_t, alpha, process)
    assert not den.isnan().any() and torch.isfinite(loo).all()
    for b in range(4):
        phi = noise_matrix(float(alpha[b]), process, vocab)[:, x_t[b].numpy()].T
        expected_den, expected_loo = scaled_forward_backward(init, trans, phi)
        np.testing.assert_allclose(den[b].exp().numpy(), expected_den, atol=1e-12)
        np.testing.assert_allclose(loo[b].exp().numpy(), expected_loo, atol=1e-12)


# ---- the named instances and input checks -----------------------------------------------------------------
def test_the_default_3x3_potts_model_weighs_aligned_neighbours():
    potts = Potts(coupling=0.8)
    assert potts.num_states == 3**9 == 19_683
    x = torch.tensor([[0] * 9, [0, 1, 2, 1, 2, 0, 2, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1]])
    # all equal: 12 aligned edges; the Latin square: 0; one corner changed: 10
    log_prob = potts.log_prob(x)
    torch.testing.assert_close(log_prob[0] - log_prob[1], torch.tensor(12 * 0.8, dtype=torch.float64))
    torch.testing.assert_close(log_prob[0] - log_prob[2], torch.tensor(2 * 0.8, dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "kw", "kind", "states"),
    [
        ("product", {}, Product, 4**6),
        ("markov", {}, MarkovChain, 4**6),
        ("markov_banded", {}, MarkovChain, 4**6),
        ("hmm", {}, HMM, 4**6),
        ("grid", {}, Grid2D, 32**2),
        ("grid", {"density": "two_moons", "S": 16}, Grid2D, 16**2),
        ("grid", {"density": "gaussian_mixture"}, Grid2D, 32**2),
        ("potts", {"coupling": 0.5}, Potts, 3**9),
    ],
)
def test_oracle_by_name(name, kw, kind, states):
    oracle = oracle_by_name(name, **kw)
    assert isinstance(oracle, kind) and oracle.num_states == states
    assert oracle_by_name(name, **kw).probs().equal(oracle.probs())  # same seed, same law
    assert abs(float(oracle.probs().sum()) - 1.0) < 1e-12


def test_bad_input_is_rejected_with_a_clear_error():
    oracle = MarkovChain.dirichlet(3, 4, 1.0, torch.Generator().manual_seed(0))
    x_t = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="process"):
        oracle.denoiser(x_t, 0.5, "absorbing")
    with pytest.raises(ValueError, match="tokens in"):
        oracle.denoiser(x_t + 3, 0.5, "uniform")  # the mask id only exists in the masked process
    with pytest.raises(ValueError, match="alpha"):
        oracle.loo(x_t, torch.ones(3), "masked")
    with pytest.raises(ValueError, match="alpha"):
        oracle.loo(x_t, 1.5, "masked")
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        oracle.log_prob(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="states"):
        MarkovChain.dirichlet(2, 21, 1.0).probs()
    with pytest.raises(ValueError, match="N\\^L"):
        Enumerated(torch.ones(2**21), 2, 21)
    with pytest.raises(ValueError, match="unknown oracle"):
        oracle_by_name("ising")
