"""The samplers drawn with the fused kernels follow the exact laws of test_sampler_laws.py (chi-square at a fixed
seed), are reproducible, and reject bad input with clear errors."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from difforge.samplers.discrete import METHODS, sample
from difforge.samplers.discrete.metrics import state_index
from difforge.samplers.discrete.oracle import Enumerated, OracleModel
from difforge.samplers.discrete.oracle.evaluate import Variant, exact_law

N, L, DRAWS = 3, 3, 20000


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(11)
    return Enumerated(torch.distributions.Dirichlet(torch.full((N**L,), 2.0, dtype=torch.float64)).sample(), N, L)


def _chi_square_pvalue(samples: torch.Tensor, law: torch.Tensor) -> float:
    counts = torch.bincount(state_index(samples, N), minlength=N**L).double()
    expected = law * len(samples)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "samples in states of probability 0"
    return stats.chisquare(counts[keep].numpy(), expected[keep].numpy() * counts.sum().item() / expected.sum().item()).pvalue


EXACT_VARIANTS = [
    ("masked", Variant("mdlm", "mdlm")),
    ("masked", Variant("remdm cap", "remdm", {"strategy": "cap", "eta": 0.2})),
    ("masked", Variant("remdm loop", "remdm", {"strategy": "loop", "eta": 0.2, "t_on": 0.6, "t_off": 0.2})),
    ("uniform", Variant("euler", "euler")),
    ("uniform", Variant("analytic", "analytic")),
    ("uniform", Variant("tau_leaping", "tau_leaping")),
    ("uniform", Variant("ctmc_pc", "ctmc_pc")),
    ("uniform", Variant("informed_pc", "informed_pc", {"positions": 1, "select": "random"})),
    ("uniform", Variant("gadd", "gadd", {"positions": 1, "select": "random"})),
    ("uniform", Variant("gadd blocked", "gadd", {"positions": 2, "select": "random", "predictor": "tweedie"})),
]


@pytest.mark.parametrize("process,variant", EXACT_VARIANTS, ids=[v.name for _, v in EXACT_VARIANTS])
def test_kernel_draws_follow_the_exact_law(oracle, process, variant):
    steps = 4
    law, nfe_exact = exact_law(oracle, process, variant, steps, "linear")
    x, nfe = sample(OracleModel(oracle, process), shape=(DRAWS, L), vocab_size=N, process=process,
                    method=variant.method, steps=steps, seed=5, return_nfe=True, **variant.options)  # fmt: skip
    assert nfe == nfe_exact
    assert _chi_square_pvalue(x, law) > 1e-3


def test_first_hitting_is_exact_with_the_exact_denoiser(oracle):
    x, nfe = sample(OracleModel(oracle, "masked"), shape=(DRAWS, L), vocab_size=N, method="first_hitting", seed=2,
                    return_nfe=True)  # fmt: skip
    assert nfe == L
    assert _chi_square_pvalue(x, oracle.probs()) > 1e-3


def test_a_wrong_law_is_detected(oracle):
    """The chi-square check above can fail: Euler with 1 step is far from the target."""
    x = sample(OracleModel(oracle, "uniform"), shape=(DRAWS, L), vocab_size=N, process="uniform", steps=1, seed=5)
    assert _chi_square_pvalue(x, oracle.probs()) < 1e-6


@pytest.mark.parametrize("process,method", [(p, m) for p, ms in METHODS.items() for m in ms])
def test_seeded_runs_repeat_and_seeds_differ(oracle, process, method):
    def run(seed):
        return sample(OracleModel(oracle, process), shape=(64, L), vocab_size=N, process=process, method=method,
                      steps=4, seed=seed)  # fmt: skip

    first = run(1)
    assert first.dtype == torch.long and first.shape == (64, L)
    assert ((first >= 0) & (first < N)).all()
    assert torch.equal(first, run(1))
    assert not torch.equal(first, run(2))


@pytest.mark.parametrize("options", [{}, {"block_length": 1}, {"threshold": 0.5}, {"order": "margin"},
                                     {"order": "entropy"}, {"order": "random", "block_length": 3}])
def test_confidence_decoding_commits_every_position(oracle, options):
    x, nfe = sample(OracleModel(oracle, "masked"), shape=(32, L), vocab_size=N, method="confidence", steps=3,
                    return_nfe=True, **options)  # fmt: skip
    assert ((x >= 0) & (x < N)).all()
    if "threshold" not in options:
        assert nfe == 3


def test_confidence_commits_the_most_confident_position_first():
    """A model sure about position 2 only: LLaDA with one commit per call unmasks position 2 first."""
    seen = []

    def model(x, alpha):
        seen.append(x.clone())
        out = torch.full((*x.shape, N), -5.0)
        out[:, :, 0] = 0.0
        out[:, 2, :] = torch.tensor([-30.0, 10.0, -30.0])
        return torch.log_softmax(out, -1)

    sample(model, shape=(4, L), vocab_size=N, method="confidence", steps=L)
    assert (seen[1][:, 2] == 1).all() and (seen[1][:, :2] == N).all()


@pytest.mark.parametrize("method", ["mdlm", "first_hitting", "confidence"])
def test_a_mask_id_inside_the_vocabulary_is_never_drawn(method):
    x = sample(_model, shape=(500, L), vocab_size=N, mask_id=1, steps=3, method=method)
    assert not (x == 1).any()
    assert (x == 0).any() and (x == 2).any()


def _model(x, alpha):
    return torch.zeros(*x.shape, N)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "nope"}, "unknown masked method"),
        ({"method": "euler"}, "is a uniform method"),
        ({"process": "absorbing"}, "process must be"),
        ({"steps": 0}, "steps must be"),
        ({"vocab_size": 1}, "vocab_size must be"),
        ({"mask_id": N + 1}, "mask_id must be"),
        ({"shape": (0, 3)}, "shape must be"),
        ({"schedule": "sqrt"}, "schedule must be"),
        ({"eta": 0.1}, "unknown option"),
        ({"method": "remdm", "strategy": "both"}, "strategy must be"),
        ({"method": "confidence", "block_length": 2}, "must divide"),
        ({"method": "confidence", "steps": 4, "block_length": 1}, "multiple of the number of blocks"),
        ({"process": "uniform", "method": "gadd", "select": "best"}, "select must be"),
        ({"process": "uniform", "method": "euler", "denoise": "greedy"}, "denoise must be"),
        ({"model_output": "logits"}, "model_output must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"shape": (2, L), "vocab_size": N, "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(_model, **args)


def test_model_with_a_wrong_output_shape():
    with pytest.raises(ValueError, match="must return a float tensor of shape"):
        sample(lambda x, a: torch.zeros(*x.shape, N + 1), shape=(2, L), vocab_size=N, steps=2)


def test_model_returning_nan():
    with pytest.raises(ValueError, match="row"):
        sample(lambda x, a: torch.full((*x.shape, N), float("nan")), shape=(2, L), vocab_size=N, steps=2)
