"""CUDA kernels of the formats family against the CPU kernels and the testlib references: every codec bit for bit
(HiF8 encode/decode/quantize/QDQ/E4M3, NVFP4 RN/SR/block_2d quantize and dequantize), the two linears to fp32
accumulation tolerance (M <= 16 and M = 300, leading dims, strided x rows), and device-mismatch errors. Skipped
without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats_testlib import (
    HIF8_MIDPOINTS,
    abs_product,
    assert_bitwise,
    nvfp4_pts,
    ref_hif8_decode,
    ref_hif8_encode,
    ref_hif8_qdq,
    ref_hif8_quantize,
    ref_nvfp4_dequantize,
    ref_nvfp4_quantize,
    rnd,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def wide(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * torch.exp(3 * torch.randn(*shape, generator=gen))).to(dtype)


# ---- HiF8 codecs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_hif8_decode_cuda_eq_cpu(dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(40)
    for scale in (None, 3.7):
        assert_bitwise(ops.hif8_decode(codes.cuda(), dtype, scale=scale), ops.hif8_decode(codes, dtype, scale=scale),
                       f"decode scale={scale}")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
@pytest.mark.parametrize("saturate", [False, True])
def test_hif8_encode_cuda_eq_cpu(dtype, rounding, saturate):
    m = HIF8_MIDPOINTS.astype(np.float32)
    mids = np.concatenate([m, np.nextafter(m, np.float32(np.inf)), np.nextafter(m, np.float32(0))])
    x = torch.cat([wide((300, 129), seed=1).reshape(-1), torch.from_numpy(np.concatenate([mids, -mids])),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])]).to(dtype)  # fmt: skip
    for scale in (None, 0.37):
        cpu = ops.hif8_encode(x, scale=scale, saturate=saturate, rounding=rounding)
        gpu = ops.hif8_encode(x.cuda(), scale=scale, saturate=saturate, rounding=rounding)
        assert_bitwise(gpu, cpu, f"encode scale={scale}", inputs=x.float())
    if rounding == "ta":
        ref = torch.from_numpy(ref_hif8_encode(x.float().numpy(), saturate))
        assert_bitwise(ops.hif8_encode(x.cuda(), saturate=saturate), ref, "encode vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [15.0, 224.0])
@pytest.mark.parametrize("shape", [(7,), (300, 129), (4, 1000, 33)], ids=str)
def test_hif8_scaled_cuda_eq_cpu(dtype, target, shape):
    """Multi-block amax reductions on the GPU: scale, codes, QDQ and E4M3 identical to CPU and the reference."""
    x = wide(shape, dtype, seed=len(shape))
    codes_c, s_c = ops.hif8_quantize(x, target=target)
    codes_g, s_g = ops.hif8_quantize(x.cuda(), target=target)
    assert_bitwise(s_g, s_c, "scale")
    assert_bitwise(codes_g, codes_c, "codes")
    rc, rs = ref_hif8_quantize(x, target)
    assert_bitwise(s_g, rs, "scale vs ref")
    assert_bitwise(codes_g, rc, "codes vs ref")
    for out in (torch.float32, torch.bfloat16):
        assert_bitwise(ops.hif8_fake_quantize(x.cuda(), target=target, dtype=out),
                       ops.hif8_fake_quantize(x, target=target, dtype=out), "qdq")  # fmt: skip
    assert_bitwise(ops.hif8_fake_quantize(x.cuda(), target=target, dtype=torch.float32),
                   ref_hif8_qdq(x, target, torch.float32), "qdq vs ref")  # fmt: skip
    e_c, si_c = ops.hif8_quantize_e4m3(x, target=target)
    e_g, si_g = ops.hif8_quantize_e4m3(x.cuda(), target=target)
    assert_bitwise(e_g, e_c, "e4m3")
    assert_bitwise(si_g, si_c, "scale_inv")


def test_hif8_fake_quantize_grad_cuda():
    x = wide((64, 48), seed=3).cuda().requires_grad_(True)
    g = torch.randn(64, 48, device="cuda")
    ops.hif8_fake_quantize(x).backward(g)
    assert torch.equal(x.grad, g)


# ---- NVFP4 codecs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two_level", [False, True])
@pytest.mark.parametrize("block_2d", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("shape", [(1, 16), (37, 80), (300, 256), (2, 33, 64)], ids=str)
def test_nvfp4_quantize_cuda_eq_cpu(dtype, two_level, block_2d, stochastic, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=gen) * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=gen))
    x = x.to(dtype)
    pts = nvfp4_pts(x) if two_level else None
    kw = dict(block_2d=block_2d, stochastic=stochastic, seed=2**40 + 3, offset=77)
    sc, pc = ops.nvfp4_quantize(x, pts, **kw)
    sg, pg = ops.nvfp4_quantize(x.cuda(), None if pts is None else pts.cuda(), **kw)
    assert_bitwise(sg, sc, "block_scales")
    assert_bitwise(pg, pc, "packed")
    rs, rp = ref_nvfp4_quantize(x, pts, **kw)
    assert_bitwise(sg, rs, "block_scales vs ref")
    assert_bitwise(pg, rp, "packed vs ref")
    for out in (torch.float32, torch.bfloat16, torch.float16):
        dg = ops.nvfp4_dequantize(sg, pg, None if pts is None else pts.cuda(), dtype=out)
        assert_bitwise(dg, ops.nvfp4_dequantize(sc, pc, pts, dtype=out), "dequantize")
        assert_bitwise(dg, ref_nvfp4_dequantize(rs, rp, pts, out), "dequantize vs ref")


def test_nvfp4_quantize_strided_rows_cuda():
    base = torch.randn(90, 160)
    x = base[::3, 16:144]
    sg, pg = ops.nvfp4_quantize(x.cuda(), block_2d=True)
    rs, rp = ref_nvfp4_quantize(x, block_2d=True)
    assert_bitwise(sg, rs, "scales")
    assert_bitwise(pg, rp, "packed")


def test_nvfp4_torchao_parity_cuda():
    ao = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    x = torch.randn(128, 512) * 7
    pts = ao.per_tensor_amax_to_scale(x.abs().amax())
    rs, rp = ao.nvfp4_quantize(x, 16, pts)
    sg, pg = ops.nvfp4_quantize(x.cuda(), pts.cuda())
    assert_bitwise(sg, rs, "scales")
    assert_bitwise(pg, rp, "packed")


# ---- linears ----------------------------------------------------------------------------------------------


def _close(got, ref64, absprod, out_dtype, extra_rel=0.0):
    rel = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[out_dtype]
    err = (got.detach().cpu().double() - ref64).abs()
    tol = rel * ref64.abs() + (2.0**-16 + extra_rel) * absprod + 1e-30
    assert got.dtype == out_dtype
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16, 300])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_hif8_linear_cuda(dtype, M, lead):
    N, K = 96, 256
    x = rnd((*lead, M, K), dtype, seed=M)
    w = rnd((N, K), seed=1, gain=0.05)
    w_codes, w_scale = ref_hif8_quantize(w, 15.0)
    bias = rnd((N,), dtype, seed=2)
    got = ops.hif8_linear(x.cuda(), w_codes.cuda(), w_scale.cuda(), bias.cuda())
    cpu = ops.hif8_linear(x, w_codes, w_scale, bias)
    xh = ref_hif8_qdq(x, 15.0, torch.float32).reshape(-1, K)
    wh = ref_hif8_decode(w_codes, torch.float32, w_scale)
    ref = (xh.double() @ wh.double().T + bias.double()).reshape(*lead, M, N)
    ap = abs_product(xh, wh).reshape(*lead, M, N)
    # E4M3 subnormal rounding of the smallest activations (spec §3): <= 2^-14 amax / 15 per term
    extra = 2.0**-12 if dtype == torch.float32 else 2.0**-8
    _close(got, ref, ap, dtype, extra)
    _close(cpu, ref, ap, dtype, extra)
    # codes + x_scale input, strided rows
    xc, xs = ref_hif8_quantize(rnd((2 * M, K + 32), seed=3), 15.0)
    xc_s = xc.cuda()[::2, 16 : 16 + K]
    got_c = ops.hif8_linear(xc_s, w_codes.cuda(), w_scale.cuda(), x_scale=xs.cuda(), out_dtype=torch.float32)
    xh_c = ref_hif8_decode(xc[::2, 16 : 16 + K], torch.float32, xs)
    _close(got_c, xh_c.double() @ wh.double().T, abs_product(xh_c, wh), torch.float32, 2.0**-12)


def test_hif8_linear_grad_cuda():
    x = rnd((3, 17, 64), torch.bfloat16, seed=4).cuda().requires_grad_(True)
    w_codes, w_scale = ref_hif8_quantize(rnd((32, 64), seed=5, gain=0.05), 15.0)
    out = ops.hif8_linear(x, w_codes.cuda(), w_scale.cuda())
    g = torch.randn_like(out)
    out.backward(g)
    ref = g.double().cpu() @ ref_hif8_decode(w_codes, torch.float64, w_scale.double())
    torch.testing.assert_close(x.grad.cpu().double(), ref, rtol=2**-6, atol=2**-6 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("two_level", [False, True])
def test_nvfp4_linear_cuda(dtype, M, two_level):
    N, K = 128, 512
    w = rnd((N, K), seed=6, gain=0.05)
    pts = nvfp4_pts(w) if two_level else None
    s, p = ref_nvfp4_quantize(w, pts)
    x = rnd((M, K), dtype, seed=M)
    bias = rnd((N,), dtype, seed=7)
    args_g = (s.cuda(), p.cuda(), None if pts is None else pts.cuda(), bias.cuda())
    got = ops.nvfp4_linear(x.cuda(), *args_g)
    cpu = ops.nvfp4_linear(x, s, p, pts, bias)
    wdq = ref_nvfp4_dequantize(s, p, pts, torch.float32)
    ref = x.double() @ wdq.double().T + bias.double()
    ap = abs_product(x.float(), wdq)
    _close(got, ref, ap, dtype)
    _close(cpu, ref, ap, dtype)
    # strided rows and leading dims
    base = rnd((2, 2 * M, K + 64), dtype, seed=8)
    xs = base.cuda()[:, ::2, 32 : 32 + K]
    got_s = ops.nvfp4_linear(xs, *args_g)
    ref_s = xs.cpu().double() @ wdq.double().T + bias.double()
    _close(got_s, ref_s, abs_product(xs.cpu().float().reshape(-1, K), wdq).reshape(ref_s.shape), dtype)


def test_nvfp4_linear_backward_raises_cuda():
    w = rnd((16, 32), seed=9)
    s, p = ref_nvfp4_quantize(w)
    x = rnd((2, 32), torch.bfloat16).cuda().requires_grad_(True)
    with pytest.raises(RuntimeError):
        ops.nvfp4_linear(x, s.cuda(), p.cuda()).float().sum().backward()


# ---- device mismatch --------------------------------------------------------------------------------------


def test_device_mismatch_errors():
    errors = (RuntimeError, ValueError)
    x = torch.randn(4, 32)
    w_codes, w_scale = ref_hif8_quantize(torch.randn(16, 32), 15.0)
    with pytest.raises(errors, match="device|cuda|cpu"):
        ops.hif8_linear(x.cuda(), w_codes, w_scale.cuda())
    with pytest.raises(errors, match="device|cuda|cpu"):
        ops.hif8_linear(x.cuda(), w_codes.cuda(), w_scale.cuda(), torch.zeros(16))
    s, p = ref_nvfp4_quantize(torch.randn(16, 32))
    with pytest.raises(errors, match="device|cuda|cpu"):
        ops.nvfp4_dequantize(s.cuda(), p)
    with pytest.raises(errors, match="device|cuda|cpu"):
        ops.nvfp4_linear(x.bfloat16().cuda(), s, p.cuda())
    with pytest.raises(errors, match="device|cuda|cpu"):
        ops.nvfp4_linear(x.bfloat16().cuda(), s.cuda(), p.cuda(), None, torch.zeros(16, dtype=torch.bfloat16))
