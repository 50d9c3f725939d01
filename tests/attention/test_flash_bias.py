"""The rank-R logit bias: logit (i, j) of head h gains sum_r bias_q[i, h, r] * bias_k[j, h // g, r].

Checked three independent ways: the oracle (einsum over r), an explicit Lq x Lk bias matrix built by loops
and fed to torch's scaled_dot_product_attention as a float attn_mask (fp64), and closed-form instances
(a per-key log-weight; the Jensen correction's zero bias on sink / live keys).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attention_testlib import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    assert_close_ref,
    call_op,
    check_backward,
    check_forward,
    cotangents,
    explicit_bias_matrix,
    make_case,
    op_grads,
    ref_grads,
    reference,
    stable_seed,
)

difforge = pytest.importorskip("difforge")


@pytest.mark.parametrize("R", [1, 2, 7, 32])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bias_forward_backward(device, R, causal):
    case = make_case(B=2, Lq=21, Lk=29, Hq=4, Hkv=2, D=32, bias_rank=R, causal=causal, device=device,
                     seed=stable_seed("bias", R, causal))  # fmt: skip
    check_forward(case)
    g, _ = check_backward(case)
    assert g["bias_q"].shape == case.bias_q.shape and g["bias_k"].shape == case.bias_k.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_IDS[d] for d in FLOAT_DTYPES])
@pytest.mark.parametrize("D", [64, 128])
def test_bias_dtypes(device, dtype, D):
    case = make_case(B=1, Lq=33, Lk=40, Hq=4, Hkv=1, D=D, dtype=dtype, bias_rank=D // 4 if D == 128 else 4,
                     causal=True, device=device, seed=stable_seed("bd", dtype, D))  # fmt: skip
    check_forward(case)
    check_backward(case)


def test_bias_float64():  # float64 is a CPU-only path
    case = make_case(B=2, Lq=7, Lk=9, Hq=2, Hkv=1, D=8, dtype=torch.float64, bias_rank=3, causal=True)
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_bias_equals_explicit_matrix_via_sdpa(device, Hq, Hkv):
    """out and lse equal attention with the explicit [Hq, Lq, Lk] bias matrix added to the logits (SDPA's
    float attn_mask, fp64), and every bias entry matters (a zeroed bias changes the answer)."""
    B, Lq, Lk, D, R = 2, 18, 25, 16, 5
    case = make_case(B=B, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv, D=D, bias_rank=R, device=device, seed=31)
    out, lse = call_op(case)
    g = Hq // Hkv
    for b in range(B):
        mask = explicit_bias_matrix(case, b)  # [Hq, Lq, Lk]
        q = case.q[b].double().transpose(0, 1)  # [Hq, Lq, D]
        k = case.k[b].double().transpose(0, 1).repeat_interleave(g, dim=0)
        v = case.v[b].double().transpose(0, 1).repeat_interleave(g, dim=0)
        expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
        assert_close_ref(out[b], expect, f"out[{b}] vs SDPA + explicit bias", rtol=0, atol=2e-5)
        logits = torch.einsum("hid,hjd->hij", q, k) / math.sqrt(D) + mask
        assert_close_ref(lse[b], torch.logsumexp(logits, dim=-1), f"lse[{b}]", rtol=0, atol=2e-5)
    no_bias, _ = call_op(case.replace(bias_q=None, bias_k=None))
    assert (out - no_bias).abs().max() > 1e-3, "the bias had no effect"


def test_bias_is_per_kv_head_group(device):
    """With GQA, bias_k has Hkv heads and query head h reads bias_k head h // g (like k)."""
    case = make_case(B=1, Lq=6, Lk=9, Hq=4, Hkv=2, D=8, bias_rank=2, device=device, seed=32)
    bk = case.bias_k.clone()
    bk[:, :, 1] += 2.0  # only kv head 1 -> query heads 2, 3
    out0, _ = call_op(case)
    out1, _ = call_op(case.replace(bias_k=bk))
    assert torch.equal(out0[:, :, :2], out1[:, :, :2])
    assert not torch.equal(out0[:, :, 2:], out1[:, :, 2:])
    ref1, _ = reference(case.replace(bias_k=bk))
    torch.testing.assert_close(out1.double(), ref1, rtol=2e-5, atol=2e-5)


