"""Brute-force references for the sampler tests: forward-process laws and posteriors of a small joint, by
enumeration of every state (written here, independent of the library's oracles and conversions)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def all_states(n: int, length: int) -> Tensor:
    return torch.tensor(list(itertools.product(range(n), repeat=length)), dtype=torch.long)


def forward_kernel(n: int, alpha: float, process: str) -> Tensor:
    """q(x_t = y | x0 = z) as a [z, y] matrix; masked: y ranges over n + 1 tokens, the last being the mask."""
    if process == "uniform":
        return alpha * torch.eye(n, dtype=torch.float64) + (1 - alpha) / n
    q = torch.zeros(n, n + 1, dtype=torch.float64)
    q[:, :n] = alpha * torch.eye(n, dtype=torch.float64)
    q[:, n] = 1 - alpha
    return q


def noisy_law(p0: Tensor, n: int, length: int, alpha: float, process: str) -> tuple[Tensor, Tensor]:
    """(states over the noisy alphabet, p_t over them): p_t(x) = sum_x0 p0(x0) prod_j q(x^j | x0^j)."""
    q = forward_kernel(n, alpha, process)
    clean = all_states(n, length)
    noisy = all_states(q.shape[1], length)
    lik = torch.ones(len(clean), len(noisy), dtype=torch.float64)
    for j in range(length):
        lik *= q[clean[:, j]][:, noisy[:, j]]
    return noisy, p0 @ lik


def posterior_clean(p0: Tensor, n: int, length: int, x_t: Tensor, alpha: float, process: str) -> Tensor:
    """p(x0 | x_t) over the clean states, [B, n^L]."""
    q = forward_kernel(n, alpha, process)
    clean = all_states(n, length)
    lik = torch.ones(len(x_t), len(clean), dtype=torch.float64)
    for j in range(length):
        lik *= q[clean[:, j]][:, x_t[:, j]].T
    post = lik * p0
    return post / post.sum(-1, keepdim=True)
