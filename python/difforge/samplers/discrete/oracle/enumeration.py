"""Laws given as a table over all ``N^L`` sequences (state-index order): exact posteriors by enumeration, and
the :class:`Enumerated` oracle built on them.

For position i, ``p(x0_i = y, evidence) = phi_i(y) [if included] * sum_{a, c} p(a, y, c) E_<i(a) E_>i(c)``,
viewing the table as ``[N^i, N, N^(L-1-i)]`` with ``a`` the positions before i, ``c`` those after, and
``E_<i``, ``E_>i`` their evidence products (built once as prefix/suffix tables). The sum is one matrix product
per position, O(B L N^L) in all. Each factor is scaled by its maximum before leaving log space (the scales cancel
in the normalization), so nothing underflows unless the terms that matter span more than ~700 nats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difforge.samplers.discrete.metrics import MAX_DENSE_STATES, state_index, states_at
from difforge.samplers.discrete.oracle.base import Oracle, as_law, random_simplex

# Batch rows per pass are chosen so one pass holds about this many float64 entries (32 MiB).
_ENTRIES_PER_PASS = 2**22


def _prefix_suffix(log_phi: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """``prefix[i] [B, N^i]``: summed evidence of positions ``< i``; ``suffix[i] [B, N^(L-1-i)]``: of ``> i``."""
    batch, length, _ = log_phi.shape
    prefix = [log_phi.new_zeros(batch, 1)]
    for j in range(length - 1):
        prefix.append((prefix[-1][:, :, None] + log_phi[:, j, None, :]).reshape(batch, -1))
    suffix = [log_phi.new_zeros(batch, 1)]
    for j in range(length - 1, 0, -1):
        suffix.insert(0, (log_phi[:, j, :, None] + suffix[0][:, None, :]).reshape(batch, -1))
    return prefix, suffix


def _scaled_exp(log_x: Tensor) -> Tensor:
    """``exp(log_x)`` divided by its row maximum (rows of ``-inf`` give zeros)."""
    shift = log_x.amax(-1, keepdim=True)
    return torch.exp(log_x - torch.where(torch.isfinite(shift), shift, 0.0))


def _posteriors_chunk(prior: Tensor, log_phi: Tensor, include_self: bool) -> Tensor:
    batch, length, vocab = log_phi.shape
    prefix, suffix = _prefix_suffix(log_phi)
    out = []
    for i in range(length):
        before, after = vocab**i, vocab ** (length - 1 - i)
        summed_before = _scaled_exp(prefix[i]) @ prior.view(before, vocab * after)
        out.append(torch.log((summed_before.view(batch, vocab, after) * _scaled_exp(suffix[i])[:, None]).sum(-1)))
    out = torch.stack(out, dim=1)
    return torch.log_softmax(out + log_phi if include_self else out, dim=-1)


def enumerated_posteriors(log_prior: Tensor, log_phi: Tensor, include_self: bool) -> Tensor:
    """Normalized ``log p(x0_i = y | evidence)``, float64 ``[B, L, N]``, for the joint ``exp(log_prior)``
    ``[N^L]`` and evidence ``phi_j = exp(log_phi[:, j])``: all positions' (``include_self``, the denoiser) or
    all but i's own (leave-one-out)."""
    if log_phi.shape[0] == 0:
        return log_phi.clone()
    prior = _scaled_exp(log_prior)
    rows = max(1, _ENTRIES_PER_PASS // log_prior.numel())
    return torch.cat([_posteriors_chunk(prior, chunk, include_self) for chunk in log_phi.split(rows)])


class Enumerated(Oracle):
    """Any law small enough to tabulate: ``Enumerated(probs [N**L], N, L)`` (normalized here; at most 2**20
    states). Posteriors by enumeration of every sequence, O(B L N^L)."""

    def __init__(self, probs: Tensor, N: int, L: int, name: str = "enumerated"):
        if N < 1 or L < 1 or N**L > MAX_DENSE_STATES:
            raise ValueError(f"need N >= 1, L >= 1 and N^L <= {MAX_DENSE_STATES}, got N = {N}, L = {L}")
        self.name, self.vocab_size, self.length = name, N, L
        self._probs = as_law(probs, (N**L,), "probs")
        self._log_table = self._probs.log()

    @classmethod
    def random(
        cls, N: int, L: int, generator: torch.Generator | None = None, concentration: float = 1.0
    ) -> Enumerated:
        """A joint drawn from Dirichlet(concentration) over all ``N^L`` sequences."""
        return cls(random_simplex((N**L,), concentration, generator), N, L)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_sequences(x)
        return self._log_table[state_index(x.cpu(), self.vocab_size)].to(x.device)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        index = torch.multinomial(self._probs, n, replacement=True, generator=generator)
        return states_at(index, self.length, self.vocab_size)

    def _posteriors(self, log_phi: Tensor, include_self: bool) -> Tensor:
        return enumerated_posteriors(self._log_table, log_phi, include_self)

    def probs(self) -> Tensor:
        return self._probs.clone()
