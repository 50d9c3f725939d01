"""Exponential moving average of a model's parameters (kept in float32, updated after each optimizer step)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` for every parameter, by name.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so early averages are not
    dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the averaged weights into ``model`` (e.g. a copy used for sampling)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])
