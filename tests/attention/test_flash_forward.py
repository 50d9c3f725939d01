"""Forward of difforge.ops.flash_attention against the fp64 oracle (attention_testlib.reference).

Accuracy criterion (FlashAttention-style): max|op - fp64 oracle| <= 2 * max|eager - fp64 oracle| + a small
floor, eager being the same composition evaluated in the inputs' dtype. float64 (CPU) is held to ~1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attention_testlib import (
    ALL_DTYPES,
    DTYPE_IDS,
    assert_close_ref,
    call_op,
    check_forward,
    lse_shape,
    make_case,
    reference,
    stable_seed,
)

difforge = pytest.importorskip("difforge")

dtype_ids = [DTYPE_IDS[d] for d in ALL_DTYPES]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_ids)
def test_forward_matches_reference(device, dtype, D, causal):
    case = make_case(B=2, Lq=37, Lk=37, Hq=4, D=D, dtype=dtype, causal=causal, device=device,
                     seed=stable_seed("fwd", dtype, D, causal))  # fmt: skip
    check_forward(case)


@pytest.mark.parametrize("D", [1, 8, 40, 72, 80, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_odd_head_dims(dtype, D):
    case = make_case(B=1, Lq=19, Lk=23, Hq=3, D=D, dtype=dtype, causal=D % 16 == 8, seed=stable_seed("odd", D))
    check_forward(case)


@pytest.mark.parametrize(
    "Hq,Hkv", [(8, 2), (6, 3), (4, 1), (5, 1), (4, 4)], ids=["gqa8-2", "gqa6-3", "mqa4", "mqa5", "mha"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_gqa(device, Hq, Hkv, causal):
    case = make_case(B=2, Lq=21, Lk=30, Hq=Hq, Hkv=Hkv, D=64, causal=causal, device=device,
                     seed=stable_seed("gqa", Hq, Hkv, causal))  # fmt: skip
    check_forward(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_forward_gqa_low_precision(device, dtype):
    case = make_case(B=1, Lq=40, Lk=40, Hq=8, Hkv=2, D=64, causal=True, dtype=dtype, device=device, seed=5)
    check_forward(case)


# (Lq, Lk): Lq == Lk, Lq < Lk (bottom-right: the last query sees every key), Lq > Lk (leading rows see nothing)
CAUSAL_SHAPES = [(17, 17), (5, 40), (1, 64), (40, 5), (64, 1), (65, 63), (63, 65), (3, 0)]


@pytest.mark.parametrize("Lq,Lk", CAUSAL_SHAPES, ids=[f"q{a}-k{b}" for a, b in CAUSAL_SHAPES])
def test_forward_causal_bottom_right(device, Lq, Lk):
    case = make_case(B=2, Lq=Lq, Lk=Lk, Hq=2, D=32, causal=True, device=device, seed=stable_seed("c", Lq, Lk))
    out, lse = check_forward(case)
    # explicit statement of the convention on the first and last query rows
    ref_out, ref_lse = reference(case)
    empty_rows = max(Lq - Lk, 0) if Lk > 0 else Lq
    if empty_rows:
        assert torch.isneginf(lse[:, :, :empty_rows]).all(), "rows i < Lq - Lk see no key: lse must be -inf"
        assert (out[:, :empty_rows] == 0).all(), "rows i < Lq - Lk see no key: out must be 0"
    if Lq < Lk and Lq > 0:
        # query 0 sees keys 0..Lk-Lq; with its last key masked out the answer would change
        k_trunc = case.replace(k=case.k[:, : Lk - Lq + 1], v=case.v[:, : Lk - Lq + 1], causal=False, q=case.q[:, :1])
        t_out, _ = reference(k_trunc)
        torch.testing.assert_close(out[:, :1].double(), t_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "Lq,Lk", [(1, 1), (17, 17), (63, 65), (65, 63), (129, 129), (1, 300), (300, 300), (257, 513), (3, 1025)]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_lengths_off_tile(device, Lq, Lk, causal):
    """Lengths that are not multiples of any tile size, some spanning several query / key tiles."""
    case = make_case(B=1, Lq=Lq, Lk=Lk, Hq=2, D=64, causal=causal, device=device, seed=stable_seed("len", Lq, Lk))
    check_forward(case)


def test_forward_long_keys_multiple_key_tiles(device):
    """More keys than one key tile (online-softmax rescaling across tiles), with a strongly peaked row."""
    case = make_case(B=1, Lq=7, Lk=700, Hq=2, D=32, device=device, seed=3)
    # make a late key dominate the first query so that the running max changes between tiles
    case.k[0, 650] = case.q[0, 0] * 4
    check_forward(case)


@pytest.mark.parametrize("gain", [8.0, 40.0])
def test_forward_large_logits_are_stable(device, gain):
    """Logits in the hundreds: the online softmax must subtract its running max (no overflow / NaN)."""
    case = make_case(B=1, Lq=33, Lk=300, Hq=2, D=64, q_gain=gain, device=device, seed=4)
    check_forward(case)


def test_forward_no_keys_at_all(device):
    """Lk = 0: every row is empty: out 0, lse -inf."""
    case = make_case(B=2, Lq=5, Lk=0, Hq=4, Hkv=2, D=16, device=device)
    out, lse = call_op(case)
    assert out.shape == (2, 5, 4, 16) and tuple(lse.shape) == (2, 4, 5)
    assert (out == 0).all()
    assert torch.isneginf(lse).all()


def test_forward_no_queries(device):
    """Lq = 0: empty outputs of the right shapes."""
    case = make_case(B=2, Lq=0, Lk=6, Hq=4, Hkv=2, D=16, device=device)
    out, lse = call_op(case)
    assert out.shape == (2, 0, 4, 16) and tuple(lse.shape) == (2, 4, 0)


@pytest.mark.parametrize("layout", ["fused_qkv", "head_major", "padded"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_forward_non_contiguous_inputs(device, layout, Hq, Hkv):
    case = make_case(B=2, Lq=29, Lk=29, Hq=Hq, Hkv=Hkv, D=40, causal=True, layout=layout, device=device,
                     seed=stable_seed("nc", layout, Hq))  # fmt: skip
    assert not case.q.is_contiguous() and not case.k.is_contiguous() and not case.v.is_contiguous()
    before = [t.clone() for t in (case.q, case.k, case.v)]
    check_forward(case)
    for t, b in zip((case.q, case.k, case.v), before):
        assert torch.equal(t, b), "the op must not write its inputs"


def test_forward_fused_qkv_bf16(device):
    case = make_case(B=2, Lq=50, Hq=4, D=64, dtype=torch.bfloat16, layout="fused_qkv", causal=True, device=device)
    check_forward(case)


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0, 2.5])
def test_forward_custom_scale(device, scale):
    case = make_case(B=1, Lq=24, Lk=31, Hq=2, D=32, scale=scale, device=device, seed=stable_seed("scale", scale))
    check_forward(case)


def test_forward_default_scale_is_rsqrt_d(device):
    case = make_case(B=1, Lq=9, Lk=11, Hq=2, D=72, device=device)
    out_none, _ = call_op(case)
    ref, _ = reference(case.replace(scale=1.0 / math.sqrt(72)))
    wrong, _ = reference(case.replace(scale=1.0))
    torch.testing.assert_close(out_none.double(), ref, rtol=1e-5, atol=1e-5)
    assert (out_none.double() - wrong).abs().max() > 1e-2


def test_forward_batch_rows_are_independent(device):
    """Changing batch row 1 leaves row 0's output untouched (no cross-batch reads)."""
    case = make_case(B=2, Lq=20, Lk=20, Hq=2, D=16, device=device, seed=9)
    out1, lse1 = call_op(case)
    k2 = case.k.clone()
    k2[1] += 5.0
    out2, lse2 = call_op(case.replace(k=k2))
    assert torch.equal(out1[0], out2[0]) and torch.equal(lse1[0], lse2[0])
    assert not torch.equal(out1[1], out2[1])


