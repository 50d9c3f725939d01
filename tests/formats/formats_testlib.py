"""Test library of the formats family (spec hif8_nvfp4.md §1-§4; math in cpp/include/difforge/{hif8,nvfp4,philox}.h).

Plain Python / numpy / PyTorch references written from the spec, never calling difforge:

HiF8 (§1)
* ``hif8_value(c)``: the §1.1 decode algorithm, one code at a time, in Python floats; ``HIF8_VALUES`` the 256
  values; ``SPEC_TABLE`` a literal transcription of the §1.5 table (the decode algorithm is checked against it).
* ``ref_hif8_encode(y, saturate)``: TA = nearest on the value set with ties away from zero, by a search in the
  sorted table of positive values (a virtual value 1.5 * 2^15 = 49152 stands for Inf, so the overflow threshold
  40960 is just another midpoint). ``ref_hif8_encode_bits``: the §1.2 bit-twiddling algorithm, a second spelling
  used to check the first. ``ref_hif8_encode_hybrid``: §1.3 HR (TA for |e| < 4, SSR elsewhere).
* ``ref_hif8_scale`` / ``ref_hif8_qdq``: the §2 recipe op order (amax -> s = fp32(target / amax) -> y = fp32(x s)).
* ``e4m3_shift(target)``: the §3 power-of-two shift k.

NVFP4 (§4)
* ``ref_nvfp4_quantize`` (torchao op order, 1 x 16 or 16 x 16 tile amax, RN or stochastic rounding),
  ``ref_nvfp4_dequantize`` (``e2m1 * (pts * sf)`` in fp32, one cast), nibble (un)packing, E2M1 tables.
* ``philox4x32_10``: a vectorised numpy Philox4x32-10 (Random123), ``philox_uniform24``: the 24-bit uniform of
  the element at a linear index.

Plus comparison helpers (``assert_bitwise``) and deterministic inputs (``rnd``, ``stable_seed``).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stable_seed(*parts) -> int:
    """A seed derived from test parameters, identical in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def rnd(shape, dtype=torch.float32, seed=0, gain=1.0, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * gain).to(dtype).to(device)


def assert_bitwise(got: torch.Tensor, ref: torch.Tensor, name: str, ctx: str = "", inputs: torch.Tensor | None = None):
    """dtype, shape and every element equal (NaN == NaN; for float8 / integer dtypes the bytes are compared)."""
    g = got.detach().cpu()
    ref = ref.detach().cpu()
    assert g.dtype == ref.dtype, f"{name}: dtype {g.dtype}, expected {ref.dtype} {ctx}"
    assert g.shape == ref.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(ref.shape)} {ctx}"
    if g.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        g, ref = g.view(torch.uint8), ref.view(torch.uint8)
    if g.is_floating_point():
        same = (g == ref) | (torch.isnan(g) & torch.isnan(ref))
        # +0 vs -0 compare equal above: compare sign bits too
        same &= torch.signbit(g) == torch.signbit(ref)
    else:
        same = g == ref
    if not bool(same.all()):
        bad = (~same).nonzero()
        idx = tuple(int(v) for v in bad[0])
        msg = (f"{name}: {bad.shape[0]} of {g.numel()} elements differ {ctx}; first at {idx}: got {g[idx].item()!r}, "
               f"expected {ref[idx].item()!r}")  # fmt: skip
        if inputs is not None:
            msg += f" (input {inputs.detach().cpu().reshape(g.shape)[idx].item()!r})"
        raise AssertionError(msg)


# =========================================================================================================
# HiF8 (spec §1)
# =========================================================================================================


def hif8_value(c: int) -> float:
    """§1.1 decode, literally (Python floats; every HiF8 value is exact in a double)."""
    if c == 0x00:
        return 0.0
    if c == 0x80:
        return math.nan
    if c == 0x6F:
        return math.inf
    if c == 0xEF:
        return -math.inf
    sg = -1.0 if c & 0x80 else 1.0
    p = c & 0x7F
    if p < 0x08:
        return sg * 2.0 ** (p - 23)
    D, m = (4, 1) if p >= 0x60 else (3, 2) if p >= 0x40 else (2, 3) if p >= 0x20 else (1, 3) if p >= 0x10 else (0, 3)
    f = p & (2**m - 1)
    e = 0
    if D > 0:
        x = (p >> m) & (2**D - 1)
        mag = 2 ** (D - 1) + (x & (2 ** (D - 1) - 1))
        e = -mag if (x >> (D - 1)) else mag
    return sg * 2.0**e * (1 + f / 2**m)


