"""torch.nn modules built on difforge.ops."""

from difforge.nn.formats import (
    DEFAULT_SKIP_PATTERNS,
    HiF8Linear,
    NVFP4Linear,
    QuantizationReport,
    quantize_linears,
)
from difforge.nn.kvcache import FrameLayout, QuantizedKVCache
from difforge.nn.norm import AdaLNModulate

__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "AdaLNModulate",
    "FrameLayout",
    "HiF8Linear",
    "NVFP4Linear",
    "QuantizationReport",
    "QuantizedKVCache",
    "quantize_linears",
]
