"""Backward of difforge.ops.flash_attention (autograd through the registered flash_attention_backward op).

Gradients of ``<out, dout> + <lse, dlse>`` against the fp64 oracle's (attention_testlib.reference through
torch autograd), with the accuracy criterion of test_flash_forward; float64 gradcheck on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from attention_testlib import (
    ALL_DTYPES,
    DTYPE_IDS,
    Case,
    assert_fa_accuracy,
    call_op,
    check_backward,
    check_forward,
    cotangents,
    make_case,
    op_grads,
    raw_args,
    raw_backward_args,
    ref_grads,
    reference,
    stable_seed,
)

difforge = pytest.importorskip("difforge")

dtype_ids = [DTYPE_IDS[d] for d in ALL_DTYPES]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_ids)
def test_backward_matches_reference(device, dtype, D, causal):
    case = make_case(B=2, Lq=33, Lk=33, Hq=4, D=D, dtype=dtype, causal=causal, device=device,
                     seed=stable_seed("bwd", dtype, D, causal))  # fmt: skip
    check_backward(case)


@pytest.mark.parametrize("D", [1, 8, 40, 72, 256])
def test_backward_odd_head_dims(D):
    case = make_case(B=1, Lq=19, Lk=23, Hq=3, D=D, causal=D % 16 == 8, seed=stable_seed("bodd", D))
    check_backward(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [40, 256])
def test_backward_odd_head_dims_low_precision(dtype, D):
    case = make_case(B=1, Lq=21, Lk=17, Hq=2, D=D, dtype=dtype, causal=True, seed=stable_seed("boddlp", D))
    check_backward(case)


@pytest.mark.parametrize(
    "Hq,Hkv", [(8, 2), (6, 3), (4, 1), (5, 1)], ids=["gqa8-2", "gqa6-3", "mqa4", "mqa5"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_gqa(device, Hq, Hkv, causal):
    """dk / dv of a kv head sum over its whole query-head group."""
    case = make_case(B=2, Lq=19, Lk=26, Hq=Hq, Hkv=Hkv, D=64, causal=causal, device=device,
                     seed=stable_seed("bgqa", Hq, Hkv, causal))  # fmt: skip
    check_backward(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_gqa_low_precision(device, dtype):
    case = make_case(B=1, Lq=40, Lk=48, Hq=8, Hkv=2, D=64, causal=True, dtype=dtype, device=device, seed=6)
    check_backward(case)


CAUSAL_SHAPES = [(17, 17), (5, 40), (1, 64), (40, 5), (64, 1), (65, 63)]


@pytest.mark.parametrize("Lq,Lk", CAUSAL_SHAPES, ids=[f"q{a}-k{b}" for a, b in CAUSAL_SHAPES])
def test_backward_causal_bottom_right(device, Lq, Lk):
    case = make_case(B=2, Lq=Lq, Lk=Lk, Hq=2, D=32, causal=True, device=device, seed=stable_seed("bc", Lq, Lk))
    g_op, _ = check_backward(case)
    empty = max(Lq - Lk, 0)
    if empty:
        # rows with no visible key: their dq is exactly 0
        assert (g_op["q"][:, :empty] == 0).all(), "dq of rows without visible keys must be 0"


def test_backward_empty_rows_ignore_their_dlse(device):
    """A -inf lse has gradient 0: a (nonzero) dlse arriving on an empty row changes nothing."""
    case = make_case(B=1, Lq=12, Lk=4, Hq=2, D=16, causal=True, device=device, seed=7)
    dout, dlse = cotangents(case)
    leaves = case.leaf_copies()
    out, lse = call_op(leaves)
    assert torch.isneginf(lse[:, :, :8]).all()
    grads = torch.autograd.grad([out, lse], [leaves.q, leaves.k, leaves.v], [dout, dlse])  # dlse nonzero everywhere
    _, _, g_ref = ref_grads(case, dout, dlse)  # the oracle drops dlse on -inf rows
    for name, got in zip("qkv", grads):
        assert torch.isfinite(got).all(), f"d{name} not finite"
        assert_fa_accuracy(got, g_ref[name], g_ref[name], torch.float32, f"d{name}")
    assert (grads[0][:, :8] == 0).all()


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (63, 65), (65, 63), (129, 129), (17, 300), (260, 530)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_lengths_off_tile(device, Lq, Lk, causal):
    case = make_case(B=1, Lq=Lq, Lk=Lk, Hq=2, D=64, causal=causal, device=device, seed=stable_seed("blen", Lq, Lk))
    check_backward(case)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_many_kv_groups(device, threads):
    """Many (sequence, kv head) groups, processed in several chunks by the CPU kernels."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_backward(make_case(B=5, Lq=9, Lk=14, Hq=8, Hkv=4, D=16, causal=True, device=device, seed=29))
        lens_q = [3, 0, 7, 1, 12, 5, 0, 9, 2, 4, 6, 8]
        lens_k = [5, 4, 7, 0, 12, 3, 2, 20, 2, 1, 6, 11]
        check_backward(make_case(seqlens_q=lens_q, seqlens_k=lens_k, Hq=3, Hkv=3, D=8, causal=True, bias_rank=2,
                                 device=device, seed=30))  # fmt: skip
    finally:
        torch.set_num_threads(prev)


