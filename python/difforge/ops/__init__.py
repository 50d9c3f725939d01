"""Typed wrappers of torch.ops.difforge.*, one module per op family."""

from difforge.ops.norm import adaln_modulate, gated_adaln_modulate

__all__ = ["adaln_modulate", "gated_adaln_modulate"]
