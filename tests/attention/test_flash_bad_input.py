"""Bad input raises a clear error naming the argument (DESIGN.md "Ops: rules"), never a crash or a silent answer.

Each case goes through the Python wrapper (difforge.ops.flash_attention) and, where the wrapper itself does not
check, also through the raw op (torch.ops.difforge.flash_attention) so that the binding's checks are exercised.
"""

from __future__ import annotations

import pytest
import torch

from attention_testlib import make_case, raw_args, raw_backward_args

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge

ERRORS = (RuntimeError, ValueError)
B, L, H, D = 2, 5, 4, 8


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def qkv(Lq=L, Lk=L, Hq=H, Hkv=H, Dq=D, Dk=D, Dv=D):
    return t(B, Lq, Hq, Dq), t(B, Lk, Hkv, Dk), t(B, Lk, Hkv, Dv)


def raises(match):
    return pytest.raises(ERRORS, match=match)


def packed(lens_q=(3, 2), lens_k=(4, 1), Hq=H, Hkv=H):
    q = t(sum(lens_q), Hq, D)
    k = t(sum(lens_k), Hkv, D)
    v = t(sum(lens_k), Hkv, D)
    cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def test_valid_baseline_runs():
    """The unmodified inputs of this file are valid (so every raise below is due to the one change)."""
    ops.flash_attention(*qkv())
    q, k, v, cu_q, cu_k = packed()
    ops.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ops.flash_attention(*qkv(), logit_bias_q=t(B, L, H, 2), logit_bias_k=t(B, L, H, 2))
    ops.flash_attention(*qkv(), seqused_k=torch.tensor([1, 5], dtype=torch.int32))


# ---- shapes -----------------------------------------------------------------------------------------------------


def test_head_dim_mismatch():
    with raises(r"\bk\b"):
        ops.flash_attention(*qkv(Dk=16))
    with raises(r"\bv\b"):
        ops.flash_attention(*qkv(Dv=16))


def test_k_v_length_mismatch():
    q, k, _ = qkv()
    with raises(r"\bv\b|\bk\b"):
        ops.flash_attention(q, k, t(B, L + 1, H, D))


def test_k_v_heads_mismatch():
    q, k, _ = qkv(Hq=4, Hkv=2)
    with raises(r"\bv\b|\bk\b"):
        ops.flash_attention(q, k, t(B, L, 4, D))


def test_batch_mismatch():
    q, k, v = qkv()
    with raises(r"\bk\b|\bv\b"):
        ops.flash_attention(q, k[:1], v[:1])


def test_heads_not_divisible():
    with raises(r"\bk\b|Hkv|heads"):
        ops.flash_attention(*qkv(Hq=6, Hkv=4))
    with raises(r"\bk\b|Hkv|heads"):
        ops.flash_attention(*qkv(Hq=2, Hkv=4))


def test_zero_kv_heads():
    with raises(r"\bk\b|Hkv|heads"):
        ops.flash_attention(*qkv(Hq=4, Hkv=0))


@pytest.mark.parametrize("bad_d", [0, 257, 264, 512])
def test_unsupported_head_dim(bad_d):
    with raises(r"\bq\b|head.?dim|\bD\b"):
        ops.flash_attention(*qkv(Dq=bad_d, Dk=bad_d, Dv=bad_d))


@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_wrong_rank_batch_layout(ndim):
    """Without cu_seqlens, q/k/v are 4-D."""
    shape = {2: (L, D), 3: (L, H, D), 5: (B, L, H, D, 1)}[ndim]
    with raises(r"\bq\b"):
        ops.flash_attention(t(*shape), *qkv()[1:])
    with raises(r"\bk\b|\bv\b"):
        ops.flash_attention(qkv()[0], t(*shape), t(*shape))


def test_varlen_needs_packed_3d():
    q, k, v = qkv()
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    with raises(r"\bq\b|cu_seqlens"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


# ---- dtypes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_non_float_q(dtype):
    q, k, v = qkv()
    with raises(r"\bq\b"):
        ops.flash_attention(torch.ones(q.shape, dtype=dtype), k, v)


@pytest.mark.parametrize("which", ["k", "v"])
def test_mixed_dtypes(which):
    args = dict(zip("qkv", qkv()))
    args[which] = args[which].to(torch.bfloat16)
    with raises(rf"\b{which}\b|dtype"):
        ops.flash_attention(args["q"], args["k"], args["v"])


def test_mixed_low_precision_dtypes():
    q, k, v = (x.to(torch.float16) for x in qkv())
    with raises(r"\bk\b|\bv\b|dtype"):
        ops.flash_attention(q, k.to(torch.bfloat16), v.to(torch.bfloat16))


# ---- strides ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_last_dim_not_contiguous(which):
    args = dict(zip("qkv", qkv()))
    args[which] = t(*args[which].shape[:-1], 2 * D)[..., ::2]
    assert args[which].stride(-1) == 2
    with raises(rf"\b{which}\b"):
        ops.flash_attention(args["q"], args["k"], args["v"])


# ---- cu_seqlens ---------------------------------------------------------------------------------------------


def test_cu_seqlens_only_one_given():
    q, k, v, cu_q, cu_k = packed()
    with raises("cu_seqlens"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q)
    with raises("cu_seqlens"):
        ops.flash_attention(q, k, v, cu_seqlens_k=cu_k)
    with raises("cu_seqlens"):  # the binding checks too
        raw.flash_attention(q, k, v, None, False, cu_q, None, 0, 0, None, None, None)
    with raises("cu_seqlens"):
        raw.flash_attention(q, k, v, None, False, None, cu_k, 0, 0, None, None, None)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.int16])
