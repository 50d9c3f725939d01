"""Samplers of continuous flow-matching models: Euler / Heun ODE with classifier-free guidance (:mod:`.ode`),
full-sequence and chunk-wise autoregressive video sampling over a (quantized) KV cache (:mod:`.autoregressive`),
and the Flow-GRPO SDE step with log-probabilities for RL (:mod:`.sde`)."""

from difforge.nn.chunk_cache import CacheSpec
from difforge.samplers.continuous.autoregressive import VideoSample, sample_video
from difforge.samplers.continuous.ode import SAMPLERS, flow_timesteps, guided, integrate

__all__ = ["SAMPLERS", "CacheSpec", "VideoSample", "flow_timesteps", "guided", "integrate", "sample_video"]
