"""attention family: difforge's flash attention against torch SDPA (each backend), flash-attn and eager.

Ours: ``difforge.ops.flash_attention(q, k, v, causal=...)`` on ``[B, L, H, D]`` tensors, timed on its
``out`` (``lse`` is computed and returned but gets no gradient). Imported on first use, so ``--list``
and baseline-only runs work without a build. Baselines, each on the same values:
  sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                  torch SDPA pinned to one backend each with ``torch.nn.attention.sdpa_kernel``. On CPU
                  only flash (SDPA's CPU flash kernel, the one its default dispatch picks) and math
                  exist. A backend that rejects a case shows as failed, with SDPA's reason.
  flash-attn      ``flash_attn.flash_attn_func`` (FA2), CUDA only, ``[B, L, H, D]`` like ours
  flash-attn3     ``flash_attn_interface.flash_attn_func`` (FA3, Hopper), when installed
  eager           ``softmax(scale * q k^T) v`` in plain PyTorch (softmax in fp32, as models do),
                  run only where its Lq x Lk matrices fit (``EAGER_MAX_BYTES``); ``sdpa-math``
                  materializes the same matrices and is gated the same way
Layout: SDPA and eager get contiguous ``[B, H, L, D]`` copies (and ``[B, H, L, D]`` gradients) made
before timing, their native layout, so no transpose or copy is in anyone's timed region.
Causal masks are bottom-right aligned (flash-attn's and ours); causal runs only where ``Lq == Lk``,
where that equals SDPA's ``is_causal``. ``eager`` builds its causal mask before timing.

FLOP model: the forward is two matmuls per head, ``4 * B * H * Lq * Lk * D`` FLOPs, halved when causal
(``Lq == Lk``); the backward is counted as 2.5x the forward (five matmuls: recomputed ``q k^T``,
``dV``, ``dP``, ``dQ``, ``dK``), so ``fwd+bwd`` counts 3.5x the forward. Every implementation is
scored with this model; the softmax's exponentials are not counted.

GPU shapes (bf16, D = 128): a sweep L = 4k ... 32k with ``B * H * L^2`` fixed (same work at every L),
causal and not; Wan2.1-1.3B's self-attention (B=1, L=32,760, H=12); and a KV-cache step where a live
chunk of 3 latent frames (Lq = 4,680) attends to 21 cached frames (Lk = 32,760). CPU: L = 4,096
(B=1, H=4, D=128) in fp32 and bf16, causal and not, and small smoke shapes for ``--quick``.

Memory: ``python -m difforge_bench.families.attention [--shapes NAME,...] [--device cpu|cuda]``
prints each implementation's peak extra memory per call (``peak_memory`` below): on CPU the rise of
the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``), with glibc forced
to ``mmap`` every block of 16 KiB or more so that freed memory is not silently reused; on CUDA
``torch.cuda.max_memory_allocated``. It is not part of the timed run. The kernel syncs RSS counters
lazily, so CPU numbers are good to ~0.2 MiB: read them at ``cpu_L4k``, not at the smoke shapes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.util
import itertools
import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from difforge_bench.families import attention_skiparse
from difforge_bench.impls import FWD, FWD_BWD, MODES, timed
from difforge_bench.registry import Case, Family, Impl, Inputs, Shape, Unavailable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASKS = ("noncausal", "causal")
OP = "flash_attention"

# The GPU sweep keeps B * H * L^2 (the work, and the number of scores) fixed at 2^31 across L.
_SWEEP_SCORES = 1 << 31
_SWEEP = {4096: (8, 16), 8192: (2, 16), 16384: (1, 8), 32768: (1, 2)}  # L -> (B, H)
assert all(b * h * L * L == _SWEEP_SCORES for L, (b, h) in _SWEEP.items())

SHAPES = (
    *(
        Shape(f"L{L // 1024}k", {"B": b, "H": h, "L": L, "D": 128}, "fixed-work sweep (B*H*L^2 = 2^31)", ("cuda",))
        for L, (b, h) in _SWEEP.items()
    ),
    Shape("wan13b_480p", {"B": 1, "H": 12, "L": 32_760, "D": 128}, "Wan2.1-1.3B 480P self-attention", ("cuda",)),
    Shape(
        "kvcache_chunk",
        {"B": 1, "H": 12, "Lq": 4680, "Lk": 32_760, "D": 128},
        "3-frame live chunk over a 21-frame KV cache (Wan-1.3B heads)",
        ("cuda",),
    ),
    Shape("cpu_L4k", {"B": 1, "H": 4, "L": 4096, "D": 128}, "CPU-sized long sequence", ("cpu",)),
    Shape("smoke", {"B": 1, "H": 2, "L": 256, "D": 128}, "smoke test", (), quick=True),
    Shape("smoke_kv", {"B": 1, "H": 2, "Lq": 64, "Lk": 256, "D": 128}, "smoke test, Lq != Lk", (), quick=True),
)
NONCAUSAL_ONLY = ("wan13b_480p",)  # a DiT's self-attention is bidirectional

# Score-sized bytes per (batch, head, query, key) an implementation that materializes the Lq x Lk matrices
# holds at its peak. Eager bf16, fwd: scores (2), their fp32 copy inside softmax (4), probabilities fp32 (4)
# and bf16 (2); the backward adds dP, its fp32 copy, dS fp32 and bf16 while the probabilities stay saved.
_MATERIALIZED_BYTES = {FWD: 12, FWD_BWD: 24}
EAGER_MAX_BYTES = {"cpu": 8 << 30, "cuda": 60 << 30}  # above this, eager and sdpa-math are not run

SDPA_BACKENDS = {  # baseline name -> torch.nn.attention.SDPBackend member
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
CPU_SDPA_BACKENDS = ("sdpa-flash", "sdpa-math")


def seqlens(shape: Shape) -> tuple[int, int]:
    dims = shape.dims
    return dims.get("Lq", dims.get("L")), dims.get("Lk", dims.get("L"))


def forward_flops(shape: Shape, causal: bool) -> int:
    dims = shape.dims
    lq, lk = seqlens(shape)
    flops = 4 * dims["B"] * dims["H"] * lq * lk * dims["D"]
    return flops // 2 if causal else flops


def case_flops(shape: Shape, mode: str, causal: bool) -> int:
    fwd = forward_flops(shape, causal)
    return fwd if mode == FWD else fwd * 7 // 2  # fwd + 2.5 x fwd


# ---- forwards: each takes the inputs and returns the attention output ----


def _scale(q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """[B, H, L, D] in, [B, H, Lq, D] out; ``mask`` [Lq, Lk] is True where a key is hidden."""
    scores = (q * _scale(q)) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def _hidden_keys(lq: int, lk: int, device: str) -> Tensor:
    """Bottom-right aligned causal mask: key j is hidden from query i iff j > i + lk - lq."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).triu(lk - lq + 1)


