"""nvfp4_quantize / nvfp4_dequantize against the spec (hif8_nvfp4.md §4): the §4.1 worked examples A and B, the
testlib's torchao-order reference (one- and two-level, leading dims, layouts), the zero tensor and NaN/Inf blocks,
16 x 16 block_2d (tile-amax equivalence, W vs W.T), the per-tensor-scale helper, and random_hadamard_transform16
(orthogonal Q, explicit Sylvester H16, A.T @ B invariance)."""

from __future__ import annotations

import math

import pytest
import torch

from formats_testlib import (
    DTYPE_IDS,
    assert_bitwise,
    e2m1_value,
    nvfp4_pts,
    ref_nvfp4_dequantize,
    ref_nvfp4_quantize,
    ref_unpack_nibbles,
    rnd,
    sylvester_h16,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

IN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def u8(t: torch.Tensor) -> list[int]:
    flat = t.detach().cpu().reshape(-1)
    return (flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).tolist()


def check_quantize(x, pts=None, ctx="", **kw):
    """The op's (scales, packed) equal the reference bitwise; returns them."""
    scales, packed = ops.nvfp4_quantize(x, pts, **kw)
    rs, rp = ref_nvfp4_quantize(x, pts.cpu() if pts is not None else None, **kw)
    ctx = f"[x {tuple(x.shape)} {DTYPE_IDS[x.dtype]} two_level={pts is not None} {kw}] {ctx}"
    assert scales.device == x.device and packed.device == x.device, ctx
    assert_bitwise(scales, rs, "block_scales", ctx)
    assert_bitwise(packed, rp, "packed", ctx)
    return scales, packed


# ---- §4.1 worked examples ----------------------------------------------------------------------------------

EXAMPLE_A = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, -1.25, 0.3, -5, 2.9, 0.0, -0.0]
EXAMPLE_A_CODES = [0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0x7, 0x8, 0xA, 0xA, 0x1, 0xE, 0x5, 0x0, 0x8]
EXAMPLE_A_BYTES = [0x20, 0x42, 0x64, 0x76, 0xA8, 0x1A, 0x5E, 0x80]

B_BLK0 = [42, -21, 10.5, 7, 3, 1.5, 0, -0.2, 30, 36, -39, 12, 5.25, 2.625, 0.75, 20]
B_BLK1 = [5, -4.9, 4.5, 4.2, -3.3, 2.2, 1.0, 0.4, 0.2, -0.1, 2.6, 3.9, -2.44, 1.33, 0.77, 0.05]
B_BLK2 = [0.001, -0.0005, 0.0002, 0.00075] + [0.0001] * 12
B_CODES = [[0x7, 0xD, 0x3, 0x2, 0x1, 0x0, 0x0, 0x8, 0x6, 0x7, 0xF, 0x3, 0x2, 0x1, 0x0, 0x5],
           [0x7, 0xF, 0x7, 0x7, 0xE, 0x5, 0x2, 0x1, 0x0, 0x8, 0x5, 0x6, 0xD, 0x3, 0x2, 0x0],
           [0x6, 0xC, 0x2, 0x5] + [0x1] * 12]  # fmt: skip
B_BLK0_BYTES = [0xD7, 0x23, 0x01, 0x80, 0x76, 0x3F, 0x12, 0x50]
B_BLK0_XHAT = [42, -21, 10.5, 7, 3.5, 0, 0, -0.0, 28, 42, -42, 10.5, 7, 3.5, 0, 21]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_worked_example_a_one_level(device, dtype):
    """Block amax 6 -> sf = 1.0 (byte 0x38), r = 1: RNE ties to the even code, -0 -> 0x8."""
    x = torch.tensor([EXAMPLE_A], dtype=dtype, device=device)
    scales, packed = ops.nvfp4_quantize(x)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (1, 1)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 8)
    assert u8(scales) == [0x38]
    assert u8(packed) == EXAMPLE_A_BYTES
    assert ref_unpack_nibbles(packed.cpu())[0].tolist() == EXAMPLE_A_CODES
    xhat = ops.nvfp4_dequantize(scales, packed, dtype=torch.float32)
    assert_bitwise(xhat, e2m1_value(torch.tensor([EXAMPLE_A_CODES])), "x_hat")


