"""hif8_linear and nvfp4_linear against plain-PyTorch float64 references built from the testlib codecs:
hif8_linear = QDQ(x) (fp32, target 15) @ (decode(W) / w_scale).T + bias, or decode(x_codes) / x_scale for code
inputs; its straight-through gradients (x, bias). nvfp4_linear = x.float() @ dequant(W, fp32).T + bias rounded to x's
dtype, one- and two-level weights, several M and leading dims; inference only (backward raises)."""

from __future__ import annotations

import pytest
import torch

from formats_testlib import (
    DTYPE_IDS,
    abs_product,
    nvfp4_pts,
    ref_hif8_decode,
    ref_hif8_qdq,
    ref_hif8_quantize,
    ref_nvfp4_dequantize,
    ref_nvfp4_quantize,
    rnd,
    stable_seed,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

ULP_REL = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_linear_close(got, ref64, absprod, out_dtype, in_dtype, ctx=""):
    """|got - ref| <= rounding of the output + fp32 accumulation (+ a 16-bit rounding of the operand QDQ, allowed
    for 16-bit x: the CPU path may keep x^ in x's dtype, CUDA keeps it exact)."""
    assert got.dtype == out_dtype, f"{got.dtype} != {out_dtype} {ctx}"
    g = got.detach().cpu().double()
    assert g.shape == ref64.shape, f"{tuple(g.shape)} != {tuple(ref64.shape)} {ctx}"
    K = absprod.shape[-1] if absprod.dim() else 1
    acc = 64 * 2.0**-24 * absprod  # fp32 accumulation, any order
    operand = ULP_REL.get(in_dtype, 0.0) * absprod if in_dtype != torch.float32 else 0.0
    tol = 2 * ULP_REL[out_dtype] * ref64.abs() + acc + operand + 1e-30
    err = (g - ref64).abs()
    bad = err > tol
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {g.numel()} outside tolerance {ctx}; first {i}: got {g[i].item()}, "
                             f"ref {ref64[i].item()}, tol {tol[i].item()} (K={K})")  # fmt: skip


# ---- hif8_linear ------------------------------------------------------------------------------------------


def hif8_weight(N, K, seed=0, device="cpu"):
    w = rnd((N, K), seed=seed, gain=0.05)
    codes, s = ref_hif8_quantize(w, 15.0)
    return codes.to(device), s.to(device)


def ref_hif8_linear(x, w_codes, w_scale, bias=None, x_scale=None):
    """(float64 out [..., N], |x^| @ |W^|.T) with x^ in fp32."""
    K = w_codes.shape[1]
    if x.dtype == torch.uint8:
        xh = ref_hif8_decode(x.cpu(), torch.float32, x_scale.cpu())
    else:
        xh = ref_hif8_qdq(x.detach().cpu(), 15.0, torch.float32)
    wh = ref_hif8_decode(w_codes.cpu(), torch.float32, w_scale.cpu())
    x2 = xh.reshape(-1, K)
    out = x2.double() @ wh.double().T
    if bias is not None:
        out = out + bias.detach().cpu().double()
    shape = (*x.shape[:-1], w_codes.shape[0])
    return out.reshape(shape), abs_product(x2, wh).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_hif8_linear_float_x(device, dtype, M, with_bias):
    N, K = 48, 64
    x = rnd((M, K), dtype, seed=stable_seed(M, dtype), device=device)
    w_codes, w_scale = hif8_weight(N, K, seed=M, device=device)
    bias = rnd((N,), dtype, seed=7, device=device) if with_bias else None
    out = ops.hif8_linear(x, w_codes, w_scale, bias)
    ref, ap = ref_hif8_linear(x, w_codes, w_scale, bias)
    assert out.device == x.device
    assert_linear_close(out, ref, ap, dtype, dtype, f"[M={M} {DTYPE_IDS[dtype]}]")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_hif8_linear_out_dtype(device, out_dtype):
    x = rnd((5, 32), torch.float32, seed=1, device=device)
    w_codes, w_scale = hif8_weight(16, 32, seed=2, device=device)
    out = ops.hif8_linear(x, w_codes, w_scale, out_dtype=out_dtype)
    ref, ap = ref_hif8_linear(x, w_codes, w_scale)
    assert_linear_close(out, ref, ap, out_dtype, torch.float32)


