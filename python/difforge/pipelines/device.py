"""Device helpers every pipeline shares: the precision context and the synchronisation that makes timings honest."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision="bf16"``, or ``"auto"`` on CUDA; otherwise no autocast (fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued kernels (CUDA runs asynchronously), so a timer read after it is complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
