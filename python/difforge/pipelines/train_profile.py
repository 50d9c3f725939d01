"""``difforge train --profile``: training throughput (tokens/s) of one config with each difforge feature toggled,
against the plain-PyTorch equivalent measured in the same run.

Variants (same weights init, same batch, same optimizer; full training steps: forward, backward, AdamW):

* ``plain PyTorch``: eager LayerNorm/modulate/gated-residual chain, torch SDPA, dense attention, fp32 linears;
* one feature on top of plain: ``fused norm`` (difforge adaLN kernels), ``difforge attention`` (flash kernels),
  ``hybrid Skiparse`` (dual_end schedule; its plain twin masks padded keys in SDPA), ``HiF8`` linears;
* ``all difforge but HiF8`` and ``all difforge``: every feature on (HiF8 is an emulation off CUDA: QDQ + fp32
  GEMMs, slower than fp32 by construction; on CUDA it runs FP8 tensor-core GEMMs).

Speed is reported as a ratio to the plain variant measured in the same process (machines are noisy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from difforge.pipelines.flow_matching import noisy_latents
from difforge.pipelines.train_video import TrainConfig, build_model

PLAIN = dict(fused_norm=False, backend="sdpa", attention="full", hif8=False)
VARIANTS: dict[str, dict] = {
    "plain PyTorch": {},
    "fused norm": dict(fused_norm=True),
    "difforge attention": dict(backend="difforge"),
    "hybrid Skiparse": dict(attention="hybrid"),
    "HiF8 linears": dict(hif8=True),
    "all difforge but HiF8": dict(fused_norm=True, backend="difforge", attention="hybrid"),
    "all difforge": dict(fused_norm=True, backend="difforge", attention="hybrid", hif8=True),
}


def _time_steps(cfg: TrainConfig, shape: tuple[int, int, int, int], steps: int, device: torch.device) -> list[float]:
    model = build_model(cfg, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, T, H, W = shape
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, model.config.in_channels, T, H, W, generator=generator).to(device)
    context = torch.randn(B, 8, model.config.context_dim, generator=generator).to(device)
    t = torch.rand(B, generator=generator).to(device)
    x_t, v = noisy_latents(x0, torch.randn(x0.shape, generator=generator).to(device), t)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with autocast:
            loss = (model(x_t, t, context).float() - v).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times[2:]


def profile(cfg: TrainConfig, *, steps: int = 6, shape: tuple[int, int, int] | None = None, rounds: int = 2) -> dict:
    """Measures every variant of :data:`VARIANTS` on cfg's model and ``shape`` (latent T, H, W; default: the
    largest bucket shape), with as many samples as ``cfg.tokens_per_batch`` allows (at least one); writes
    ``profile.json`` and ``profile.md`` to ``cfg.out`` and prints the table. Each variant runs ``steps`` timed
    steps in each of ``rounds`` rounds (variant order reversed every other round); the median is reported.
    Returns the report."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    T, H, W = shape or max(cfg.sizes, key=math.prod)
    patch = cfg.model_config().patch
    tokens_per_sample = (T // patch[0]) * (H // patch[1]) * (W // patch[2])
    batch = max(1, cfg.tokens_per_batch // tokens_per_sample)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds):
        # Alternating order, so slow drifts of a shared machine (thermal, neighbours) hit every variant alike.
        for name in list(VARIANTS) if round_ % 2 == 0 else reversed(VARIANTS):
            variant = dataclasses.replace(cfg, **{**PLAIN, **VARIANTS[name]})
            times[name] += _time_steps(variant, (batch, T, H, W), steps, device)
    rows = []
    for name, toggles in VARIANTS.items():
        median = statistics.median(times[name])
        rows.append({"variant": name, "step_s": median, "tokens_per_s": batch * tokens_per_sample / median,
                     "options": {**PLAIN, **toggles}})  # fmt: skip
    plain = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_plain"] = row["tokens_per_s"] / plain
    report = {
        "model": cfg.model, "shape": [batch, T, H, W], "tokens_per_step": batch * tokens_per_sample,
        "sparse_ratio": cfg.sparse_ratio, "device": _device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "steps": steps * rounds, "git_revision": _git_revision(), "rows": rows,
    }  # fmt: skip
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    table = _markdown(report)
    (out / "profile.md").write_text(table)
    print(table)
    return report


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _markdown(report: dict) -> str:
    B, T, H, W = report["shape"]
    lines = [
        f"# Training throughput: {report['model']}, batch {B} x (T, H, W) = ({T}, {H}, {W}) latents, "
        f"{report['tokens_per_step']} tokens/step",
        "",
        f"{report['device']}, torch {report['torch']}, git {report['git_revision']}, median of {report['steps']} "
        "steps (fwd + bwd + AdamW)",
        "",
        "| variant | step (ms) | tokens/s | vs plain PyTorch |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['variant']} | {row['step_s'] * 1e3:.1f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['speedup_vs_plain']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"