@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["default", "fp32"])
def test_hif8_linear_code_input(device, out_dtype):
    """x given as HiF8 codes + x_scale: x^ = decode(x) / x_scale; default output bf16."""
    x = rnd((2, 9, 64), seed=3)
    x_codes, x_scale = ref_hif8_quantize(x, 15.0)
    w_codes, w_scale = hif8_weight(32, 64, seed=4, device=device)
    bias = rnd((32,), seed=5, device=device)
    out = ops.hif8_linear(x_codes.to(device), w_codes, w_scale, bias, x_scale=x_scale.to(device), out_dtype=out_dtype)
    ref, ap = ref_hif8_linear(x_codes, w_codes, w_scale, bias, x_scale=x_scale)
    assert_linear_close(out, ref, ap, out_dtype or torch.bfloat16, torch.float32)
    # same as feeding x itself (the codes are what hif8_fake_quantize would use)
    direct = ops.hif8_linear(x.to(device), w_codes, w_scale, bias, out_dtype=torch.float32)
    ref_direct, _ = ref_hif8_linear(x, w_codes, w_scale, bias)
    torch.testing.assert_close(ref_direct, ref, rtol=1e-6, atol=1e-6)
    assert_linear_close(direct, ref, ap, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_hif8_linear_leading_dims(device, dtype):
    B, L, K, N = 2, 7, 48, 32
    x = rnd((B, L, K), dtype, seed=6, device=device)
    w_codes, w_scale = hif8_weight(N, K, seed=7, device=device)
    out = ops.hif8_linear(x, w_codes, w_scale)
    assert out.shape == (B, L, N)
    ref, ap = ref_hif8_linear(x, w_codes, w_scale)
    assert_linear_close(out, ref, ap, dtype, dtype)
    # per-tensor amax over the whole [B, L, K] tensor, not per row / per batch: equal to the flattened call
    flat = ops.hif8_linear(x.reshape(B * L, K), w_codes, w_scale)
    torch.testing.assert_close(out.reshape(B * L, N), flat, rtol=0, atol=0)


def test_hif8_linear_strided_x(device):
    base = rnd((40, 96), seed=8, device=device)
    x = base[::2, 16:80]
    w_codes, w_scale = hif8_weight(16, 64, seed=9, device=device)
    out = ops.hif8_linear(x, w_codes, w_scale)
    ref, ap = ref_hif8_linear(x, w_codes, w_scale)
    assert_linear_close(out, ref, ap, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_hif8_linear_gradients(device, dtype):
    """Straight through the activation QDQ: dx = g @ W^ (W^ = decode(W) / w_scale), dbias = sum of g."""
    M, N, K = 6, 32, 48
    x = rnd((2, M, K), dtype, seed=10, device=device).requires_grad_(True)
    bias = rnd((N,), dtype, seed=11, device=device).requires_grad_(True)
    w_codes, w_scale = hif8_weight(N, K, seed=12, device=device)
    out = ops.hif8_linear(x, w_codes, w_scale, bias)
    g = rnd((2, M, N), dtype, seed=13, device=device)
    out.backward(g)
    wh = ref_hif8_decode(w_codes.cpu(), torch.float64, w_scale.cpu().double())
    ref_dx = g.cpu().double() @ wh
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    rt = 1e-5 if dtype == torch.float32 else 2.0**-6
    torch.testing.assert_close(x.grad.cpu().double(), ref_dx, rtol=rt, atol=rt * float(ref_dx.abs().max()))
    ref_db = g.cpu().double().sum((0, 1))
    torch.testing.assert_close(bias.grad.cpu().double(), ref_db, rtol=rt, atol=rt * float(ref_db.abs().max()))
    assert w_codes.grad is None


def test_hif8_linear_no_grad_for_codes(device):
    """Code input: no gradient path to x; bias still gets one."""
    x_codes, x_scale = ref_hif8_quantize(rnd((4, 32), seed=14), 15.0)
    w_codes, w_scale = hif8_weight(16, 32, seed=15, device=device)
    bias = torch.zeros(16, device=device, requires_grad=True)
    out = ops.hif8_linear(x_codes.to(device), w_codes, w_scale, bias, x_scale=x_scale.to(device),
                          out_dtype=torch.float32)  # fmt: skip
    out.sum().backward()
    torch.testing.assert_close(bias.grad.cpu(), torch.full((16,), 4.0))


@pytest.mark.parametrize("N,K", [(24, 32), (16, 40), (8, 8)])
def test_hif8_linear_rejects_non_multiple_of_16(device, N, K):
    w_codes, w_scale = hif8_weight(N, K, device=device)
    with pytest.raises((RuntimeError, ValueError), match="16"):
        ops.hif8_linear(rnd((3, K), device=device), w_codes, w_scale)


# ---- nvfp4_linear -----------------------------------------------------------------------------------------


def nvfp4_weight(N, K, two_level, seed=0, device="cpu", block_2d=False):
    w = rnd((N, K), seed=seed, gain=0.05) * torch.exp(rnd((N, 1), seed=seed + 1, gain=0.5))
    pts = nvfp4_pts(w) if two_level else None
    s, p = ref_nvfp4_quantize(w, pts, block_2d=block_2d)
    return s.to(device), p.to(device), (pts.to(device) if pts is not None else None)


def ref_nvfp4_linear(x, s, p, pts, bias=None):
    K = p.shape[1] * 2
    wdq = ref_nvfp4_dequantize(s.cpu(), p.cpu(), None if pts is None else pts.cpu(), torch.float32)
    x2 = x.detach().cpu().float().reshape(-1, K)
    out = x2.double() @ wdq.double().T
    if bias is not None:
        out = out + bias.detach().cpu().double()
    shape = (*x.shape[:-1], p.shape[0])
    return out.reshape(shape), abs_product(x2, wdq).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_nvfp4_linear(device, dtype, M, two_level, with_bias):
    N, K = 48, 80
    x = rnd((M, K), dtype, seed=stable_seed(M, dtype), device=device)
    s, p, pts = nvfp4_weight(N, K, two_level, seed=M, device=device)
    bias = rnd((N,), dtype, seed=3, device=device) if with_bias else None
    out = ops.nvfp4_linear(x, s, p, pts, bias)
    assert out.device == x.device and out.shape == (M, N)
    ref, ap = ref_nvfp4_linear(x, s, p, pts, bias)
    assert_linear_close(out, ref, ap, dtype, torch.float32, f"[M={M} {DTYPE_IDS[dtype]} two={two_level}]")


def test_nvfp4_linear_matches_rounded_fp32_reference(device):
    """Closer look: the output is the fp32 result rounded to bf16 (within one bf16 ulp), rtol 2^-7."""
    x = rnd((32, 64), torch.bfloat16, seed=20, device=device)
    s, p, pts = nvfp4_weight(32, 64, True, seed=21, device=device)
    out = ops.nvfp4_linear(x, s, p, pts)
    wdq = ops.nvfp4_dequantize(s, p, pts, dtype=torch.float32)
    torch.testing.assert_close(ref_nvfp4_dequantize(s, p, pts, torch.float32), wdq.cpu(), rtol=0, atol=0)
    ref = (x.float() @ wdq.T).to(torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_nvfp4_linear_leading_dims_and_strides(device, dtype):
    B, L, K, N = 2, 5, 64, 32
    s, p, pts = nvfp4_weight(N, K, True, seed=22, device=device)
    x = rnd((B, L, K), dtype, seed=23, device=device)
    out = ops.nvfp4_linear(x, s, p, pts)
    assert out.shape == (B, L, N) and out.dtype == dtype
    ref, ap = ref_nvfp4_linear(x, s, p, pts)
    assert_linear_close(out, ref, ap, dtype, torch.float32)
    base = rnd((30, 96), dtype, seed=24, device=device)
    xs = base[::3, 16:80]  # row stride 288, 10 rows
    out_s = ops.nvfp4_linear(xs, s, p, pts)
    ref_s, ap_s = ref_nvfp4_linear(xs, s, p, pts)
    assert_linear_close(out_s, ref_s, ap_s, dtype, torch.float32, "strided")
    torch.testing.assert_close(out_s, ops.nvfp4_linear(xs.contiguous(), s, p, pts), rtol=0, atol=0)


def test_nvfp4_linear_block_2d_weight(device):
    s, p, pts = nvfp4_weight(32, 64, True, seed=25, device=device, block_2d=True)
    x = rnd((7, 64), torch.bfloat16, seed=26, device=device)
    ref, ap = ref_nvfp4_linear(x, s, p, pts)
    assert_linear_close(ops.nvfp4_linear(x, s, p, pts), ref, ap, torch.bfloat16, torch.float32)


def test_nvfp4_linear_backward_raises(device):
    s, p, pts = nvfp4_weight(16, 32, True, device=device)
    x = rnd((3, 32), torch.bfloat16, seed=27, device=device).requires_grad_(True)
    out = ops.nvfp4_linear(x, s, p, pts)  # the forward runs on inputs that require grad
    with pytest.raises(RuntimeError, match="inference only|no backward"):
        out.float().sum().backward()


def test_nvfp4_linear_empty_batch(device):
    s, p, pts = nvfp4_weight(16, 32, False, device=device)
    out = ops.nvfp4_linear(torch.empty(0, 32, dtype=torch.bfloat16, device=device), s, p, pts)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16
    out3 = ops.nvfp4_linear(torch.empty(2, 0, 32, dtype=torch.bfloat16, device=device), s, p, pts)
    assert out3.shape == (2, 0, 16)


def test_hif8_linear_empty_batch(device):
    w_codes, w_scale = hif8_weight(16, 32, device=device)
    out = ops.hif8_linear(torch.empty(0, 32, device=device), w_codes, w_scale)
    assert out.shape == (0, 16) and out.dtype == torch.float32


# ---- CPU blocking: weights are dequantized 1024 rows at a time --------------------------------------------------


def test_hif8_linear_more_than_1024_weight_rows(device):
    N, K = 1056, 32
    x = rnd((3, K), torch.float32, seed=30, device=device)
    w_codes, w_scale = hif8_weight(N, K, seed=31, device=device)
    bias = rnd((N,), seed=32, device=device)
    ref, ap = ref_hif8_linear(x, w_codes, w_scale, bias)
    assert_linear_close(ops.hif8_linear(x, w_codes, w_scale, bias), ref, ap, torch.float32, torch.float32)


@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_nvfp4_linear_more_than_1024_weight_rows(device, two_level):
    N, K = 1040, 32
    s, p, pts = nvfp4_weight(N, K, two_level, seed=33, device=device)
    x = rnd((2, 3, K), torch.bfloat16, seed=34, device=device)
    bias = rnd((N,), torch.bfloat16, seed=35, device=device)
    ref, ap = ref_nvfp4_linear(x, s, p, pts, bias)
    assert_linear_close(ops.nvfp4_linear(x, s, p, pts, bias), ref, ap, torch.bfloat16, torch.float32)


def test_linears_noncontiguous_weights(device):
    """Weights given as strided views (every other row) equal their contiguous copies (or raise, never garbage)."""
    w_codes, w_scale = hif8_weight(64, 32, seed=36, device=device)
    x = rnd((5, 32), seed=37, device=device)
    wv = w_codes[::2]
    try:
        got = ops.hif8_linear(x, wv, w_scale)
    except (RuntimeError, ValueError):
        pass
    else:
        torch.testing.assert_close(got, ops.hif8_linear(x, wv.contiguous(), w_scale), rtol=0, atol=0)
    wt = w_codes.t().contiguous().t()  # [N, K] with column-major strides
    try:
        got = ops.hif8_linear(x, wt, w_scale)
    except (RuntimeError, ValueError):
        pass
    else:
        torch.testing.assert_close(got, ops.hif8_linear(x, w_codes, w_scale), rtol=0, atol=0)
    s, p, pts = nvfp4_weight(64, 32, True, seed=38, device=device)
    xb = x.bfloat16()
    try:
        got = ops.nvfp4_linear(xb, s[::2], p[::2], pts)
    except (RuntimeError, ValueError):
        pass
    else:
        torch.testing.assert_close(got, ops.nvfp4_linear(xb, s[::2].contiguous(), p[::2].contiguous(), pts), rtol=0,
                                   atol=0)  # fmt: skip
