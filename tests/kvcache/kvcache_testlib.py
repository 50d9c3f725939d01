"""Test library of the kvcache family (spec kv_cache_jensen.md §2, §3; math in cpp/include/difforge/kvcache.h).

Plain-PyTorch references written from the spec, never calling difforge:

* ``ref_quantize`` / ``ref_pack`` / ``ref_unpack`` / ``ref_dequantize``: the asymmetric min-max round-to-nearest-even
  group quantizer (§2.1 token-axis groups along D, §2.2 channel-axis groups of tokens), with the little-endian
  packing of §2.4 (channel c at bits [bits*c % 8, +bits) of byte bits*c // 8).
* ``jensen_bias``: the Jensen bias of §3.2 in float64 (exact sum of log(sinh x / x), taylor2, taylor4).
* ``ref_attention``: one float64 softmax over [quantized cache ; sink ; current] keys with GQA, the bias
  subtracted from the cached logits only.

Plus case builders (``make_cache``, ``make_attn_case``) and the caller of the op (``call_attention``).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
META_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
JENSEN_MODES = ("none", "taylor2", "taylor4", "exact")


def stable_seed(*parts) -> int:
    """A seed derived from test parameters, identical in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def max_code(bits: int) -> int:
    return (1 << bits) - 1


# ---------------------------------------------------------------------------------------------------------
# Quantizer references (spec §2)
# ---------------------------------------------------------------------------------------------------------


def _fp32_div(num: torch.Tensor, den) -> torch.Tensor:
    """Correctly rounded fp32 ``num / den`` (through fp64, which is innocuous for a single division), so that
    no library shortcut (multiplication by a rounded reciprocal) changes the last bit."""
    den = den.double() if isinstance(den, torch.Tensor) else float(den)
    return (num.double() / den).float()


def ref_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes ``[..., D]`` (values < 2**bits) -> uint8 ``[..., D*bits/8]``, little-endian along D."""
    D = codes.shape[-1]
    assert (D * bits) % 8 == 0
    per_byte = 8 // bits
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], D // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int64) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def ref_unpack(packed: torch.Tensor, bits: int, D: int | None = None) -> torch.Tensor:
    """uint8 ``[..., P]`` -> int64 codes ``[..., D]`` (D = P*8/bits): channel c = bits [bits*c % 8, +bits) of byte
    bits*c // 8 (written as an explicit per-channel loop, a second spelling of the packing)."""
    P = packed.shape[-1]
    D = P * 8 // bits if D is None else D
    p = packed.to(torch.int64)
    cols = []
    for c in range(D):
        byte, shift = (bits * c) // 8, (bits * c) % 8
        cols.append((p[..., byte] >> shift) & max_code(bits))
    return torch.stack(cols, dim=-1) if cols else p.new_zeros(*p.shape[:-1], 0)