def _ours_forward(causal: bool):
    fn = importlib.import_module("difforge.ops").flash_attention
    return lambda inputs: fn(inputs["q"], inputs["k"], inputs["v"], causal=causal)[0]


def _sdpa_forward(backend_name: str, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[backend_name])
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward(inputs: Inputs) -> Tensor:
        with sdpa_kernel(backend):
            return sdpa(inputs["q"], inputs["k"], inputs["v"], is_causal=causal)

    return forward


def _flash_attn_forward(module: str, causal: bool):
    fn = importlib.import_module(module).flash_attn_func

    def forward(inputs: Inputs) -> Tensor:
        out = fn(inputs["q"], inputs["k"], inputs["v"], causal=causal)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return lse

    return forward


# ---- implementations ----


def _heads_first(make_forward: Callable[[], Callable[[Inputs], object]], mode: str, causal_mask: bool) -> Impl:
    """Times a forward on contiguous [B, H, L, D] copies of the inputs (and gradients), made untimed."""

    def build(inputs: Inputs):
        def bhld(t: Tensor) -> Tensor:
            return t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

        moved = {name: bhld(inputs[name]) for name in ("q", "k", "v")}
        if causal_mask:
            lq, lk = inputs["q"].shape[1], inputs["k"].shape[1]
            moved["mask"] = _hidden_keys(lq, lk, inputs["q"].device.type)
        if mode == FWD_BWD:
            moved["grad_outputs"] = tuple(g.transpose(1, 2).contiguous() for g in inputs["grad_outputs"])
        return timed(make_forward(), mode)(moved)

    return build


