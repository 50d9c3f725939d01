"""norm family: fused adaLN norm-modulate (+ gated residual) against the chains it replaces.

Ours: ``difforge.ops.adaln_modulate`` and ``difforge.ops.gated_adaln_modulate`` (imported on first
use, so ``--list`` and baseline-only runs work without a build). Baselines:
  eager    the plain PyTorch composition of a Wan DiT block: norm in fp32, (1 + scale), + shift, cast
  compile  torch.compile of that same composition
  liger    Liger-Kernel's Triton LayerNorm/RMSNorm, then the same modulation (CUDA only)
Modulation and gate are fp32 as in Wan (``e`` stays fp32); x, o and the gradients flowing in are in
the case's dtype.

Byte model (spec adaln_norm_and_load_balance §6): the [B, L, D] tensors an ideal kernel reads or writes
once. Modulation rows and row statistics (< 1% at >= 256 tokens per modulation row) are left out.
  adaln_modulate        fwd: read x, write y                           2 tensors
                        bwd: read x, dy; write dx                      3 tensors
  gated_adaln_modulate  fwd: read x, o; write x_out, y                 4 tensors
                        bwd: read x_out, o, dy, dx_out; write dx, do   6 tensors
``fwd+bwd`` times both passes and counts both. Every implementation is scored with this same model,
so a baseline's GB/s is effective bandwidth (the chains really move ~4x more bytes).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from difforge_bench.impls import FWD, FWD_BWD, MODES, compiled, timed
from difforge_bench.registry import Case, Family, Impl, Inputs, Shape, Unavailable

EPS = 1e-6  # WanLayerNorm
NORMS = ("layernorm", "rmsnorm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SHAPES = (
    Shape("wan14b_720p", {"B": 1, "L": 75_600, "D": 5120}, "Wan2.1-14B 720P, per-sample modulation", ("cuda",)),
    Shape(
        "wan13b_480p_frames",
        {"B": 1, "G": 21, "L": 32_760, "D": 1536},
        "Wan2.1-1.3B 480P, per-frame modulation (1,560 tokens per frame)",
        ("cuda",),
    ),
    Shape("d1536_4k", {"B": 1, "L": 4096, "D": 1536}, "vllm-omni #3772 shape, per-sample; latency-bound on GPU"),
    Shape("d5120", {"B": 1, "L": 4096, "D": 5120}, "Wan-14B width at a CPU-sized length, per-sample", ("cpu",)),
    Shape(
        "frames_d1536", {"B": 2, "G": 8, "L": 2048, "D": 1536}, "per-frame modulation, 256 tokens per frame", ("cpu",)
    ),
    Shape("smoke", {"B": 2, "L": 1024, "D": 1536}, "smoke test, per-sample", (), quick=True),
)
# rmsnorm runs on these (one per device) so the table stays short; layernorm runs on every shape.
RMSNORM_SHAPES = ("wan14b_720p", "d5120")
OPS = {  # op name -> its tensor arguments, in positional order
    "adaln_modulate": ("x", "scale", "shift"),
    "gated_adaln_modulate": ("x", "o", "gate", "scale", "shift"),
}
FULL_TENSORS_MOVED = {  # (op, mode) -> number of [B, L, D] tensors read or written, the byte model above
    ("adaln_modulate", FWD): 2,
    ("adaln_modulate", FWD_BWD): 2 + 3,
    ("gated_adaln_modulate", FWD): 4,
    ("gated_adaln_modulate", FWD_BWD): 4 + 6,
}


# ---- the eager composition (also what torch.compile and liger's modulation run) ----


def _frames(t: Tensor, groups: int) -> Tensor:
    """[B, L, D] -> [B, G, L/G, D]: token l belongs to modulation row l // (L/G)."""
    return t.reshape(t.shape[0], groups, -1, t.shape[-1])


def _rows(mod: Tensor, like: Tensor) -> Tensor:
    """[B, D] or [B, G, D] -> [B, G, 1, D], broadcasting over the tokens of each group."""
    return mod.reshape(like.shape[0], -1, 1, like.shape[-1])


def _normalize(xf: Tensor, norm: str) -> Tensor:
    if norm == "layernorm":
        return F.layer_norm(xf, xf.shape[-1:], eps=EPS)
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)