def group_minmax(x: torch.Tensor, group_size: int, axis: str):
    """(mn, mx) in fp32: ``[B, L, H, D/g]`` (token) or ``[B, ceil(L/g), H, D]`` (channel)."""
    B, L, H, D = x.shape
    xf = x.float()
    if axis == "token":
        xg = xf.reshape(B, L, H, D // group_size, group_size)
        return xg.amin(-1), xg.amax(-1)
    assert axis == "channel"
    n = -(-L // group_size)
    mns, mxs = [], []
    for j in range(n):
        sl = xf[:, j * group_size : (j + 1) * group_size]
        mns.append(sl.amin(1))
        mxs.append(sl.amax(1))
    if n == 0:
        e = xf.new_zeros(B, 0, H, D)
        return e, e
    return torch.stack(mns, 1), torch.stack(mxs, 1)


def expand_meta(meta: torch.Tensor, group_size: int, axis: str, L: int) -> torch.Tensor:
    """Per-group metadata broadcast to one value per element ``[B, L, H, D]``."""
    if axis == "token":
        return meta.repeat_interleave(group_size, dim=-1)
    return meta.repeat_interleave(group_size, dim=1)[:, :L]


def step_exact(x: torch.Tensor, bits: int, group_size: int, axis: str) -> torch.Tensor:
    """fp32 step before the meta rounding: (max - min) / (2**bits - 1)."""
    mn, mx = group_minmax(x, group_size, axis)
    return _fp32_div(mx - mn, max_code(bits))


def ref_codes(x: torch.Tensor, bits: int, group_size: int, axis: str, meta_dtype: torch.dtype):
    """(unpacked int64 codes [B, L, H, D], step, zero) of the spec §2.1 quantizer."""
    L = x.shape[1]
    mn, mx = group_minmax(x, group_size, axis)
    step = _fp32_div(mx - mn, max_code(bits)).to(meta_dtype)
    zero = mn.to(meta_dtype)
    s = expand_meta(step, group_size, axis, L).float()
    z = expand_meta(zero, group_size, axis, L).float()
    pos = s > 0
    q = _fp32_div(x.float() - z, torch.where(pos, s, torch.ones_like(s)))
    codes = torch.where(pos, torch.clamp(torch.round(q), 0, max_code(bits)), torch.zeros_like(q))
    return codes.to(torch.int64), step, zero


def ref_quantize(x: torch.Tensor, bits: int, group_size: int, axis: str = "token",
                 meta_dtype: torch.dtype = torch.float16):  # fmt: skip
    """(packed uint8 codes [B, L, H, D*bits/8], step, zero) exactly as kv_quantize must produce them."""
    codes, step, zero = ref_codes(x, bits, group_size, axis, meta_dtype)
    return ref_pack(codes, bits), step, zero


def ref_dequantize(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                   axis: str = "token") -> torch.Tensor:  # fmt: skip
    """float64 ``zero + step * code`` ``[B, L, H, D]`` (exact for fp16/bf16 meta: every term fits in fp64)."""
    c = ref_unpack(codes, bits).double()
    L = c.shape[1]
    s = expand_meta(step, group_size, axis, L).double()
    z = expand_meta(zero, group_size, axis, L).double()
    return z + s * c


def roundtrip_bound(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                    axis: str) -> torch.Tensor:  # fmt: skip
    """Elementwise bound on |x - x^| (float64) derived in the test:

    unclamped codes: |x - x^| <= step~/2; a code clamped at the top (meta rounding moved the grid's top below
    the group max) adds |zero~ - min| + (2**bits - 1) * |step~ - step|; clamped at the bottom |zero~ - min|;
    step~ == 0 with a non-constant group (underflow in the meta dtype): all of (max - min) = qmax * step, covered
    by the same term. Plus fp32 rounding of the division and the dequantization (a few ulps of the magnitudes).
    """
    L = x.shape[1]
    mn, _ = group_minmax(x, group_size, axis)
    st_exact = step_exact(x, bits, group_size, axis).double()
    s = step.double()
    slack = (zero.double() - mn.double()).abs() + max_code(bits) * (s - st_exact).abs()
    e = lambda t: expand_meta(t, group_size, axis, L)  # noqa: E731
    mag = x.double().abs() + e(zero.double()).abs() + e(s) * max_code(bits)
    return e(s) / 2 + e(slack) + 4 * 2.0**-24 * mag


# ---------------------------------------------------------------------------------------------------------
# Jensen bias (spec §3.2) and the attention reference
# ---------------------------------------------------------------------------------------------------------


def log_sinhc(x: torch.Tensor) -> torch.Tensor:
    """float64 log(sinh(x) / x), 0 at x = 0, without overflow for large |x|."""
    x = x.double()
    a = x.abs()
    small = a < 1e-300
    safe = torch.where(small, torch.ones_like(a), a)
    direct = torch.log(torch.sinh(torch.clamp(safe, max=20.0)) / torch.clamp(safe, max=20.0))
    large = safe - torch.log(2 * safe) + torch.log1p(-torch.exp(-2 * safe))
    out = torch.where(safe > 20.0, large, direct)
    return torch.where(small, torch.zeros_like(out), out)


def bias_from_x(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The bias summed over the last dim (channels) of x = scale * q_c * step_c / 2 (float64)."""
    x = x.double()
    if mode == "none":
        return x.new_zeros(x.shape[:-1])
    if mode == "exact":
        return log_sinhc(x).sum(-1)
    t2 = (x**2 / 6).sum(-1)
    if mode == "taylor2":
        return t2
    if mode == "taylor4":
        return torch.clamp(t2 - (x**4 / 180).sum(-1), min=0.0)
    raise ValueError(mode)


def jensen_bias(q: torch.Tensor, step_k: torch.Tensor, scale: float, mode: str, group_size: int) -> torch.Tensor:
    """float64 bias ``[B, Hq, Lq, Lc]``: q ``[B, Lq, Hq, D]``, step_k ``[B, Lc, Hkv, D/g]`` (query head h reads
    kv head h // (Hq/Hkv))."""
    B, Lq, Hq, D = q.shape
    Lc, Hkv = step_k.shape[1], step_k.shape[2]
    st = step_k.double().repeat_interleave(group_size, dim=-1).repeat_interleave(Hq // Hkv, dim=2)  # [B,Lc,Hq,D]
    x = scale * q.double().permute(0, 2, 1, 3)[:, :, :, None, :] * st.permute(0, 2, 1, 3)[:, :, None, :, :] / 2
    return bias_from_x(x, mode)  # [B, Hq, Lq, Lc]


def ref_attention(q, k_cur, v_cur, cache_k_hat, cache_v_hat, step_k, sink_k=None, sink_v=None, scale=None,
                  jensen="none", lam=1.0, group_size=32, return_probs=False, bias_scale=None):  # fmt: skip
    """float64 attention of q ``[B, Lq, Hq, D]`` over [cache ; sink ; current] keys (``[B, L, Hkv, D]`` each,
    cache given dequantized), ``lam * b`` subtracted from the cached logits only. Returns ``[B, Lq, Hq, D]``
    (and the probabilities ``[B, Hq, Lq, Lk]`` with ``return_probs``). ``bias_scale``: a scale for the bias
    other than the logits' (only to show that a bias with the wrong scale would be detected)."""
    B, Lq, Hq, D = q.shape
    Hkv = k_cur.shape[2]
    assert Hq % Hkv == 0
    rep = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd = q.double()
    ks = [cache_k_hat.double()] + ([sink_k.double()] if sink_k is not None else []) + [k_cur.double()]
    vs = [cache_v_hat.double()] + ([sink_v.double()] if sink_v is not None else []) + [v_cur.double()]
    k = torch.cat(ks, 1).repeat_interleave(rep, dim=2)
    v = torch.cat(vs, 1).repeat_interleave(rep, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", qd, k) * scale  # [B, Hq, Lq, Lk]
    Lc = cache_k_hat.shape[1]
    if jensen != "none" and Lc > 0:
        b = jensen_bias(q, step_k, scale if bias_scale is None else bias_scale, jensen, group_size)
        logits = torch.cat([logits[..., :Lc] - lam * b, logits[..., Lc:]], dim=-1)
    p = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return (out, p) if return_probs else out


# ---------------------------------------------------------------------------------------------------------
# Cases and the caller of the op
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QCache:
    """A token-axis quantized K or V segment (built by the references, never by the op) and its fp64 value."""

    codes: torch.Tensor
    step: torch.Tensor
    zero: torch.Tensor
    hat: torch.Tensor  # float64 [B, Lc, Hkv, D]

    def to(self, device) -> "QCache":
        return QCache(self.codes.to(device), self.step.to(device), self.zero.to(device), self.hat.to(device))


def make_cache(x: torch.Tensor, bits: int, group_size: int, meta_dtype=torch.float16) -> QCache:
    codes, step, zero = ref_quantize(x, bits, group_size, "token", meta_dtype)
    return QCache(codes, step, zero, ref_dequantize(codes, step, zero, bits, group_size, "token"))


@dataclasses.dataclass
class AttnCase:
    q: torch.Tensor
    k_cur: torch.Tensor
    v_cur: torch.Tensor
    kc: QCache
    vc: QCache
    bits: int
    group_size: int
    k_sink: torch.Tensor | None = None
    v_sink: torch.Tensor | None = None
    scale: float | None = None

    def ref(self, jensen="none", lam=1.0, scale=None, **kw):
        scale = self.scale if scale is None else scale
        return ref_attention(self.q, self.k_cur, self.v_cur, self.kc.hat, self.vc.hat, self.kc.step, self.k_sink,
                             self.v_sink, scale, jensen, lam, self.group_size, **kw)  # fmt: skip

    def replace(self, **changes) -> "AttnCase":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        def d(t):
            return "None" if t is None else f"{tuple(t.shape)}{DTYPE_IDS.get(t.dtype, t.dtype)}"

        return (f"AttnCase(q={d(self.q)} k_cur={d(self.k_cur)} cache={d(self.kc.hat)} sink={d(self.k_sink)} "
                f"bits={self.bits} g={self.group_size} meta={self.kc.step.dtype} scale={self.scale})")  # fmt: skip


def make_attn_case(*, B=2, Lq=5, Lc=12, Ls=0, Lcur=4, Hq=4, Hkv=2, D=32, bits=2, group_size=16,
                   dtype=torch.float32, meta_dtype=torch.float16, q_gain=1.0, scale=None, seed=0,
                   device="cpu") -> AttnCase:  # fmt: skip
    """Random case drawn on the CPU (every device sees the same values): q ~ N(0, q_gain^2), keys and values
    N(0, 1); the cache is quantized by ``ref_quantize`` (token axis)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, gain=1.0):
        return (torch.randn(*shape, generator=gen) * gain).to(dtype)

    q = rnd(B, Lq, Hq, D, gain=q_gain)
    k_cur, v_cur = rnd(B, Lcur, Hkv, D), rnd(B, Lcur, Hkv, D)
    kc = make_cache(torch.randn(B, Lc, Hkv, D, generator=gen).to(dtype), bits, group_size, meta_dtype)
    vc = make_cache(torch.randn(B, Lc, Hkv, D, generator=gen).to(dtype), bits, group_size, meta_dtype)
    k_sink = v_sink = None
    if Ls:
        k_sink, v_sink = rnd(B, Ls, Hkv, D), rnd(B, Ls, Hkv, D)
    case = AttnCase(q, k_cur, v_cur, kc, vc, bits, group_size, k_sink, v_sink, scale)
    return case_to(case, device)


def case_to(case: AttnCase, device) -> AttnCase:
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return case.replace(q=mv(case.q), k_cur=mv(case.k_cur), v_cur=mv(case.v_cur), kc=case.kc.to(device),
                        vc=case.vc.to(device), k_sink=mv(case.k_sink), v_sink=mv(case.v_sink))  # fmt: skip


def call_attention(case: AttnCase, jensen="none", lam=1.0, scale=None, **overrides):
    """``difforge.ops.quantized_kv_attention`` on the case (``overrides`` replace keyword/positional tensors)."""
    import difforge

    c = case
    args = dict(q=c.q, k_cur=c.k_cur, v_cur=c.v_cur, k_codes=c.kc.codes, k_step=c.kc.step, k_zero=c.kc.zero,
                v_codes=c.vc.codes, v_step=c.vc.step, v_zero=c.vc.zero)  # fmt: skip
    kw = dict(bits=c.bits, group_size=c.group_size, k_sink=c.k_sink, v_sink=c.v_sink,
              scale=c.scale if scale is None else scale, jensen=jensen, jensen_lambda=lam)  # fmt: skip
    for name, value in overrides.items():
        (args if name in args else kw)[name] = value
    return difforge.ops.quantized_kv_attention(*args.values(), **kw)


def raw_attention_args(case: AttnCase, jensen="none", lam=1.0) -> tuple:
    """Positional arguments of ``torch.ops.difforge.quantized_kv_attention`` (the schema order)."""
    c = case
    return (c.q, c.k_cur, c.v_cur, c.kc.codes, c.kc.step, c.kc.zero, c.vc.codes, c.vc.step, c.vc.zero, c.bits,
            c.group_size, c.k_sink, c.v_sink, c.scale, jensen, float(lam))  # fmt: skip


def assert_close(got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0, msg: str = ""):
    """|got - ref| <= atol + rtol * |ref| elementwise (ref float64), with the worst element in the message."""
    g = got.detach().double().cpu()
    r = ref.detach().double().cpu()
    assert g.shape == r.shape, f"{msg}: shape {tuple(g.shape)} != {tuple(r.shape)}"
    assert torch.isfinite(g).all(), f"{msg}: non-finite output"
    err = (g - r).abs()
    lim = atol + rtol * r.abs()
    if not bool((err <= lim).all()):
        i = int(torch.argmax(err - lim))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), g.shape))
        raise AssertionError(f"{msg}: max |err| {err.max().item():.3g} (atol {atol:g}, rtol {rtol:g}); worst at "
                             f"{idx}: got {g[idx].item():.9g}, expected {r[idx].item():.9g}")  # fmt: skip
