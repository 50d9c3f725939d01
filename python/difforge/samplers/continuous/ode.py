"""Flow-matching ODE samplers: Euler and Heun on the velocity field, with classifier-free guidance.

Convention (:mod:`difforge.pipelines.flow_matching`): ``x_t = (1 - t) x0 + t * noise``, the model predicts
``v = noise - x0 = dx/dt``, sampling integrates ``dx = v dt`` from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

SAMPLERS = ("euler", "heun")
Velocity = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> v, same shape as x


def flow_timesteps(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """``steps + 1`` times from 1 to 0: uniform, then the resolution shift ``shift*t / (1 + (shift-1)*t)``
    (SD3 / Wan; shift > 1 spends more steps near noise). float32; the endpoints are exactly 1 and 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow_timesteps: steps must be an int >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"flow_timesteps: shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float().to(device)


def guided(velocity: Callable[[Tensor, Tensor, Tensor], Tensor], context: Tensor, null_context: Tensor | None,
           scale: float) -> Velocity:  # fmt: skip
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)`` from one batched call of
    ``velocity(x, t, context)`` over ``[cond ; uncond]``. ``scale == 1`` (or no null context) is the plain
    conditional velocity, one call of batch B."""
    if scale == 1.0 or null_context is None:
        return lambda x, t: velocity(x, t, context)
    if null_context.shape != context.shape:
        raise ValueError(f"guided: null_context {tuple(null_context.shape)} must match context {tuple(context.shape)}")
    both = torch.cat([context, null_context])

    def v(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return uncond + scale * (cond - uncond)

    return v


def integrate(velocity: Velocity, x: Tensor, times: Tensor, sampler: str = "euler") -> tuple[Tensor, int]:
    """Integrates ``dx = v dt`` along ``times`` (decreasing, from the time of ``x``). Returns ``(x at times[-1],
    NFE)``. Euler: one velocity per step. Heun (2nd order): Euler predictor, then the trapezoid of the velocities
    at both ends, two per step (the last step too: v at t = 0 is defined for flow matching)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if times.dim() != 1 or len(times) < 2:
        raise ValueError(f"integrate: times must be 1-D with >= 2 entries, got shape {tuple(times.shape)}")
    nfe = 0
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        dt = t_next - t
        v = velocity(x, x.new_full((x.shape[0],), t))
        nfe += 1
        if sampler == "euler":
            x = x + dt * v
            continue
        x_euler = x + dt * v
        v_next = velocity(x_euler, x.new_full((x.shape[0],), t_next))
        nfe += 1
        x = x + dt * 0.5 * (v + v_next)
    return x, nfe
