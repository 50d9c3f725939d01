"""Edge cases of spec §5: hidden sizes, degenerate rows, eps, empty inputs, NaN/Inf, fp16 overflow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaln_testlib import (
    NORMS,
    Case,
    assert_close_fa,
    assert_within_ulps,
    call_op,
    call_raw,
    eager,
    make_case,
    op_grads,
    ref_grads,
    reference,
)

difforge = pytest.importorskip("difforge")

HIDDEN_SIZES = [1, 3, 255, 1536, 2240, 3072, 5120, 6144]


@pytest.mark.parametrize("D", HIDDEN_SIZES)
@pytest.mark.parametrize("norm", NORMS)
def test_hidden_sizes_fp32_forward_and_backward(D, norm, device):
    case = make_case(
        "frame", norm=norm, affine="weight", gate="tensor", B=1, L=4, D=D, groups=2, device=device, seed=D
    ).leaf_copies()
    x_out, y = call_op(case)
    ref = reference(case)
    torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_out.double(), ref.x_out, rtol=1e-6, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(case.x.shape, generator=gen).to(device)
    dx_out = torch.randn(case.x.shape, generator=gen).to(device)
    got, want = op_grads(case, dy, dx_out), ref_grads(case, dy, dx_out)
    for k in got:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("D", [255, 2240, 5120])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hidden_sizes_low_precision(D, dtype, device):
    case = make_case("sample", norm="layernorm", affine="weight_bias", dtype=dtype, B=2, L=2, D=D, device=device, seed=D)
    _, y = call_op(case)
    ref = reference(case)
    assert_within_ulps(y, ref.y, dtype, atol=1e-6 * (1 + ref.y.abs().max().item()), what=f"D={D}")
    assert_close_fa(y, ref.y, eager(case)[1], slack=1e-3, what=f"D={D}")


def test_hidden_size_one_layernorm_is_shift_only():
    """D = 1: xh = 0 exactly, so y = bias * (1 + s) + t and dx = 0."""
    x = torch.tensor([[[3.0], [-7.5]]], requires_grad=True)
    s, t, b = torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0])
    y = difforge.ops.adaln_modulate(x, s, t, bias=b)
    assert torch.equal(y, torch.full((1, 2, 1), 2.0 * 1.5 + 0.25))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, torch.zeros_like(dx))


# ---- degenerate rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.1, -3.0, 1e3])
@pytest.mark.parametrize("D", [1536, 5120])
def test_zero_variance_rows(c, D, device):
    """Constant rows: rstd ~ eps^-1/2, |xh| <= D ulp(c) rstd (spec §5), y ~ bias (1+s) + t, finite gradients."""
    eps = 1e-6
    x = torch.full((2, 2, D), c, device=device)
    _, y_plain, mean, rstd = call_raw(Case(x=x, eps=eps))
    assert torch.isfinite(y_plain).all()
    ulp_c = 2.0 ** (math.floor(math.log2(abs(c))) - 23)
    bound = D * ulp_c / math.sqrt(eps)
    assert y_plain.abs().max().item() <= bound, f"|xh| = {y_plain.abs().max().item():.3g} > D ulp(c) rstd = {bound:.3g}"
    torch.testing.assert_close(mean, torch.full_like(mean, c), rtol=D * 2**-23, atol=0)
    # var is at most (D ulp(c))^2 << eps here unless c is large; rstd must stay near eps^-1/2
    var_bound = (D * ulp_c) ** 2
    assert ((1 / rstd.double() ** 2 - eps).abs() <= var_bound + 1e-12).all()

    case = make_case("sample", affine="weight_bias", gate="off", B=2, L=2, D=D, device=device, seed=3, eps=eps)
    case = case.replace(x=x).leaf_copies()
    _, y = call_op(case)
    ref = reference(case)
    amp = ((1 + case.scale.detach().abs()) * case.weight.detach().abs()).max().item()
    torch.testing.assert_close(y.double(), ref.y, rtol=0, atol=bound * amp + 1e-5)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    got = op_grads(case, dy)
    want = ref_grads(case, dy)
    for k, g in got.items():
        assert torch.isfinite(g).all(), k
    # dx = rstd (dxh - mean(dxh)) up to the xh error: values ~1e3, allow the xh-induced term
    torch.testing.assert_close(got["x"].double(), want["x"], rtol=1e-3, atol=bound * 1e3 * amp + 1e-2)
    torch.testing.assert_close(got["shift"].double(), want["shift"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [1e4, -3e4])
@pytest.mark.parametrize("norm", NORMS)
def test_large_offsets(offset, norm, device):
    """x = offset + O(1) noise: finite and as accurate as torch's own fp32 norm (never E[x^2] - mu^2)."""
    D = 1024
    gen = torch.Generator().manual_seed(5)
    x = (offset + torch.randn(2, 3, D, generator=gen, dtype=torch.float64)).float().to(device)
    case = Case(x=x, norm=norm)
    _, y = call_op(case)
    assert torch.isfinite(y).all()
    ref = reference(case)
    torch_fp32 = F.layer_norm(x, (D,), eps=case.eps) if norm == "layernorm" else F.rms_norm(x, (D,), eps=case.eps)
    # The row mean is an fp32 number near the offset: a few ulp(offset) of error in it are unavoidable for a
    # two-pass fp32 mean (spec §1.2) and shift xh by that much (sigma = 1). E[x^2] - mu^2 would be off by O(1).
    ulp_offset = 2.0 ** (math.floor(math.log2(abs(offset))) - 23)
    assert_close_fa(y, ref.y, torch_fp32, slack=4 * ulp_offset, what=f"offset {offset}")


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_with_zero_row_gives_nan_like_torch(norm):
    x = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(6))
    x[0, 1] = 0.0
    s = torch.full((16,), 0.5)
    t = torch.full((16,), 0.25)
    y = difforge.ops.adaln_modulate(x, s, t, norm=norm, eps=0.0)
    n = F.layer_norm(x, (16,), eps=0.0) if norm == "layernorm" else F.rms_norm(x, (16,), eps=0.0)
    want = n * 1.5 + 0.25
    assert torch.isnan(want[0, 1]).all()  # torch's behaviour, the yardstick
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    torch.testing.assert_close(y[0, [0, 2]], want[0, [0, 2]], rtol=1e-5, atol=1e-5)


