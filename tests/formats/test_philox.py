"""Philox4x32-10 (cpp/include/difforge/philox.h), exercised through NVFP4 stochastic rounding (spec §4 "Stochastic
rounding"): the testlib's numpy Philox against Random123's known-answer vectors, then the op's SR codes bit for bit
against that Philox (counter = (index lo, index hi, offset lo, offset hi), key = (seed lo, seed hi), word 0,
u = (word >> 8) 2^-24, round up iff u < p), reproducibility, seed/offset sensitivity, neighbour property and
unbiasedness (|bias| < 4 sigma over 2000 draws)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from formats_testlib import (
    E2M1_MAGNITUDES,
    assert_bitwise,
    e2m1_value,
    nvfp4_pts,
    philox4x32_10,
    philox_uniform24,
    ref_block_scales,
    block_amax,
    ref_nvfp4_quantize,
    ref_unpack_nibbles,
    rnd,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops


# ---- the Python Philox itself -------------------------------------------------------------------------------

# Random123 kat_vectors: philox4x32 R=10
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_python_philox_known_answers(ctr, key, expected):
    assert tuple(int(w) for w in philox4x32_10(ctr, key)) == expected


def test_python_uniform24():
    u = philox_uniform24(0, 0, np.arange(4096, dtype=np.uint64))
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert np.all(u * 2**24 == np.floor(u * 2**24))  # on the 2^-24 grid
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 4096)
    assert u[0] == np.float32((0x6627E8D5 >> 8) * 2.0**-24)  # index 0, offset 0, seed 0: the KAT's word 0


# ---- SR codes bit for bit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 0), (0, 1), (12345, 678), (2**32 + 5, 2**33 + 7), (2**63 - 1, 3)])
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_sr_codes_match_python_philox(device, seed, offset, two_level):
    x = rnd((24, 64), seed=1, gain=2.0, device=device)
    pts = nvfp4_pts(x).to(device) if two_level else None
    s, p = ops.nvfp4_quantize(x, pts, stochastic=True, seed=seed, offset=offset)
    rs, rp = ref_nvfp4_quantize(x, None if pts is None else pts.cpu(), stochastic=True, seed=seed, offset=offset)
    assert_bitwise(s, rs, "block_scales", f"seed={seed} offset={offset}")
    assert_bitwise(p, rp, "packed", f"seed={seed} offset={offset}")


def test_sr_linear_index_over_leading_dims(device):
    """The element index is the linear index in the flattened [..., K] tensor."""
    x = rnd((2, 3, 5, 32), seed=2, device=device)
    s, p = ops.nvfp4_quantize(x, stochastic=True, seed=9, offset=4)
    rs, rp = ref_nvfp4_quantize(x, stochastic=True, seed=9, offset=4)
    assert_bitwise(p, rp, "packed")
    assert_bitwise(s, rs, "scales")


def test_sr_with_block_2d(device):
    x = rnd((37, 48), seed=3, device=device)
    s, p = ops.nvfp4_quantize(x, nvfp4_pts(x).to(device), block_2d=True, stochastic=True, seed=5, offset=6)
    rs, rp = ref_nvfp4_quantize(x, nvfp4_pts(x), block_2d=True, stochastic=True, seed=5, offset=6)
    assert_bitwise(s, rs, "scales")
    assert_bitwise(p, rp, "packed")


# ---- properties ---------------------------------------------------------------------------------------------


def test_sr_reproducible_and_seed_sensitive(device):
    x = rnd((16, 128), seed=4, device=device)
    a = ops.nvfp4_quantize(x, stochastic=True, seed=1, offset=2)
    b = ops.nvfp4_quantize(x, stochastic=True, seed=1, offset=2)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    for other in (dict(seed=2, offset=2), dict(seed=1, offset=3)):
        c = ops.nvfp4_quantize(x, stochastic=True, **other)
        assert torch.equal(c[0].view(torch.uint8), a[0].view(torch.uint8))  # scales do not depend on the draws
        assert not torch.equal(c[1], a[1]), other
    rn = ops.nvfp4_quantize(x)
    assert torch.equal(rn[0].view(torch.uint8), a[0].view(torch.uint8))  # SR scales are the RN scales


def test_sr_codes_are_neighbours(device):
    """Every SR code is one of the two E2M1 neighbours of y = clamp(x r, -6, 6) (or y itself when exact), with y's
    sign; exact values never move."""
    x = rnd((64, 64), seed=5, gain=3.0, device=device)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, 0, 0.5, 1, 2, 3, 4])  # amax 6: r=1
    for seed in range(4):
        s, p = ops.nvfp4_quantize(x, stochastic=True, seed=seed)
        codes = ref_unpack_nibbles(p.cpu())
        sf8, r = ref_block_scales(block_amax(x.cpu().float()), None)
        y = torch.clamp(x.cpu().reshape(64, 4, 16) * r[..., None], -6, 6).reshape(64, 64)
        mag = e2m1_value(codes & 7)
        mags = torch.tensor(E2M1_MAGNITUDES)
        lo = mags[(torch.searchsorted(mags, y.abs(), right=True) - 1).clamp(0, 7)]
        hi = mags[torch.searchsorted(mags, y.abs(), right=False).clamp(0, 7)]
        assert bool(((mag == lo) | (mag == hi)).all())
        assert bool(((codes >> 3) == torch.signbit(y).long()).all())
        exact = lo == y.abs()
        assert bool((mag[exact] == y.abs()[exact]).all())
        assert e2m1_value(codes[0, 11:16]).tolist() == [0.5, 1, 2, 3, 4]


@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_sr_unbiased_over_offsets(device, two_level):
    """Mean of the dequantized values over 2000 offsets (fixed seed) is x within 4 sigma per element, sigma =
    sqrt(p (1 - p)) (hi - lo) d / sqrt(n) with d the block's decode scale; exact values have no spread at all."""
    x = torch.tensor([[0.3, -0.3, 0.7, 1.1, -1.6, 2.2, 2.9, -3.3, 4.5, 5.5, -5.9, 0.05, 1.0, -2.0, 6.0, 0.1]])
    x = torch.cat([x, x * 0.37]).to(device)  # second block: scale not 1, both levels
    pts = nvfp4_pts(x).to(device) if two_level else None
    n = 2000
    acc = torch.zeros(2, 16, dtype=torch.float64)
    acc2 = torch.zeros(2, 16, dtype=torch.float64)
    for off in range(n):
        s, p = ops.nvfp4_quantize(x, pts, stochastic=True, seed=17, offset=off)
        v = ops.nvfp4_dequantize(s, p, pts, dtype=torch.float32).cpu().double()
        acc += v
        acc2 += v * v
    mean = acc / n
    rs, _ = ref_nvfp4_quantize(x, None if pts is None else pts.cpu())
    d = rs.float().double() * (float(pts) if two_level else 1.0)  # [2, 1] decode scale
    xd = x.cpu().double()
    y = (xd / d).abs()
    # |y| > 6 (the block scale rounded down) saturates to 6: the expectation is the clipped value
    expect = torch.sign(xd) * torch.clamp(y, max=6.0) * d
    y = torch.clamp(y, max=6.0)
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    lo = mags[(torch.searchsorted(mags, y, right=True) - 1).clamp(0, 6)]
    hi = mags[(torch.searchsorted(mags, y, right=True)).clamp(1, 7)]
    prob = ((y - lo) / (hi - lo)).clamp(0, 1)
    sigma = torch.sqrt(prob * (1 - prob)) * (hi - lo) * d / math.sqrt(n)
    err = (mean - expect).abs()
    exact = prob == 0
    # the expected value is exact up to the fp32 rounding of r = 1/sf and of pts * sf: a few ulps on top
    tol = 4 * sigma + 1e-6 * xd.abs()
    assert bool((err[exact] <= 1e-6 * xd.abs()[exact]).all()), (mean, x)
    assert bool((err <= tol).all()), f"bias {err[err > tol]} > 4 sigma {tol[err > tol]}"
    assert bool((y < 6).sum() > 20)
    # and SR really is random here (not RN): the spread is as large as Bernoulli's
    var = acc2 / n - mean**2
    nontrivial = (prob > 0.2) & (prob < 0.8)
    assert bool((var[nontrivial] > 0.5 * (sigma[nontrivial] ** 2 * n)).all())


