"""Video DiT training: flow matching on :class:`~difforge.models.VideoDiT` with AdaptiveLoad buckets, optional
hybrid Skiparse attention, HiF8 linears and Sparse Sequence Parallelism, data parallel across SSP groups.

Processes: ``world = dp * ssp``. Ranks ``[g * ssp, (g + 1) * ssp)`` form SSP group g; they read the same batches
(data-parallel rank g of dp) and each holds a sequence shard. Every rank computes the loss on its own token shard
(a partial sum of the group's mean), so the gradients, averaged by DDP over the world and scaled by ``ssp``, are
exactly those of one process running the whole batch.

Determinism and resume: the batch plan is a pure function of (seed, epoch, dp size) and the times and noise of
micro-step m come from a generator seeded with (seed, m, dp rank), so a run resumed from a checkpoint replays
the same data and noise; the checkpoint holds model, EMA, optimizer and RNG state (see
:mod:`difforge.pipelines.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from difforge.data import AdaptiveLoadSampler, EqualTokenSampler, ShardDataset, SyntheticVideoDataset, calibrate_p
from difforge.models import VideoDiT, VideoDiTConfig, video_dit_config
from difforge.pipelines import checkpoint as ckpt
from difforge.pipelines import sharding
from difforge.pipelines.device import autocast, synchronize
from difforge.pipelines.ema import EMA
from difforge.pipelines.flow_matching import logit_normal_timesteps, noisy_latents
from difforge.pipelines.metrics import MetricsLog, plot_loss

logger = logging.getLogger(__name__)

SYNTHETIC_CACHE_BYTES = 1 << 30  # rendered synthetic samples kept in memory (a tiny run's data set is ~100 MB)

# Fields that only say where and how long to run: everything else must match a checkpoint to resume it.
_RUN_ONLY_FIELDS = ("steps", "out", "resume", "log_every", "ckpt_every", "keep", "progress", "device")


@dataclass
class TrainConfig:
    """Everything a training run depends on (CLI flags of ``difforge train`` map onto these fields)."""

    model: str = "tiny"
    attention: str = "full"  # "full" | "hybrid" (dual_end Skiparse)
    sparse_ratio: int = 2
    full_blocks: int | None = None  # None: the model config's
    causal_chunk: int = 0  # > 0: block-causal attention over chunks of this many latent token frames
    fused_norm: bool = True
    backend: str = "difforge"  # "difforge" | "sdpa"
    hif8: bool = False
    ssp: int = 1
    fsdp: bool = False  # FSDP2 fully_shard across the world instead of DDP
    steps: int = 200
    out: str = "runs/train"
    resume: bool = False
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 10
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.99
    data: str = "synthetic"  # "synthetic" or a folder of safetensors shards
    num_samples: int = 1024
    data_seed: int = 0
    sizes: tuple[tuple[int, int, int], ...] = ((4, 16, 16), (8, 16, 16), (4, 16, 32), (8, 32, 32))
    tokens_per_batch: int = 2048  # M_mem of AdaptiveLoad (tokens after patchify)
    bucketing: str = "adaptive"  # "adaptive" | "equal-token"
    bucket_p: float | None = None  # None: calibrated from measured step times
    per_frame_t: bool = False
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    cond_dropout: float = 0.1  # P(condition -> zeros): trains the unconditional velocity of classifier-free guidance
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    log_every: int = 1
    ckpt_every: int = 50
    keep: int = 2
    progress: bool = True
    device: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = tuple(tuple(int(v) for v in s) for s in self.sizes)
        checks = [
            ("steps", self.steps >= 1, ">= 1"), ("ssp", self.ssp >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("tokens_per_batch", self.tokens_per_batch >= 1, ">= 1"),
            ("num_samples", self.num_samples >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1"),
            ("ckpt_every", self.ckpt_every >= 1, ">= 1"), ("keep", self.keep >= 1, ">= 1"),
            ("attention", self.attention in ("full", "hybrid"), '"full" or "hybrid"'),
            ("bucketing", self.bucketing in ("adaptive", "equal-token"), '"adaptive" or "equal-token"'),
            ("precision", self.precision in ("auto", "fp32", "bf16"), '"auto", "fp32" or "bf16"'),
            ("bucket_p", self.bucket_p is None or 1 < self.bucket_p <= 2, "in (1, 2] or None (calibrate)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("cond_dropout", 0 <= self.cond_dropout < 1, "in [0, 1)"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {name} must be {expected}, got {getattr(self, name)!r}")

    def model_config(self) -> VideoDiTConfig:
        """The VideoDiT config of the run: the named config with this run's attention/norm options."""
        overrides = dict(self.model_overrides, attention=self.attention, sparse_ratio=self.sparse_ratio)
        overrides.update(fused_norm=self.fused_norm, backend=self.backend, causal_chunk=self.causal_chunk)
        if self.full_blocks is not None:
            overrides["full_blocks"] = self.full_blocks
        return video_dit_config(self.model, **overrides)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (JSON-able)."""
        d = dataclasses.asdict(self)
        for name in _RUN_ONLY_FIELDS:
            d.pop(name)
        d["sizes"] = [list(s) for s in self.sizes]
        return d


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    final_loss: float
    out: Path
    bucket_p: float
    tokens_per_s: float
    params: int
    imbalance: float  # mean over steps of the ranks' forward-time imbalance rate (0 for one process)


# ---- processes ----


@dataclass
class _Procs:
    world: int
    rank: int
    ssp: int
    dp: int
    dp_rank: int
    ssp_group: Any  # None for ssp == 1
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_processes(cfg: TrainConfig) -> _Procs:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device == "cuda" or (cfg.device is None and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if world % cfg.ssp:
        raise ValueError(f"difforge train: --ssp {cfg.ssp} must divide the number of processes {world}")
    device = torch.device("cpu")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    group = None
    if cfg.ssp > 1:
        # Every rank must create every group, in the same order.
        groups = [dist.new_group(list(range(g * cfg.ssp, (g + 1) * cfg.ssp))) for g in range(world // cfg.ssp)]
        group = groups[rank // cfg.ssp]
    return _Procs(world, rank, cfg.ssp, world // cfg.ssp, rank // cfg.ssp, group, device)


def _check_parallel_layout(model_config: VideoDiTConfig, ssp: int, token_counts: dict | None = None) -> None:
    """Refuses an SSP degree the model or the data's shapes (``{(T, H, W): tokens}``) cannot be split by, before
    any step runs."""
    if ssp == 1:
        return
    uneven = sorted(shape for shape, tokens in (token_counts or {}).items() if tokens % ssp)
    if uneven:
        raise ValueError(
            f"difforge train: --ssp {ssp} must divide the token count of every latent shape; (T, H, W) = "
            f"{uneven[0]} gives {token_counts[uneven[0]]} tokens after {model_config.patch} patches"
        )
    if model_config.num_heads % ssp:
        raise ValueError(
            f"difforge train: --ssp {ssp} must divide the number of heads {model_config.num_heads} "
            "(full blocks run Ulysses attention over heads)"
        )
    if model_config.attention == "hybrid":
        P, dims = model_config.sparse_ratio, model_config.sparse_dims
        groups = P**dims
        if groups % ssp:
            raise ValueError(
                f"difforge train: --ssp {ssp} must divide the number of Skiparse sub-sequences P^{dims} = {groups} "
                f"(sparse ratio {P}); S > P^{dims} or S not dividing it cannot be sharded"
            )


# ---- data ----


def _dataset(cfg: TrainConfig, model_config: VideoDiTConfig):
    if cfg.data == "synthetic":
        return SyntheticVideoDataset(
            cfg.num_samples, channels=model_config.in_channels, sizes=cfg.sizes, context_dim=model_config.context_dim,
            seed=cfg.data_seed, cache_bytes=SYNTHETIC_CACHE_BYTES,
        )  # fmt: skip
    dataset = ShardDataset(cfg.data)
    if dataset.channels != model_config.in_channels or dataset.context_dim != model_config.context_dim:
        raise ValueError(
            f"difforge train: the shards in {cfg.data} hold latents with C = {dataset.channels} and condition "
            f"tokens of width {dataset.context_dim}; model {cfg.model!r} expects C = {model_config.in_channels} "
            f"and context_dim = {model_config.context_dim}"
        )
    return dataset


def _collate(dataset, indices: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in indices]
    latents = torch.stack([it["latents"] for it in items]).to(device)
    context = torch.stack([it["context"] for it in items]).to(device)
    return latents, context


def _sampler(cfg: TrainConfig, dataset, patch: tuple[int, int, int], p: float, procs: _Procs):
    tokens = [dataset.tokens_of(i, patch) for i in range(len(dataset))]
    keys = [dataset.shape_of(i) for i in range(len(dataset))]
    common = dict(num_replicas=procs.dp, rank=procs.dp_rank, seed=cfg.seed)
    if cfg.bucketing == "equal-token":
        return EqualTokenSampler(tokens, keys, tokens_per_batch=cfg.tokens_per_batch, **common)
    return AdaptiveLoadSampler(tokens, keys, m_mem=cfg.tokens_per_batch, p=p, **common)


def _calibrate_bucket_p(
    model: VideoDiT, dataset, by_shape: dict[tuple, list[int]], tokens_per_batch: int, procs: _Procs
) -> float:
    """AdaptiveLoad's exponent p (spec §9) from measured fwd+bwd times, one batch per bucket shape at its
    memory-capped size B = M_mem // S: fits log(t / B) = p log S + log kappa. Timing full batches rather than
    B = 1 keeps the fixed per-step overhead from flattening the fit."""
    seq, per_sample = [], []
    for indices in by_shape.values():
        seq_len = dataset.tokens_of(indices[0], model.config.patch)
        batch = max(1, tokens_per_batch // seq_len)
        latents, context = _collate(dataset, [indices[k % len(indices)] for k in range(batch)], procs.device)
        t = torch.full((batch,), 0.5, device=procs.device)
        runs = []
        for _ in range(3):  # the first run warms up caches and thread pools
            start = time.perf_counter()
            model(latents, t, context).square().mean().backward()
            synchronize(procs.device)
            runs.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        seq.append(seq_len)
        per_sample.append(min(runs[1:]) / batch)
    p = calibrate_p(seq, per_sample) if len(set(seq)) > 1 else 1.5
    if dist.is_initialized():  # every rank must build the same plan
        p_tensor = torch.tensor([p], dtype=torch.float64, device=procs.device)
        dist.broadcast(p_tensor, src=0)
        p = float(p_tensor.item())
    return p


# ---- one step ----


class _TokenPredictor(nn.Module):
    """Calls :meth:`VideoDiT.forward_tokens`, so DDP's hooks wrap the call training makes."""

    def __init__(self, model: VideoDiT) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: Tensor, t: Tensor, context: Tensor, group: object | None) -> Tensor:
        return self.model.forward_tokens(latents, t, context, group=group)


