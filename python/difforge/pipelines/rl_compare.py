"""Two-stage (NVFP4 explore, BF16 train) against plain BF16 GRPO at equal compute: :func:`compare` runs both
:mod:`difforge.pipelines.rl` modes on one budget of BF16-equivalent rollouts and writes a table and the curves."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from difforge.pipelines.metrics import plot_rewards, read_metrics
from difforge.pipelines.rl import EMULATION_NOTE, RLConfig, RLResult, run_rl


@dataclass
class Comparison:
    """:func:`compare`'s outcome: the Markdown table (also in ``out/compare.md``), the budget and both runs."""

    table: str
    budget: float
    results: dict[str, RLResult]
    out: Path


_SHARED_FIELDS = ("checkpoint", "reward", "steps", "noise_level", "shift", "shape", "seed", "eval_prompts",
                  "eval_samples", "device", "precision")  # fmt: skip


def compare(two_stage: RLConfig, bf16: RLConfig, out: str | Path, *, budget: float | None = None) -> Comparison:
    """Runs both modes at equal compute and writes ``out/compare.md`` (table) and ``out/compare.png`` (curves).

    Equal compute means an equal budget of BF16-equivalent rollouts (module docstring), not wall-clock: a CPU
    emulates NVFP4, so wall-clock would only measure the emulation. Each run gets ``floor(budget /
    cfg.iteration_cost())`` iterations; ``budget`` defaults to what ``two_stage.iterations`` iterations cost. The
    runs go to ``out/two-stage`` and ``out/bf16`` (their ``out`` and ``iterations`` are replaced). Both configs
    must agree on the checkpoint, reward, sampling and evaluation settings.
    """
    if two_stage.mode != "two-stage" or bf16.mode != "bf16":
        raise ValueError(f"compare: needs a two-stage and a bf16 config, got {two_stage.mode!r} and {bf16.mode!r}")
    differ = [f"{name}: {getattr(two_stage, name)!r} vs {getattr(bf16, name)!r}" for name in _SHARED_FIELDS
              if getattr(two_stage, name) != getattr(bf16, name)]  # fmt: skip
    if differ:
        raise ValueError("compare: the two configs must agree on " + "; ".join(differ))
    budget = two_stage.iterations * two_stage.iteration_cost() if budget is None else float(budget)
    out = Path(out)
    configs = {}
    for cfg in (two_stage, bf16):
        iterations = math.floor(budget / cfg.iteration_cost() + 1e-9)
        if iterations < 1:
            raise ValueError(
                f"compare: budget {budget:g} is below one {cfg.mode} iteration ({cfg.iteration_cost():g} "
                "BF16-equivalent rollouts)"
            )
        configs[cfg.mode] = dataclasses.replace(cfg, iterations=iterations, out=str(out / cfg.mode))
    results = {mode: run_rl(cfg) for mode, cfg in configs.items()}
    rows = [
        "| run | iterations | BF16 rollouts | NVFP4 rollouts | BF16-equivalent | wall-clock s (explore / rollout / "
        "update) | eval reward before | eval reward after | gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        rows.append(
            f"| {mode} | {r.iterations} | {r.bf16_rollouts} | {r.nvfp4_rollouts} | {r.equivalent_rollouts:.1f} | "
            f"{r.wall_s:.1f} ({r.explore_s:.1f} / {r.rollout_s:.1f} / {r.update_s:.1f}) | "
            f"{r.eval_reward_before:.4f} | {r.eval_reward_after:.4f} | "
            f"{r.eval_reward_after - r.eval_reward_before:+.4f} |"
        )
    explored = results["two-stage"]
    notes = [
        f"Reward `{explored.reward}`; budget {budget:.1f} BF16-equivalent rollouts (an NVFP4 rollout priced at "
        f"{two_stage.nvfp4_cost:g}); device {explored.device}.",
    ]
    if not explored.native_fp4:
        notes.append(EMULATION_NOTE)
    table = "\n".join(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n\n" + "\n\n".join(notes) + "\n")
    plot_rewards({mode: read_metrics(r.out / "metrics.jsonl") for mode, r in results.items()}, out / "compare.png",
                 title=f"two-stage vs bf16 at {budget:.1f} BF16-equivalent rollouts")  # fmt: skip
    return Comparison(table, budget, results, out)
