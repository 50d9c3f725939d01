"""Autograd registration shared by the op families."""

from __future__ import annotations

import torch


def forbid_double_backward(backward_op: str, forward_names: str) -> None:
    """Registers an autograd formula for ``backward_op`` that raises a clear error when differentiated
    (a double backward through ``forward_names``) instead of silently returning no gradient."""

    def backward(ctx, *grads):
        raise RuntimeError(f"difforge: double backward through {forward_names} is not supported")

    def setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(backward_op, backward, setup_context=setup_context)
