"""Sample-quality metrics for discrete samplers (spec §8): exact laws, marginal distances, NLL and diversity.

Sequences are ``LongTensor[S, L]`` over an alphabet of size ``A`` (tokens ``0..A-1``). A sequence's state index
is big-endian, ``sum_i x_i * A^(L-1-i)``, so a law over all ``A^L`` sequences is a vector in that order.
Metrics that need the true distribution take an oracle (``difforge.samplers.discrete.oracle``) and use only its
``vocab_size``, ``length``, ``log_prob``, ``marginals`` and ``pair_marginals``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Dense laws over all sequences are materialized only up to this many states (8 MiB in float64).
MAX_DENSE_STATES = 2**20


def _check_samples(samples: Tensor, name: str = "samples") -> None:
    if not isinstance(samples, Tensor) or samples.dim() != 2 or samples.dtype != torch.long:
        got = f"{samples.dtype} {tuple(samples.shape)}" if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"{name} must be an int64 tensor [S, L], got {got}")
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one sample of length >= 1, got shape {tuple(samples.shape)}")


def _check_tokens(x: Tensor, alphabet: int, name: str) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= alphabet):
        raise ValueError(f"{name} must hold tokens in [0, {alphabet}), got values in [{int(x.min())}, {int(x.max())}]")


def state_index(x: Tensor, alphabet: int) -> Tensor:
    """Big-endian index ``sum_i x_i * alphabet^(L-1-i)`` of each sequence ``x[..., L]`` (int64 ``[...]``)."""
    if x.dtype != torch.long:
        raise ValueError(f"x must be an int64 tensor, got {x.dtype}")
    length = x.shape[-1]
    if alphabet < 1 or alphabet**length > 2**63 - 1:
        raise ValueError(f"alphabet^L = {alphabet}^{length} does not fit an int64 state index")
    _check_tokens(x, alphabet, "x")
    index = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    for i in range(length):
        index = index * alphabet + x[..., i]
    return index


def states_at(index: Tensor, length: int, alphabet: int) -> Tensor:
    """The sequences ``[..., length]`` with the given state indices ``[...]`` (inverse of :func:`state_index`)."""
    place = alphabet ** torch.arange(length - 1, -1, -1, dtype=torch.long, device=index.device)
    return torch.div(index[..., None], place, rounding_mode="floor") % alphabet


def index_states(num_states: int, length: int, alphabet: int) -> Tensor:
    """The sequences with state indices ``0..num_states-1``: int64 ``[num_states, length]``."""
    if num_states < 0 or num_states > alphabet**length:
        raise ValueError(f"num_states must be in [0, {alphabet}^{length}], got {num_states}")
    return states_at(torch.arange(num_states, dtype=torch.long), length, alphabet)


def empirical_law(samples: Tensor, alphabet: int) -> Tensor:
    """Frequency of each of the ``alphabet^L`` sequences among ``samples`` (float64, state-index order)."""
    _check_samples(samples)
    num_states = alphabet ** samples.shape[1]
    if num_states > MAX_DENSE_STATES:
        raise ValueError(f"alphabet^L = {num_states} states exceeds {MAX_DENSE_STATES}; use marginal metrics")
    counts = torch.bincount(state_index(samples, alphabet).cpu(), minlength=num_states)
    return counts.double() / samples.shape[0]


def _as_laws(p, q) -> tuple[Tensor, Tensor]:
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    return p, q.to(p.device)


def total_variation(p, q) -> float:
    """``0.5 * sum |p - q|`` between two laws given as probability vectors of equal shape."""
    p, q = _as_laws(p, q)
    return 0.5 * float((p - q).abs().sum())


def kl_divergence(p, q, floor: float = 1e-12) -> float:
    """``KL(p || q) = sum_{p > 0} p log(p / max(q, floor))`` (nats); the floor keeps it finite where q has
    no mass (a sampler that never visits a state the truth has)."""
    p, q = _as_laws(p, q)
    support = p > 0
    return float((p[support] * (p[support].log() - q[support].clamp_min(floor).log())).sum())


def _check_against(samples: Tensor, oracle) -> None:
    _check_samples(samples)
    if samples.shape[1] != oracle.length:
        raise ValueError(f"samples have length {samples.shape[1]}, the oracle has length {oracle.length}")
    _check_tokens(samples, oracle.vocab_size, "samples")


def marginal_tv(samples: Tensor, oracle) -> float:
    """Mean over positions of the TV between the samples' token frequencies and the exact marginal."""
    _check_against(samples, oracle)
    num, length, vocab = samples.shape[0], samples.shape[1], oracle.vocab_size
    cells = (torch.arange(length, device=samples.device) * vocab + samples).flatten().cpu()
    empirical = torch.bincount(cells, minlength=length * vocab).double().view(length, vocab) / num
    exact = oracle.marginals().double().cpu()
    return 0.5 * float((empirical - exact).abs().sum(-1).mean())


