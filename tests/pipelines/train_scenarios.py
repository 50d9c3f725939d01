"""Worker side of the multi-process training tests (run through tests/parallel/dist_testlib.launch): one training
step under SSP (+ DDP across SSP groups) must give the loss and gradients of one process running the whole batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from difforge.data import SyntheticVideoDataset
from difforge.pipelines.train_video import (
    TrainConfig,
    _TokenPredictor,
    build_model,
    flow_matching_loss,
    micro_step_generator,
)


def _batch(model, shape):
    dataset = SyntheticVideoDataset(8, channels=model.config.in_channels, sizes=(shape,),
                                    context_dim=model.config.context_dim)  # fmt: skip
    items = [dataset[i] for i in range(2)]
    return torch.stack([it["latents"] for it in items]), torch.stack([it["context"] for it in items])


def _model(cfg: TrainConfig):
    """The run's model with a random output head: the zero-initialised head would stop every other gradient."""
    model = build_model(cfg)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(3)))
    return model


def _one_step(rank: int, world: int, overrides: dict, shape) -> dict:
    """Loss and gradients of one SSP step (S = world) against the single-process step on the same batch."""
    cfg = TrainConfig(**overrides, ssp=world)
    latents, context = _batch(build_model(cfg), shape)

    reference = _model(cfg)
    ref_loss = flow_matching_loss(_TokenPredictor(reference), reference, latents, context,
                                  micro_step_generator(0, 0, 0), cfg)  # fmt: skip
    ref_loss.backward()

    model = _model(cfg)
    predictor = DistributedDataParallel(_TokenPredictor(model))
    loss = flow_matching_loss(predictor, model, latents, context, micro_step_generator(0, 0, 0), cfg, dist.group.WORLD)
    (loss * world).backward()  # what train() does: DDP averages over the world, SSP ranks hold parts of one loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    if any(r.grad is None or not r.grad.any() for r in reference.parameters()):
        raise AssertionError("a parameter got no gradient in the reference step")
    grad_err = max(
        ((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-12)).item()
        for p, r in zip(model.parameters(), reference.parameters())
    )
    return {"loss": total.item(), "ref_loss": ref_loss.item(), "grad_rel_err": grad_err}


def ssp_step_main(rank: int, world: int, checks, write) -> None:
    full = dict(attention="full", model_overrides=dict(depth=2))
    hybrid = dict(attention="hybrid", full_blocks=0, model_overrides=dict(depth=4))
    checks("full_ulysses", _one_step, rank, world, full, (4, 8, 8))
    checks("hybrid_ssp", _one_step, rank, world, hybrid, (4, 8, 12))
    checks("hybrid_ssp_per_frame_t", _one_step, rank, world, dict(hybrid, per_frame_t=True), (2, 8, 8))
