"""kv_quantize / kv_dequantize against the plain-PyTorch quantizer of kvcache_testlib (spec §2): codes, step and
zero bitwise, the round-trip bound, constant groups, the §2.5 worked vectors, layouts, and Hypothesis over shapes
and value scales."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from kvcache_testlib import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    META_DTYPES,
    expand_meta,
    max_code,
    ref_dequantize,
    ref_pack,
    ref_quantize,
    ref_unpack,
    roundtrip_bound,
    stable_seed,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

BITS = (2, 4, 8)
AXES = ("token", "channel")


def rnd(shape, dtype=torch.float32, seed=0, gain=1.0, offset=0.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * gain + offset).to(dtype).to(device)


def assert_bitwise(got: torch.Tensor, ref: torch.Tensor, name: str, ctx: str = ""):
    g = got.detach().cpu()
    assert g.dtype == ref.dtype, f"{name}: dtype {g.dtype}, expected {ref.dtype} {ctx}"
    assert g.shape == ref.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(ref.shape)} {ctx}"
    same = (g == ref) | (torch.isnan(g.float()) & torch.isnan(ref.float()))
    if not bool(same.all()):
        bad = (~same).nonzero()
        idx = tuple(int(v) for v in bad[0])
        raise AssertionError(f"{name}: {bad.shape[0]} of {g.numel()} elements differ {ctx}; first at {idx}: "
                             f"got {g[idx].item()!r}, expected {ref[idx].item()!r}")  # fmt: skip


def check_quantize(x: torch.Tensor, bits: int, g: int, axis: str, meta: torch.dtype, ctx: str = ""):
    """The op's (codes, step, zero) equal the reference bitwise; returns them."""
    codes, step, zero = ops.kv_quantize(x, bits=bits, group_size=g, axis=axis, meta_dtype=meta)
    rc, rs, rz = ref_quantize(x.cpu(), bits, g, axis, meta)
    ctx = f"[x {tuple(x.shape)} {DTYPE_IDS[x.dtype]} bits={bits} g={g} axis={axis} meta={DTYPE_IDS[meta]}] {ctx}"
    assert codes.device == x.device and step.device == x.device and zero.device == x.device, ctx
    assert_bitwise(step, rs, "step", ctx)
    assert_bitwise(zero, rz, "zero", ctx)
    if codes.shape == rc.shape and codes.dtype == torch.uint8 and not torch.equal(codes.cpu(), rc):
        # show the unpacked codes of the first differing byte's token row, easier to read than bytes
        got_u, ref_u = ref_unpack(codes.cpu(), bits), ref_unpack(rc, bits)
        bad = (got_u != ref_u).nonzero()[0]
        idx = tuple(int(v) for v in bad)
        raise AssertionError(f"codes differ {ctx}: first at {idx}: got code {got_u[idx].item()}, expected "
                             f"{ref_u[idx].item()} (x = {x.cpu()[idx].item()!r})")  # fmt: skip
    assert_bitwise(codes, rc, "codes", ctx)
    return codes, step, zero


def group_for(axis: str) -> int:
    return 16 if axis == "token" else 4  # channel: 13 tokens = 3 groups of 4 + a tail of 1


# ---- bitwise equality with the reference -------------------------------------------------------------------


@pytest.mark.parametrize("meta", META_DTYPES, ids=lambda d: "meta_" + DTYPE_IDS[d])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_reference(device, bits, axis, dtype, meta):
    B, L, H, D = 2, 13, 3, 32
    x = rnd((B, L, H, D), dtype, stable_seed(bits, axis, dtype, meta), gain=1.5, offset=0.3, device=device)
    check_quantize(x, bits, group_for(axis), axis, meta)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
def test_quantize_noncontiguous_fused_view(device, bits, axis):
    """x a slice of a fused [B, L, 3, H, D] projection (strides free except the last)."""
    B, L, H, D = 2, 11, 2, 32
    fused = rnd((B, L, 3, H, D), torch.bfloat16, stable_seed("fused", bits, axis), device=device)
    x = fused[:, :, 1]
    assert not x.is_contiguous()
    codes, step, zero = check_quantize(x, bits, group_for(axis), axis, torch.float16, "fused view")
    c2, s2, z2 = ops.kv_quantize(x.contiguous(), bits=bits, group_size=group_for(axis), axis=axis)
    assert torch.equal(codes, c2) and torch.equal(step, s2) and torch.equal(zero, z2)


@pytest.mark.parametrize("axis", AXES)
def test_quantize_head_major_view(device, axis):
    """x stored [B, H, L, D] and seen as [B, L, H, D]."""
    B, L, H, D = 2, 9, 3, 16
    x = rnd((B, H, L, D), torch.float32, 5, device=device).transpose(1, 2)
    check_quantize(x, 4, 8 if axis == "token" else 4, axis, torch.float16, "head-major view")


