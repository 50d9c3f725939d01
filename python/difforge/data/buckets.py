"""AdaptiveLoad bucketing: per-bucket batch sizes under a memory and a compute budget, and batch samplers.

Variable-shape video training stacks only samples of one latent shape into a batch, so each shape is a bucket
with ``S`` tokens per sample (after patchify). Equal-token batching (:class:`EqualTokenSampler`) keeps ``B*S``
constant; since attention makes a step cost ``B*(a*S + c*S^2)``, long buckets then straggle at every gradient
all-reduce. AdaptiveLoad (:class:`AdaptiveLoadSampler`) sizes each bucket with

    B(S) = max(1, min(floor(M_mem / S), floor(M_comp / S^p))),   p in (1, 2]

(:func:`bucket_batch_size`; :func:`calibrate_p` fits ``p`` to measured step times) and, optionally, deals the
batches so that the ranks of one step get similar modelled cost ``B*S^p``.

Both samplers yield lists of dataset indices (use them as ``DataLoader(batch_sampler=...)``) and compute the
whole epoch's plan from ``(seed, epoch)`` alone, so every rank agrees on it without communication.
:func:`imbalance_rate` and :func:`plan_imbalance` measure the straggler cost (mean over steps of
``(max - mean) / mean`` of the per-rank step times).
"""

from __future__ import annotations

import math
import operator
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

# floor(ratio * (1 + 1e-12)): exact integer ratios computed in float64 must not drop by one (spec §9).
_FLOOR_SLACK = 1.0 + 1e-12
_P_MIN = 1.0 + 1e-6  # calibrate_p clamps into [_P_MIN, 2] so its result is always a valid p in (1, 2]


