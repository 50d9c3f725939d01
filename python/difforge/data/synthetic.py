"""Synthetic video latents: one shape moving and recolouring over a dark background, rendered in latent space.

Lets a video DiT be trained and sampled with nothing downloaded (no VAE, no data set). Each sample is a clip of
latent shape ``[C, T, H, W]`` drawn from a few sizes, with condition tokens that encode what the clip shows, so a
model can learn conditional generation and its samples can be checked by eye (:func:`to_rgb`).

Content of sample ``i`` (all from a generator seeded by a hash of ``(seed, i)``; identical in every process):

* background: dark, with a slight linear gradient in a random direction and a small random tint;
* one shape (0 square, 1 disk, 2 cross, 3 diamond) of radius ``size`` class 0/1/2 (0.12/0.2/0.28 of min(H, W),
  at least 1 latent pixel), anti-aliased over one pixel;
* constant velocity ``speed`` (0.5-1.5 latent pixels per frame) along one of 8 compass directions (0 N, 1 NE,
  2 E, 3 SE, 4 S, 5 SW, 6 W, 7 NW; north is towards row 0), *wrapping around* the frame edges (the frame is a
  torus: a shape leaving on the right re-enters on the left, partly visible on both sides while it crosses);
* colour interpolating linearly from palette entry ``colour_start`` (frame 0) to ``colour_end`` (last frame),
  two distinct entries of an 8-colour palette.

Channels: 0..2 RGB in [-1, 1]; 3 the shape coverage mapped to [-1, 1]; 4 a 3x3 box-blurred (wrapping) copy of
it; 5 luminance; 6.. fixed random mixtures of channels 0..5 squashed by tanh. All channels lie in [-1, 1].
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from difforge.data.buckets import _patch_tokens

NUM_SHAPES = 4
NUM_DIRECTIONS = 8
NUM_SIZES = 3
# RGB in [0, 1]: red, orange, yellow, green, cyan, blue, magenta, white.
PALETTE = (
    (1.0, 0.0, 0.0),
    (1.0, 0.5, 0.0),
    (1.0, 1.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 1.0, 1.0),
    (0.0, 0.0, 1.0),
    (1.0, 0.0, 1.0),
    (1.0, 1.0, 1.0),
)
NUM_COLOURS = len(PALETTE)
_SIZE_FRACTIONS = (0.12, 0.2, 0.28)
# Context symbols: shapes, directions, start colours, end colours, size classes, padding. Start and end colours
# get separate symbols so the embedding alone says which end of the interpolation a colour is.
_SHAPE0 = 0
_DIRECTION0 = _SHAPE0 + NUM_SHAPES
_START0 = _DIRECTION0 + NUM_DIRECTIONS
_END0 = _START0 + NUM_COLOURS
_SIZE0 = _END0 + NUM_COLOURS
_PAD = _SIZE0 + NUM_SIZES
NUM_SYMBOLS = _PAD + 1
_TABLE_SEED = 0x5EED_7AB1E  # fixed: every dataset instance and process shares one embedding table
_MIX_SEED = 0x5EED_C4A5  # fixed: the extra channels' mixing weights
_BASE_FEATURES = 6  # channels 0..5 are rendered; later ones mix them

_MASK64 = (1 << 64) - 1


def _hash64(*words: int) -> int:
    """A splitmix64 finaliser folded over ``words``: cheap, well-spread, the same everywhere."""
    state = 0
    for word in words:
        state = (state + 0x9E3779B97F4A7C15 + (word & _MASK64)) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state


@functools.lru_cache(maxsize=8)
def _symbol_table(dim: int) -> Tensor:
    generator = torch.Generator().manual_seed(_TABLE_SEED)
    table = torch.randn(NUM_SYMBOLS, dim, generator=generator, dtype=torch.float64)
    return (table / table.norm(dim=1, keepdim=True)).float()


def _positive(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _wrapped_distance(coords: Tensor, centre: Tensor, period: int) -> Tensor:
    """|coords - centre| to the nearest periodic image of the centre: the frame wraps around."""
    return (torch.remainder(coords - centre + period / 2, period) - period / 2).abs()


def _distance(shape: int, ax: Tensor, ay: Tensor) -> Tensor:
    """Shape "radius" of the offsets |dx|, |dy|: the shape covers distance <= radius (an arm of the cross is
    a third of its length wide)."""
    if shape == 0:
        return torch.maximum(ax, ay)
    if shape == 1:
        return torch.hypot(ax, ay)
    if shape == 2:
        return torch.minimum(torch.maximum(ax, 3 * ay), torch.maximum(3 * ax, ay))
    return ax + ay


class SyntheticVideoDataset(Dataset):
    """Procedural video latents with condition tokens (see the module docstring for the content).

    Args:
        num_samples: dataset length (>= 1).
        channels: latent channels C (>= 3; 0..2 are RGB).
        sizes: latent (T, H, W) shapes; sample ``i`` takes ``sizes[hash(seed, i) % len(sizes)]``.
        context_len: condition tokens per sample (>= 1). Rows 0..4 embed [shape, direction, colour_start,
            colour_end, size]; later rows are a fixed padding embedding. With fewer than 5 rows the first
            ``context_len`` tokens are kept.
        context_dim: embedding width (>= 1); rows come from a fixed unit-norm table of ``NUM_SYMBOLS`` symbols.
        seed: selects a different (equally deterministic) data set.
        cache_bytes: keep rendered samples in memory up to this many bytes of tensors (0: render every time).
            Cached samples are returned as the same tensors each time: do not modify them in place.

    ``dataset[i]`` is a dict: ``latents`` float32 ``[C, T, H, W]`` in [-1, 1], ``context`` float32
    ``[context_len, context_dim]`` and ``attributes`` (python numbers): ``shape``, ``direction``,
    ``colour_start``, ``colour_end``, ``size`` (class), ``radius``, ``speed`` (latent pixels, per frame),
    ``x0``, ``y0`` (centre in frame 0, pixel units: pixel (y, x) has its centre at (y, x)).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        channels: int = 4,
        sizes: Sequence[tuple[int, int, int]] = ((4, 16, 16), (8, 16, 16), (4, 16, 32), (8, 32, 32)),
        context_len: int = 8,
        context_dim: int = 32,
        seed: int = 0,
        cache_bytes: int = 0,
    ) -> None:
        self.num_samples = _positive(num_samples, "num_samples")
        # Rendering costs ~1-10 ms per sample (many small ops); training revisits every sample each epoch.
        self.cache_bytes = cache_bytes
        self._cache: dict[int, dict[str, Any]] = {}
        self._cached_bytes = 0
        self.channels = _positive(channels, "channels", 3)
        self.context_len = _positive(context_len, "context_len")
        self.context_dim = _positive(context_dim, "context_dim")
        sizes = list(sizes)
        if not sizes:
            raise ValueError("sizes must hold at least one (T, H, W) shape")
        for k, size in enumerate(sizes):
            if not (
                isinstance(size, Sequence)
                and len(size) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
            ):
                raise ValueError(f"sizes[{k}] must be 3 positive ints (T, H, W), got {size!r}")
        self.sizes = tuple(tuple(size) for size in sizes)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._table = _symbol_table(self.context_dim)
        extra = self.channels - _BASE_FEATURES
        generator = torch.Generator().manual_seed(_MIX_SEED)
        self._mix = torch.randn(max(extra, 0), _BASE_FEATURES, generator=generator) * (2.0 / _BASE_FEATURES**0.5)

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        return index

    def shape_of(self, index: int) -> tuple[int, int, int]:
        """Latent (T, H, W) of sample ``index``, without generating it."""
        return self.sizes[_hash64(self.seed, self._check_index(index), 0) % len(self.sizes)]

    def tokens_of(self, index: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
        """Tokens of sample ``index`` after patchify: ``T//pt * H//ph * W//pw``; ValueError unless divisible."""
        return _patch_tokens(self.shape_of(index), patch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        if index in self._cache:
            return self._cache[index]
        sample = self._generate(index)
        size = sum(t.numel() * t.element_size() for t in (sample["latents"], sample["context"]))
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[index] = sample
            self._cached_bytes += size
        return sample

    def _generate(self, index: int) -> dict[str, Any]:
        frames, height, width = self.shape_of(index)
        index = operator.index(index)
        generator = torch.Generator().manual_seed(_hash64(self.seed, index, 1))

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

        def choice(n: int) -> int:
            return int(torch.randint(n, (), generator=generator))

        shape, direction = choice(NUM_SHAPES), choice(NUM_DIRECTIONS)
        colour_start, size = choice(NUM_COLOURS), choice(NUM_SIZES)
        colour_end = (colour_start + 1 + choice(NUM_COLOURS - 1)) % NUM_COLOURS  # always a visible change
        attributes = {
            "shape": shape,
            "direction": direction,
            "colour_start": colour_start,
            "colour_end": colour_end,
            "size": size,
            "radius": max(1.0, _SIZE_FRACTIONS[size] * min(height, width)),
            "speed": uniform(0.5, 1.5),
            "x0": uniform(0.0, width),
            "y0": uniform(0.0, height),
        }
        background = (uniform(0.0, 2 * math.pi), [uniform(-0.05, 0.05) for _ in range(3)])
        latents = self._render(attributes, background, frames, height, width)
        tokens = [_SHAPE0 + shape, _DIRECTION0 + direction, _START0 + colour_start, _END0 + colour_end, _SIZE0 + size]
        tokens = (tokens + [_PAD] * self.context_len)[: self.context_len]
        return {"latents": latents, "context": self._table[tokens], "attributes": attributes}

    def _render(
        self, attributes: dict[str, Any], background: tuple[float, list[float]], frames: int, height: int, width: int
    ) -> Tensor:
        angle = math.pi / 4 * attributes["direction"]  # direction 0 is north: -y in image rows
        speed = attributes["speed"]
        time = torch.arange(frames, dtype=torch.float64).view(frames, 1, 1)
        centre_x = attributes["x0"] + speed * math.sin(angle) * time
        centre_y = attributes["y0"] - speed * math.cos(angle) * time
        ax = _wrapped_distance(torch.arange(width, dtype=torch.float64).view(1, 1, width), centre_x, width)
        ay = _wrapped_distance(torch.arange(height, dtype=torch.float64).view(1, height, 1), centre_y, height)
        mask = (attributes["radius"] + 0.5 - _distance(attributes["shape"], ax, ay)).clamp(0.0, 1.0).float()

        palette = torch.tensor(PALETTE) * 2 - 1
        ramp = torch.linspace(0.0, 1.0, frames) if frames > 1 else torch.zeros(1)
        colour = torch.lerp(palette[attributes["colour_start"]], palette[attributes["colour_end"]], ramp[:, None])
        tilt, tint = background
        gx = (torch.arange(width) - width / 2) / max(height, width)
        gy = (torch.arange(height) - height / 2) / max(height, width)
        gradient = math.cos(tilt) * gx.view(1, width) + math.sin(tilt) * gy.view(height, 1)  # [H, W]
        back = -0.75 + torch.tensor(tint).view(3, 1, 1, 1) + 0.15 * gradient  # [3, 1, H, W]
        rgb = back * (1 - mask) + colour.t().reshape(3, frames, 1, 1) * mask  # [3, T, H, W]

        blurred = F.avg_pool2d(F.pad(mask[:, None], (1, 1, 1, 1), mode="circular"), 3, stride=1)[:, 0]
        luminance = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1) * rgb).sum(0)
        base = torch.cat([rgb, (2 * mask - 1)[None], (2 * blurred - 1)[None], luminance[None]])
        if len(self._mix):
            mixed = torch.tanh(self._mix @ base.reshape(_BASE_FEATURES, -1))
            base = torch.cat([base, mixed.reshape(len(self._mix), frames, height, width)])
        return base[: self.channels].clamp(-1.0, 1.0).contiguous()


def to_rgb(latents: Tensor) -> Tensor:
    """Frames for viewing or saving: ``[C, T, H, W]`` float latents (channels 0..2 RGB in [-1, 1], values
    clamped) -> ``[T, H, W, 3]`` uint8."""
    if not isinstance(latents, Tensor) or latents.dim() != 4 or not latents.is_floating_point():
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"to_rgb: latents must be a float [C, T, H, W] tensor, got {got}")
    if latents.shape[0] < 3:
        raise ValueError(f"to_rgb: latents need >= 3 channels (RGB), got {latents.shape[0]}")
    rgb = latents[:3].detach().float().clamp(-1.0, 1.0)
    return ((rgb + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
