"""Training a :class:`~difforge.models.DiscreteTransformer` on scikit-learn's digits (64 tokens over 17 grey
levels), masked or uniform discrete diffusion, with the linear schedule ``alpha = 1 - t``.

Objectives (per sample, divided by the sequence length L; t drawn low-discrepancy over the batch):

* masked: MDLM's continuous-time NELBO ``E_t[(1/t) * sum over masked i of -log p(x0_i | x_t)] / L`` (the weight
  ``-alpha'(t) / (1 - alpha(t)) = 1/t``; SUBS makes unmasked positions cost nothing). An upper bound on the
  model's negative log-likelihood per token.
* uniform: the denoiser's cross-entropy ``E_t[sum over all i of -log p(x0_i | x_t)] / L`` with
  ``x_t ~ alpha * x0 + (1 - alpha) * uniform``: a denoiser-parametrised uniform model, not an ELBO; the samplers
  turn its output into concrete scores or leave-one-out posteriors exactly (spec section 2).

Determinism and resume: the batch and the noise of step k come from a generator seeded by (seed, k), so a run
resumed from a checkpoint (model, EMA, optimizer) continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difforge.data.digits import DIGITS_LENGTH, DIGITS_LEVELS, DIGITS_SIDE, split_digits
from difforge.models.discrete_transformer import DiscreteTransformer, DiscreteTransformerConfig
from difforge.pipelines import checkpoint as ckpt
from difforge.pipelines.ema import EMA
from difforge.pipelines.metrics import MetricsLog, plot_loss

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "difforge.discrete"
PROCESSES = ("masked", "uniform")
# Fields that only say where and how long to run: everything else must match a checkpoint to resume it.
_RUN_ONLY_FIELDS = ("steps", "out", "resume", "device", "progress", "log_every", "eval_every", "ckpt_every", "keep")


@dataclass
class DiscreteTrainConfig:
    """Everything a digits training run depends on (the flags of ``difforge discrete train``). ``dim``, ``depth``,
    ``heads``, ``ffn`` (None: 4 * dim), ``fused_norm`` and ``backend`` override the model's defaults."""

    process: str = "masked"
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay after warmup, down to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0: no EMA
    t_min: float = 1e-3  # t ~ U(t_min, 1): keeps the 1/t weight bounded
    seed: int = 0
    split_seed: int = 0  # the 90/10 train/held-out split (shared by runs of different seeds)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    ffn: int | None = None
    fused_norm: bool = True
    backend: str = "difforge"
    out: str = "runs/discrete"
    resume: bool = False
    device: str | None = None
    progress: bool = True
    log_every: int = 1
    eval_every: int = 100
    ckpt_every: int = 200
    keep: int = 2

    def __post_init__(self) -> None:
        checks = [
            ("process", self.process in PROCESSES, '"masked" or "uniform"'), ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("warmup", self.warmup >= 0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: no EMA)"),
            ("t_min", 0 < self.t_min < 1, "in (0, 1)"), ("log_every", self.log_every >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 1, ">= 1"), ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
            ("keep", self.keep >= 1, ">= 1"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"DiscreteTrainConfig: {name} must be {expected}, got {getattr(self, name)!r}")
        self.model_config()  # raises on bad model overrides

    def model_config(self) -> DiscreteTransformerConfig:
        """The model of the run: digits' vocabulary, length and 8x8 grid with this run's sizes."""
        return DiscreteTransformerConfig(
            vocab_size=DIGITS_LEVELS, length=DIGITS_LENGTH, grid=(DIGITS_SIDE, DIGITS_SIDE), dim=self.dim,
            depth=self.depth, heads=self.heads, ffn=self.ffn, process=self.process, fused_norm=self.fused_norm,
            backend=self.backend,
        )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (JSON-able)."""
        d = dataclasses.asdict(self)
        for name in _RUN_ONLY_FIELDS:
            d.pop(name)
        return d


@dataclass
class DiscreteTrainResult:
    """Summary of a run: losses of the first and last step, the last held-out objective, size and time."""

    steps: int
    first_loss: float
    final_loss: float
    held_out_loss: float  # the objective on the held-out split (EMA weights when EMA is on), fixed noise
    params: int
    seconds: float
    out: Path


# ---- objectives ----


def stratified_times(batch: int, generator: torch.Generator, t_min: float) -> Tensor:
    """``[batch]`` float32 times in [t_min, 1): one shared uniform offset plus ``b / batch``, modulo 1, so every
    batch covers [0, 1) evenly (low-discrepancy, lower-variance loss than i.i.d. times)."""
    u = (torch.rand((), generator=generator) + torch.arange(batch) / batch) % 1.0
    return t_min + (1.0 - t_min) * u


def masked_diffusion_loss(model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, vocab_size: int) -> Tensor:
    """Per-sample MDLM NELBO term at times ``t`` (alpha = 1 - t), divided by L: position i is masked (token
    ``vocab_size``) where ``noise[b, i] < t[b]``. Returns ``[B]`` float32."""
    masked = noise < t[:, None]
    x_t = torch.where(masked, vocab_size, x0)
    log_probs = model(x_t, 1.0 - t)
    nll = -log_probs.gather(-1, x0[..., None]).squeeze(-1)
    return torch.where(masked, nll, 0.0).sum(-1) / (t * x0.shape[1])


def uniform_denoiser_loss(
    model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, random_tokens: Tensor
) -> Tensor:  # fmt: skip
    """Per-sample denoiser cross-entropy of the uniform process at alpha = 1 - t: position i keeps ``x0`` where
    ``noise[b, i] < alpha[b]`` and is ``random_tokens[b, i]`` otherwise (a uniform draw, possibly x0 itself).
    Returns ``[B]`` float32: the mean over positions of ``-log p(x0_i | x_t)``."""
    alpha = 1.0 - t
    x_t = torch.where(noise < alpha[:, None], x0, random_tokens)
    log_probs = model(x_t, alpha)
    return -log_probs.gather(-1, x0[..., None]).squeeze(-1).mean(-1)


def objective(model: nn.Module, x0: Tensor, process: str, generator: torch.Generator, t_min: float) -> Tensor:
    """The training objective of ``process`` on clean batch ``x0 [B, L]`` with times and noise from the CPU
    ``generator`` (moved to x0's device). Returns ``[B]`` per-sample losses."""
    B, L = x0.shape
    vocab_size = model.config.vocab_size
    t = stratified_times(B, generator, t_min).to(x0.device)
    noise = torch.rand(B, L, generator=generator).to(x0.device)
    if process == "masked":
        return masked_diffusion_loss(model, x0, t, noise, vocab_size)
    random_tokens = torch.randint(vocab_size, (B, L), generator=generator).to(x0.device)
    return uniform_denoiser_loss(model, x0, t, noise, random_tokens)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's batch and noise: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + 17)


@torch.no_grad()
def evaluate(model: nn.Module, data: Tensor, process: str, *, seed: int, t_min: float, batch_size: int = 256) -> float:
    """The mean objective over ``data`` with noise from a generator seeded by ``seed`` (the same every call)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(data), batch_size):
        total += float(objective(model, data[start : start + batch_size], process, generator, t_min).sum())
    return total / len(data)


# ---- checkpoints ----


def load_discrete_model(
    path: str | Path, *, device: torch.device | str = "cpu", ema: bool = True
) -> tuple[DiscreteTransformer, ckpt.Checkpoint]:
    """The model of a ``difforge discrete train`` checkpoint (a run folder or a ``step-*`` folder), in eval mode
    on ``device``: its EMA weights when saved and ``ema`` is True, else the raw ones. Returns
    ``(model, checkpoint)``.

    Raises:
        CheckpointError: no readable checkpoint at ``path``. ValueError: the checkpoint is not a discrete
        diffusion model's (e.g. a video DiT run).
    """
    state = ckpt.load_checkpoint(path, map_location="cpu")
    if state.meta.get("kind") != CHECKPOINT_KIND or "model_config" not in state.meta:
        raise ValueError(f"{state.path} is not a `difforge discrete train` checkpoint (no discrete model config)")
    model = DiscreteTransformer(DiscreteTransformerConfig.from_dict(state.meta["model_config"]))
    weights = dict(state.tensors["model"])
    if ema and "ema" in state.tensors:
        weights.update(state.tensors["ema"])
    model.load_state_dict(weights)
    return model.to(device).eval(), state


def _save(out: Path, step: int, model: nn.Module, ema: EMA | None, optimizer, cfg: DiscreteTrainConfig) -> None:
    opt_tensors, opt_meta = ckpt.optimizer_state_tensors(optimizer)
    tensors = {"model": model.state_dict(), "optimizer": opt_tensors}
    if ema is not None:
        tensors["ema"] = ema.shadow
    meta = {
        "kind": CHECKPOINT_KIND, "config": cfg.identity(), "model_config": cfg.model_config().to_dict(),
        "optimizer": opt_meta, "ema_updates": ema.updates if ema is not None else 0,
    }  # fmt: skip
    ckpt.save_checkpoint(out, step=step, tensors=tensors, meta=meta, keep=cfg.keep)


# ---- the run ----


def _learning_rate(cfg: DiscreteTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _eval_model(model: DiscreteTransformer, ema: EMA | None) -> DiscreteTransformer:
    """The model to evaluate: a copy holding the EMA weights, or the model itself."""
    if ema is None:
        return model
    averaged = DiscreteTransformer(model.config).to(next(model.parameters()).device)
    ema.copy_to(averaged)
    return averaged.eval()


def _resume(cfg: DiscreteTrainConfig, model: nn.Module, ema: EMA | None, optimizer, device: torch.device) -> int:
    """Loads the latest checkpoint of ``cfg.out`` (which must have this run's config) into the model, EMA and
    optimizer; returns its step, 0 when there is none."""
    if ckpt.latest_checkpoint(cfg.out) is None:
        logger.info("--resume: no checkpoint in %s, starting from scratch", cfg.out)
        return 0
    state = ckpt.load_checkpoint(cfg.out, map_location=device, expected=cfg.identity())
    model.load_state_dict(state.tensors["model"])
    ckpt.load_optimizer_state(optimizer, state.tensors["optimizer"], state.meta["optimizer"])
    if ema is not None:
        ema.shadow = {name: t.float() for name, t in state.tensors["ema"].items()}
        ema.updates = state.meta["ema_updates"]
    logger.info("resumed from %s at step %d", state.path, state.step)
    return state.step


def train_discrete(cfg: DiscreteTrainConfig) -> DiscreteTrainResult:
    """Runs (or, with ``cfg.resume``, continues) a training run on the digits' training split; writes
    checkpoints, ``metrics.jsonl``, ``config.json`` and ``loss.png`` into ``cfg.out``."""
    out, device = Path(cfg.out), _device(cfg.device)
    train_set, held_out = (part.to(device) for part in split_digits(seed=cfg.split_seed))
    torch.manual_seed(cfg.seed)
    model = DiscreteTransformer(cfg.model_config()).to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = _resume(cfg, model, ema, optimizer, device) if cfg.resume else 0
    if start_step >= cfg.steps:
        raise ValueError(f"the checkpoint in {out} is at step {start_step}; --steps {cfg.steps} asks for no more "
                         "(--steps is the total, resumed steps included)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg.identity(), "model_config": cfg.model_config().to_dict()},
                                                indent=2))  # fmt: skip
    metrics = MetricsLog(out / "metrics.jsonl", truncate_after=start_step)
    progress = _progress(cfg, start_step)
    first_loss = final_loss = held_out_loss = float("nan")
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        step_start = time.perf_counter()
        lr = _learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = step_generator(cfg.seed, step)
        batch = train_set[torch.randint(len(train_set), (cfg.batch_size,), generator=generator).to(device)]
        loss = objective(model, batch, cfg.process, generator, cfg.t_min).mean()
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        done, final_loss = step + 1, loss.item()
        first_loss = final_loss if math.isnan(first_loss) else first_loss
        record: dict[str, Any] = {}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            held_out_loss = evaluate(_eval_model(model, ema), held_out, cfg.process, seed=cfg.seed, t_min=cfg.t_min)
            record["held_out_loss"] = held_out_loss
        if done % cfg.log_every == 0 or done == cfg.steps or record:
            metrics.write(step=done, loss=final_loss, lr=lr, grad_norm=grad_norm,
                          step_time_s=time.perf_counter() - step_start, **record)  # fmt: skip
        progress.update(1)
        progress.set_postfix(loss=f"{final_loss:.4f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(out, done, model, ema, optimizer, cfg)
    progress.close()
    plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.process} discrete diffusion loss")
    return DiscreteTrainResult(
        steps=cfg.steps, first_loss=first_loss, final_loss=final_loss, held_out_loss=held_out_loss,
        params=sum(p.numel() for p in model.parameters()), seconds=time.perf_counter() - started, out=out,
    )  # fmt: skip


def _progress(cfg: DiscreteTrainConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc=f"train {cfg.process}",
                unit="step", dynamic_ncols=True)  # fmt: skip