def _modulate(n: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    s, t = _rows(scale, n), _rows(shift, n)
    return (_frames(n, s.shape[1]) * (1 + s) + t).reshape(n.shape)


def _gated_residual(x: Tensor, o: Tensor, gate: Tensor) -> Tensor:
    g = _rows(gate, x)
    return (_frames(x, g.shape[1]) + g * _frames(o, g.shape[1])).reshape(x.shape).to(x.dtype)


def eager_adaln(x: Tensor, scale: Tensor, shift: Tensor, *, norm: str) -> Tensor:
    return _modulate(_normalize(x.float(), norm), scale, shift).to(x.dtype)


def eager_gated(x: Tensor, o: Tensor, gate: Tensor, scale: Tensor, shift: Tensor, *, norm: str):
    x_out = _gated_residual(x, o, gate)
    return x_out, eager_adaln(x_out, scale, shift, norm=norm)


# ---- implementations ----


def _forward(fn, op: str, norm: str):
    names = OPS[op]
    return lambda inputs: fn(*(inputs[n] for n in names), norm=norm)


def _ours(op: str, mode: str, norm: str) -> Impl:
    def build(inputs: Inputs):
        fn = getattr(importlib.import_module("difforge.ops"), op)
        return timed(_forward(functools.partial(fn, eps=EPS), op, norm), mode)(inputs)

    return build


def _liger(op: str, mode: str, norm: str, device: str) -> Impl | Unavailable:
    if device != "cuda":
        return Unavailable("Triton kernels, CUDA only")
    if importlib.util.find_spec("liger_kernel") is None:
        return Unavailable("liger_kernel not installed")

    def build(inputs: Inputs):
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm

        x = inputs["x"]
        layer = (LigerLayerNorm if norm == "layernorm" else LigerRMSNorm)(x.shape[-1], eps=EPS)
        layer = layer.to(device=x.device, dtype=x.dtype).requires_grad_(False)  # weight 1, bias 0: no affine

        def adaln(x, scale, shift, *, norm):
            return _modulate(layer(x), scale, shift).to(x.dtype)

        def gated(x, o, gate, scale, shift, *, norm):
            x_out = _gated_residual(x, o, gate)
            return x_out, adaln(x_out, scale, shift, norm=norm)

        return timed(_forward(adaln if op == "adaln_modulate" else gated, op, norm), mode)(inputs)

    return build


# ---- cases ----


def _make_inputs(shape: Shape, op: str, mode: str, dtype: torch.dtype):
    dims = shape.dims
    B, L, D, G = dims["B"], dims["L"], dims["D"], dims.get("G")
    mod_shape = (B, G, D) if G else (B, D)

    def make(device: str) -> dict:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(size, dtype, std=1.0):
            return (std * torch.randn(size, generator=gen, device=device, dtype=torch.float32)).to(dtype)

        inputs = {"x": randn((B, L, D), dtype)}
        if op == "gated_adaln_modulate":
            inputs["o"] = randn((B, L, D), dtype)
            inputs["gate"] = randn(mod_shape, torch.float32, 0.1)
        inputs["scale"] = randn(mod_shape, torch.float32, 0.1)
        inputs["shift"] = randn(mod_shape, torch.float32, 0.1)
        if mode == FWD_BWD:
            for t in inputs.values():
                t.requires_grad_()
            outputs = 2 if op == "gated_adaln_modulate" else 1  # (dx_out, dy) or (dy,)
            inputs["grad_outputs"] = tuple(randn((B, L, D), dtype) for _ in range(outputs))
        return inputs

    return make


def _dtypes(device: str, shape: Shape) -> tuple[str, ...]:
    if device == "cuda":
        return ("bf16",)
    # The smoke set must finish well under a minute on 2 cores; each case compiles a torch.compile graph.
    return ("fp32",) if shape.quick else ("fp32", "bf16")


def _case(device: str, shape: Shape, op: str, mode: str, norm: str, dtype_name: str) -> Case:
    dtype = DTYPES[dtype_name]
    eager = _forward(eager_adaln if op == "adaln_modulate" else eager_gated, op, norm)
    elements = shape.dims["B"] * shape.dims["L"] * shape.dims["D"]
    return Case(
        op=op,
        mode=mode,
        config={"norm": norm, "dtype": dtype_name},
        shape=shape,
        make_inputs=_make_inputs(shape, op, mode, dtype),
        ours=_ours(op, mode, norm),
        baselines={
            "eager": timed(eager, mode),
            "compile": compiled(eager, mode),
            "liger": _liger(op, mode, norm, device),
        },
        bytes_moved=elements * dtype.itemsize * FULL_TENSORS_MOVED[(op, mode)],
    )


def cases(device: str, shape: Shape) -> list[Case]:
    norms = NORMS if shape.name in RMSNORM_SHAPES else NORMS[:1]
    grid = itertools.product(OPS, MODES, norms, _dtypes(device, shape))
    return [_case(device, shape, *point) for point in grid]


FAMILY = Family(
    name="norm",
    summary="fused adaLN norm-modulate (+ gated residual): adaln_modulate, gated_adaln_modulate",
    shapes=SHAPES,
    cases=cases,
    notes=("GB/s from the fused byte model for every implementation (baselines: effective bandwidth)",),
)