HIF8_VALUES = np.array([hif8_value(c) for c in range(256)], dtype=np.float64)

# §1.5, transcribed literally (positive half; 0x6F = +Inf). value(c) = -value(c - 0x80) for c > 0x80, c != 0xEF.
_P = 2.0
SPEC_TABLE_POSITIVE = [
    0, _P**-22, _P**-21, _P**-20, _P**-19, _P**-18, _P**-17, _P**-16,
    1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
    2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75,
    0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375,
    4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5,
    8, 9, 10, 11, 12, 13, 14, 15,
    0.25, 0.28125, 0.3125, 0.34375, 0.375, 0.40625, 0.4375, 0.46875,
    0.125, 0.140625, 0.15625, 0.171875, 0.1875, 0.203125, 0.21875, 0.234375,
    16, 20, 24, 28, 32, 40, 48, 56,
    64, 80, 96, 112, 128, 160, 192, 224,
    0.0625, 0.078125, 0.09375, 0.109375, 0.03125, 0.0390625, 0.046875, 0.0546875,
    0.015625, 0.01953125, 0.0234375, 0.02734375, 0.0078125, 0.009765625, 0.01171875, 0.013671875,
    256, 384, 512, 768, 1024, 1536, 2048, 3072,
    4096, 6144, 8192, 12288, 16384, 24576, 32768, math.inf,
    _P**-8, 1.5 * _P**-8, _P**-9, 1.5 * _P**-9, _P**-10, 1.5 * _P**-10, _P**-11, 1.5 * _P**-11,
    _P**-12, 1.5 * _P**-12, _P**-13, 1.5 * _P**-13, _P**-14, 1.5 * _P**-14, _P**-15, 1.5 * _P**-15,
]  # fmt: skip
assert len(SPEC_TABLE_POSITIVE) == 128


def spec_table_value(c: int) -> float:
    if c == 0x80:
        return math.nan
    if c == 0xEF:
        return -math.inf
    if c > 0x80:
        return -SPEC_TABLE_POSITIVE[c - 0x80]
    return float(SPEC_TABLE_POSITIVE[c])


SPEC_TABLE = np.array([spec_table_value(c) for c in range(256)], dtype=np.float64)

# Sorted positive finite values (0 included) with their codes, plus the virtual value 49152 = 1.5 * 2^15 for Inf.
HIF8_INF_STANDIN = 49152.0
_pos = sorted((HIF8_VALUES[c], c) for c in range(0x80) if c != 0x6F)
_SORTED_VALUES = np.array([v for v, _ in _pos] + [HIF8_INF_STANDIN], dtype=np.float64)
_SORTED_CODES = np.array([c for _, c in _pos] + [0x6F], dtype=np.uint8)
assert np.all(np.diff(_SORTED_VALUES) > 0) and len(_pos) == 127  # 126 positive finite values + 0

# Positive finite HiF8 values in increasing order (0 first), and the midpoints between neighbours (incl. 40960).
HIF8_POSITIVE_SORTED = _SORTED_VALUES[:-1].copy()
HIF8_MIDPOINTS = (_SORTED_VALUES[:-1] + _SORTED_VALUES[1:]) / 2


