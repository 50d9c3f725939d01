"""torch.nn modules built on difforge.ops."""

from difforge.nn.chunk_cache import CacheSpec, ChunkKVCache, DenseKVCache
from difforge.nn.dit_block import CrossAttention, FrameModulation, HybridDiTBlock, ModulatedNorm, PendingResidual
from difforge.nn.formats import (
    DEFAULT_SKIP_PATTERNS,
    HiF8Linear,
    NVFP4Linear,
    QuantizationReport,
    quantize_linears,
)
from difforge.nn.kvcache import FrameLayout, QuantizedKVCache
from difforge.nn.norm import AdaLNModulate
from difforge.nn.rope import apply_rope, rope_angles_3d, rope_split
from difforge.nn.skiparse import SequenceLayout, SkiparseAttention, SkiparseLayout, dual_end_schedule

__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "AdaLNModulate",
    "CacheSpec",
    "ChunkKVCache",
    "DenseKVCache",
    "CrossAttention",
    "FrameModulation",
    "HybridDiTBlock",
    "ModulatedNorm",
    "PendingResidual",
    "FrameLayout",
    "HiF8Linear",
    "NVFP4Linear",
    "QuantizationReport",
    "QuantizedKVCache",
    "SequenceLayout",
    "SkiparseAttention",
    "SkiparseLayout",
    "apply_rope",
    "dual_end_schedule",
    "quantize_linears",
    "rope_angles_3d",
    "rope_split",
]
