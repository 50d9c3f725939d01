"""GRPO math (difforge.rl.grpo) and Flow-GRPO's SDE step (difforge.samplers.continuous.sde) against references
written here: loops over plain Python numbers, float64 formulas and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from difforge.rl.grpo import clipped_objective, gaussian_kl, group_advantages
from difforge.samplers.continuous.sde import gaussian_log_prob, sde_step

# ---- advantages and the PPO objective ----


def test_group_advantages_match_a_loop_with_the_population_std():
    rewards = torch.tensor([[0.1, 0.5, -0.2, 0.9, 0.3], [2.0, 2.0, 2.0, 2.0, 2.0], [1.0, -1.0, 0.0, 4.0, 0.5]])
    eps = 1e-4
    expected = []
    for row in rewards.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))  # population: divide by G
        expected.append([(r - mean) / (std + eps) for r in row])
    got = group_advantages(rewards, eps)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert got[1].abs().max() == 0  # equal rewards: no signal, no division by zero


def test_group_advantages_rejects_a_flat_vector():
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(torch.randn(6))


def _clipped_reference(new: list, old: list, adv: list, clip: float) -> tuple[float, list]:
    """Loss and d loss / d new, element by element."""
    n = len(new)
    loss, grads = 0.0, []
    for a, b, A in zip(new, old, adv):
        ratio = math.exp(a - b)
        clipped = min(max(ratio, 1 - clip), 1 + clip)
        unclipped_wins = ratio * A <= clipped * A
        loss -= min(ratio * A, clipped * A) / n
        grads.append(-ratio * A / n if unclipped_wins or 1 - clip <= ratio <= 1 + clip else 0.0)
    return loss, grads


def test_clipped_objective_and_its_gradient_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(12, generator=generator, dtype=torch.float64) * 0.1
    new = (old + torch.randn(12, generator=generator, dtype=torch.float64) * 0.3).requires_grad_(True)
    adv = torch.randn(12, generator=generator, dtype=torch.float64)
    clip = 0.2
    loss = clipped_objective(new, old, adv, clip)
    loss.backward()
    expected, grads = _clipped_reference(new.tolist(), old.tolist(), adv.tolist(), clip)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(new.grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert (new.grad == 0).any() and (new.grad != 0).any()  # both clipped and active elements were exercised


def test_clipped_objective_applies_a_sample_advantage_to_all_its_steps():
    generator = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=generator, dtype=torch.float64) * 0.01
    new = old + torch.randn(3, 4, generator=generator, dtype=torch.float64) * 0.01
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    expected, _ = _clipped_reference(new.flatten().tolist(), old.flatten().tolist(),
                                     [a for a in adv.tolist() for _ in range(4)], 0.005)  # fmt: skip
    assert clipped_objective(new, old, adv, 0.005).item() == pytest.approx(expected, rel=1e-12)


def test_clipped_objective_at_ratio_one_is_minus_the_mean_advantage():
    lp = torch.randn(5)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5])
    assert clipped_objective(lp, lp.clone(), adv, 1e-4).item() == pytest.approx(-0.6, abs=1e-6)


def test_clipped_objective_rejects_bad_input():
    with pytest.raises(ValueError, match="advantages"):
        clipped_objective(torch.zeros(4), torch.zeros(4), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="shape"):
        clipped_objective(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="clip"):
        clipped_objective(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.0)


def test_gaussian_kl_matches_torch_distributions_averaged_over_elements():
    generator = torch.Generator().manual_seed(2)
    mean_new = torch.randn(3, 4, 2, 5, 5, generator=generator, dtype=torch.float64)
    mean_ref = mean_new + 0.3 * torch.randn(3, 4, 2, 5, 5, generator=generator, dtype=torch.float64)
    std = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64).view(3, 1, 1, 1, 1)
    expected = kl_divergence(Normal(mean_new, std.expand_as(mean_new)), Normal(mean_ref, std.expand_as(mean_ref)))
    got = gaussian_kl(mean_new, mean_ref, std)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected.mean(dim=(1, 2, 3, 4)), rtol=1e-12, atol=0)


# ---- the SDE step ----


def _sde_reference(x, v, t, t_next, a):
    """Flow-GRPO's step in float64, one sample at a time: (mean, std)."""
    x, v = x.double(), v.double()
    means, stds = [], []
    for i in range(x.shape[0]):
        ti, tn = float(t[i]), float(t_next[i])
        dt = tn - ti
        if tn == 0:
            sigma = 0.0  # the step into the data is the Euler ODE step
        elif ti == 1:
            sigma = a * math.sqrt(1 / (1 - tn))  # Flow-GRPO's guard: 1 - t_next under the root at t = 1
        else:
            sigma = a * math.sqrt(ti / (1 - ti))
        means.append(x[i] + (v[i] + sigma**2 / (2 * ti) * (x[i] + (1 - ti) * v[i])) * dt)
        stds.append(sigma * math.sqrt(-dt))
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sde_step_matches_the_float64_formula(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 2, 3, 3, generator=generator).to(dtype)
    v = torch.randn(5, 4, 2, 3, 3, generator=generator).to(dtype)
    eps = torch.randn(5, 4, 2, 3, 3, generator=generator).to(dtype)
    t = torch.tensor([1.0, 0.9, 0.5, 0.25, 0.1])
    t_next = torch.tensor([0.9, 0.75, 0.3, 0.0, 0.05])
    x_next, mean, std = sde_step(x, v, t, t_next, noise_level=0.7, eps=eps)
    ref_mean, ref_std = _sde_reference(x, v, t, t_next, 0.7)
    assert x_next.dtype == mean.dtype == std.dtype == dtype
    assert std.shape == (5, 1, 1, 1, 1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean.double(), ref_mean, **tol)
    torch.testing.assert_close(std.flatten().double(), ref_std, **tol)
    torch.testing.assert_close(x_next.double(), ref_mean + ref_std.view(5, 1, 1, 1, 1) * eps.double(), **tol)
    assert std[3].item() == 0  # t_next = 0: deterministic


