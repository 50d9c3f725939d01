"""What every sampler method receives: the network, the chain holding the state, the schedule and sizes."""

from __future__ import annotations

from dataclasses import dataclass

from difforge.samplers.discrete.network import Network
from difforge.samplers.discrete.schedules import Schedule


class NotExact(ValueError):
    """The method's law cannot be propagated exactly (it depends on the sampling history or on a data-dependent
    choice of positions); evaluate it by Monte-Carlo instead."""


@dataclass
class Context:
    net: Network
    chain: object  # SampleChain or oracle.evaluate.LawChain: .x, .apply(step, positions), .select(...)
    schedule: Schedule
    steps: int
    vocab_size: int
    mask_id: int

    def alpha(self, t: float) -> float:
        """alpha(t), exactly 1 at t = 0 (the end of every grid is clean data)."""
        return 1.0 if t <= 0.0 else self.schedule.alpha(t)

    def require_sampling(self, method: str) -> None:
        if getattr(self.chain, "exact", False):
            raise NotExact(f"{method}: its law depends on data-dependent position choices; use Monte-Carlo")
