"""HiF8 and NVFP4: bit-exact codecs and quantized GEMMs.

HiF8 is Ascend's HiFloat8 (tapered precision: 3 mantissa bits near 1, fewer further out, 38 binades), used by the
OSP-Next training recipe with per-tensor scaling (forward operands to amax 15, gradients to amax 224). NVFP4 is
E2M1 elements with an E4M3 scale per 16 elements and an fp32 per-tensor scale; its op order is torchao's, so the
codes and scales are bit-identical to ``torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize``.

Math: ``cpp/include/difforge/hif8.h``, ``nvfp4.h``. Kernels: ``cpp/formats`` (CPU), ``cuda/formats`` (CUDA);
schemas: ``bindings/schemas.cpp``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from difforge.ops._autograd import forbid_backward

_ops = torch.ops.difforge

ROUNDINGS = ("ta", "hybrid")
HIF8_FORWARD_TARGET = 15.0  # top of HiF8's 3-bit-mantissa zone: the recipe's amax for weights and activations
HIF8_BACKWARD_TARGET = 224.0  # top of the 2-bit zone: the recipe's amax for gradients
NVFP4_BLOCK = 16
NVFP4_TENSOR_SCALE_DIVISOR = 448.0 * 6.0  # per_tensor_scale = amax / (E4M3 max * E2M1 max)


def _scale_tensor(scale: float | Tensor | None, device: torch.device) -> Tensor | None:
    if scale is None or isinstance(scale, Tensor):
        return scale
    return torch.tensor(float(scale), dtype=torch.float32, device=device)


# ---- HiF8 --------------------------------------------------------------------------------------------------


def hif8_encode(
    x: Tensor, *, scale: float | Tensor | None = None, saturate: bool = False, rounding: str = "ta"
) -> Tensor:
    """HiF8 codes (uint8, same shape as ``x``) of ``fp32(x * scale)``.

    Args:
        x: float32/float16/bfloat16, any shape (16-bit inputs are widened to fp32 exactly).
        scale: multiplies ``x`` before encoding (python float or one-element fp32 tensor); None = 1.
        saturate: ``|y| >= 40960`` and +-Inf encode to +-32768 (0x6E/0xEE) instead of +-Inf (0x6F/0xEF).
        rounding: ``"ta"`` (round half away from zero, the recipe's mode) or ``"hybrid"`` (TA where the
            input's binade has ``|e| < 4``, else CANN's RNG-free SSR rounding).

    NaN encodes to 0x80, -0 and ``|y| < 2^-23`` to 0x00. Bit-exact with the spec on all 256 codes and every
    rounding midpoint.
    """
    return _ops.hif8_encode(x, _scale_tensor(scale, x.device), saturate, rounding)


def hif8_decode(codes: Tensor, dtype: torch.dtype = torch.float32, *, scale: float | Tensor | None = None) -> Tensor:
    """Values of HiF8 ``codes`` (uint8) divided by ``scale`` (None = 1), as ``dtype`` (float32/float16/bfloat16).

    Every HiF8 value is exact in all three dtypes; 0x80 decodes to NaN, 0x6F/0xEF to +-Inf.
    """
    return _ops.hif8_decode(codes, _scale_tensor(scale, codes.device), dtype)


def hif8_quantize(
    x: Tensor, *, target: float = HIF8_FORWARD_TARGET, saturate: bool = False, rounding: str = "ta"
) -> tuple[Tensor, Tensor]:
    """Per-tensor scaled HiF8 in one fused pass: ``s = target / amax(|x|)`` (1 if amax is 0 or not finite),
    ``codes = hif8_encode(x, scale=s)``. Returns ``(codes uint8, s fp32 0-dim)``; ``x ~ hif8_decode(codes,
    scale=s)``. The amax stays on the device (no host synchronisation)."""
    return _ops.hif8_quantize(x, float(target), saturate, rounding)


def hif8_fake_quantize(
    x: Tensor, *, target: float = HIF8_FORWARD_TARGET, rounding: str = "ta", dtype: torch.dtype | None = None
) -> Tensor:
    """Fake quantization ``decode(encode(x * s)) / s`` with ``s = target / amax(|x|)`` (the OSP-Next QDQ), in
    one pass, as ``dtype`` (default ``x``'s). Differentiable with the straight-through estimator: the
    gradient passes unchanged (quantize it with another call where the recipe says so)."""
    return _ops.hif8_fake_quantize(x, float(target), rounding, dtype or x.dtype)


def hif8_quantize_e4m3(
    x: Tensor, *, target: float = HIF8_FORWARD_TARGET, rounding: str = "ta"
) -> tuple[Tensor, Tensor]:
    """HiF8 quantization of ``x`` carried in FP8 E4M3 for Hopper's FP8 tensor cores.

    The codes of :func:`hif8_quantize` are multiplied by ``2^k`` (``k`` the largest with ``target * 2^k <=
    448``: 4 for 15, 1 for 224), which maps every HiF8 value above ``2^-12 * 15 / target`` of the scaled range
    exactly onto E4M3 (the few smaller ones round to E4M3's subnormal grid). Returns ``(e4m3
    float8_e4m3fn, scale_inv fp32 0-dim)`` with ``x ~ e4m3.float() * scale_inv``, the operand and scale of
    ``torch._scaled_mm``."""
    return _ops.hif8_quantize_e4m3(x, float(target), rounding)


def hif8_linear(
    x: Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    x_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``x^ @ W^.T + bias`` with HiF8 weights and activations.

    Args:
        x: ``[..., K]`` float (quantized on the fly: ``x^ = hif8_fake_quantize(x)``, per-tensor amax -> 15) or
            uint8 HiF8 codes with ``x_scale`` (``x^ = decode(x) / x_scale``).
        w_codes: uint8 ``[N, K]``; ``w_scale`` the fp32 one-element scale with ``W^ = decode(w_codes) /
            w_scale`` (as returned by :func:`hif8_quantize`). N and K must be multiples of 16.
        bias: ``[N]`` or None.
        out_dtype: default ``x``'s dtype (bfloat16 when ``x`` holds codes).

    CUDA: both operands go to E4M3 after the exact power-of-two shift and through ``torch._scaled_mm`` (FP8
    tensor cores, fp32 accumulation, scales in the epilogue). CPU: blocked decode + fp32 matmul (a block of
    1024 weight rows in fp32 at a time). Differentiable in ``x`` (straight through its quantization); the
    weight codes get no gradient (train with :class:`difforge.nn.HiF8Linear`).
    """
    return _ops.hif8_linear(x, w_codes, w_scale, bias, x_scale, out_dtype)


# ---- NVFP4 -------------------------------------------------------------------------------------------------


def nvfp4_per_tensor_scale(x: Tensor) -> Tensor:
    """The two-level NVFP4 tensor scale ``amax(|x|) / (448 * 6)`` as an fp32 0-dim tensor (1.0 when amax is 0,
    TransformerEngine's convention; torchao would produce NaN scales there)."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=x.device)
    amax = x.detach().abs().amax().float()
    return torch.where(amax > 0, amax / NVFP4_TENSOR_SCALE_DIVISOR, torch.ones_like(amax))


def nvfp4_quantize(
    x: Tensor,
    per_tensor_scale: Tensor | None = None,
    *,
    block_2d: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """NVFP4 quantization of ``x [..., K]`` (float32/bfloat16/float16, K % 16 == 0).

    Each 16 consecutive elements along K share an E4M3 scale; ``per_tensor_scale`` (fp32, one element, > 0, see
    :func:`nvfp4_per_tensor_scale`) adds the second level, None gives one-level scaling. Op order, clamping
    (block scale to [2^-6, 448]), reciprocal multiply and packing are torchao's, so results are bit-identical
    to ``torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize``.

    Args:
        block_2d: one scale per 16 x 16 tile (rows over the flattened leading dims), the NVFP4 training
            recipe's weight blocks: ``W`` and ``W.T`` then quantize alike. Stored per row like 1 x 16 scales.
        stochastic: stochastic rounding of the elements (unbiased; for gradients), uniforms from Philox
            ``(seed, offset)`` at each element's linear index, identical on CPU and CUDA.

    Returns:
        ``(block_scales float8_e4m3fn [..., K/16], packed uint8 [..., K/2])``, element ``2j`` in the low nibble.
        Non-finite inputs are unsupported: a block holding NaN/Inf gets the NaN scale byte 0x7F.
    """
    return _ops.nvfp4_quantize(x, per_tensor_scale, block_2d, stochastic, int(seed), int(offset))


def nvfp4_dequantize(
    block_scales: Tensor, packed: Tensor, per_tensor_scale: Tensor | None = None, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``e2m1(code) * (per_tensor_scale * block_scale)`` (one-level: ``* block_scale``) in fp32, rounded once to
    ``dtype``; ``[..., K]``. torchao's ``NVFP4Tensor.dequantize`` order."""
    return _ops.nvfp4_dequantize(block_scales, packed, per_tensor_scale, dtype)


def nvfp4_linear(
    x: Tensor,
    w_block_scales: Tensor,
    w_packed: Tensor,
    w_per_tensor_scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """W4A16 linear ``x @ W^.T + bias`` with an NVFP4 weight ``W [N, K]`` from :func:`nvfp4_quantize`.

    ``x [..., K]`` bfloat16/float16, N and K multiples of 16, fp32 accumulation, output in ``x``'s dtype.
    CUDA: the weight is read as 4.5 bits per element and dequantized exactly to 16-bit inside the GEMM
    (``e2m1 * block_scale``, the per-tensor scale applied in the epilogue), never written out. CPU: blocked
    dequantize (1024 weight rows in fp32 at a time) + fp32 matmul. Inference only: a backward raises.
    """
    return _ops.nvfp4_linear(x, w_block_scales, w_packed, w_per_tensor_scale, bias)


def random_hadamard_transform16(x: Tensor, *, seed: int = 0, dim: int = -1) -> Tensor:
    """The NVFP4 recipe's random Hadamard transform: every 16-chunk along ``dim`` is multiplied by the
    orthogonal ``Q = H16 diag(d) / 4`` (``H16`` Sylvester's Hadamard matrix, ``d`` in {+-1}^16 from ``seed``).
    Applied to both wgrad operands along their reduction dimension it leaves ``A.T @ B`` unchanged while
    spreading outliers before quantization. A 16 x 16 matmul through ATen; ``Q.T`` inverts it."""
    q = hadamard16(seed, x.device, x.dtype)
    moved = x.movedim(dim, -1)
    if moved.shape[-1] % 16:
        raise ValueError(f"random_hadamard_transform16: size {moved.shape[-1]} of dim {dim} is not a multiple of 16")
    out = (moved.reshape(*moved.shape[:-1], -1, 16) @ q.T).reshape(moved.shape)
    return out.movedim(-1, dim)


def hadamard16(seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``Q = H16 diag(d) / 4`` of :func:`random_hadamard_transform16` (orthogonal: ``Q @ Q.T = I``)."""
    return _hadamard16(int(seed)).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _hadamard16(seed: int) -> Tensor:
    h = torch.ones(1, 1)
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return h * signs.float() / 4


# ---- fake kernels ------------------------------------------------------------------------------------------


def _check_rounding(rounding: str) -> None:
    torch._check(rounding in ROUNDINGS, lambda: f'rounding must be "ta" or "hybrid", got "{rounding}"')


@torch.library.register_fake("difforge::hif8_encode")
def _(x, scale, saturate, rounding):
    _check_rounding(rounding)
    return torch.empty_like(x, dtype=torch.uint8, memory_format=torch.contiguous_format)


@torch.library.register_fake("difforge::hif8_decode")
def _(codes, scale, dtype):
    torch._check(codes.dtype == torch.uint8, lambda: f"hif8_decode: codes must be uint8, got {codes.dtype}")
    return torch.empty_like(codes, dtype=dtype, memory_format=torch.contiguous_format)


@torch.library.register_fake("difforge::hif8_quantize")
def _(x, target, saturate, rounding):
    _check_rounding(rounding)
    codes = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.contiguous_format)
    return codes, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("difforge::hif8_fake_quantize")
def _(x, target, rounding, dtype):
    _check_rounding(rounding)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


@torch.library.register_fake("difforge::hif8_quantize_e4m3")
def _(x, target, rounding):
    _check_rounding(rounding)
    e4m3 = torch.empty_like(x, dtype=torch.float8_e4m3fn, memory_format=torch.contiguous_format)
    return e4m3, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("difforge::hif8_linear")
def _(x, w_codes, w_scale, bias, x_scale, out_dtype):
    torch._check(w_codes.dim() == 2, lambda: f"hif8_linear: w_codes must be [N, K], got {tuple(w_codes.shape)}")
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x.dtype == torch.uint8 else x.dtype
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]), dtype=out_dtype)


@torch.library.register_fake("difforge::nvfp4_quantize")
def _(x, per_tensor_scale, block_2d, stochastic, seed, offset):
    k = x.shape[-1]
    torch._check(k % NVFP4_BLOCK == 0, lambda: f"nvfp4_quantize: last dim {k} must be a multiple of 16")
    scales = x.new_empty((*x.shape[:-1], k // NVFP4_BLOCK), dtype=torch.float8_e4m3fn)
    return scales, x.new_empty((*x.shape[:-1], k // 2), dtype=torch.uint8)


@torch.library.register_fake("difforge::nvfp4_dequantize")
def _(block_scales, packed, per_tensor_scale, dtype):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=dtype)


@torch.library.register_fake("difforge::nvfp4_linear")
def _(x, w_block_scales, w_packed, w_per_tensor_scale, bias):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


# ---- autograd ----------------------------------------------------------------------------------------------


def _straight_through(ctx, grad):
    return grad.to(ctx.input_dtype), None, None, None


def _remember_input_dtype(ctx, inputs, output):
    ctx.input_dtype = inputs[0].dtype


torch.library.register_autograd(
    "difforge::hif8_fake_quantize", _straight_through, setup_context=_remember_input_dtype
)


def _hif8_linear_backward(ctx, grad):
    x_grad = None
    if ctx.needs_input_grad[0]:
        w_hat = hif8_decode(ctx.w_codes, grad.dtype, scale=ctx.w_scale)
        x_grad = (grad @ w_hat).to(ctx.x_dtype)
    bias_grad = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return x_grad, None, None, bias_grad, None, None


def _hif8_linear_setup(ctx, inputs, output):
    x, w_codes, w_scale, bias = inputs[:4]
    ctx.w_codes, ctx.w_scale, ctx.x_dtype = w_codes, w_scale, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


torch.library.register_autograd("difforge::hif8_linear", _hif8_linear_backward, setup_context=_hif8_linear_setup)

for _op in ("hif8_encode", "hif8_quantize", "hif8_quantize_e4m3", "nvfp4_quantize"):
    forbid_backward(f"difforge::{_op}", f"{_op} returns integer codes and has no gradient; use hif8_fake_quantize")
forbid_backward("difforge::hif8_decode", "hif8_decode has no gradient (its input is integer codes)")
forbid_backward("difforge::nvfp4_dequantize", "nvfp4_dequantize has no gradient (its input is integer codes)")
forbid_backward("difforge::nvfp4_linear", "nvfp4_linear is inference only (rollouts); it has no backward")