@pytest.mark.slow
def test_backward_long(device):
    case = make_case(B=1, Lq=300, Lk=300, Hq=2, Hkv=1, D=128, causal=True, device=device, seed=12)
    check_backward(case)


@pytest.mark.parametrize("with_lse", [False, True], ids=["out_only", "out_and_lse"])
def test_backward_with_and_without_lse_gradient(device, with_lse):
    case = make_case(B=2, Lq=20, Lk=28, Hq=4, Hkv=2, D=32, causal=True, device=device, seed=13)
    check_backward(case, with_lse=with_lse)


def test_backward_lse_only_loss(device):
    """Loss through lse alone (dout = 0): d lse / d q = scale * sum_j p_ij k_j, and so on."""
    case = make_case(B=2, Lq=15, Lk=22, Hq=2, D=32, causal=True, device=device, seed=14)
    dout, dlse = cotangents(case)
    dout = torch.zeros_like(dout)
    _, _, g_op = op_grads(case, dout, dlse)
    _, _, g_ref = ref_grads(case, dout, dlse)
    for name in "qk":
        assert_fa_accuracy(g_op[name], g_ref[name], g_ref[name], torch.float32, f"d{name}")
    assert (g_op["v"] == 0).all(), "out is linear in v: without dout, dv is exactly 0"


@pytest.mark.parametrize("which", ["q", "k", "v", "qv"])
def test_backward_subset_requires_grad(device, which):
    case = make_case(B=1, Lq=10, Lk=14, Hq=4, Hkv=2, D=16, device=device, seed=15)
    dout, _ = cotangents(case, with_lse=False)
    leaves = {n: getattr(case, n).detach().clone().requires_grad_(n in which) for n in "qkv"}
    out, _ = difforge.ops.flash_attention(leaves["q"], leaves["k"], leaves["v"])
    got = torch.autograd.grad(out, [leaves[n] for n in which], dout)
    _, _, g_ref = ref_grads(case, dout, None)
    for n, g in zip(which, got):
        assert_fa_accuracy(g, g_ref[n], g_ref[n], torch.float32, f"d{n}")


