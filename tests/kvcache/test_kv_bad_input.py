"""Bad input raises a clear error naming the argument (DESIGN.md "Ops: rules"; spec §6), never a crash or a silent
answer. Each case goes through the Python wrapper and, where the wrapper does not check, the raw op as well."""

from __future__ import annotations

import pytest
import torch

from kvcache_testlib import ref_quantize

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge

ERRORS = (RuntimeError, ValueError)
B, L, H, D, G = 2, 5, 2, 32, 16


def raises(match):
    return pytest.raises(ERRORS, match=match)


def x_(*shape, dtype=torch.float32, device="cpu"):
    shape = shape or (B, L, H, D)
    return torch.randn(*shape).to(dtype).to(device)


def cache(bits=2, g=G, Lc=6, Hkv=H, d=D, device="cpu"):
    codes, step, zero = ref_quantize(torch.randn(B, Lc, Hkv, d), bits, g, "token", torch.float16)
    return codes.to(device), step.to(device), zero.to(device)


def attn_inputs(Hq=4, Hkv=H, dtype=torch.float32, bits=2, g=G, device="cpu"):
    q = x_(B, 3, Hq, D, dtype=dtype, device=device)
    k_cur, v_cur = x_(B, 4, Hkv, D, dtype=dtype, device=device), x_(B, 4, Hkv, D, dtype=dtype, device=device)
    return dict(q=q, k_cur=k_cur, v_cur=v_cur, kc=cache(bits, g, Hkv=Hkv, device=device),
                vc=cache(bits, g, Hkv=Hkv, device=device), bits=bits, g=g)  # fmt: skip


def attend(a, **kw):
    kw.setdefault("bits", a["bits"])
    kw.setdefault("group_size", a["g"])
    return ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *a["kc"], *a["vc"], **kw)


def test_valid_baseline_runs(device):
    """The unmodified inputs of this file are valid (so every raise below is due to the one change)."""
    x = x_(device=device)
    for axis in ("token", "channel"):
        codes, step, zero = ops.kv_quantize(x, bits=2, group_size=G, axis=axis)
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=G, axis=axis)
    a = attn_inputs(device=device)
    attend(a)
    attend(a, k_sink=a["k_cur"], v_sink=a["v_cur"], jensen="exact")
    step0 = torch.zeros_like(a["kc"][1])  # step == 0 is legal
    ops.kv_dequantize(a["kc"][0], step0, a["kc"][2], bits=2, group_size=G)
    ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], a["kc"][0], step0, a["kc"][2], *a["vc"], bits=2,
                               group_size=G, jensen="taylor2")  # fmt: skip


# ---- kv_quantize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 3, 5, 16, -2])
def test_quantize_bad_bits(device, bits):
    with raises(r"\bbits\b"):
        ops.kv_quantize(x_(device=device), bits=bits, group_size=G)


@pytest.mark.parametrize("g", [5, 12, 48, 64])
def test_quantize_group_not_dividing_d(device, g):
    with raises(r"group_size"):
        ops.kv_quantize(x_(device=device), bits=2, group_size=g, axis="token")


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("g", [0, -1, -32])
def test_quantize_nonpositive_group(device, g, axis):
    with raises(r"group_size"):
        ops.kv_quantize(x_(device=device), bits=2, group_size=g, axis=axis)


@pytest.mark.parametrize("axis", ["tokens", "head", "", "Token"])
def test_quantize_unknown_axis(device, axis):
    with raises(r"\baxis\b"):
        ops.kv_quantize(x_(device=device), bits=2, group_size=G, axis=axis)


@pytest.mark.parametrize("shape", [(L, H, D), (B, L, H, D, 1), (D,)])
def test_quantize_not_4d(device, shape):
    with raises(r"\bx\b"):
        ops.kv_quantize(x_(*shape, device=device), bits=2, group_size=G)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64, torch.bool])
def test_quantize_integer_x(device, dtype):
    with raises(r"\bx\b"):
        ops.kv_quantize(torch.zeros(B, L, H, D, dtype=dtype, device=device), bits=2, group_size=G)


@pytest.mark.parametrize("meta", [torch.int32, torch.uint8, torch.bool, torch.int8])
def test_quantize_non_float_meta(device, meta):
    with raises(r"meta_dtype"):
        ops.kv_quantize(x_(device=device), bits=2, group_size=G, meta_dtype=meta)


def test_quantize_packing_needs_whole_bytes(device):
    """D * bits must be a multiple of 8 (D = 3 at INT2: 6 bits per token)."""
    with raises(r"\bbits\b|\bD\b|\bx\b"):
        ops.kv_quantize(x_(B, L, H, 3, device=device), bits=2, group_size=3)