def test_forward_deterministic(device):
    case = make_case(B=2, Lq=70, Lk=90, Hq=4, Hkv=2, D=64, causal=True, bias_rank=3, device=device, seed=11)
    a = call_op(case)
    b = call_op(case)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_forward_output_layout_and_dtypes(device):
    for dtype in [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else []):
        case = make_case(B=2, Lq=3, Lk=5, Hq=4, Hkv=2, D=8, dtype=dtype, layout="head_major", device=device)
        out, lse = call_op(case)
        assert out.dtype == dtype and out.shape == case.q.shape and out.is_contiguous()
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert tuple(lse.shape) == lse_shape(case) == (2, 4, 3)
        assert out.device.type == device and lse.device.type == device


# ---- against torch's own scaled_dot_product_attention (same semantics when Lq == Lk and no bias) -------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_forward_matches_sdpa(device, causal, Hq, Hkv):
    case = make_case(B=2, Lq=45, Lk=45, Hq=Hq, Hkv=Hkv, D=64, causal=causal, device=device,
                     seed=stable_seed("sdpa", causal, Hq))  # fmt: skip
    out, lse = call_op(case)
    q, k, v = (t.double().transpose(1, 2) for t in (case.q, case.k, case.v))  # [B, H, L, D]
    expect = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv).transpose(1, 2)
    assert_close_ref(out, expect, "out vs SDPA", rtol=0, atol=2e-5)
    # the lse of SDPA's row-softmax, written with an explicit causal mask
    logits = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(Hq // Hkv, dim=1)) / math.sqrt(64)
    if causal:
        logits = logits.masked_fill(torch.ones(45, 45, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    assert_close_ref(lse, torch.logsumexp(logits, dim=-1), "lse", rtol=0, atol=2e-5)


def test_forward_matches_sdpa_non_causal_rectangular(device):
    case = make_case(B=1, Lq=13, Lk=77, Hq=2, D=128, scale=0.2, device=device)
    out, _ = call_op(case)
    q, k, v = (t.double().transpose(1, 2) for t in (case.q, case.k, case.v))
    expect = F.scaled_dot_product_attention(q, k, v, scale=0.2).transpose(1, 2)
    assert_close_ref(out, expect, "out vs SDPA", rtol=0, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_many_kv_groups(device, threads):
    """Many (sequence, kv head) groups: the CPU kernels process them in several chunks (per thread count)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_forward(make_case(B=5, Lq=9, Lk=14, Hq=8, Hkv=4, D=16, causal=True, device=device, seed=27))
        lens_q = [3, 0, 7, 1, 12, 5, 0, 9, 2, 4, 6, 8]
        lens_k = [5, 4, 7, 0, 12, 3, 2, 20, 2, 1, 6, 11]
        check_forward(make_case(seqlens_q=lens_q, seqlens_k=lens_k, Hq=3, Hkv=3, D=8, causal=True, bias_rank=2,
                                device=device, seed=28))  # fmt: skip
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("scale", [None, 1.0 / 3.0, 0.1])
def test_float64_scale_is_kept_in_float64(scale):
    """The float64 path (gradcheck) must use the softmax scale in float64: a scale rounded to float32 (relative
    error ~3e-8) shows up as a ~1e-8 error in out / lse, far above float64 rounding."""
    case = make_case(B=1, Lq=6, Lk=7, Hq=2, D=3, dtype=torch.float64, scale=scale, q_gain=3.0, seed=42)
    out, lse = call_op(case)
    ref_out, ref_lse = reference(case)
    assert_close_ref(out, ref_out, "out (fp64)", rtol=0, atol=1e-12)
    assert_close_ref(lse, ref_lse, "lse (fp64)", rtol=0, atol=1e-12)


def test_forward_backward_batch_broadcast_kv(device):
    """k / v expanded over the batch (batch stride 0, e.g. a shared prompt): "any strides, last one 1"."""
    base = make_case(B=3, Lq=10, Lk=12, Hq=4, Hkv=2, D=16, causal=True, device=device, seed=45)
    case = base.replace(k=base.k[:1].expand(3, -1, -1, -1), v=base.v[1:2].expand(3, -1, -1, -1))
    assert case.k.stride(0) == 0
    check_forward(case)
    # gradients w.r.t. the un-expanded tensors (autograd sums the expanded batch)
    k1 = base.k[:1].detach().clone().requires_grad_()
    v1 = base.v[1:2].detach().clone().requires_grad_()
    out, lse = difforge.ops.flash_attention(base.q, k1.expand(3, -1, -1, -1), v1.expand(3, -1, -1, -1), causal=True)
    dk, dv = torch.autograd.grad(out.sum() + lse.sum(), [k1, v1])
    k64 = k1.detach().double().requires_grad_()
    v64 = v1.detach().double().requires_grad_()
    r_out, r_lse = reference(base.replace(q=base.q.double(), k=k64.expand(3, -1, -1, -1), v=v64.expand(3, -1, -1, -1)))
    rk, rv = torch.autograd.grad(r_out.sum() + r_lse.sum(), [k64, v64])
    assert_close_ref(dk, rk, "dk (broadcast)", rtol=0, atol=2e-5)
    assert_close_ref(dv, rv, "dv (broadcast)", rtol=0, atol=2e-5)
