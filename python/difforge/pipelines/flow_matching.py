"""Rectified-flow / flow-matching objective (the Wan / SD3 recipe).

Convention: t in (0, 1), ``x_t = (1 - t) * x0 + t * noise`` (t = 1 is pure noise), and the model predicts the
velocity ``v = noise - x0`` = dx_t/dt. Sampling integrates from t = 1 to t = 0. With per-frame times (diffusion
forcing) every latent frame of a clip has its own t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def logit_normal_timesteps(
    shape: tuple[int, ...], generator: torch.Generator, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> Tensor:
    """t = sigmoid(mean + std * N(0, 1)) (SD3's logit-normal sampling), then the resolution shift
    ``shift * t / (1 + (shift - 1) * t)`` (shift > 1 moves mass towards noise). float32 on the generator's device."""
    if std <= 0 or shift <= 0:
        raise ValueError(f"logit_normal_timesteps: std and shift must be > 0, got std={std}, shift={shift}")
    t = torch.sigmoid(mean + std * torch.randn(shape, generator=generator, device=generator.device))
    return shift * t / (1 + (shift - 1) * t)


def noisy_latents(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t, v)`` for latents ``x0 [B, C, T, H, W]`` and times ``t`` ``[B]`` or per latent frame ``[B, F]``
    (F divides T: each frame's t covers T/F latent frames)."""
    if x0.shape != noise.shape:
        raise ValueError(f"noisy_latents: noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}")
    B, T = x0.shape[0], x0.shape[2]
    if t.dim() == 1:
        t = t[:, None]
    if t.shape[0] != B or T % t.shape[1]:
        raise ValueError(f"noisy_latents: t must be [B={B}] or [B, F] with F dividing T={T}, got {tuple(t.shape)}")
    tt = t.repeat_interleave(T // t.shape[1], dim=1).to(x0.dtype)[:, None, :, None, None]  # [B, 1, T, 1, 1]
    return (1 - tt) * x0 + tt * noise, noise - x0
