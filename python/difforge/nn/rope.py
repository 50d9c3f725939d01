"""3D rotary position embedding (RoPE) for video tokens, from original (t, h, w) grid positions.

Angles are a per-token table ``[N, D/2]`` in original token order, so a layout that permutes tokens (Skiparse)
permutes the table the same way and rotates after the permutation: position never comes from the index in
the permuted sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to (t, h, w): h and w get ``floor(D/6)`` each, t the rest (D = 128: 22/21/21)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be even and >= 2, got {head_dim}")
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def rope_angles_3d(
    grid: Sequence[int],
    head_dim: int,
    *,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[T*H*W, head_dim/2]`` rotation angles (computed in float64, returned in ``dtype``), token order
    (t, h, w) with w fastest.

    Each axis gets its share of the pairs (:func:`rope_split`) with frequencies ``theta^(-2i/(2n))`` over
    its own n pairs, as in Wan-style 3D RoPE."""
    T, H, W = (int(g) for g in grid)
    parts = []
    for extent, pairs, axis in zip((T, H, W), rope_split(head_dim), range(3)):
        freqs = theta ** (-torch.arange(pairs, dtype=torch.float64, device=device) / max(pairs, 1))
        positions = torch.arange(extent, dtype=torch.float64, device=device)
        angles = torch.outer(positions, freqs)  # [extent, pairs]
        shape = [1, 1, 1, pairs]
        shape[axis] = extent
        parts.append(angles.view(shape).expand(T, H, W, pairs))
    return torch.cat(parts, dim=-1).reshape(T * H * W, head_dim // 2).to(dtype)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotates consecutive pairs ``(x[2i], x[2i+1])`` of the last dim by ``angles[..., i]`` (broadcast against
    ``x[..., ::2]``), in float32 (float64 when x or angles are), returning x's dtype. Elementwise, so it
    commutes with any token permutation applied to x and angles alike."""
    compute = torch.promote_types(torch.promote_types(x.dtype, angles.dtype), torch.float32)
    pairs = x.to(compute).unflatten(-1, (-1, 2))
    angles = angles.to(compute)
    cos, sin = angles.cos(), angles.sin()
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)
