"""quantized_kv_attention against the float64 reference of kvcache_testlib (spec §3, §4, §5.2, §5.3, §5.7, §6):
every Jensen mode, sinks, GQA, empty cache, Delta = 0 through the explicit bias path, custom scale, lambda,
non-contiguous cache views, segment invariance, INT8 ~ unquantized.

The caches are built by the reference quantizer (never by the op), and every test where the bias could be
ignored also asserts that the reference with and without the bias differ by far more than the tolerance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvcache_testlib import (
    DTYPE_IDS,
    JENSEN_MODES,
    QCache,
    assert_close,
    call_attention,
    case_to,
    make_attn_case,
    make_cache,
    ref_attention,
    ref_dequantize,
    ref_pack,
    stable_seed,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2, torch.float16: 1e-2}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BIASED = ("taylor2", "taylor4", "exact")
Q_GAIN = 3.0  # large enough that the bias (mean ~0.55, x up to ~1.8) moves outputs by ~0.6


def check(case, jensen="none", lam=1.0, scale=None, msg="", **overrides):
    out = call_attention(case, jensen, lam, scale, **overrides)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape and out.device == case.q.device
    ref = case.ref(jensen, lam, scale)
    dt = case.q.dtype
    assert_close(out, ref, ATOL[dt], RTOL[dt], f"{case!r} jensen={jensen} lam={lam} scale={scale} {msg}")
    return out, ref


def assert_differs(a, b, min_diff, what):
    d = (a.double().cpu() - b.double().cpu()).abs().max().item()
    assert d > min_diff, f"test too weak: {what} differ by only {d:.3g} (need > {min_diff:.3g})"


# ---- every mode, with and without sinks, every dtype ---------------------------------------------------------


@pytest.mark.parametrize("sink", [False, True], ids=["no_sink", "sink"])
@pytest.mark.parametrize("jensen", JENSEN_MODES)
@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_matches_reference(device, dtype, jensen, sink):
    case = make_attn_case(B=2, Lq=5, Lc=12, Ls=3 if sink else 0, Lcur=4, Hq=4, Hkv=2, D=32, bits=2, group_size=16,
                          dtype=dtype, q_gain=Q_GAIN, seed=stable_seed("main", dtype, jensen, sink), device=device)
    out, ref = check(case, jensen)
    if jensen != "none":
        assert_differs(ref, case.ref("none"), 10 * ATOL[dtype], f"ref {jensen} and ref none")
    if dtype == torch.float32:  # fp32 resolves the differences between the modes themselves
        for other in JENSEN_MODES:
            if other != jensen:
                assert_differs(ref, case.ref(other), 10 * ATOL[dtype], f"ref {jensen} and ref {other}")


@pytest.mark.parametrize("jensen", JENSEN_MODES)
def test_gqa_8_2(device, jensen):
    """Query head h reads kv head h // 4 (spec §5.7)."""
    case = make_attn_case(B=1, Lq=6, Lc=10, Ls=2, Lcur=3, Hq=8, Hkv=2, D=32, bits=2, group_size=16, q_gain=Q_GAIN,
                          seed=stable_seed("gqa", jensen), device=device)  # fmt: skip
    out, ref = check(case, jensen)
    # the other plausible mapping (h % Hkv: kv heads tiled instead of grouped) would be detected
    tile = lambda t: t.repeat(1, 1, 4, 1)  # noqa: E731
    c = case
    tiled = ref_attention(c.q, tile(c.k_cur), tile(c.v_cur), tile(c.kc.hat), tile(c.vc.hat), tile(c.kc.step),
                          tile(c.k_sink), tile(c.v_sink), None, jensen, 1.0, 16)  # fmt: skip
    assert_differs(ref, tiled, 10 * ATOL[torch.float32], "grouped (h // 4) and tiled (h % 2) head mappings")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bits(device, bits):
    case = make_attn_case(B=2, Lq=4, Lc=9, Ls=2, Lcur=3, Hq=2, Hkv=1, D=32, bits=bits, group_size=32,
                          q_gain=Q_GAIN * 2 ** (bits // 2 - 1), seed=stable_seed("bits", bits), device=device)
    for jensen in ("none", "exact"):
        check(case, jensen)


@pytest.mark.parametrize("meta", [torch.bfloat16, torch.float32], ids=["meta_bf16", "meta_fp32"])
def test_meta_dtypes(device, meta):
    case = make_attn_case(Ls=2, meta_dtype=meta, q_gain=Q_GAIN, seed=stable_seed("meta", meta), device=device)
    for jensen in ("none", "taylor4"):
        check(case, jensen)


def test_long_segments(device):
    """Lengths past any tile size (64/128) and not multiples of it."""
    case = make_attn_case(B=1, Lq=70, Lc=300, Ls=33, Lcur=70, Hq=2, Hkv=1, D=64, bits=2, group_size=32,
                          q_gain=2.0, seed=9, device=device)  # fmt: skip
    for jensen in ("none", "exact", "taylor2"):
        check(case, jensen)


@pytest.mark.parametrize("D,g", [(64, 32), (128, 32), (128, 128), (16, 8)])
def test_head_dims_and_groups(device, D, g):
    case = make_attn_case(B=1, Lq=3, Lc=7, Ls=1, Lcur=2, Hq=2, Hkv=2, D=D, bits=4, group_size=g,
                          q_gain=4 * math.sqrt(D / 32), seed=stable_seed("dg", D, g), device=device)
    for jensen in ("none", "taylor2", "exact"):
        check(case, jensen)


# ---- empty cache and Delta = 0 -----------------------------------------------------------------------------


def sdpa(q, k, v, scale=None):
    """torch SDPA (fp64) on [B, L, H, D] layouts with GQA by repeat_interleave."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.double().transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("sink", [False, True], ids=["no_sink", "sink"])
def test_empty_cache(device, sink):
    """Lc = 0: plain attention over sink + current, for every mode."""
    case = make_attn_case(B=2, Lq=5, Lc=0, Ls=3 if sink else 0, Lcur=4, Hq=4, Hkv=2, q_gain=Q_GAIN, seed=4,
                          device=device)  # fmt: skip
    assert case.kc.codes.shape == (2, 0, 2, 8)
    k = torch.cat([case.k_sink, case.k_cur], 1) if sink else case.k_cur
    v = torch.cat([case.v_sink, case.v_cur], 1) if sink else case.v_cur
    expected = sdpa(case.q, k, v)
    for jensen in JENSEN_MODES:
        out = call_attention(case, jensen)
        assert_close(out, expected, 1e-5, 1e-5, f"empty cache, jensen={jensen}")


def constant_group_cache(B, Lc, Hkv, D, g, seed, device):
    """Keys constant inside every group (max == min): ref_quantize gives step 0 and codes 0."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, Lc, Hkv, D // g, 1, generator=gen) * 2).expand(B, Lc, Hkv, D // g, g).reshape(B, Lc, Hkv, D)
    return make_cache(x, 2, g)


def test_zero_step_constant_groups(device):
    """Delta = 0 in every cached group: every mode runs its explicit bias path with Delta = 0 and must give the
    unbiased answer (spec §5.2)."""
    case = make_attn_case(B=2, Lq=5, Lc=10, Ls=2, Lcur=3, Hq=4, Hkv=2, D=32, group_size=16, q_gain=Q_GAIN, seed=5)
    kc = constant_group_cache(2, 10, 2, 32, 16, 6, "cpu")
    assert (kc.step == 0).all() and (kc.codes == 0).all()
    case = case.replace(kc=kc)
    case = case_to(case, device)
    ref = case.ref("none")
    for jensen in JENSEN_MODES:
        out = call_attention(case, jensen, lam=3.0)
        assert_close(out, ref, 1e-5, 1e-5, f"step 0, jensen={jensen}")


def test_zero_step_with_nonzero_codes(device):
    """step == 0 is legal with arbitrary codes: x^ == zero, and the bias is 0."""
    case = make_attn_case(B=1, Lq=4, Lc=8, Ls=0, Lcur=3, Hq=2, Hkv=1, D=32, group_size=16, q_gain=Q_GAIN, seed=8)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, case.kc.codes.shape, generator=gen, dtype=torch.uint8)
    step = torch.zeros_like(case.kc.step)
    zero = case.kc.zero
    hat = ref_dequantize(codes, step, zero, 2, 16)
    assert torch.equal(hat, zero.double().repeat_interleave(16, -1))
    case = case_to(case.replace(kc=QCache(codes, step, zero, hat)), device)
    ref = case.ref("none")
    for jensen in JENSEN_MODES:
        assert_close(call_attention(case, jensen), ref, 1e-5, 1e-5, f"step 0 with codes, jensen={jensen}")


# ---- scale and lambda --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jensen", BIASED)
def test_custom_scale(device, jensen):
    """The bias uses the given scale, not 1/sqrt(D) (spec §6)."""
    case = make_attn_case(Ls=2, q_gain=Q_GAIN, seed=stable_seed("scale", jensen), device=device)
    s = 0.37
    out, ref = check(case, jensen, scale=s)
    wrong = ref_attention(case.q, case.k_cur, case.v_cur, case.kc.hat, case.vc.hat, case.kc.step, case.k_sink,
                          case.v_sink, s, jensen, 1.0, case.group_size, bias_scale=1 / math.sqrt(32))  # fmt: skip
    assert_differs(ref, wrong, 10 * ATOL[torch.float32], "bias with the given scale and with 1/sqrt(D)")


@pytest.mark.parametrize("jensen", BIASED)
def test_lambda(device, jensen):
    case = make_attn_case(Ls=2, q_gain=Q_GAIN, seed=stable_seed("lambda", jensen), device=device)
    for lam in (2.0, 0.5, 0.0):
        out, ref = check(case, jensen, lam=lam)
        if lam:
            assert_differs(ref, case.ref(jensen, 1.0), 10 * ATOL[torch.float32], f"lambda {lam} and lambda 1")
        else:
            assert_close(out, case.ref("none"), 1e-5, 1e-5, "lambda 0 == no bias")


# ---- layouts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jensen", ["none", "exact"])
def test_noncontiguous_cache_view(device, jensen):
    """The filled part of a larger cache buffer (codes_buf[:, :n], same for step / zero), read in place."""
    B, Lmax, n, Hkv, D, g = 2, 20, 11, 2, 32, 16
    gen = torch.Generator().manual_seed(12)
    k_all = make_cache(torch.randn(B, Lmax, Hkv, D, generator=gen), 2, g)
    v_all = make_cache(torch.randn(B, Lmax, Hkv, D, generator=gen), 2, g)
    base = make_attn_case(B=B, Lq=5, Lc=n, Ls=2, Lcur=4, Hq=4, Hkv=Hkv, D=D, group_size=g, q_gain=Q_GAIN, seed=13,
                          device=device)  # fmt: skip

    def view(c: QCache) -> QCache:
        return QCache(*(t.to(device)[:, :n] for t in (c.codes, c.step, c.zero, c.hat)))

    case = base.replace(kc=view(k_all), vc=view(v_all))
    assert not case.kc.codes.is_contiguous() and not case.vc.step.is_contiguous()
    out, ref = check(case, jensen, msg="cache views")
    contig = case.replace(kc=QCache(*(t.contiguous() for t in (case.kc.codes, case.kc.step, case.kc.zero,
                                                               case.kc.hat))),
                          vc=QCache(*(t.contiguous() for t in (case.vc.codes, case.vc.step, case.vc.zero,
                                                               case.vc.hat))))  # fmt: skip
    out_c = call_attention(contig, jensen)
    assert_close(out, out_c.double(), 1e-6, 1e-6, "view vs contiguous cache")


def test_noncontiguous_q_and_current(device):
    """q and k_cur / v_cur as views of fused projections ([B, L, Hq + 2 Hkv, D]); sinks head-major."""
    case = make_attn_case(B=2, Lq=4, Lc=6, Ls=3, Lcur=4, Hq=4, Hkv=2, q_gain=Q_GAIN, seed=14)
    fused = torch.cat([case.q, case.k_cur, case.v_cur], dim=2).to(device)
    q, k_cur, v_cur = fused.split([4, 2, 2], dim=2)
    ks = case.k_sink.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    vs = case.v_sink.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    assert not q.is_contiguous() and not k_cur.is_contiguous() and not ks.is_contiguous()
    dev_case = case_to(case, device).replace(q=q, k_cur=k_cur, v_cur=v_cur, k_sink=ks, v_sink=vs)
    check(dev_case, "exact", msg="strided q / current / sink")


# ---- invariances -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jensen", ["none", "exact", "taylor2"])
def test_sink_current_split_invariance(device, jensen):
    """The bias never touches sink or current keys: splitting the unquantized keys differently between the two
    segments (or swapping their order) changes nothing (spec §5.3)."""
    case = make_attn_case(B=2, Lq=5, Lc=10, Ls=0, Lcur=9, Hq=4, Hkv=2, q_gain=Q_GAIN, seed=stable_seed("split", jensen),
                          device=device)  # fmt: skip
    K, V = case.k_cur, case.v_cur
    ref = case.ref(jensen)
    outs = {"all current": call_attention(case, jensen)}
    for a in (1, 4, 8):
        outs[f"sink {a}"] = call_attention(case.replace(k_sink=K[:, :a], v_sink=V[:, :a], k_cur=K[:, a:],
                                                        v_cur=V[:, a:]), jensen)  # fmt: skip
        outs[f"sink last {a}"] = call_attention(case.replace(k_sink=K[:, a:], v_sink=V[:, a:], k_cur=K[:, :a],
                                                             v_cur=V[:, :a]), jensen)  # fmt: skip
    for name, out in outs.items():
        assert_close(out, ref, 1e-5, 1e-5, f"{name}, jensen={jensen}")
    # if the bias were applied to sink/current keys too, the outputs would move by far more than the tolerance
    wrong = ref_attention(case.q, K[:, :0], V[:, :0], torch.cat([case.kc.hat, K.double()], 1),
                          torch.cat([case.vc.hat, V.double()], 1), torch.cat([case.kc.step, case.kc.step[:, :9]], 1),
                          None, None, None, jensen, 1.0, 16) if jensen != "none" else None  # fmt: skip
    if wrong is not None:
        assert_differs(ref, wrong, 1e-3, "bias on the quantized cache only and on current keys too")


def test_cache_token_order_invariance(device):
    """Permuting cached tokens (with their codes and metadata) changes nothing (spec §5.7: slots)."""
    case = make_attn_case(B=1, Lq=4, Lc=12, Ls=2, Lcur=3, Hq=2, Hkv=1, q_gain=Q_GAIN, seed=15, device=device)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    p = lambda c: QCache(*(t[:, perm.to(t.device)] for t in (c.codes, c.step, c.zero, c.hat)))  # noqa: E731
    out1 = call_attention(case, "exact")
    out2 = call_attention(case.replace(kc=p(case.kc), vc=p(case.vc)), "exact")
    assert_close(out2, out1.double(), 2e-6, 2e-6, "permuted cache")


def test_int8_cache_close_to_unquantized(device):
    """An INT8 cache (g = 32) gives nearly the bf16 attention on the original keys and values."""
    gen = torch.Generator().manual_seed(16)
    B, Lq, Lc, Lcur, H, D = 1, 8, 40, 8, 2, 64
    q = torch.randn(B, Lq, H, D, generator=gen).bfloat16()
    k = torch.randn(B, Lc, H, D, generator=gen).bfloat16()
    v = torch.randn(B, Lc, H, D, generator=gen).bfloat16()
    kcur = torch.randn(B, Lcur, H, D, generator=gen).bfloat16()
    vcur = torch.randn(B, Lcur, H, D, generator=gen).bfloat16()
    kc, vc = make_cache(k, 8, 32), make_cache(v, 8, 32)
    out = ops.quantized_kv_attention(q.to(device), kcur.to(device), vcur.to(device), kc.codes.to(device),
                                     kc.step.to(device), kc.zero.to(device), vc.codes.to(device), vc.step.to(device),
                                     vc.zero.to(device), bits=8, group_size=32)  # fmt: skip
    expected = sdpa(q, torch.cat([k, kcur], 1), torch.cat([v, vcur], 1))
    assert_close(out, expected, 2e-2, 2e-2, "INT8 cache vs unquantized")
    # while INT2 is visibly different (the comparison can fail)
    k2, v2 = make_cache(k, 2, 32), make_cache(v, 2, 32)
    int2 = ref_attention(q, kcur, vcur, k2.hat, v2.hat, k2.step, group_size=32)
    assert_differs(int2, expected, 0.1, "INT2 and unquantized")


def test_handmade_cache_codes(device):
    """A cache written byte by byte (not by any quantizer): codes / step / zero decoded as zero + step * code."""
    B, Lc, H, D, g = 1, 3, 1, 8, 4
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0], [3, 3, 3, 3, 0, 0, 0, 0], [1, 0, 1, 0, 2, 2, 2, 2]])
    packed = ref_pack(codes.view(B, Lc, H, D), 2)
    assert packed.flatten().tolist()[:2] == [0b11100100, 0b00011011]
    step = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.125, 2.0]], dtype=torch.float16).view(B, Lc, H, 2)
    zero = torch.tensor([[-1.0, 0.5], [0.0, 3.0], [-0.25, -2.0]], dtype=torch.float16).view(B, Lc, H, 2)
    hat = ref_dequantize(packed, step, zero, 2, g)
    assert hat[0, 0, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.25, 1.0, 0.75, 0.5]
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(B, 2, H, D, generator=gen) * 4
    kcur, vcur = torch.randn(B, 2, H, D, generator=gen), torch.randn(B, 2, H, D, generator=gen)
    for jensen in JENSEN_MODES:
        out = ops.quantized_kv_attention(q.to(device), kcur.to(device), vcur.to(device), packed.to(device),
                                         step.to(device), zero.to(device), packed.to(device), step.to(device),
                                         zero.to(device), bits=2, group_size=g, jensen=jensen)  # fmt: skip
        ref = ref_attention(q, kcur, vcur, hat, hat, step, jensen=jensen, group_size=g)
        assert_close(out, ref, 1e-5, 1e-5, f"hand-made cache, jensen={jensen}")