def micro_step_generator(seed: int, micro_step: int, dp_rank: int) -> torch.Generator:
    """The CPU generator of one micro-step's times and noise: a pure function of (seed, micro-step, dp rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 65_537 + dp_rank)


def flow_matching_loss(
    predictor: nn.Module,
    model: VideoDiT,
    latents: Tensor,
    context: Tensor,
    generator: torch.Generator,
    cfg: TrainConfig,
    ssp_group: object | None = None,
) -> Tensor:
    """This rank's part of the batch's mean squared velocity error: summed over its token shard, divided by the
    element count of the whole batch (the parts of an SSP group add up to the batch mean)."""
    B, T = latents.shape[0], latents.shape[2]
    frames = T // model.config.patch[0]
    t = logit_normal_timesteps(
        (B, frames) if cfg.per_frame_t else (B,), generator, mean=cfg.t_mean, std=cfg.t_std, shift=cfg.t_shift
    )
    noise = torch.randn(latents.shape, generator=generator)
    if cfg.cond_dropout > 0:  # the null condition is all zeros (what guidance passes as the unconditional context)
        keep = torch.rand(B, generator=generator) >= cfg.cond_dropout
        context = context * keep.to(context.device, context.dtype)[:, None, None]
    x_t, velocity = noisy_latents(latents, noise.to(latents.device), t.to(latents.device))
    pred = predictor(x_t, t.to(latents.device), context, ssp_group)
    target = model.patchify(velocity)
    if ssp_group is not None:
        from difforge.parallel import shard_sequence

        target = shard_sequence(target, ssp_group)
    return (pred.float() - target.float()).square().sum() / velocity.numel()


def _learning_rate(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


# ---- the run ----


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> VideoDiT:
    """The run's model, initialised from ``cfg.seed`` (identical on every rank), HiF8 linears when asked."""
    torch.manual_seed(cfg.seed)
    model = VideoDiT(cfg.model_config()).to(device)
    if cfg.hif8:
        from difforge.nn import quantize_linears

        quantize_linears(model, "hif8")
    return model