def test_default_eps_is_1e_minus_6():
    """Rows with variance ~eps: the default eps visibly enters the result."""
    x = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(7)) * 1e-3
    y = difforge.ops.adaln_modulate(x, None, None)
    torch.testing.assert_close(y.double(), reference(Case(x=x, eps=1e-6)).y, rtol=1e-5, atol=1e-5)
    assert (y.double() - reference(Case(x=x, eps=1e-5)).y).abs().max() > 0.1


# ---- empty inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("layout", ["global", "sample", "frame", "token"])
@pytest.mark.parametrize("norm", NORMS)
def test_zero_rows(layout, norm, gated, device):
    D = 8
    x = torch.empty(2, 0, D, device=device, requires_grad=True)
    shape = {"global": (D,), "sample": (2, D), "frame": (2, 2, D), "token": (2, 0, D)}[layout]
    s = torch.randn(shape, device=device, requires_grad=True)
    t = torch.randn(shape, device=device, requires_grad=True)
    if gated:
        o = torch.empty(2, 0, D, device=device, requires_grad=True)
        x_out, y = difforge.ops.gated_adaln_modulate(x, o, None, s, t, norm=norm)
        assert x_out.shape == (2, 0, D)
        leaves = [x, o, s, t]
    else:
        y = difforge.ops.adaln_modulate(x, s, t, norm=norm)
        leaves = [x, s, t]
    assert y.shape == (2, 0, D) and y.dtype == x.dtype
    # like torch.nn.functional.layer_norm on an empty input: every leaf gets a (possibly empty) gradient,
    # so autograd.grad works without allow_unused=True
    grads = torch.autograd.grad(y, leaves, torch.empty_like(y))
    for leaf, g in zip(leaves, grads):
        assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype
        assert torch.count_nonzero(g) == 0


def test_zero_rows_raw_stats():
    y, mean, rstd = torch.ops.difforge.adaln_modulate(torch.empty(3, 0, 4), None, None, None, None, "layernorm", 1e-6, 1, None, 0)
    assert y.shape == (3, 0, 4) and mean.shape == (0,) and rstd.shape == (0,)


def test_zero_rows_varlen(device):
    x = torch.empty(0, 8, device=device)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    s = torch.randn(2, 8, device=device, requires_grad=True)
    y = difforge.ops.adaln_modulate(x, s, None, cu_seqlens=cu)
    assert y.shape == (0, 8)
    (ds,) = torch.autograd.grad(y, [s], torch.empty_like(y))
    assert ds.shape == (2, 8) and torch.count_nonzero(ds) == 0


# ---- NaN / Inf ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_nan_and_inf_propagate_like_the_reference(norm, device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 16, generator=gen)
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    x[1, 3, 5] = -float("inf")
    s = torch.randn(2, 16, generator=gen) * 0.5
    s[1, 7] = float("nan")
    t = torch.randn(2, 16, generator=gen)
    t[0, 9] = float("inf")
    case = Case(x=x.to(device), scale=s.to(device), shift=t.to(device), norm=norm)
    _, y = call_op(case)
    ref = reference(case.to("cpu")).y
    y = y.cpu().double()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN pattern differs from the reference"
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)])
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_nan_in_o_propagates_through_the_gated_residual(device):
    x = torch.randn(1, 3, 8, device=device)
    o = torch.randn(1, 3, 8, device=device)
    o[0, 1, 2] = float("nan")
    x_out, y = difforge.ops.gated_adaln_modulate(x, o, None, None, None)
    assert torch.isnan(x_out[0, 1, 2]) and torch.isnan(x_out).sum() == 1
    assert torch.isnan(y[0, 1]).all() and not torch.isnan(y[0, [0, 2]]).any()


def test_fp16_overflow_gives_inf_like_eager(device):
    """y beyond fp16's range rounds to +-inf exactly as the fp32 eager composition cast to fp16 does."""
    row = torch.tensor([-3.0, -1.0, 1.0, 3.0]).repeat(2)  # xh = +-1.342, +-0.447
    x = (row * 7.0 + 2.0).expand(2, 3, 8).contiguous().half().to(device)
    s = torch.tensor([1e5, 1e5, 1e5, 1e5, -1e5, 2.0, 1e5, -1e5], device=device)  # fp32 modulation
    t = torch.zeros(8, device=device)
    y = difforge.ops.adaln_modulate(x, s, t)
    want = (F.layer_norm(x.float(), (8,), eps=1e-6) * (1 + s) + t).half()
    assert torch.isinf(want).any() and torch.isfinite(want).any()
    assert torch.equal(torch.isinf(y), torch.isinf(want))
    assert torch.equal(y[torch.isinf(y)], want[torch.isinf(want)])
    ref = reference(Case(x=x, scale=s, shift=t)).y
    fin = torch.isfinite(want)
    assert_within_ulps(y[fin], ref[fin], torch.float16, what="finite fp16 outputs")