@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_not_int32(which, dtype):
    q, k, v, cu_q, cu_k = packed()
    cus = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    cus[which] = cus[which].to(dtype)
    with raises(which):
        ops.flash_attention(q, k, v, **cus)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_not_monotone(which):
    q, k, v, _, _ = packed((3, 2), (4, 1))
    cus = {"cu_seqlens_q": torch.tensor([0, 3, 5], dtype=torch.int32),
           "cu_seqlens_k": torch.tensor([0, 4, 5], dtype=torch.int32)}  # fmt: skip
    total = 5
    cus[which] = torch.tensor([0, total + 1, total], dtype=torch.int32)  # sequence 1 has length -1
    with raises(which):
        ops.flash_attention(q, k, v, **cus)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("last", [4, 6, 100])
def test_cu_seqlens_total_mismatch(which, last):
    q, k, v, _, _ = packed((3, 2), (4, 1))  # 5 packed rows each
    cus = {"cu_seqlens_q": torch.tensor([0, 3, 5], dtype=torch.int32),
           "cu_seqlens_k": torch.tensor([0, 4, 5], dtype=torch.int32)}  # fmt: skip
    cus[which] = torch.tensor([0, 3, last], dtype=torch.int32)
    with raises(which):
        ops.flash_attention(q, k, v, **cus)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_negative_start(which):
    q, k, v, _, _ = packed((3, 2), (4, 1))
    cus = {"cu_seqlens_q": torch.tensor([0, 3, 5], dtype=torch.int32),
           "cu_seqlens_k": torch.tensor([0, 4, 5], dtype=torch.int32)}  # fmt: skip
    cus[which] = torch.tensor([-2, 3, 5], dtype=torch.int32)
    with raises(which):
        ops.flash_attention(q, k, v, **cus)


def test_cu_seqlens_batch_mismatch():
    q, k, v, cu_q, _ = packed()
    cu_k = torch.tensor([0, 2, 4, 5], dtype=torch.int32)  # 3 sequences vs 2
    with raises("cu_seqlens"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_cu_seqlens_not_1d():
    q, k, v, cu_q, cu_k = packed()
    with raises("cu_seqlens_q"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q.view(1, 3), cu_seqlens_k=cu_k)


def test_cu_seqlens_empty():
    q, k, v, _, cu_k = packed()
    with raises("cu_seqlens"):
        ops.flash_attention(q, k, v, cu_seqlens_q=torch.zeros(0, dtype=torch.int32), cu_seqlens_k=cu_k)


@pytest.mark.parametrize("which", ["max_seqlen_q", "max_seqlen_k"])
def test_max_seqlen_shorter_than_longest_sequence(which):
    """A max_seqlen below the longest sequence would size the grid too small: rejected, naming the argument."""
    q, k, v, cu_q, cu_k = packed((3, 2), (4, 1))
    with raises(which):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **{which: 2})


# ---- seqused_k --------------------------------------------------------------------------------------------------


def test_seqused_k_bad():
    q, k, v = qkv()
    with raises("seqused_k"):
        ops.flash_attention(q, k, v, seqused_k=torch.tensor([1, 2], dtype=torch.int64))
    with raises("seqused_k"):
        ops.flash_attention(q, k, v, seqused_k=torch.tensor([1, 2, 3], dtype=torch.int32))
    with raises("seqused_k"):
        ops.flash_attention(q, k, v, seqused_k=torch.tensor([[1, 2]], dtype=torch.int32))


# ---- logit bias ------------------------------------------------------------------------------------------------


def test_bias_only_one_side():
    q, k, v = qkv()
    bq, bk = t(B, L, H, 2), t(B, L, H, 2)
    with raises("bias"):
        ops.flash_attention(q, k, v, logit_bias_q=bq)
    with raises("bias"):
        ops.flash_attention(q, k, v, logit_bias_k=bk)
    with raises("bias"):  # the binding checks too
        raw.flash_attention(q, k, v, None, False, None, None, 0, 0, None, bq, None)
    with raises("bias"):
        raw.flash_attention(q, k, v, None, False, None, None, 0, 0, None, None, bk)


