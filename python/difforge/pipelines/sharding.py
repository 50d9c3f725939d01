"""Data-parallel wrapping for training: DDP (replicated weights) or FSDP2 ``fully_shard`` (weights, gradients and
optimizer state sharded over the world; one block's weights gathered at a time), and the full (unsharded) state
a checkpoint holds in either case.

Both average gradients over every rank of the world. Under SSP the ranks of one group hold parts of one batch's
loss, so the training loop scales its loss by the group size S and the average becomes the single-process
gradient either way.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from difforge.pipelines import checkpoint as ckpt


def wrap_data_parallel(predictor: nn.Module, blocks: nn.ModuleList, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP around ``predictor``, or FSDP2 with one unit per block and the rest (embeddings, head) in the root."""
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(predictor, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    # The predictor's output is a reshaped GEMM result, which FSDP2 flags as a view; training never edits it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in blocks:
        fully_shard(block)
    fully_shard(predictor)
    return predictor


@contextlib.contextmanager
def gradient_sync(predictor: nn.Module, enabled: bool) -> Iterator[None]:
    """Skips the gradient all-reduce / reduce-scatter inside the block when ``enabled`` is False (the first
    micro-batches of an accumulated step): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if enabled:
        yield
    elif hasattr(predictor, "no_sync"):
        with predictor.no_sync():
            yield
    elif hasattr(predictor, "set_requires_gradient_sync"):
        predictor.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            predictor.set_requires_gradient_sync(True)
    else:  # one process: nothing to synchronise
        yield


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_model_state(model: nn.Module, fsdp: bool) -> dict[str, Tensor]:
    """The unsharded state dict (a collective under FSDP: every rank must call it)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def load_full_model_state(model: nn.Module, state: Mapping[str, Tensor], fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_options())


def full_shadow(shadow: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """EMA shadow weights, gathered where they are sharded like their parameters (a collective under FSDP)."""
    return {name: _full(value) for name, value in shadow.items()}


def load_shadow(shadow: dict[str, Tensor], full: Mapping[str, Tensor]) -> None:
    """Copies full EMA weights into (possibly sharded) shadow tensors."""
    for name, value in shadow.items():
        if hasattr(value, "full_tensor"):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full[name].to(value.device), value.device_mesh, value.placements)
            value.to_local().copy_(local.to_local())
        else:
            value.copy_(full[name])


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """``(tensors, meta)`` of the optimizer for a checkpoint (a collective under FSDP)."""
    if not fsdp:
        return ckpt.optimizer_state_tensors(optimizer)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options())
    tensors: dict[str, Tensor] = {}
    for fqn, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"state.{fqn}.{key}"] = _full(value) if isinstance(value, Tensor) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any],
    fsdp: bool,
) -> None:  # fmt: skip
    if not fsdp:
        ckpt.load_optimizer_state(optimizer, tensors, meta)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict[str, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        fqn, key = name[len("state.") :].rsplit(".", 1)
        state.setdefault(fqn, {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_options())
