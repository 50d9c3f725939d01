"""Exact conversions between what a network outputs and what a sampler rule reads (spec §2).

Every tensor is log-space ``[B, L, N]`` over the N data tokens; ``x`` is the current state ``[B, L]``;
``alpha`` the signal level ``[B]``. Uniform process:
  denoiser   log p(x0_i = y | x_t)                      (what a cross-entropy-trained network predicts)
  loo        log p(x0_i = y | x_t^{-i})                 (leave-one-out: position i's own token unseen)
  score      log s_{i,y} = log p_t(x^{i<-y}) - log p_t(x), 0 at y = x_i (SEDD's concrete score)
linked by the single-site conditional p_t(x_i = y | x_-i) = alpha p_loo(y) + (1 - alpha)/N = s_y / sum_z s_z.
Masked process, at masked positions: loo = denoiser, score = log(alpha / (1 - alpha)) + denoiser (the mask
column, s_m = 1, is implicit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _per_row(alpha: Tensor, like: Tensor) -> Tensor:
    return alpha.to(like.dtype).reshape(-1, 1, 1)


def _own_token_shift(alpha: Tensor, vocab: int, like: Tensor) -> Tensor:
    """log(1 + N alpha / (1 - alpha)): how much more the denoiser weighs the token a position already shows."""
    a = _per_row(alpha, like)
    return torch.log1p(vocab * a / (1.0 - a))


def loo_from_denoiser(log_den: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """Uniform: p_loo(y) ∝ p_den(y) / (1 + N alpha / (1 - alpha)) ^ 1[y = x_i]."""
    shift = _own_token_shift(alpha, log_den.shape[-1], log_den).expand(*x.shape, 1)
    return torch.log_softmax(log_den.scatter_add(-1, x.unsqueeze(-1), -shift), dim=-1)


def denoiser_from_loo(log_loo: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """Uniform: the inverse of :func:`loo_from_denoiser`."""
    shift = _own_token_shift(alpha, log_loo.shape[-1], log_loo).expand(*x.shape, 1)
    return torch.log_softmax(log_loo.scatter_add(-1, x.unsqueeze(-1), shift), dim=-1)


def conditional_from_loo(log_loo: Tensor, alpha: Tensor) -> Tensor:
    """Uniform: log p_t(x_i = y | x_-i) = log(alpha p_loo(y) + (1 - alpha) / N)."""
    a = _per_row(alpha, log_loo)
    return torch.logaddexp(torch.log(a) + torch.log_softmax(log_loo, -1), torch.log1p(-a) - math.log(log_loo.shape[-1]))


def score_from_loo(log_loo: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """Uniform: log s_y = log cond(y) - log cond(x_i)."""
    cond = conditional_from_loo(log_loo, alpha)
    return cond - cond.gather(-1, x.unsqueeze(-1))


def score_from_denoiser(log_den: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    return score_from_loo(loo_from_denoiser(log_den, x, alpha), x, alpha)


def loo_from_score(log_score: Tensor, alpha: Tensor) -> Tensor:
    """Uniform: p_loo = (cond - (1 - alpha)/N) / alpha with cond = softmax(log s), clipped at 0 (an estimated
    score can put cond below the uniform floor) and renormalized."""
    a = _per_row(alpha, log_score)
    cond = torch.softmax(log_score, dim=-1)
    loo = ((cond - (1.0 - a) / log_score.shape[-1]) / a).clamp_min(0.0)
    return torch.log(loo / loo.sum(-1, keepdim=True))


def masked_score_from_denoiser(log_den: Tensor, alpha: Tensor) -> Tensor:
    """Masked, at masked positions: log s_y = log(alpha / (1 - alpha)) + log x̂(y) (= -log expm1(sigma))."""
    a = _per_row(alpha, log_den)
    return log_den + torch.log(a) - torch.log1p(-a)


def masked_denoiser_from_score(log_score: Tensor) -> Tensor:
    """Masked, at masked positions: x̂ = softmax of the data-token scores."""
    return torch.log_softmax(log_score, dim=-1)
