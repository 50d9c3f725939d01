"""Per-tensor scaled HiF8 (spec §2 op order, §3 E4M3 shift): hif8_quantize (scale, codes), hif8_fake_quantize (QDQ
values in fp32/bf16/fp16, straight-through gradient) and hif8_quantize_e4m3 (bit-exact against torch's own
float -> float8_e4m3fn cast of the shifted HiF8 values, scale_inv, the §3 examples), all against the testlib
references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from formats_testlib import (
    DTYPE_IDS,
    assert_bitwise,
    e4m3_shift,
    ref_hif8_decode,
    ref_hif8_encode,
    ref_hif8_qdq,
    ref_hif8_quantize,
    rnd,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TARGETS = [15.0, 224.0]


def heavy(shape, dtype=torch.float32, seed=0, device="cpu", spread=3.0):
    """Gaussian times a log-normal spread: values over many binades, so the small-value zones are exercised."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.exp(spread * torch.randn(*shape, generator=gen))
    return x.to(dtype).to(device)


def test_e4m3_shift_reference():
    assert e4m3_shift(15.0) == 4 and e4m3_shift(224.0) == 1 and e4m3_shift(1.0) == 8 and e4m3_shift(448.0) == 0


# ---- hif8_quantize ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("target", TARGETS + [1.0, 100.0])
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
def test_quantize_scale_and_codes(device, dtype, target, rounding):
    x = heavy((37, 48), dtype, seed=int(target), device=device)
    codes, s = ops.hif8_quantize(x, target=target, rounding=rounding)
    ref_codes, ref_s = ref_hif8_quantize(x, target, rounding=rounding)
    assert s.dtype == torch.float32 and s.dim() == 0 and s.device == x.device
    assert_bitwise(s, ref_s, "scale")
    assert float(s) == float(np.float32(target) / np.float32(x.float().abs().max().item()))
    assert_bitwise(codes, ref_codes, "codes", inputs=x.float() * ref_s)
    # codes == hif8_encode(x, scale=s)
    assert_bitwise(ops.hif8_encode(x, scale=s, rounding=rounding), ref_codes, "encode(x, s)")


def test_quantize_amax_maps_to_target(device):
    """The element at amax lands exactly on the target (15 = 0x2F, 224 = 0x4F), with either sign."""
    for sign in (1.0, -1.0):
        x = rnd((5, 16), seed=3, device=device)
        x[2, 7] = sign * 7.3
        for target, code in ((15.0, 0x2F), (224.0, 0x4F)):
            codes, s = ops.hif8_quantize(x, target=target)
            assert int(codes[2, 7]) == code | (0x80 if sign < 0 else 0)
            assert ops.hif8_decode(codes, scale=s).abs().max().item() == pytest.approx(7.3, rel=1e-6)


