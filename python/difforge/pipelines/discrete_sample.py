"""Sampling a trained digits model with the discrete samplers and reporting sample quality per (method, steps).

Per row: NFE, NLL per token under a trained MASKED model (its NELBO, :func:`masked_nelbo`: an upper bound on the
scorer's negative log-likelihood, so lower is better but it is not the data's true likelihood), token entropy,
unique 2-/4-gram ratios and the duplicate rate (``difforge.samplers.discrete.metrics``), and wall time. The
held-out split of the scorer's run is the reference row: the same metrics on real digits. A low NLL with a low
entropy means mode collapse, so the columns are read together. Outputs: ``report.json``, ``report.md`` and a PNG
grid of sampled digits per (method, steps).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difforge.data.digits import split_digits
from difforge.pipelines.device import synchronize
from difforge.pipelines.discrete_train import load_discrete_model, masked_diffusion_loss

NGRAMS = (2, 4)


@dataclass
class DiscreteSampleConfig:
    """What ``difforge discrete sample`` runs: every method in ``methods`` (``("all",)``: every sampler of the
    checkpoint's process) at every count in ``steps``.

    ``scorer``: the masked checkpoint whose NELBO scores the samples (None: the checkpoint itself when it is
    masked; a uniform checkpoint without a scorer gets no NLL column). ``nll_draws``: noise levels per sample in
    the NELBO estimate. ``out``: where the report goes (None: nothing is written). ``method_options`` go to the
    sampler unchanged."""

    checkpoint: str
    methods: tuple[str, ...] = ("mdlm",)
    steps: tuple[int, ...] = (64,)
    num_samples: int = 128
    seed: int = 0
    scorer: str | None = None
    nll_draws: int = 8
    out: str | None = None
    device: str | None = None
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods, self.steps = tuple(self.methods), tuple(int(k) for k in self.steps)
        checks = [
            ("methods", len(self.methods) > 0, "at least one method"),
            ("steps", len(self.steps) > 0 and min(self.steps) >= 1, "positive step counts"),
            ("num_samples", self.num_samples >= 1, ">= 1"), ("nll_draws", self.nll_draws >= 1, ">= 1"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"DiscreteSampleConfig: {name} must be {expected}, got {getattr(self, name)!r}")


@torch.no_grad()
def masked_nelbo(
    model: nn.Module,
    x0: Tensor,
    *,
    vocab_size: int,
    draws: int = 8,
    seed: int = 0,
    t_min: float = 1e-4,
    batch_size: int = 512,
) -> Tensor:
    """Monte-Carlo estimate of the masked-diffusion NELBO of each sequence, in nats: float64 ``[S]``.

    ``NELBO(x0) = integral over t in (0, 1] of (1/t) E[sum over masked i of -log p(x0_i | x_t)] dt`` with the
    linear schedule (alpha = 1 - t; mask id ``vocab_size``; ``model(x_t, alpha) -> [B, L, N]`` log-probs). It
    bounds ``-log p_model(x0)`` from above, with equality for an exact denoiser. Each sequence gets ``draws``
    stratified times ``t_k = t_min + (1 - t_min)(k + u_k) / draws`` and independent masks, from a CPU generator
    seeded with ``seed`` (reproducible); the integral is truncated at ``t_min``, which drops about
    ``t_min`` times the per-token loss (negligible next to the Monte-Carlo error).
    """
    if x0.dim() != 2 or x0.dtype != torch.int64:
        raise ValueError(f"masked_nelbo: x0 must be int64 [S, L], got {x0.dtype} {tuple(x0.shape)}")
    S, L = x0.shape
    generator = torch.Generator().manual_seed(seed)
    strata = (torch.arange(draws, dtype=torch.float64) + torch.rand(S, draws, generator=generator, dtype=torch.float64))
    t = (t_min + (1 - t_min) * strata / draws).flatten()  # [S * draws], sample-major
    noise = torch.rand(S * draws, L, generator=generator)
    rows = x0.repeat_interleave(draws, dim=0)
    terms = torch.empty(S * draws, dtype=torch.float64)
    for start in range(0, S * draws, batch_size):
        part = slice(start, start + batch_size)
        loss = masked_diffusion_loss(model, rows[part], t[part].to(x0.device), noise[part].to(x0.device), vocab_size)
        terms[part] = loss.double().cpu() * L
    return terms.view(S, draws).mean(1)


def sequence_metrics(samples: Tensor) -> dict[str, float]:
    """Token entropy, unique n-gram ratios and duplicate rate of ``samples [S, L]``."""
    from difforge.samplers.discrete import metrics

    row = {"token_entropy": metrics.token_entropy(samples)}
    row.update({f"unique_{n}gram": metrics.unique_ngram_ratio(samples, n) for n in NGRAMS})
    row["duplicate_rate"] = metrics.duplicate_rate(samples)
    return row


def _nll_columns(scorer: nn.Module | None, samples: Tensor, cfg: DiscreteSampleConfig) -> dict[str, float | None]:
    if scorer is None:
        return {"nll_per_token": None, "nll_stderr": None}
    nelbo = masked_nelbo(scorer, samples, vocab_size=scorer.config.vocab_size, draws=cfg.nll_draws, seed=cfg.seed)
    per_token = nelbo / samples.shape[1]
    stderr = float(per_token.std() / math.sqrt(len(per_token))) if len(per_token) > 1 else float("nan")
    return {"nll_per_token": float(per_token.mean()), "nll_stderr": stderr}


def _load_scorer(cfg: DiscreteSampleConfig, model: nn.Module, device: torch.device):
    """The masked model that scores samples, and its checkpoint (None, None when there is none)."""
    if cfg.scorer is None:
        if model.config.process != "masked":
            return None, None
        return model, None
    scorer, state = load_discrete_model(cfg.scorer, device=device)
    c, s = model.config, scorer.config
    if s.process != "masked":
        raise ValueError(f"--scorer {cfg.scorer} is a {s.process} model; the NLL needs a masked one (its NELBO)")
    if (s.vocab_size, s.length) != (c.vocab_size, c.length):
        raise ValueError(f"--scorer {cfg.scorer} models {s.length} tokens over {s.vocab_size} levels, the sampled "
                         f"model {c.length} over {c.vocab_size}")  # fmt: skip
    return scorer, state


def _report_row(samples: Tensor, scorer: nn.Module | None, cfg: DiscreteSampleConfig, **head: Any) -> dict[str, Any]:
    return {**head, "sequences": len(samples), **_nll_columns(scorer, samples, cfg), **sequence_metrics(samples)}


def _save_grid(samples: Tensor, model: nn.Module, out: Path | None, name: str, title: str) -> str | None:
    """The PNG's file name, or None when there is no output folder or the sequences are not images."""
    if out is None or model.config.grid is None:
        return None
    return save_digit_grid(samples, model.config.grid, out / name, levels=model.config.vocab_size, title=title).name


def sample_discrete(cfg: DiscreteSampleConfig) -> dict[str, Any]:
    """Samples ``cfg.num_samples`` digits with every (method, steps) of ``cfg`` from the checkpoint's model (EMA
    weights), scores them, and returns the report (also written to ``cfg.out`` when set): ``{"rows": [...],
    "reference": {...}, ...}``, one row per (method, steps), the held-out data as the reference.

    Raises:
        CheckpointError: a missing or unreadable checkpoint. ValueError: not a discrete checkpoint, a scorer
        that is not masked or does not match, or an unknown method / bad option (the sampler's message).
    """
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, state = load_discrete_model(cfg.checkpoint, device=device)
    scorer, scorer_state = _load_scorer(cfg, model, device)
    from difforge.samplers.discrete import METHODS, sample  # after the checkpoints: their errors come first

    c = model.config
    out = Path(cfg.out) if cfg.out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # Held out from the scorer's training run (the sampled model's when it scores itself), as many sequences as
    # there are samples where it has enough: n-gram ratios fall as the number of sequences grows.
    split_seed = (scorer_state or state).meta["config"].get("split_seed", 0)
    held_out = split_digits(seed=split_seed)[1][: cfg.num_samples].to(device)
    reference = _report_row(held_out, scorer, cfg, method="held-out data", steps=None, nfe=None, wall_s=None)
    reference["png"] = _save_grid(held_out, model, out, "held_out.png", "held-out digits")
    with torch.inference_mode():  # the first call pays for thread pools and allocations, outside the timings
        model(torch.zeros(1, c.length, dtype=torch.int64, device=device), torch.ones(1, device=device))
    methods = tuple(METHODS[c.process]) if cfg.methods == ("all",) else cfg.methods
    runs = [(method, steps) for method in methods for steps in cfg.steps]
    rows = []
    for method, steps in _progress(runs, cfg.progress):
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            samples, nfe = sample(
                model, shape=(cfg.num_samples, c.length), vocab_size=c.vocab_size, process=c.process, method=method,
                steps=steps, schedule="linear", seed=cfg.seed, return_nfe=True, device=device, **cfg.method_options,
            )  # fmt: skip
        synchronize(device)
        wall = time.perf_counter() - start
        samples = samples.to(device=device, dtype=torch.int64)
        row = _report_row(samples, scorer, cfg, method=method, steps=steps, nfe=int(nfe), wall_s=wall)
        title = f"{method}, {steps} steps ({int(nfe)} NFE)"
        row["png"] = _save_grid(samples, model, out, f"samples_{method}_{steps}.png", title)
        rows.append(row)
    report = {
        "checkpoint": str(state.path), "process": c.process,
        "scorer": None if scorer is None else str((scorer_state or state).path), "num_samples": cfg.num_samples,
        "seed": cfg.seed, "nll_draws": cfg.nll_draws, "device": str(device), "method_options": cfg.method_options,
        "reference": reference, "rows": rows,
    }  # fmt: skip
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(report_markdown(report))
    return report


def _progress(runs: list[tuple[str, int]], enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(runs, disable=not enabled, desc="sample", unit="run", dynamic_ncols=True)


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (held-out data first), with what each column means."""
    head = ["method", "steps", "NFE", "seqs", "NLL/token", "±", "entropy", *[f"uniq {n}-gram" for n in NGRAMS],
            "dup", "wall s"]  # fmt: skip
    lines = [
        f"# discrete sampling report: {report['process']} model",
        "",
        f"checkpoint `{report['checkpoint']}`, {report['num_samples']} samples, seed {report['seed']}, "
        f"device {report['device']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in [report["reference"], *report["rows"]]:
        cells = [row["method"], _cell(row["steps"]), _cell(row["nfe"]), _cell(row["sequences"]),
                 _cell(row["nll_per_token"]), _cell(row["nll_stderr"]), _cell(row["token_entropy"]),
                 *[_cell(row[f"unique_{n}gram"]) for n in NGRAMS], _cell(row["duplicate_rate"]),
                 _cell(row["wall_s"], 2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    scorer = report["scorer"]
    lines += [
        "",
        f"NLL/token: the masked-diffusion NELBO under `{scorer}` ({report['nll_draws']} noise levels per sample), "
        "an upper bound on that model's negative log-likelihood in nats; ± is the standard error of the mean."
        if scorer else "NLL/token: not computed (a uniform model needs a masked `--scorer`).",
        "entropy: mean entropy (nats) of each sample's own token histogram; uniq n-gram: distinct / total n-grams "
        "inside samples (row-major pixels; compare rows with equal seqs); dup: fraction of samples equal to an "
        "earlier one.",
        "",
    ]
    return "\n".join(lines)


def save_digit_grid(
    samples: Tensor, grid: tuple[int, int], path: Path, *, levels: int, title: str, columns: int = 8
) -> Path:
    """The first ``columns**2`` samples as images of shape ``grid`` with ``levels`` grey levels (0 white, the
    highest black), tiled into one PNG with a one-pixel tinted border around each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = samples[: columns * columns].cpu().double().view(-1, *grid)
    rows, (h, w) = math.ceil(len(images) / columns), grid
    # One canvas and one imshow: dozens of subplots would cost seconds per figure.
    canvas = torch.full((rows * (h + 1) + 1, columns * (w + 1) + 1), float("nan"), dtype=torch.float64)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    fig, ax = plt.subplots(figsize=(columns * 0.7, rows * 0.7 + 0.4), dpi=100)
    ax.imshow(canvas.numpy(), cmap=plt.get_cmap("gray_r").with_extremes(bad="#c8d0e0"), vmin=0, vmax=levels - 1,
              interpolation="nearest")  # fmt: skip
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
