"""torch.library.opcheck of every formats op (schema, autograd registration, fake kernels, AOT dispatch with dynamic
shapes) through tests/opcheck.py::run_opcheck, on torch.ops.difforge.<op>.default with the raw schema argument order
(bindings/schemas.cpp, "formats"); and torch.compile(fullgraph=True) of a function calling the Python wrappers,
against eager and the testlib references."""

from __future__ import annotations

import pytest
import torch

from formats_testlib import (
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
from opcheck import DEFAULT_TEST_UTILS, run_opcheck

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge


def _x(shape=(5, 32), dtype=torch.float32, seed=0, device="cpu", requires_grad=False):
    return rnd(shape, dtype, seed=seed, gain=3.0, device=device).requires_grad_(requires_grad)


# torch's SchemaCheckMode (test_schema) compares inputs before/after with torch.allclose, which has no float8 CPU
# kernel ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'): ops with float8 inputs skip that utility and
# check instead, by hand, that no input is mutated and the output does not alias an input.
NO_SCHEMA = tuple(u for u in DEFAULT_TEST_UTILS if u != "test_schema")


def run_opcheck_float8_inputs(op, args):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    run_opcheck(op, args, test_utils=NO_SCHEMA)
    out = op(*args)
    outs = out if isinstance(out, tuple) else (out,)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            as_bytes = (lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)  # noqa: E731
            assert torch.equal(as_bytes(a), as_bytes(b)), "input mutated"
            for o in outs:
                assert o.untyped_storage().data_ptr() != a.untyped_storage().data_ptr(), "output aliases an input"


def _scalar(v, device):
    return torch.tensor(v, dtype=torch.float32, device=device)


# ---- HiF8 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,scale,saturate,rounding",
    [(torch.float32, None, False, "ta"), (torch.bfloat16, 2.5, True, "ta"), (torch.float16, 0.25, False, "hybrid")],
)
def test_opcheck_hif8_encode(device, dtype, scale, saturate, rounding):
    s = None if scale is None else _scalar(scale, device)
    run_opcheck(raw.hif8_encode.default, (_x((3, 4, 16), dtype, device=device), s, saturate, rounding))


def test_opcheck_hif8_encode_requires_grad(device):
    """Integer output, input that requires grad: the forward works and autograd is registered."""
    run_opcheck(raw.hif8_encode.default, (_x(device=device, requires_grad=True), None, False, "ta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 3.0])
def test_opcheck_hif8_decode(device, dtype, scale):
    # every code but 0x80: opcheck compares eager and AOT outputs with assert_close, for which NaN != NaN
    codes = torch.tensor([c for c in range(256) if c != 0x80] + [0], dtype=torch.int32).to(torch.uint8)
    codes = codes.reshape(16, 16).to(device)
    s = None if scale is None else _scalar(scale, device)
    run_opcheck(raw.hif8_decode.default, (codes, s, dtype))


@pytest.mark.parametrize("target,saturate,rounding", [(15.0, False, "ta"), (224.0, True, "hybrid")])
def test_opcheck_hif8_quantize(device, target, saturate, rounding):
    run_opcheck(raw.hif8_quantize.default, (_x((2, 3, 32), device=device), target, saturate, rounding))


FQ_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
             (torch.float16, torch.float32)]  # fmt: skip


@pytest.mark.parametrize("dtype,out_dtype", FQ_DTYPES)
def test_opcheck_hif8_fake_quantize(device, dtype, out_dtype):
    x = _x((4, 48), dtype, device=device, requires_grad=True)
    run_opcheck(raw.hif8_fake_quantize.default, (x, 15.0, "ta", out_dtype))


@pytest.mark.parametrize("target", [15.0, 224.0])
def test_opcheck_hif8_quantize_e4m3(device, target):
    run_opcheck(raw.hif8_quantize_e4m3.default, (_x((6, 32), device=device), target, "ta"))


def _hif8_w(N=32, K=48, device="cpu"):
    codes, s = ref_hif8_quantize(rnd((N, K), seed=5, gain=0.1), 15.0)
    return codes.to(device), s.reshape(1).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_hif8_linear_float_x(device, dtype, with_bias):
    w, s = _hif8_w(device=device)
    x = _x((2, 3, 48), dtype, device=device, requires_grad=True)
    bias = rnd((32,), dtype, seed=2, device=device).requires_grad_(True) if with_bias else None
    run_opcheck(raw.hif8_linear.default, (x, w, s, bias, None, None))


def test_opcheck_hif8_linear_codes(device):
    w, s = _hif8_w(device=device)
    xc, xs = ref_hif8_quantize(rnd((7, 48), seed=3), 15.0)
    run_opcheck(raw.hif8_linear.default, (xc.to(device), w, s, None, xs.to(device), torch.float32))
    run_opcheck(raw.hif8_linear.default, (xc.to(device), w, s, rnd((32,), device=device), xs.to(device), None))


# ---- NVFP4 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,two_level,block_2d,stochastic",
    [(torch.float32, False, False, False), (torch.bfloat16, True, False, False), (torch.float16, True, True, False),
     (torch.float32, True, False, True), (torch.bfloat16, False, True, True)],
)  # fmt: skip
def test_opcheck_nvfp4_quantize(device, dtype, two_level, block_2d, stochastic):
    x = _x((2, 17, 64), dtype, device=device)
    pts = nvfp4_pts(x).to(device) if two_level else None
    run_opcheck(raw.nvfp4_quantize.default, (x, pts, block_2d, stochastic, 7, 11))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_level", [False, True])
