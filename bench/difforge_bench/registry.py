"""What a benchmark family declares: its shapes and, per (device, shape), its cases.

A case pairs our op with its baselines on one set of inputs and says how many bytes (or FLOPs)
an ideal implementation moves, so every implementation's time turns into the same GB/s scale.
Families live in ``difforge_bench/families/`` (see its ``__init__`` for how to add one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# An implementation factory gets the case's inputs and returns the zero-argument callable that
# is timed. Building it (e.g. wrapping with torch.compile) is not timed; its first calls are
# warm-up, so compilation stays out of the measurement.
Inputs = Mapping[str, Any]
Impl = Callable[[Inputs], Callable[[], object]]


@dataclass(frozen=True)
class Unavailable:
    """A baseline that cannot run here, and why (shown in the table instead of a time)."""

    reason: str


@dataclass(frozen=True)
class Shape:
    name: str
    dims: Mapping[str, int]
    note: str
    devices: tuple[str, ...] = ("cpu", "cuda")  # default runs on these devices include it
    quick: bool = False  # part of the --quick smoke set

    def describe(self) -> str:
        dims = " ".join(f"{k}={v:,}" for k, v in self.dims.items())
        return f"{dims}, {self.note}"


@dataclass(frozen=True)
class Case:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    config: Mapping[str, str]  # what else varies, e.g. {"norm": "layernorm", "dtype": "bf16"}
    shape: Shape
    make_inputs: Callable[[str], Inputs]  # device -> tensors shared by all implementations
    ours: Impl | Unavailable
    baselines: Mapping[str, Impl | Unavailable]
    bytes_moved: int | None = None  # the byte model, for GB/s (memory-bound ops)
    flops: int | None = None  # the FLOP model, for TFLOP/s (compute-bound ops)

    def label(self) -> str:
        return " ".join([self.op, self.mode, *self.config.values(), self.shape.name])


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    shapes: tuple[Shape, ...]
    cases: Callable[[str, Shape], list[Case]]  # (device, shape) -> cases; cheap, allocates nothing
    notes: tuple[str, ...] = ()  # byte-model caveats etc., printed once

    def select_shapes(self, device: str, quick: bool, names: list[str] | None) -> list[Shape]:
        if names:
            return [s for s in self.shapes if s.name in names]
        if quick:
            return [s for s in self.shapes if s.quick]
        return [s for s in self.shapes if device in s.devices]


def all_families() -> dict[str, Family]:
    from difforge_bench.families import MODULES

    found = {}
    for module_name in MODULES:
        family = importlib.import_module(f"difforge_bench.families.{module_name}").FAMILY
        found[family.name] = family
    return found
