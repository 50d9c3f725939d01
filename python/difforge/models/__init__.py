"""Models built on difforge.nn: a Wan-style video DiT and a small discrete-diffusion transformer."""

from difforge.models.discrete_transformer import DiscreteTransformer, DiscreteTransformerConfig
from difforge.models.video_dit import CONFIGS, VideoDiT, VideoDiTConfig, sinusoidal_embedding, video_dit_config

__all__ = [
    "CONFIGS",
    "DiscreteTransformer",
    "DiscreteTransformerConfig",
    "VideoDiT",
    "VideoDiTConfig",
    "sinusoidal_embedding",
    "video_dit_config",
]
