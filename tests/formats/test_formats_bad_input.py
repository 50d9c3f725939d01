"""Bad input raises a clear RuntimeError/ValueError naming the problem, never a crash or a silent answer; empty
tensors return empty results. Each case goes through the Python wrapper (which passes arguments straight to the raw
op). Device mismatches are checked in test_formats_cuda.py."""

from __future__ import annotations

import pytest
import torch

from formats_testlib import nvfp4_pts, ref_hif8_quantize, ref_nvfp4_quantize, rnd

difforge = pytest.importorskip("difforge")
ops = difforge.ops

ERRORS = (RuntimeError, ValueError)


def raises(match):
    return pytest.raises(ERRORS, match=match)


def hif8_w(N=32, K=48, device="cpu"):
    codes, s = ref_hif8_quantize(rnd((N, K), seed=1, gain=0.1), 15.0)
    return codes.to(device), s.to(device)


def nv_w(N=32, K=64, two_level=True, device="cpu"):
    w = rnd((N, K), seed=2, gain=0.1)
    pts = nvfp4_pts(w) if two_level else None
    s, p = ref_nvfp4_quantize(w, pts)
    return s.to(device), p.to(device), (pts.to(device) if pts is not None else None)


def test_valid_baseline_runs(device):
    """The unmodified inputs of this file are valid (so every raise below is due to the one change)."""
    x = rnd((4, 64), device=device)
    codes = ops.hif8_encode(x, scale=2.0)
    ops.hif8_decode(codes, scale=2.0)
    ops.hif8_quantize(x)
    ops.hif8_fake_quantize(x)
    ops.hif8_quantize_e4m3(x)
    w, s = hif8_w(32, 64, device)
    ops.hif8_linear(x, w, s, torch.zeros(32, device=device))
    ops.hif8_linear(codes, w, s, x_scale=torch.tensor(2.0, device=device))
    pts = ops.nvfp4_per_tensor_scale(x)
    sc, pk = ops.nvfp4_quantize(x, pts)
    ops.nvfp4_dequantize(sc, pk, pts)
    ns, npk, npts = nv_w(device=device)
    ops.nvfp4_linear(x.bfloat16(), ns, npk, npts, torch.zeros(32, dtype=torch.bfloat16, device=device))


# ---- HiF8 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float32, torch.bool])
def test_decode_codes_not_uint8(device, dtype):
    codes = torch.zeros(4, 8, dtype=dtype, device=device)
    with raises(r"uint8"):
        ops.hif8_decode(codes)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_decode_bad_output_dtype(device, dtype):
    with raises(r"dtype|float32|float16|bfloat16"):
        ops.hif8_decode(torch.zeros(4, dtype=torch.uint8, device=device), dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64, torch.bool])
def test_encode_integer_input(device, dtype):
    x = torch.ones(4, 8, dtype=dtype, device=device)
    with raises(r"float|dtype"):
        ops.hif8_encode(x)
    with raises(r"float|dtype"):
        ops.hif8_quantize(x)
    with raises(r"float|dtype"):
        ops.hif8_fake_quantize(x, dtype=torch.float32)
    with raises(r"float|dtype"):
        ops.hif8_quantize_e4m3(x)


@pytest.mark.parametrize("rounding", ["nearest", "TA", "", "sr"])
def test_unknown_rounding(device, rounding):
    x = rnd((4, 16), device=device)
    with raises(r"rounding"):
        ops.hif8_encode(x, rounding=rounding)
    with raises(r"rounding"):
        ops.hif8_quantize(x, rounding=rounding)
    with raises(r"rounding"):
        ops.hif8_fake_quantize(x, rounding=rounding)
    with raises(r"rounding"):
        ops.hif8_quantize_e4m3(x, rounding=rounding)


def test_scale_with_several_elements(device):
    x = rnd((4, 16), device=device)
    with raises(r"scale"):
        ops.hif8_encode(x, scale=torch.tensor([1.0, 2.0], device=device))
    with raises(r"scale"):
        ops.hif8_decode(torch.zeros(4, dtype=torch.uint8, device=device), scale=torch.ones(3, device=device))


def test_fake_quantize_bad_out_dtype(device):
    with raises(r"dtype|float"):
        ops.hif8_fake_quantize(rnd((4, 16), device=device), dtype=torch.int32)


@pytest.mark.parametrize("N,K", [(24, 48), (32, 40), (8, 8)])
def test_hif8_linear_not_multiple_of_16(device, N, K):
    w, s = hif8_w(N, K, device)
    with raises(r"16"):
        ops.hif8_linear(rnd((3, K), device=device), w, s)


