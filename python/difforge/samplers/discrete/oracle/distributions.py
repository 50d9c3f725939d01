"""Exact oracle distributions for evaluating discrete samplers (spec §8): laws whose noisy posteriors are known
exactly, so a sampler's error can be measured without training a network.

* :class:`Product` (independent positions), :class:`MarkovChain` and :class:`HMM`: posteriors by one
  forward-backward pass with soft evidence, any length;
* :class:`Enumerated` (any small joint), :class:`Grid2D` (2D densities) and :class:`Potts`: by enumeration;
* :class:`OracleModel`: an oracle as a network ``model(x_t, alpha)`` (denoiser, leave-one-out or score output);
* :func:`oracle_by_name`: the standard small instances.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difforge.samplers.discrete.oracle.base import Oracle, as_law, random_simplex
from difforge.samplers.discrete.oracle.chains import (
    chain_log_likelihood,
    chain_marginals,
    chain_posteriors,
    chain_sample,
)
from difforge.samplers.discrete.oracle.enumeration import Enumerated
from difforge.samplers.discrete.oracle.lattices import Grid2D, Potts
from difforge.samplers.discrete.oracle.model import OracleModel


def _shape(values, dims: int, name: str) -> tuple[int, ...]:
    shape = tuple(torch.as_tensor(values).shape)
    if len(shape) != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor, got shape {shape}")
    return shape


def _check_length(length: int) -> int:
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return length


class Product(Oracle):
    """Independent positions: ``p(x) = prod_i pis[i, x_i]`` (``pis [L, N]``, rows normalized here). The
    leave-one-out posterior is the prior marginal ``pis[i]`` whatever ``x_t``."""

    def __init__(self, pis: Tensor):
        self.name, (self.length, self.vocab_size) = "product", _shape(pis, 2, "pis")
        self._pis = as_law(pis, (self.length, self.vocab_size), "pis")
        self._log_pis = self._pis.log()

    @classmethod
    def dirichlet(
        cls, N: int, L: int, concentration: float = 1.0, generator: torch.Generator | None = None
    ) -> Product:
        """Each position's law drawn from Dirichlet(concentration)."""
        return cls(random_simplex((_check_length(L), N), concentration, generator))

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_sequences(x)
        return self._log_pis[torch.arange(self.length), x.cpu()].sum(-1).to(x.device)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return torch.multinomial(self._pis, n, replacement=True, generator=generator).T.contiguous()

    def _posteriors(self, log_phi: Tensor, include_self: bool) -> Tensor:
        prior = self._log_pis.expand_as(log_phi)
        return torch.log_softmax(prior + log_phi if include_self else prior, dim=-1)

    def marginals(self) -> Tensor:
        return self._pis.clone()

    def pair_marginals(self) -> Tensor:
        return self._pis[:-1, :, None] * self._pis[1:, None, :]


