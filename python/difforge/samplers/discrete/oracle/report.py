"""The exact-oracle report of ``difforge discrete eval``: TV/KL vs NFE for every sampler, as JSON, a Markdown
table and a log-log PNG, plus the headline comparison of the issue: GADD's TV against Euler's and CTMC-PC's at
equal NFE (log-log interpolation of the baselines' curves)."""

from __future__ import annotations

import json
import math
import os

from difforge.samplers.discrete.oracle.evaluate import Entry, as_records


def _curve(entries: list[Entry], process: str, variant: str) -> list[tuple[int, float]]:
    return sorted((e.nfe, e.tv) for e in entries if e.process == process and e.variant == variant)


def tv_at(curve: list[tuple[int, float]], nfe: float) -> float | None:
    """TV of a curve at an NFE inside its range, interpolated linearly in log-log; None outside."""
    for (n0, tv0), (n1, tv1) in zip(curve, curve[1:]):
        if n0 <= nfe <= n1 and tv0 > 0 and tv1 > 0:
            if n1 == n0:
                return tv0
            w = (math.log(nfe) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp((1 - w) * math.log(tv0) + w * math.log(tv1))
    return None


def equal_nfe_ratios(entries: list[Entry], variant: str, baseline: str, process: str = "uniform") -> list[dict]:
    """TV(variant) / TV(baseline) at each of the variant's NFEs that the baseline's curve covers."""
    base = _curve(entries, process, baseline)
    rows = []
    for nfe, tv in _curve(entries, process, variant):
        ref = tv_at(base, nfe)
        if ref:
            rows.append({"nfe": nfe, "tv": tv, "baseline_tv": ref, "ratio": tv / ref})
    return rows


def markdown(entries: list[Entry], title: str, comparisons: dict[str, list[dict]]) -> str:
    lines = [f"# {title}", "", "| process | sampler | steps | NFE | TV | KL | mode |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e.process} | {e.variant} | {e.steps} | {e.nfe} | {e.tv:.4f} | {e.kl:.4f} | {e.mode} |")
    for name, rows in comparisons.items():
        lines += ["", f"## {name}", "", "| NFE | TV | baseline TV | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['nfe']} | {r['tv']:.4f} | {r['baseline_tv']:.4f} | {r['ratio']:.2f} |" for r in rows]
        if not rows:
            lines.append("| (no overlapping NFE) | | | |")
    return "\n".join(lines) + "\n"


def plot(entries: list[Entry], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    processes = sorted({e.process for e in entries})
    fig, axes = plt.subplots(1, len(processes), figsize=(6.5 * len(processes), 4.5), squeeze=False)
    for ax, process in zip(axes[0], processes):
        for variant in dict.fromkeys(e.variant for e in entries if e.process == process):
            curve = _curve(entries, process, variant)
            style = "-" if "gadd" in variant else "--"
            ax.plot([n for n, _ in curve], [max(tv, 1e-6) for _, tv in curve], style, marker="o", label=variant)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("TV to the exact target")
        ax.set_title(f"{process} process")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


GADD_EXACT = "gadd (1 site, exact)"
GADD_BLOCKED = "gadd (2 random sites)"


def write_report(entries: list[Entry], out: str, title: str) -> dict[str, str]:
    """results.json, results.md and tv_vs_nfe.png in ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    comparisons = {}
    if any(e.process == "uniform" for e in entries):
        for gadd in (GADD_EXACT, GADD_BLOCKED):
            for baseline in ("euler", "ctmc_pc"):
                comparisons[f"{gadd} vs {baseline} at equal NFE"] = equal_nfe_ratios(entries, gadd, baseline)
    paths = {name: os.path.join(out, name) for name in ("results.json", "results.md", "tv_vs_nfe.png")}
    with open(paths["results.json"], "w") as f:
        json.dump({"title": title, "entries": as_records(entries), "comparisons": comparisons}, f, indent=2)
    with open(paths["results.md"], "w") as f:
        f.write(markdown(entries, title, comparisons))
    plot(entries, paths["tv_vs_nfe.png"], title)
    return paths


def run_eval(
    oracle_name: str = "markov",
    processes: tuple[str, ...] = ("uniform", "masked"),
    steps_list: tuple[int, ...] = (2, 4, 8, 16),
    *,
    vocab_size: int = 4,
    length: int = 4,
    samples: int = 20000,
    max_monte_carlo_steps: int = 32,
    schedule: str = "linear",
    seed: int = 0,
    out: str = "runs/discrete_eval",
    verbose: bool = True,
) -> dict[str, str]:
    """Evaluates every sampler of ``processes`` on one oracle and writes the report into ``out``."""
    from difforge.samplers.discrete.oracle import oracle_by_name
    from difforge.samplers.discrete.oracle.evaluate import SUITES, evaluate

    unknown = [p for p in processes if p not in SUITES]
    if unknown:
        raise ValueError(f"unknown process(es) {unknown}; choose from {sorted(SUITES)}")
    sizes = {} if oracle_name in ("grid", "potts") else {"N": vocab_size, "L": length}
    oracle = oracle_by_name(oracle_name, seed=seed, **sizes)

    def show(e: Entry) -> None:
        if verbose:
            print(f"  {e.process:8s} {e.variant:26s} steps {e.steps:3d}  NFE {e.nfe:4d}  TV {e.tv:.4f}  "
                  f"KL {e.kl:.4f}  ({e.mode}, {e.seconds:.1f} s)", flush=True)  # fmt: skip

    entries = []
    for process in processes:
        entries += evaluate(oracle, process, list(steps_list), schedule=schedule, samples=samples, seed=seed,
                            max_monte_carlo_steps=max_monte_carlo_steps, progress=show)  # fmt: skip
    title = (f"Discrete samplers vs the exact {oracle.name} oracle (N = {oracle.vocab_size}, L = {oracle.length}, "
             f"{oracle.num_states} states; schedule {schedule})")  # fmt: skip
    return write_report(entries, out, title)