def test_hif8_linear_bad_weight(device):
    w, s = hif8_w(32, 48, device)
    x = rnd((3, 48), device=device)
    with raises(r"uint8|w_codes"):
        ops.hif8_linear(x, w.to(torch.int32), s)
    with raises(r"w_codes|\[N, K\]|dim"):
        ops.hif8_linear(x, w.reshape(2, 16, 48), s)
    with raises(r"w_scale|element"):
        ops.hif8_linear(x, w, torch.ones(2, device=device))
    with raises(r"K|shape|size|48|64"):
        ops.hif8_linear(rnd((3, 64), device=device), w, s)


def test_hif8_linear_codes_need_x_scale(device):
    w, s = hif8_w(32, 48, device)
    xc, _ = ref_hif8_quantize(rnd((3, 48)), 15.0)
    with raises(r"x_scale"):
        ops.hif8_linear(xc.to(device), w, s)


@pytest.mark.parametrize("shape", [(33,), (1, 32), (16,)])
def test_hif8_linear_bias_shape(device, shape):
    w, s = hif8_w(32, 48, device)
    with raises(r"bias"):
        ops.hif8_linear(rnd((3, 48), device=device), w, s, torch.zeros(*shape, device=device))


def test_hif8_linear_bad_x_dtype(device):
    w, s = hif8_w(32, 48, device)
    with raises(r"x|dtype|float|uint8"):
        ops.hif8_linear(torch.ones(3, 48, dtype=torch.int32, device=device), w, s)


# ---- NVFP4 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [8, 24, 40, 1])
def test_nvfp4_k_not_multiple_of_16(device, K):
    with raises(r"16"):
        ops.nvfp4_quantize(rnd((4, K), device=device))


def test_nvfp4_quantize_bad_x_dtype(device):
    with raises(r"float|dtype"):
        ops.nvfp4_quantize(torch.ones(4, 32, dtype=torch.int32, device=device))


@pytest.mark.parametrize("pts", ["bf16", "fp64", "two", "matrix"])
def test_nvfp4_bad_per_tensor_scale(device, pts):
    x = rnd((4, 32), device=device)
    bad = {"bf16": torch.tensor(0.01, dtype=torch.bfloat16), "fp64": torch.tensor(0.01, dtype=torch.float64),
           "two": torch.tensor([0.01, 0.02]), "matrix": torch.full((2, 2), 0.01)}[pts].to(device)  # fmt: skip
    s, p = ops.nvfp4_quantize(x)
    with raises(r"per_tensor_scale"):
        ops.nvfp4_quantize(x, bad)
    with raises(r"per_tensor_scale"):
        ops.nvfp4_dequantize(s, p, bad)
    ns, npk, _ = nv_w(device=device)
    with raises(r"per_tensor_scale"):
        ops.nvfp4_linear(rnd((3, 64), torch.bfloat16, device=device), ns, npk, bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.float8_e5m2])
def test_nvfp4_dequantize_scales_wrong_dtype(device, dtype):
    s, p = ops.nvfp4_quantize(rnd((4, 32), device=device))
    bad = s.view(torch.uint8) if dtype == torch.uint8 else s.float().to(dtype)
    with raises(r"e4m3|float8|block_scales|dtype"):
        ops.nvfp4_dequantize(bad, p)
    ns, npk, npts = nv_w(device=device)
    bad_w = ns.view(torch.uint8) if dtype == torch.uint8 else ns.float().to(dtype)
    with raises(r"e4m3|float8|scales|dtype"):
        ops.nvfp4_linear(rnd((3, 64), torch.bfloat16, device=device), bad_w, npk, npts)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_nvfp4_packed_not_uint8(device, dtype):
    s, p = ops.nvfp4_quantize(rnd((4, 32), device=device))
    with raises(r"uint8|packed"):
        ops.nvfp4_dequantize(s, p.to(dtype))
    ns, npk, npts = nv_w(device=device)
    with raises(r"uint8|packed"):
        ops.nvfp4_linear(rnd((3, 64), torch.bfloat16, device=device), ns, npk.to(dtype), npts)


@pytest.mark.parametrize("which", ["more_blocks", "fewer_blocks", "rows", "rank"])
def test_nvfp4_dequantize_shape_mismatch(device, which):
    s, p = ops.nvfp4_quantize(rnd((4, 64), device=device))  # s [4, 4], p [4, 32]
    bad_s = {"more_blocks": torch.cat([s.view(torch.uint8), s.view(torch.uint8)[:, :1]], 1).view(torch.float8_e4m3fn),
             "fewer_blocks": s[:, :3].contiguous(), "rows": s[:3].contiguous(),
             "rank": s.reshape(2, 2, 4)}[which]  # fmt: skip
    with raises(r"shape|size|block_scales|match|packed"):
        ops.nvfp4_dequantize(bad_s, p)