def test_sde_step_with_scalar_times_and_zero_noise_is_the_euler_step():
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    x_next, mean, std = sde_step(x, v, 0.6, 0.4, noise_level=0.0, eps=torch.randn(2, 3, dtype=torch.float64))
    torch.testing.assert_close(x_next, x - 0.2 * v, rtol=1e-14, atol=1e-14)
    assert std.abs().max() == 0


def test_sde_preserves_the_marginals_of_a_gaussian_flow():
    # Data N(0, s^2): x_t ~ N(0, V_t), V_t = (1-t)^2 s^2 + t^2, and the exact velocity is v = (t - (1-t) s^2) x / V_t.
    # The SDE only adds noise the score term removes again: sampling from N(0, 1) must end at std s.
    s, steps, n = 0.5, 50, 20_000
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        v = (t - (1 - t) * s**2) * x / ((1 - t) ** 2 * s**2 + t**2)
        x, _, _ = sde_step(x, v, t, t_next, noise_level=0.7, eps=torch.randn(n, 1, generator=generator,
                                                                               dtype=torch.float64))  # fmt: skip
    assert x.std().item() == pytest.approx(s, rel=0.03)
    assert x.mean().item() == pytest.approx(0.0, abs=0.02)


def test_sde_step_rejects_bad_times_and_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t_next < t"):
        sde_step(x, x, 0.5, 0.5, noise_level=0.7, eps=x)
    with pytest.raises(ValueError, match="t_next < t"):
        sde_step(x, x, 1.5, 0.5, noise_level=0.7, eps=x)
    with pytest.raises(ValueError, match="one shape"):
        sde_step(x, torch.zeros(2, 4), 0.5, 0.4, noise_level=0.7, eps=x)
    with pytest.raises(ValueError, match=r"\[B=2\]"):
        sde_step(x, x, torch.tensor([0.5, 0.6, 0.7]), 0.4, noise_level=0.7, eps=x)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, x, 0.5, 0.4, noise_level=-1.0, eps=x)


def test_gaussian_log_prob_matches_normal_averaged_over_elements():
    generator = torch.Generator().manual_seed(5)
    mean = torch.randn(3, 4, 2, 4, 4, generator=generator, dtype=torch.float64)
    x = mean + torch.randn(3, 4, 2, 4, 4, generator=generator, dtype=torch.float64)
    std = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64).view(3, 1, 1, 1, 1)
    expected = Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_log_prob(x, mean, torch.zeros(3, 1, 1, 1, 1))
