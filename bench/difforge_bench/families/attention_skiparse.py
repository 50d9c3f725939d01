"""attention family, Skiparse part: Skiparse-2D attention against dense attention and the reference recipe.

Cases (merged into ``families/attention.py``'s family, on their own shapes):
  skiparse_attention  ours = ``difforge.ops.skiparse_attention`` on ``[B, N, H, D]`` in original token order:
                      rearrange q, k, v -> flash attention with one key length per sub-sequence -> restore.
                      Baselines on the same values:
        dense-sdpa      SDPA over all N tokens (default backend; heads-first copies made untimed)
        dense-ours      difforge.ops.flash_attention over all N tokens
        einops-sdpa     OSP-Next's recipe in plain PyTorch: zero-pad H and W, reshape/permute into the sparse
                        layout (heads-first), SDPA with a key-padding mask (the masked backend; the flash
                        backend takes no mask), inverse permute and crop
  skiparse_rearrange  the permutation alone (GB/s: read + write of the padded layout) against
                      ``reshape/permute/contiguous`` of the zero-padded grid (the einops recipe)
FLOP model: ``4 * B * H * N'^2 / G * D`` per forward (the sparse work on the padded grid, G = P^2), fwd+bwd
3.5x, for every implementation, so the dense baselines' TFLOP/s are understated by ~G: read the speedups.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from difforge_bench.impls import FWD, FWD_BWD, MODES, timed
from difforge_bench.registry import Case, Impl, Inputs, Shape

SHAPES = (
    Shape(
        "skiparse_720p",
        {"B": 1, "T": 21, "Hg": 45, "Wg": 80, "H": 12, "D": 128, "P": 2},
        "Wan2.1 720P latent grid 21x45x80 (N = 75,600), 12 heads, P = 2",
        ("cuda",),
    ),
    Shape(
        "skiparse_cpu",
        {"B": 1, "T": 4, "Hg": 18, "Wg": 32, "H": 4, "D": 64, "P": 2},
        "small video grid 4x18x32 (N = 2,304, H padded to 20), 4 heads, P = 2",
        ("cpu",),
    ),
    Shape("skiparse_smoke", {"B": 1, "T": 2, "Hg": 6, "Wg": 8, "H": 2, "D": 32, "P": 2}, "smoke test", (), quick=True),
)
SHAPE_NAMES = frozenset(shape.name for shape in SHAPES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _grid(shape: Shape) -> tuple[int, int, int]:
    return shape.dims["T"], shape.dims["Hg"], shape.dims["Wg"]


def _padded(extent: int, P: int) -> int:
    return -(-extent // (P * P)) * P * P


def _padded_tokens(shape: Shape) -> int:
    T, H, W = _grid(shape)
    P = shape.dims["P"]
    return T * _padded(H, P) * _padded(W, P)


def _flops(shape: Shape, mode: str) -> int:
    d = shape.dims
    fwd = 4 * d["B"] * d["H"] * _padded_tokens(shape) ** 2 // (d["P"] ** 2) * d["D"]
    return fwd if mode == FWD else fwd * 7 // 2


# ---- the einops recipe in plain PyTorch ----


def _to_sparse(x: Tensor, grid: tuple[int, int, int], P: int, mode: str, heads_first: bool = True) -> Tensor:
    """[B, N, H, D] -> zero-padded [G*B, H, N'/G, D] (OSP-Next's rearranges, heads moved forward in the same
    copy for SDPA), or [G*B, N'/G, H, D] with ``heads_first=False``."""
    B, _, Hh, D = x.shape
    T, H, W = grid
    Hp, Wp = _padded(H, P), _padded(W, P)
    x = torch.nn.functional.pad(x.view(B, T, H, W, Hh, D), (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
    if mode == "token":  # b (t h p w q) -> (p q b) (t h w)
        order = (3, 5, 0, 6, 1, 2, 4, 7) if heads_first else (3, 5, 0, 1, 2, 4, 6, 7)
        x = x.view(B, T, Hp // P, P, Wp // P, P, Hh, D).permute(order)
    else:  # b (t h p1 p2 w q1 q2) -> (p1 q1 b) (t h p2 w q2)
        order = (3, 6, 0, 8, 1, 2, 4, 5, 7, 9) if heads_first else (3, 6, 0, 1, 2, 4, 5, 7, 8, 9)
        x = x.view(B, T, Hp // P**2, P, P, Wp // P**2, P, P, Hh, D).permute(order)
    return x.reshape(P * P * B, Hh, -1, D) if heads_first else x.reshape(P * P * B, -1, Hh, D)


def _from_sparse_heads_first(xs: Tensor, grid: tuple[int, int, int], P: int, mode: str, B: int) -> Tensor:
    T, H, W = grid
    Hp, Wp = _padded(H, P), _padded(W, P)
    Hh, D = xs.shape[1], xs.shape[-1]
    if mode == "token":
        x = xs.view(P, P, B, Hh, T, Hp // P, Wp // P, D).permute(2, 4, 5, 0, 6, 1, 3, 7)
    else:
        x = xs.view(P, P, B, Hh, T, Hp // P**2, P, Wp // P**2, P, D).permute(2, 4, 5, 0, 6, 7, 1, 8, 3, 9)
    return x.reshape(B, T, Hp, Wp, Hh, D)[:, :, :H, :W].reshape(B, T * H * W, Hh, D)


def _einops_sdpa(grid: tuple[int, int, int], P: int, mode: str):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward(inputs: Inputs) -> Tensor:
        q, k, v = (_to_sparse(inputs[n], grid, P, mode) for n in ("q", "k", "v"))
        out = sdpa(q, k, v, attn_mask=inputs["key_mask"])
        return _from_sparse_heads_first(out, grid, P, mode, inputs["q"].shape[0])

    return forward


def _key_mask(shape: Shape, mode: str, device: str) -> Tensor:
    """[G*B, 1, 1, N'/G] True at valid keys, built untimed by pushing ones through the same permutation."""
    ones = torch.ones(shape.dims["B"], _grid(shape)[0] * shape.dims["Hg"] * shape.dims["Wg"], 1, 1, device=device)
    return _to_sparse(ones, _grid(shape), shape.dims["P"], mode).bool().transpose(2, 3)


# ---- implementations ----


def _ours(shape: Shape, mode: str, skiparse_mode: str) -> Impl:
    fn = importlib.import_module("difforge.ops").skiparse_attention
    grid, P = _grid(shape), shape.dims["P"]
    return timed(lambda i: fn(i["q"], i["k"], i["v"], grid=grid, sparse_ratio=P, mode=skiparse_mode), mode)


def _dense_ours(mode: str) -> Impl:
    fn = importlib.import_module("difforge.ops").flash_attention
    return timed(lambda i: fn(i["q"], i["k"], i["v"])[0], mode)


def _dense_sdpa(mode: str) -> Impl:
    def build(inputs: Inputs):
        moved = {n: inputs[n].detach().transpose(1, 2).contiguous().requires_grad_(mode == FWD_BWD) for n in "qkv"}
        if mode == FWD_BWD:
            moved["grad_outputs"] = tuple(g.transpose(1, 2).contiguous() for g in inputs["grad_outputs"])
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return timed(lambda i: sdpa(i["q"], i["k"], i["v"]), mode)(moved)

    return build


def _einops(shape: Shape, mode: str, skiparse_mode: str) -> Impl:
    def build(inputs: Inputs):
        with_mask = {**inputs, "key_mask": _key_mask(shape, skiparse_mode, inputs["q"].device.type)}
        return timed(_einops_sdpa(_grid(shape), shape.dims["P"], skiparse_mode), mode)(with_mask)

    return build


def _make_inputs(shape: Shape, mode: str, dtype: torch.dtype):
    d = shape.dims
    N = d["T"] * d["Hg"] * d["Wg"]

    def make(device: str) -> dict:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn() -> Tensor:
            return torch.randn((d["B"], N, d["H"], d["D"]), generator=gen, device=device).to(dtype)

        inputs = {"q": randn(), "k": randn(), "v": randn()}
        if mode == FWD_BWD:
            for t in inputs.values():
                t.requires_grad_()
            inputs["grad_outputs"] = (randn(),)
        return inputs

    return make


def _attention_case(shape: Shape, mode: str, skiparse_mode: str, dtype_name: str) -> Case:
    return Case(
        op="skiparse_attention",
        mode=mode,
        config={"mode": skiparse_mode, "dtype": dtype_name},
        shape=shape,
        make_inputs=_make_inputs(shape, mode, DTYPES[dtype_name]),
        ours=_ours(shape, mode, skiparse_mode),
        baselines={
            "dense-sdpa": _dense_sdpa(mode),
            "dense-ours": _dense_ours(mode),
            "einops-sdpa": _einops(shape, mode, skiparse_mode),
        },
        flops=_flops(shape, mode),
    )


def _rearrange_case(shape: Shape, dtype_name: str) -> Case:
    grid, P = _grid(shape), shape.dims["P"]
    dtype = DTYPES[dtype_name]

    def ours(inputs: Inputs):
        fn = importlib.import_module("difforge.ops").skiparse_rearrange
        return lambda: fn(inputs["q"], grid, P, "token")

    def einops(inputs: Inputs):
        return lambda: _to_sparse(inputs["q"], grid, P, "token", heads_first=False)

    elements = _padded_tokens(shape) * shape.dims["B"] * shape.dims["H"] * shape.dims["D"]
    return Case(
        op="skiparse_rearrange",
        mode=FWD,
        config={"mode": "token", "dtype": dtype_name},
        shape=shape,
        make_inputs=_make_inputs(shape, FWD, dtype),
        ours=ours,
        baselines={"einops-permute": einops},
        bytes_moved=2 * elements * dtype.itemsize,
    )


def skiparse_cases(device: str, shape: Shape) -> list[Case]:
    dtypes = ("bf16",) if device == "cuda" else ("fp32",)
    found = [_rearrange_case(shape, dtype) for dtype in dtypes]
    for mode in MODES:
        for skiparse_mode in ("token", "group"):
            found += [_attention_case(shape, mode, skiparse_mode, dtype) for dtype in dtypes]
    return found
