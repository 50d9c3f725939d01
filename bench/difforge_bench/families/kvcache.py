"""kvcache family: attention of a live chunk over a quantized KV cache, against bf16 attention over the same context.

Ours: ``difforge.ops.quantized_kv_attention(q, k_cur, v_cur, <K and V codes, step, zero>, bits=..., jensen=...)``:
the current chunk's queries attend to ``[quantized cache ; current chunk]`` in one softmax, the cache dequantized
tile by tile inside the kernel, the Jensen bias (``taylor2``, or ``none``) subtracted from the cached logits only.
Cases: INT2 and INT4, group size 32 along the head dim, fp16 step and zero (spec kv_cache_jensen §2), each with
``jensen="taylor2"`` (the paper's correction) and ``"none"`` (what the bias costs). Forward only (inference).
Baselines, on the same total context ``Lc + Lq`` (the cache values they see are the dequantized cache, so every
implementation computes the same attention up to the bias):
  flash-bf16   ``difforge.ops.flash_attention`` over the bf16 concatenation ``[cache ; current]``, made before timing
               (what an unquantized cache costs: the FA-class target of spec §7)
  sdpa         torch SDPA, default backend dispatch, on contiguous ``[B, H, L, D]`` copies made before timing
  unfused      what research code does: ``kv_dequantize`` the cache (K and V), ``torch.cat`` with the current
               chunk, then SDPA (default dispatch) on ``[B, H, L, D]`` views; all of it timed

FLOP model: ``4 * B * H * Lq * (Lc + Lq) * D`` (two matmuls per head over every key), the same for every
implementation; neither the dequantization nor the bias (``2 * B * H * Lq * Lc * D/g`` more) is counted.
Config ``cache_vs_bf16``: bytes of the quantized cache (codes + step + zero of K and V) over the bytes of the same
cache in bf16 (effective bits / 16: 0.1875 at INT2, 0.3125 at INT4); the absolute bytes per shape are in the notes.

GPU shape: Self-Forcing on Wan2.1-1.3B (12 heads x 128): a 3-latent-frame chunk (Lq = 4,680) over a 21-frame cache
(Lc = 32,760, 1,560 tokens per frame). CPU: Lq = 1,024 over an 8k-token cache; a small smoke shape for ``--quick``.
"""

from __future__ import annotations

import importlib
import itertools

import torch
from torch import Tensor

from difforge_bench.impls import FWD, timed
from difforge_bench.registry import Case, Family, Impl, Inputs, Shape

OP = "quantized_kv_attention"
GROUP_SIZE = 32
META_DTYPE = torch.float16
DTYPE = torch.bfloat16
BITS = (2, 4)
JENSEN = ("taylor2", "none")

SHAPES = (
    Shape(
        "selfforcing_chunk",
        {"B": 1, "H": 12, "Lq": 4680, "Lc": 32_760, "D": 128},
        "Self-Forcing / Wan2.1-1.3B: 3-frame chunk over a 21-frame quantized cache",
        ("cuda",),
    ),
    Shape("cpu_L8k", {"B": 1, "H": 2, "Lq": 1024, "Lc": 8192, "D": 128}, "CPU-sized chunk over an 8k cache", ("cpu",)),
    Shape("smoke", {"B": 1, "H": 2, "Lq": 64, "Lc": 256, "D": 128}, "smoke test", (), quick=True),
)


def forward_flops(shape: Shape) -> int:
    d = shape.dims
    return 4 * d["B"] * d["H"] * d["Lq"] * (d["Lc"] + d["Lq"]) * d["D"]


