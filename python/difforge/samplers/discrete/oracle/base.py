"""The exact-oracle interface: a known law over sequences ``[N]^L`` with exact noisy posteriors (spec §2, §8).

Noising processes (tokens noised independently, signal level ``alpha`` per sample):
``"masked"``: ``x_t^j = x0^j`` with probability alpha, else the mask id ``m = N``;
``"uniform"``: ``q(x_t^j = y | x0^j) = alpha 1[y = x0^j] + (1 - alpha) / N``.
Sequences are indexed big-endian (``difforge.samplers.discrete.metrics.state_index``).
"""

from __future__ import annotations

import abc

import numpy as np
import torch
from torch import Tensor

from difforge.samplers.discrete.metrics import MAX_DENSE_STATES, states_at
from difforge.samplers.discrete.oracle.evidence import check_noisy_input, log_evidence

_STATES_PER_PASS = 2**16


def random_simplex(shape: tuple[int, ...], concentration: float, generator: torch.Generator | None) -> Tensor:
    """Dirichlet(concentration) draws over the last axis of ``shape`` (float64), reproducible from
    ``generator`` (the draws come from a numpy generator seeded by it)."""
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    seed = int(torch.randint(2**62, (1,), generator=generator))
    draws = np.random.default_rng(seed).dirichlet(np.full(shape[-1], float(concentration)), size=shape[:-1])
    # Tiny concentrations can round an entry to 0; a floor keeps every law strictly positive.
    return torch.from_numpy(draws).clamp_min(1e-300)


def as_law(values, shape: tuple[int, ...], name: str) -> Tensor:
    """``values`` as float64 of the given shape, non-negative and finite, normalized over the last axis."""
    law = torch.as_tensor(values, dtype=torch.float64).cpu()
    if tuple(law.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(law.shape)}")
    if not bool(torch.isfinite(law).all()) or bool((law < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    total = law.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError(f"every distribution in {name} needs positive total mass")
    return law / total


class Oracle(abc.ABC):
    """A law over sequences ``[N]^L`` (``N = vocab_size``, ``L = length``) with exact log-probabilities,
    samples, marginals and, for both noising processes, exact denoiser and leave-one-out posteriors.

    Subclasses implement :meth:`log_prob`, ``_sample(n, generator)`` (n >= 1) and
    ``_posteriors(log_phi, include_self)``; the enumeration-based :meth:`probs`, :meth:`marginals` and
    :meth:`pair_marginals` here are overridden where a structure gives them cheaper. All computation is
    float64 on the CPU; results come back on the input's device.
    """

    name: str
    vocab_size: int
    length: int

    @property
    def num_states(self) -> int:
        """``N ** L``, the number of sequences."""
        return self.vocab_size**self.length

    @abc.abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """Exact normalized ``log p(x)`` of sequences ``x`` int64 ``[B, L]``: float64 ``[B]``."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact i.i.d. samples, int64 ``[n, L]``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return torch.zeros(0, self.length, dtype=torch.long)
        return self._sample(n, generator)

    @abc.abstractmethod
    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``n >= 1`` exact samples."""

    @abc.abstractmethod
    def _posteriors(self, log_phi: Tensor, include_self: bool) -> Tensor:
        """Normalized ``log p(x0_i = y | evidence)`` ``[B, L, N]`` for evidence ``log_phi [B, L, N]`` on every
        position (``include_self``) or every position but i."""

    def denoiser(self, x_t: Tensor, alpha, process: str) -> Tensor:
        """Exact ``log p(x0_i = y | x_t)``, float64 ``[B, L, N]``, for ``x_t`` int64 ``[B, L]`` noised by
        ``process`` ("masked" or "uniform") at signal level ``alpha`` (``[B]``, or one float for all).
        Undefined (NaN) for an ``x_t`` the process cannot produce from this law."""
        return self._noisy_posteriors(x_t, alpha, process, include_self=True)

    def loo(self, x_t: Tensor, alpha, process: str) -> Tensor:
        """Exact leave-one-out posterior ``log p(x0_i = y | x_t^{-i})``, float64 ``[B, L, N]`` (arguments as
        :meth:`denoiser`)."""
        return self._noisy_posteriors(x_t, alpha, process, include_self=False)

    def _noisy_posteriors(self, x_t: Tensor, alpha, process: str, include_self: bool) -> Tensor:
        alpha = check_noisy_input(x_t, alpha, process, self.vocab_size, self.length)
        log_phi = log_evidence(x_t.cpu(), alpha.cpu(), process, self.vocab_size)
        return self._posteriors(log_phi, include_self).to(x_t.device)

    def _check_sequences(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dtype != torch.long or x.dim() != 2 or x.shape[1] != self.length:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be an int64 tensor [B, {self.length}], got {got}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise ValueError(f"x must hold tokens in [0, {self.vocab_size}), "
                             f"got values in [{int(x.min())}, {int(x.max())}]")

    def probs(self) -> Tensor:
        """The whole law, float64 ``[N**L]`` in state-index order (ValueError beyond 2**20 states)."""
        if self.num_states > MAX_DENSE_STATES:
            raise ValueError(f"{self.name}: {self.num_states} states exceed {MAX_DENSE_STATES}; no dense law")
        chunks = torch.arange(self.num_states).split(_STATES_PER_PASS)
        return torch.cat([self.log_prob(states_at(c, self.length, self.vocab_size)) for c in chunks]).exp()

    def marginals(self) -> Tensor:
        """Exact token marginals ``p(x_i = y)``, float64 ``[L, N]``."""
        law, vocab, length = self.probs(), self.vocab_size, self.length
        return torch.stack([law.view(vocab**i, vocab, -1).sum((0, 2)) for i in range(length)])

    def pair_marginals(self) -> Tensor:
        """Exact adjacent pair marginals ``p(x_i = a, x_{i+1} = b)``, float64 ``[L-1, N, N]``."""
        law, vocab, length = self.probs(), self.vocab_size, self.length
        pairs = [law.view(vocab**i, vocab, vocab, -1).sum((0, 3)) for i in range(length - 1)]
        return torch.stack(pairs) if pairs else law.new_zeros(0, vocab, vocab)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, length={self.length})"
