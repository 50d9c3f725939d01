"""Modulation layouts and the equivalences of spec §4.4 (each side also checked against the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaln_testlib import (
    NORMS,
    Case,
    call_op,
    expand_mod,
    make_case,
    op_grads,
    reference,
    sequence_of_rows,
)

# ---- the oracle's index map, checked by explicit loops (no difforge needed) ------------------------------


def test_oracle_index_map_by_loops():
    B, G, L, D, R = 2, 3, 6, 4, 2
    mod = torch.arange(B * G * D, dtype=torch.float32).reshape(B, G, D)
    got = expand_mod(mod, (R * B, L, D), batch_repeat=R)
    for rb in range(R * B):
        for l in range(L):
            assert torch.equal(got[rb, l], mod[rb % B, l // (L // G)])
    per_sample = torch.arange(B * D, dtype=torch.float32).reshape(B, D)
    assert torch.equal(expand_mod(per_sample, (R * B, L, D), batch_repeat=R), per_sample.repeat(R, 1)[:, None].expand(-1, L, -1))
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert sequence_of_rows(cu).tolist() == [0, 0, 2, 2, 2]
    packed = torch.arange(3 * D, dtype=torch.float32).reshape(3, D)
    assert torch.equal(expand_mod(packed, (5, D), cu_seqlens=cu), packed[[0, 0, 2, 2, 2]])


# ---- equivalences ---------------------------------------------------------------------------------------------

difforge = pytest.importorskip("difforge")


def _fwd_and_grads(case: Case, seed: int = 0):
    case = case.leaf_copies()
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(case.x.shape, generator=gen).to(case.x.device, case.x.dtype)
    dx_out = torch.randn(case.x.shape, generator=gen).to(case.x.device, case.x.dtype) if case.gated else None
    x_out, y = call_op(case)
    torch.testing.assert_close(y.double(), reference(case).y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}\n{m}")
    return x_out, y, op_grads(case, dy, dx_out)


@pytest.mark.parametrize("gate", ["off", "tensor"])
@pytest.mark.parametrize("norm", NORMS)
def test_per_frame_with_one_frame_equals_per_sample(norm, gate, device):
    case = make_case("sample", norm=norm, affine="weight", gate=gate, device=device, seed=1)
    framed = case.replace(**{k: v.unsqueeze(1) for k, v in case.inputs().items() if k in ("scale", "shift", "gate")})
    _, y1, g1 = _fwd_and_grads(case)
    _, y2, g2 = _fwd_and_grads(framed)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    for k in g1:
        torch.testing.assert_close(g2[k].reshape(g1[k].shape), g1[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("gate", ["off", "tensor"])
@pytest.mark.parametrize("norm", NORMS)
def test_per_token_expanded_equals_per_sample(norm, gate, device):
    case = make_case("sample", norm=norm, affine="weight", gate=gate, L=5, device=device, seed=2)
    L = case.x.shape[1]
    expanded = {k: v[:, None, :].expand(-1, L, -1).contiguous() for k, v in case.inputs().items()
                if k in ("scale", "shift", "gate")}  # fmt: skip
    _, y1, g1 = _fwd_and_grads(case)
    _, y2, g2 = _fwd_and_grads(case.replace(**expanded))
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    for k in g1:
        if k in expanded:  # per-token gradients are elementwise; their sum over L is the per-sample gradient
            assert g2[k].shape == expanded[k].shape
            torch.testing.assert_close(g2[k].sum(1), g1[k], rtol=1e-5, atol=1e-5, msg=k)
        else:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("layout", ["repeat", "repeat_frame"])
@pytest.mark.parametrize("gate", ["off", "tensor"])
@pytest.mark.parametrize("norm", NORMS)
def test_batch_repeat_equals_materialised_repeat(layout, norm, gate, device):
    case = make_case(layout, norm=norm, gate=gate, R=3, device=device, seed=3)
    R = case.batch_repeat
    mods = {k: v for k, v in case.inputs().items() if k in ("scale", "shift", "gate")}
    materialised = case.replace(batch_repeat=1, **{k: v.repeat(R, *([1] * (v.dim() - 1))) for k, v in mods.items()})
    _, y1, g1 = _fwd_and_grads(case)
    _, y2, g2 = _fwd_and_grads(materialised)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for k in g1:
        if k in mods:
            B = mods[k].shape[0]
            folded = g2[k].reshape(R, B, *g2[k].shape[1:]).sum(0)
            assert g1[k].shape == mods[k].shape
            torch.testing.assert_close(g1[k], folded, rtol=1e-5, atol=1e-5, msg=k)
        else:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("layout", ["global", "sample", "frame", "token", "repeat", "varlen"])
@pytest.mark.parametrize("norm", NORMS)
def test_gate_none_equals_gate_of_ones(layout, norm, device):
    case = make_case(layout, norm=norm, gate="tensor", device=device, seed=4)
    ones = case.replace(gate=torch.ones_like(case.gate))
    none = case.replace(gate=None)
    xo1, y1, g1 = _fwd_and_grads(ones)
    xo2, y2, g2 = _fwd_and_grads(none)
    torch.testing.assert_close(xo2, xo1, rtol=0, atol=0)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    assert "gate" not in g2
    for k in g2:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-5, msg=k)


# rmsnorm has no bias, so weight_bias is layernorm only.
@pytest.mark.parametrize(
    "norm, affine",
    [(n, a) for n in NORMS for a in ("none", "weight", "weight_bias") if not (n == "rmsnorm" and a == "weight_bias")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_modulation_equals_torch_functional(norm, affine, dtype, device):
    case = make_case("none", norm=norm, affine=affine, dtype=dtype, affine_dtype=dtype, D=96, device=device, seed=5)
    case = case.leaf_copies()
    _, y = call_op(case)
    D = case.x.shape[-1]
    x = case.x.detach().float().requires_grad_()
    w = None if case.weight is None else case.weight.detach().float().requires_grad_()
    b = None if case.bias is None else case.bias.detach().float().requires_grad_()
    want = F.layer_norm(x, (D,), w, b, case.eps) if norm == "layernorm" else F.rms_norm(x, (D,), w, case.eps)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), want.to(dtype).float(), **tol)
    dy = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    got = op_grads(case, dy.to(dtype))
    leaves = [t for t in (x, w, b) if t is not None]
    ref = dict(zip(["x", "weight", "bias"][: len(leaves)], torch.autograd.grad(want, leaves, dy)))
    gtol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for k, g in got.items():
        torch.testing.assert_close(g.float(), ref[k], **gtol, msg=k)


@pytest.mark.parametrize("gate", ["off", "tensor"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_views_equal_contiguous(norm, gate, mod_dtype, device):
    """Wan's e.chunk(6, dim=1) views ([B, 1, D], batch stride 6D) give bitwise the contiguous results."""
    case = make_case("chunk", norm=norm, gate=gate, mod_dtype=mod_dtype, device=device, seed=6)
    assert not case.scale.is_contiguous() and case.scale.stride(0) == 6 * case.x.shape[-1]
    contig = case.map_inputs(lambda t: t.contiguous())
    xo1, y1, g1 = _fwd_and_grads(case)
    xo2, y2, g2 = _fwd_and_grads(contig)
    assert torch.equal(y1, y2)
    if case.gated:
        assert torch.equal(xo1, xo2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("kind", ["frame", "token"])
def test_strided_views_of_4d_tables(kind, device):
    """Per-frame [B, F, 6, D] / per-token [B, L, 6, D] tables, unbound on dim 2: strided [B, G, D] views."""
    B, L, D = 2, 6, 16
    G = 3 if kind == "frame" else L
    gen = torch.Generator().manual_seed(7)
    e = (torch.randn(B, G, 6, D, generator=gen) * 0.5).to(device)
    parts = e.unbind(2)
    x = torch.randn(B, L, D, generator=gen).to(device)
    o = torch.randn(B, L, D, generator=gen).to(device)
    case = Case(x=x, o=o, gate=parts[2], scale=parts[1], shift=parts[0], gated=True)
    assert not case.scale.is_contiguous()
    xo1, y1, g1 = _fwd_and_grads(case)
    xo2, y2, g2 = _fwd_and_grads(case.map_inputs(lambda t: t.contiguous()))
    assert torch.equal(y1, y2) and torch.equal(xo1, xo2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("norm", NORMS)
def test_varlen_equal_lengths_equals_per_sample(norm, device):
    """Packing B sequences of length L with cu_seqlens == the [B, L, D] per-sample layout."""
    case = make_case("sample", norm=norm, gate="tensor", affine="weight", B=3, L=7, device=device, seed=8)
    B, L, D = case.x.shape
    cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
    packed = case.replace(x=case.x.reshape(B * L, D), o=case.o.reshape(B * L, D), cu_seqlens=cu, max_seqlen=L)
    xo1, y1, g1 = _fwd_and_grads(case)
    xo2, y2, g2 = _fwd_and_grads(packed)
    torch.testing.assert_close(y2.reshape(B, L, D), y1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xo2.reshape(B, L, D), xo1, rtol=0, atol=0)
    for k in g1:
        torch.testing.assert_close(g2[k].reshape(g1[k].shape), g1[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("max_seqlen", [None, 9, 1000])
def test_varlen_empty_sequence_and_max_seqlen(max_seqlen, device):
    """An empty sequence gets zero modulation gradients; max_seqlen is only an upper bound."""
    case = make_case("varlen", gate="tensor", seqlens=[4, 0, 9, 1], device=device, seed=9)
    case = case.replace(max_seqlen=max_seqlen)
    _, _, g = _fwd_and_grads(case)
    for k in ("scale", "shift", "gate"):
        assert g[k].shape == (4, case.x.shape[-1])
        assert torch.count_nonzero(g[k][1]) == 0, f"d{k} of the empty sequence is not zero"
        assert torch.count_nonzero(g[k][0]) > 0


def test_varlen_leading_and_trailing_empty_sequences(device):
    case = make_case("varlen", gate="tensor", affine="weight_bias", seqlens=[0, 5, 3, 0], device=device, seed=10)
    _, _, g = _fwd_and_grads(case)
    for k in ("scale", "shift", "gate"):
        assert torch.count_nonzero(g[k][0]) == 0 and torch.count_nonzero(g[k][3]) == 0



@pytest.mark.parametrize("kind", ["transposed", "expanded", "sliced"])
def test_modulation_with_unusual_strides(kind, device):
    """Modulation tensors with stride(-1) != 1, stride-0 broadcast or sliced rows: same as contiguous copies."""
    B, L, D = 3, 4, 16
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(B, L, D, generator=gen).to(device).requires_grad_()
    if kind == "transposed":
        bases = [torch.randn(D, B, generator=gen).to(device).requires_grad_() for _ in range(2)]
        scale, shift = (b.t() for b in bases)  # [B, D], strides (1, B)
    elif kind == "expanded":
        bases = [torch.randn(1, D, generator=gen).to(device).requires_grad_() for _ in range(2)]
        scale, shift = (b.expand(B, D) for b in bases)  # batch stride 0
    else:
        bases = [torch.randn(2 * B, D, generator=gen).to(device).requires_grad_() for _ in range(2)]
        scale, shift = bases[0][::2], bases[1][1::2]  # batch stride 2D
    dy = torch.randn(B, L, D, generator=gen).to(device)
    y1 = difforge.ops.adaln_modulate(x, scale, shift)
    g1 = torch.autograd.grad(y1, [x, scale, shift], dy)
    x2, scale2, shift2 = (t.detach().contiguous().requires_grad_() for t in (x, scale, shift))
    y2 = difforge.ops.adaln_modulate(x2, scale2, shift2)
    g2 = torch.autograd.grad(y2, [x2, scale2, shift2], dy)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1.double(), reference(Case(x=x2, scale=scale2, shift=shift2)).y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backward_with_broadcast_output_gradient(device):
    """y.sum().backward() hands the backward an expanded (stride-0) dy."""
    case = make_case("frame", gate="tensor", affine="weight_bias", device=device, seed=13).leaf_copies()
    x_out, y = call_op(case)
    (y.sum() + x_out.sum()).backward()
    ref = case.leaf_copies(torch.float64)
    r = reference(ref, round_x_out=False)
    (r.y.sum() + r.x_out.sum()).backward()
    for k, t in case.inputs().items():
        torch.testing.assert_close(t.grad.double(), ref.inputs()[k].grad, rtol=1e-4, atol=1e-4, msg=k)