def pairwise_tv(samples: Tensor, oracle) -> float:
    """Mean over adjacent pairs ``(i, i+1)`` of the TV between the empirical and the exact pair marginal."""
    _check_against(samples, oracle)
    num, length, vocab = samples.shape[0], samples.shape[1], oracle.vocab_size
    if length < 2:
        raise ValueError("pairwise_tv needs sequences of length >= 2")
    pair = samples[:, :-1] * vocab + samples[:, 1:]
    cells = (torch.arange(length - 1, device=samples.device) * vocab**2 + pair).flatten().cpu()
    empirical = torch.bincount(cells, minlength=(length - 1) * vocab**2).double() / num
    exact = oracle.pair_marginals().double().cpu().reshape(-1)
    return 0.5 * float((empirical - exact).abs().sum()) / (length - 1)


def nll_per_token(samples: Tensor, oracle) -> float:
    """``-mean log p(x) / L`` under the oracle's exact law (nats; ``inf`` if a sample has probability 0)."""
    _check_against(samples, oracle)
    return -float(oracle.log_prob(samples).double().mean()) / samples.shape[1]


def token_entropy(samples: Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's own token histogram (MDLM/ReMDM "entropy")."""
    _check_samples(samples)
    num, length = samples.shape
    ordered = samples.sort(dim=1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # Runs of equal tokens in the sorted rows are the histogram bins; number them globally to count them at once.
    run = torch.cumsum(starts.flatten(), 0) - 1
    counts = torch.bincount(run).double()
    run_row = torch.arange(num, device=samples.device).repeat_interleave(length)[starts.flatten()]
    freq = counts / length
    per_sample = torch.zeros(num, dtype=torch.float64, device=samples.device).index_add_(0, run_row, -freq * freq.log())
    return float(per_sample.mean())


def unique_ngram_ratio(samples: Tensor, n: int) -> float:
    """Distinct n-grams / total n-grams, counting the n-grams inside each sample (none spans two samples)."""
    _check_samples(samples)
    if n < 1 or n > samples.shape[1]:
        raise ValueError(f"n must be in [1, L = {samples.shape[1]}], got {n}")
    grams = samples.unfold(1, n, 1).reshape(-1, n)
    return torch.unique(grams, dim=0).shape[0] / grams.shape[0]


def duplicate_rate(samples: Tensor) -> float:
    """Fraction of samples equal to an earlier sample (``1 - distinct / S``)."""
    _check_samples(samples)
    return 1.0 - torch.unique(samples, dim=0).shape[0] / samples.shape[0]


__all__ = [
    "MAX_DENSE_STATES",
    "duplicate_rate",
    "empirical_law",
    "index_states",
    "kl_divergence",
    "marginal_tv",
    "nll_per_token",
    "pairwise_tv",
    "state_index",
    "states_at",
    "token_entropy",
    "total_variation",
    "unique_ngram_ratio",
]