def _ours(mode: str, causal: bool) -> Impl:
    return lambda inputs: timed(_ours_forward(causal), mode)(inputs)


def _materializes(device: str, shape: Shape, mode: str) -> Unavailable | None:
    lq, lk = seqlens(shape)
    need = shape.dims["B"] * shape.dims["H"] * lq * lk * _MATERIALIZED_BYTES[mode]
    if need > EAGER_MAX_BYTES[device]:
        return Unavailable(
            f"materializes {lq:,} x {lk:,} scores per head: ~{need / 2**30:,.0f} GiB "
            f"> {EAGER_MAX_BYTES[device] >> 30} GiB cap"
        )
    return None


def _sdpa(name: str, device: str, shape: Shape, mode: str, causal: bool) -> Impl | Unavailable:
    if device == "cpu" and name not in CPU_SDPA_BACKENDS:
        return Unavailable("CUDA only")
    from torch.nn.attention import SDPBackend

    if not hasattr(SDPBackend, SDPA_BACKENDS[name]):
        return Unavailable(f"torch {torch.__version__} has no {SDPA_BACKENDS[name]} backend")
    if name == "sdpa-math" and (too_big := _materializes(device, shape, mode)):
        return too_big
    return _heads_first(lambda: _sdpa_forward(name, causal), mode, causal_mask=False)


def _eager(device: str, shape: Shape, mode: str, causal: bool) -> Impl | Unavailable:
    if too_big := _materializes(device, shape, mode):
        return too_big

    def forward(inputs: Inputs) -> Tensor:
        return eager_attention(inputs["q"], inputs["k"], inputs["v"], inputs.get("mask"))

    return _heads_first(lambda: forward, mode, causal_mask=causal)


def _flash_attn(module: str, device: str, mode: str, causal: bool) -> Impl | Unavailable:
    if device != "cuda":
        return Unavailable("CUDA only")
    if importlib.util.find_spec(module) is None:
        return Unavailable(f"{module} not installed")
    return lambda inputs: timed(_flash_attn_forward(module, causal), mode)(inputs)


# ---- cases ----


def _make_inputs(shape: Shape, mode: str, dtype: torch.dtype):
    dims = shape.dims
    B, H, D = dims["B"], dims["H"], dims["D"]
    lq, lk = seqlens(shape)

    def make(device: str) -> dict:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(length: int) -> Tensor:
            return torch.randn((B, length, H, D), generator=gen, device=device, dtype=torch.float32).to(dtype)

        inputs = {"q": randn(lq), "k": randn(lk), "v": randn(lk)}
        if mode == FWD_BWD:
            for t in inputs.values():
                t.requires_grad_()
            inputs["grad_outputs"] = (randn(lq),)
        return inputs

    return make


def _dtypes(device: str) -> tuple[str, ...]:
    return ("bf16",) if device == "cuda" else ("fp32", "bf16")


def _masks(shape: Shape) -> tuple[str, ...]:
    lq, lk = seqlens(shape)
    # SDPA's is_causal is top-left aligned, ours and flash-attn's bottom-right: they agree only if Lq == Lk.
    return MASKS if lq == lk and shape.name not in NONCAUSAL_ONLY else MASKS[:1]


def _case(device: str, shape: Shape, mode: str, mask: str, dtype_name: str) -> Case:
    causal = mask == "causal"
    baselines: dict[str, Impl | Unavailable] = {
        name: _sdpa(name, device, shape, mode, causal) for name in SDPA_BACKENDS
    }
    baselines["flash-attn"] = _flash_attn("flash_attn", device, mode, causal)
    baselines["flash-attn3"] = _flash_attn("flash_attn_interface", device, mode, causal)
    baselines["eager"] = _eager(device, shape, mode, causal)
    return Case(
        op=OP,
        mode=mode,
        config={"mask": mask, "dtype": dtype_name},
        shape=shape,
        make_inputs=_make_inputs(shape, mode, DTYPES[dtype_name]),
        ours=_ours(mode, causal),
        baselines=baselines,
        flops=case_flops(shape, mode, causal),
    )


