"""``difforge sample``: videos from a trained video DiT, full-sequence or chunk-wise autoregressive over a quantized
KV cache, with the cache's memory and its fidelity against the unquantized cache from the same noise.

Outputs in ``out``: ``frames.png`` (a row per video, a column per latent frame), ``video.gif``, and ``report.json``
(settings, NFE, wall time, KV-cache bytes against bf16, and per Jensen mode none / taylor2 / exact the PSNR and SSIM
of the quantized-cache videos against the unquantized-cache videos).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from difforge.data.synthetic import to_rgb
from difforge.nn.chunk_cache import KV_BITS, CacheSpec
from difforge.ops.kvcache import JENSEN_MODES
from difforge.pipelines import media
from difforge.pipelines.device import synchronize
from difforge.pipelines.video_model import PROMPT_SEED, WEIGHTS, load_video_model, prompts
from difforge.samplers.continuous import SAMPLERS, VideoSample, sample_video


@dataclass
class SampleConfig:
    """What ``difforge sample`` runs (its flags). ``frames`` and ``size`` (latent T and H x W) default to the largest
    clip the model trained on; ``chunk`` None samples the whole clip at once, else latent frames per AR chunk."""

    checkpoint: str
    out: str | None = None
    frames: int | None = None
    size: tuple[int, int] | None = None
    chunk: int | None = None
    kv_bits: int = 16
    jensen: str = "taylor2"
    sink_frames: int = 1
    recent_frames: int = 1
    cache_frames: int | None = None  # frames the cache holds (rolling beyond); None: every committed frame
    weights: str = "bf16"
    steps: int = 16
    sampler: str = "euler"
    shift: float = 1.0
    cfg: float = 1.0
    num: int = 4
    seed: int = 0
    fidelity: bool = True  # quantized cache: also sample with the unquantized cache and every Jensen mode
    device: str | None = None

    def __post_init__(self) -> None:
        checks = [
            ("kv_bits", self.kv_bits in KV_BITS, f"one of {KV_BITS}"),
            ("jensen", self.jensen in JENSEN_MODES, f"one of {JENSEN_MODES}"),
            ("weights", self.weights in WEIGHTS, f"one of {WEIGHTS}"),
            ("sampler", self.sampler in SAMPLERS, f"one of {SAMPLERS}"),
            ("steps", self.steps >= 1, ">= 1"), ("num", self.num >= 1, ">= 1"), ("shift", self.shift > 0, "> 0"),
            ("frames", self.frames is None or self.frames >= 1, ">= 1"),
            ("chunk", self.chunk is None or self.chunk >= 1, ">= 1"),
            ("sink_frames", self.sink_frames >= 0, ">= 0"), ("recent_frames", self.recent_frames >= 0, ">= 0"),
            ("cache_frames", self.cache_frames is None or self.cache_frames > self.sink_frames + self.recent_frames,
             "more than sink_frames + recent_frames"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.chunk is not None and self.frames is not None and self.frames % self.chunk:
            raise ValueError(f"chunk ({self.chunk}) must divide frames ({self.frames})")

    def cache_spec(self, bits: int | None = None, jensen: str | None = None, max_frames: int = 64) -> CacheSpec:
        return CacheSpec(
            bits=self.kv_bits if bits is None else bits, jensen=jensen or self.jensen, sink_frames=self.sink_frames,
            recent_frames=self.recent_frames, max_frames=max_frames,
        )  # fmt: skip


def _timed(fn, device: torch.device) -> tuple[VideoSample, float]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def _fidelity(video: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    video, reference = video.float(), reference.float()
    return {"psnr_db": media.psnr(video, reference).mean().item(), "ssim": media.ssim(video, reference).mean().item()}


def _save_frames(videos: torch.Tensor, path: Path) -> torch.Tensor:
    rgb = torch.stack([to_rgb(v) for v in videos.float().cpu()])
    media.save_png_grid(rgb, path)
    return rgb


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """Samples ``cfg.num`` videos, writes the files and returns the report (also saved as ``report.json``)."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def load(weights: str):
        loaded = load_video_model(cfg.checkpoint, device=device, weights=weights)
        return loaded, loaded.model.to(torch.bfloat16) if device.type == "cuda" else loaded.model

    loaded, model = load(cfg.weights)
    largest = max(loaded.sizes, key=lambda s: s[0] * s[1] * s[2], default=(4, 8, 8))
    frames = cfg.frames or largest[0]
    height, width = cfg.size or largest[1:]
    # A block-causal model samples chunk by chunk unless told otherwise.
    chunk = cfg.chunk or (loaded.config.causal_chunk * loaded.config.patch[0]) or None
    if chunk is None and cfg.kv_bits != 16:
        raise ValueError("--kv-bits applies to chunk-wise sampling: give --chunk too")
    if chunk is not None and frames % chunk:
        raise ValueError(f"chunk ({chunk}) must divide frames ({frames})")
    context, attributes, _ = prompts(cfg.num, loaded.config, seed=PROMPT_SEED + cfg.seed, shape=(frames, height, width))
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.num, loaded.config.in_channels, frames, height, width, generator=generator)
    dtype = next(model.parameters()).dtype
    noise, context = noise.to(device, dtype), context.to(device, dtype)
    common = dict(steps=cfg.steps, sampler=cfg.sampler, shift=cfg.shift, cfg=cfg.cfg, chunk=chunk)
    max_frames = cfg.cache_frames or max(frames // loaded.config.patch[0], cfg.sink_frames + cfg.recent_frames + 1)

    def draw(bits: int | None = None, jensen: str | None = None, net=model) -> tuple[VideoSample, float]:
        spec = cfg.cache_spec(bits, jensen, max_frames) if chunk is not None else None
        return _timed(lambda: sample_video(net, noise, context, cache=spec, **common), device)

    main, seconds = draw()
    out = Path(cfg.out) if cfg.out else Path(loaded.path).parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    media.save_gif(_save_frames(main.video, out / "frames.png"), out / "video.gif")
    report: dict[str, Any] = {
        "checkpoint": str(loaded.path), "step": loaded.step, "device": str(device), "settings": asdict(cfg),
        "shape": [cfg.num, loaded.config.in_channels, frames, height, width],
        "mode": "full" if chunk is None else f"chunk-wise autoregressive ({chunk} latent frames per chunk)",
        "nfe": main.nfe, "wall_s": seconds, "files": ["frames.png", "video.gif", "report.json"],
        "attributes": attributes,
    }  # fmt: skip
    if main.cache_bytes is not None:
        stored, bf16 = main.cache_bytes["stored"], main.cache_bytes["bf16"]
        report["kv_cache"] = {"bits": cfg.kv_bits, "bytes": stored, "bf16_bytes": bf16, "ratio": stored / max(bf16, 1)}
    if chunk is not None and cfg.kv_bits != 16 and cfg.fidelity:
        reference, ref_seconds = draw(bits=16)
        _save_frames(reference.video, out / "frames_bf16_cache.png")
        report["files"].append("frames_bf16_cache.png")
        fidelity: dict[str, Any] = {"unquantized_wall_s": ref_seconds}
        for mode in JENSEN_MODES:
            sample, mode_seconds = (main, seconds) if mode == cfg.jensen else draw(jensen=mode)
            fidelity[mode] = {**_fidelity(sample.video, reference.video), "wall_s": mode_seconds}
        report["fidelity_vs_unquantized_cache"] = fidelity
    if cfg.weights == "nvfp4" and cfg.fidelity:  # the same videos with the full-precision weights
        full_precision, bf16_seconds = draw(net=load("bf16")[1])
        report["nvfp4_vs_bf16_weights"] = {
            **_fidelity(main.video, full_precision.video), "bf16_wall_s": bf16_seconds, "nvfp4_wall_s": seconds,
            "speedup": bf16_seconds / seconds,
        }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2))
    report["out"] = str(out)
    return report
