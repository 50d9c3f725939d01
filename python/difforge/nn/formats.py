"""Quantized Linear layers: HiF8 for training (OSP-Next's recipe), NVFP4 for inference (rollouts), and
``quantize_linears`` to convert a model's ``nn.Linear`` layers in place.

Spec: ``hif8_nvfp4.md`` §2 (HiF8 recipe: what is quantized, scaling targets, straight-through QDQ, backward on the
saved QDQ'd operands), §3 (HiF8 GEMM on FP8 tensor cores), §4 (NVFP4: 2D weight blocks, high-precision layers), §7
(per-layer fallback with a logged reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from difforge.formats import quantize
from difforge.ops import formats as fmt_ops

logger = logging.getLogger(__name__)

GEMM_MULTIPLE = 16  # N and K of the quantized GEMMs (FP8 tensor cores; NVFP4's 16-element blocks)

# Substrings (case-insensitive) of qualified module names that quantize_linears keeps in high precision by default:
# what OSP-Next keeps in bf16 (patch, text and time embeddings, modulation, norms, head) and the NVFP4 recipe's
# embeddings and output head, under the names DiT codebases use (Wan, DiT/PixArt, diffusers, Flux/HunyuanVideo).
DEFAULT_SKIP_PATTERNS = (
    "embed",  # patch_embedding, text_embedding, time_embedding, x_embedder, context_embedder, ...
    "patch",  # patchify / unpatchify projections
    "time",  # time_projection, time_mlp, timestep_embedder, time_in
    "txt_in",  # Flux / HunyuanVideo text input projection
    "img_in",  # Flux / HunyuanVideo patch projection
    "vector_in",  # Flux pooled-text conditioning
    "guidance_in",  # Flux guidance embedding
    "caption",  # PixArt caption_projection
    "modulation",  # Wan modulation, Flux norm modulation
    "adaln",  # DiT adaLN_modulation
    "norm",  # linears inside norm layers (norm_out.linear, AdaLayerNorm)
    "head",  # output head (Wan head.head, lm_head)
    "final",  # DiT final_layer
    "proj_out",  # diffusers' output projection of the last layer
)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in: the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _decode(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return fmt_ops.hif8_decode(codes, dtype, scale=scale)


class _HiF8LinearFunction(torch.autograd.Function):
    """OSP-Next's HIF8Linear: forward on QDQ'd x and W, backward on the QDQ'd grad_out and the saved QDQ'd x and W.

    The QDQ'd operands are saved as their HiF8 codes and scales (1 byte per element) and decoded in backward:
    exactly the fp32 values ``hif8_fake_quantize(t, dtype=torch.float32)`` returns.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target_forward, target_backward, compute_dtype):
        n, k = weight.shape
        x_codes, x_scale = fmt_ops.hif8_quantize(x.reshape(-1, k), target=target_forward)
        w_codes, w_scale = fmt_ops.hif8_quantize(weight, target=target_forward)
        b = None if bias is None else bias.to(compute_dtype)
        if x.is_cuda and n % GEMM_MULTIPLE == 0 and k % GEMM_MULTIPLE == 0:
            y = fmt_ops.hif8_linear(x_codes, w_codes, w_scale, b, x_scale=x_scale, out_dtype=compute_dtype)
        else:
            y = F.linear(_decode(x_codes, x_scale, compute_dtype), _decode(w_codes, w_scale, compute_dtype), b)
        ctx.save_for_backward(x_codes, x_scale, w_codes, w_scale)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.target_backward, ctx.compute_dtype = target_backward, compute_dtype
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_codes, x_scale, w_codes, w_scale = ctx.saved_tensors
        cd = ctx.compute_dtype
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.target_backward is None:
            g_q = g.to(cd)
        else:
            g_q = fmt_ops.hif8_fake_quantize(g, target=ctx.target_backward, dtype=torch.float32).to(cd)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_q @ _decode(w_codes, w_scale, cd)).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g_q.T @ _decode(x_codes, x_scale, cd)).to(ctx.w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


class HiF8Linear(nn.Linear):
    """``nn.Linear`` trained with HiF8 per-tensor fake quantization (OSP-Next, spec §2).

    Same constructor, parameters and state dict as ``nn.Linear`` (a drop-in; ``from_linear`` converts one). In
    training and eval alike, every call:

    * forward: ``x^ = hif8_fake_quantize(x, target=target_forward)`` and ``W^`` likewise (current per-tensor
      amax, each step), ``y = x^ @ W^.T + bias`` in the compute dtype (x's dtype, or the autocast dtype);
      on CUDA with in/out features multiples of 16, through :func:`difforge.ops.hif8_linear` (FP8 tensor
      cores, the same ``x^`` and ``W^`` up to E4M3's subnormal grid below ``2^-12`` of the range, spec §3);
    * backward: ``g^ = hif8_fake_quantize(grad_out, target=target_backward)`` (``grad_out`` itself when
      ``quantize_grad=False``), ``grad_x = g^ @ W^``, ``grad_W = g^.T @ x^`` over the flattened leading dims,
      ``grad_bias = sum(grad_out)``: the saved QDQ'd operands are reused, not requantized; everything else
      is straight-through.

    ``x^`` and ``W^`` are kept for backward as HiF8 codes + scale (1 byte per element, half of bf16) and decoded
    to the exact fp32 QDQ values there. The master weight stays in its own dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        quantize_grad: bool = True,
        target_forward: float = fmt_ops.HIF8_FORWARD_TARGET,
        target_backward: float = fmt_ops.HIF8_BACKWARD_TARGET,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if not target_forward > 0 or not target_backward > 0:
            raise ValueError(f"HiF8Linear: targets must be > 0, got {target_forward} and {target_backward}")
        self.quantize_grad = bool(quantize_grad)
        self.target_forward, self.target_backward = float(target_forward), float(target_backward)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"HiF8Linear: x must be [..., {self.in_features}], got {list(x.shape)}")
        target_backward = self.target_backward if self.quantize_grad else None
        return _HiF8LinearFunction.apply(
            x, self.weight, self.bias, self.target_forward, target_backward, _compute_dtype(x)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> HiF8Linear:
        """A HiF8Linear sharing ``linear``'s Parameter objects (optimizers and tied weights keep working) and
        training mode. ``options``: ``quantize_grad``, ``target_forward``, ``target_backward``."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer.train(linear.training)

    def extra_repr(self) -> str:
        grad = f"grad_out -> {self.target_backward:g}" if self.quantize_grad else "grad_out unquantized"
        return (
            f"{super().extra_repr()}, recipe=hif8 per-tensor QDQ (x, W -> amax {self.target_forward:g}; {grad}; "
            "backward on the saved QDQ'd x, W)"
        )


class NVFP4Linear(nn.Module):
    """Inference Linear with an NVFP4 weight: W4A16 through :func:`difforge.ops.nvfp4_linear`.

    Buffers (the state dict): ``w_block_scales`` float8_e4m3fn ``[out, in/16]``, ``w_packed`` uint8 ``[out,
    in/2]``, ``w_per_tensor_scale`` float32 0-dim (1.0 for one-level scaling, which then gives the same
    results), and ``bias`` ``[out]`` or None (in ``dtype``). ``in_features`` and ``out_features`` must be
    multiples of 16. The constructor makes an empty layer to load a state dict into; :meth:`from_linear`
    quantizes an ``nn.Linear``.

    ``forward(x)``: ``x [..., in]`` bfloat16/float16 -> ``x @ W^.T + bias`` in x's dtype (fp32 accumulation).
    float32 inputs are rounded to bfloat16 for the GEMM and the result is widened back to float32. Not
    differentiable: a backward through it raises (rollouts only; train the high-precision model).

    ``Module.to(dtype)`` / ``.half()`` convert the bias only: the quantized weight keeps its dtypes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % GEMM_MULTIPLE or out_features % GEMM_MULTIPLE or in_features < 1 or out_features < 1:
            raise ValueError(
                f"NVFP4Linear: in_features and out_features must be positive multiples of 16, got "
                f"{in_features} and {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.block_2d, self.per_tensor = False, True  # how from_linear quantized the weight (informational)
        blocks = in_features // fmt_ops.NVFP4_BLOCK
        self.register_buffer("w_block_scales", torch.zeros(out_features, blocks, dtype=torch.float8_e4m3fn,
                                                           device=device))  # fmt: skip
        self.register_buffer("w_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("w_per_tensor_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block_2d: bool = False, per_tensor: bool = True) -> NVFP4Linear:
        """Quantizes ``linear.weight`` to NVFP4 (on its device) and copies the bias.

        Args:
            block_2d: one E4M3 scale per 16 x 16 weight tile (the NVFP4 training recipe's weight blocks, so that
                ``W`` and ``W.T`` quantize alike); default 1 x 16 blocks along ``in_features``.
            per_tensor: two-level scaling with ``amax(|W|) / (448 * 6)`` (default); False: one-level.
        """
        weight, bias = linear.weight.detach(), linear.bias
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias is not None,
            device=weight.device,
            dtype=None if bias is None else bias.dtype,
        )
        w = quantize(weight, "nvfp4", block_2d=block_2d, per_tensor=per_tensor)
        layer.w_block_scales.copy_(w.block_scales)
        layer.w_packed.copy_(w.packed)
        if w.per_tensor_scale is not None:
            layer.w_per_tensor_scale.copy_(w.per_tensor_scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        layer.block_2d, layer.per_tensor = block_2d, per_tensor
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The weight the GEMM uses, ``[out, in]`` in ``dtype``."""
        return fmt_ops.nvfp4_dequantize(self.w_block_scales, self.w_packed, self.w_per_tensor_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"NVFP4Linear: x must be [..., {self.in_features}], got {list(x.shape)}")
        if x.dtype == torch.float32:
            return self._linear(x.to(torch.bfloat16)).to(torch.float32)
        return self._linear(x)

    def _linear(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return fmt_ops.nvfp4_linear(x, self.w_block_scales, self.w_packed, self.w_per_tensor_scale, bias)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half(), .float() would cast the float8 scales and the fp32 tensor scale too (both
        # are floating point): the quantized weight follows the device change only.
        quantized = {id(self.w_block_scales), id(self.w_packed), id(self.w_per_tensor_scale)}

        def convert(t: Tensor) -> Tensor:
            out = fn(t)
            return t.to(out.device) if id(t) in quantized and out.dtype != t.dtype else out

        return super()._apply(convert, recurse)

    def extra_repr(self) -> str:
        blocks = "16x16" if self.block_2d else "1x16"
        scale = "fp32 tensor scale" if self.per_tensor else "one-level"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=nvfp4 (E2M1, E4M3 scale per {blocks} block, {scale})"
        )


LAYERS = {"hif8": HiF8Linear, "nvfp4": NVFP4Linear}  # quantize_linears' formats


@dataclass
class QuantizationReport:
    """What :func:`quantize_linears` did: converted module names, and the kept ones with the reason."""

    format: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # qualified name -> reason

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} Linear layers converted to {self.format}, {len(self.skipped)} kept:"]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


SkipRule = Callable[[str, nn.Module], bool] | Iterable[str] | str | None


def _skip_filter(skip: SkipRule) -> Callable[[str, nn.Module], str | None]:
    """The user's rule as ``(name, module) -> reason to keep it, or None``."""
    if callable(skip):
        return lambda name, module: "skip(name, module) returned True" if skip(name, module) else None
    patterns = DEFAULT_SKIP_PATTERNS if skip is None else (skip,) if isinstance(skip, str) else tuple(skip)
    if not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"quantize_linears: skip patterns must be non-empty str, got {patterns!r}")

    def reason(name: str, module: nn.Module) -> str | None:
        hit = next((p for p in patterns if p.lower() in name.lower()), None)
        return None if hit is None else f"name matches skip pattern {hit!r}"

    return reason