def test_worked_example_b_two_level(device):
    """1 x 48, tensor amax 42 -> pts = 2^-6: scale bytes 0x7E, 0x65, 0x08 (clamped at 2^-6), the listed codes."""
    x = torch.tensor([B_BLK0 + B_BLK1 + B_BLK2], dtype=torch.float32, device=device)
    pts = ops.nvfp4_per_tensor_scale(x)
    assert pts.dtype == torch.float32 and pts.dim() == 0 and float(pts) == 2.0**-6
    scales, packed = ops.nvfp4_quantize(x, pts)
    assert u8(scales) == [0x7E, 0x65, 0x08]
    codes = ref_unpack_nibbles(packed.cpu())[0]
    assert codes.tolist() == sum(B_CODES, [])
    assert u8(packed)[:8] == B_BLK0_BYTES
    xhat = ops.nvfp4_dequantize(scales, packed, pts, dtype=torch.float32).cpu()[0]
    assert_bitwise(xhat[:16], torch.tensor(B_BLK0_XHAT), "x_hat blk0")
    assert float(xhat[16]) == 4.875 and float(xhat[17]) == -4.875  # 6 * 52 / 64: the scale was rounded down
    assert float(xhat[32]) == 9.765625e-4  # 4 * 2^-6 / 64


# ---- against the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (3, 5, 64), (2, 3, 4, 32)], ids=str)
def test_quantize_matches_reference(device, dtype, two_level, shape):
    x = rnd(shape, dtype, seed=len(shape) * 10 + shape[-1], gain=2.5, device=device)
    x.view(-1)[3] = 40.0  # an outlier block
    pts = nvfp4_pts(x).to(device) if two_level else None
    check_quantize(x, pts)


