"""Typed wrappers of torch.ops.difforge.*, one module per op family."""

from difforge.ops.attention import flash_attention
from difforge.ops.norm import adaln_modulate, gated_adaln_modulate

__all__ = ["adaln_modulate", "flash_attention", "gated_adaln_modulate"]