def cache_bytes(shape: Shape, bits: int) -> tuple[int, int]:
    """(bytes of the quantized cache: codes + step + zero of K and V, bytes of the same cache in bf16)."""
    d = shape.dims
    tokens = d["B"] * d["Lc"] * d["H"]
    meta = 2 * (d["D"] // GROUP_SIZE) * META_DTYPE.itemsize
    return 2 * tokens * (d["D"] * bits // 8 + meta), 2 * tokens * d["D"] * DTYPE.itemsize


def _ops():
    return importlib.import_module("difforge.ops")


# ---- inputs ----


def _make_inputs(shape: Shape, bits: int):
    d = shape.dims
    B, H, D, lq, lc = d["B"], d["H"], d["D"], d["Lq"], d["Lc"]

    def make(device: str) -> dict:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(length: int) -> Tensor:
            return torch.randn((B, length, H, D), generator=gen, device=device, dtype=torch.float32).to(DTYPE)

        inputs: dict = {"q": randn(lq), "k_cur": randn(lq), "v_cur": randn(lq)}
        k_cache, v_cache = randn(lc), randn(lc)
        try:
            ops = _ops()
        except ImportError as error:  # not built: the bf16 SDPA baseline still runs, on the raw cache values
            inputs["missing"] = f"{type(error).__name__}: {error}"
        else:
            options = {"bits": bits, "group_size": GROUP_SIZE}
            for name, x in (("k", k_cache), ("v", v_cache)):
                codes, step, zero = ops.kv_quantize(x, **options, meta_dtype=META_DTYPE)
                inputs.update({f"{name}_codes": codes, f"{name}_step": step, f"{name}_zero": zero})
            # The bf16 baselines attend to the dequantized cache: every implementation computes the same attention.
            k_cache = ops.kv_dequantize(inputs["k_codes"], inputs["k_step"], inputs["k_zero"], **options, dtype=DTYPE)
            v_cache = ops.kv_dequantize(inputs["v_codes"], inputs["v_step"], inputs["v_zero"], **options, dtype=DTYPE)
        inputs["k_all"] = torch.cat([k_cache, inputs["k_cur"]], 1)
        inputs["v_all"] = torch.cat([v_cache, inputs["v_cur"]], 1)
        return inputs

    return make


def _needs_difforge(inputs: Inputs) -> None:
    if "missing" in inputs:
        raise ImportError(f"difforge not importable ({inputs['missing']})")


# ---- implementations ----


def _cache_args(inputs: Inputs) -> tuple[Tensor, ...]:
    return tuple(inputs[f"{n}_{part}"] for n in ("k", "v") for part in ("codes", "step", "zero"))


def _ours(bits: int, jensen: str) -> Impl:
    def build(inputs: Inputs):
        _needs_difforge(inputs)
        fn = _ops().quantized_kv_attention
        cache = _cache_args(inputs)

        def forward(inputs: Inputs) -> Tensor:
            return fn(inputs["q"], inputs["k_cur"], inputs["v_cur"], *cache, bits=bits, group_size=GROUP_SIZE,
                      jensen=jensen)  # fmt: skip

        return timed(forward, FWD)(inputs)

    return build


def _flash_bf16(inputs: Inputs):
    _needs_difforge(inputs)
    fn = _ops().flash_attention
    return timed(lambda i: fn(i["q"], i["k_all"], i["v_all"])[0], FWD)(inputs)


def _sdpa(inputs: Inputs):
    """SDPA's default dispatch on contiguous [B, H, L, D] copies made here, untimed."""
    moved = {name: inputs[src].transpose(1, 2).contiguous() for name, src in (("q", "q"), ("k", "k_all"),
                                                                               ("v", "v_all"))}  # fmt: skip
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return timed(lambda i: sdpa(i["q"], i["k"], i["v"]), FWD)(moved)


def _unfused(bits: int) -> Impl:
    """Dequantize the cache, concatenate the current chunk, SDPA: every step timed (research-code baseline)."""

    def build(inputs: Inputs):
        _needs_difforge(inputs)
        dequantize = _ops().kv_dequantize
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def forward(i: Inputs) -> Tensor:
            k = dequantize(i["k_codes"], i["k_step"], i["k_zero"], bits=bits, group_size=GROUP_SIZE, dtype=DTYPE)
            v = dequantize(i["v_codes"], i["v_step"], i["v_zero"], bits=bits, group_size=GROUP_SIZE, dtype=DTYPE)
            k, v = torch.cat([k, i["k_cur"]], 1), torch.cat([v, i["v_cur"]], 1)
            return sdpa(i["q"].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        return timed(forward, FWD)(inputs)

    return build


# ---- cases ----


def _case(shape: Shape, bits: int, jensen: str) -> Case:
    quantized, bf16 = cache_bytes(shape, bits)
    return Case(
        op=OP,
        mode=FWD,
        config={"cache": f"int{bits}-g{GROUP_SIZE}", "jensen": jensen, "dtype": "bf16",
                "cache_vs_bf16": f"{quantized / bf16:.4f}"},  # fmt: skip
        shape=shape,
        make_inputs=_make_inputs(shape, bits),
        ours=_ours(bits, jensen),
        baselines={"flash-bf16": _flash_bf16, "sdpa": _sdpa, "unfused": _unfused(bits)},
        flops=forward_flops(shape),
    )


def cases(device: str, shape: Shape) -> list[Case]:
    return [_case(shape, bits, jensen) for bits, jensen in itertools.product(BITS, JENSEN)]


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _bytes_note(shape: Shape) -> str:
    sizes = ", ".join(f"INT{b} {_size(cache_bytes(shape, b)[0])}" for b in BITS)
    return f"{shape.name}: cache (K+V of Lc tokens) bf16 {_size(cache_bytes(shape, BITS[0])[1])}, {sizes}"


FAMILY = Family(
    name="kvcache",
    summary="attention over a quantized KV cache with the Jensen-bias correction: quantized_kv_attention",
    shapes=SHAPES,
    cases=cases,
    notes=(
        "TFLOP/s from 4*B*H*Lq*(Lc+Lq)*D per forward for every implementation (dequantization and bias not counted)",
        "baselines attend to the dequantized cache in bf16 (flash-bf16, sdpa: concatenated before timing; "
        "unfused: dequantize + cat + SDPA, timed)",
        *(_bytes_note(shape) for shape in SHAPES),
    ),
)