def train(cfg: TrainConfig) -> TrainResult:
    """Runs (or resumes) a training run; rank 0 writes checkpoints, ``metrics.jsonl`` and ``loss.png`` to
    ``cfg.out``. Returns a summary (on every rank)."""
    model_config = cfg.model_config()
    procs = _setup_processes(cfg)
    out = Path(cfg.out)
    model = build_model(cfg, procs.device)
    dataset = _dataset(cfg, model_config)
    by_shape: dict[tuple, list[int]] = {}  # sample indices per latent shape
    for i in range(len(dataset)):
        by_shape.setdefault(dataset.shape_of(i), []).append(i)
    tokens_of_shape = {shape: dataset.tokens_of(ids[0], model_config.patch) for shape, ids in by_shape.items()}
    _check_parallel_layout(model_config, procs.ssp, tokens_of_shape)

    expected = {**cfg.identity(), "world_size": procs.world}
    resumed = ckpt.latest_checkpoint(out) if cfg.resume else None
    state = None if resumed is None else ckpt.load_checkpoint(resumed, map_location=procs.device, expected=expected)
    if cfg.resume and state is None:
        logger.info("--resume: no checkpoint in %s, starting from scratch", out)
    bucket_p = cfg.bucket_p if state is None else state.meta["bucket_p"]
    if bucket_p is None:  # measured on the unwrapped model, before any sharding
        adaptive = cfg.bucketing == "adaptive"
        bucket_p = _calibrate_bucket_p(model, dataset, by_shape, cfg.tokens_per_batch, procs) if adaptive else 1.5
    sampler = _sampler(cfg, dataset, model_config.patch, bucket_p, procs)

    predictor: nn.Module = _TokenPredictor(model)
    if procs.world > 1:
        predictor = sharding.wrap_data_parallel(predictor, model.blocks, procs.device, cfg.fsdp)
    elif cfg.fsdp:
        raise ValueError("difforge train: --fsdp shards over processes; run it with torchrun --nproc-per-node N > 1")
    # After wrapping: FSDP2 replaces the parameters by sharded ones, which the EMA and the optimizer must hold.
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = 0
    if state is not None:
        sharding.load_full_model_state(model, state.tensors["model"], cfg.fsdp)
        sharding.load_shadow(ema.shadow, state.tensors["ema"])
        ema.updates = state.meta["ema_updates"]
        sharding.load_full_optimizer_state(model, optimizer, state.tensors["optimizer"], state.meta["optimizer"],
                                           cfg.fsdp)  # fmt: skip
        ckpt.set_rng_state(state.tensors.get("rng", {}), state.meta.get("rng", {}))
        start_step = state.step
        logger.info("resumed from %s at step %d", state.path, start_step)

    if start_step >= cfg.steps:
        raise ValueError(f"difforge train: the checkpoint in {out} is at step {start_step}; --steps {cfg.steps} "
                         "asks for no more (--steps is the total, resumed steps included)")  # fmt: skip
    metrics = MetricsLog(out / "metrics.jsonl", enabled=procs.main, truncate_after=start_step)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg.identity(), "model_config": model_config.to_dict(),
                                                     "world_size": procs.world, "bucket_p": bucket_p}, indent=2))
    progress = _progress(cfg, procs, start_step)
    first_loss = final_loss = float("nan")
    tokens_per_s: list[float] = []
    imbalances: list[float] = []
    plans: dict[int, list[list[int]]] = {}
    for step in range(start_step, cfg.steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(cfg, step)
        loss_sum, tokens, forward_s = torch.zeros((), dtype=torch.float64), 0, 0.0
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            epoch, index = divmod(micro, len(sampler))
            if epoch not in plans:
                plans = {epoch: sampler.batches(epoch)}
            latents, context = _collate(dataset, plans[epoch][index], procs.device)
            last = k == cfg.grad_accum - 1
            with sharding.gradient_sync(predictor, last), autocast(procs.device, cfg.precision):
                generator = micro_step_generator(cfg.seed, micro, procs.dp_rank)
                forward_start = time.perf_counter()
                loss = flow_matching_loss(predictor, model, latents, context, generator, cfg, procs.ssp_group)
                synchronize(procs.device)
                forward_s += time.perf_counter() - forward_start
            # DDP averages over all world ranks; an SSP group's ranks hold parts of one batch's loss.
            (loss * (procs.ssp / cfg.grad_accum)).backward()
            loss_sum += loss.detach().double().cpu()
            tokens += latents.shape[0] * math.prod(model.grid(latents.shape))
        grad_norm = _clip(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        step_loss, global_tokens, imbalance = _reduce_metrics(loss_sum / cfg.grad_accum, tokens, forward_s, procs)
        imbalances.append(imbalance)
        synchronize(procs.device)
        elapsed = time.perf_counter() - start
        done = step + 1
        first_loss = step_loss if math.isnan(first_loss) else first_loss
        final_loss = step_loss
        tokens_per_s.append(global_tokens / elapsed)
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics.write(step=done, loss=step_loss, grad_norm=grad_norm, lr=_learning_rate(cfg, step),
                          tokens=global_tokens, step_time_s=elapsed, tokens_per_s=global_tokens / elapsed,
                          epoch=micro // len(sampler), shape=list(latents.shape[2:]), imbalance=imbalance)  # fmt: skip
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(out, done, model, ema, optimizer, cfg, procs, bucket_p, expected)
    progress.close()
    if procs.main:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    steady = tokens_per_s[1:] or tokens_per_s
    return TrainResult(
        steps=cfg.steps, first_loss=first_loss, final_loss=final_loss, out=out, bucket_p=bucket_p,
        tokens_per_s=sum(steady) / max(len(steady), 1), params=sum(p.numel() for p in model.parameters()),
        imbalance=sum(imbalances) / max(len(imbalances), 1),
    )  # fmt: skip


def _clip(model: nn.Module, max_norm: float) -> float:
    """Clips the global gradient norm (over all shards under FSDP) to ``max_norm`` (0: no clipping); returns it."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _reduce_metrics(loss: Tensor, tokens: int, forward_s: float, procs: _Procs) -> tuple[float, int, float]:
    """The step's loss (mean over data-parallel groups), token count over the whole world, and the imbalance rate
    of the ranks' forward times, (max - mean) / mean (spec §9; backward waits on the gradient all-reduce, so only
    the forward shows a rank's own compute)."""
    if procs.world == 1:
        return float(loss), tokens, 0.0
    mine = torch.tensor([float(loss), tokens / procs.ssp, forward_s], dtype=torch.float64, device=procs.device)
    every = [torch.empty_like(mine) for _ in range(procs.world)]
    dist.all_gather(every, mine)
    losses, token_counts, times = torch.stack(every).cpu().unbind(1)
    return float(losses.sum()) / procs.dp, round(float(token_counts.sum())), float(times.max() / times.mean() - 1)


def _save(out: Path, step: int, model, ema: EMA, optimizer, cfg: TrainConfig, procs: _Procs, bucket_p, expected):
    # Gathering sharded state is a collective: every rank takes part, rank 0 writes.
    model_state = sharding.full_model_state(model, cfg.fsdp)
    ema_state = sharding.full_shadow(ema.shadow)
    opt_tensors, opt_meta = sharding.full_optimizer_state(model, optimizer, cfg.fsdp)
    if procs.main:
        rng_tensors, rng_meta = ckpt.rng_state()
        ckpt.save_checkpoint(
            out, step=step, keep=cfg.keep,
            tensors={"model": model_state, "ema": ema_state, "optimizer": opt_tensors, "rng": rng_tensors},
            meta={"config": expected, "model_config": cfg.model_config().to_dict(), "ema_updates": ema.updates,
                  "optimizer": opt_meta, "rng": rng_meta, "bucket_p": bucket_p},
        )  # fmt: skip
    if dist.is_initialized():
        dist.barrier()


def _progress(cfg: TrainConfig, procs: _Procs, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and procs.main), desc="train",
                unit="step", dynamic_ncols=True)  # fmt: skip
