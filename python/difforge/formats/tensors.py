"""Quantized tensor containers (codes + scales + what is needed to restore the original tensor) and ``quantize``.

Spec: ``hif8_nvfp4.md`` §1-§2 (HiF8, per-tensor scaling) and §4 (NVFP4, two-level scaling, 16 x 16 weight blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from difforge.ops import formats as fmt_ops

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float_dtype(where: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")


def _check_scalar_scale(where: str, name: str, scale: object) -> None:
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        got = type(scale).__name__
        if isinstance(scale, Tensor):
            got = f"{scale.dtype} tensor of shape {list(scale.shape)}"
        raise ValueError(f"{where}: {name} must be a one-element float32 tensor, got {got}")


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True, repr=False, eq=False)
class HiF8Tensor:
    """A tensor in HiF8 with one per-tensor scale: ``x ~ hif8_decode(codes) / scale``.

    Attributes:
        codes: uint8 HiF8 codes, the shape of the original tensor.
        scale: float32 one-element tensor, the multiplier applied before encoding (``target / amax``).
        dtype: the original tensor's dtype, what :meth:`dequantize` returns by default.
    """

    codes: Tensor
    scale: Tensor
    dtype: torch.dtype = torch.float32
    format: ClassVar[str] = "hif8"

    def __post_init__(self) -> None:
        if not isinstance(self.codes, Tensor) or self.codes.dtype != torch.uint8:
            got = self.codes.dtype if isinstance(self.codes, Tensor) else type(self.codes).__name__
            raise ValueError(f"HiF8Tensor: codes must be a uint8 tensor, got {got}")
        _check_scalar_scale("HiF8Tensor", "scale", self.scale)
        _check_float_dtype("HiF8Tensor", self.dtype)
        if self.scale.device != self.codes.device:
            raise ValueError(f"HiF8Tensor: scale is on {self.scale.device}, codes on {self.codes.device}")

    @property
    def shape(self) -> torch.Size:
        """Shape of the original tensor."""
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: one per element plus the 4-byte scale."""
        return _nbytes(self.codes, self.scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``hif8_decode(codes) / scale`` as ``dtype`` (default: the original dtype)."""
        return fmt_ops.hif8_decode(self.codes, dtype or self.dtype, scale=self.scale)

    def to(self, device: torch.device | str) -> HiF8Tensor:
        """The same codes and scale on ``device``."""
        return HiF8Tensor(self.codes.to(device), self.scale.to(device), self.dtype)

    def __repr__(self) -> str:
        return (
            f"HiF8Tensor(shape={list(self.shape)}, dtype={self.dtype}, scale={self.scale.item():.6g}, "
            f"device={self.device})"
        )


@dataclass(frozen=True, repr=False, eq=False)
class NVFP4Tensor:
    """A tensor ``[..., K]`` in NVFP4: E2M1 codes, an E4M3 scale per 16 elements along K, an optional fp32
    per-tensor scale: ``x ~ e2m1(code) * (per_tensor_scale * block_scale)``.

    Attributes:
        block_scales: float8_e4m3fn ``[..., K/16]``.
        packed: uint8 ``[..., K/2]``, element ``2j`` in the low nibble.
        per_tensor_scale: float32 one-element tensor (two-level scaling), or None (one-level).
        dtype: the original tensor's dtype, what :meth:`dequantize` returns by default.
        block_2d: the block scales were computed over 16 x 16 tiles (the training recipe's weight blocks);
            informational, the layout and the dequantization are the same.
    """

    block_scales: Tensor
    packed: Tensor
    per_tensor_scale: Tensor | None = None
    dtype: torch.dtype = torch.float32
    block_2d: bool = False
    format: ClassVar[str] = "nvfp4"

    def __post_init__(self) -> None:
        scales, packed = self.block_scales, self.packed
        if not isinstance(scales, Tensor) or scales.dtype != torch.float8_e4m3fn:
            got = scales.dtype if isinstance(scales, Tensor) else type(scales).__name__
            raise ValueError(f"NVFP4Tensor: block_scales must be a float8_e4m3fn tensor, got {got}")
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
            got = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
            raise ValueError(f"NVFP4Tensor: packed must be a uint8 tensor, got {got}")
        if packed.dim() == 0 or scales.shape[:-1] != packed.shape[:-1] or scales.shape[-1] * 8 != packed.shape[-1]:
            raise ValueError(
                f"NVFP4Tensor: block_scales {list(scales.shape)} and packed {list(packed.shape)} do not describe the "
                "same [..., K] tensor (expected [..., K/16] and [..., K/2])"
            )
        if self.per_tensor_scale is not None:
            _check_scalar_scale("NVFP4Tensor", "per_tensor_scale", self.per_tensor_scale)
        _check_float_dtype("NVFP4Tensor", self.dtype)
        devices = {t.device for t in (scales, packed, self.per_tensor_scale) if t is not None}
        if len(devices) > 1:
            raise ValueError(f"NVFP4Tensor: tensors on several devices: {sorted(map(str, devices))}")

    @property
    def shape(self) -> torch.Size:
        """Shape of the original tensor."""
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: 4.5 bits per element plus the 4-byte tensor scale when present."""
        return _nbytes(self.block_scales, self.packed, self.per_tensor_scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``e2m1(code) * (per_tensor_scale * block_scale)`` as ``dtype`` (default: the original dtype)."""
        return fmt_ops.nvfp4_dequantize(self.block_scales, self.packed, self.per_tensor_scale, dtype or self.dtype)

    def to(self, device: torch.device | str) -> NVFP4Tensor:
        """The same codes and scales on ``device``."""
        pts = None if self.per_tensor_scale is None else self.per_tensor_scale.to(device)
        return NVFP4Tensor(self.block_scales.to(device), self.packed.to(device), pts, self.dtype, self.block_2d)

    def __repr__(self) -> str:
        pts = "None" if self.per_tensor_scale is None else f"{self.per_tensor_scale.item():.6g}"
        return (
            f"NVFP4Tensor(shape={list(self.shape)}, dtype={self.dtype}, per_tensor_scale={pts}, "
            f"block_2d={self.block_2d}, device={self.device})"
        )


QuantizedTensor = HiF8Tensor | NVFP4Tensor
FORMATS = {"hif8": HiF8Tensor, "nvfp4": NVFP4Tensor}


def _quantize_hif8(
    x: Tensor, *, target: float = fmt_ops.HIF8_FORWARD_TARGET, saturate: bool = False, rounding: str = "ta"
) -> HiF8Tensor:
    codes, scale = fmt_ops.hif8_quantize(x, target=target, saturate=saturate, rounding=rounding)
    return HiF8Tensor(codes, scale, x.dtype)


def _quantize_nvfp4(
    x: Tensor,
    *,
    per_tensor: bool = True,
    block_2d: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> NVFP4Tensor:
    if x.dim() == 0 or x.shape[-1] % fmt_ops.NVFP4_BLOCK:
        raise ValueError(f"quantize(..., 'nvfp4'): the last dim must be a multiple of 16, got shape {list(x.shape)}")
    pts = fmt_ops.nvfp4_per_tensor_scale(x) if per_tensor else None
    scales, packed = fmt_ops.nvfp4_quantize(
        x.contiguous(), pts, block_2d=block_2d, stochastic=stochastic, seed=seed, offset=offset
    )
    return NVFP4Tensor(scales, packed, pts, x.dtype, block_2d)


def quantize(x: Tensor, format: str, **options) -> QuantizedTensor:
    """Quantizes ``x`` (float32/bfloat16/float16) into a :class:`HiF8Tensor` or :class:`NVFP4Tensor`.

    Args:
        format: ``"hif8"``: per-tensor scale ``s = target / amax(|x|)`` with :func:`difforge.ops.hif8_quantize`;
            options ``target`` (default 15, the recipe's forward amax), ``saturate``, ``rounding``.
            ``"nvfp4"``: ``x [..., K]`` with K % 16 == 0; options ``per_tensor`` (default True: two-level
            scaling with :func:`difforge.ops.nvfp4_per_tensor_scale`; False: one-level), ``block_2d`` (16 x 16
            tiles, the recipe's weight blocks), ``stochastic``, ``seed``, ``offset`` (see
            :func:`difforge.ops.nvfp4_quantize`).

    The result holds no autograd history. Unknown options raise TypeError.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"quantize: x must be a Tensor, got {type(x).__name__}")
    _check_float_dtype("quantize", x.dtype)
    x = x.detach()
    if format == "hif8":
        return _quantize_hif8(x, **options)
    if format == "nvfp4":
        return _quantize_nvfp4(x, **options)
    raise ValueError(f"quantize: format must be one of {tuple(FORMATS)}, got {format!r}")


def dequantize(t: QuantizedTensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t.dequantize(dtype)``: the values ``t`` stands for, as ``dtype`` (default: the original dtype)."""
    if not isinstance(t, (HiF8Tensor, NVFP4Tensor)):
        raise TypeError(f"dequantize: expected a HiF8Tensor or NVFP4Tensor, got {type(t).__name__}")
    return t.dequantize(dtype)
