"""One sampler update, described once and used two ways: drawn with the fused kernels (``draw``), or turned
into its exact per-position law (``probs``) for the exact-oracle evaluation. A sampler builds steps and hands
them to a chain (:class:`SampleChain` here, ``oracle.evaluate.LawChain`` for exact law propagation).

Every step is factorized: given the state x, position i's new token is drawn independently from a law that
depends on x (through the network output). ``positions`` restricts an update to some positions per row
(Gibbs sweeps, first hitting, confidence decoding); the others keep their token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from difforge.ops import sampling as ops


class Step(Protocol):
    def draw(self, seed: int, offsets: itertools.count) -> Tensor:
        """The next token of every position ``[B, L]``, with Philox draws at (seed, next(offsets))."""

    def probs(self, alphabet: int) -> Tensor:
        """The law of every position's next token, ``[B, L, alphabet]`` float64."""


def _point_mass(point: Tensor, alphabet: int) -> Tensor:
    return F.one_hot(point, alphabet).double()


def _pad(p: Tensor, alphabet: int) -> Tensor:
    return F.pad(p, (0, alphabet - p.shape[-1]))


def filter_mask(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Which columns the softmax part may draw (top-k: l >= the k-th largest; top-p: the smallest top set of
    softmax(l / T) over the top-k set with mass >= p; ties at a threshold are kept)."""
    keep = logits > -torch.inf
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        keep &= logits >= kth
    if top_p < 1.0:
        scaled = torch.where(keep, logits / temperature, -torch.inf)
        prob = torch.softmax(scaled, dim=-1)
        sorted_l, order = scaled.sort(dim=-1, descending=True)
        mass_through = prob.gather(-1, order).cumsum(-1)
        # the first sorted position whose cumulative mass reaches p sets the threshold value
        first = (mass_through < top_p).sum(-1, keepdim=True).clamp_max(logits.shape[-1] - 1)
        keep &= scaled >= sorted_l.gather(-1, first)
    return keep


@dataclass
class MixtureStep:
    """q(y) = w_p softmax_T(filtered l)(y) + w_u uniform(y) + w_d 1[y = point], with (w_p, w_u, w_d) from
    ``coef`` by ``rule`` (see ``difforge.ops.sampling.discrete_step``)."""

    logits: Tensor  # [B, L, V]
    point: Tensor  # [B, L] int64
    coef: Tensor  # broadcastable to [B, L, 3]
    rule: str = "mixture"
    temperature: float = 1.0
    greedy: bool = False
    top_k: int = 0
    top_p: float = 1.0

    def draw_with_stats(self, seed: int, offsets: itertools.count) -> tuple[Tensor, Tensor]:
        return ops.discrete_step(
            self.logits, self.point, self.coef, rule=self.rule, temperature=self.temperature, greedy=self.greedy,
            top_k=self.top_k, top_p=self.top_p, seed=seed, offset=next(offsets),
        )  # fmt: skip

    def draw(self, seed: int, offsets: itertools.count) -> Tensor:
        return self.draw_with_stats(seed, offsets)[0]

    def only(self, rows: Tensor, x: Tensor) -> MixtureStep:
        """The same step where ``rows`` is set, keeping x elsewhere without reading those rows' logits."""
        if self.rule != "mixture":
            return self
        keep = torch.tensor([0.0, 0.0, 1.0], device=x.device)
        coef = torch.where(rows.unsqueeze(-1), self.coef.expand(*x.shape, 3), keep)
        return replace(self, coef=coef, point=torch.where(rows, self.point, x))

    def weights(self) -> Tensor:
        """(w_p, w_u, w_d) per position, float64 (the rule applied to the coefficients)."""
        logits = self.logits.double()
        shape = logits.shape[:-1]
        coef = self.coef.double().expand(*shape, 3)
        if self.rule == "mixture":
            return coef
        vocab = logits.shape[-1]
        c = coef[..., 0]
        s_excl = torch.where(self._is_point(), -torch.inf, logits).logsumexp(-1).exp()
        if self.rule == "euler":
            jump = (c * s_excl).nan_to_num(1.0).clamp(0.0, 1.0)
            return torch.stack([jump, torch.zeros_like(jump), 1.0 - jump], -1)
        rate = c * s_excl if self.rule == "tau_leap" else c * (s_excl + vocab - 1)
        jump = torch.where(torch.isfinite(rate) & (rate > 0), rate * torch.exp(-rate), torch.zeros_like(rate))
        if self.rule == "tau_leap":
            return torch.stack([jump, torch.zeros_like(jump), 1.0 - jump], -1)
        share = torch.where(torch.isfinite(s_excl), s_excl / (s_excl + vocab - 1), torch.ones_like(s_excl))
        return torch.stack([jump * share, jump * (1.0 - share), 1.0 - jump], -1)

    def probs(self, alphabet: int) -> Tensor:
        logits = self.logits.double()
        vocab = logits.shape[-1]
        exclude = self.rule != "mixture"
        allowed = filter_mask(logits, self.temperature, self.top_k, self.top_p)
        if exclude:
            allowed &= ~self._is_point()
        if self.greedy:
            best = torch.where(allowed, logits, -torch.inf).argmax(-1)
            soft = F.one_hot(best, vocab).double() * allowed.any(-1, keepdim=True)
        else:
            soft = torch.softmax(torch.where(allowed, logits / self.temperature, -torch.inf), -1).nan_to_num(0.0)
        point = _point_mass(self.point, alphabet)
        soft = torch.where(allowed.any(-1, keepdim=True), _pad(soft, alphabet), point)  # nothing allowed: stay
        uniform = torch.ones_like(logits)
        if exclude:
            uniform = uniform.masked_fill(self._is_point(), 0.0)
        uniform = _pad(uniform / uniform.sum(-1, keepdim=True), alphabet)
        w = self.weights()
        w = w / w.sum(-1, keepdim=True)
        return w[..., :1] * soft + w[..., 1:2] * uniform + w[..., 2:] * point

    def _is_point(self) -> Tensor:
        vocab = self.logits.shape[-1]
        cols = torch.arange(vocab, device=self.point.device)
        return cols == self.point.unsqueeze(-1)


@dataclass
class TweedieStep:
    """SEDD's analytic (Tweedie tau-leaping) update of the uniform process from log scores, with
    e = exp(-(sigma_t - sigma_s)) per row (see ``difforge.ops.sampling.tweedie_step``)."""

    log_score: Tensor  # [B, L, N]
    current: Tensor  # [B, L]
    e: Tensor  # [B]

    def draw(self, seed: int, offsets: itertools.count) -> Tensor:
        e = self.e.reshape(-1, 1).expand_as(self.current)
        return ops.tweedie_step(self.log_score, self.current, e, seed=seed, offset=next(offsets))

    def probs(self, alphabet: int) -> Tensor:
        s = torch.softmax(self.log_score.double(), -1)  # scores up to a per-row factor, which cancels
        n = s.shape[-1]
        e = self.e.double().reshape(-1, 1, 1)
        current = F.one_hot(self.current, n).double()
        p = (s / e + (e - 1.0) / (n * e)) * ((1.0 - e) / n + e * current)
        p = p.clamp_min(0.0)
        total = p.sum(-1, keepdim=True)
        p = torch.where(total > 0, p / total, current)
        return _pad(p, alphabet)


@dataclass
class RemaskStep:
    """Each position moves to ``mask_id`` with probability ``prob`` and keeps its token otherwise (ReMDM): a
    Bernoulli draw, made as a two-way race so that it uses the library's Philox stream."""

    x: Tensor  # [B, L]
    prob: Tensor  # [B, L]
    mask_id: int

    def draw(self, seed: int, offsets: itertools.count) -> Tensor:
        p = self.prob.float().clamp(0.0, 1.0)
        logits = torch.stack([torch.log1p(-p), torch.log(p)], -1)
        coef = torch.where((p > 0).unsqueeze(-1), p.new_tensor([1.0, 0.0, 0.0]), p.new_tensor([0.0, 0.0, 1.0]))
        to_mask, _ = ops.discrete_step(logits, torch.zeros_like(self.x), coef, seed=seed, offset=next(offsets))
        return torch.where(to_mask == 1, self.mask_id, self.x)

    def probs(self, alphabet: int) -> Tensor:
        p = self.prob.double().clamp(0.0, 1.0).unsqueeze(-1)
        return (1.0 - p) * _point_mass(self.x, alphabet) + p * _point_mass(torch.full_like(self.x, self.mask_id), alphabet)


@dataclass
class WhereStep:
    """``a`` where ``cond`` [B, L] holds, ``b`` elsewhere."""

    cond: Tensor
    a: Step
    b: Step

    def draw(self, seed: int, offsets: itertools.count) -> Tensor:
        return torch.where(self.cond, self.a.draw(seed, offsets), self.b.draw(seed, offsets))

    def probs(self, alphabet: int) -> Tensor:
        return torch.where(self.cond.unsqueeze(-1), self.a.probs(alphabet), self.b.probs(alphabet))


@dataclass(frozen=True)
class RandomPositions:
    """k positions per row, chosen uniformly at random (random-scan Gibbs: k = 1 is exact)."""

    k: int


class SampleChain:
    """Runs a sampler by drawing: the state is a batch of sequences."""

    exact = False

    def __init__(self, x: Tensor, seed: int):
        self.x, self.seed = x, seed
        self.offsets = itertools.count()

    def apply(self, step: Step, positions: RandomPositions | Tensor | None = None) -> None:
        if positions is None:
            self.x = step.draw(self.seed, self.offsets)
            return
        if isinstance(positions, RandomPositions):
            positions = self.select(torch.zeros(self.x.shape, device=self.x.device), positions.k, gumbel_tau=1.0)
        if isinstance(step, MixtureStep):
            step = step.only(positions, self.x)
        self.x = torch.where(positions, step.draw(self.seed, self.offsets), self.x)

    def select(
        self,
        key: Tensor,
        k: int | Tensor,
        *,
        gumbel_tau: float = 0.0,
        eligible: Tensor | None = None,
        threshold: float | None = None,
    ) -> Tensor:
        """The top-k positions of each row by key (+ Gumbel noise when gumbel_tau > 0: with equal keys, a uniformly
        random k-subset), united with {key >= threshold}; see ``difforge.ops.sampling.select_positions``."""
        eligible = torch.ones_like(self.x, dtype=torch.bool) if eligible is None else eligible
        return ops.select_positions(
            key.float().contiguous(), eligible, k, threshold=threshold, gumbel_tau=gumbel_tau, seed=self.seed,
            offset=next(self.offsets),
        )  # fmt: skip