class MarkovChain(Oracle):
    """A first-order homogeneous Markov chain over tokens: ``x_1 ~ init [N]``, ``x_{j+1} ~ trans[x_j] [N, N]``
    (rows normalized here), for ``length`` positions."""

    def __init__(self, init: Tensor, trans: Tensor, length: int):
        (vocab,) = _shape(init, 1, "init")
        self.name, self.vocab_size, self.length = "markov", vocab, _check_length(length)
        self._init, self._trans = as_law(init, (vocab,), "init"), as_law(trans, (vocab, vocab), "trans")
        self._log_init, self._log_trans = self._init.log(), self._trans.log()

    @classmethod
    def dirichlet(
        cls, N: int, L: int, concentration: float = 1.0, generator: torch.Generator | None = None
    ) -> MarkovChain:
        """Start law and every transition row drawn from Dirichlet(concentration)."""
        init = random_simplex((N,), concentration, generator)
        return cls(init, random_simplex((N, N), concentration, generator), L)

    @classmethod
    def banded(
        cls, N: int, L: int, k: int = 3, teleport: float = 0.05, generator: torch.Generator | None = None
    ) -> MarkovChain:
        """Banded "top-k + teleport" rows: from token a, mass ``1 - teleport`` on the k tokens
        ``a - k//2 .. a - k//2 + k - 1`` (mod N) with Dirichlet(1) weights, and ``teleport`` spread uniformly
        over all N; uniform start."""
        if not 1 <= k <= N or not 0.0 <= teleport <= 1.0:
            raise ValueError(f"need 1 <= k <= N and 0 <= teleport <= 1, got k = {k}, N = {N}, teleport = {teleport}")
        band = (torch.arange(N)[:, None] + torch.arange(k) - k // 2) % N
        weights = random_simplex((N, k), 1.0, generator)
        trans = torch.full((N, N), teleport / N, dtype=torch.float64)
        trans.scatter_add_(1, band, (1.0 - teleport) * weights)
        return cls(torch.full((N,), 1.0 / N, dtype=torch.float64), trans, L)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_sequences(x)
        x_cpu = x.cpu()
        steps = self._log_trans[x_cpu[:, :-1], x_cpu[:, 1:]].sum(-1)
        return (self._log_init[x_cpu[:, 0]] + steps).to(x.device)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return chain_sample(self._init, self._trans, None, self.length, n, generator)

    def _posteriors(self, log_phi: Tensor, include_self: bool) -> Tensor:
        return chain_posteriors(self._log_init, self._trans, None, log_phi, include_self)

    def marginals(self) -> Tensor:
        return chain_marginals(self._init, self._trans, None, self.length)[0]

    def pair_marginals(self) -> Tensor:
        return chain_marginals(self._init, self._trans, None, self.length)[1]


class HMM(Oracle):
    """A hidden Markov model: hidden chain ``z_1 ~ init [K]``, ``z_{j+1} ~ trans[z_j] [K, K]``, tokens
    ``x_j ~ emit[z_j] [K, N]`` (rows normalized here), for ``length`` positions."""

    def __init__(self, init: Tensor, trans: Tensor, emit: Tensor, length: int):
        (hidden,), vocab = _shape(init, 1, "init"), _shape(emit, 2, "emit")[1]
        self.name, self.vocab_size, self.length = "hmm", vocab, _check_length(length)
        self.num_hidden = hidden
        self._init, self._trans = as_law(init, (hidden,), "init"), as_law(trans, (hidden, hidden), "trans")
        self._emit = as_law(emit, (hidden, vocab), "emit")
        self._log_init, self._log_emit = self._init.log(), self._emit.log()

    @classmethod
    def random(
        cls, K: int, N: int, L: int, generator: torch.Generator | None = None, concentration: float = 1.0
    ) -> HMM:
        """Start law, transition and emission rows drawn from Dirichlet(concentration)."""
        init = random_simplex((K,), concentration, generator)
        trans = random_simplex((K, K), concentration, generator)
        return cls(init, trans, random_simplex((K, N), concentration, generator), L)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_sequences(x)
        log_psi = self._log_emit[:, x.cpu()].permute(1, 2, 0)  # log p(x_j | z_j = z): [B, L, K]
        return chain_log_likelihood(self._log_init, self._trans, log_psi).to(x.device)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return chain_sample(self._init, self._trans, self._emit, self.length, n, generator)

    def _posteriors(self, log_phi: Tensor, include_self: bool) -> Tensor:
        return chain_posteriors(self._log_init, self._trans, self._emit, log_phi, include_self)

    def marginals(self) -> Tensor:
        return chain_marginals(self._init, self._trans, self._emit, self.length)[0]

    def pair_marginals(self) -> Tensor:
        return chain_marginals(self._init, self._trans, self._emit, self.length)[1]


def oracle_by_name(name: str, seed: int = 0, **kw) -> Oracle:
    """A standard oracle, random parts drawn from ``torch.Generator().manual_seed(seed)``; ``kw`` override the
    defaults, chosen so the exact law (``N^L <= 4096`` states) can be propagated, except Potts:

    * ``"product"``: ``Product.dirichlet(N=4, L=6, concentration=1.0)``
    * ``"markov"``: ``MarkovChain.dirichlet(N=4, L=6, concentration=1.0)``
    * ``"markov_banded"``: ``MarkovChain.banded(N=4, L=6, k=3, teleport=0.05)``
    * ``"hmm"``: ``HMM.random(K=3, N=4, L=6, concentration=1.0)``
    * ``"grid"``: ``density="checkerboard"`` (or ``"gaussian_mixture"``, ``"two_moons"``), ``S=32`` (1024 states)
    * ``"potts"``: ``Potts(side=3, q=3, coupling=1.0)``, 19,683 states (Monte-Carlo evaluation)
    """
    generator = torch.Generator().manual_seed(seed)
    if name == "product":
        return Product.dirichlet(**{"N": 4, "L": 6, **kw}, generator=generator)
    if name == "markov":
        return MarkovChain.dirichlet(**{"N": 4, "L": 6, **kw}, generator=generator)
    if name == "markov_banded":
        return MarkovChain.banded(**{"N": 4, "L": 6, **kw}, generator=generator)
    if name == "hmm":
        return HMM.random(**{"K": 3, "N": 4, "L": 6, **kw}, generator=generator)
    if name == "grid":
        density, size = kw.pop("density", "checkerboard"), kw.pop("S", 32)
        if density == "gaussian_mixture":
            return Grid2D.gaussian_mixture(size, generator, **kw)
        if density in ("checkerboard", "two_moons"):
            return getattr(Grid2D, density)(size, **kw)
        raise ValueError(f"unknown grid density {density!r}; expected checkerboard, gaussian_mixture or two_moons")
    if name == "potts":
        return Potts(**{"side": 3, "q": 3, "coupling": 1.0, **kw})
    raise ValueError(f"unknown oracle {name!r}; expected product, markov, markov_banded, hmm, grid or potts")


__all__ = [
    "HMM",
    "Enumerated",
    "Grid2D",
    "MarkovChain",
    "Oracle",
    "OracleModel",
    "Potts",
    "Product",
    "oracle_by_name",
]
