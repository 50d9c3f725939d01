"""Videos to files and video fidelity: PNG frame grids, animated GIFs (Pillow), PSNR and SSIM."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def frame_grid(videos: Tensor, *, scale: int | None = None, gap: int = 1) -> Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> one image ``[B*(H*scale+gap), T*(W*scale+gap), 3]``: a row per video, a column
    per frame, each pixel enlarged ``scale`` times (latent frames are small; default: to about 64 pixels)."""
    B, T, H, W, _ = videos.shape
    scale = scale or max(1, 64 // max(H, W))
    big = videos.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    padded = F.pad(big.permute(0, 1, 4, 2, 3), (0, gap, 0, gap), value=255).permute(0, 3, 1, 4, 2)
    return padded.reshape(B * (H * scale + gap), T * (W * scale + gap), 3)


def save_png_grid(videos: Tensor, path: str | Path, *, scale: int | None = None) -> Path:
    """Saves :func:`frame_grid` of uint8 ``[B, T, H, W, 3]`` frames as a PNG."""
    from PIL import Image

    Image.fromarray(frame_grid(videos, scale=scale).cpu().numpy()).save(path)
    return Path(path)


def save_gif(videos: Tensor, path: str | Path, *, scale: int | None = None, fps: int = 4) -> Path:
    """An animated GIF (Pillow's encoder, always available) showing the B videos side by side."""
    from PIL import Image

    frames = [Image.fromarray(frame_grid(videos[:, t : t + 1].transpose(0, 1), scale=scale).cpu().numpy())
              for t in range(videos.shape[1])]  # fmt: skip
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, 1000 // fps), loop=0)
    return Path(path)


def psnr(a: Tensor, b: Tensor, *, data_range: float = 2.0) -> Tensor:
    """PSNR in dB per video of two float batches ``[B, ...]`` (latents in [-1, 1]: range 2); inf when equal."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, *, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> Tensor:
    """Mean SSIM (Wang et al. 2004; K1 = 0.01, K2 = 0.03, Gaussian window) per video of ``[B, C, T, H, W]``
    batches, over every channel and frame. The window shrinks to the frame for small latents; valid positions only."""
    B, C, T, H, W = a.shape
    size = min(window, H, W)
    g = _gaussian_window(size, sigma, a.device)
    kernel = (g[:, None] * g[None, :])[None, None]  # [1, 1, s, s]

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel)

    x = a.double().permute(0, 2, 1, 3, 4).reshape(-1, 1, H, W)
    y = b.double().permute(0, 2, 1, 3, 4).reshape(-1, 1, H, W)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(B, -1).mean(1)
