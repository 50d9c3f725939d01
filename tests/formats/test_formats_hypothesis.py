"""Hypothesis (repo profiles: ci 15 / dev 50 / thorough 500 examples, bounded sizes): random shapes, values and scales
for hif8_encode / hif8_quantize against the testlib reference, nvfp4_quantize against torchao (fp32/bf16, one- and
two-level), and stochastic NVFP4 against the Python Philox."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from formats_testlib import (
    DTYPE_IDS,
    assert_bitwise,
    nvfp4_pts,
    ref_hif8_encode,
    ref_hif8_encode_hybrid,
    ref_hif8_quantize,
    ref_nvfp4_quantize,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
specials = st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=8)


def make(shape, seed, log_spread, center, dtype, extra):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.exp(log_spread * torch.randn(*shape, generator=gen) + center)
    flat = x.reshape(-1)
    for i, v in enumerate(extra[: flat.numel()]):
        flat[i] = v
    return flat.reshape(shape).to(dtype)


@given(
    shape=shapes, seed=st.integers(0, 2**31 - 1), log_spread=st.floats(0, 6), center=st.floats(-16, 12),
    dtype=dtypes, extra=specials, saturate=st.booleans(),
    scale=st.one_of(st.none(), st.floats(2.0**-13, 2.0**13, width=32)),
)  # fmt: skip
def test_hif8_encode_random(device, shape, seed, log_spread, center, dtype, extra, saturate, scale):
    x = make(shape, seed, log_spread, center, dtype, extra)
    y = x.float() * (torch.tensor(scale, dtype=torch.float32) if scale is not None else 1.0)
    note(f"x={x.flatten()[:8]} scale={scale}")
    ref = torch.from_numpy(ref_hif8_encode(y.numpy(), saturate)).reshape(shape)
    assert_bitwise(ops.hif8_encode(x.to(device), scale=scale, saturate=saturate), ref, "codes", inputs=y)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), center=st.floats(-20, 14), extra=specials)
def test_hif8_encode_hybrid_random(device, shape, seed, center, extra):
    x = make(shape, seed, 4.0, center, torch.float32, extra)
    ref = torch.from_numpy(ref_hif8_encode_hybrid(x.numpy())).reshape(shape)
    assert_bitwise(ops.hif8_encode(x.to(device), rounding="hybrid"), ref, "HR codes", inputs=x)


@given(
    shape=shapes, seed=st.integers(0, 2**31 - 1), log_spread=st.floats(0, 4), center=st.floats(-10, 10),
    dtype=dtypes, target=st.sampled_from([15.0, 224.0, 1.0, 3.5]), rounding=st.sampled_from(["ta", "hybrid"]),
)  # fmt: skip
def test_hif8_quantize_random(device, shape, seed, log_spread, center, dtype, target, rounding):
    x = make(shape, seed, log_spread, center, dtype, [])
    codes, s = ops.hif8_quantize(x.to(device), target=target, rounding=rounding)
    rc, rs = ref_hif8_quantize(x, target, rounding=rounding)
    assert_bitwise(s, rs, "scale")
    assert_bitwise(codes, rc, "codes")


nv_rows = st.integers(1, 40)
nv_blocks = st.integers(1, 6)


@given(
    M=nv_rows, KB=nv_blocks, lead=st.sampled_from([(), (2,), (3, 2)]), seed=st.integers(0, 2**31 - 1),
    center=st.floats(-12, 12), block_spread=st.floats(0, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    two_level=st.booleans(),
)  # fmt: skip
def test_nvfp4_vs_torchao_random(device, M, KB, lead, seed, center, block_spread, dtype, two_level):
    ao = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, M, 16 * KB)
    x = torch.randn(*shape, generator=gen) * math.exp(center)
    spread = torch.exp(block_spread * torch.randn(*shape[:-1], KB, 1, generator=gen))
    x = x * spread.expand(*shape[:-1], KB, 16).reshape(shape)
    x = x.to(dtype)
    if not bool(torch.isfinite(x).all()) or float(x.float().abs().amax()) == 0:
        return  # torchao parity is for finite, non-all-zero tensors (spec §4)
    pts = ao.per_tensor_amax_to_scale(x.float().abs().amax()) if two_level else None
    x2 = x.reshape(-1, 16 * KB).contiguous()
    rs, rp = ao.nvfp4_quantize(x2, 16, pts)
    s, p = ops.nvfp4_quantize(x.to(device), None if pts is None else pts.to(device))
    note(f"shape={shape} pts={pts}")
    assert_bitwise(s.reshape(-1, KB), rs, "block_scales")
    assert_bitwise(p.reshape(-1, 8 * KB), rp, "packed")


@given(
    M=nv_rows, KB=nv_blocks, seed=st.integers(0, 2**31 - 1), sr_seed=st.integers(0, 2**63 - 1),
    offset=st.integers(0, 2**63 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    two_level=st.booleans(), block_2d=st.booleans(),
)  # fmt: skip
def test_nvfp4_stochastic_random(device, M, KB, seed, sr_seed, offset, dtype, two_level, block_2d):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, 16 * KB, generator=gen) * 3).to(dtype)
    pts = nvfp4_pts(x) if two_level else None
    s, p = ops.nvfp4_quantize(x.to(device), None if pts is None else pts.to(device), block_2d=block_2d,
                              stochastic=True, seed=sr_seed, offset=offset)  # fmt: skip
    rs, rp = ref_nvfp4_quantize(x, pts, block_2d=block_2d, stochastic=True, seed=sr_seed, offset=offset)
    note(f"{DTYPE_IDS[dtype]} seed={sr_seed} offset={offset}")
    assert_bitwise(s, rs, "block_scales")
    assert_bitwise(p, rp, "packed")
