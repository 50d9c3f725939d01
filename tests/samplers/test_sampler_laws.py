"""Exact laws of the sampler steps against brute-force enumeration (spec §9 must-pass checks b-f), without
sampling: each step's ``probs`` is the law a kernel draw must follow (the kernels are checked against these laws
in test_sampler_draws.py)."""

from __future__ import annotations

import math

import pytest
import torch

from difforge.samplers.discrete import uniform
from difforge.samplers.discrete.context import Context
from difforge.samplers.discrete.network import Network
from difforge.samplers.discrete.oracle import Enumerated, OracleModel
from difforge.samplers.discrete.oracle.evaluate import Variant, exact_law
from difforge.samplers.discrete.oracle.law import LawChain
from difforge.samplers.discrete.schedules import schedule
from difforge.samplers.discrete.steps import MixtureStep, RandomPositions, TweedieStep
from samplers_testlib import all_states, noisy_law, posterior_clean

N, L = 3, 3


@pytest.fixture(scope="module")
def joint():
    torch.manual_seed(3)
    return torch.distributions.Dirichlet(torch.ones(N**L, dtype=torch.float64)).sample()


def _oracle(p0, n=N, length=L):
    return Enumerated(p0, n, length)


def _score_step_law(p0, alpha, build):
    """LawChain started at p_t (uniform process), after one step built from the exact score at alpha."""
    oracle = _oracle(p0)
    _, pt = noisy_law(p0, N, L, alpha, "uniform")
    chain = LawChain(pt, L, N)
    net = Network(OracleModel(oracle, "uniform", output="score"), process="uniform", vocab_size=N, output="score")
    log_score = net.score(chain.x, alpha)
    build(chain, log_score)
    return pt, chain.law


@pytest.mark.parametrize("alpha", [0.15, 0.5, 0.9])
def test_random_scan_gibbs_from_the_score_leaves_p_t_invariant(joint, alpha):
    def gibbs(chain, log_score):
        chain.apply(MixtureStep(log_score, chain.x, torch.tensor([1.0, 0.0, 0.0])), positions=RandomPositions(1))

    pt, law = _score_step_law(joint, alpha, gibbs)
    torch.testing.assert_close(law, pt, atol=1e-6, rtol=0)


def test_blocked_gibbs_is_not_invariant(joint):
    """Two sites at once under conditional independence: the test above can fail."""

    def blocked(chain, log_score):
        chain.apply(MixtureStep(log_score, chain.x, torch.tensor([1.0, 0.0, 0.0])), positions=RandomPositions(2))

    pt, law = _score_step_law(joint, 0.6, blocked)
    assert (law - pt).abs().sum() > 1e-3


def test_ctmc_corrector_rates_are_reversible(joint):
    """The corrector's rate R^c = reverse + forward satisfies p_t(x) R^c(x, y) = p_t(y) R^c(y, x): checked on the
    single-site kernel of a short tau-leap, K(x, y) = c R^c(x, y) + O(c^2) off the diagonal."""
    alpha, c = 0.4, 1e-7
    oracle = _oracle(joint)
    _, pt = noisy_law(joint, N, L, alpha, "uniform")
    chain = LawChain(pt, L, N)
    net = Network(OracleModel(oracle, "uniform", output="score"), process="uniform", vocab_size=N, output="score")
    step = MixtureStep(net.score(chain.x, alpha), chain.x, torch.tensor([c, 0.0, 0.0]), rule="ctmc")
    probs = step.probs(N)
    for site in range(L):
        others = [j for j in range(L) if j != site]
        same_elsewhere = (chain.x[:, None, others] == chain.x[None, :, others]).all(-1)
        kernel = probs[:, site, :][:, chain.x[:, site]] * same_elsewhere  # K(x, y) for a single-site update
        rates = pt.unsqueeze(1) * kernel / c
        rates.fill_diagonal_(0.0)
        torch.testing.assert_close(rates, rates.T, atol=1e-8, rtol=1e-4)


def test_tweedie_step_is_exact_for_one_token():
    """SEDD analytic with exact scores maps p_t to p_s exactly when L = 1."""
    n = 5
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    oracle = _oracle(p0, n, 1)
    a_t, a_s = 0.3, 0.7
    _, pt = noisy_law(p0, n, 1, a_t, "uniform")
    _, ps = noisy_law(p0, n, 1, a_s, "uniform")
    chain = LawChain(pt, 1, n)
    net = Network(OracleModel(oracle, "uniform"), process="uniform", vocab_size=n, output="denoiser")
    chain.apply(TweedieStep(net.score(chain.x, a_t), chain.x, torch.full((n,), a_t / a_s)))
    torch.testing.assert_close(chain.law, ps, atol=1e-6, rtol=0)