def ref_hif8_encode(y, saturate: bool = False) -> np.ndarray:
    """TA encode of fp32 ``y`` (numpy/torch array, already scaled): nearest on the value set, ties away from zero,
    NaN -> 0x80, |y| >= 40960 -> Inf (saturate: 32768), -0 and |y| < 2^-23 -> 0x00."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().float().numpy()
    y = np.asarray(y, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        a = np.abs(y).astype(np.float64)
    nan = np.isnan(a)
    a = np.where(nan, 0.0, a)
    i = np.searchsorted(_SORTED_VALUES, a, side="right") - 1  # _SORTED_VALUES[i] <= a
    i_hi = np.minimum(i + 1, len(_SORTED_VALUES) - 1)
    mid = (_SORTED_VALUES[i] + _SORTED_VALUES[i_hi]) / 2  # exact in float64
    up = (i < len(_SORTED_VALUES) - 1) & (a >= mid)
    code = _SORTED_CODES[np.where(up, i_hi, i)].astype(np.uint8)
    if saturate:
        code = np.where(code == 0x6F, np.uint8(0x6E), code)
    neg = np.signbit(y) & (code != 0)
    code = np.where(neg, code | np.uint8(0x80), code)
    return np.where(nan, np.uint8(0x80), code).astype(np.uint8)


def _mb(e: int) -> int:
    a = abs(e)
    return 3 if a <= 3 else 2 if a <= 7 else 1 if a <= 15 else 0


def _code_of_magnitude(v: float) -> int:
    """The positive code of a HiF8 magnitude (49152 = the Inf stand-in -> 0x6F)."""
    j = int(np.searchsorted(_SORTED_VALUES, v))
    assert _SORTED_VALUES[j] == v, v
    return int(_SORTED_CODES[j])


def ref_hif8_encode_bits(y, saturate: bool = False) -> np.ndarray:
    """The §1.2 TA algorithm on the fp32 bit pattern (scalar loop: a second, independent spelling of TA)."""
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    out = np.empty(y.shape, np.uint8)
    for n, x in enumerate(y):
        if np.isnan(x):
            out[n] = 0x80
            continue
        s = 0x80 if np.signbit(x) else 0
        ax = abs(float(x))
        if ax >= 40960.0:
            out[n] = s | (0x6E if saturate else 0x6F)
            continue
        if ax < 2.0**-23:
            out[n] = 0
            continue
        a = int(np.float32(ax).view(np.uint32))
        e = (a >> 23) - 127
        if e == -23:
            out[n] = s | 0x01
            continue
        m = _mb(e)
        u = (a + (1 << (22 - m))) & ~((1 << (23 - m)) - 1)
        e2 = (u >> 23) - 127
        f = (u >> (23 - m)) & (2**m - 1)
        v = 2.0**e2 if e2 <= -16 else 2.0**e2 * (1 + f / 2 ** _mb(e2))
        out[n] = s | _code_of_magnitude(v)
    return out


def ref_hif8_encode_hybrid(y) -> np.ndarray:
    """§1.3 HR: TA where |e| < 4 (e = floor(log2 |y|) of the fp32 input), SSR elsewhere (scalar loop)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().float().numpy()
    y = np.asarray(y, dtype=np.float32)
    flat = y.reshape(-1)
    ta = ref_hif8_encode(flat)
    out = ta.copy()
    for n, x in enumerate(flat):
        ax = abs(float(x))
        if np.isnan(x) or ax >= 40960.0 or ax < 2.0**-23:
            continue  # NaN / overflow / flush as TA
        a = int(np.float32(ax).view(np.uint32))
        e = (a >> 23) - 127
        if abs(e) < 4:
            continue
        F = a & 0x7FFFFF
        if e == -23:
            h, m = 0, 0
            f14, t14 = (F >> 10) + 2**13, F & 0x3FFF
        else:
            m = _mb(e)
            h = F >> (23 - m)
            R = F - (h << (23 - m))
            f14, t14 = R >> (9 - m), R & 0x3FFF
        if f14 >= t14:
            h += 1
            if h == 2**m:
                e, h = e + 1, 0
        if e <= -23:
            code = 0
        else:
            v = 2.0**e if e <= -16 else 2.0**e * (1 + h / 2**m)
            code = _code_of_magnitude(v)  # (15, 1) = 49152 -> 0x6F (Inf)
        out[n] = (0x80 if (np.signbit(x) and code) else 0) | code
    return out.reshape(y.shape)


def ref_hif8_decode(codes, dtype=torch.float32, scale=None) -> torch.Tensor:
    """decode(codes) [/ scale] in fp32, cast once to ``dtype``."""
    if isinstance(codes, torch.Tensor):
        c = codes.detach().cpu().to(torch.int64)
    else:
        c = torch.as_tensor(codes, dtype=torch.int64)
    v = torch.from_numpy(HIF8_VALUES.astype(np.float32))[c]
    if scale is not None:
        v = v / torch.as_tensor(scale, dtype=torch.float32).reshape(())
    return v.to(dtype)


