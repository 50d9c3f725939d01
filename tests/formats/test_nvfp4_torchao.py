"""Bit-exact parity of nvfp4_quantize / nvfp4_dequantize with torchao 0.18.0 (spec §4: "codes and scales
bit-identical to torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize"), on random finite tensors: fp32 and
bf16, one- and two-level (per_tensor_scale = amax / 2688), 2-D and multi-leading-dim shapes (flattened to 2-D for
torchao, which wants 2-D contiguous input). Dequantization against NVFP4Tensor.dequantize built on our bytes, and
the testlib reference against torchao (so the other files' reference is torchao's op order)."""

from __future__ import annotations

import pytest
import torch

from formats_testlib import DTYPE_IDS, assert_bitwise, ref_nvfp4_dequantize, ref_nvfp4_quantize, stable_seed

difforge = pytest.importorskip("difforge")
ops = difforge.ops
ao = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")

SHAPES = [(1, 16), (4, 32), (33, 80), (128, 256), (2, 3, 48), (2, 2, 3, 64)]
DISTS = ["normal", "outliers", "tiny", "huge", "blocks"]


def make_x(shape, dist, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if dist == "outliers":
        x = x * torch.where(torch.rand(*shape, generator=gen) < 0.01, 100.0, 1.0)
    elif dist == "tiny":
        x = x * 1e-5
    elif dist == "huge":
        x = x * 3e4
    elif dist == "blocks":  # block magnitudes over ~12 binades: exercises the 2^-6 clamp two-level
        k = shape[-1]
        spread = torch.exp(3 * torch.randn(*shape[:-1], k // 16, 1, generator=gen))
        x = x * spread.expand(*shape[:-1], k // 16, 16).reshape(shape)
    x = x.to(dtype)
    x.view(-1)[0] = x.view(-1)[0] + 1e-3  # never all-zero
    return x


def ao_quantize(x, pts):
    """torchao on the 2-D contiguous view; results reshaped back to x's leading dims."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    s, p = ao.nvfp4_quantize(x2, 16, pts)
    return s.reshape(*x.shape[:-1], -1), p.reshape(*x.shape[:-1], -1)


def ao_pts(x):
    return ao.per_tensor_amax_to_scale(x.float().abs().amax())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
def test_quantize_bit_exact_with_torchao(device, dtype, two_level, shape, dist):
    x = make_x(shape, dist, dtype, stable_seed(shape, dist, dtype))
    pts = ao_pts(x) if two_level else None
    ref_s, ref_p = ao_quantize(x, pts)
    ctx = f"[{tuple(shape)} {DTYPE_IDS[dtype]} {dist} two_level={two_level}]"
    ours_pts = ops.nvfp4_per_tensor_scale(x) if two_level else None
    if two_level:
        assert_bitwise(ours_pts, pts, "per_tensor_scale", ctx)
    s, p = ops.nvfp4_quantize(x.to(device), None if ours_pts is None else ours_pts.to(device))
    assert_bitwise(s, ref_s, "block_scales", ctx)
    assert_bitwise(p, ref_p, "packed", ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_testlib_reference_is_torchao(dtype, two_level):
    """The references used by the other files reproduce torchao exactly (so they are torchao's op order)."""
    for dist in DISTS:
        x = make_x((40, 96), dist, dtype, 1)
        pts = ao_pts(x) if two_level else None
        s, p = ao.nvfp4_quantize(x, 16, pts)
        rs, rp = ref_nvfp4_quantize(x, pts)
        assert_bitwise(rs, s, "ref scales", dist)
        assert_bitwise(rp, p, "ref packed", dist)
        t = ao.NVFP4Tensor(p, s, 16, dtype, pts, None, False, False)
        for out in (torch.float32, torch.bfloat16):
            assert_bitwise(ref_nvfp4_dequantize(s, p, pts, out), t.dequantize(out), "ref dequant", dist)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_dequantize_matches_nvfp4tensor(device, out_dtype, two_level):
    """ops.nvfp4_dequantize == NVFP4Tensor(qdata, scale, ...).dequantize on the op's own bytes."""
    x = make_x((48, 128), "blocks", torch.float32, 3)
    pts = ao_pts(x) if two_level else None
    s, p = ops.nvfp4_quantize(x.to(device), None if pts is None else pts.to(device))
    t = ao.NVFP4Tensor(p.cpu(), s.cpu(), 16, torch.float32, pts, None, False, False)
    got = ops.nvfp4_dequantize(s, p, None if pts is None else pts.to(device), dtype=out_dtype)
    assert_bitwise(got, t.dequantize(out_dtype), "dequantize")
    # and to_nvfp4(x).dequantize() end to end
    assert_bitwise(got, ao.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(out_dtype), "to_nvfp4")


def test_strict_pts_argument_forms(device):
    """per_tensor_scale given as a 0-dim or a one-element 1-D fp32 tensor: same result."""
    x = make_x((8, 64), "normal", torch.float32, 4)
    pts = ao_pts(x)
    ref_s, ref_p = ao_quantize(x, pts)
    for form in (pts.reshape(()), pts.reshape(1)):
        s, p = ops.nvfp4_quantize(x.to(device), form.to(device))
        assert_bitwise(s, ref_s, "scales")
        assert_bitwise(p, ref_p, "packed")
