"""PNG plot: speedup of difforge over each baseline, one bar group per case. Needs matplotlib (optional)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from difforge_bench.runner import OURS, Record

PNG_NAME = "speedup.png"


def write_png(folder: Path, title: str, records: list[Record]) -> Path | None:
    """Returns the path written, or None when matplotlib is missing or no speedup was measured."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    measured = [r for r in records if r.speedup is not None]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = list(dict.fromkeys(_case_label(r) for r in measured))
    baselines = list(dict.fromkeys(r.impl for r in measured if r.impl != OURS))
    speedup = {(_case_label(r), r.impl): r.speedup for r in measured}
    bar = 0.8 / len(baselines)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.22 * len(cases) * len(baselines)))
    for i, name in enumerate(baselines):
        ys = [c + i * bar for c in range(len(cases))]
        # Bars grow from 1x on a log axis: right means difforge is faster, left means the baseline is.
        widths = [speedup.get((case, name), 1.0) - 1.0 for case in cases]
        ax.barh(ys, widths, left=1.0, height=bar, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_yticks([c + bar * (len(baselines) - 1) / 2 for c in range(len(cases))], cases, fontsize=8)
    ax.margins(y=0.01)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of difforge (baseline time / difforge time)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / PNG_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _case_label(r: Record) -> str:
    return " ".join([r.family, r.op, r.mode, *r.config.values(), r.shape])