def test_quantize_last_dim_not_unit_stride(device):
    """A last stride != 1 is either rejected naming x, or handled correctly (never read as if it were 1)."""
    x = x_(B, L, H, 2 * D, device=device)[..., ::2]
    try:
        codes, step, zero = ops.kv_quantize(x, bits=2, group_size=G)
    except ERRORS as e:
        assert any(w in str(e) for w in ("x", "stride", "contiguous")), str(e)
        return
    rc, rs, rz = ref_quantize(x.cpu(), 2, G, "token", torch.float16)
    assert torch.equal(codes.cpu(), rc) and torch.equal(step.cpu(), rs) and torch.equal(zero.cpu(), rz)


# ---- kv_dequantize --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, -(2.0**-24), float("nan"), float("inf"), float("-inf")])
def test_dequantize_bad_step(device, bad):
    codes, step, zero = cache(device=device)
    step = step.clone()
    step[1, 2, 0, 1] = bad
    with raises(r"\bstep\b"):
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=G)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_dequantize_codes_not_uint8(device, dtype):
    codes, step, zero = cache(device=device)
    with raises(r"\bcodes\b"):
        ops.kv_dequantize(codes.to(dtype), step, zero, bits=2, group_size=G)


def test_dequantize_meta_shape_mismatch(device):
    codes, step, zero = cache(device=device)
    with raises(r"\bstep\b|\bzero\b"):
        ops.kv_dequantize(codes, step[:, :-1], zero[:, :-1], bits=2, group_size=G)
    with raises(r"\bzero\b"):
        ops.kv_dequantize(codes, step, zero[..., :1], bits=2, group_size=G)
    with raises(r"\bstep\b"):
        ops.kv_dequantize(codes, step[..., :1], zero, bits=2, group_size=G)
    with raises(r"\bstep\b|\bzero\b|group_size"):  # groups of 8 need 4 metadata values per token
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=8)
    with raises(r"\bstep\b|\bzero\b|\baxis\b"):  # channel layout expected [B, ceil(L/g), H, D]
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=G, axis="channel")


def test_dequantize_integer_meta(device):
    codes, step, zero = cache(device=device)
    with raises(r"\bstep\b"):
        ops.kv_dequantize(codes, step.to(torch.int32), zero, bits=2, group_size=G)
    with raises(r"\bzero\b"):
        ops.kv_dequantize(codes, step, zero.to(torch.int32), bits=2, group_size=G)


def test_dequantize_bad_args(device):
    codes, step, zero = cache(device=device)
    with raises(r"\bbits\b"):
        ops.kv_dequantize(codes, step, zero, bits=3, group_size=G)
    with raises(r"group_size"):
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=0)
    with raises(r"\baxis\b"):
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=G, axis="rows")
    with raises(r"\bdtype\b"):
        ops.kv_dequantize(codes, step, zero, bits=2, group_size=G, dtype=torch.int32)
    with raises(r"\bcodes\b"):
        ops.kv_dequantize(codes[0], step[0], zero[0], bits=2, group_size=G)


# ---- quantized_kv_attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("jensen", ["order2", "Exact", "", "scalar"])
def test_attention_unknown_jensen(device, jensen):
    a = attn_inputs(device=device)
    with raises(r"jensen"):
        attend(a, jensen=jensen)
    with raises(r"jensen"):  # the binding checks too (the wrapper is not the only caller)
        raw.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *a["kc"], *a["vc"], 2, G, None, None, None,
                                   jensen, 1.0)  # fmt: skip


