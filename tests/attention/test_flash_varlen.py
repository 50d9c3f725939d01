"""Packed varlen sequences (cu_seqlens_q / cu_seqlens_k) and seqused_k, forward and backward, vs the oracle.

The oracle cuts every sequence out of the packed tensors with Python slices and attends within it; the
kernels find the rows through the offsets (and must never read across a sequence boundary).
"""

from __future__ import annotations

import pytest
import torch

from attention_testlib import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    call_op,
    check_backward,
    check_forward,
    cotangents,
    make_case,
    op_grads,
    reference,
    stable_seed,
)

difforge = pytest.importorskip("difforge")

# Unequal lengths, empty sequences (no queries; no keys), Lq_b > Lk_b and Lq_b < Lk_b, off-tile lengths
SEQLENS = {
    "mixed": ([5, 0, 17, 1, 33], [7, 3, 17, 0, 20]),
    "equal": ([16, 16, 16], [16, 16, 16]),
    "one": ([9], [70]),
    "long": ([65, 3, 1], [63, 129, 2]),
    "empty_first_last": ([0, 4, 0], [2, 6, 0]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", list(SEQLENS))
def test_varlen_forward(device, lens, causal):
    sq, sk = SEQLENS[lens]
    case = make_case(seqlens_q=sq, seqlens_k=sk, Hq=4, Hkv=2, D=32, causal=causal, device=device,
                     seed=stable_seed("vf", lens, causal))  # fmt: skip
    check_forward(case)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", ["mixed", "long", "empty_first_last"])
def test_varlen_backward(device, lens, causal):
    sq, sk = SEQLENS[lens]
    case = make_case(seqlens_q=sq, seqlens_k=sk, Hq=4, Hkv=2, D=32, causal=causal, device=device,
                     seed=stable_seed("vb", lens, causal))  # fmt: skip
    check_backward(case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[DTYPE_IDS[d] for d in FLOAT_DTYPES])
@pytest.mark.parametrize("D", [64, 128])
def test_varlen_dtypes(device, dtype, D):
    case = make_case(seqlens_q=[20, 0, 45, 7], seqlens_k=[31, 5, 45, 2], Hq=4, Hkv=1, D=D, dtype=dtype, causal=True,
                     device=device, seed=stable_seed("vd", dtype, D))  # fmt: skip
    check_forward(case)
    check_backward(case)


def test_varlen_float64():  # float64 is a CPU-only path
    case = make_case(seqlens_q=[3, 0, 9], seqlens_k=[5, 4, 6], Hq=2, D=8, dtype=torch.float64, causal=True)
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("give_max", [True, False], ids=["max_given", "max_computed"])
def test_varlen_max_seqlen_optional(device, give_max):
    case = make_case(seqlens_q=[4, 30, 2], seqlens_k=[8, 25, 40], Hq=2, D=16, causal=True, give_max_seqlen=give_max,
                     device=device, seed=21)  # fmt: skip
    assert (case.max_seqlen_q is not None) == give_max
    check_forward(case)
    check_backward(case)


def test_varlen_max_seqlen_larger_than_needed(device):
    """An upper bound that is not tight is still a valid max_seqlen."""
    case = make_case(seqlens_q=[4, 9], seqlens_k=[6, 3], Hq=2, D=16, device=device, seed=22)
    case = case.replace(max_seqlen_q=64, max_seqlen_k=100)
    check_forward(case)
    check_backward(case)


def test_varlen_all_sequences_empty(device):
    case = make_case(seqlens_q=[0, 0], seqlens_k=[3, 0], Hq=2, D=8, device=device)
    out, lse = call_op(case)
    assert out.shape == (0, 2, 8) and tuple(lse.shape) == (2, 0)


def test_varlen_no_keys_anywhere(device):
    case = make_case(seqlens_q=[3, 2], seqlens_k=[0, 0], Hq=2, D=8, device=device)
    out, lse = call_op(case)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("layout", ["fused_qkv", "head_major", "padded"])
def test_varlen_non_contiguous(device, layout):
    lens = [11, 0, 30, 4]
    case = make_case(seqlens_q=lens, seqlens_k=lens, Hq=4, Hkv=4 if layout == "fused_qkv" else 2, D=40,
                     causal=True, layout=layout, device=device, seed=stable_seed("vnc", layout))  # fmt: skip
    assert not case.q.is_contiguous()
    check_forward(case)
    check_backward(case)


def test_varlen_matches_batch_reference(device):
    """Equal-length packed sequences are the batch layout: the varlen op equals the batch oracle."""
    B, L, H, D = 3, 21, 2, 16
    batch = make_case(B=B, Lq=L, Lk=L, Hq=H, D=D, causal=True, device=device, seed=23)
    packed = batch.replace(
        q=batch.q.reshape(B * L, H, D), k=batch.k.reshape(B * L, H, D), v=batch.v.reshape(B * L, H, D),
        cu_seqlens_q=torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device),
        max_seqlen_q=L, max_seqlen_k=L,
    )  # fmt: skip
    out, lse = call_op(packed)
    ref_out, ref_lse = reference(batch)
    torch.testing.assert_close(out.reshape(B, L, H, D).double(), ref_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.reshape(H, B, L).permute(1, 0, 2).double(), ref_lse, rtol=2e-5, atol=2e-5)


def test_varlen_sequences_are_isolated(device):
    """Changing the keys of sequence 1 leaves sequences 0 and 2 untouched (no reads across boundaries)."""
    case = make_case(seqlens_q=[7, 9, 5], seqlens_k=[6, 10, 8], Hq=2, D=16, device=device, seed=24)
    out1, lse1 = call_op(case)
    k2 = case.k.clone()
    k2[6:16] += 3.0
    out2, lse2 = call_op(case.replace(k=k2))
    assert torch.equal(out1[:7], out2[:7]) and torch.equal(out1[16:], out2[16:])
    assert torch.equal(lse1[:, :7], lse2[:, :7]) and torch.equal(lse1[:, 16:], lse2[:, 16:])
    assert not torch.equal(out1[7:16], out2[7:16])


# ---- seqused_k ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("used", [[40, 0, 17], [1, 39, 40], [0, 0, 0]], ids=["mixed", "edges", "all_zero"])
def test_seqused_k_batch(device, used, causal):
    """Batch layout with a padded key tail: sequence b attends to its first seqused_k[b] keys only, and the
    bottom-right causal diagonal is aligned with k_len = seqused_k[b]."""
    case = make_case(B=3, Lq=20, Lk=40, Hq=4, Hkv=2, D=32, causal=causal, seqused_k=used, device=device,
                     seed=stable_seed("su", tuple(used), causal))  # fmt: skip
    out, lse = check_forward(case)
    for b, u in enumerate(used):
        if u == 0:
            assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()
    g, _ = check_backward(case)
    for b, u in enumerate(used):
        # padded keys get exactly zero gradient
        assert (g["k"][b, u:] == 0).all(), f"dk of keys past seqused_k[{b}]={u} must be 0"
        assert (g["v"][b, u:] == 0).all(), f"dv of keys past seqused_k[{b}]={u} must be 0"


def test_seqused_k_tail_is_never_read(device):
    """NaN in the unused key/value tail must not leak into the output (it is never read)."""
    case = make_case(B=2, Lq=8, Lk=30, Hq=2, D=16, seqused_k=[10, 25], device=device, seed=25)
    k, v = case.k.clone(), case.v.clone()
    k[0, 10:] = float("nan")
    v[0, 10:] = float("nan")
    k[1, 25:] = float("nan")
    v[1, 25:] = float("nan")
    nan_case = case.replace(k=k, v=v)
    out, lse = call_op(nan_case)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_out, ref_lse = reference(case)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqused_k_varlen(device, causal):
    sq, sk = [6, 3, 20, 0], [12, 9, 30, 5]
    case = make_case(seqlens_q=sq, seqlens_k=sk, seqused_k=[12, 0, 11, 2], Hq=4, Hkv=2, D=32, causal=causal,
                     device=device, seed=stable_seed("suv", causal))  # fmt: skip
    check_forward(case)
    g, _ = check_backward(case)
    assert (g["k"][12:21] == 0).all() and (g["v"][21 + 11 : 51] == 0).all()


def test_seqused_k_lse_gradient(device):
    case = make_case(B=2, Lq=9, Lk=16, Hq=2, D=16, causal=True, seqused_k=[5, 16], device=device, seed=26)
    dout, dlse = cotangents(case)
    dout.zero_()
    _, lse, g = op_grads(case, dout, dlse)
    assert (g["v"] == 0).all()
    check_backward(case)
