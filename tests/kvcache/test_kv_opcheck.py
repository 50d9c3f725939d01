"""torch.library.opcheck of kv_quantize, kv_dequantize and quantized_kv_attention (schema, fake kernels, AOT dispatch
with dynamic shapes; autograd registration with inputs that require grad) through tests/opcheck.py::run_opcheck,
and torch.compile(fullgraph=True) through the Python wrappers against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kvcache_testlib import (
    assert_close,
    make_attn_case,
    raw_attention_args,
    ref_attention,
    ref_dequantize,
    ref_quantize,
)
from opcheck import run_opcheck

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge

QUANT_CONFIGS = {
    "token_int2_bf16": dict(shape=(2, 5, 2, 32), dtype=torch.bfloat16, bits=2, g=16, axis="token", meta=torch.float16),
    "token_int4_fp32": dict(shape=(1, 3, 3, 64), dtype=torch.float32, bits=4, g=32, axis="token", meta=torch.bfloat16),
    "token_int8_fp16": dict(shape=(1, 4, 1, 16), dtype=torch.float16, bits=8, g=16, axis="token", meta=torch.float32),
    "channel_tail": dict(shape=(2, 7, 2, 16), dtype=torch.float32, bits=2, g=4, axis="channel", meta=torch.float16),
}


def _x(cfg, device, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*cfg["shape"], generator=gen).to(cfg["dtype"]).to(device)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("name", list(QUANT_CONFIGS))
def test_opcheck_kv_quantize(device, name):
    cfg = QUANT_CONFIGS[name]
    run_opcheck(raw.kv_quantize.default, (_x(cfg, device), cfg["bits"], cfg["g"], cfg["axis"], cfg["meta"]))


@pytest.mark.parametrize("name", list(QUANT_CONFIGS))
def test_opcheck_kv_dequantize(device, name):
    cfg = QUANT_CONFIGS[name]
    codes, step, zero = ref_quantize(_x(cfg, "cpu"), cfg["bits"], cfg["g"], cfg["axis"], cfg["meta"])
    args = (codes.to(device), step.to(device), zero.to(device), cfg["bits"], cfg["g"], cfg["axis"], cfg["dtype"])
    run_opcheck(raw.kv_dequantize.default, args)


ATTN_CONFIGS = {
    "fp32_sink_exact": (dict(B=2, Lq=3, Lc=5, Ls=2, Lcur=4, Hq=4, Hkv=2, D=32, group_size=16), "exact"),
    "bf16_taylor2": (dict(B=1, Lq=4, Lc=6, Ls=0, Lcur=3, Hq=2, Hkv=2, D=32, dtype=torch.bfloat16), "taylor2"),
    "fp16_int4_none": (dict(B=1, Lq=2, Lc=3, Ls=1, Lcur=2, Hq=2, Hkv=1, D=16, bits=4, group_size=8,
                            dtype=torch.float16), "none"),  # fmt: skip
    "empty_cache": (dict(B=1, Lq=2, Lc=0, Ls=2, Lcur=2, Hq=2, Hkv=1, D=16, group_size=16), "taylor4"),
}


@pytest.mark.parametrize("name", list(ATTN_CONFIGS))
def test_opcheck_quantized_kv_attention(device, name):
    cfg, jensen = ATTN_CONFIGS[name]
    case = make_attn_case(**cfg, seed=1, device=device)
    run_opcheck(raw.quantized_kv_attention.default, raw_attention_args(case, jensen, 1.5))


def test_opcheck_autograd_registration_inputs_requiring_grad(device):
    """The ops are not differentiable; with float inputs that require grad the registration check must pass
    (no output silently requiring grad through a backend-key autograd)."""
    util = ("test_schema", "test_autograd_registration")
    cfg = QUANT_CONFIGS["token_int2_bf16"]
    run_opcheck(raw.kv_quantize.default, (_x(cfg, device, True), 2, 16, "token", torch.float16), test_utils=util)
    codes, step, zero = ref_quantize(_x(cfg, "cpu"), 2, 16, "token", torch.float32)
    args = (codes.to(device), step.to(device).requires_grad_(), zero.to(device).requires_grad_(), 2, 16, "token",
            torch.float32)  # fmt: skip
    run_opcheck(raw.kv_dequantize.default, args, test_utils=util)
    case = make_attn_case(B=1, Lq=2, Lc=3, Ls=1, Lcur=2, Hq=2, Hkv=1, D=16, group_size=16, seed=2, device=device)
    case = case.replace(q=case.q.requires_grad_(), k_cur=case.k_cur.requires_grad_())
    run_opcheck(raw.quantized_kv_attention.default, raw_attention_args(case, "exact"), test_utils=util)


# ---- torch.compile ---------------------------------------------------------------------------------------------


def _step(q, k_new, v_new, k_cur, v_cur):
    """Commit a chunk to the cache (keys INT2, values INT2 and INT4), attend to it with the bias, dequantize."""
    kq = difforge.ops.kv_quantize(k_new, bits=2, group_size=16)
    vq2 = difforge.ops.kv_quantize(v_new, bits=2, group_size=16)
    vq4 = difforge.ops.kv_quantize(v_new, bits=4, group_size=16)
    out = difforge.ops.quantized_kv_attention(q, k_cur, v_cur, *kq, *vq2, bits=2, group_size=16, jensen="taylor2")
    x_hat = difforge.ops.kv_dequantize(*vq4, bits=4, group_size=16, dtype=torch.float32)
    return torch.tanh(out) * 2, x_hat + 1


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    B, Lq, Lc, Lcur, Hq, Hkv, D = 1, 4, 6, 3, 4, 2, 32
    q = (torch.randn(B, Lq, Hq, D, generator=gen) * 3).to(device)
    k_new, v_new = (torch.randn(B, Lc, Hkv, D, generator=gen).to(device) for _ in range(2))
    k_cur, v_cur = (torch.randn(B, Lcur, Hkv, D, generator=gen).to(device) for _ in range(2))
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    out, x_hat = compiled(q, k_new, v_new, k_cur, v_cur)
    # reference: plain-PyTorch quantizer + fp64 attention
    kc = ref_quantize(k_new.cpu(), 2, 16)
    vc2 = ref_quantize(v_new.cpu(), 2, 16)
    vc4 = ref_quantize(v_new.cpu(), 4, 16)
    ref = ref_attention(q.cpu(), k_cur.cpu(), v_cur.cpu(), ref_dequantize(*kc, 2, 16), ref_dequantize(*vc2, 2, 16),
                        kc[1], jensen="taylor2", group_size=16)  # fmt: skip
    assert_close(out, torch.tanh(ref) * 2, 2e-5, 2e-5, "compiled attention")
    assert_close(x_hat, ref_dequantize(*vc4, 4, 16) + 1, 1e-6, 1e-6, "compiled dequantize")
