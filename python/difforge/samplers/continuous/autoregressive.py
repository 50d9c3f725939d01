"""Video sampling with a flow-matching :class:`~difforge.models.VideoDiT`: the whole clip at once, or chunk-wise
autoregressive over per-block KV caches (Self-Forcing / CausVid's causal schedule).

Chunk-wise: the clip's latent frames are split into chunks of ``chunk`` frames. Chunk c is integrated from its own
noise with every block attending to the caches of chunks < c and to itself; then one call at t = 0 on the clean
chunk commits its keys/values (the last chunk is not committed: nothing reads it). With classifier-free guidance the
conditional and unconditional streams are batched and each keeps its own cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from difforge.nn.chunk_cache import CacheSpec, ChunkKVCache
from difforge.samplers.continuous.ode import flow_timesteps, guided, integrate


@dataclass
class VideoSample:
    """A sampled batch ``video [B, C, T, H, W]``, the model calls it took (``nfe``, per sample, guidance batched)
    and, chunk-wise, the cache's bytes (:meth:`ChunkKVCache.memory`)."""

    video: Tensor
    nfe: int
    cache_bytes: dict[str, int] | None = None


@torch.no_grad()
def sample_video(
    model,
    noise: Tensor,
    context: Tensor,
    *,
    steps: int,
    sampler: str = "euler",
    shift: float = 1.0,
    cfg: float = 1.0,
    null_context: Tensor | None = None,
    chunk: int | None = None,
    cache: CacheSpec | None = None,
) -> VideoSample:
    """Samples ``noise [B, C, T, H, W]`` (t = 1) to t = 0 under the condition ``context``.

    Args:
        steps, sampler, shift: the ODE grid (:func:`flow_timesteps`) and integrator (``"euler"`` / ``"heun"``).
        cfg: guidance scale; != 1 needs ``null_context`` (zeros of the context's shape by default).
        chunk: latent frames per autoregressive chunk (a multiple of the temporal patch dividing T); None samples
            the clip at once with full attention.
        cache: the KV cache of the chunk-wise mode (bits, Jensen correction, sinks, window); unquantized when None.
    """
    if cfg != 1.0 and null_context is None:
        null_context = torch.zeros_like(context)
    times = flow_timesteps(steps, shift, device=noise.device)
    if chunk is None:
        velocity = guided(model, context, null_context, cfg)
        video, nfe = integrate(velocity, noise, times, sampler)
        return VideoSample(video, nfe)

    T, pt = noise.shape[2], model.config.patch[0]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk % pt or T % chunk:
        raise ValueError(
            f"chunk must be a positive multiple of the temporal patch ({pt}) dividing the {T} latent frames, "
            f"got {chunk!r}"
        )
    kv = ChunkKVCache(cache)
    both = context if cfg == 1.0 else torch.cat([context, null_context])
    chunks, nfe = [], 0
    for start in range(0, T, chunk):
        offset = start // pt

        def velocity(x: Tensor, t: Tensor, ctx: Tensor, offset: int = offset) -> Tensor:
            return model.forward_chunk(x, t, ctx, kv, frame_offset=offset)

        x0, calls = integrate(guided(velocity, context, null_context, cfg), noise[:, :, start : start + chunk], times,
                              sampler)  # fmt: skip
        nfe += calls
        if start + chunk < T:
            clean = x0 if cfg == 1.0 else torch.cat([x0, x0])
            model.forward_chunk(clean, clean.new_zeros(clean.shape[0]), both, kv, frame_offset=offset, commit=True)
            nfe += 1
        chunks.append(x0)
    return VideoSample(torch.cat(chunks, 2), nfe, kv.memory())
