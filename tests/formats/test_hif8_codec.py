"""hif8_encode / hif8_decode against the spec (hif8_nvfp4.md §1): the 256-code table (§1.5), the TA test vectors and
the 20 random values (§1.4), every rounding midpoint and its fp32 neighbours against the nearest-on-the-value-set
reference, round trips, 16-bit inputs (exhaustively), the scale argument, HR rounding (§1.3), and en_dtypes'
independent ``hifloat8`` codec as a CPU oracle on random fp32 values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from formats_testlib import (
    DTYPE_IDS,
    HIF8_MIDPOINTS,
    HIF8_POSITIVE_SORTED,
    HIF8_VALUES,
    SPEC_TABLE,
    assert_bitwise,
    ref_hif8_decode,
    ref_hif8_encode,
    ref_hif8_encode_bits,
    ref_hif8_encode_hybrid,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
F32 = np.float32

# §1.4: (input = fp32 nearest to the literal, TA code, code with saturate=True)
SPEC_VECTORS = [
    (1.0, 0x08, 0x08), (-1.0, 0x88, 0x88), (15.0, 0x2F, 0x2F), (224.0, 0x4F, 0x4F),
    (32768.0, 0x6E, 0x6E), (-32768.0, 0xEE, 0xEE), (3.0517578125e-05, 0x7E, 0x7E), (2.0**-16, 0x07, 0x07),
    (2.384185791015625e-07, 0x01, 0x01), (0.5, 0x18, 0x18), (16.0, 0x40, 0x40), (256.0, 0x60, 0x60),
    (0.1, 0x52, 0x52), (1000.0, 0x64, 0x64), (1.0625, 0x09, 0x09), (-1.0625, 0x89, 0x89), (1.0624999, 0x08, 0x08),
    (0.96875, 0x08, 0x08), (1.9375, 0x10, 0x10), (15.5, 0x40, 0x40), (15.499999, 0x2F, 0x2F), (18.0, 0x41, 0x41),
    (320.0, 0x61, 0x61), (240.0, 0x60, 0x60), (239.99998, 0x4F, 0x4F), (28672.0, 0x6E, 0x6E),
    (28671.998, 0x6D, 0x6D), (0.1171875, 0x38, 0x38), (5.340576171875e-05, 0x7C, 0x7C),
    (2.288818359375e-05, 0x7E, 0x7E), (3.5762786865234375e-07, 0x02, 0x02), (1.1920928955078125e-07, 0x01, 0x01),
    (float(np.nextafter(F32(2.0**-23), F32(0))), 0x00, 0x00), (1e-9, 0x00, 0x00), (0.0, 0x00, 0x00),
    (-0.0, 0x00, 0x00), (40959.996, 0x6E, 0x6E), (40960.0, 0x6F, 0x6E), (-40960.0, 0xEF, 0xEE), (1e6, 0x6F, 0x6E),
    (math.inf, 0x6F, 0x6E), (-math.inf, 0xEF, 0xEE), (math.nan, 0x80, 0x80),
]  # fmt: skip

# §1.4, the 20 random values
SPEC_RANDOM = [
    (1.9068e-05, 0x07), (0.009073, 0x5D), (0.34861, 0x33), (-48096.0, 0xEF), (-1253.3, 0xE4), (-43755.0, 0xEF),
    (-0.00041301, 0xF9), (-56.873, 0xC7), (-112.91, 0xCB), (-226.16, 0xCF), (23272.0, 0x6D), (4.1702e-07, 0x02),
    (-8498.3, 0xEA), (4260.1, 0x68), (-0.00079763, 0xF7), (0.057878, 0x57), (-2.5964, 0x92), (-1.9009, 0x8F),
    (2618.5, 0x67), (-952.58, 0xE4),
]  # fmt: skip

# §1.3: (input, HR code, TA code)
SPEC_HYBRID = [(16.0, 0x41, 0x40), (224.0, 0x60, 0x4F), (0.0123, 0x5F, 0x5E), (100.3, 0x4A, 0x4A),
               (32768.0, 0x6F, 0x6E), (37000.0, 0x6F, 0x6E), (2.5, 0x12, 0x12)]  # fmt: skip


def u8(codes) -> torch.Tensor:
    return torch.tensor([int(c) for c in codes], dtype=torch.uint8)


def f32(values, device="cpu") -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=F32)).to(device)


def midpoint_inputs() -> np.ndarray:
    """Every midpoint between adjacent HiF8 magnitudes (0 | 2^-22 ... 32768 | Inf at 40960), its two fp32
    neighbours, the values themselves, both signs."""
    m = HIF8_MIDPOINTS.astype(F32)
    assert np.all(m.astype(np.float64) == HIF8_MIDPOINTS)  # the midpoints are fp32 values
    pos = np.concatenate([m, np.nextafter(m, F32(np.inf)), np.nextafter(m, F32(0)), HIF8_POSITIVE_SORTED.astype(F32)])
    return np.concatenate([pos, -pos])


# ---- the references themselves ---------------------------------------------------------------------------------


def test_reference_decode_is_the_spec_table():
    """The §1.1 decode algorithm (testlib) reproduces the literal §1.5 table on all 256 codes."""
    same = (HIF8_VALUES == SPEC_TABLE) | (np.isnan(HIF8_VALUES) & np.isnan(SPEC_TABLE))
    assert same.all(), np.nonzero(~same)
    finite = HIF8_VALUES[np.isfinite(HIF8_VALUES) & (HIF8_VALUES > 0)]
    assert finite.size == 126  # §1: 126 positive finite nonzero values
    assert HIF8_VALUES[0x6E] == 32768 and HIF8_VALUES[0x7E] == 2.0**-15 and HIF8_VALUES[0x01] == 2.0**-22


def test_reference_encoders_agree_with_spec_vectors_and_each_other():
    inputs = [v for v, _, _ in SPEC_VECTORS] + [v for v, _ in SPEC_RANDOM]
    expected = [c for _, c, _ in SPEC_VECTORS] + [c for _, c in SPEC_RANDOM]
    assert ref_hif8_encode(inputs).tolist() == expected
    assert ref_hif8_encode_bits(inputs).tolist() == expected
    assert ref_hif8_encode([v for v, _, _ in SPEC_VECTORS], saturate=True).tolist() == [c for _, _, c in SPEC_VECTORS]
    mids = midpoint_inputs()
    np.testing.assert_array_equal(ref_hif8_encode(mids), ref_hif8_encode_bits(mids))
    hr = ref_hif8_encode_hybrid(np.array([v for v, _, _ in SPEC_HYBRID], F32))
    assert hr.tolist() == [c for _, c, _ in SPEC_HYBRID]


# ---- decode ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_decode_all_256_codes(device, dtype):
    out = ops.hif8_decode(ALL_CODES.to(device), dtype)
    assert out.dtype == dtype and out.shape == (256,) and out.device.type == device
    got = out.cpu().double().numpy()
    same = (got == SPEC_TABLE) | (np.isnan(got) & np.isnan(SPEC_TABLE))
    assert same.all(), [(hex(c), got[c], SPEC_TABLE[c]) for c in np.nonzero(~same)[0][:8]]
    assert math.isnan(got[0x80]) and got[0x6F] == math.inf and got[0xEF] == -math.inf
    assert not torch.signbit(out[0]).item(), "0x00 decodes to +0"


def test_decode_shapes_and_layouts(device):
    codes = ALL_CODES.reshape(4, 8, 8).to(device)
    ref = ref_hif8_decode(codes)
    assert_bitwise(ops.hif8_decode(codes), ref, "3-D")
    assert_bitwise(ops.hif8_decode(codes.transpose(0, 2)), ref.transpose(0, 2).contiguous(), "transposed")
    assert_bitwise(ops.hif8_decode(codes[:, ::2, 1::3]), ref[:, ::2, 1::3].contiguous(), "sliced")
    assert_bitwise(ops.hif8_decode(codes[1, 2, 3]), ref[1, 2, 3], "0-dim")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_decode_scale(device, dtype, kind):
    """decode(c) / scale (fp32 division), one cast to dtype; scale as a python float or a one-element tensor."""
    codes = torch.tensor([c for c in range(256) if c not in (0x80,)], dtype=torch.int32).to(torch.uint8)
    for s in (5.0, 0.1171875, 3.7e-3, 1234.5):
        scale = s if kind == "float" else torch.tensor([s], dtype=torch.float32, device=device)
        got = ops.hif8_decode(codes.to(device), dtype, scale=scale)
        assert_bitwise(got, ref_hif8_decode(codes, dtype, torch.tensor(s, dtype=torch.float32)), f"scale={s}")


# ---- encode: TA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saturate", [False, True])
def test_encode_spec_vectors(device, saturate):
    x = f32([v for v, _, _ in SPEC_VECTORS], device)
    expected = u8([cs if saturate else c for _, c, cs in SPEC_VECTORS])
    assert_bitwise(ops.hif8_encode(x, saturate=saturate), expected, f"§1.4 saturate={saturate}", inputs=x)


def test_encode_spec_random_values(device):
    x = f32([v for v, _ in SPEC_RANDOM], device)
    assert_bitwise(ops.hif8_encode(x), u8([c for _, c in SPEC_RANDOM]), "§1.4 random", inputs=x)
    # and they decode to the listed values
    listed = [2.0**-16, 0.009765625, 0.34375, -math.inf, -1024, -math.inf, -1.5 * 2**-12, -56, -112, -224, 24576,
              2.0**-21, -8192, 4096, -1.5 * 2**-11, 0.0546875, -2.5, -1.875, 3072, -1024]  # fmt: skip
    got = ops.hif8_decode(ops.hif8_encode(x)).cpu().double().tolist()
    assert got == listed


@pytest.mark.parametrize("saturate", [False, True])
def test_encode_midpoints_and_neighbours(device, saturate):
    """Every tie (→ away from zero), the fp32 values just below and above it, and every exact value."""
    x = f32(midpoint_inputs(), device)
    ref = torch.from_numpy(ref_hif8_encode(x.cpu().numpy(), saturate))
    assert_bitwise(ops.hif8_encode(x, saturate=saturate), ref, "midpoints", inputs=x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_encode_roundtrips_all_codes(device, dtype):
    """encode(decode(c)) == c for all 256 codes (NaN -> 0x80, +-Inf -> 0x6F/0xEF), from each output dtype."""
    values = ops.hif8_decode(ALL_CODES.to(device), dtype)
    assert_bitwise(ops.hif8_encode(values), ALL_CODES, f"round trip via {DTYPE_IDS[dtype]}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_encode_16bit_inputs_exhaustive(device, dtype):
    """Every fp16 / bf16 bit pattern (widened to fp32 exactly) against the reference."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    ref = torch.from_numpy(ref_hif8_encode(x.float().numpy()))
    assert_bitwise(ops.hif8_encode(x.to(device)), ref, DTYPE_IDS[dtype], inputs=x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_encode_scale(device, dtype, kind):
    """codes of fp32(x * scale), the scale given as a python float or a one-element fp32 tensor."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(33, 17, generator=gen) * torch.exp(4 * torch.randn(33, 17, generator=gen))).to(dtype)
    for s in (5.0, 15 / 2.71828, 1e-3, 3e4, 0.0):
        scale = s if kind == "float" else torch.tensor(s, dtype=torch.float32, device=device).reshape(1)
        y = x.float() * torch.tensor(s, dtype=torch.float32)
        ref = torch.from_numpy(ref_hif8_encode(y.numpy()))
        assert_bitwise(ops.hif8_encode(x.to(device), scale=scale), ref, f"scale={s}", inputs=y)


def test_encode_scale_tie_is_rounded_after_the_product(device):
    """y = fp32(x * s) is formed first, then encoded: 0.34375 * 3 = 1.03125 -> 1 (0x08), 0.53125 * 3 = 1.59375 ->
    1.625 (0x0D); 0.53125 * 2 = 1.0625 is a tie -> 1.125 (0x09), 0.34375 * 2 = 0.6875 is exact (0x1B)."""
    x = f32([0.34375, 0.53125, -0.53125], device)
    assert ops.hif8_encode(x, scale=3.0).cpu().tolist() == [0x08, 0x0D, 0x8D]
    assert ops.hif8_encode(x, scale=2.0).cpu().tolist() == [0x1B, 0x09, 0x89]


def test_encode_shapes_and_layouts(device):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 10, 12, generator=gen) * 50).to(device)
    ref = torch.from_numpy(ref_hif8_encode(x.cpu()))
    out = ops.hif8_encode(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape and out.device == x.device
    assert_bitwise(out, ref, "3-D")
    assert_bitwise(ops.hif8_encode(x.transpose(0, 2)), ref.transpose(0, 2).contiguous(), "transposed")
    assert_bitwise(ops.hif8_encode(x[::2, 3:, ::5]), ref[::2, 3:, ::5].contiguous(), "sliced")
    assert_bitwise(ops.hif8_encode(x[1, 2, 3]), ref[1, 2, 3], "0-dim")


def test_encode_fp32_flush_and_subnormals(device):
    """fp32 subnormals, 2^-24, and everything below 2^-23 flush to 0x00 (both signs); [2^-23, 2^-22) -> 2^-22."""
    tiny = np.array([1e-45, 1e-40, 2.0**-126, 2.0**-24, 2.0**-23 * 0.75, 2.0**-23, 2.0**-23 * 1.25, 2.0**-22 * 0.99],
                    F32)  # fmt: skip
    x = f32(np.concatenate([tiny, -tiny]), device)
    expected = [0, 0, 0, 0, 0, 0x01, 0x01, 0x01] + [0, 0, 0, 0, 0, 0x81, 0x81, 0x81]
    assert ops.hif8_encode(x).cpu().tolist() == expected


def test_encode_matches_en_dtypes_oracle(device):
    """en_dtypes' hifloat8 (an independent codec) agrees with the spec vectors and the 256-code table here; then the
    op must agree with it on 2*10^5 random fp32 values (log-uniform magnitudes and raw random bit patterns)."""
    en = pytest.importorskip("en_dtypes")
    hif8 = en.hifloat8
    vec = np.array([v for v, _, _ in SPEC_VECTORS] + [v for v, _ in SPEC_RANDOM], F32)
    expected = [c for _, c, _ in SPEC_VECTORS] + [c for _, c in SPEC_RANDOM]
    if np.asarray(vec).astype(hif8).view(np.uint8).tolist() != expected:
        pytest.skip("en_dtypes.hifloat8 does not follow the spec vectors: not usable as an oracle")
    dec = np.arange(256, dtype=np.uint8).view(hif8).astype(np.float64)
    if not ((dec == SPEC_TABLE) | (np.isnan(dec) & np.isnan(SPEC_TABLE))).all():
        pytest.skip("en_dtypes.hifloat8 decode differs from §1.5: not usable as an oracle")
    rng = np.random.default_rng(2024)
    n = 100_000
    logu = np.exp(rng.uniform(np.log(2.0**-26), np.log(2.0**17), n)) * rng.choice([-1.0, 1.0], n)
    with np.errstate(invalid="ignore"):
        bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(F32)
    x = np.concatenate([logu.astype(F32), bits])
    with np.errstate(invalid="ignore", over="ignore"):
        oracle = x.astype(hif8).view(np.uint8)
    got = ops.hif8_encode(torch.from_numpy(x).to(device)).cpu().numpy()
    bad = np.nonzero(got != oracle)[0]
    assert bad.size == 0, f"{bad.size} differ, e.g. x={x[bad[:5]]!r} got={got[bad[:5]]} en_dtypes={oracle[bad[:5]]}"


# ---- encode: HR (hybrid) --------------------------------------------------------------------------------------


def test_encode_hybrid_spec_vectors(device):
    x = f32([v for v, _, _ in SPEC_HYBRID], device)
    assert_bitwise(ops.hif8_encode(x, rounding="hybrid"), u8([c for _, c, _ in SPEC_HYBRID]), "HR", inputs=x)
    assert_bitwise(ops.hif8_encode(x, rounding="ta"), u8([c for _, _, c in SPEC_HYBRID]), "TA", inputs=x)
    assert_bitwise(ops.hif8_encode(-x, rounding="hybrid"), u8([c | 0x80 for _, c, _ in SPEC_HYBRID]), "HR neg")


def test_encode_hybrid_random_against_reference(device):
    """HR on random fp32 values in every binade, plus bf16-widened ones (t14 = 0: always round up), NaN, overflow
    and flush, against the §1.3 SSR written in the testlib."""
    rng = np.random.default_rng(7)
    n = 3000
    x = (np.exp(rng.uniform(np.log(2.0**-24), np.log(2.0**16), n)) * rng.choice([-1.0, 1.0], n)).astype(F32)
    xb = torch.from_numpy(x[:500]).bfloat16().float().numpy()
    special = np.array([np.nan, np.inf, -np.inf, 40960.0, 2.0**-23, 1e-9, 0.0, -0.0, 2.0**-16, 2.0**-15], F32)
    x = np.concatenate([x, xb, special])
    ref = torch.from_numpy(ref_hif8_encode_hybrid(x))
    xt = torch.from_numpy(x).to(device)
    assert_bitwise(ops.hif8_encode(xt, rounding="hybrid"), ref, "HR random", inputs=xt)
    # the 3-bit zone |e| < 4 is TA
    zone = (np.abs(x) >= 0.125) & (np.abs(x) < 16)
    np.testing.assert_array_equal(ref.numpy()[zone], ref_hif8_encode(x[zone]))


def test_encode_hybrid_scaled(device):
    """HR applies to fp32(x * scale) (the binade of the product)."""
    x = f32([8.0, 112.0, 1.0, 50.15], device)
    got = ops.hif8_encode(x, scale=2.0, rounding="hybrid").cpu().tolist()
    assert got == ref_hif8_encode_hybrid(np.array([16.0, 224.0, 2.0, 100.3], F32)).tolist() == [0x41, 0x60, 0x10, 0x4A]
