"""Flow-matching ODE samplers (difforge.samplers.continuous.ode) against closed forms written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difforge.samplers.continuous import flow_timesteps, guided, integrate


@given(steps=st.integers(1, 64), shift=st.floats(0.2, 8.0))
def test_timesteps_are_the_shifted_uniform_grid(steps, shift):
    t = flow_timesteps(steps, shift)
    u = [1 - i / steps for i in range(steps + 1)]
    expected = torch.tensor([shift * x / (1 + (shift - 1) * x) for x in u])
    assert t.dtype == torch.float32 and t.shape == (steps + 1,)
    assert t[0] == 1 and t[-1] == 0
    torch.testing.assert_close(t, expected.float(), rtol=1e-6, atol=1e-7)
    assert bool((t[1:] < t[:-1]).all())


def _linear_field(a: float):
    """dx/dt = a x: x(0) = x(1) * exp(-a) integrating from 1 to 0."""
    return lambda x, t: a * x


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_integrators_converge_at_their_order(sampler, order):
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = x1 * math.exp(-1.5)
    errors = []
    for steps in (8, 16, 32):
        x0, nfe = integrate(_linear_field(1.5), x1, flow_timesteps(steps).double(), sampler)
        assert nfe == steps * order
        errors.append((x0 - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2**order, rel=0.15)


def test_euler_step_matches_the_explicit_update():
    x = torch.randn(3, 4, dtype=torch.float64)
    times = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    field = lambda x, t: torch.sin(x) * t[:, None]  # noqa: E731
    expected = x.clone()
    for t, t_next in ((1.0, 0.6), (0.6, 0.0)):
        expected = expected + (t_next - t) * torch.sin(expected) * t
    out, _ = integrate(field, x, times, "euler")
    torch.testing.assert_close(out, expected)


def test_guidance_combines_the_conditional_and_unconditional_velocities():
    calls = []

    def velocity(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2))[:, None] + t[:, None]

    x, t = torch.randn(2, 5), torch.tensor([0.3, 0.7])
    context, null = torch.randn(2, 3, 4), torch.zeros(2, 3, 4)
    v = guided(velocity, context, null, 4.0)(x, t)
    cond, uncond = velocity(x, t, context), velocity(x, t, null)
    torch.testing.assert_close(v, uncond + 4.0 * (cond - uncond))
    assert calls[0] == 4  # one batched call of [cond ; uncond]
    torch.testing.assert_close(guided(velocity, context, null, 1.0)(x, t), cond)


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        flow_timesteps(0)
    with pytest.raises(ValueError, match="shift"):
        flow_timesteps(4, 0.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        integrate(_linear_field(1.0), torch.zeros(1, 1), flow_timesteps(2), "rk4")
    with pytest.raises(ValueError, match="null_context"):
        guided(lambda x, t, c: x, torch.zeros(2, 3, 4), torch.zeros(1, 3, 4), 2.0)