def test_opcheck_nvfp4_dequantize(device, dtype, two_level):
    x = _x((3, 5, 48))
    pts = nvfp4_pts(x) if two_level else None
    s, p = ref_nvfp4_quantize(x, pts)
    args = (s.to(device), p.to(device), None if pts is None else pts.to(device), dtype)
    run_opcheck_float8_inputs(raw.nvfp4_dequantize.default, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_level,with_bias", [(False, False), (True, True)])
def test_opcheck_nvfp4_linear(device, dtype, two_level, with_bias):
    w = rnd((32, 64), seed=4, gain=0.1)
    pts = nvfp4_pts(w) if two_level else None
    s, p = ref_nvfp4_quantize(w, pts)
    x = _x((2, 5, 64), dtype, device=device)
    bias = rnd((32,), dtype, seed=6, device=device) if with_bias else None
    args = (x, s.to(device), p.to(device), None if pts is None else pts.to(device), bias)
    run_opcheck_float8_inputs(raw.nvfp4_linear.default, args)


# ---- torch.compile --------------------------------------------------------------------------------------------


def _pipeline(x, xb, w_codes, w_scale, nv_s, nv_p, nv_pts):
    codes, s = ops.hif8_quantize(x, target=224.0)
    back = ops.hif8_decode(codes, torch.float32, scale=s)
    enc = ops.hif8_encode(x, scale=2.0)
    qdq = ops.hif8_fake_quantize(x, dtype=torch.float32)
    e4m3, scale_inv = ops.hif8_quantize_e4m3(x)
    lin = ops.hif8_linear(x, w_codes, w_scale)
    pts = ops.nvfp4_per_tensor_scale(x)
    sc, pk = ops.nvfp4_quantize(x, pts)
    dq = ops.nvfp4_dequantize(sc, pk, pts, dtype=torch.float32)
    nl = ops.nvfp4_linear(xb, nv_s, nv_p, nv_pts)
    return back * 2, enc, qdq + 1, e4m3.float() * scale_inv, lin, dq - x, nl.float(), sc, pk


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    x = _x((8, 32), device=device)
    xb = x.bfloat16()
    w_codes, w_scale = _hif8_w(16, 32, device=device)
    w = rnd((16, 32), seed=9, gain=0.1)
    nv_pts = nvfp4_pts(w)
    nv_s, nv_p = ref_nvfp4_quantize(w, nv_pts)
    args = (x, xb, w_codes, w_scale, nv_s.to(device), nv_p.to(device), nv_pts.to(device))
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    eager = _pipeline(*args)
    for i, (g, e) in enumerate(zip(got, eager)):
        assert_bitwise(g, e, f"output {i} compiled vs eager")
    # against the references
    codes, s = ref_hif8_quantize(x, 224.0)
    assert_bitwise(got[0], ref_hif8_decode(codes, torch.float32, s) * 2, "decode")
    assert_bitwise(got[1], torch.from_numpy(ref_hif8_encode(x.cpu() * 2.0)), "encode")
    assert_bitwise(got[2], ref_hif8_qdq(x.cpu(), 15.0, torch.float32) + 1, "qdq")
    rs, rp = ref_nvfp4_quantize(x, nvfp4_pts(x))
    assert_bitwise(got[7], rs, "nvfp4 scales")
    assert_bitwise(got[8], rp, "nvfp4 packed")
    assert_bitwise(got[5], ref_nvfp4_dequantize(rs, rp, nvfp4_pts(x), torch.float32) - x.cpu(), "nvfp4 dq")