@pytest.mark.parametrize("gain", [1e-6, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_quantize_value_ranges(device, gain, two_level):
    """Tiny blocks (scale clamped at 2^-6), large ones (clamped at 448 in one-level) and mixed block magnitudes."""
    gen = torch.Generator().manual_seed(int(gain * 1000) % 97)
    x = torch.randn(16, 128, generator=gen) * gain * torch.exp(2 * torch.randn(16, 8, 1, generator=gen)).expand(
        16, 8, 16).reshape(16, 128)  # fmt: skip
    x = x.to(device)
    check_quantize(x, nvfp4_pts(x).to(device) if two_level else None)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_dequantize_matches_reference(device, dtype, two_level):
    x = rnd((2, 9, 64), seed=5, gain=3.0, device=device)
    pts = nvfp4_pts(x).to(device) if two_level else None
    scales, packed = ops.nvfp4_quantize(x, pts)
    got = ops.nvfp4_dequantize(scales, packed, pts, dtype=dtype)
    assert got.shape == x.shape and got.dtype == dtype and got.device == x.device
    assert_bitwise(got, ref_nvfp4_dequantize(scales, packed, pts, dtype), "x_hat")
    # default dtype is bf16
    assert ops.nvfp4_dequantize(scales, packed, pts).dtype == torch.bfloat16


def test_dequantize_arbitrary_bytes(device):
    """Every scale byte (incl. subnormals and 0x7F = NaN) and every code byte, one- and two-level."""
    scales = torch.arange(128, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(8, 16)
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (8, 128), generator=gen, dtype=torch.int32).to(torch.uint8)
    for pts in (None, torch.tensor(0.37)):
        got = ops.nvfp4_dequantize(scales.to(device), packed.to(device), None if pts is None else pts.to(device),
                                   dtype=torch.float32)  # fmt: skip
        assert_bitwise(got, ref_nvfp4_dequantize(scales, packed, pts, torch.float32), f"pts={pts}")


def test_roundtrip_error_bound(device):
    """|x - x_hat| <= half the E2M1 step at the element's magnitude times the block's decode scale (RN), except the
    clipped top of a block whose scale rounded down (|y| > 6)."""
    x = rnd((32, 256), seed=6, gain=2.0, device=device)
    pts = nvfp4_pts(x).to(device)
    scales, packed = ops.nvfp4_quantize(x, pts)
    xhat = ops.nvfp4_dequantize(scales, packed, pts, dtype=torch.float32).cpu()
    d = (float(pts) * scales.cpu().float()).repeat_interleave(16, -1)
    y = x.cpu() / d
    half_step = torch.where(y.abs() < 2, 0.25, torch.where(y.abs() < 4, 0.5, 1.0))
    ok = ((x.cpu() - xhat).abs() <= half_step * d * (1 + 1e-6)) | (y.abs() > 6)
    assert bool(ok.all())


def test_zero_tensor(device):
    """amax 0: nvfp4_per_tensor_scale -> 1.0; every block scale 0x08 (the 2^-6 clamp), codes 0."""
    x = torch.zeros(4, 64, device=device)
    pts = ops.nvfp4_per_tensor_scale(x)
    assert float(pts) == 1.0
    for p in (pts, None):
        scales, packed = ops.nvfp4_quantize(x, p)
        assert set(u8(scales)) == {0x08} and set(u8(packed)) == {0}
        assert torch.equal(ops.nvfp4_dequantize(scales, packed, p, dtype=torch.float32).cpu(), torch.zeros(4, 64))


def test_per_tensor_scale_helper(device):
    x = rnd((5, 32), seed=2, device=device)
    x[1, 3] = -9.5
    pts = ops.nvfp4_per_tensor_scale(x)
    assert pts.dtype == torch.float32 and pts.dim() == 0 and pts.device == x.device
    assert float(pts) == float(torch.tensor(9.5) / 2688.0)
    assert float(ops.nvfp4_per_tensor_scale(x.bfloat16())) == float(torch.tensor(9.5) / 2688.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_nonfinite_block_gets_nan_scale(device, bad, two_level):
    """A block holding NaN/+-Inf gets scale byte 0x7F; the other blocks are quantized normally."""
    x = rnd((3, 64), seed=8, device=device)
    pts = nvfp4_pts(x).to(device) if two_level else None
    x[1, 37] = bad
    scales, packed = ops.nvfp4_quantize(x, pts)
    sb = scales.cpu().view(torch.uint8)
    assert int(sb[1, 2]) == 0x7F
    rs, rp = ref_nvfp4_quantize(x, pts.cpu() if pts is not None else None)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(sb[keep], rs.view(torch.uint8)[keep])
    keep_bytes = keep.repeat_interleave(8, -1)
    assert torch.equal(packed.cpu()[keep_bytes], rp[keep_bytes])
    assert torch.isnan(ops.nvfp4_dequantize(scales, packed, pts, dtype=torch.float32)[1, 32:48].cpu()).all()


def test_leading_dims_equal_flattened(device):
    x = rnd((2, 3, 5, 32), seed=9, device=device)
    s4, p4 = ops.nvfp4_quantize(x)
    s2, p2 = ops.nvfp4_quantize(x.reshape(30, 32))
    assert s4.shape == (2, 3, 5, 2) and p4.shape == (2, 3, 5, 16)
    assert torch.equal(s4.reshape(30, 2).view(torch.uint8), s2.view(torch.uint8))
    assert torch.equal(p4.reshape(30, 16), p2)
    assert ops.nvfp4_dequantize(s4, p4).shape == x.shape


@pytest.mark.parametrize("layout", ["transposed", "row_strided", "column_sliced"])
def test_noncontiguous_input(device, layout):
    base = rnd((64, 96), seed=10, device=device)
    x = {"transposed": base.t()[:, :48], "row_strided": base[::3, :48], "column_sliced": base[:, 16:80]}[layout]
    assert not x.is_contiguous()
    pts = nvfp4_pts(x).to(device)
    check_quantize(x, pts, layout)
    check_quantize(x, None, layout, block_2d=True)


def test_one_dim_and_16bit_inputs(device):
    x = rnd((64,), seed=11, device=device)
    s, p = check_quantize(x)
    assert s.shape == (4,) and p.shape == (32,)
    check_quantize(x.half(), nvfp4_pts(x).to(device))


# ---- block_2d ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [16, 37, 5, 48])
@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_block_2d_is_tile_amax(device, rows, two_level, dtype):
    """block_2d = the 1 x 16 algorithm with each block amax replaced by its 16 x 16 tile amax (M not a multiple of
    16: the last tile is shorter)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 80, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen))
    x = x.to(dtype).to(device)
    pts = nvfp4_pts(x).to(device) if two_level else None
    scales, _ = check_quantize(x, pts, block_2d=True)
    sb = scales.cpu().view(torch.uint8)
    for i in range(0, rows, 16):  # one scale per tile, repeated on each of its rows
        assert (sb[i : i + 16] == sb[i]).all()
    if rows > 16:
        one_d, _ = ops.nvfp4_quantize(x, pts)
        assert not torch.equal(one_d.cpu().view(torch.uint8), sb)  # the tile amax made a difference


def test_block_2d_leading_dims(device):
    """Rows of the tiles run over the flattened leading dims."""
    x = rnd((3, 7, 32), seed=12, device=device)
    s3, p3 = ops.nvfp4_quantize(x, block_2d=True)
    s2, p2 = ops.nvfp4_quantize(x.reshape(21, 32), block_2d=True)
    assert torch.equal(s3.reshape(21, 2).view(torch.uint8), s2.view(torch.uint8))
    assert torch.equal(p3.reshape(21, 16), p2)
    check_quantize(x, None, block_2d=True)


@pytest.mark.parametrize("two_level", [False, True], ids=["one", "two"])
def test_block_2d_w_and_wt_quantize_alike(device, two_level):
    """W and W.T with block_2d give the same dequantized values, transposed."""
    w = rnd((48, 96), seed=13, device=device) * torch.exp(rnd((48, 96), seed=14, device=device))
    pts = nvfp4_pts(w).to(device) if two_level else None
    dq = ops.nvfp4_dequantize(*ops.nvfp4_quantize(w, pts, block_2d=True), pts, dtype=torch.float32)
    dqt = ops.nvfp4_dequantize(*ops.nvfp4_quantize(w.t().contiguous(), pts, block_2d=True), pts, dtype=torch.float32)
    assert_bitwise(dqt, dq.t().contiguous(), "dequant(W.T) vs dequant(W).T")
    dqt2 = ops.nvfp4_dequantize(*ops.nvfp4_quantize(w.t(), pts, block_2d=True), pts, dtype=torch.float32)
    assert_bitwise(dqt2, dq.t().contiguous(), "non-contiguous W.T")


# ---- random Hadamard transform ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_hadamard16_is_sylvester_times_signs(seed):
    q = ops.hadamard16(seed)
    assert q.shape == (16, 16) and q.dtype == torch.float32
    torch.testing.assert_close(q @ q.T, torch.eye(16), atol=1e-6, rtol=0)
    h = sylvester_h16()
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    d = (4 * q / h)[0]  # Q = H diag(d) / 4: column j of 4Q is d_j times column j of H
    assert set(d.tolist()) <= {1.0, -1.0}
    assert torch.equal(4 * q, h * d)
    assert torch.equal(ops.hadamard16(seed), q)  # deterministic
    assert ops.hadamard16(seed, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_hadamard16_seeds_differ():
    assert not torch.equal(ops.hadamard16(0), ops.hadamard16(1))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_rht_matches_explicit_chunks(device, dim):
    x = rnd((16, 32, 48), seed=15, device=device).permute(1, 2, 0)  # [32, 48, 16], not contiguous
    q = ops.hadamard16(7)
    got = ops.random_hadamard_transform16(x, seed=7, dim=dim)
    moved = x.cpu().double().movedim(dim, -1)
    ref = (moved.reshape(*moved.shape[:-1], -1, 16) @ q.double().T).reshape(moved.shape).movedim(-1, dim)
    torch.testing.assert_close(got.cpu().double(), ref, atol=1e-5, rtol=1e-5)
    assert got.shape == x.shape and got.dtype == x.dtype
    # Q.T inverts it: (chunks @ Q.T) @ Q = chunks
    chunks = got.cpu().movedim(dim, -1)
    inv = (chunks.reshape(*chunks.shape[:-1], -1, 16) @ q).reshape(chunks.shape).movedim(-1, dim)
    torch.testing.assert_close(inv, x.cpu(), atol=1e-5, rtol=1e-5)


def test_rht_preserves_wgrad(device):
    """Both wgrad operands transformed along the token dim: A.T @ B unchanged (to fp32 tolerance)."""
    a = rnd((64, 24), seed=16, device=device)  # tokens x out
    b = rnd((64, 40), seed=17, device=device)  # tokens x in
    ta = ops.random_hadamard_transform16(a, seed=3, dim=0)
    tb = ops.random_hadamard_transform16(b, seed=3, dim=0)
    torch.testing.assert_close(ta.T @ tb, a.T @ b, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(ta, a)
    # a different seed on one side breaks it
    tb2 = ops.random_hadamard_transform16(b, seed=4, dim=0)
    assert not torch.allclose(ta.T @ tb2, a.T @ b, atol=1e-2)


def test_rht_bad_dim_size():
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.random_hadamard_transform16(torch.randn(4, 24), dim=-1)


@pytest.mark.parametrize("block_2d", [False, True], ids=["1x16", "16x16"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
def test_quantize_large_tensor(device, block_2d, stochastic):
    """1000 x 512 (parallel chunks over rows; the last 16 x 16 tile has 8 rows)."""
    gen = torch.Generator().manual_seed(40)
    x = (torch.randn(1000, 512, generator=gen) * torch.exp(torch.randn(1000, 1, generator=gen))).to(device)
    check_quantize(x, nvfp4_pts(x).to(device), block_2d=block_2d, stochastic=stochastic, seed=3, offset=2**33)


def test_dequantize_noncontiguous_inputs(device):
    """Strided scales / packed views (row slices) give the same values as their contiguous copies."""
    x = rnd((24, 64), seed=41, gain=2.0, device=device)
    pts = nvfp4_pts(x).to(device)
    s, p = ops.nvfp4_quantize(x, pts)
    s_v, p_v = s[::2], p[::2]
    assert not p_v.is_contiguous()
    assert_bitwise(ops.nvfp4_dequantize(s_v, p_v, pts, dtype=torch.float32),
                   ref_nvfp4_dequantize(s_v.contiguous(), p_v.contiguous(), pts, torch.float32), "strided")  # fmt: skip