def test_bias_rank_mismatch():
    with raises(r"bias_[qk]"):
        ops.flash_attention(*qkv(), logit_bias_q=t(B, L, H, 2), logit_bias_k=t(B, L, H, 3))


@pytest.mark.parametrize("R", [33, 64])
def test_bias_rank_too_large(R):
    with raises(r"bias_[qk]"):
        ops.flash_attention(*qkv(), logit_bias_q=t(B, L, H, R), logit_bias_k=t(B, L, H, R))


@pytest.mark.parametrize(
    "bq_shape,bk_shape,name",
    [
        ((B, L + 1, H, 2), (B, L, 2, 2), "bias_q"),  # Lq wrong
        ((B, L, 2, 2), (B, L, 2, 2), "bias_q"),  # Hkv heads where Hq are needed
        ((1, L, H, 2), (B, L, 2, 2), "bias_q"),  # batch wrong
        ((B, L, H, 2), (B, L, H, 2), "bias_k"),  # Hq heads where Hkv are needed
        ((B, L, H, 2), (B, L - 1, 2, 2), "bias_k"),  # Lk wrong
        ((B, L, H, 2), (L, 2, 2), "bias_k"),  # rank wrong
    ],
)
def test_bias_shape(bq_shape, bk_shape, name):
    q, k, v = qkv(Hq=H, Hkv=2)
    with raises(name):
        ops.flash_attention(q, k, v, logit_bias_q=t(*bq_shape), logit_bias_k=t(*bk_shape))


def test_bias_varlen_shape():
    q, k, v, cu_q, cu_k = packed()
    with raises("bias_q"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, logit_bias_q=t(1, 5, H, 2),
                            logit_bias_k=t(5, H, 2))  # fmt: skip


def test_bias_non_float():
    with raises(r"bias_q"):
        ops.flash_attention(*qkv(), logit_bias_q=torch.ones(B, L, H, 2, dtype=torch.int32), logit_bias_k=t(B, L, H, 2))


# ---- backward op --------------------------------------------------------------------------------------------


def _fwd_case():
    case = make_case(B=B, Lq=L, Lk=L, Hq=H, Hkv=2, D=D, causal=True)
    out, lse = raw.flash_attention(*raw_args(case))
    return case, out, lse


def test_backward_bad_dout():
    case, out, lse = _fwd_case()
    with raises("dout"):
        raw.flash_attention_backward(*raw_backward_args(case, torch.randn(B, L, H, D + 1), None, out, lse))
    with raises("dout"):
        raw.flash_attention_backward(*raw_backward_args(case, torch.randn(B, L, H, D).to(torch.int32), None, out, lse))


def test_backward_bad_lse_and_dlse():
    case, out, lse = _fwd_case()
    dout = torch.randn(B, L, H, D)
    with raises(r"\blse\b"):
        raw.flash_attention_backward(*raw_backward_args(case, dout, None, out, lse[:, :, :-1]))
    with raises(r"\blse\b"):
        raw.flash_attention_backward(*raw_backward_args(case, dout, None, out, lse.double()))
    with raises(r"\bdlse\b"):
        raw.flash_attention_backward(*raw_backward_args(case, dout, torch.randn(B, H, L + 1), out, lse))


def test_backward_bad_out():
    case, out, lse = _fwd_case()
    dout = torch.randn(B, L, H, D)
    with raises(r"\bout\b"):
        raw.flash_attention_backward(*raw_backward_args(case, dout, None, out[:, :-1], lse))


# ---- devices ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mix_qkv(which):
    args = dict(zip("qkv", (x.cuda() for x in qkv())))
    args[which] = args[which].cpu()
    with raises(rf"\b{which}\b|device"):
        ops.flash_attention(args["q"], args["k"], args["v"])


@pytest.mark.cuda
def test_device_mix_cu_seqlens_and_seqused():
    q, k, v, cu_q, cu_k = packed()
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    with raises("cu_seqlens_q"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k.cuda())
    with raises("cu_seqlens_k"):
        ops.flash_attention(q, k, v, cu_seqlens_q=cu_q.cuda(), cu_seqlens_k=cu_k)
    q4, k4, v4 = (x.cuda() for x in qkv())
    with raises("seqused_k"):
        ops.flash_attention(q4, k4, v4, seqused_k=torch.tensor([1, 2], dtype=torch.int32))


@pytest.mark.cuda
def test_device_mix_bias():
    q, k, v = (x.cuda() for x in qkv())
    with raises(r"bias_q"):
        ops.flash_attention(q, k, v, logit_bias_q=t(B, L, H, 2), logit_bias_k=t(B, L, H, 2).cuda())
    with raises(r"bias_k"):
        ops.flash_attention(q, k, v, logit_bias_q=t(B, L, H, 2).cuda(), logit_bias_k=t(B, L, H, 2))


@pytest.mark.cuda
def test_float64_rejected_on_cuda():
    with raises(r"\bq\b|float64|Double"):
        ops.flash_attention(*(x.double().cuda() for x in qkv()))
