"""Autograd registration shared by the op families."""

from __future__ import annotations

import torch


def forbid_backward(op: str, message: str) -> None:
    """Registers an autograd formula for ``op`` that raises ``message`` when a backward reaches it, instead
    of silently returning no gradient. The forward runs as usual, also on inputs that require grad."""

    def backward(ctx, *grads):
        raise RuntimeError(f"difforge: {message}")

    def setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def forbid_double_backward(backward_op: str, forward_names: str) -> None:
    """Makes a backward op raise a clear error when differentiated (a double backward through
    ``forward_names``)."""
    forbid_backward(backward_op, f"double backward through {forward_names} is not supported")
