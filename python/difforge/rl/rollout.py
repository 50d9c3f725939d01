"""Rollouts for Flow-GRPO / Sol-RL: SDE trajectories of a flow-matching video model with everything the policy
gradient needs (the noise, every latent, every step's log-probability), reproducible per candidate.

Sampling: ``steps`` steps on :func:`~difforge.samplers.continuous.flow_timesteps`, each a
:func:`~difforge.samplers.continuous.sde.sde_step`. Steps 0 .. K-2 are stochastic and carry a log-probability;
the last step (into t = 0) is the deterministic Euler step (no log-probability, not trained on).

Reproducibility: candidate ``seed`` owns one CPU ``torch.Generator`` that draws its initial noise and then the eps
of every stochastic step (:func:`candidate_noise`), so any subset of a pool can be regenerated alone, by another
model (Sol-RL's NVFP4 explorer, then the full-precision policy), with identical noise.

Batch invariance: the model runs on micro-batches of exactly ``micro_batch`` rows (the last one padded with copies of
its last candidate). GEMM libraries choose kernels, hence summation orders, by the row count, so a candidate's
output may differ in the last bits between a batch of 3 and one of 32; at a fixed row count the rows do not
influence each other. Regenerating any subset with the same ``micro_batch`` therefore reproduces a trajectory bit
for bit (observed for MKL on CPU; it is how GEMM libraries behave, not a documented guarantee).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from difforge.samplers.continuous import flow_timesteps
from difforge.samplers.continuous.sde import gaussian_log_prob, sde_step


@dataclass
class Rollout:
    """B sampled trajectories of K steps.

    Fields: ``context [B, Lc, D]``; ``noise [B, C, T, H, W]`` (the sample at t = 1); ``eps [B, K-1, C, T, H, W]``
    (each stochastic step's noise); ``latents [B, K+1, C, T, H, W]`` (x_0 = noise .. x_K = the video);
    ``log_probs [B, K-1]`` (of each stochastic transition under the sampling model); ``timesteps [K+1]`` (1 .. 0);
    the ``noise_level`` and ``micro_batch`` it was sampled with; the candidates' ``seeds`` (when drawn from seeds)
    and their ``rewards [B]`` once scored.
    """

    context: Tensor
    noise: Tensor
    eps: Tensor
    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor
    noise_level: float
    micro_batch: int
    seeds: list[int] | None = None
    rewards: Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def steps(self) -> int:
        """K, the sampling steps (K - 1 of them stochastic)."""
        return len(self.timesteps) - 1

    @property
    def videos(self) -> Tensor:
        """The final samples ``[B, C, T, H, W]``."""
        return self.latents[:, -1]

    def select(self, indices: Sequence[int] | Tensor) -> Rollout:
        """The rollout of candidates ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return replace(
            self, context=_take(self.context, idx), noise=_take(self.noise, idx), eps=_take(self.eps, idx),
            latents=_take(self.latents, idx), log_probs=_take(self.log_probs, idx),
            seeds=None if self.seeds is None else [self.seeds[i] for i in idx.tolist()],
            rewards=None if self.rewards is None else _take(self.rewards, idx),
        )  # fmt: skip


def _take(tensor: Tensor, rows: Tensor) -> Tensor:
    """``tensor[rows]`` with the (CPU) index moved to the tensor's device."""
    return tensor[rows.to(tensor.device)]


def candidate_noise(seed: int, shape: Sequence[int], steps: int) -> tuple[Tensor, Tensor]:
    """The noise of one candidate: ``(initial noise [*shape], eps [steps - 1, *shape])``, float32 on the CPU, from
    one generator seeded with ``seed`` (initial noise first, then the stochastic steps' eps in order)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"candidate_noise: seed must be an int, got {seed!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"candidate_noise: steps must be an int >= 1, got {steps!r}")
    shape = tuple(shape)
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"candidate_noise: shape must be positive ints, got {shape!r}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator)
    return noise, torch.randn((steps - 1, *shape), generator=generator)


def _micro_batches(indices: Tensor, size: int) -> Iterator[tuple[Tensor, int]]:
    """``(rows, n)`` covering ``indices`` in order: ``rows`` holds exactly ``size`` indices, the first ``n`` real, the
    rest copies of the last real one (see the module docstring: a fixed row count keeps outputs batch-invariant)."""
    for start in range(0, len(indices), size):
        real = indices[start : start + size]
        yield torch.cat([real, real[-1:].expand(size - len(real))]), len(real)


def _velocity(model: nn.Module, x: Tensor, t: float, context: Tensor) -> Tensor:
    return model(x, x.new_full((x.shape[0],), t), context).float()


def _trajectory(
    model: nn.Module, noise: Tensor, eps: Tensor, context: Tensor, times: list[float], noise_level: float
) -> tuple[Tensor, Tensor]:
    """One micro-batch sampled: ``(latents [b, K+1, ...], log_probs [b, K-1])``."""
    x, latents, log_probs = noise, [noise], []
    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = _velocity(model, x, t, context)
        stochastic = k < len(times) - 2
        x_next, mean, std = sde_step(x, v, t, t_next, noise_level=noise_level,
                                     eps=eps[:, k] if stochastic else torch.zeros_like(x))  # fmt: skip
        if stochastic:
            log_probs.append(gaussian_log_prob(x_next, mean, std))
        x = x_next
        latents.append(x)
    return torch.stack(latents, 1), torch.stack(log_probs, 1)


def _check_sampling(context: Tensor, steps: int, noise_level: float, micro_batch: int) -> None:
    if context.dim() != 3:
        raise ValueError(f"sampling: context must be [B, Lc, D], got shape {tuple(context.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"sampling: steps must be an int >= 2 (the last one is deterministic), got {steps!r}")
    if not noise_level > 0:
        raise ValueError(f"sampling: noise_level must be > 0 (0 is the ODE: no log-probabilities), got {noise_level}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"sampling: micro_batch must be an int >= 1, got {micro_batch!r}")


def _seed_list(seeds: Sequence[int], batch: int) -> list[int]:
    seeds = list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"sampling: need one seed per context row ({batch}), got {len(seeds)}")
    return seeds


@torch.no_grad()
def sample_sde(
    model: nn.Module,
    context: Tensor,
    *,
    steps: int,
    noise_level: float,
    seeds: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    noises: tuple[Tensor, Tensor] | None = None,
    shift: float = 1.0,
    micro_batch: int = 8,
) -> Rollout:
    """Samples B = ``len(context)`` trajectories with Flow-GRPO's SDE (``model(x, t [B], context) -> v``).

    The noise comes either from ``seeds`` (one per candidate, with the latent ``shape`` ``(C, T, H, W)``, through
    :func:`candidate_noise`) or from ``noises = (noise [B, C, T, H, W], eps [B, steps - 1, C, T, H, W])``. Runs
    under ``torch.no_grad`` on context's device; the caller picks the precision (e.g. an autocast context).
    """
    _check_sampling(context, steps, noise_level, micro_batch)
    batch, device = context.shape[0], context.device
    if (seeds is None) == (noises is None):
        raise ValueError("sample_sde: pass exactly one of seeds (with shape) or noises")
    if seeds is not None:
        seeds = _seed_list(seeds, batch)
        if shape is None:
            raise ValueError("sample_sde: seeds need the latent shape (C, T, H, W)")
        drawn = [candidate_noise(seed, shape, steps) for seed in seeds]
        noise, eps = torch.stack([n for n, _ in drawn]), torch.stack([e for _, e in drawn])
    else:
        noise, eps = noises
        if noise.dim() < 2 or noise.shape[0] != batch or eps.shape != (batch, steps - 1, *noise.shape[1:]):
            raise ValueError(
                f"sample_sde: noises must be (noise [B={batch}, ...], eps [B, steps - 1 = {steps - 1}, ...]) of one "
                f"latent shape, got {tuple(noise.shape)} and {tuple(eps.shape)}"
            )
    times = flow_timesteps(steps, shift)
    latents = torch.empty(batch, steps + 1, *noise.shape[1:], device=device)
    log_probs = torch.empty(batch, steps - 1, device=device)
    for rows, n in _micro_batches(torch.arange(batch), micro_batch):
        chunk_latents, chunk_log_probs = _trajectory(model, _take(noise, rows).to(device), _take(eps, rows).to(device),
                                                     _take(context, rows), times.tolist(), noise_level)  # fmt: skip
        real = rows[:n].to(device)
        latents[real], log_probs[real] = chunk_latents[:n], chunk_log_probs[:n]
    return Rollout(context, noise, eps, latents, log_probs, times, float(noise_level), micro_batch,
                   seeds=None if seeds is None else list(seeds))  # fmt: skip


@torch.no_grad()
def sample_sde_videos(
    model: nn.Module,
    context: Tensor,
    *,
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int,
    noise_level: float,
    shift: float = 1.0,
    micro_batch: int = 8,
) -> Tensor:
    """The final videos ``[B, C, T, H, W]`` of :func:`sample_sde` from ``seeds``, keeping only one micro-batch's
    trajectory and noise in memory at a time (an exploration pool is large and only its rewards matter)."""
    _check_sampling(context, steps, noise_level, micro_batch)
    seeds = _seed_list(seeds, context.shape[0])
    times = flow_timesteps(steps, shift).tolist()
    videos = []
    for rows, n in _micro_batches(torch.arange(len(seeds)), micro_batch):
        drawn = [candidate_noise(seeds[i], shape, steps) for i in rows.tolist()]
        noise = torch.stack([d[0] for d in drawn]).to(context.device)
        eps = torch.stack([d[1] for d in drawn]).to(context.device)
        latents, _ = _trajectory(model, noise, eps, _take(context, rows), times, noise_level)
        videos.append(latents[:n, -1])
    return torch.cat(videos)


def step_log_prob(
    model: nn.Module, rollout: Rollout, step: int, indices: Sequence[int] | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Stochastic transition ``step`` (x_step -> x_step+1) of candidates ``indices`` (at most
    ``rollout.micro_batch``, evaluated as one padded micro-batch) under ``model``, differentiable when grad is on.

    Returns ``(log_prob [n], mean [n, C, T, H, W], std [n, 1, 1, 1, 1])`` of the step's Gaussian: what the PPO ratio
    and the KL penalty need.
    """
    if not 0 <= step < rollout.steps - 1:
        raise ValueError(f"step_log_prob: step must be a stochastic step in [0, {rollout.steps - 2}], got {step}")
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if not 1 <= len(idx) <= rollout.micro_batch:
        raise ValueError(f"step_log_prob: pass 1..{rollout.micro_batch} (micro_batch) indices, got {len(idx)}")
    rows, n = next(_micro_batches(idx, rollout.micro_batch))
    on = rows.to(rollout.latents.device)
    x, target = rollout.latents[on, step], rollout.latents[on, step + 1]
    t, t_next = float(rollout.timesteps[step]), float(rollout.timesteps[step + 1])
    v = _velocity(model, x, t, _take(rollout.context, rows))
    eps = rollout.eps[rows.to(rollout.eps.device), step].to(x.device)
    _, mean, std = sde_step(x, v, t, t_next, noise_level=rollout.noise_level, eps=eps)
    return gaussian_log_prob(target, mean, std)[:n], mean[:n], std[:n]


def log_probs(
    model: nn.Module,
    rollout: Rollout,
    indices: Sequence[int] | Tensor | None = None,
    steps: Sequence[int] | None = None,
) -> Tensor:
    """Log-probabilities ``[n, len(steps)]`` of the rollout's transitions under ``model`` (the current policy),
    with grad when grad is enabled; all candidates and all stochastic steps by default. Under the model that
    sampled the rollout they equal ``rollout.log_probs`` (bit for bit with a deterministic model)."""
    idx = torch.arange(len(rollout)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    steps = range(rollout.steps - 1) if steps is None else list(steps)
    columns = []
    for k in steps:
        parts = [step_log_prob(model, rollout, k, idx[s : s + rollout.micro_batch])[0]
                 for s in range(0, len(idx), rollout.micro_batch)]  # fmt: skip
        columns.append(torch.cat(parts))
    return torch.stack(columns, 1)
