"""Turn a forward function into the timed callable of a mode: forward only, or forward then backward.

A forward takes the case's inputs and returns a tensor or a tuple of tensors. For ``fwd+bwd`` the
inputs hold leaves with ``requires_grad`` and ``grad_outputs`` (one per output); the backward is
``torch.autograd.grad``, so gradients never accumulate across repeats and nothing needs zeroing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difforge_bench.registry import Impl, Inputs

FWD = "fwd"
FWD_BWD = "fwd+bwd"
MODES = (FWD, FWD_BWD)

Forward = Callable[[Inputs], object]


def timed(forward: Forward, mode: str) -> Impl:
    def build(inputs: Inputs) -> Callable[[], object]:
        if mode == FWD:
            return lambda: forward(inputs)
        leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        grad_outputs = inputs["grad_outputs"]

        def forward_backward() -> object:
            outputs = forward(inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            return torch.autograd.grad(outputs, leaves, grad_outputs)

        return forward_backward

    return build


def compiled(forward: Forward, mode: str) -> Impl:
    """torch.compile of ``forward``; compilation happens in the timer's warm-up calls."""

    def build(inputs: Inputs) -> Callable[[], object]:
        # Fresh dynamo state per case: otherwise shapes and dtypes of earlier cases count against the
        # recompile limit (silent fallback to eager) and turn on dynamic-shape graphs.
        torch._dynamo.reset()
        return timed(torch.compile(forward, dynamic=False), mode)(inputs)

    return build