def test_bias_log_weights_closed_form(device):
    """R = 1, bias_q = 1, bias_k[j] = log w_j: out_i = sum_j w_j e^{s_ij} v_j / sum_j w_j e^{s_ij}."""
    case = make_case(B=1, Lq=5, Lk=12, Hq=2, D=16, bias_rank=1, device=device, seed=33)
    gen = torch.Generator().manual_seed(34)
    w = torch.rand(1, 12, 2, generator=gen, dtype=torch.float64) + 0.05
    case = case.replace(bias_q=torch.ones(1, 5, 2, 1, device=device),
                        bias_k=w.log().unsqueeze(-1).float().to(device))  # fmt: skip
    out, lse = call_op(case)
    q, k, v = case.q.double()[0], case.k.double()[0], case.v.double()[0]
    s = torch.einsum("ihd,jhd->hij", q, k) / 4.0
    wk = case.bias_k.double()[0, :, :, 0].exp().transpose(0, 1)  # [H, Lk] (the fp32-rounded weights)
    num = torch.einsum("hij,jhd->ihd", wk[:, None, :] * s.exp(), v)
    den = (wk[:, None, :] * s.exp()).sum(-1)  # [H, Lq]
    torch.testing.assert_close(out[0].double(), num / den.transpose(0, 1)[..., None], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse[0].double(), den.log(), rtol=2e-5, atol=2e-5)