def _positive_int(value: Any, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def _positive_float(value: Any, name: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _check_p(p: Any) -> float:
    p = float(p)
    if not 1.0 < p <= 2.0:
        raise ValueError(f"p must be in (1, 2], got {p!r}")
    return p


def _patch_tokens(shape: Sequence[int], patch: Sequence[int]) -> int:
    """Tokens of a latent of ``shape`` (T, H, W) cut into ``patch`` (pt, ph, pw) patches; exact division only."""
    patch = tuple(patch)
    if len(patch) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in patch):
        raise ValueError(f"patch must be 3 positive ints (pt, ph, pw), got {patch!r}")
    if any(n % q for n, q in zip(shape, patch)):
        raise ValueError(f"latent shape (T, H, W) = {tuple(shape)} is not divisible by patch {patch}")
    return math.prod(n // q for n, q in zip(shape, patch))


def _check_counts(token_counts: Sequence[int]) -> list[int]:
    counts = [_positive_int(n, f"token_counts[{i}]") for i, n in enumerate(token_counts)]
    if not counts:
        raise ValueError("empty dataset: token_counts has no samples")
    return counts


def bucket_batch_size(seq_len: int, m_mem: float, m_comp: float, p: float) -> int:
    """AdaptiveLoad batch size of a bucket of ``seq_len`` tokens per sample (spec §9):
    ``max(1, min(floor(m_mem / S), floor(m_comp / S^p)))``, evaluated in float64.

    Args:
        seq_len: S, tokens per sample after patchify (>= 1).
        m_mem: memory budget in tokens per batch (> 0).
        m_comp: compute budget in units of S^p per batch (> 0).
        p: compute exponent in (1, 2].

    Warns (UserWarning) when S > m_mem: the returned B = 1 exceeds the memory budget and may run out of memory.
    """
    seq_len = _positive_int(seq_len, "seq_len")
    m_mem = _positive_float(m_mem, "m_mem")
    m_comp = _positive_float(m_comp, "m_comp")
    p = _check_p(p)
    if seq_len > m_mem:
        warnings.warn(
            f"bucket_batch_size: seq_len {seq_len} exceeds the memory budget m_mem = {m_mem:g} tokens; "
            "one sample per batch may run out of memory",
            stacklevel=2,
        )
    by_memory = math.floor(m_mem / seq_len * _FLOOR_SLACK)
    by_compute = math.floor(m_comp / float(seq_len) ** p * _FLOOR_SLACK)
    return max(1, min(by_memory, by_compute))


def calibrate_p(
    seq_lens: Sequence[float], step_times: Sequence[float], weights: Sequence[float] | None = None
) -> float:
    """Fits the compute exponent ``p`` of ``t = kappa * S^p`` to measured step times (spec §9).

    Weighted least squares of ``log t = p log S + log kappa`` (weight bucket frequency, say), clamped to
    ``[1 + 1e-6, 2]``. Measure ``t`` at B = 1 on a grid of S covering the data: with ``t = a*S + c*S^2`` the
    local exponent rises with S, so the fit depends on that range.

    Raises ValueError on length mismatch, non-positive or non-finite values, or fewer than 2 distinct S.
    """
    lens = torch.as_tensor(seq_lens, dtype=torch.float64).reshape(-1)
    times = torch.as_tensor(step_times, dtype=torch.float64).reshape(-1)
    w = torch.ones_like(lens) if weights is None else torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if not lens.numel() == times.numel() == w.numel():
        raise ValueError(
            f"calibrate_p: seq_lens, step_times and weights differ in length ({lens.numel()}, {times.numel()}, "
            f"{w.numel()})"
        )
    for name, values in (("seq_lens", lens), ("step_times", times), ("weights", w)):
        if not bool(torch.all(torch.isfinite(values) & (values > 0))):
            raise ValueError(f"calibrate_p: {name} must all be finite and > 0")
    if torch.unique(lens).numel() < 2:
        raise ValueError("calibrate_p: need at least 2 distinct seq_lens to fit an exponent")
    x, y = lens.log(), times.log()
    w = w / w.sum()
    dx = x - (w * x).sum()
    slope = float((w * dx * (y - (w * y).sum())).sum() / (w * dx * dx).sum())
    return min(2.0, max(_P_MIN, slope))


class BucketBatchSampler(Sampler[list[int]], ABC):
    """Base of the bucketed batch samplers: subclasses define :meth:`batch_size` and :attr:`p`.

    Samples are grouped by ``keys`` (default: the token counts; pass latent shapes so batches can be stacked).
    Per epoch, each bucket's indices (shuffled when ``shuffle``) are cut into batches of ``batch_size(S)`` (the
    last may be smaller) and the batch list is shuffled. It is padded to a multiple of ``num_replicas`` by
    repeating batches from its start, so every rank runs the same number of steps and no sample is dropped.
    Batches are then dealt into steps of ``num_replicas``: in list order (``balance=False``) or, with
    ``balance=True``, sorted by modelled cost ``len(batch) * S^p`` (descending, ties in list order) so the ranks
    of a step get similar cost, after which the steps are shuffled. Rank ``r`` runs batch ``r`` of every step.

    All randomness comes from ``torch.Generator().manual_seed(seed * 1_000_003 + epoch)``, so every rank
    computes the same plan.
    """

    def __init__(
        self,
        token_counts: Sequence[int],
        keys: Sequence[Hashable] | None,
        *,
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool,
        balance: bool,
    ) -> None:
        counts = _check_counts(token_counts)
        keys = counts if keys is None else list(keys)
        if len(keys) != len(counts):
            raise ValueError(f"keys has {len(keys)} entries but token_counts has {len(counts)}")
        self.num_replicas = _positive_int(num_replicas, "num_replicas")
        rank = operator.index(rank)
        if not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas = {self.num_replicas}), got {rank}")
        self.rank = rank
        self.seed = operator.index(seed)
        self.shuffle = bool(shuffle)
        self.balance = bool(balance)
        self.epoch = 0
        self._token_counts = tuple(counts)

        members: dict[Hashable, list[int]] = {}  # key -> indices, keys in order of first appearance
        for index, key in enumerate(keys):
            try:
                group = members.setdefault(key, [])
            except TypeError:
                raise TypeError(f"keys[{index}] = {key!r} is not hashable (use tuples for shapes)") from None
            if group and counts[group[0]] != counts[index]:
                raise ValueError(
                    f"samples {group[0]} and {index} share the key {key!r} but have {counts[group[0]]} and "
                    f"{counts[index]} tokens"
                )
            group.append(index)
        # (tokens per sample, batch size, indices) per bucket.
        self._buckets = [(counts[group[0]], self.batch_size(counts[group[0]]), group) for group in members.values()]
        num_batches = sum(-(-len(group) // size) for _, size, group in self._buckets)
        self._num_steps = -(-num_batches // self.num_replicas)

    @abstractmethod
    def batch_size(self, seq_len: int) -> int:
        """Samples per batch in a bucket of ``seq_len`` tokens per sample."""

    @property
    @abstractmethod
    def p(self) -> float:
        """Exponent of the cost model ``B * S^p`` used by ``balance``."""

    @property
    def token_counts(self) -> tuple[int, ...]:
        """Tokens per sample, by dataset index."""
        return self._token_counts

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch that :meth:`__iter__` runs (call it before each epoch, as with DistributedSampler)."""
        self.epoch = operator.index(epoch)

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's batches of every rank: ``plan[step][rank]`` is a list of dataset indices."""
        # Reduced mod 2^64 because manual_seed rejects values outside the 64-bit range.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + operator.index(epoch)) % (1 << 64))
        batches: list[list[int]] = []
        costs: list[float] = []
        for seq_len, size, group in self._buckets:
            if self.shuffle:
                group = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(group), size):
                batch = group[start : start + size]
                batches.append(batch)
                costs.append(len(batch) * float(seq_len) ** self.p)
        if self.shuffle:
            order = torch.randperm(len(batches), generator=generator).tolist()
            batches, costs = [batches[j] for j in order], [costs[j] for j in order]
        count, ranks = len(batches), self.num_replicas
        for j in range(-count % ranks):  # pad with batches from the start (cyclically when count < ranks)
            batches.append(batches[j % count])
            costs.append(costs[j % count])
        order = list(range(len(batches)))
        if self.balance:
            order.sort(key=lambda j: -costs[j])  # stable: equal costs keep the shuffled order
        steps = [[list(batches[j]) for j in order[s : s + ranks]] for s in range(0, len(order), ranks)]
        if self.balance and self.shuffle:
            steps = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()]
        return steps

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order."""
        return [step[self.rank] for step in self.plan(epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return self._num_steps


class AdaptiveLoadSampler(BucketBatchSampler):
    """Bucketed batches sized by :func:`bucket_batch_size` (AdaptiveLoad, spec §9).

    Args:
        token_counts: tokens per sample after patchify, by dataset index.
        keys: bucket key per sample (e.g. the latent shape); samples of one key must have equal token counts.
            Default: the token counts.
        m_mem: memory budget in tokens per batch.
        m_comp: compute budget in units of S^p; default ``max(token_counts)^p`` (the longest bucket runs at
            B = 1 and sets the step time).
        p: compute exponent in (1, 2] (see :func:`calibrate_p`).
        num_replicas, rank: data-parallel world size and this process's rank.
        seed, shuffle, balance: see :class:`BucketBatchSampler`.
    """

    def __init__(
        self,
        token_counts: Sequence[int],
        keys: Sequence[Hashable] | None = None,
        *,
        m_mem: float,
        m_comp: float | None = None,
        p: float = 1.5,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        balance: bool = True,
    ) -> None:
        counts = _check_counts(token_counts)
        self.m_mem = _positive_float(m_mem, "m_mem")
        self._p = _check_p(p)
        self.m_comp = _positive_float(float(max(counts)) ** self._p if m_comp is None else m_comp, "m_comp")
        super().__init__(
            counts, keys, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle, balance=balance
        )

    def batch_size(self, seq_len: int) -> int:
        """``bucket_batch_size(seq_len, m_mem, m_comp, p)``."""
        return bucket_batch_size(seq_len, self.m_mem, self.m_comp, self._p)

    @property
    def p(self) -> float:
        """The compute exponent of the batch-size rule and of the balancing cost model."""
        return self._p


class EqualTokenSampler(BucketBatchSampler):
    """Baseline: bucketed batches of about ``tokens_per_batch`` tokens, ``B = max(1, tokens_per_batch // S)``.

    Same arguments and plan as :class:`AdaptiveLoadSampler`; its cost model is tokens (``p = 1``), so
    ``balance=True`` only separates full batches from bucket tails.
    """

    def __init__(
        self,
        token_counts: Sequence[int],
        keys: Sequence[Hashable] | None = None,
        *,
        tokens_per_batch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        balance: bool = False,
    ) -> None:
        self.tokens_per_batch = _positive_int(tokens_per_batch, "tokens_per_batch")
        super().__init__(
            token_counts, keys, num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle, balance=balance
        )

    def batch_size(self, seq_len: int) -> int:
        """``max(1, tokens_per_batch // seq_len)``; warns when one sample exceeds ``tokens_per_batch``."""
        seq_len = _positive_int(seq_len, "seq_len")
        if seq_len > self.tokens_per_batch:
            warnings.warn(
                f"EqualTokenSampler: seq_len {seq_len} exceeds tokens_per_batch = {self.tokens_per_batch}; "
                "one sample per batch may run out of memory",
                stacklevel=2,
            )
        return max(1, self.tokens_per_batch // seq_len)

    @property
    def p(self) -> float:
        """1.0: equal-token batching models cost as tokens."""
        return 1.0


def imbalance_rate(step_times: Any) -> float:
    """Load imbalance of data-parallel steps: the mean over steps of ``(max - mean) / mean`` of the ranks' times.

    ``step_times`` is ``[steps, ranks]`` (tensor, array or list of lists) of non-negative times; every step
    needs a positive mean. 0 means perfectly balanced; 0.39 means the slowest rank took 39 % above the average.
    """
    times = torch.as_tensor(step_times, dtype=torch.float64)
    if times.dim() != 2 or times.numel() == 0:
        raise ValueError(f"step_times must be a non-empty [steps, ranks] array, got shape {tuple(times.shape)}")
    if not bool(torch.all(torch.isfinite(times) & (times >= 0))):
        raise ValueError("step_times must be finite and >= 0")
    mean = times.mean(dim=1)
    if not bool(torch.all(mean > 0)):
        raise ValueError("every step needs a positive mean time")
    return float(((times.amax(dim=1) - mean) / mean).mean())


def plan_imbalance(sampler: BucketBatchSampler, cost: Callable[[int, int], float], epoch: int = 0) -> float:
    """:func:`imbalance_rate` of ``sampler``'s plan for ``epoch`` with a rank's step time ``cost(B, S)`` for its
    batch of B samples of S tokens (e.g. :func:`step_time_model`)."""
    counts = sampler.token_counts
    return imbalance_rate([[cost(len(batch), counts[batch[0]]) for batch in step] for step in sampler.plan(epoch)])


def step_time_model(a: float, c: float, t0: float = 0.0) -> Callable[[int, int], float]:
    """Step time model ``cost(B, S) = t0 + B * (a*S + c*S^2)``: per-token (linear layers) and per-token-pair
    (attention) cost plus a fixed overhead. ``a``, ``c``, ``t0`` >= 0, ``a + c`` > 0."""
    a, c, t0 = float(a), float(c), float(t0)
    if not all(math.isfinite(v) and v >= 0 for v in (a, c, t0)) or a + c <= 0:
        raise ValueError(f"step_time_model needs finite a, c, t0 >= 0 with a + c > 0, got {a}, {c}, {t0}")

    def cost(batch: int, seq_len: int) -> float:
        return t0 + batch * (a * seq_len + c * seq_len * seq_len)

    return cost
