"""Exact inference for first-order chains of hidden states ``z_1..z_L`` (transition ``trans[K, K]``, start
``init[K]``) emitting tokens through ``emit[K, N]``; a Markov chain over tokens is the case ``emit = I``
(passed as ``None``).

Every message is kept in log space and every product ``exp(log a) @ M`` is taken after shifting by the row
maximum, so long chains (L = 256 and beyond) neither underflow nor lose relative precision.
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_matmul(log_a: Tensor, mat: Tensor) -> Tensor:
    """``log(exp(log_a) @ mat)`` for a non-negative ``mat``, without underflow (rows of ``-inf`` stay ``-inf``)."""
    shift = log_a.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    return torch.log(torch.exp(log_a - shift) @ mat) + shift


def _hidden_evidence(log_phi: Tensor, emit: Tensor | None) -> Tensor:
    """``log psi_j(z) = log sum_y emit(z, y) phi_j(y)``: the token evidence seen from the hidden state."""
    return log_phi if emit is None else log_matmul(log_phi, emit.T)


def _messages(log_init: Tensor, trans: Tensor, log_psi: Tensor) -> tuple[Tensor, Tensor]:
    """Forward ``log p(z_j, evidence_{<j})`` and backward ``log p(evidence_{>j} | z_j)``, both ``[B, L, K]``."""
    batch, length, states = log_psi.shape
    forward = log_psi.new_empty(batch, length, states)
    backward = log_psi.new_zeros(batch, length, states)
    forward[:, 0] = log_init
    for j in range(1, length):
        forward[:, j] = log_matmul(forward[:, j - 1] + log_psi[:, j - 1], trans)
    for j in range(length - 2, -1, -1):
        backward[:, j] = log_matmul(backward[:, j + 1] + log_psi[:, j + 1], trans.T)
    return forward, backward


def chain_posteriors(
    log_init: Tensor, trans: Tensor, emit: Tensor | None, log_phi: Tensor, include_self: bool
) -> Tensor:
    """Normalized ``log p(x0_i = y | evidence)`` for every sample and position, float64 ``[B, L, N]``, where the
    evidence on token ``j`` is ``phi_j = exp(log_phi[:, j])``: all positions' (``include_self``, the
    denoiser) or all but ``i``'s own (the leave-one-out posterior). One forward-backward pass, O(B L K^2)."""
    forward, backward = _messages(log_init, trans, _hidden_evidence(log_phi, emit))
    hidden = forward + backward  # log p(z_i, evidence of every position but i)
    tokens = hidden if emit is None else log_matmul(hidden, emit)
    if include_self:
        tokens = tokens + log_phi
    return torch.log_softmax(tokens, dim=-1)


def chain_log_likelihood(log_init: Tensor, trans: Tensor, log_psi: Tensor) -> Tensor:
    """``log sum_z p(z) prod_j psi_j(z_j)`` for each sample (``log_psi [B, L, K]``): with ``psi_j(z) =
    emit(z, x_j)`` this is the HMM likelihood of ``x`` (forward algorithm)."""
    message = log_init + log_psi[:, 0]
    for j in range(1, log_psi.shape[1]):
        message = log_matmul(message, trans) + log_psi[:, j]
    return torch.logsumexp(message, dim=-1)


def chain_marginals(init: Tensor, trans: Tensor, emit: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Exact token marginals ``[L, N]`` and adjacent pair marginals ``[L-1, N, N]`` by forward recursion of the
    hidden marginals (``pair_i[a, b] = p(x_i = a, x_{i+1} = b)``)."""
    hidden = [init]
    for _ in range(1, length):
        hidden.append(hidden[-1] @ trans)
    hidden = torch.stack(hidden)
    joint = hidden[:-1, :, None] * trans  # p(z_i, z_{i+1})
    if emit is None:
        return hidden, joint
    return hidden @ emit, emit.T @ joint @ emit


def chain_sample(
    init: Tensor, trans: Tensor, emit: Tensor | None, length: int, n: int, generator: torch.Generator | None
) -> Tensor:
    """``n`` exact ancestral samples of the token sequence, int64 ``[n, L]``."""
    state = torch.multinomial(init, n, replacement=True, generator=generator)
    states = [state]
    for _ in range(1, length):
        state = torch.multinomial(trans[state], 1, generator=generator).squeeze(1)
        states.append(state)
    states = torch.stack(states, dim=1)
    if emit is None:
        return states
    return torch.multinomial(emit[states.flatten()], 1, generator=generator).view(n, length)