def test_bias_jensen_instance_leaves_unbiased_keys_untouched(device):
    """The Jensen correction: bias_q = -lambda s^2/24 * A_q (here A_q = sum_c q_c^2 per group), bias_k = Delta^2
    on the quantized keys only; sink (first 4) and live (last 6) keys carry bias_k = 0, so their logits are
    exactly scale * q.k: the result equals SDPA with an explicit bias matrix that is zero in those columns."""
    B, Lq, Lk, Hq, Hkv, D, groups = 1, 6, 26, 4, 2, 32, 4
    sink, live = 4, 6
    case = make_case(B=B, Lq=Lq, Lk=Lk, Hq=Hq, Hkv=Hkv, D=D, device=device, seed=35)
    gen = torch.Generator().manual_seed(36)
    scale = 1.0 / math.sqrt(D)
    qf = case.q.double().cpu()
    a_q = (qf**2).reshape(B, Lq, Hq, groups, D // groups).sum(-1)  # [B, Lq, Hq, R]
    delta = torch.rand(B, Lk, Hkv, groups, generator=gen, dtype=torch.float64) * 3.0
    bias_k = delta**2
    bias_k[:, :sink] = 0.0
    bias_k[:, Lk - live :] = 0.0
    bias_q = -1.0 * scale**2 / 24.0 * a_q
    case = case.replace(bias_q=bias_q.float().to(device), bias_k=bias_k.float().to(device))
    out, lse = call_op(case)

    mask = explicit_bias_matrix(case, 0)  # [Hq, Lq, Lk]
    assert (mask[:, :, :sink] == 0).all() and (mask[:, :, Lk - live :] == 0).all()
    q = case.q[0].double().transpose(0, 1)
    k = case.k[0].double().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
    v = case.v[0].double().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
    assert_close_ref(out[0], expect, "out (Jensen instance)", rtol=0, atol=2e-5)
    # the unnormalized weights of the unbiased keys are those of plain attention: exp(s_ij - lse_i) * exp(lse_i)
    s = torch.einsum("hid,hjd->hij", q, k) * scale
    logits = s + mask
    torch.testing.assert_close(logits[:, :, :sink], s[:, :, :sink], rtol=0, atol=0)
    assert_close_ref(lse[0], torch.logsumexp(logits, dim=-1), "lse (Jensen instance)", rtol=0, atol=2e-5)
    check_backward(case)


def test_zero_bias_equals_no_bias(device):
    """bias_k == 0 everywhere: the result is plain attention (vs the no-bias oracle)."""
    case = make_case(B=2, Lq=10, Lk=14, Hq=2, D=16, bias_rank=4, causal=True, device=device, seed=37)
    case = case.replace(bias_k=torch.zeros_like(case.bias_k))
    out, lse = call_op(case)
    ref_out, ref_lse = reference(case.replace(bias_q=None, bias_k=None))
    assert_close_ref(out, ref_out, "out", rtol=0, atol=2e-5)
    assert_close_ref(lse, ref_lse, "lse", rtol=0, atol=2e-5)
    # gradient of bias_k is not zero even where bias_k is: d logit / d bias_k[j, r] = bias_q[i, r]
    dout, dlse = cotangents(case)
    _, _, g = op_grads(case, dout, dlse)
    _, _, g_ref = ref_grads(case, dout, dlse)
    assert g["bias_k"].abs().max() > 1e-3
    assert_close_ref(g["bias_k"], g_ref["bias_k"], "dbias_k", rtol=0, atol=2e-5)


def test_bias_large_negative_masks_keys(device):
    """A large negative bias (-1e4) acts as a soft mask: the answer is attention over the other keys."""
    case = make_case(B=1, Lq=7, Lk=20, Hq=2, D=16, bias_rank=1, device=device, seed=38)
    bk = torch.zeros(1, 20, 2, 1)
    bk[:, 5:12] = -1.0e4
    case = case.replace(bias_q=torch.ones(1, 7, 2, 1, device=device), bias_k=bk.to(device))
    out, _ = call_op(case)
    keep = [j for j in range(20) if not 5 <= j < 12]
    sub = case.replace(k=case.k[:, keep], v=case.v[:, keep], bias_q=None, bias_k=None)
    ref_out, _ = reference(sub)
    assert_close_ref(out, ref_out, "out", rtol=0, atol=2e-5)


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_bias_with_custom_scale_seqused_and_lse_loss(device, scale):
    """The scale multiplies q.k only, never the bias."""
    case = make_case(B=2, Lq=13, Lk=24, Hq=4, Hkv=2, D=16, bias_rank=3, causal=True, scale=scale,
                     seqused_k=[24, 9], device=device, seed=stable_seed("bsc", scale))  # fmt: skip
    check_forward(case)
    check_backward(case, with_lse=True)


def test_bias_gradients_lse_only(device):
    case = make_case(B=1, Lq=9, Lk=11, Hq=2, D=8, bias_rank=2, device=device, seed=39)
    dout, dlse = cotangents(case)
    dout.zero_()
    _, _, g = op_grads(case, dout, dlse)
    _, _, g_ref = ref_grads(case, dout, dlse)
    for n in ("bias_q", "bias_k", "q", "k"):
        assert_close_ref(g[n], g_ref[n], f"d{n}", rtol=0, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bias_varlen(device, causal):
    case = make_case(seqlens_q=[5, 0, 19, 3], seqlens_k=[8, 4, 19, 0], Hq=4, Hkv=2, D=32, bias_rank=6,
                     causal=causal, device=device, seed=stable_seed("bv", causal))  # fmt: skip
    assert case.bias_q.shape == (27, 4, 6) and case.bias_k.shape == (31, 2, 6)
    check_forward(case)
    check_backward(case)


def test_bias_long_keys(device):
    """Bias across several key tiles and off-tile lengths."""
    case = make_case(B=1, Lq=70, Lk=530, Hq=2, Hkv=1, D=64, bias_rank=8, causal=True, device=device, seed=40)
    check_forward(case)


def test_bias_only_q_side_requires_grad(device):
    case = make_case(B=1, Lq=6, Lk=8, Hq=2, D=8, bias_rank=2, device=device, seed=41)
    bq = case.bias_q.clone().requires_grad_()
    out, _ = difforge.ops.flash_attention(case.q, case.k, case.v, logit_bias_q=bq, logit_bias_k=case.bias_k)
    dout, _ = cotangents(case, with_lse=False)
    (g,) = torch.autograd.grad(out, [bq], dout)
    _, _, g_ref = ref_grads(case, dout, None)
    assert_close_ref(g, g_ref["bias_q"], "dbias_q", rtol=0, atol=2e-5)