@pytest.mark.parametrize("layout", ["head_major", "padded"])
def test_backward_non_contiguous_inputs(device, layout):
    case = make_case(B=2, Lq=23, Lk=23, Hq=4, Hkv=2, D=40, causal=True, layout=layout, device=device,
                     seed=stable_seed("bnc", layout))  # fmt: skip
    check_backward(case)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_backward_through_fused_qkv(device, Hq, Hkv):
    """q, k, v are views of one fused projection output that requires grad: its gradient is (dq, dk, dv)."""
    B, L, D = 2, 27, 32
    gen = torch.Generator().manual_seed(16)
    if Hq == Hkv:
        qkv = torch.randn(B, L, 3, Hq, D, generator=gen).to(device).requires_grad_()
        split = lambda t: t.unbind(dim=2)  # noqa: E731
    else:
        qkv = torch.randn(B, L, Hq + 2 * Hkv, D, generator=gen).to(device).requires_grad_()
        split = lambda t: t.split([Hq, Hkv, Hkv], dim=2)  # noqa: E731
    dout = torch.randn(B, L, Hq, D, generator=gen).to(device)
    dlse = torch.randn(B, Hq, L, generator=gen).to(device)

    q, k, v = split(qkv)
    assert not q.is_contiguous()
    out, lse = difforge.ops.flash_attention(q, k, v, causal=True)
    (g_op,) = torch.autograd.grad([out, lse], [qkv], [dout, dlse])

    ref_leaf = qkv.detach().double().requires_grad_()
    rq, rk, rv = split(ref_leaf)
    r_out, r_lse = reference(Case(q=rq, k=rk, v=rv, causal=True))
    (g_ref,) = torch.autograd.grad([r_out, r_lse], [ref_leaf], [dout.double(), dlse.double()])
    assert_fa_accuracy(g_op, g_ref, g_ref, torch.float32, "d qkv")


@pytest.mark.parametrize("kind", ["sum", "per_channel", "transposed", "lse_sum"])
def test_backward_strided_upstream_gradients(device, kind):
    """Upstream gradients as autograd produces them: expanded (all-zero strides, or stride 0 except the last
    dim) and permuted views; dout is read through its strides (or copied), never assumed contiguous."""
    case = make_case(B=2, Lq=11, Lk=13, Hq=4, Hkv=2, D=16, causal=True, device=device, seed=43)
    gen = torch.Generator().manual_seed(44)
    w_d = torch.randn(16, generator=gen).to(device)
    w_t = torch.randn(2, 4, 11, 16, generator=gen).to(device)  # [B, H, L, D]

    def loss_of(out, lse):
        if kind == "sum":
            return out.sum()
        if kind == "per_channel":
            return (out * w_d).sum()
        if kind == "transposed":
            return (out.transpose(1, 2) * w_t).sum()
        return out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    leaves = case.leaf_copies()
    out, lse = call_op(leaves)
    g_op = torch.autograd.grad(loss_of(out, lse), [leaves.q, leaves.k, leaves.v])
    ref_leaves = case.leaf_copies(torch.float64)
    r_out, r_lse = reference(ref_leaves)
    g_ref = torch.autograd.grad(loss_of(r_out, r_lse), [ref_leaves.q, ref_leaves.k, ref_leaves.v])
    for name, got, ref in zip("qkv", g_op, g_ref):
        assert_fa_accuracy(got, ref, ref, torch.float32, f"d{name} ({kind})")


def test_backward_no_keys(device):
    """Lk = 0: out 0 and lse -inf everywhere; dq is 0, dk / dv are empty."""
    case = make_case(B=2, Lq=6, Lk=0, Hq=2, D=16, device=device)
    dout, dlse = cotangents(case)
    _, _, g = op_grads(case, dout, dlse)
    assert (g["q"] == 0).all() and torch.isfinite(g["q"]).all()
    assert g["k"].shape == case.k.shape and g["v"].shape == case.v.shape


def test_backward_deterministic(device):
    """dk and dv are deterministic (documented); run twice, compare bitwise."""
    case = make_case(B=2, Lq=80, Lk=70, Hq=8, Hkv=2, D=64, causal=True, device=device, seed=17)
    dout, dlse = cotangents(case)
    _, _, a = op_grads(case, dout, dlse)
    _, _, b = op_grads(case, dout, dlse)
    assert torch.equal(a["k"], b["k"]) and torch.equal(a["v"], b["v"])


