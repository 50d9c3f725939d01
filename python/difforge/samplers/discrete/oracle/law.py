"""Exact law propagation: a chain whose state is the law of the whole sequence over every state of a small
alphabet^L space, moved by the exact kernel of each sampler step (spec §8.5). No Monte-Carlo noise.

The network is called once per step on all states at once (a batch of M = alphabet^L rows), so NFE counts as in
sampling. A factorized step has kernel K(x, y) = prod_i k_i(y_i | x); a random-scan step on k uniformly chosen
positions is the average of such kernels over the k-subsets.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from difforge.samplers.discrete.context import NotExact
from difforge.samplers.discrete.metrics import index_states
from difforge.samplers.discrete.steps import RandomPositions, Step

MAX_STATES = 4096


class LawChain:
    """``x`` is every state (fixed); ``law`` [M] float64 is what a sampler run has made of the initial law."""

    exact = True
    seed = 0

    def __init__(self, law: Tensor, length: int, alphabet: int, device=None):
        num_states = alphabet**length
        if num_states > MAX_STATES:
            raise NotExact(f"{alphabet}^{length} = {num_states} states: exact propagation stops at {MAX_STATES}")
        if law.shape != (num_states,):
            raise ValueError(f"the initial law must have {num_states} entries, got {tuple(law.shape)}")
        self.alphabet, self.length = alphabet, length
        self.x = index_states(num_states, length, alphabet).to(device)
        self.law = law.double().to(device)
        self.offsets = itertools.count()

    def apply(self, step: Step, positions: RandomPositions | Tensor | None = None) -> None:
        probs = step.probs(self.alphabet)  # [M, L, A]: k_i(y_i | x)
        if positions is None:
            self.law = self._moved(probs, tuple(range(self.length)))
        elif isinstance(positions, RandomPositions):
            subsets = list(itertools.combinations(range(self.length), positions.k))
            self.law = sum(self._moved(probs, s) for s in subsets) / len(subsets)
        else:
            raise NotExact("a data-dependent choice of positions has no exact factorized kernel")

    def select(self, *args, **kwargs) -> Tensor:
        raise NotExact("position selection by key depends on the sampled values; use Monte-Carlo")

    def _moved(self, probs: Tensor, subset: tuple[int, ...]) -> Tensor:
        """law K_S for the kernel that redraws the positions in S: K_S(x, y) = prod_{i in S} k_i(y_i | x) when
        y agrees with x outside S. Built as T[x, y_S] = law(x) prod k_i(y_i | x), summed over x_S: M A^|S| work."""
        states, a, k = len(self.law), self.alphabet, len(subset)
        t = self.law.reshape(states, *([1] * k))
        for j, i in enumerate(subset):
            t = t * probs[:, i, :].reshape(states, *[a if jj == j else 1 for jj in range(k)])
        t = t.reshape(*([a] * self.length), *([a] * k)).sum(dim=subset)
        # axes now: x at the positions outside S (in order), then y_S; put each y_i back at position i
        kept = [p for p in range(self.length) if p not in subset]
        order = [kept.index(p) if p in kept else len(kept) + subset.index(p) for p in range(self.length)]
        return t.permute(order).reshape(states)
