"""formats family: HiF8 and NVFP4 codecs (GB/s) and quantized GEMMs (TFLOP/s, or GB/s where memory-bound).

Ours: ``difforge.ops.{hif8_encode, hif8_decode, hif8_quantize, nvfp4_quantize, nvfp4_dequantize, hif8_linear,
nvfp4_linear}`` (imported on first use, so ``--list`` and baseline-only runs work without a build). Baselines:
  torch           the plain-PyTorch composition written below (what research code does): HiF8 encode as a
                  ``searchsorted`` over the rounding boundaries of the 126 positive values (ties away from zero)
                  plus a sign fix-up, decode as a 256-entry table gather, NVFP4 in torchao's op order with a
                  ``searchsorted`` E2M1 rounding (ties to even) and nibble packing
  torchao         ``torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize`` (nvfp4_quantize), when installed
  matmul          ``x @ W.T`` in the case dtype on the unquantized weight (what the layer costs unquantized)
  qdq+matmul      OSP-Next's fake-quant forward: ``hif8_fake_quantize(x)`` then ``matmul`` with the QDQ'd weight
                  (made before timing), what HiF8Linear runs on CPU
  scaled_mm-fp8   ``torch._scaled_mm`` on E4M3 operands with per-tensor scales, quantized before timing: the FP8
                  GEMM alone, the ceiling of hif8_linear (which also quantizes x inside the timed call). CUDA only
  dequant+matmul  ``nvfp4_dequantize`` of the weight to bf16 then ``matmul``, both timed
Every implementation gets the same codes: the inputs are made with the plain-PyTorch codecs (bit-identical to ours,
checked in tests/bench/test_bench_formats.py). Weights are pre-quantized (hif8_linear: codes + scale; nvfp4_linear:
two-level, 1 x 16 blocks); hif8_linear quantizes x inside the call (per-tensor amax -> 15), as in training.

Byte model (n = elements of the [M, K] input, bf16 = 2 bytes):
  hif8_encode       read x, write codes                                  n * (2 + 1)
  hif8_decode       read codes, write bf16                               n * (1 + 2)
  hif8_quantize     read x twice (amax, then encode: unavoidable with current scaling), write codes   n * (2*2 + 1)
  nvfp4_quantize    read x, write packed + block scales (tensor scale given)                       n * (2 + 1/2 + 1/16)
  nvfp4_dequantize  read packed + block scales, write bf16                                         n * (1/2 + 1/16 + 2)
  nvfp4_linear, M <= 16 (memory-bound): the NVFP4 weight + x + y; larger M: FLOPs
FLOP model: 2 * M * N * K for the GEMMs. Every implementation is scored with the same model.

GPU shapes (the issue's): HiF8 GEMM 8192^3 (bf16); NVFP4 W4A16 with N = K = 8192 and M in {1, 16, 8192}; codecs on
the 8192 x 8192 activation. CPU: 1024^3, W4A16 at N = K = 2048, M in {1, 16}; a small smoke shape for ``--quick``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math

import torch
from torch import Tensor

from difforge_bench.impls import FWD, timed
from difforge_bench.registry import Case, Family, Impl, Inputs, Shape, Unavailable

CODECS = ("hif8_encode", "hif8_decode", "hif8_quantize", "nvfp4_quantize", "nvfp4_dequantize")
GEMMS = ("hif8_linear", "nvfp4_linear")
HIF8_TARGET = 15.0
E4M3_MAX = 448.0

SHAPES = (
    Shape("gemm_8k", {"M": 8192, "N": 8192, "K": 8192}, "HiF8 GEMM and NVFP4 prefill; codecs on [M, K]", ("cuda",)),
    Shape("w4a16_m16", {"M": 16, "N": 8192, "K": 8192}, "NVFP4 W4A16, 16 rows (memory-bound)", ("cuda",)),
    Shape("w4a16_m1", {"M": 1, "N": 8192, "K": 8192}, "NVFP4 W4A16, one row (memory-bound)", ("cuda",)),
    Shape("cpu_1k", {"M": 1024, "N": 1024, "K": 1024}, "CPU-sized GEMMs; codecs on [M, K]", ("cpu",)),
    Shape("cpu_w4a16_m16", {"M": 16, "N": 2048, "K": 2048}, "NVFP4 W4A16 on CPU, 16 rows", ("cpu",)),
    Shape("cpu_w4a16_m1", {"M": 1, "N": 2048, "K": 2048}, "NVFP4 W4A16 on CPU, one row", ("cpu",)),
    Shape("smoke", {"M": 64, "N": 128, "K": 256}, "smoke test", (), quick=True),
)
MEMORY_BOUND_M = 16  # nvfp4_linear at M <= this is scored in GB/s (weight bytes), above in TFLOP/s


def _ops():
    return importlib.import_module("difforge.ops")


def _is_w4a16(shape: Shape) -> bool:
    return shape.dims["M"] <= MEMORY_BOUND_M


# ---- plain-PyTorch HiF8 (spec hif8_nvfp4 §1) ----


def hif8_value(code: int) -> float:
    """The value of one HiF8 code (``S | Dot | Em | M``; sign-magnitude exponent with an implicit leading 1)."""
    sign = -1.0 if code & 0x80 else 1.0
    c = code & 0x7F
    if code == 0x80:
        return math.nan
    if c == 0x6F:
        return sign * math.inf
    if c >> 5 == 0b11:
        d, m_bits = 4, 1
    elif c >> 5 == 0b10:
        d, m_bits = 3, 2
    elif c >> 5 == 0b01:
        d, m_bits = 2, 3
    elif c >> 4 == 0b001:
        d, m_bits = 1, 3
    elif c >> 3 == 0b0001:
        d, m_bits = 0, 3
    else:  # denormal: the 3-bit field is an exponent code
        return sign * 2.0 ** ((c & 7) - 23) if c & 7 else 0.0
    mantissa = c & ((1 << m_bits) - 1)
    exponent = 0
    if d:
        em = (c >> m_bits) & ((1 << d) - 1)
        magnitude = (1 << (d - 1)) + (em & ((1 << (d - 1)) - 1))
        exponent = -magnitude if em >> (d - 1) else magnitude
    return sign * 2.0**exponent * (1 + mantissa / 2**m_bits)


@functools.cache
def _hif8_tables() -> tuple[Tensor, Tensor, Tensor]:
    """(fp32 value of each of the 256 codes, encode boundaries, code of each interval between boundaries)."""
    values = torch.tensor([hif8_value(c) for c in range(256)], dtype=torch.float64)
    positive = sorted((values[c].item(), c) for c in range(0x80) if c != 0x6F)  # finite, >= 0 (0x6F is +Inf)
    magnitudes = torch.tensor([v for v, _ in positive], dtype=torch.float64)
    # Round to nearest, ties away from zero: a magnitude on a midpoint goes up (searchsorted right=True).
    # Above 32768 the next step would be 49152: from their midpoint 40960 on, +-Inf.
    bounds = torch.cat([(magnitudes[1:] + magnitudes[:-1]) / 2, torch.tensor([40960.0], dtype=torch.float64)])
    codes = torch.tensor([c for _, c in positive] + [0x6F], dtype=torch.uint8)
    return values.float(), bounds.float(), codes


def _on(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.device)


def torch_hif8_encode(x: Tensor, scale: Tensor) -> Tensor:
    """HiF8 codes of ``fp32(x * scale)`` (TA rounding, overflow to Inf, NaN -> 0x80) in plain PyTorch."""
    _, bounds, codes = _hif8_tables()
    y = x.float() * scale
    code = _on(codes, y)[torch.searchsorted(_on(bounds, y), y.abs(), right=True)]
    code = torch.where(torch.signbit(y) & (code != 0), code | 0x80, code)
    return torch.where(torch.isnan(y), torch.full_like(code, 0x80), code)


def torch_hif8_decode(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (_on(_hif8_tables()[0], codes)[codes.long()] / scale).to(dtype)


def torch_hif8_scale(x: Tensor, target: float = HIF8_TARGET) -> Tensor:
    """``fp32(target / amax)``, 1 where amax is 0 or not finite."""
    amax = x.abs().amax().float()
    ok = (amax > 0) & torch.isfinite(amax)
    # tensor / tensor: ``python_float / tensor`` multiplies by a rounded reciprocal (off by an ulp)
    return torch.where(ok, torch.full_like(amax, target) / torch.where(ok, amax, 1.0), torch.ones_like(amax))


def torch_hif8_quantize(x: Tensor, target: float = HIF8_TARGET) -> tuple[Tensor, Tensor]:
    scale = torch_hif8_scale(x, target)
    return torch_hif8_encode(x, scale), scale


# ---- plain-PyTorch NVFP4, torchao's op order (spec hif8_nvfp4 §4) ----

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def torch_nvfp4_per_tensor_scale(x: Tensor) -> Tensor:
    amax = x.abs().amax().float()
    return torch.where(amax > 0, amax / (E4M3_MAX * 6.0), torch.ones_like(amax))


def torch_nvfp4_quantize(x: Tensor, pts: Tensor) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn block scales [..., K/16], packed uint8 [..., K/2]) with a two-level scale ``pts``."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 16)
    scales = ((blocks.abs().amax(-1) / 6.0) / pts).clamp(2.0**-6, E4M3_MAX).to(torch.float8_e4m3fn)
    y = (blocks * ((1.0 / pts) / scales.float()).unsqueeze(-1)).clamp(-6.0, 6.0)
    bounds = torch.tensor(_E2M1_BOUNDS, device=x.device)
    a = y.abs()
    code = torch.searchsorted(bounds, a)  # a tie lands on the lower code ...
    tie = (code < len(_E2M1_BOUNDS)) & (a == bounds[code.clamp(max=len(_E2M1_BOUNDS) - 1)])
    code = code + (tie & (code % 2 == 1)).long()  # ... and moves up where the upper code is the even one
    code = (code | torch.signbit(y).long() << 3).to(torch.uint8).reshape(*x.shape[:-1], -1, 2)
    return scales, code[..., 0] | code[..., 1] << 4


def torch_nvfp4_dequantize(scales: Tensor, packed: Tensor, pts: Tensor, dtype: torch.dtype) -> Tensor:
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1, 16).long()
    table = torch.tensor(E2M1_VALUES, device=packed.device)
    values = torch.where(codes >= 8, -table[codes & 7], table[codes & 7])
    return (values * (pts * scales.float()).unsqueeze(-1)).reshape(*packed.shape[:-1], -1).to(dtype)


# ---- inputs ----


def _dtype(device: str, op: str) -> torch.dtype:
    # CPU HiF8 GEMMs decode to fp32 and multiply in fp32: fp32 matmul is the fair CPU baseline.
    return torch.float32 if device == "cpu" and op == "hif8_linear" else torch.bfloat16


def _make_inputs(shape: Shape, op: str, dtype: torch.dtype):
    m, n, k = shape.dims["M"], shape.dims["N"], shape.dims["K"]

    def make(device: str) -> dict:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((m, k), generator=gen, device=device, dtype=torch.float32).to(dtype)
        inputs: dict = {"x": x}
        if op in ("hif8_encode", "hif8_decode", "hif8_quantize"):
            inputs["codes"], inputs["scale"] = torch_hif8_quantize(x)
        elif op in ("nvfp4_quantize", "nvfp4_dequantize"):
            inputs["pts"] = torch_nvfp4_per_tensor_scale(x)
            inputs["block_scales"], inputs["packed"] = torch_nvfp4_quantize(x, inputs["pts"])
        else:
            w = (torch.randn((n, k), generator=gen, device=device, dtype=torch.float32) / math.sqrt(k)).to(dtype)
            inputs["w"] = w
            if op == "hif8_linear":
                inputs["w_codes"], inputs["w_scale"] = torch_hif8_quantize(w)
                inputs["w_qdq"] = torch_hif8_decode(inputs["w_codes"], inputs["w_scale"], dtype)
            else:
                inputs["pts"] = torch_nvfp4_per_tensor_scale(w)
                inputs["block_scales"], inputs["packed"] = torch_nvfp4_quantize(w, inputs["pts"])
                # the unquantized bf16 baseline multiplies by the very weight the NVFP4 GEMM sees
                inputs["w"] = torch_nvfp4_dequantize(inputs["block_scales"], inputs["packed"], inputs["pts"], dtype)
        return inputs

    return make


# ---- implementations ----


def _ours(op: str) -> Impl:
    def build(inputs: Inputs):
        ops = _ops()
        calls = {
            "hif8_encode": lambda i: ops.hif8_encode(i["x"], scale=i["scale"]),
            "hif8_decode": lambda i: ops.hif8_decode(i["codes"], i["x"].dtype, scale=i["scale"]),
            "hif8_quantize": lambda i: ops.hif8_quantize(i["x"], target=HIF8_TARGET),
            "nvfp4_quantize": lambda i: ops.nvfp4_quantize(i["x"], i["pts"]),
            "nvfp4_dequantize": lambda i: ops.nvfp4_dequantize(i["block_scales"], i["packed"], i["pts"],
                                                               i["x"].dtype),  # fmt: skip
            "hif8_linear": lambda i: ops.hif8_linear(i["x"], i["w_codes"], i["w_scale"]),
            "nvfp4_linear": lambda i: ops.nvfp4_linear(i["x"], i["block_scales"], i["packed"], i["pts"]),
        }
        return timed(calls[op], FWD)(inputs)

    return build


_TORCH = {
    "hif8_encode": lambda i: torch_hif8_encode(i["x"], i["scale"]),
    "hif8_decode": lambda i: torch_hif8_decode(i["codes"], i["scale"], i["x"].dtype),
    "hif8_quantize": lambda i: torch_hif8_quantize(i["x"]),
    "nvfp4_quantize": lambda i: torch_nvfp4_quantize(i["x"], i["pts"]),
    "nvfp4_dequantize": lambda i: torch_nvfp4_dequantize(i["block_scales"], i["packed"], i["pts"], i["x"].dtype),
}


def _torchao_nvfp4() -> Impl | Unavailable:
    if importlib.util.find_spec("torchao") is None:
        return Unavailable("torchao not installed")

    def build(inputs: Inputs):
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize

        return timed(lambda i: nvfp4_quantize(i["x"], 16, i["pts"]), FWD)(inputs)

    return build


def _matmul(inputs: Inputs):
    return timed(lambda i: i["x"] @ i["w"].T, FWD)(inputs)


def _qdq_matmul(inputs: Inputs):
    fake_quantize = _ops().hif8_fake_quantize
    return timed(lambda i: fake_quantize(i["x"], target=HIF8_TARGET) @ i["w_qdq"].T, FWD)(inputs)


def _scaled_mm(device: str) -> Impl | Unavailable:
    if device != "cuda":
        return Unavailable("FP8 tensor cores, CUDA only")

    def build(inputs: Inputs):
        def e4m3(t: Tensor) -> tuple[Tensor, Tensor]:
            scale = E4M3_MAX / t.abs().amax().float()
            return (t.float() * scale).to(torch.float8_e4m3fn), scale.reciprocal()

        (a, a_inv), (b, b_inv) = e4m3(inputs["x"]), e4m3(inputs["w"])
        out_dtype = inputs["x"].dtype
        return lambda: torch._scaled_mm(a, b.T, a_inv, b_inv, out_dtype=out_dtype, use_fast_accum=False)

    return build


def _dequant_matmul(inputs: Inputs):
    dequantize = _ops().nvfp4_dequantize

    def forward(i: Inputs) -> Tensor:
        return i["x"] @ dequantize(i["block_scales"], i["packed"], i["pts"], i["x"].dtype).T

    return timed(forward, FWD)(inputs)


# ---- byte and FLOP models ----

CODEC_BYTES_PER_ELEMENT = {  # bf16 input or output
    "hif8_encode": 2 + 1,
    "hif8_decode": 1 + 2,
    "hif8_quantize": 2 * 2 + 1,
    "nvfp4_quantize": 2 + 1 / 2 + 1 / 16,
    "nvfp4_dequantize": 1 / 2 + 1 / 16 + 2,
}


def codec_bytes(shape: Shape, op: str) -> int:
    return round(shape.dims["M"] * shape.dims["K"] * CODEC_BYTES_PER_ELEMENT[op])


def w4a16_bytes(shape: Shape) -> int:
    """The NVFP4 weight (4.5 bits per element + the tensor scale), bf16 x and y."""
    m, n, k = shape.dims["M"], shape.dims["N"], shape.dims["K"]
    return n * k // 2 + n * k // 16 + 4 + 2 * (m * k + m * n)


def gemm_flops(shape: Shape) -> int:
    return 2 * shape.dims["M"] * shape.dims["N"] * shape.dims["K"]


# ---- cases ----


def _ops_for(shape: Shape) -> tuple[str, ...]:
    return ("nvfp4_linear",) if _is_w4a16(shape) else CODECS + GEMMS


def _baselines(device: str, op: str) -> dict[str, Impl | Unavailable]:
    if op in _TORCH:
        found = {"torch": timed(_TORCH[op], FWD)}
        return {**found, "torchao": _torchao_nvfp4()} if op == "nvfp4_quantize" else found
    if op == "hif8_linear":
        return {"matmul": _matmul, "qdq+matmul": _qdq_matmul, "scaled_mm-fp8": _scaled_mm(device)}
    return {"matmul": _matmul, "dequant+matmul": _dequant_matmul}


def _case(device: str, shape: Shape, op: str) -> Case:
    dtype = _dtype(device, op)
    if op in CODECS:
        models = {"bytes_moved": codec_bytes(shape, op)}
    elif op == "nvfp4_linear" and _is_w4a16(shape):
        models = {"bytes_moved": w4a16_bytes(shape)}
    else:
        models = {"flops": gemm_flops(shape)}
    return Case(
        op=op,
        mode=FWD,
        config={"dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]},
        shape=shape,
        make_inputs=_make_inputs(shape, op, dtype),
        ours=_ours(op),
        baselines=_baselines(device, op),
        **models,
    )


def cases(device: str, shape: Shape) -> list[Case]:
    return [_case(device, shape, op) for op in _ops_for(shape)]


FAMILY = Family(
    name="formats",
    summary="HiF8 / NVFP4 codecs and quantized GEMMs: hif8_encode, hif8_decode, hif8_quantize, nvfp4_quantize, "
    "nvfp4_dequantize, hif8_linear, nvfp4_linear",
    shapes=SHAPES,
    cases=cases,
    notes=(
        "codecs: GB/s from the ideal byte model for every implementation (baselines: effective bandwidth)",
        "GEMMs: TFLOP/s from 2*M*N*K; nvfp4_linear at M <= 16: GB/s of the NVFP4 weight + x + y",
        "hif8_linear quantizes x inside the call; scaled_mm-fp8 gets both operands quantized before timing",
    ),
)