@pytest.mark.parametrize("L,g", [(13, 4), (5, 8), (1, 4), (32, 32), (33, 32), (7, 1)])
def test_channel_axis_tail_groups(device, L, g):
    """Groups of g tokens per (b, h, channel); the last group may be shorter (or the only one, g > L)."""
    x = rnd((2, L, 2, 16), torch.float32, stable_seed("tail", L, g), gain=2.0, device=device)
    codes, step, zero = check_quantize(x, 2, g, "channel", torch.float32)
    assert step.shape == (2, -(-L // g), 2, 16)


@pytest.mark.parametrize("g", [4, 8, 16, 64])
def test_token_axis_group_sizes(device, g):
    """Any group size dividing D (spec's 32/64/128 and smaller test-only groups)."""
    x = rnd((1, 6, 2, 64), torch.float32, stable_seed("g", g), device=device)
    codes, step, zero = check_quantize(x, 4, g, "token", torch.float16)
    assert step.shape == (1, 6, 2, 64 // g)


def test_quantize_empty_sequence(device):
    x = torch.zeros(2, 0, 2, 32, device=device)
    for axis in AXES:
        codes, step, zero = ops.kv_quantize(x, bits=2, group_size=16, axis=axis)
        assert codes.shape == (2, 0, 2, 8)
        assert step.shape == ((2, 0, 2, 2) if axis == "token" else (2, 0, 2, 32)) == zero.shape


# ---- spec §2.5 worked vectors ----------------------------------------------------------------------------------


def test_spec_worked_vector_int2(device):
    k = torch.tensor([-1.0, 0.23, 0.41, 2.0], device=device).view(1, 1, 1, 4)
    codes, step, zero = ops.kv_quantize(k, bits=2, group_size=4, meta_dtype=torch.float32)
    assert step.flatten().tolist() == [1.0] and zero.flatten().tolist() == [-1.0]
    assert codes.flatten().tolist() == [0xD4], [hex(v) for v in codes.flatten().tolist()]
    assert ref_unpack(codes.cpu(), 2).flatten().tolist() == [0, 1, 1, 3]
    x_hat = ops.kv_dequantize(codes, step, zero, bits=2, group_size=4, dtype=torch.float32)
    assert x_hat.flatten().tolist() == [-1.0, 0.0, 0.0, 2.0]


def test_spec_worked_vector_int4(device):
    k = torch.tensor([-1.0, 0.23, 0.41, 2.0], device=device).view(1, 1, 1, 4)
    codes, step, zero = ops.kv_quantize(k, bits=4, group_size=4, meta_dtype=torch.float32)
    assert step.item() == pytest.approx(0.2, rel=1e-7) and zero.item() == -1.0
    assert codes.flatten().tolist() == [0x60, 0xF7], [hex(v) for v in codes.flatten().tolist()]
    x_hat = ops.kv_dequantize(codes, step, zero, bits=4, group_size=4, dtype=torch.float32)
    assert x_hat.flatten().tolist() == pytest.approx([-1.0, 0.2, 0.4, 2.0], abs=1e-6)


def test_spec_worked_vector_channel_axis(device):
    """The §2.5 vector along tokens (axis="channel", g = 4): each of the 4 channels holds the same sequence,
    so every token's byte repeats its code 4 times (code 1 -> 0x55, 3 -> 0xFF)."""
    k = torch.tensor([-1.0, 0.23, 0.41, 2.0], device=device).view(1, 4, 1, 1).expand(1, 4, 1, 4).contiguous()
    codes, step, zero = ops.kv_quantize(k, bits=2, group_size=4, axis="channel", meta_dtype=torch.float32)
    assert step.shape == (1, 1, 1, 4)
    assert step.flatten().tolist() == [1.0] * 4 and zero.flatten().tolist() == [-1.0] * 4
    assert codes.flatten().tolist() == [0x00, 0x55, 0x55, 0xFF]


def test_packing_layout_bits(device):
    """Hand-made codes through kv_dequantize: channel c at bits [bits*c % 8, +bits) of byte bits*c // 8."""
    for bits in BITS:
        D = 16
        codes = torch.arange(D) % (max_code(bits) + 1)
        packed = ref_pack(codes.view(1, 1, 1, D), bits)
        if bits == 2:
            assert packed.flatten().tolist()[:2] == [0 | 1 << 2 | 2 << 4 | 3 << 6] * 2
        if bits == 4:
            assert packed.flatten().tolist()[0] == 0x10
        step = torch.ones(1, 1, 1, 1)
        zero = torch.zeros(1, 1, 1, 1)
        out = ops.kv_dequantize(packed.to(device), step.to(device), zero.to(device), bits=bits, group_size=D,
                                dtype=torch.float32)  # fmt: skip
        assert out.flatten().cpu().tolist() == codes.float().tolist(), bits


# ---- round trip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta", META_DTYPES, ids=lambda d: "meta_" + DTYPE_IDS[d])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_bound(device, bits, axis, meta):
    """|x - x^| <= step/2 (+ the meta-rounding slack of kvcache_testlib.roundtrip_bound); with fp32 meta the
    slack is a few fp32 ulps, so this is the tight step/2 bound."""
    x = rnd((2, 13, 2, 32), torch.float32, stable_seed("rt", bits, axis, meta), gain=3.0, device=device)
    g = group_for(axis)
    codes, step, zero = ops.kv_quantize(x, bits=bits, group_size=g, axis=axis, meta_dtype=meta)
    x_hat = ops.kv_dequantize(codes, step, zero, bits=bits, group_size=g, axis=axis, dtype=torch.float32)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    _, rs, rz = ref_quantize(x.cpu(), bits, g, axis, meta)
    bound = roundtrip_bound(x.cpu(), rs, rz, bits, g, axis)
    err = (x.cpu().double() - x_hat.cpu().double()).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    if meta == torch.float32:
        half_step = expand_meta(rs.double(), g, axis, 13) / 2
        assert bool((err <= half_step * (1 + 1e-5) + 1e-6).all()), f"max err / step: {(err / half_step).max()}"


@pytest.mark.parametrize("meta", META_DTYPES, ids=lambda d: "meta_" + DTYPE_IDS[d])
@pytest.mark.parametrize("axis", AXES)
def test_constant_groups(device, axis, meta):
    """max == min: step 0, codes 0 and x^ == zero exactly (== the value rounded to meta); other groups normal."""
    B, L, H, D, g = 2, 8, 2, 16, 4
    x = rnd((B, L, H, D), torch.float32, 3, device="cpu")
    if axis == "token":
        x[0, 1, 1] = 1.2345  # every group of that (token, head) constant
        x[1, 3, 0, 4:8] = -7.0  # one group
    else:
        x[0, 4:8, 1, 2] = 0.777  # the second token group of one channel
        x[1, :, 0, 5] = -3.0  # a whole channel
    x = x.to(device)
    codes, step, zero = check_quantize(x, 4, g, axis, meta)
    x_hat = ops.kv_dequantize(codes, step, zero, bits=4, group_size=g, axis=axis, dtype=torch.float32).cpu()
    if axis == "token":
        assert (step[0, 1, 1] == 0).all() and (step[1, 3, 0, 1] == 0)
        assert (ref_unpack(codes.cpu(), 4)[0, 1, 1] == 0).all()
        assert (x_hat[0, 1, 1] == torch.tensor(1.2345).to(meta).float()).all()
        assert (x_hat[1, 3, 0, 4:8] == -7.0).all()
    else:
        assert step[0, 1, 1, 2] == 0 and (step[1, :, 0, 5] == 0).all()
        assert (ref_unpack(codes.cpu(), 4)[0, 4:8, 1, 2] == 0).all()
        assert (x_hat[0, 4:8, 1, 2] == torch.tensor(0.777).to(meta).float()).all()
        assert (x_hat[1, :, 0, 5] == -3.0).all()


def test_all_zero_values(device):
    """All-zero values (used by the mass test): step 0, zero 0, codes 0, x^ exactly 0."""
    x = torch.zeros(1, 5, 2, 32, device=device, dtype=torch.bfloat16)
    codes, step, zero = ops.kv_quantize(x, bits=2, group_size=32)
    assert (codes == 0).all() and (step == 0).all() and (zero == 0).all()
    assert (ops.kv_dequantize(codes, step, zero, bits=2, group_size=32) == 0).all()


# ---- dequantize ----------------------------------------------------------------------------------------------


def check_dequantize(codes, step, zero, bits, g, axis, dtype):
    got = ops.kv_dequantize(codes, step, zero, bits=bits, group_size=g, axis=axis, dtype=dtype)
    ref = ref_dequantize(codes.cpu(), step.cpu(), zero.cpu(), bits, g, axis)  # exact fp64 value
    assert got.dtype == dtype and got.shape == ref.shape and got.device == codes.device
    g64 = got.cpu().double()
    if step.dtype in (torch.float16, torch.bfloat16):
        # step * code is exact in fp32 (<= 19 significant bits): one rounding of the exact value to fp32 (FMA or
        # mul + add alike), then to dtype
        expected = ref.float().to(dtype).double()
        assert_bitwise(got.cpu(), expected.to(dtype), "x_hat", f"[bits={bits} axis={axis} {DTYPE_IDS[dtype]}]")
    else:  # fp32 meta: allow one fp32 ulp of |zero| + |step * code| (FMA vs mul + add), then dtype's rounding
        L = ref.shape[1]
        c = ref_unpack(codes.cpu(), bits).double()
        mag = expand_meta(zero.cpu().double(), g, axis, L).abs() + expand_meta(step.cpu().double(), g, axis, L) * c
        tol = 2.0**-23 * mag + torch.finfo(dtype).eps * ref.abs()
        err = (g64 - ref).abs()
        assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: "out_" + DTYPE_IDS[d])
@pytest.mark.parametrize("meta", META_DTYPES, ids=lambda d: "meta_" + DTYPE_IDS[d])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_matches_reference(device, bits, axis, meta, dtype):
    """kv_dequantize of reference-made codes (not the op's) == zero + step * code."""
    x = rnd((2, 13, 2, 32), torch.float32, stable_seed("dq", bits, axis, meta), gain=2.0, offset=-0.5)
    g = group_for(axis)
    codes, step, zero = ref_quantize(x, bits, g, axis, meta)
    check_dequantize(codes.to(device), step.to(device), zero.to(device), bits, g, axis, dtype)


def test_dequantize_arbitrary_codes_and_meta(device):
    """Random bytes (every code value), random non-negative steps (some exactly 0) and zeros of either sign."""
    gen = torch.Generator().manual_seed(11)
    for bits in BITS:
        codes = torch.randint(0, 256, (2, 7, 3, 32 * bits // 8), generator=gen, dtype=torch.uint8)
        step = torch.rand(2, 7, 3, 4, generator=gen) * 3
        step[0, 2] = 0.0  # step == 0 is legal: x^ == zero whatever the codes
        zero = torch.randn(2, 7, 3, 4, generator=gen) * 10
        for meta in META_DTYPES:
            s, z = step.to(meta).to(device), zero.to(meta).to(device)
            check_dequantize(codes.to(device), s, z, bits, 8, "token", torch.float32)
        out = ops.kv_dequantize(codes.to(device), step.to(device), zero.to(device), bits=bits, group_size=8,
                                dtype=torch.float32)  # fmt: skip
        assert torch.equal(out[0, 2].cpu(), zero[0, 2].repeat_interleave(8, -1))


def test_dequantize_noncontiguous_views(device):
    """codes / step / zero as the first n tokens of larger buffers (a partially filled ring slot)."""
    x = rnd((2, 20, 2, 32), torch.float32, 21)
    codes, step, zero = ref_quantize(x, 2, 16, "token", torch.float16)
    n = 9
    cv, sv, zv = (t.to(device)[:, :n] for t in (codes, step, zero))
    assert not cv.is_contiguous()
    check_dequantize(cv, sv, zv, 2, 16, "token", torch.float32)


# ---- Hypothesis ----------------------------------------------------------------------------------------------


@st.composite
def quant_cases(draw):
    B = draw(st.integers(1, 2))
    L = draw(st.integers(1, 40))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from((8, 16, 32, 64)))
    bits = draw(st.sampled_from(BITS))
    axis = draw(st.sampled_from(AXES))
    if axis == "token":
        g = draw(st.sampled_from([d for d in (1, 2, 4, 8, 16, 32, 64) if D % d == 0]))
    else:
        g = draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    meta = draw(st.sampled_from(META_DTYPES))
    gain = draw(st.sampled_from((1e-3, 1.0, 1e3)))
    offset = draw(st.sampled_from((0.0, 0.0, 1.0, -5.0))) * gain
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, L=L, H=H, D=D, bits=bits, axis=axis, g=g, dtype=dtype, meta=meta, gain=gain, offset=offset,
                seed=seed)  # fmt: skip


@given(case=quant_cases())
def test_hypothesis_quantize(device, case):
    c = case
    note(repr(c))
    x = rnd((c["B"], c["L"], c["H"], c["D"]), c["dtype"], c["seed"], c["gain"], c["offset"], device=device)
    codes, step, zero = check_quantize(x, c["bits"], c["g"], c["axis"], c["meta"])
    x_hat = ops.kv_dequantize(codes, step, zero, bits=c["bits"], group_size=c["g"], axis=c["axis"],
                              dtype=torch.float32).cpu().double()  # fmt: skip
    bound = roundtrip_bound(x.cpu(), step.cpu(), zero.cpu(), c["bits"], c["g"], c["axis"])
    err = (x.cpu().double() - x_hat).abs()
    assert bool((err <= bound).all()), f"round trip: max excess {(err - bound).max().item():.3g}"