def quantize_linears(
    model: nn.Module, format: str, skip: SkipRule = None, *, report: bool = False, **options
) -> nn.Module | tuple[nn.Module, QuantizationReport]:
    """Replaces the ``nn.Linear`` submodules of ``model`` in place by :class:`HiF8Linear` (``format="hif8"``,
    parameters shared) or :class:`NVFP4Linear` (``"nvfp4"``, weight quantized on its device).

    Kept in high precision:

    * layers whose qualified name contains (case-insensitive) one of ``skip``: an iterable of substrings
      replacing :data:`DEFAULT_SKIP_PATTERNS` (``skip=()`` converts every layer it can), or a callable
      ``(name, module) -> bool`` returning True for the layers to keep;
    * always: layers whose in or out features are not multiples of 16 (the GEMMs' granularity), the
      projections inside ``nn.MultiheadAttention`` (its forward reads ``out_proj.weight`` directly), and, for
      ``"hif8"``, layers that already are HiF8Linear.

    Each kept layer is logged (``difforge.nn.formats``) with its reason. ``options`` go to ``from_linear``
    (hif8: ``quantize_grad``, ``target_forward``, ``target_backward``; nvfp4: ``block_2d``, ``per_tensor``).
    A layer registered under several names (tied) becomes one quantized layer under all of them.

    Returns:
        ``model`` (the new layer if ``model`` itself is an ``nn.Linear``); with ``report=True``,
        ``(model, QuantizationReport)``.
    """
    if format not in LAYERS:
        raise ValueError(f"quantize_linears: format must be one of {tuple(LAYERS)}, got {format!r}")
    user_reason = _skip_filter(skip)
    in_mha = {id(sub) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for sub in mha.modules()}
    result = QuantizationReport(format)
    decisions: dict[int, tuple[nn.Module | None, str | None]] = {}  # id(old) -> (new layer, or reason to keep it)

    def keep_reason(name: str, module: nn.Linear) -> tuple[str | None, int]:
        """(reason to keep the layer or None, log level: WARNING where the layer cannot be converted)."""
        if format == "hif8" and isinstance(module, HiF8Linear):
            return "already HiF8Linear", logging.INFO
        if id(module) in in_mha:
            return "inside nn.MultiheadAttention (its forward reads the projection weights directly)", logging.WARNING
        if module.in_features % GEMM_MULTIPLE or module.out_features % GEMM_MULTIPLE:
            sizes = f"in_features={module.in_features}, out_features={module.out_features}"
            return f"{sizes}: not multiples of 16", logging.WARNING
        return user_reason(name, module), logging.INFO

    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear):
            continue
        if id(module) not in decisions:
            reason, level = keep_reason(name, module)
            if reason is not None:
                logger.log(level, "quantize_linears(%s): keeping %s in high precision: %s", format,
                           name or "<model>", reason)  # fmt: skip
                decisions[id(module)] = None, reason
            else:
                decisions[id(module)] = LAYERS[format].from_linear(module, **options), None
        new, reason = decisions[id(module)]
        if new is None:
            result.skipped[name] = reason
            continue
        result.converted.append(name)
        if not name:
            model = new
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    logger.info("quantize_linears(%s): %d converted, %d kept", format, len(result.converted), len(result.skipped))
    return (model, result) if report else model