@pytest.mark.parametrize("case", ["zeros", "inf", "-inf", "nan"])
def test_quantize_degenerate_amax_gives_unit_scale(device, case):
    """amax 0 or not finite -> s = 1 and codes = encode(x) unscaled."""
    x = torch.tensor([[0.0, -0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    if case != "zeros":
        x = torch.tensor([[1.0, -3.0, 100.0, 0.01], [0.5, 50000.0, -7.0, 2.0]])
        x[0, 1] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[case]
    codes, s = ops.hif8_quantize(x.to(device))
    assert float(s) == 1.0
    assert_bitwise(codes, torch.from_numpy(ref_hif8_encode(x)), "codes")
    qdq = ops.hif8_fake_quantize(x.to(device))
    assert_bitwise(qdq, ref_hif8_decode(torch.from_numpy(ref_hif8_encode(x))), "qdq")


@pytest.mark.parametrize("saturate", [False, True])
def test_quantize_saturate(device, saturate):
    """Inf (amax not finite -> s = 1) encodes to 0x6F or, saturated, 0x6E; 50000 overflows likewise."""
    x = torch.tensor([math.inf, -math.inf, 50000.0, 1.0], device=device)
    codes, s = ops.hif8_quantize(x, saturate=saturate)
    hi = 0x6E if saturate else 0x6F
    assert float(s) == 1.0 and codes.cpu().tolist() == [hi, hi | 0x80, hi, 0x08]


def test_quantize_layouts(device):
    x = heavy((8, 12, 20), seed=4, device=device)
    codes, s = ops.hif8_quantize(x.transpose(0, 2))
    ref_codes, ref_s = ref_hif8_quantize(x.transpose(0, 2).contiguous(), 15.0)
    assert_bitwise(s, ref_s, "scale")
    assert_bitwise(codes, ref_codes, "codes")


# ---- hif8_fake_quantize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=["default", "fp32", "bf16"])
@pytest.mark.parametrize("target", TARGETS)
def test_fake_quantize(device, dtype, out_dtype, target):
    """decode(encode(x s)) / s in fp32, one cast to the output dtype (x's by default)."""
    x = heavy((24, 40), dtype, seed=7, device=device)
    got = ops.hif8_fake_quantize(x, target=target, dtype=out_dtype)
    ref = ref_hif8_qdq(x.cpu(), target, out_dtype or dtype)
    assert_bitwise(got, ref, f"qdq target={target}", inputs=x.float())


def test_fake_quantize_hybrid(device):
    x = heavy((16, 32), seed=8, device=device)
    assert_bitwise(ops.hif8_fake_quantize(x, rounding="hybrid", dtype=torch.float32),
                   ref_hif8_qdq(x.cpu(), 15.0, torch.float32, rounding="hybrid"), "qdq hybrid")  # fmt: skip


def test_fake_quantize_is_idempotent_on_hif8_grid(device):
    """Values already on the scaled HiF8 grid with amax = target come back unchanged (s = 1)."""
    codes = torch.tensor([c for c in range(256) if c not in (0x80, 0x6F, 0xEF) and abs(
        float(ref_hif8_decode(torch.tensor([c]))[0])) <= 15], dtype=torch.int32).to(torch.uint8)  # fmt: skip
    x = ref_hif8_decode(codes)
    assert float(x.abs().max()) == 15.0
    assert_bitwise(ops.hif8_fake_quantize(x.to(device)), x, "grid")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_fake_quantize_straight_through_gradient(device, dtype):
    x = heavy((6, 16), dtype, seed=9, device=device).requires_grad_(True)
    y = ops.hif8_fake_quantize(x, dtype=torch.float32)
    g = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)).to(device)
    y.backward(g)
    assert x.grad is not None and x.grad.dtype == dtype
    assert_bitwise(x.grad, g.to(dtype), "x.grad")
    # and in the default dtype, through a downstream op
    x2 = heavy((6, 16), dtype, seed=10, device=device).requires_grad_(True)
    (ops.hif8_fake_quantize(x2, target=224.0) * 3).sum().backward()
    assert_bitwise(x2.grad, torch.full((6, 16), 3.0, dtype=dtype), "x2.grad")


# ---- hif8_quantize_e4m3 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("target", TARGETS + [1.0])
def test_quantize_e4m3(device, dtype, target):
    x = heavy((40, 64), dtype, seed=12, device=device, spread=1.5)
    e4m3, scale_inv = ops.hif8_quantize_e4m3(x, target=target)
    assert e4m3.dtype == torch.float8_e4m3fn and e4m3.shape == x.shape and e4m3.device == x.device
    assert scale_inv.dtype == torch.float32 and scale_inv.dim() == 0
    k = e4m3_shift(target)
    codes, s = ref_hif8_quantize(x, target)
    v = ref_hif8_decode(codes)  # scaled HiF8 values, |v| <= target
    # everywhere: torch's own RNE cast of v * 2^k
    assert_bitwise(e4m3, (v * 2.0**k).to(torch.float8_e4m3fn), "e4m3", inputs=v)
    assert_bitwise(scale_inv, 1.0 / (s * 2.0**k), "scale_inv")
    # above the §3 threshold (2^-12 for k = 4, 2^-9 for k = 1: v * 2^k >= 2^-8, a multiple of E4M3's subnormal
    # step 2^-9 for every HiF8 value) the shift is exact and e4m3 * scale_inv is the QDQ value
    thr = 2.0**-8 / 2**k
    big = v.abs() >= thr
    assert int(big.sum()) > 0.5 * v.numel() and int((~big).sum()) > 0
    assert torch.equal(e4m3.cpu().float()[big], (v * 2.0**k)[big])
    qdq = ref_hif8_qdq(x.cpu(), target, torch.float32)
    torch.testing.assert_close((e4m3.cpu().float() * scale_inv.cpu())[big], qdq[big], rtol=2**-22, atol=0)
    if (~big).any():  # below: the E4M3 subnormal grid, error <= 2^-10 / 2^k / s
        err = (e4m3.cpu().float() * scale_inv.cpu() - qdq)[~big].abs()
        assert float(err.max()) <= 2.0**-10 / float(s) / 2**k * 1.0001


def test_quantize_e4m3_exact_on_every_hif8_value_above_threshold():
    """Check of §3 itself with torch: every HiF8 value v with 2^-12 <= |v| <= 15 is exact in E4M3 after * 16, and
    every one with 2^-9 <= |v| <= 224 after * 2."""
    v = ref_hif8_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    v = v[torch.isfinite(v)]
    for lo, hi, k in ((2.0**-12, 15.0, 4), (2.0**-9, 224.0, 1)):
        sel = v[(v.abs() >= lo) & (v.abs() <= hi)]
        assert torch.equal((sel * 2.0**k).to(torch.float8_e4m3fn).float(), sel * 2.0**k)


def test_quantize_e4m3_spec_examples(device):
    """§3, amax 3 (s = 5): 0.7 -> 3.5 -> 0x16 -> 56 -> E4M3 0x66; -2.9 -> -14.5 -> 0xAF (-15) -> 0xF7 (-240);
    3 -> 0x2F -> 0x77 (240); v = 1.5 * 2^-13 (0x7B) -> 1.5 * 2^-9 -> E4M3 0x02 (tie to even)."""
    tiny = float(np.float32(1.5 * 2.0**-13) / np.float32(5.0))
    x = torch.tensor([0.7, -2.9, 3.0, tiny], device=device)
    codes, s = ops.hif8_quantize(x)
    assert float(s) == 5.0
    assert codes.cpu().tolist() == [0x16, 0xAF, 0x2F, 0x7B]
    e4m3, scale_inv = ops.hif8_quantize_e4m3(x)
    assert e4m3.cpu().view(torch.uint8).tolist() == [0x66, 0xF7, 0x77, 0x02]
    assert float(scale_inv) == float(np.float32(1.0) / np.float32(80.0))


def test_quantize_e4m3_hybrid_forward(device):
    """HR with target 15: TA in the 3-bit zone, SSR for the small values; e4m3 = cast(decode(HR codes) * 16)."""
    x = heavy((16, 48), seed=13, device=device)
    e4m3, _ = ops.hif8_quantize_e4m3(x, rounding="hybrid")
    codes, _ = ref_hif8_quantize(x, 15.0, rounding="hybrid")
    assert_bitwise(e4m3, (ref_hif8_decode(codes) * 16.0).to(torch.float8_e4m3fn), "e4m3 hybrid")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_quantize_large_tensor(device, dtype):
    """~7 * 10^5 elements: the amax reduction and the encode run in parallel chunks; the amax sits near the end."""
    x = heavy((700, 1000), dtype, seed=21, device=device, spread=1.0)
    x[699, 998] = -1e4
    codes, s = ops.hif8_quantize(x, target=224.0)
    rc, rs = ref_hif8_quantize(x, 224.0)
    assert_bitwise(s, rs, "scale")
    assert_bitwise(codes, rc, "codes")
    assert_bitwise(ops.hif8_fake_quantize(x, dtype=torch.float32), ref_hif8_qdq(x.cpu(), 15.0, torch.float32), "qdq")
