"""RL fine-tuning of a trained video DiT with Flow-GRPO: plain (``mode="bf16"``) or Sol-RL's two-stage "FP4
explore, BF16 train" (``mode="two-stage"``).

Each iteration draws ``prompts`` conditions (:func:`~difforge.pipelines.video_model.prompts`) and then

* ``bf16``: the policy samples ``group`` SDE candidates per prompt in full precision
  (:func:`~difforge.rl.rollout.sample_sde`); the rewards give group-relative advantages; PPO-clip update.
* ``two-stage`` (Sol-RL, arXiv 2604.06916): stage 1, a copy of the current policy with NVFP4 linears
  (:func:`~difforge.pipelines.video_model.quantize_for_rollouts`, re-quantized every iteration since the weights
  move) samples a pool of ``pool`` candidates per prompt, cheap on FP4 tensor cores, and only their rewards are
  kept; per prompt the ``top_k`` best and ``bottom_k`` worst (:func:`~difforge.rl.grpo.select_contrastive`) are
  regenerated in stage 2 by the full-precision policy from the same seeds (the same initial noise and per-step
  eps, :func:`~difforge.rl.rollout.candidate_noise`), rescored, and trained on exactly as a GRPO group.

The update (both modes): ``inner_epochs`` passes over the trajectories just sampled; each pass accumulates the PPO
clipped loss (plus ``kl`` times the KL to the frozen starting policy when ``kl > 0``) over a random
``train_fraction`` of the stochastic steps (the same steps for every candidate) and takes one AdamW step.

Evaluation: a fixed batch (``eval_prompts`` prompts x ``eval_samples`` seeds, the same in every iteration and in
both modes for one ``seed``) sampled with the deterministic Euler ODE in full precision, before training and every
``eval_every`` iterations. The ODE makes the curve measure the policy rather than the sampling noise.

Accounting: a rollout is one full sampling trajectory; the full-precision ("BF16") ones and the NVFP4 ones are
counted separately, and ``equivalent_rollouts = bf16 + nvfp4_cost * nvfp4`` prices the NVFP4 ones at
``nvfp4_cost`` BF16 rollouts (default 1 / 2.4: Sol-RL's rollout speed-up on Blackwell FP4 tensor cores). Without
FP4 tensor cores (CPUs, GPUs before Blackwell) the NVFP4 linears dequantize their weights and are not expected to
be faster than full precision: the measured wall-clock (stage 1 ``explore_s`` and stage 2 ``rollout_s``
separately) tells that story. Evaluation rollouts are not counted.

Outputs in ``out``: ``config.json``, ``metrics.jsonl`` (iteration 0 = before training), ``reward.png``,
``report.json`` and a checkpoint of the tuned policy (``step-<iterations>``, train_video's meta layout, no EMA) that
``load_video_model(out)`` loads. :mod:`difforge.pipelines.rl_compare` runs both modes at equal compute.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difforge.pipelines import checkpoint as ckpt
from difforge.pipelines.device import autocast, synchronize
from difforge.pipelines.metrics import MetricsLog, plot_rewards, read_metrics
from difforge.pipelines.video_model import load_video_model, prompts, quantize_for_rollouts
from difforge.rl.grpo import clipped_objective, gaussian_kl, group_advantages, select_contrastive
from difforge.rl.rewards import Reward, get_reward
from difforge.rl.rollout import Rollout, candidate_noise, sample_sde, sample_sde_videos, step_log_prob
from difforge.samplers.continuous import sample_video

MODES = ("two-stage", "bf16")
SOL_RL_ROLLOUT_SPEEDUP = 2.4  # Sol-RL's NVFP4 rollout acceleration (FP4 tensor cores, Blackwell)
EMULATION_NOTE = (
    "No FP4 tensor cores on this device (a CPU, or a GPU before Blackwell): the NVFP4 linears dequantize their "
    "weights instead (emulated on a CPU), so stage 1 is not expected to be faster than full precision here; "
    "equivalent_rollouts prices an NVFP4 rollout at nvfp4_cost BF16 rollouts instead."
)


@dataclass
class RLConfig:
    """An RL run (CLI flags of ``difforge rl`` map onto these fields; see the module docstring for the method).

    ``reward``: a built-in name, ``"package.module:function"`` or a callable (:func:`~difforge.rl.get_reward`).
    ``shape``: latent (T, H, W) of the samples. ``group`` is used by ``mode="bf16"``; ``pool``, ``top_k`` and
    ``bottom_k`` by ``mode="two-stage"``. ``precision``: ``"auto"`` samples and trains in bf16 autocast on CUDA
    and in float32 on the CPU.
    """

    checkpoint: str
    out: str = "runs/rl"
    reward: str | Callable = "brightness"
    mode: str = "two-stage"
    iterations: int = 20
    prompts: int = 4  # per iteration
    group: int = 8  # bf16: candidates per prompt
    pool: int = 32  # two-stage: NVFP4 candidates per prompt
    top_k: int = 4  # two-stage: best candidates regenerated per prompt
    bottom_k: int = 4  # two-stage: worst candidates regenerated per prompt
    steps: int = 10  # sampling steps (the last one deterministic)
    noise_level: float = 0.7  # Flow-GRPO's a in sigma_t = a sqrt(t / (1 - t))
    shift: float = 1.0
    shape: tuple[int, int, int] = (4, 16, 16)
    lr: float = 3e-4
    clip: float = 1e-3  # PPO clip range of the per-element-averaged log-ratio
    kl: float = 0.0  # beta of the KL to the starting policy (0: no reference model)
    inner_epochs: int = 1
    train_fraction: float = 1.0  # of the stochastic steps trained on per iteration
    grad_clip: float = 1.0  # 0: no clipping
    micro_batch: int = 8  # rows per model call (fixed: keeps regenerated trajectories bit-identical)
    eval_prompts: int = 4
    eval_samples: int = 2  # seeds per evaluation prompt
    eval_every: int = 1
    nvfp4_cost: float = round(1 / SOL_RL_ROLLOUT_SPEEDUP, 4)
    seed: int = 0
    device: str | None = None  # None: CUDA when available
    precision: str = "auto"  # "auto" | "fp32" | "bf16"
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.shape, Sequence) and len(self.shape) == 3):
            raise ValueError(f"RLConfig: shape must be three positive ints (T, H, W), got {self.shape!r}")
        self.shape = tuple(int(n) for n in self.shape)
        checks = [
            ("mode", self.mode in MODES, " or ".join(f'"{m}"' for m in MODES)),
            ("shape", min(self.shape) >= 1, "three positive ints (T, H, W)"),
            ("iterations", self.iterations >= 1, ">= 1"), ("prompts", self.prompts >= 1, ">= 1"),
            ("steps", self.steps >= 2, ">= 2 (the last step is deterministic)"),
            ("noise_level", self.noise_level > 0, "> 0"), ("shift", self.shift > 0, "> 0"),
            ("lr", self.lr > 0, "> 0"), ("clip", self.clip > 0, "> 0"), ("kl", self.kl >= 0, ">= 0 (0: off)"),
            ("inner_epochs", self.inner_epochs >= 1, ">= 1"),
            ("train_fraction", 0 < self.train_fraction <= 1, "in (0, 1]"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("micro_batch", self.micro_batch >= 1, ">= 1"), ("eval_prompts", self.eval_prompts >= 1, ">= 1"),
            ("eval_samples", self.eval_samples >= 1, ">= 1"), ("eval_every", self.eval_every >= 1, ">= 1"),
            ("nvfp4_cost", self.nvfp4_cost > 0, "> 0"),
            ("precision", self.precision in ("auto", "fp32", "bf16"), '"auto", "fp32" or "bf16"'),
        ]  # fmt: skip
        if self.mode == "bf16":
            checks.append(("group", self.group >= 2, ">= 2 (advantages compare candidates of one prompt)"))
        else:
            checks += [
                ("top_k", self.top_k >= 0, ">= 0"), ("bottom_k", self.bottom_k >= 0, ">= 0"),
                ("top_k", self.top_k + self.bottom_k >= 2, "such that top_k + bottom_k >= 2"),
                ("pool", self.pool >= self.top_k + self.bottom_k,
                 f">= top_k + bottom_k = {self.top_k + self.bottom_k} (the selection comes from the pool)"),
            ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"RLConfig: {name} must be {expected}, got {getattr(self, name)!r}")
        get_reward(self.reward)  # an unknown reward fails here, listing the built-ins

    @property
    def group_size(self) -> int:
        """Trajectories trained on per prompt: ``group`` (bf16) or ``top_k + bottom_k`` (two-stage)."""
        return self.group if self.mode == "bf16" else self.top_k + self.bottom_k

    def iteration_cost(self) -> float:
        """BF16-equivalent rollouts of one iteration (see the module docstring)."""
        nvfp4 = self.pool * self.nvfp4_cost if self.mode == "two-stage" else 0.0
        return self.prompts * (self.group_size + nvfp4)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reward"] = get_reward(self.reward).name
        d["shape"] = list(self.shape)
        return d


@dataclass
class RLResult:
    """Summary of a run. Rewards: ``eval_*`` on the fixed ODE evaluation batch, ``train_*`` the mean over the
    full-precision trajectories trained on in the first / last iteration. ``wall_s = explore_s + rollout_s +
    update_s`` (evaluation excluded)."""

    out: Path
    mode: str
    reward: str
    iterations: int
    eval_reward_before: float
    eval_reward_after: float
    train_reward_first: float
    train_reward_last: float
    wall_s: float
    explore_s: float
    rollout_s: float
    update_s: float
    eval_s: float
    bf16_rollouts: int
    nvfp4_rollouts: int
    equivalent_rollouts: float
    checkpoint: Path
    device: str
    native_fp4: bool  # FP4 tensor cores (Blackwell): only there is stage 1 expected to be cheaper


# ---- helpers ----


def _derive_seed(*words: Any) -> int:
    """A 63-bit seed that is a pure function of ``words`` (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(repr(words).encode()).digest()[:8], "little") >> 1


