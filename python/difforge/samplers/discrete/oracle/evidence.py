"""What a noisy token says about its clean token: the soft evidence ``phi_j(z) = q_t(x_t^j | x0^j = z)``.

Posteriors only need phi up to a factor per (sample, position), so constants are dropped where that keeps them
finite: masked process, ``phi = 1`` at a masked position (``1 - alpha`` for every z) and ``1[z = x_t^j]`` at an
unmasked one (``alpha`` dropped); uniform process, ``alpha 1[z = x_t^j] + (1 - alpha) / N`` exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

PROCESSES = ("masked", "uniform")


def check_noisy_input(x_t: Tensor, alpha, process: str, vocab_size: int, length: int) -> Tensor:
    """Validate ``(x_t [B, L], alpha, process)`` and return alpha as float64 ``[B]`` (a float or a 0-d tensor is
    broadcast to every sample)."""
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    if not isinstance(x_t, Tensor) or x_t.dtype != torch.long or x_t.dim() != 2 or x_t.shape[1] != length:
        got = f"{x_t.dtype} {tuple(x_t.shape)}" if isinstance(x_t, Tensor) else type(x_t).__name__
        raise ValueError(f"x_t must be an int64 tensor [B, {length}], got {got}")
    top = vocab_size + 1 if process == "masked" else vocab_size
    if x_t.numel() and (int(x_t.min()) < 0 or int(x_t.max()) >= top):
        raise ValueError(f"x_t of the {process} process must hold tokens in [0, {top}), "
                         f"got values in [{int(x_t.min())}, {int(x_t.max())}]")
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x_t.device)
    if alpha.dim() == 0:
        alpha = alpha.expand(x_t.shape[0])
    if alpha.shape != (x_t.shape[0],):
        raise ValueError(f"alpha must be a float or a tensor [B = {x_t.shape[0]}], got shape {tuple(alpha.shape)}")
    if alpha.numel() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
        raise ValueError("alpha must lie in [0, 1]")
    return alpha


def log_evidence(x_t: Tensor, alpha: Tensor, process: str, vocab_size: int) -> Tensor:
    """``log phi_j(z)`` for every sample, position and clean token: float64 ``[B, L, N]`` (inputs validated by
    :func:`check_noisy_input`)."""
    z = torch.arange(vocab_size, device=x_t.device)
    same = x_t.unsqueeze(-1) == z
    if process == "masked":
        masked = (x_t == vocab_size).unsqueeze(-1)
        return torch.where(same | masked, 0.0, -torch.inf).double()
    a = alpha.reshape(-1, 1, 1)
    return torch.log(torch.where(same, a, 0.0) + (1.0 - a) / vocab_size)
