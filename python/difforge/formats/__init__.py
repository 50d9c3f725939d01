"""HiF8 and NVFP4 tensors: codes + scales containers, ``quantize`` / ``dequantize``, safetensors checkpoints.

Example::

    w = quantize(weight, "nvfp4", block_2d=True)  # NVFP4Tensor: E4M3 block scales, packed E2M1, fp32 tensor scale
    save_quantized("model.safetensors", {"w": w, "bias": bias})
    w_hat = load_quantized("model.safetensors")["w"].dequantize(torch.bfloat16)

The codecs are :mod:`difforge.ops.formats`; the layers using them :class:`difforge.nn.HiF8Linear` and
:class:`difforge.nn.NVFP4Linear`.
"""

from difforge.formats.io import load_quantized, read_metadata, save_quantized
from difforge.formats.tensors import FORMATS, HiF8Tensor, NVFP4Tensor, QuantizedTensor, dequantize, quantize

__all__ = [
    "FORMATS",
    "HiF8Tensor",
    "NVFP4Tensor",
    "QuantizedTensor",
    "dequantize",
    "load_quantized",
    "quantize",
    "read_metadata",
    "save_quantized",
]
