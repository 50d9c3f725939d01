"""Chunk-wise autoregressive video sampling over per-block KV caches (difforge.samplers.continuous.autoregressive),
against a full recomputation of the same block-causal schedule written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difforge.models import VideoDiT, video_dit_config
from difforge.nn.chunk_cache import CacheSpec
from difforge.pipelines.media import psnr
from difforge.samplers.continuous import flow_timesteps, sample_video


def _model(attention: str, seed: int = 0) -> VideoDiT:
    torch.manual_seed(seed)
    full_blocks = 0 if attention == "hybrid" else 4
    model = VideoDiT(video_dit_config("tiny", attention=attention, depth=4, full_blocks=full_blocks))
    nn.init.normal_(model.head.weight, std=0.3)  # the zero-initialised head would make every video equal its noise
    return model.eval().requires_grad_(False)


def _inputs(frames: int = 6, size: int = 8, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, size, size, generator=g), torch.randn(batch, 8, 32, generator=g)


class BlockCausalRecompute:
    """The reference: every call recomputes the whole prefix, each token attending to its own chunk and earlier
    chunks only (SDPA with a mask), in whatever layout the block runs (rows hold frames one after another)."""

    def __init__(self, frames: int, chunk_frames: int, sink: int = 0, window: int | None = None) -> None:
        self.frames, self.chunk_frames, self.sink, self.window = frames, chunk_frames, sink, window

    def begin(self, **_) -> None:
        pass

    def attend(self, q, k, v, layout):
        length = q.shape[1]
        frame = torch.arange(length) // (length // self.frames)
        block = frame // self.chunk_frames
        mask = block[:, None] >= block[None, :]
        if self.window is not None:  # a rolling cache: sinks and the `window` frames before the query's chunk
            start = block[:, None] * self.chunk_frames
            seen = (frame[None, :] < self.sink) | (frame[None, :] >= start - self.window)
            mask &= seen | (block[:, None] == block[None, :])
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask)
        return out.transpose(1, 2)


def _recomputed_euler(model, noise, context, chunk, steps, **window):
    times = flow_timesteps(steps).tolist()
    clean = noise[:, :, :0]
    for start in range(0, noise.shape[2], chunk):
        x = noise[:, :, start : start + chunk]
        for t, t_next in zip(times[:-1], times[1:]):
            frames = start + chunk
            t_frames = torch.cat([torch.zeros(noise.shape[0], start), torch.full((noise.shape[0], chunk), t)], 1)
            whole = torch.cat([clean, x], 2)
            reference = BlockCausalRecompute(frames, chunk, **window)
            tokens = model.forward_tokens(whole, t_frames, context, kv_cache=reference)
            v = model.unpatchify(tokens, model.grid(whole.shape))[:, :, start:]
            x = x + (t_next - t) * v
        clean = torch.cat([clean, x], 2)
    return clean


@pytest.mark.parametrize("attention", ["full", "hybrid"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_unquantized_cache_equals_full_recomputation(attention, chunk):
    model = _model(attention)
    noise, context = _inputs()
    ar = sample_video(model, noise, context, steps=3, chunk=chunk, cache=CacheSpec(bits=16))
    reference = _recomputed_euler(model, noise, context, chunk, steps=3)
    torch.testing.assert_close(ar.video, reference, rtol=1e-4, atol=1e-4)
    assert ar.nfe == 6 // chunk * 3 + (6 // chunk - 1)  # steps per chunk + a commit per chunk but the last
    # A bidirectional sampler is not the causal schedule: the comparison can fail.
    full = sample_video(model, noise, context, steps=3)
    assert (full.video - reference).abs().max() > 1e-2


def test_seeded_sampling_is_deterministic():
    model = _model("hybrid")
    noise, context = _inputs()
    spec = CacheSpec(bits=2, jensen="taylor2", sink_frames=1, recent_frames=1)
    a = sample_video(model, noise, context, steps=2, chunk=2, cache=spec, sampler="heun", cfg=2.0)
    b = sample_video(model, noise.clone(), context.clone(), steps=2, chunk=2, cache=spec, sampler="heun", cfg=2.0)
    assert torch.equal(a.video, b.video)
    assert a.nfe == 3 * 2 * 2 + 2


def test_int8_cache_is_close_and_int2_further():
    model = _model("full")
    noise, context = _inputs(frames=8)
    reference = sample_video(model, noise, context, steps=3, chunk=2).video
    errors = {}
    for bits in (8, 2):
        spec = CacheSpec(bits=bits, jensen="none", sink_frames=1, recent_frames=0)
        errors[bits] = psnr(sample_video(model, noise, context, steps=3, chunk=2, cache=spec).video, reference)
    assert bool((errors[8] > 45).all()), errors
    assert bool((errors[2] < errors[8] - 10).all()), errors


def test_cache_bytes_follow_the_layout():
    model = _model("full")
    noise, context = _inputs(frames=8, batch=1)
    spec = CacheSpec(bits=4, sink_frames=1, recent_frames=2)
    sample = sample_video(model, noise, context, steps=1, chunk=2, cache=spec)
    c = model.config
    tokens_per_frame, blocks = 4 * 4, c.depth
    bf16_frame = 2 * tokens_per_frame * c.dim * 2  # K and V, bf16
    # 6 committed frames: 1 sink + 2 window unquantized, 3 quantized at 4 bits + fp16 step and zero per 16 channels
    quantized_frame = 2 * tokens_per_frame * c.num_heads * (c.head_dim * 4 // 8 + 2 * (c.head_dim // 16) * 2)
    stored = blocks * (3 * bf16_frame + 3 * quantized_frame)
    assert sample.cache_bytes == {"stored": stored, "bf16": blocks * 6 * bf16_frame}


def test_bad_arguments():
    model = _model("hybrid")
    noise, context = _inputs()
    with pytest.raises(ValueError, match="chunk must be"):
        sample_video(model, noise, context, steps=1, chunk=4)
    with pytest.raises(ValueError, match="bits"):
        CacheSpec(bits=3)
    with pytest.raises(ValueError, match="jensen"):
        CacheSpec(jensen="cubic")
    padded, context = _inputs(size=12)  # latent 12 -> grid 6, not a multiple of P^2 = 4
    with pytest.raises(ValueError, match="multiples of P\\^2"):
        sample_video(model, padded, context, steps=1, chunk=2)


@pytest.mark.parametrize("attention", ["full", "hybrid"])
def test_block_causal_model_matches_the_masked_reference_with_gradients(attention):
    torch.manual_seed(0)
    full_blocks = 0 if attention == "hybrid" else 4
    config = video_dit_config("tiny", attention=attention, depth=4, full_blocks=full_blocks, causal_chunk=2)
    model = VideoDiT(config)
    nn.init.normal_(model.head.weight, std=0.3)
    latents, context = _inputs(frames=6)
    t = torch.rand(2, 6)
    ours = model(latents, t, context)
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    tokens = model.forward_tokens(latents, t, context, kv_cache=BlockCausalRecompute(6, 2))
    reference = model.unpatchify(tokens, model.grid(latents.shape))
    reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Frames of the first chunk do not see later frames: changing frame 5 leaves them unchanged.
    changed = latents.clone()
    changed[:, :, 5] += 1
    torch.testing.assert_close(model(changed, t, context)[:, :, :4], ours[:, :, :4], rtol=0, atol=0)
    assert (model(changed, t, context)[:, :, 4:] - ours[:, :, 4:]).abs().max() > 1e-3


def test_causal_model_chunkwise_sampling_equals_recomputation():
    torch.manual_seed(0)
    model = VideoDiT(video_dit_config("tiny", depth=4, causal_chunk=2)).eval().requires_grad_(False)
    nn.init.normal_(model.head.weight, std=0.3)
    noise, context = _inputs()
    chunkwise = sample_video(model, noise, context, steps=3, chunk=2)
    reference = _recomputed_euler(model, noise, context, 2, steps=3)
    torch.testing.assert_close(chunkwise.video, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 2])
def test_rolling_unquantized_cache_equals_windowed_recomputation(chunk):
    model = _model("full")
    noise, context = _inputs(frames=8)
    spec = CacheSpec(bits=16, sink_frames=1, recent_frames=1, max_frames=4)  # the sink + the 3 latest frames
    rolling = sample_video(model, noise, context, steps=2, chunk=chunk, cache=spec)
    reference = _recomputed_euler(model, noise, context, chunk, steps=2, sink=1, window=3)
    torch.testing.assert_close(rolling.video, reference, rtol=1e-4, atol=1e-4)
    unbounded = sample_video(model, noise, context, steps=2, chunk=chunk)
    assert (unbounded.video - rolling.video).abs().max() > 1e-3  # eviction changed what late chunks see