# ---- the raw backward op ------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_dlse", [False, True], ids=["dlse_none", "dlse"])
def test_raw_backward_op(device, with_dlse):
    """flash_attention_backward called directly: gradients in the inputs' shapes/dtypes, empty dbias without
    a bias, dlse None meaning 0."""
    case = make_case(B=2, Lq=12, Lk=18, Hq=4, Hkv=2, D=16, causal=True, device=device, seed=18)
    out, lse = torch.ops.difforge.flash_attention(*raw_args(case))
    dout, dlse = cotangents(case, with_lse=with_dlse)
    dq, dk, dv, dbq, dbk = torch.ops.difforge.flash_attention_backward(*raw_backward_args(case, dout, dlse, out, lse))
    assert dq.shape == case.q.shape and dk.shape == case.k.shape and dv.shape == case.v.shape
    assert dq.dtype == dk.dtype == dv.dtype == case.dtype
    assert dbq.numel() == 0 and dbk.numel() == 0
    _, _, g_ref = ref_grads(case, dout, dlse)
    for name, got in zip("qkv", (dq, dk, dv)):
        assert_fa_accuracy(got, g_ref[name], g_ref[name], torch.float32, f"d{name}")


def test_double_backward_is_refused(device):
    case = make_case(B=1, Lq=4, Lk=4, Hq=2, D=8, device=device).leaf_copies()
    out, _ = call_op(case)
    (gq,) = torch.autograd.grad(out.sum(), [case.q], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


# ---- float64 gradcheck on tiny shapes (CPU) -----------------------------------------------------------------

GRADCHECK_CASES = {
    "plain": dict(B=1, Lq=3, Lk=4, Hq=2, D=3),
    "batch2": dict(B=2, Lq=2, Lk=3, Hq=1, D=2),
    "causal_q_lt_k": dict(B=1, Lq=2, Lk=4, Hq=2, D=3, causal=True),
    "causal_q_gt_k": dict(B=1, Lq=4, Lk=2, Hq=1, D=3, causal=True),
    "gqa": dict(B=1, Lq=3, Lk=3, Hq=4, Hkv=2, D=2, causal=True),
    "scale": dict(B=1, Lq=3, Lk=3, Hq=1, D=4, scale=0.7),
    "seqused": dict(B=2, Lq=2, Lk=4, Hq=1, D=3, causal=True, seqused_k=[3, 0]),
    "bias": dict(B=1, Lq=3, Lk=4, Hq=2, Hkv=1, D=2, bias_rank=2),
    "bias_causal": dict(B=2, Lq=3, Lk=2, Hq=1, D=2, bias_rank=3, causal=True),
    "varlen": dict(seqlens_q=[2, 0, 2], seqlens_k=[3, 2, 2], Hq=2, D=2),
    "varlen_causal_bias_gqa": dict(seqlens_q=[3, 1, 2], seqlens_k=[2, 0, 4], Hq=2, Hkv=1, D=2, causal=True,
                                   bias_rank=2, seqused_k=[2, 0, 3]),  # fmt: skip
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name):
    case = make_case(dtype=torch.float64, seed=stable_seed("gc", name), **GRADCHECK_CASES[name])
    names = list(case.inputs())

    def fn(*tensors):
        c = case.replace(**dict(zip(names, tensors)))
        out, lse = call_op(c)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))

    leaves = [t.detach().clone().requires_grad_() for t in case.inputs().values()]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
def test_many_keys_span_several_pack_chunks():
    """~140k keys over two kv groups (D = 256): more than the CPU kernels pack at once (256 MiB of fp32 keys),
    so the kv groups are processed in several chunks; forward and backward still match the oracle."""
    case = make_case(B=1, Lq=3, Lk=70_000, Hq=4, Hkv=2, D=256, bias_rank=2, seed=19)
    check_forward(case)
    check_backward(case)
