"""A trained video DiT for sampling and RL: load it from a ``difforge train`` checkpoint (EMA weights by default,
BF16 or NVFP4 linears) and draw condition prompts the way its training data made them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difforge.models import VideoDiT, VideoDiTConfig
from difforge.pipelines.checkpoint import CheckpointError, load_checkpoint

WEIGHTS = ("bf16", "nvfp4")
# Prompts come from the synthetic data set under a seed training never used (training uses data_seed, 0 by default).
PROMPT_SEED = 1_000_003


@dataclass
class LoadedModel:
    """A model restored from a checkpoint: the module (eval mode, no grad), its config and where it came from."""

    model: VideoDiT
    config: VideoDiTConfig
    train_config: dict[str, Any]
    step: int
    path: Path
    weights: str
    sizes: tuple[tuple[int, int, int], ...] = field(default=())


def quantize_for_rollouts(model: nn.Module, weights: str) -> nn.Module:
    """``model`` with NVFP4 linears (``weights="nvfp4"``; the recipe's high-precision layers are kept), or as is."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "nvfp4":
        from difforge.nn import quantize_linears

        quantize_linears(model, "nvfp4")
    return model


def load_video_model(
    checkpoint: str | Path, *, device: str | torch.device = "cpu", weights: str = "bf16", ema: bool = True
) -> LoadedModel:
    """The VideoDiT of a ``difforge train`` run folder (its latest checkpoint) or of one ``step-*`` folder.

    ``ema=True`` loads the exponential moving average (what one samples from), else the raw weights. HiF8
    training linears load as plain linears (HiF8 is a training recipe). ``weights="nvfp4"`` quantizes the
    linears to NVFP4 for rollouts. Raises :class:`CheckpointError` for a missing, corrupt or foreign checkpoint.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    model_config = ckpt.meta.get("model_config")
    if not isinstance(model_config, dict) or "model" not in ckpt.tensors:
        raise CheckpointError(f"{ckpt.path} is not a video DiT checkpoint (no model_config / model weights)")
    try:
        config = VideoDiTConfig.from_dict(model_config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{ckpt.path}: model_config does not describe a VideoDiT: {error}") from error
    model = VideoDiT(config)
    state = dict(ckpt.tensors["model"])
    if ema and "ema" in ckpt.tensors:
        state.update(ckpt.tensors["ema"])  # the EMA holds every parameter; buffers stay the model's
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: weights do not match the VideoDiT config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model = quantize_for_rollouts(model.to(device).eval().requires_grad_(False), weights)
    train_config = ckpt.meta.get("config", {})
    sizes = tuple(tuple(s) for s in train_config.get("sizes", ()))
    return LoadedModel(model, config, train_config, ckpt.step, ckpt.path, weights, sizes)


def prompts(
    count: int, config: VideoDiTConfig, *, seed: int = PROMPT_SEED, shape: tuple[int, int, int] = (4, 8, 8)
) -> tuple[Tensor, list[dict[str, Any]], Tensor]:
    """``count`` conditions from the synthetic data set: ``(context [count, Lc, context_dim], attributes,
    reference latents [count, C, T, H, W])``; the latents are what the data set renders for the attributes."""
    from difforge.data import SyntheticVideoDataset

    if count < 1:
        raise ValueError(f"prompts: count must be >= 1, got {count}")
    data = SyntheticVideoDataset(
        count, channels=config.in_channels, sizes=(tuple(shape),), context_dim=config.context_dim, seed=seed
    )
    items = [data[i] for i in range(count)]
    context = torch.stack([it["context"] for it in items])
    latents = torch.stack([it["latents"] for it in items])
    return context, [it["attributes"] for it in items], latents
