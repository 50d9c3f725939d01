"""Models built on difforge.nn: a Wan-style video DiT."""

from difforge.models.video_dit import CONFIGS, VideoDiT, VideoDiTConfig, sinusoidal_embedding, video_dit_config

__all__ = ["CONFIGS", "VideoDiT", "VideoDiTConfig", "sinusoidal_embedding", "video_dit_config"]