def test_sr_unbiased_over_elements(device):
    """The same statistic over 4096 copies of a row in one call (distinct linear indices are independent draws)."""
    row = torch.tensor([0.3, -0.7, 1.1, 1.6, -2.2, 2.9, 3.3, -4.5, 5.5, 0.05, 0.6, -1.4, 2.6, 3.9, 5.0, 6.0])
    x = row.repeat(4096, 1).to(device)
    s, p = ops.nvfp4_quantize(x, stochastic=True, seed=99, offset=0)
    assert set(s.cpu().view(torch.uint8).reshape(-1).tolist()) == {0x38}  # amax 6: sf = 1
    mean = ops.nvfp4_dequantize(s, p, dtype=torch.float32).cpu().double().mean(0)
    y = row.double()
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    lo = mags[(torch.searchsorted(mags, y.abs(), right=True) - 1).clamp(0, 6)]
    hi = mags[(torch.searchsorted(mags, y.abs(), right=True)).clamp(1, 7)]
    prob = ((y.abs() - lo) / (hi - lo)).clamp(0, 1)
    sigma = torch.sqrt(prob * (1 - prob)) * (hi - lo) / math.sqrt(4096)
    assert bool(((mean - y).abs() <= 4 * sigma + 1e-7).all()), (mean, y)