def test_nvfp4_dequantize_odd_packed_width(device):
    """packed [.., P] with 2P not a multiple of 16."""
    s, p = ops.nvfp4_quantize(rnd((4, 32), device=device))
    with raises(r"16|shape|packed|size"):
        ops.nvfp4_dequantize(s[:, :1].contiguous(), p[:, :12].contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.float64, torch.uint8])
def test_nvfp4_linear_x_dtype(device, dtype):
    ns, npk, npts = nv_w(device=device)
    x = rnd((3, 64), device=device).to(dtype)
    with raises(r"bfloat16|float16|bf16|fp16|dtype"):
        ops.nvfp4_linear(x, ns, npk, npts)


@pytest.mark.parametrize("N,K", [(24, 64), (32, 40), (8, 16)])
def test_nvfp4_linear_not_multiple_of_16(device, N, K):
    gen = torch.Generator().manual_seed(0)
    kb = -(-K // 16)
    s = torch.full((N, kb), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)
    p = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.int32).to(torch.uint8).to(device)
    x = rnd((3, K), torch.bfloat16, device=device)
    with raises(r"16|shape"):
        ops.nvfp4_linear(x, s, p)


def test_nvfp4_linear_k_mismatch(device):
    ns, npk, npts = nv_w(32, 64, device=device)
    with raises(r"K|shape|size|64|48"):
        ops.nvfp4_linear(rnd((3, 48), torch.bfloat16, device=device), ns, npk, npts)
    with raises(r"shape|size|scales|match"):
        ops.nvfp4_linear(rnd((3, 64), torch.bfloat16, device=device), ns[:16].contiguous(), npk, npts)


@pytest.mark.parametrize("shape", [(33,), (1, 32), (16,)])
def test_nvfp4_linear_bias_shape(device, shape):
    ns, npk, npts = nv_w(device=device)
    with raises(r"bias"):
        ops.nvfp4_linear(rnd((3, 64), torch.bfloat16, device=device), ns, npk, npts,
                         torch.zeros(*shape, dtype=torch.bfloat16, device=device))  # fmt: skip


# ---- empty tensors ----------------------------------------------------------------------------------------


def test_empty_tensors(device):
    x = torch.empty(0, 32, device=device)
    assert ops.hif8_encode(x).shape == (0, 32)
    assert ops.hif8_decode(torch.empty(0, 5, dtype=torch.uint8, device=device), torch.bfloat16).shape == (0, 5)
    codes, s = ops.hif8_quantize(x)
    assert codes.shape == (0, 32) and codes.dtype == torch.uint8
    assert float(s) == 1.0  # amax over nothing is 0 -> s = 1
    assert ops.hif8_fake_quantize(x).shape == (0, 32)
    e, si = ops.hif8_quantize_e4m3(x)
    assert e.shape == (0, 32) and e.dtype == torch.float8_e4m3fn and si.dim() == 0
    sc, pk = ops.nvfp4_quantize(x)
    assert sc.shape == (0, 2) and pk.shape == (0, 16) and sc.dtype == torch.float8_e4m3fn
    sc2, pk2 = ops.nvfp4_quantize(torch.empty(3, 0, 32, device=device), torch.tensor(1.0, device=device),
                                  block_2d=True, stochastic=True)  # fmt: skip
    assert sc2.shape == (3, 0, 2) and pk2.shape == (3, 0, 16)
    assert ops.nvfp4_dequantize(sc, pk, dtype=torch.float32).shape == (0, 32)
    w, ws = hif8_w(32, 32, device)
    assert ops.hif8_linear(x, w, ws).shape == (0, 32)
    assert ops.hif8_linear(torch.empty(2, 0, 32, dtype=torch.bfloat16, device=device), w, ws).shape == (2, 0, 32)
    ns, npk, npts = nv_w(16, 32, device=device)
    assert ops.nvfp4_linear(torch.empty(0, 32, dtype=torch.bfloat16, device=device), ns, npk, npts).shape == (0, 16)


def test_zero_k_is_rejected_or_empty(device):
    """K = 0 is a multiple of 16: either an empty result or a clear error, never a crash."""
    x = torch.empty(4, 0, device=device)
    try:
        sc, pk = ops.nvfp4_quantize(x)
    except ERRORS:
        return
    assert sc.shape == (4, 0) and pk.shape == (4, 0)
