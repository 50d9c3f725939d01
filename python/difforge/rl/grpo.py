"""The GRPO pieces of Flow-GRPO and Sol-RL: group-relative advantages, the PPO clipped objective, the KL penalty
between two Gaussian policies, and Sol-RL's contrastive selection of the candidates to regenerate and train on.

Log-probabilities and the KL are per-element averages over a sample's non-batch dimensions
(:func:`difforge.samplers.continuous.sde.gaussian_log_prob`), so ratios stay close to 1 and clip ranges are small.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """``(r - mean_g) / (std_g + eps)`` per group: ``rewards [P, G]`` (P prompts, G samples each) -> ``[P, G]``.

    The standard deviation is the population one (divide by G), as in DeepSeek's GRPO and Flow-GRPO's per-prompt
    statistics; ``eps`` keeps a group of equal rewards at advantage 0 instead of dividing by zero.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"group_advantages: rewards must be [P, G] with G >= 1, got shape {tuple(rewards.shape)}")
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return ((rewards - mean) / (std + eps)).float()


def clipped_objective(log_prob_new: Tensor, log_prob_old: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """PPO's clipped surrogate loss ``-mean(min(ratio A, clip(ratio, 1 - clip, 1 + clip) A))``, ``ratio =
    exp(log_prob_new - log_prob_old)``.

    ``log_prob_new`` (with grad) and ``log_prob_old`` are ``[B]`` or ``[B, K]`` (K steps); ``advantages [B]``
    applies to every step of its sample. Returns a scalar to minimise.
    """
    if log_prob_new.shape != log_prob_old.shape:
        raise ValueError(
            f"clipped_objective: new and old log-probs differ in shape: {tuple(log_prob_new.shape)} vs "
            f"{tuple(log_prob_old.shape)}"
        )
    if advantages.shape != log_prob_new.shape[:1]:
        raise ValueError(
            f"clipped_objective: advantages must be [B={log_prob_new.shape[0]}], got {tuple(advantages.shape)}"
        )
    if not clip > 0:
        raise ValueError(f"clipped_objective: clip must be > 0, got {clip}")
    advantages = advantages.reshape(-1, *([1] * (log_prob_new.dim() - 1))).to(log_prob_new.dtype)
    ratio = torch.exp(log_prob_new - log_prob_old.detach())
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


def gaussian_kl(mean_new: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """``KL(N(mean_new, std^2) || N(mean_ref, std^2))`` per element, ``(mean_new - mean_ref)^2 / (2 std^2)``,
    averaged over the non-batch dimensions like the log-probabilities: ``[B]``. ``std > 0`` broadcasts."""
    if mean_new.shape != mean_ref.shape:
        raise ValueError(
            f"gaussian_kl: means differ in shape: {tuple(mean_new.shape)} vs {tuple(mean_ref.shape)}"
        )
    if not bool((std > 0).all()):
        raise ValueError("gaussian_kl: std must be > 0")
    kl = (mean_new - mean_ref) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean_new.dim())))


def select_contrastive(rewards: Tensor, top_k: int, bottom_k: int) -> Tensor:
    """Sol-RL's selection from each prompt's pool: the ``top_k`` highest and the ``bottom_k`` lowest rewards.

    ``rewards [P, N]`` -> candidate indices ``[P, top_k + bottom_k]``: the top ones (best first), then the bottom
    ones (worst first). The two sets are disjoint (the bottom ones come from what the top ones left) and ties go
    to the lower index on both ends.
    """
    if rewards.dim() != 2:
        raise ValueError(f"select_contrastive: rewards must be [P, N], got shape {tuple(rewards.shape)}")
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k > rewards.shape[1]:
        raise ValueError(
            f"select_contrastive: need 0 <= top_k, bottom_k and top_k + bottom_k <= N = {rewards.shape[1]}, got "
            f"top_k={top_k}, bottom_k={bottom_k}"
        )
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices  # ties: lower index first
    top = order[:, :top_k]
    rest = order[:, top_k:].sort(dim=1).values  # back in index order, so a stable sort breaks ties by index
    lowest = torch.sort(rewards.gather(1, rest), dim=1, stable=True).indices[:, :bottom_k]
    return torch.cat([top, rest.gather(1, lowest)], dim=1)
