"""Reinforcement learning for flow-matching video models: Flow-GRPO's SDE rollouts with log-probabilities, GRPO
advantages and the PPO objective, Sol-RL's contrastive selection (explore with NVFP4, train in full precision) and
rewards. The driver is :mod:`difforge.pipelines.rl`."""

from __future__ import annotations

from difforge.rl.grpo import clipped_objective, gaussian_kl, group_advantages, select_contrastive
from difforge.rl.rewards import REWARDS, Reward, get_reward
from difforge.rl.rollout import Rollout, candidate_noise, log_probs, sample_sde, sample_sde_videos, step_log_prob

__all__ = [
    "REWARDS", "Reward", "Rollout", "candidate_noise", "clipped_objective", "gaussian_kl", "get_reward",
    "group_advantages", "log_probs", "sample_sde", "sample_sde_videos", "select_contrastive", "step_log_prob",
]  # fmt: skip
