"""Training metrics as JSON lines (one object per logged step) and the loss-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any


class MetricsLog:
    """Appends one JSON object per call to ``path``. A resumed run first drops the lines of steps after its
    checkpoint (they are replayed), so the file always reads as one uninterrupted run."""

    def __init__(self, path: Path, *, enabled: bool = True, truncate_after: int = 0) -> None:
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after] if truncate_after else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short by a crash is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def plot_loss(metrics_path: Path, png_path: Path, *, title: str = "flow-matching loss") -> Path:
    """Loss vs step (raw and a 20-step moving average, log scale) from a metrics file, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r and math.isfinite(r["loss"])]
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    window = 20
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"{window}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def plot_rewards(runs: Mapping[str, Sequence[Mapping[str, Any]]], png_path: Path, *, title: str = "") -> Path:
    """Evaluation reward (solid, markers) and training reward (dashed) of each run's metrics records against the
    wall-clock (left) and the BF16-equivalent rollouts (right), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120, sharey=True)
    for (label, records), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        evals = [r for r in records if "eval_reward" in r]
        trains = [r for r in records if "reward" in r]
        for ax, key in zip(axes, ("wall_s", "equivalent_rollouts")):
            ax.plot([r[key] for r in evals], [r["eval_reward"] for r in evals], "o-", color=colour, ms=3,
                    label=f"{label} (evaluation, ODE)")  # fmt: skip
            ax.plot([r[key] for r in trains], [r["reward"] for r in trains], "--", color=colour, alpha=0.5,
                    label=f"{label} (training rollouts)")  # fmt: skip
    axes[0].set_xlabel("wall-clock s (sampling + update, evaluation excluded)")
    axes[1].set_xlabel("BF16-equivalent rollouts")
    axes[0].set_ylabel("mean reward")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