def ref_hif8_scale(x: torch.Tensor, target: float) -> torch.Tensor:
    """§2: s = fp32(target / amax|x|) (1 if amax is 0 or not finite); fp32 0-dim."""
    amax = x.detach().cpu().float().abs().amax() if x.numel() else torch.tensor(0.0)
    if not bool(torch.isfinite(amax)) or float(amax) == 0.0:
        return torch.tensor(1.0)
    return torch.tensor(target, dtype=torch.float32) / amax


def ref_hif8_quantize(x: torch.Tensor, target: float, saturate: bool = False, rounding: str = "ta"):
    """(codes uint8 torch, s fp32 0-dim) in the §2 op order."""
    s = ref_hif8_scale(x, target)
    y = x.detach().cpu().float() * s
    enc = ref_hif8_encode(y, saturate) if rounding == "ta" else ref_hif8_encode_hybrid(y)
    return torch.from_numpy(np.ascontiguousarray(enc)).reshape(x.shape), s


def ref_hif8_qdq(x: torch.Tensor, target: float = 15.0, dtype=None, rounding: str = "ta") -> torch.Tensor:
    """decode(encode(x s)) / s (fp32 division), cast once to ``dtype`` (default x's)."""
    codes, s = ref_hif8_quantize(x, target, rounding=rounding)
    return ref_hif8_decode(codes, torch.float32, s).to(dtype or x.dtype)


def e4m3_shift(target: float) -> int:
    """§3: the largest k with target * 2^k <= 448."""
    k = 0
    while target * 2.0 ** (k + 1) <= 448.0:
        k += 1
    while target * 2.0**k > 448.0:
        k -= 1
    return k


# =========================================================================================================
# NVFP4 (spec §4)
# =========================================================================================================

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_TABLE = torch.tensor([*E2M1_MAGNITUDES, *(-v for v in E2M1_MAGNITUDES)], dtype=torch.float32)  # code -> value
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MAX = 448.0


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_TABLE[codes.to(torch.int64)]


def ref_e2m1_rne(y: torch.Tensor) -> torch.Tensor:
    """int64 codes of fp32 ``y`` in [-6, 6]: nearest magnitude, ties to the even code; sign bit kept (-0 -> 0x8)."""
    a = y.abs().double()[..., None]
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    d = (a - mags).abs()
    best = d == d.amin(-1, keepdim=True)
    even = (torch.arange(8) % 2 == 0).to(torch.int64)
    mag = torch.argmax(best.to(torch.int64) * (1 + even), dim=-1)  # among tied codes, the even one
    return mag + 8 * torch.signbit(y).to(torch.int64)