def _native_fp4(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def _repeat(items: list, times: int) -> list:
    return [item for item in items for _ in range(times)]


@dataclass
class _Batch:
    """One iteration's training data: the full-precision rollout (rewards set), grouped ``[P, G]`` by prompt."""

    rollout: Rollout
    rewards: Tensor  # [P, G]
    explore_s: float
    rollout_s: float
    nvfp4_rollouts: int
    stats: dict[str, float]


class _Run:
    """State shared by the steps of one run."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        self.reward: Reward = get_reward(cfg.reward)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.loaded = load_video_model(cfg.checkpoint, device=self.device)  # CheckpointError when missing
        self.policy = self.loaded.model.float()
        self.latent_shape = (self.loaded.config.in_channels, *cfg.shape)
        try:
            self.policy.grid((1, *self.latent_shape))
        except ValueError as error:
            raise ValueError(f"RLConfig: shape {cfg.shape} does not fit the model: {error}") from error
        self.policy.requires_grad_(True)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False) if cfg.kl > 0 else None
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        context, conditions, _ = prompts(cfg.eval_prompts, self.loaded.config, seed=_derive_seed(cfg.seed, "eval"),
                                         shape=cfg.shape)  # fmt: skip
        self.eval_context = context.repeat_interleave(cfg.eval_samples, 0).to(self.device)
        self.eval_conditions = _repeat(conditions, cfg.eval_samples)
        seeds = [_derive_seed(cfg.seed, "eval", i) for i in range(len(self.eval_conditions))]
        self.eval_noise = torch.stack([candidate_noise(s, self.latent_shape, 1)[0] for s in seeds]).to(self.device)

    def autocast(self):
        return autocast(self.device, self.cfg.precision)

    def evaluate(self) -> float:
        """Mean reward of the fixed evaluation batch, sampled with the Euler ODE by the current policy."""
        with self.autocast():
            video = sample_video(self.policy, self.eval_noise, self.eval_context, steps=self.cfg.steps,
                                 shift=self.cfg.shift).video  # fmt: skip
        return float(self.reward(video.float(), self.eval_conditions).mean())

    def sample(self, context: Tensor, conditions: list, seeds: list[int]) -> Rollout:
        """Full-precision SDE rollouts of ``seeds`` (one per context row), scored."""
        cfg = self.cfg
        with self.autocast():
            rollout = sample_sde(self.policy, context, steps=cfg.steps, noise_level=cfg.noise_level, seeds=seeds,
                                 shape=self.latent_shape, shift=cfg.shift, micro_batch=cfg.micro_batch)  # fmt: skip
        rollout.rewards = self.reward(rollout.videos, conditions)
        return rollout

    def batch(self, iteration: int) -> _Batch:
        cfg = self.cfg
        context, conditions, _ = prompts(cfg.prompts, self.loaded.config, seed=_derive_seed(cfg.seed, "prompts",
                                         iteration), shape=cfg.shape)  # fmt: skip
        context = context.to(self.device)
        candidates = cfg.group if cfg.mode == "bf16" else cfg.pool
        seeds = [[_derive_seed(cfg.seed, "candidate", iteration, p, n) for n in range(candidates)]
                 for p in range(cfg.prompts)]  # fmt: skip
        if cfg.mode == "bf16":
            start = time.perf_counter()
            rollout = self.sample(context.repeat_interleave(cfg.group, 0), _repeat(conditions, cfg.group),
                                  [s for row in seeds for s in row])  # fmt: skip
            synchronize(self.device)
            rewards = rollout.rewards.view(cfg.prompts, cfg.group)
            return _Batch(rollout, rewards, 0.0, time.perf_counter() - start, 0, {})

        # Stage 1: explore with an NVFP4 copy of the current weights; keep only the rewards.
        start = time.perf_counter()
        explorer = quantize_for_rollouts(copy.deepcopy(self.policy), "nvfp4").requires_grad_(False)
        with self.autocast():
            videos = sample_sde_videos(
                explorer, context.repeat_interleave(cfg.pool, 0), seeds=[s for row in seeds for s in row],
                shape=self.latent_shape, steps=cfg.steps, noise_level=cfg.noise_level, shift=cfg.shift,
                micro_batch=cfg.micro_batch,
            )  # fmt: skip
        del explorer
        pool_rewards = self.reward(videos.float(), _repeat(conditions, cfg.pool)).view(cfg.prompts, cfg.pool).cpu()
        chosen = select_contrastive(pool_rewards, cfg.top_k, cfg.bottom_k)  # [P, k]
        synchronize(self.device)
        explore_s = time.perf_counter() - start

        # Stage 2: regenerate the chosen candidates in full precision from their seeds, and rescore them.
        start = time.perf_counter()
        k = cfg.top_k + cfg.bottom_k
        chosen_seeds = [seeds[p][n] for p, row in enumerate(chosen.tolist()) for n in row]
        rollout = self.sample(context.repeat_interleave(k, 0), _repeat(conditions, k), chosen_seeds)
        synchronize(self.device)
        rewards = rollout.rewards.view(cfg.prompts, k)
        gap = (pool_rewards.gather(1, chosen) - rewards.cpu()).abs().mean()
        stats = {"pool_reward": float(pool_rewards.mean()), "nvfp4_reward_gap": float(gap)}
        return _Batch(rollout, rewards, explore_s, time.perf_counter() - start, cfg.prompts * cfg.pool, stats)

    def update(self, rollout: Rollout, advantages: Tensor, iteration: int) -> dict[str, float]:
        """``inner_epochs`` AdamW steps on the PPO loss (+ KL) over a random subset of the stochastic steps."""
        cfg = self.cfg
        sde_steps = rollout.steps - 1
        generator = torch.Generator().manual_seed(_derive_seed(cfg.seed, "train-steps", iteration))
        count = max(1, round(cfg.train_fraction * sde_steps))
        train_steps = sorted(torch.randperm(sde_steps, generator=generator)[:count].tolist())
        n, advantages = len(rollout), advantages.to(self.device)
        loss_sum = kl_sum = 0.0
        grad_norm = 0.0
        for _ in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for k in train_steps:
                for start in range(0, n, cfg.micro_batch):
                    rows = torch.arange(start, min(start + cfg.micro_batch, n))
                    with self.autocast():
                        log_prob, mean, std = step_log_prob(self.policy, rollout, k, rows)
                    rows_on = rows.to(self.device)
                    loss = clipped_objective(log_prob, rollout.log_probs[rows_on, k], advantages[rows_on], cfg.clip)
                    if self.reference is not None:
                        with torch.no_grad(), self.autocast():
                            _, reference_mean, _ = step_log_prob(self.reference, rollout, k, rows)
                        kl = gaussian_kl(mean, reference_mean, std).mean()
                        loss = loss + cfg.kl * kl
                        kl_sum += float(kl.detach()) * len(rows) / (n * len(train_steps) * cfg.inner_epochs)
                    weight = len(rows) / (n * len(train_steps))  # the pass's loss is the mean over (step, sample)
                    (loss * weight).backward()
                    loss_sum += float(loss.detach()) * weight / cfg.inner_epochs
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "kl": kl_sum, "grad_norm": grad_norm, "train_steps": len(train_steps)}

    def save(self, out: Path) -> Path:
        """The tuned policy as a checkpoint in train_video's meta layout (no EMA: load_video_model loads it raw)."""
        config = {"rl": self.cfg.to_dict(), "base_checkpoint": str(self.loaded.path),
                  "sizes": [list(s) for s in self.loaded.sizes] or [list(self.cfg.shape)]}  # fmt: skip
        return ckpt.save_checkpoint(
            out, step=self.cfg.iterations, keep=1, tensors={"model": self.policy.state_dict()},
            meta={"config": config, "model_config": self.loaded.config.to_dict()},
        )  # fmt: skip


# ---- the run ----


def run_rl(cfg: RLConfig) -> RLResult:
    """Runs RL as ``cfg`` says (module docstring) and writes its outputs to ``cfg.out``.

    Raises ValueError for a bad config or a shape the model cannot take, and
    :class:`~difforge.pipelines.checkpoint.CheckpointError` for a missing or foreign checkpoint.
    """
    run = _Run(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    metrics = MetricsLog(out / "metrics.jsonl")
    totals = {"explore_s": 0.0, "rollout_s": 0.0, "update_s": 0.0, "eval_s": 0.0, "bf16": 0, "nvfp4": 0}

    def counters() -> dict[str, Any]:
        return {
            "wall_s": totals["explore_s"] + totals["rollout_s"] + totals["update_s"],
            "bf16_rollouts": totals["bf16"], "nvfp4_rollouts": totals["nvfp4"],
            "equivalent_rollouts": totals["bf16"] + cfg.nvfp4_cost * totals["nvfp4"],
        }  # fmt: skip

    def evaluate() -> dict[str, float]:
        start = time.perf_counter()
        value = run.evaluate()
        synchronize(run.device)
        totals["eval_s"] += time.perf_counter() - start
        return {"eval_reward": value}

    eval_before = evaluate()["eval_reward"]
    metrics.write(iteration=0, eval_reward=eval_before, **counters())
    train_rewards: list[float] = []
    eval_after = eval_before
    progress = _progress(cfg)
    for iteration in range(1, cfg.iterations + 1):
        batch = run.batch(iteration)
        start = time.perf_counter()
        advantages = group_advantages(batch.rewards).reshape(-1)
        update = run.update(batch.rollout, advantages, iteration)
        synchronize(run.device)
        update_s = time.perf_counter() - start
        totals["explore_s"] += batch.explore_s
        totals["rollout_s"] += batch.rollout_s
        totals["update_s"] += update_s
        totals["bf16"] += len(batch.rollout)
        totals["nvfp4"] += batch.nvfp4_rollouts
        train_rewards.append(float(batch.rewards.mean()))
        record = {"iteration": iteration, "reward": train_rewards[-1], **batch.stats}
        if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
            record.update(evaluate())
            eval_after = record["eval_reward"]
        metrics.write(**record, explore_s=batch.explore_s, rollout_s=batch.rollout_s, update_s=update_s,
                      **update, **counters())  # fmt: skip
        progress.update(1)
        progress.set_postfix(reward=f"{train_rewards[-1]:.4f}", eval=f"{eval_after:.4f}")
    progress.close()

    checkpoint = run.save(out)
    plot_rewards({cfg.mode: read_metrics(out / "metrics.jsonl")}, out / "reward.png",
                 title=f"{cfg.mode}: {run.reward.name}")  # fmt: skip
    final = counters()
    result = RLResult(
        out=out, mode=cfg.mode, reward=run.reward.name, iterations=cfg.iterations, eval_reward_before=eval_before,
        eval_reward_after=eval_after, train_reward_first=train_rewards[0], train_reward_last=train_rewards[-1],
        wall_s=final["wall_s"], explore_s=totals["explore_s"], rollout_s=totals["rollout_s"],
        update_s=totals["update_s"], eval_s=totals["eval_s"], bf16_rollouts=totals["bf16"],
        nvfp4_rollouts=totals["nvfp4"], equivalent_rollouts=final["equivalent_rollouts"], checkpoint=checkpoint,
        device=str(run.device), native_fp4=_native_fp4(run.device),
    )  # fmt: skip
    report = {**_jsonable(result), "config": cfg.to_dict()}
    if cfg.mode == "two-stage" and not result.native_fp4:
        report["note"] = EMULATION_NOTE
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return result


def _jsonable(result: RLResult) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}


def _progress(cfg: RLConfig):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.iterations, disable=not cfg.progress, desc=f"rl {cfg.mode}", unit="it", dynamic_ncols=True)
