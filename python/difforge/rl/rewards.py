"""Rewards for RL on generated videos: analytic built-ins for the synthetic data's attributes, and plug-ins.

A reward is any callable ``reward(videos, conditions) -> Tensor [B]``: ``videos [B, C, T, H, W]`` latents whose
channels 0..2 are RGB in [-1, 1] (:mod:`difforge.data.synthetic`; values outside are clamped), ``conditions`` the
list of B attribute dicts :func:`difforge.pipelines.video_model.prompts` returned with the contexts. Higher is
better. :func:`get_reward` resolves a reward from

* a built-in name (:data:`REWARDS`): ``brightness``; ``colour:<name>`` for the 8 palette colours (``red``,
  ``orange``, ``yellow``, ``green``, ``cyan``, ``blue``, ``magenta``, ``white``); ``motion:<direction>`` for the
  8 compass directions (``north`` ... ``northwest``; north is towards row 0); ``prompt_motion``;
* a callable;
* a plug-in ``"package.module:function"``, imported on demand (the module must be importable, e.g. on
  ``PYTHONPATH``); the function has the signature above.

Every resolved reward checks what it returns: a finite float tensor of shape ``[B]``.

The "foreground" of a frame (a shape on a background, as in the synthetic data) is found without knowing the
background: its colour is the frame's per-channel median (the background covers most pixels), and a pixel's
*salience* is its RGB distance from that colour. A dark blue shape on the dark background is as salient as a
bright one, which a luminance threshold would miss.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difforge.data.synthetic import PALETTE

RewardFn = Callable[[Tensor, Sequence[Mapping[str, Any]] | None], Tensor]

# Palette order of difforge.data.synthetic (attributes colour_start / colour_end index it).
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "magenta", "white")
# Direction codes 0..7 of difforge.data.synthetic (attribute "direction"): 45 degrees apart, clockwise from north.
DIRECTIONS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
LUMA = (0.299, 0.587, 0.114)
_PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _rgb(videos: Tensor) -> Tensor:
    """Channels 0..2 of ``videos [B, C >= 3, T, H, W]`` as float32, clamped to [-1, 1]."""
    if not isinstance(videos, Tensor) or videos.dim() != 5 or videos.shape[1] < 3 or not videos.is_floating_point():
        got = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"reward: videos must be a float [B, C >= 3, T, H, W] tensor, got {got}")
    return videos[:, :3].float().clamp(-1.0, 1.0)


def _salience(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """Per frame: the background colour (per-channel median over pixels) ``[B, 3, T]`` and each pixel's RGB
    distance from it ``[B, T, H, W]``."""
    background = rgb.flatten(3).median(dim=3).values
    return background, (rgb - background[..., None, None]).norm(dim=1)


def brightness(videos: Tensor, conditions: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
    """Mean luminance ``0.299 R + 0.587 G + 0.114 B`` of the clip, mapped from [-1, 1] to [0, 1]."""
    rgb = _rgb(videos)
    luma = torch.tensor(LUMA, device=rgb.device).view(1, 3, 1, 1, 1)
    return ((luma * rgb).sum(dim=1).mean(dim=(1, 2, 3)) + 1) / 2


def foreground_colour(videos: Tensor) -> Tensor:
    """The foreground's RGB per frame ``[B, 3, T]``: the mean colour weighted by the squared salience (squared, so
    the many faintly salient background pixels weigh little against the shape); a uniform frame gives its
    colour."""
    rgb = _rgb(videos)
    _, salience = _salience(rgb)
    weights = salience.square().unsqueeze(1) + 1e-12  # the floor makes a uniform frame average evenly
    return (weights * rgb).sum(dim=(3, 4)) / weights.sum(dim=(3, 4))


def colour_reward(colour: str) -> RewardFn:
    """``colour:<colour>``: minus the RGB distance (in [-1, 1] units, so within [-2 sqrt(3), 0]) between the
    foreground colour (:func:`foreground_colour`) and the palette colour, averaged over frames. It rises as the
    foreground turns towards the colour."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    target = torch.tensor(PALETTE[COLOURS.index(colour)]) * 2 - 1

    def reward(videos: Tensor, conditions: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        found = foreground_colour(videos)
        return -(found - target.to(found.device).view(1, 3, 1)).norm(dim=1).mean(dim=1)

    reward.__name__ = f"colour_{colour}"
    return reward


def _circular_mean(marginal: Tensor) -> Tensor:
    """Weighted circular mean position ``[B, T]`` of ``marginal [B, T, N]``: weights on a ring of N pixels."""
    period = marginal.shape[-1]
    angle = torch.arange(period, device=marginal.device, dtype=marginal.dtype) * (2 * math.pi / period)
    return torch.atan2((marginal * angle.sin()).sum(-1), (marginal * angle.cos()).sum(-1)) * (period / (2 * math.pi))


def foreground_velocity(videos: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame displacement ``(dy, dx)`` in pixels, ``[B, T - 1]`` each, of the foreground's centroid.

    Foreground weight: the salience above the frame's median salience (0 elsewhere). The frame is a torus (the
    synthetic shapes wrap around the edges), so the centroid is a circular mean per axis and a displacement is
    the shortest way round, within half the frame.
    """
    rgb = _rgb(videos)
    _, salience = _salience(rgb)
    threshold = salience.flatten(2).median(dim=2).values[..., None, None]
    weights = (salience - threshold).clamp_min(0.0)
    H, W = weights.shape[2:]
    y, x = _circular_mean(weights.sum(dim=3)), _circular_mean(weights.sum(dim=2))

    def wrapped(diff: Tensor, period: int) -> Tensor:
        return torch.remainder(diff + period / 2, period) - period / 2

    return wrapped(y.diff(dim=1), H), wrapped(x.diff(dim=1), W)


def _unit(direction: int) -> tuple[float, float]:
    """(dy, dx) of compass direction ``direction`` (0 north = towards row 0, clockwise), as the synthetic data."""
    angle = math.pi / 4 * direction
    return -math.cos(angle), math.sin(angle)


def _motion_along(videos: Tensor, directions: Sequence[int]) -> Tensor:
    """Mean per-frame displacement (pixels) of the foreground along each sample's direction; 0 for one frame."""
    dy, dx = foreground_velocity(videos)
    if dy.shape[1] == 0:
        return dy.new_zeros(dy.shape[0])
    unit = torch.tensor([_unit(d) for d in directions], device=dy.device, dtype=dy.dtype)  # [B, 2]
    return (dy * unit[:, :1] + dx * unit[:, 1:]).mean(dim=1)


def motion_reward(direction: str) -> RewardFn:
    """``motion:<direction>``: the foreground's mean displacement per frame along ``direction``, in pixels
    (:func:`foreground_velocity`)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    code = DIRECTIONS.index(direction)

    def reward(videos: Tensor, conditions: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        return _motion_along(videos, [code] * videos.shape[0])

    reward.__name__ = f"motion_{direction}"
    return reward


def prompt_motion(videos: Tensor, conditions: Sequence[Mapping[str, Any]] | None) -> Tensor:
    """``motion:<direction>`` with each sample's direction taken from its condition's ``"direction"`` (0..7)."""
    if conditions is None or len(conditions) != videos.shape[0]:
        got = "None" if conditions is None else len(conditions)
        raise ValueError(f"prompt_motion: needs one condition per video ({videos.shape[0]}), got {got}")
    directions = []
    for k, condition in enumerate(conditions):
        direction = condition.get("direction")
        if isinstance(direction, bool) or not isinstance(direction, int) or not 0 <= direction < len(DIRECTIONS):
            raise ValueError(f"prompt_motion: conditions[{k}]['direction'] must be an int in 0..7, got {direction!r}")
        directions.append(direction)
    return _motion_along(videos, directions)


REWARDS: dict[str, RewardFn] = {
    "brightness": brightness,
    **{f"colour:{c}": colour_reward(c) for c in COLOURS},
    **{f"motion:{d}": motion_reward(d) for d in DIRECTIONS},
    "prompt_motion": prompt_motion,
}


@dataclass(frozen=True)
class Reward:
    """A resolved reward: calls ``fn`` and checks that it returned a finite float tensor ``[B]``."""

    name: str
    fn: RewardFn

    def __call__(self, videos: Tensor, conditions: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        out = self.fn(videos, conditions)
        batch = videos.shape[0]
        if not isinstance(out, Tensor) or out.shape != (batch,) or not out.is_floating_point():
            got = f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"reward {self.name!r} must return a float tensor of shape [B={batch}], got {got}")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"reward {self.name!r} returned non-finite values: {out.tolist()}")
        return out.float()


def _unknown(name: str, why: str = "") -> ValueError:
    return ValueError(
        f"unknown reward {name!r}{why}; built-ins: {', '.join(REWARDS)}; or a plug-in 'package.module:function' "
        "with the signature reward(videos, conditions) -> Tensor [B]"
    )


def get_reward(reward: str | RewardFn) -> Reward:
    """The reward named by ``reward`` (a built-in name, ``"package.module:function"``) or wrapping a callable."""
    if isinstance(reward, Reward):
        return reward
    if callable(reward):
        return Reward(getattr(reward, "__name__", type(reward).__name__), reward)
    if not isinstance(reward, str):
        raise TypeError(f"reward must be a name or a callable, got {type(reward).__name__}")
    if reward in REWARDS:
        return Reward(reward, REWARDS[reward])
    module_name, _, attr = reward.partition(":")
    if not _PLUGIN.fullmatch(reward) or module_name in ("colour", "motion"):
        raise _unknown(reward)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise _unknown(reward, f" (cannot import {module_name!r}: {error})") from error
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise _unknown(reward, f" ({module_name!r} has no callable {attr!r})")
    return Reward(reward, fn)
