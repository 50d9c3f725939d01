"""Typed wrappers of torch.ops.difforge.*, one module per op family."""

from difforge.ops.attention import flash_attention
from difforge.ops.kvcache import (
    effective_bits,
    hadamard_rotate,
    kv_dequantize,
    kv_quantize,
    quantized_kv_attention,
)
from difforge.ops.norm import adaln_modulate, gated_adaln_modulate

__all__ = [
    "adaln_modulate",
    "effective_bits",
    "flash_attention",
    "gated_adaln_modulate",
    "hadamard_rotate",
    "kv_dequantize",
    "kv_quantize",
    "quantized_kv_attention",
]