class _Recorder:
    exact = True

    def __init__(self, x):
        self.x = x

    def apply(self, step, positions=None):
        self.step = step


def test_duo_ancestral_with_loo_is_the_exact_posterior(joint):
    """Check d: the plug-in posterior fed p_loo equals p(x_s^i | x_t) by enumeration."""
    a_t, a_s = 0.35, 0.8
    sched = schedule("linear")
    t, s = 1 - a_t, 1 - a_s
    x_t = all_states(N, L)
    chain = _Recorder(x_t)
    net = Network(OracleModel(_oracle(joint), "uniform"), process="uniform", vocab_size=N, output="denoiser")
    uniform._ancestral(Context(net, chain, sched, 1, N, N), t, s, greedy=False)
    got = chain.step.probs(N)  # [B, L, N]
    post = posterior_clean(joint, N, L, x_t, a_t, "uniform")  # p(x0 | x_t)
    clean = all_states(N, L)
    expected = torch.zeros_like(got)
    for i in range(L):
        # p(x_s^i = y | x_t) = sum_x0 p(x0 | x_t) q(x_s^i = y, x_t^i | x0^i) / q(x_t^i | x0^i)
        a = a_t / a_s
        q_s = a_s * torch.eye(N, dtype=torch.float64) + (1 - a_s) / N  # [x0, y]
        q_ts = a * torch.eye(N, dtype=torch.float64) + (1 - a) / N  # [y, x_t]
        q_t = a_t * torch.eye(N, dtype=torch.float64) + (1 - a_t) / N
        bridge = q_s[clean[:, i]].unsqueeze(0) * q_ts[:, x_t[:, i]].T.unsqueeze(1)  # [B, states, y]
        bridge = bridge / q_t[clean[:, i]][:, x_t[:, i]].T.unsqueeze(-1)
        expected[:, i] = (post.unsqueeze(-1) * bridge).sum(1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["mdlm", "remdm"])
def test_masked_samplers_are_exact_for_one_token(method):
    n = 4
    p0 = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    law, nfe = exact_law(_oracle(p0, n, 1), "masked", Variant(method, method), 5, "linear")
    torch.testing.assert_close(law, p0, atol=1e-6, rtol=0)
    assert nfe == 5


class _MaskCounter(LawChain):
    """Records P(position masked) after every step."""

    def apply(self, step, positions=None):
        super().apply(step, positions)
        masked = (self.x == self.alphabet - 1).double()
        self.history = getattr(self, "history", []) + [self.law @ masked]


@pytest.mark.parametrize("options", [{}, {"strategy": "cap", "eta": 0.3}, {"strategy": "rescale", "eta": 0.5}])
def test_mdlm_and_remdm_keep_the_mask_marginal(joint, options):
    """Check c: after the step to s every position is masked with probability exactly 1 - alpha_s."""
    from difforge.samplers.discrete import masked, run

    steps = 6
    init = torch.zeros((N + 1) ** L, dtype=torch.float64)
    init[-1] = 1.0
    chain = _MaskCounter(init, L, N + 1)
    net = Network(OracleModel(_oracle(joint), "masked"), process="masked", vocab_size=N, output="denoiser")
    ctx = Context(net, chain, schedule("linear"), steps, N, N)
    run(masked.remdm if options else masked.mdlm, ctx, dict(options))
    for k, p_masked in enumerate(chain.history, start=1):
        s = 1 - k / steps
        torch.testing.assert_close(p_masked, torch.full((L,), s, dtype=torch.float64), atol=1e-6, rtol=0)


def test_more_steps_bring_euler_closer(joint):
    tvs = []
    for steps in (2, 8, 32):
        law, _ = exact_law(_oracle(joint), "uniform", Variant("euler", "euler"), steps, "linear")
        tvs.append(0.5 * (law - joint).abs().sum().item())
    assert tvs[0] > tvs[1] > tvs[2]
    assert tvs[2] < 0.05


def test_law_chain_keeps_mass(joint):
    for method in ("euler", "tau_leaping", "ctmc_pc", "analytic", "informed_pc"):
        variant = Variant(method, method, {"positions": 1, "select": "random"} if method == "informed_pc" else {})
        law, _ = exact_law(_oracle(joint), "uniform", variant, 4, "linear")
        assert math.isclose(law.sum().item(), 1.0, abs_tol=1e-9)
        assert (law >= -1e-12).all()
