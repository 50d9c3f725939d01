"""Flow-GRPO's stochastic sampler step for flow matching, with the Gaussian log-density RL trains on.

Flow-GRPO (Liu et al. 2025) turns the sampling ODE ``dx = v dt`` into an SDE with the same marginals,
``dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dW`` with ``sigma_t = a sqrt(t / (1 - t))`` (``a`` the
noise level), so that each Euler-Maruyama step is a Gaussian policy whose log-density the policy gradient needs.
Convention (:mod:`difforge.pipelines.flow_matching`): ``x_t = (1 - t) x0 + t * noise``, the model predicts
``v = noise - x0``, sampling goes from t = 1 to t = 0, so ``dt = t_next - t < 0``.

Two edge cases, decided here once for every caller:

* t = 1: ``sqrt(t / (1 - t))`` is infinite. Like Flow-GRPO (which substitutes its second grid time), the
  ``1 - t`` under the square root becomes ``1 - t_next`` at t = 1: the first step's noise is finite and set by
  the step size. (A fixed clamp such as ``t <= 1 - 1e-3`` gives sigma ~ 31 a there, and a first-step drift
  coefficient ``1 + sigma^2 dt / 2`` far below -1: the sample explodes.)
* t_next = 0: the step into the data is the deterministic Euler (ODE) step, ``std = 0``. The SDE step would
  leave noise of std ``sigma_t sqrt(t)`` in the final sample; like Flow-GRPO's practice of sampling the end of
  the trajectory deterministically, that step has no log-density and is excluded from the RL loss.

Log-densities are *averaged* over the non-batch dimensions, as Flow-GRPO does: a log-ratio is then a per-element
quantity whose size does not grow with the latent size (the PPO clip range keeps its meaning across shapes).
The math runs in float64 for float64 inputs and in float32 otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _times(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """``value`` (a number or ``[B]``) as ``[1 or B, 1, ..., 1]`` in the math dtype, to broadcast against ``x``
    (kept at one row for a shared time: the time arithmetic then costs nothing next to the latents')."""
    value = torch.as_tensor(value, dtype=_math_dtype(x), device=x.device)
    if value.dim() > 1 or value.numel() not in (1, x.shape[0]):
        raise ValueError(f"sde_step: {name} must be a number or [B={x.shape[0]}], got shape {tuple(value.shape)}")
    return value.reshape(-1, *([1] * (x.dim() - 1)))


def sde_step(
    x: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor, *, noise_level: float, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One Flow-GRPO SDE step from time ``t`` to ``t_next`` (``0 <= t_next < t <= 1``, numbers or per sample
    ``[B]``).

    Args:
        x: the sample at ``t``, ``[B, ...]``.
        v: the model's velocity at ``(x, t)``, same shape.
        noise_level: ``a`` in ``sigma_t = a sqrt(t / (1 - t))`` (>= 0; 0 is the Euler ODE step).
        eps: standard normal noise of x's shape (the step's randomness, passed in so it can be replayed).

    Returns:
        ``(x_next, mean, std)``: ``mean = x + (v + sigma_t^2 / (2t) (x + (1 - t) v)) dt``, ``std = sigma_t
        sqrt(-dt)`` shaped ``[B, 1, ..., 1]`` (0 where ``t_next == 0``, see the module docstring), ``x_next = mean
        + std * eps``; float32 (float64 for float64 ``x``).
    """
    if v.shape != x.shape or eps.shape != x.shape:
        raise ValueError(
            f"sde_step: x, v and eps must have one shape, got {tuple(x.shape)}, {tuple(v.shape)}, {tuple(eps.shape)}"
        )
    if not noise_level >= 0:
        raise ValueError(f"sde_step: noise_level must be >= 0, got {noise_level}")
    dtype = _math_dtype(x)
    x, v, eps = x.to(dtype), v.to(dtype), eps.to(dtype)
    t, t_next = _times(t, x, "t"), _times(t_next, x, "t_next")
    if not bool(((t_next >= 0) & (t_next < t) & (t <= 1)).all()):
        raise ValueError("sde_step: times must satisfy 0 <= t_next < t <= 1")
    dt = t_next - t
    # At t = 1 the 1 - t under the root becomes 1 - t_next (Flow-GRPO's guard); the step into t = 0 is the ODE.
    ratio = t / (1 - torch.where(t < 1, t, t_next))
    sigma = torch.where(t_next > 0, noise_level * torch.sqrt(ratio), torch.zeros_like(t))
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = (sigma * torch.sqrt(-dt)).expand(x.shape[0], *t.shape[1:])
    return mean + std * eps, mean, std


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x_next; mean, std^2)`` averaged over the non-batch dimensions: ``[B]``.

    ``std`` broadcasts against ``x_next`` (``[B, 1, ..., 1]`` from :func:`sde_step`) and must be > 0: the
    deterministic last step has no density.
    """
    if not bool((std > 0).all()):
        raise ValueError("gaussian_log_prob: std must be > 0 (the deterministic t_next = 0 step has no density)")
    dtype = _math_dtype(x_next)
    x_next, mean, std = x_next.to(dtype), mean.to(dtype), std.to(dtype)
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x_next.dim())))
