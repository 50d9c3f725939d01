"""torch.nn modules built on difforge.ops."""

from difforge.nn.kvcache import FrameLayout, QuantizedKVCache
from difforge.nn.norm import AdaLNModulate

__all__ = ["AdaLNModulate", "FrameLayout", "QuantizedKVCache"]