def test_attention_dtype_mismatch(device):
    a = attn_inputs(device=device)
    with raises(r"k_cur"):
        ops.quantized_kv_attention(a["q"], a["k_cur"].bfloat16(), a["v_cur"], *a["kc"], *a["vc"], bits=2,
                                   group_size=G)  # fmt: skip
    with raises(r"v_cur"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"].half(), *a["kc"], *a["vc"], bits=2, group_size=G)
    with raises(r"k_sink"):
        attend(a, k_sink=a["k_cur"].bfloat16(), v_sink=a["v_cur"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_attention_integer_q(device, dtype):
    a = attn_inputs(device=device)
    q, kc, vc = a["q"].to(dtype), a["k_cur"].to(dtype), a["v_cur"].to(dtype)
    with raises(r"\bq\b"):
        ops.quantized_kv_attention(q, kc, vc, *a["kc"], *a["vc"], bits=2, group_size=G)


def test_attention_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs a second device (CUDA)")
    a = attn_inputs(device="cuda")
    with raises(r"k_cur|device"):
        ops.quantized_kv_attention(a["q"], a["k_cur"].cpu(), a["v_cur"], *a["kc"], *a["vc"], bits=2, group_size=G)
    with raises(r"k_codes|device"):
        kc = (a["kc"][0].cpu(), a["kc"][1], a["kc"][2])
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *kc, *a["vc"], bits=2, group_size=G)
    with raises(r"k_step|device"):
        kc = (a["kc"][0], a["kc"][1].cpu(), a["kc"][2])
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *kc, *a["vc"], bits=2, group_size=G)


@pytest.mark.parametrize("Hq,Hkv", [(3, 2), (2, 4), (6, 4)])
def test_attention_heads_not_divisible(device, Hq, Hkv):
    a = attn_inputs(Hq=Hq, Hkv=Hkv, device=device)
    with raises(r"Hkv|heads|\bk_cur\b|\bq\b"):
        attend(a)


def test_attention_head_dim_mismatch(device):
    """q's D must match the codes' D * bits / 8 bytes and k_cur's D."""
    a = attn_inputs(device=device)
    kc = cache(d=64, g=G, device=device)
    with raises(r"k_codes"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *kc, *a["vc"], bits=2, group_size=G)
    with raises(r"k_cur"):
        ops.quantized_kv_attention(a["q"], x_(B, 4, H, 16, device=device), a["v_cur"], *a["kc"], *a["vc"], bits=2,
                                   group_size=G)  # fmt: skip


def test_attention_bits_inconsistent_with_codes(device):
    """INT4 codes (16 bytes per token at D = 32) given as bits = 2 (expects 8 bytes)."""
    a = attn_inputs(bits=4, device=device)
    with raises(r"k_codes|bits"):
        attend(a, bits=2)
    with raises(r"\bbits\b"):
        attend(a, bits=3)


def test_attention_cache_shape_mismatch(device):
    a = attn_inputs(device=device)
    k_codes, k_step, k_zero = a["kc"]
    with raises(r"k_step"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], k_codes, k_step[:, :-1], k_zero, *a["vc"],
                                   bits=2, group_size=G)  # fmt: skip
    with raises(r"v_codes|v_step|v_zero"):  # values cache shorter than keys cache
        vc = tuple(t[:, :-1] for t in a["vc"])
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *a["kc"], *vc, bits=2, group_size=G)
    with raises(r"group_size|k_step"):
        attend(a, group_size=8)
    with raises(r"v_cur"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"][:, :-1], *a["kc"], *a["vc"], bits=2, group_size=G)


def test_attention_sink_without_values(device):
    a = attn_inputs(device=device)
    with raises(r"k_sink|v_sink"):
        attend(a, k_sink=a["k_cur"])
    with raises(r"k_sink|v_sink"):
        attend(a, v_sink=a["v_cur"])
    with raises(r"k_sink|v_sink"):  # the binding checks too
        raw.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *a["kc"], *a["vc"], 2, G, a["k_cur"], None, None,
                                   "none", 1.0)  # fmt: skip
    with raises(r"v_sink"):  # lengths differ
        attend(a, k_sink=a["k_cur"], v_sink=a["v_cur"][:, :-1])


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_attention_bad_k_step(device, bad):
    a = attn_inputs(device=device)
    k_codes, k_step, k_zero = a["kc"]
    k_step = k_step.clone()
    k_step[0, 3, 1, 0] = bad
    with raises(r"k_step"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], k_codes, k_step, k_zero, *a["vc"], bits=2,
                                   group_size=G, jensen="exact")  # fmt: skip


def test_attention_bad_v_step(device):
    a = attn_inputs(device=device)
    v_codes, v_step, v_zero = a["vc"]
    v_step = v_step.clone()
    v_step[1, 0, 0, 1] = float("nan")
    with raises(r"v_step"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], *a["kc"], v_codes, v_step, v_zero, bits=2,
                                   group_size=G)  # fmt: skip


def test_attention_codes_not_uint8(device):
    a = attn_inputs(device=device)
    k_codes, k_step, k_zero = a["kc"]
    with raises(r"k_codes"):
        ops.quantized_kv_attention(a["q"], a["k_cur"], a["v_cur"], k_codes.to(torch.int8), k_step, k_zero, *a["vc"],
                                   bits=2, group_size=G)  # fmt: skip


def test_attention_not_4d(device):
    a = attn_inputs(device=device)
    with raises(r"\bq\b"):
        ops.quantized_kv_attention(a["q"][0], a["k_cur"], a["v_cur"], *a["kc"], *a["vc"], bits=2, group_size=G)
