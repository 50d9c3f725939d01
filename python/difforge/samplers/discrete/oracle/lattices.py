"""Tabulated oracles with spatial structure: 2D densities on an ``S x S`` grid and a small Potts model."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difforge.samplers.discrete.metrics import MAX_DENSE_STATES, index_states
from difforge.samplers.discrete.oracle.base import random_simplex
from difforge.samplers.discrete.oracle.enumeration import Enumerated

_ARC_POINTS = 128  # points per moon; the density is a Gaussian blur of these


class Grid2D(Enumerated):
    """A density on an ``S x S`` grid as a law over sequences of length 2 over ``S`` tokens: ``x = (row,
    column)``, so state index ``row * S + column`` and ``probs()`` is ``density.flatten()`` normalized."""

    def __init__(self, density: Tensor, name: str = "grid"):
        density = torch.as_tensor(density, dtype=torch.float64)
        if density.dim() != 2 or density.shape[0] != density.shape[1]:
            raise ValueError(f"density must be a square [S, S] tensor, got shape {tuple(density.shape)}")
        super().__init__(density.flatten(), density.shape[0], 2, name=name)

    @classmethod
    def checkerboard(cls, S: int, blocks: int = 4) -> Grid2D:
        """Uniform on the even squares of a ``blocks x blocks`` board laid over the grid, 0 elsewhere."""
        if not 1 <= blocks <= S:
            raise ValueError(f"blocks must be in [1, S = {S}], got {blocks}")
        square = torch.arange(S) * blocks // S
        return cls(((square[:, None] + square[None, :]) % 2 == 0).double(), name="checkerboard")

    @classmethod
    def gaussian_mixture(
        cls, S: int, generator: torch.Generator | None = None, components: int = 8, width: float | None = None
    ) -> Grid2D:
        """Isotropic Gaussians (standard deviation ``width`` cells, default ``S / 16``) with centres uniform in the
        middle 70% of the grid and Dirichlet(2) weights, evaluated at the cell centres."""
        width = S / 16 if width is None else width
        centres = (0.15 + 0.7 * torch.rand(components, 2, generator=generator, dtype=torch.float64)) * S
        weights = random_simplex((components,), 2.0, generator)
        cell = torch.arange(S, dtype=torch.float64) + 0.5
        rows, cols = cell[None, :, None] - centres[:, 0, None, None], cell[None, None, :] - centres[:, 1, None, None]
        dist2 = rows**2 + cols**2
        return cls((weights[:, None, None] * torch.exp(-dist2 / (2 * width**2))).sum(0), name="gaussian_mixture")

    @classmethod
    def two_moons(cls, S: int, noise: float = 0.1) -> Grid2D:
        """The two interleaved half circles ``(cos t, sin t)`` and ``(1 - cos t, 1/2 - sin t)``, t in [0, pi],
        blurred by a Gaussian of standard deviation ``noise`` (data units); the grid spans 3.6 x 3.6 data units
        around the pair (row 0 at the top)."""
        t = torch.linspace(0.0, math.pi, _ARC_POINTS, dtype=torch.float64)
        arc = torch.cat([torch.stack([t.cos(), t.sin()], -1), torch.stack([1 - t.cos(), 0.5 - t.sin()], -1)])
        offsets = (torch.arange(S, dtype=torch.float64) + 0.5 - S / 2) * (3.6 / S)
        x, y = 0.5 + offsets, 0.25 - offsets  # columns run along x, rows down y
        dist2 = (x[None, :, None] - arc[:, 0]) ** 2 + (y[:, None, None] - arc[:, 1]) ** 2
        return cls(torch.exp(-dist2 / (2 * noise**2)).mean(-1), name="two_moons")


class Potts(Enumerated):
    """The q-colour Potts model on a ``side x side`` grid with free boundary, positions in row-major order:
    ``p(x) ∝ exp(coupling * sum_{<ij>} 1[x_i = x_j] + sum_i field_i(x_i))`` over nearest-neighbour pairs.
    ``field`` is None, ``[q]`` (the same at every site) or ``[side * side, q]``. Tabulated (``q^(side^2)``
    states, 19,683 for the default 3 x 3, q = 3), so at most 2**20 of them."""

    def __init__(self, side: int = 3, q: int = 3, coupling: float = 1.0, field: Tensor | None = None):
        if side < 1 or q < 1:
            raise ValueError(f"side and q must be >= 1, got side = {side}, q = {q}")
        length = side * side
        if q**length > MAX_DENSE_STATES:
            raise ValueError(f"q^(side^2) = {q}^{length} states are too many to tabulate ({MAX_DENSE_STATES})")
        states = index_states(q**length, length, q)
        site = torch.arange(length).view(side, side)
        left_right = torch.stack([site[:, :-1].flatten(), site[:, 1:].flatten()], 1)
        up_down = torch.stack([site[:-1].flatten(), site[1:].flatten()], 1)
        edges = torch.cat([left_right, up_down])
        energy = coupling * (states[:, edges[:, 0]] == states[:, edges[:, 1]]).sum(1).double()
        if field is not None:
            field = torch.as_tensor(field, dtype=torch.float64)
            if tuple(field.shape) not in ((q,), (length, q)):
                raise ValueError(f"field must have shape ({q},) or ({length}, {q}), got {tuple(field.shape)}")
            field = field.expand(length, q)
            energy = energy + field[torch.arange(length), states].sum(1)
        super().__init__(torch.softmax(energy, 0), q, length, name="potts")
        self.side, self.coupling = side, coupling