def ref_pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int64)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def ref_unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def block_amax(x2: torch.Tensor, block_2d: bool = False) -> torch.Tensor:
    """fp32 amax of each 1 x 16 block of x2 [M, K]; block_2d: of its 16 x 16 tile (rows 16i .. 16i + 15, the last
    tile possibly shorter), broadcast back to every row of the tile."""
    M, K = x2.shape
    a = x2.float().abs().reshape(M, K // 16, 16)
    # NaN-propagating max (torch.amax propagates NaN)
    amax = a.amax(-1)
    if not block_2d or M == 0:
        return amax
    out = torch.empty_like(amax)
    for i in range(0, M, 16):
        out[i : i + 16] = amax[i : i + 16].amax(0, keepdim=True)
    return out


def ref_block_scales(amax_b: torch.Tensor, pts: torch.Tensor | None):
    """(scale bytes float8_e4m3fn, reciprocal r fp32) in torchao's op order; a non-finite block amax -> 0x7F."""
    bs = amax_b / 6.0
    if pts is None:
        sf8 = torch.clamp(bs, min=E4M3_MIN_NORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
        r = 1.0 / sf8.float()
    else:
        p = pts.float().reshape(())
        sf8 = torch.clamp(bs / p, min=E4M3_MIN_NORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
        r = (1.0 / p) / sf8.float()
    bad = ~torch.isfinite(amax_b)
    if bool(bad.any()):
        sf8 = torch.where(bad, torch.full_like(sf8.view(torch.uint8), 0x7F), sf8.view(torch.uint8)).view(
            torch.float8_e4m3fn
        )
    return sf8, r


def ref_sr_magnitude(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Stochastic rounding of magnitudes a (fp32, in [0, 6]) with uniforms u: lo <= a < hi adjacent E2M1 values,
    p = (a - lo) / (hi - lo) in fp32, up iff u < p; a >= 6 -> 6."""
    a = np.asarray(a, np.float32)
    mags = np.array(E2M1_MAGNITUDES, np.float32)
    lo = np.clip(np.searchsorted(mags, a, side="right") - 1, 0, 6)
    lo_v, hi_v = mags[lo], mags[np.minimum(lo + 1, 7)]
    p = ((a - lo_v) / (hi_v - lo_v)).astype(np.float32)
    code = np.where(u < p, lo + 1, lo)
    return np.where(a >= 6.0, 7, code)


def ref_nvfp4_quantize(x: torch.Tensor, pts: torch.Tensor | None = None, block_2d: bool = False,
                       stochastic: bool = False, seed: int = 0, offset: int = 0):  # fmt: skip
    """(block scales float8_e4m3fn [..., K/16], packed uint8 [..., K/2]) of x [..., K] (fp32 after widening)."""
    shape = x.shape
    K = shape[-1]
    x2 = x.detach().cpu().float().reshape(-1, K)
    M = x2.shape[0]
    amax_b = block_amax(x2, block_2d)
    sf8, r = ref_block_scales(amax_b, pts)
    y = torch.clamp(x2.reshape(M, K // 16, 16) * r[..., None], -6.0, 6.0).reshape(M, K)
    if stochastic:
        idx = np.arange(M * K, dtype=np.uint64)
        u = philox_uniform24(seed, offset, idx).reshape(M, K)
        mag = torch.from_numpy(ref_sr_magnitude(y.abs().numpy(), u).astype(np.int64))
        codes = mag + 8 * torch.signbit(y).to(torch.int64)
    else:
        codes = ref_e2m1_rne(y)
    packed = ref_pack_nibbles(codes)
    return sf8.reshape(*shape[:-1], K // 16), packed.reshape(*shape[:-1], K // 2)


def ref_nvfp4_dequantize(scales: torch.Tensor, packed: torch.Tensor, pts: torch.Tensor | None = None,
                         dtype=torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """torchao NVFP4Tensor.dequantize order: e2m1(code) * (pts * sf) in fp32 (one-level: * sf), one cast."""
    codes = ref_unpack_nibbles(packed.detach().cpu())
    K = codes.shape[-1]
    sf = scales.detach().cpu().float()
    if pts is not None:
        sf = pts.detach().cpu().float().reshape(()) * sf
    vals = e2m1_value(codes).reshape(*codes.shape[:-1], K // 16, 16) * sf[..., None]
    return vals.reshape(codes.shape).to(dtype)


def nvfp4_pts(x: torch.Tensor) -> torch.Tensor:
    """amax / 2688 in fp32 (torchao's per_tensor_amax_to_scale); 1.0 when amax is 0."""
    amax = x.detach().cpu().float().abs().amax()
    return amax / 2688.0 if float(amax) > 0 else torch.tensor(1.0)


# =========================================================================================================
# Philox4x32-10 (Random123)
# =========================================================================================================

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)


def philox4x32_10(ctr, key):
    """Philox4x32 with 10 rounds on counters ``ctr = (c0, c1, c2, c3)`` and key ``(k0, k1)`` (each an int or a numpy
    array of 32-bit values); returns the four output words as uint64 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key)
    for rnd_i in range(10):
        if rnd_i:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        p0, p1 = _PHILOX_M0 * c0, _PHILOX_M1 * c2  # < 2^64: exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform24(seed: int, offset: int, index) -> np.ndarray:
    """u = (word0 >> 8) * 2^-24 (fp32) of Philox(counter = (index lo, index hi, offset lo, offset hi),
    key = (seed lo, seed hi))."""
    idx = np.asarray(index, dtype=np.uint64)
    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    ctr = (idx & _MASK32, idx >> np.uint64(32), np.full_like(idx, offset & 0xFFFFFFFF), np.full_like(idx, offset >> 32))
    w0 = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))[0]
    return ((w0 >> np.uint64(8)).astype(np.float64) * 2.0**-24).astype(np.float32)


# =========================================================================================================
# Linear references
# =========================================================================================================


def sylvester_h16() -> torch.Tensor:
    """H16[i, j] = (-1)^popcount(i & j) (Sylvester's construction, written elementwise)."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(16)] for i in range(16)])


def abs_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a| @ |b|.T in float64: the scale of the rounding error of a @ b.T."""
    return a.double().abs() @ b.double().abs().T