def cases(device: str, shape: Shape) -> list[Case]:
    if shape.name in attention_skiparse.SHAPE_NAMES:
        return attention_skiparse.skiparse_cases(device, shape)
    grid = itertools.product(MODES, _masks(shape), _dtypes(device))
    return [_case(device, shape, *point) for point in grid]


FAMILY = Family(
    name="attention",
    summary="flash attention (out, lse) on [B, L, H, D]: flash_attention; Skiparse-2D: skiparse_attention",
    shapes=SHAPES + attention_skiparse.SHAPES,
    cases=cases,
    notes=(
        "TFLOP/s from 4*B*H*Lq*Lk*D per forward (halved when causal), fwd+bwd = 3.5x, for every implementation",
        "SDPA and eager run on contiguous [B, H, L, D] copies made before timing; ours and flash-attn on [B, L, H, D]",
        "skiparse shapes: TFLOP/s count the sparse work (N'^2/G) for every implementation; read the speedups",
    ),
)


# ---- peak memory (standalone; not part of the timed run) ----

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_FROM_BYTES = 16 << 10


def _force_mmap() -> bool:
    """glibc: serve every block >= 16 KiB from a fresh mmap, so a freed block is never reused untouched."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES))
    except (OSError, AttributeError):
        return False


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def _tensor_bytes(result: object) -> int:
    items = result if isinstance(result, tuple | list) else (result,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, Tensor))


def _peak_extra_bytes(call: Callable[[], object], device: str) -> tuple[int, int]:
    """(peak memory above the level before ``call``, bytes of the tensors it returns)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, _tensor_bytes(result)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _proc_status_bytes("VmRSS")
    result = call()
    return _proc_status_bytes("VmHWM") - before, _tensor_bytes(result)


def peak_memory(device: str, case: Case) -> dict[str, tuple[int, int] | str]:
    """Per implementation: (peak extra bytes of one call, bytes it returns), or why it was not measured.

    Each implementation is built and called once untimed (warm-up: thread pools, lazy kernels), then
    measured on a second call. The peak includes the returned tensors (out, or the gradients for
    fwd+bwd) and everything the call holds meanwhile; the inputs are resident before and not counted.
    On CPU, call ``_force_mmap()`` first (``main`` does), or blocks freed by earlier calls are reused
    without raising the peak.
    """
    inputs = case.make_inputs(device)
    found: dict[str, tuple[int, int] | str] = {}
    for name, impl in {"difforge": case.ours, **case.baselines}.items():
        if isinstance(impl, Unavailable):
            found[name] = impl.reason
            continue
        try:
            call = impl(inputs)
            call()
            found[name] = _peak_extra_bytes(call, device)
        except Exception as error:  # noqa: BLE001  (a baseline that cannot run here is reported, not fatal)
            found[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"[:120]
        finally:
            call = None
            gc.collect()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m difforge_bench.families.attention", description="peak extra memory per call"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", metavar="NAME,...", help="default: the device's default shapes")
    args = parser.parse_args(argv)
    names = [s for s in (args.shapes or "").split(",") if s] or None
    shapes = FAMILY.select_shapes(args.device, False, names)
    if args.device == "cpu" and not _force_mmap():
        print("warning: mallopt unavailable (not glibc?); reused heap blocks are not counted")
    print(f"peak extra memory of one call on {args.device} (MiB): total, of which returned tensors, rest = workspace")
    for shape in shapes:
        for case in cases(args.device, shape):
            print(f"\n{case.label()}  [{shape.describe()}]")
            skipped = []
            for name, found in peak_memory(args.device, case).items():
                if isinstance(found, str):
                    skipped.append(f"{name} ({found})")
                    continue
                peak, returned = found
                print(
                    f"  {name:<12} {peak / 2**20:>9,.1f} total {returned / 2**20:>9,.1f} returned "
                    f"{(peak - returned) / 2**20:>9,.1f} workspace"
                )
            if skipped:
                print("  not run: " + ", ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
