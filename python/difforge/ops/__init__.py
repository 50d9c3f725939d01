"""Typed wrappers of torch.ops.difforge.*, one module per op family."""

from difforge.ops.attention import flash_attention
from difforge.ops.formats import (
    hadamard16,
    hif8_decode,
    hif8_encode,
    hif8_fake_quantize,
    hif8_linear,
    hif8_quantize,
    hif8_quantize_e4m3,
    nvfp4_dequantize,
    nvfp4_linear,
    nvfp4_per_tensor_scale,
    nvfp4_quantize,
    random_hadamard_transform16,
)
from difforge.ops.kvcache import (
    effective_bits,
    hadamard_rotate,
    kv_dequantize,
    kv_quantize,
    quantized_kv_attention,
)
from difforge.ops.norm import adaln_modulate, gated_adaln_modulate
from difforge.ops.sampling import discrete_step, select_positions, tweedie_step
from difforge.ops.skiparse import (
    skiparse_attention,
    skiparse_exchange_receive,
    skiparse_exchange_send,
    skiparse_groups,
    skiparse_rearrange,
    skiparse_restore,
    skiparse_seq_len,
    skiparse_seqlens,
    skiparse_switch,
)

__all__ = [
    "adaln_modulate",
    "discrete_step",
    "effective_bits",
    "flash_attention",
    "gated_adaln_modulate",
    "hadamard16",
    "hadamard_rotate",
    "hif8_decode",
    "hif8_encode",
    "hif8_fake_quantize",
    "hif8_linear",
    "hif8_quantize",
    "hif8_quantize_e4m3",
    "kv_dequantize",
    "kv_quantize",
    "nvfp4_dequantize",
    "nvfp4_linear",
    "nvfp4_per_tensor_scale",
    "nvfp4_quantize",
    "quantized_kv_attention",
    "random_hadamard_transform16",
    "select_positions",
    "skiparse_attention",
    "skiparse_exchange_receive",
    "skiparse_exchange_send",
    "skiparse_groups",
    "skiparse_rearrange",
    "skiparse_restore",
    "skiparse_seq_len",
    "skiparse_seqlens",
    "skiparse_switch",
    "tweedie_step",
]
