"""Backward of the fused adaLN ops (spec §2, §3, §4.2, §4.3, §4.6): gradcheck, oracle gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from adaln_testlib import (
    GATE_MODES,
    LAYOUTS,
    NORMS,
    Case,
    affine_modes,
    assert_close_fa,
    call_op,
    clone_strided,
    eager_grads,
    make_case,
    op_grads,
    ref_grads,
    reference,
    stable_seed,
)

difforge = pytest.importorskip("difforge")

# ---- spec §3 worked vectors -----------------------------------------------------------------------------

SPEC_X = [1.0, 2.0, 3.0, 4.0]
SPEC_S = [0.5, 0.0, -0.5, 1.0]
SPEC_T = [0.1, 0.2, 0.3, 0.4]
SPEC_DY = [1.0, -1.0, 0.5, 2.0]
SPEC_DX = {
    "layernorm": [1.453443, -1.565247, -1.229837, 1.341641],
    "rmsnorm": [0.349934, -0.760726, -0.502079, 0.669439],
}
SPEC_XH = {
    "layernorm": [-1.341640, -0.447213, 0.447213, 1.341640],
    "rmsnorm": [0.365148, 0.730297, 1.095445, 1.460593],
}


def _spec_ds(norm):  # one row: ds = dy * n = dy * xh (no affine)
    return [dy * xh for dy, xh in zip(SPEC_DY, SPEC_XH[norm])]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mod_shape", ["global", "sample", "sample3"])
def test_spec_worked_example_backward(norm, mod_shape, device):
    x = torch.tensor([[SPEC_X]], device=device, requires_grad=True)
    shape = {"global": (4,), "sample": (1, 4), "sample3": (1, 1, 4)}[mod_shape]
    s = torch.tensor(SPEC_S, device=device).reshape(shape).requires_grad_()
    t = torch.tensor(SPEC_T, device=device).reshape(shape).requires_grad_()
    y = difforge.ops.adaln_modulate(x, s, t, norm=norm, eps=1e-6)
    dx, ds, dt = torch.autograd.grad(y, [x, s, t], torch.tensor([[SPEC_DY]], device=device))
    assert ds.shape == shape and dt.shape == shape and dx.shape == x.shape
    torch.testing.assert_close(dx.flatten().cpu(), torch.tensor(SPEC_DX[norm]), atol=3e-6, rtol=0)
    torch.testing.assert_close(ds.flatten().cpu(), torch.tensor(_spec_ds(norm)), atol=3e-6, rtol=0)
    torch.testing.assert_close(dt.flatten().cpu(), torch.tensor(SPEC_DY), atol=0, rtol=0)
    if norm == "layernorm":
        assert abs(dx.sum().item()) < 1e-5  # spec: sum = 0


@pytest.mark.parametrize("norm", NORMS)
def test_spec_worked_example_gated_backward(norm, device):
    """Spec §3 gated: dh = dhn = dh_ext + dx, do = dhn * g, dg = dhn * o (one row)."""
    g = torch.tensor([0.5, -2.0, 1.0, 0.25])
    o = torch.tensor([[[2.0, 0.5, -1.0, 4.0]]])
    h = torch.tensor([[SPEC_X]]) - g * o  # exact
    dh_ext = torch.tensor([[[0.25, 0.0, -1.0, 0.5]]])
    leaves = [t.to(device).requires_grad_() for t in (h, o, g, torch.tensor(SPEC_S), torch.tensor(SPEC_T))]
    x_out, y = difforge.ops.gated_adaln_modulate(*leaves, norm=norm)
    dh, do, dg, ds, dt = torch.autograd.grad(
        [x_out, y], leaves, [dh_ext.to(device), torch.tensor([[SPEC_DY]], device=device)]
    )
    dhn = dh_ext.flatten() + torch.tensor(SPEC_DX[norm])
    torch.testing.assert_close(dh.flatten().cpu(), dhn, atol=3e-6, rtol=0)
    torch.testing.assert_close(do.flatten().cpu(), dhn * g, atol=6e-6, rtol=0)
    torch.testing.assert_close(dg.flatten().cpu(), dhn * o.flatten(), atol=1.2e-5, rtol=0)
    torch.testing.assert_close(ds.flatten().cpu(), torch.tensor(_spec_ds(norm)), atol=3e-6, rtol=0)
    torch.testing.assert_close(dt.flatten().cpu(), torch.tensor(SPEC_DY), atol=0, rtol=0)


# ---- fp64 finite-difference gradcheck (CPU) ----------------------------------------------------------------

GRADCHECK_CASES = []
for _i, (_layout, _norm, _gate) in enumerate((lo, n, g) for lo in LAYOUTS for n in NORMS for g in GATE_MODES):
    _aff = affine_modes(_norm)[_i % len(affine_modes(_norm))]
    GRADCHECK_CASES.append(pytest.param(_layout, _norm, _aff, _gate, id=f"{_layout}-{_norm}-{_aff}-{_gate}"))
# every affine mode with the layouts whose reductions differ most
GRADCHECK_CASES += [
    pytest.param(lo, n, a, "tensor", id=f"{lo}-{n}-{a}-tensor-affine")
    for lo in ("frame", "repeat", "varlen")
    for n in NORMS
    for a in affine_modes(n)
]


def _gradcheck(case: Case, **kw):
    names = list(case.inputs())
    leaves = [clone_strided(case.inputs()[n]).requires_grad_() for n in names]

    def fn(*tensors):
        x_out, y = call_op(case.replace(**dict(zip(names, tensors))))
        return (x_out, y) if case.gated else y

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, **kw), repr(case)


@pytest.mark.parametrize("layout,norm,affine,gate", GRADCHECK_CASES)
def test_gradcheck_fp64(layout, norm, affine, gate):
    case = make_case(
        layout, norm=norm, affine=affine, gate=gate, dtype=torch.float64, mod_dtype=torch.float64,
        affine_dtype=torch.float64, B=2, L=4, D=3, R=2, seqlens=[2, 0, 3] if "varlen" in layout else None,
        eps=1e-3, seed=stable_seed("gc", layout, norm, affine, gate),
    )  # fmt: skip
    _gradcheck(case)


def test_gradcheck_fp64_chunk_views_of_one_table():
    """scale/shift/gate as chunk views of one [B, 6, D] table: gradients land in the right slices of e."""
    gen = torch.Generator().manual_seed(1)
    e = (torch.randn(2, 6, 3, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    h = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    o = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(e, h, o):
        shift, scale, gate = e.chunk(6, dim=1)[:3]
        return difforge.ops.gated_adaln_modulate(h, o, gate, scale, shift, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (e, h, o), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- fp32 gradients against autograd through the fp64 oracle ------------------------------------------------

GRAD_CASES = [
    pytest.param(layout, norm, gate, id=f"{layout}-{norm}-{gate}")
    for layout in LAYOUTS
    for norm in NORMS
    for gate in GATE_MODES
]


def _check_grads(case: Case, got: dict, want: dict, *, rtol, atol):
    assert set(got) == set(want) == set(case.inputs()), (sorted(got), sorted(want))
    for name, g in got.items():
        inp = case.inputs()[name]
        assert g is not None, f"{name}: no gradient ({case})"
        assert g.shape == inp.shape, f"d{name}: shape {tuple(g.shape)} != input shape {tuple(inp.shape)} ({case})"
        assert g.dtype == inp.dtype, f"d{name}: dtype {g.dtype} != input dtype {inp.dtype} ({case})"
        assert g.device == inp.device
        torch.testing.assert_close(
            g.double(), want[name].double(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"d{n} {case}\n{m}"
        )


def _random_grads(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(case.x.shape, generator=gen).to(case.x.dtype).to(case.x.device)
    dx_out = torch.randn(case.x.shape, generator=gen).to(case.x.dtype).to(case.x.device) if case.gated else None
    return dy, dx_out


@pytest.mark.parametrize("layout,norm,gate", GRAD_CASES)
def test_grads_fp32_match_reference(layout, norm, gate, device):
    affine = affine_modes(norm)[-1]
    case = make_case(
        layout, norm=norm, affine=affine, gate=gate, device=device, seed=stable_seed("g32", layout, norm, gate)
    ).leaf_copies()
    dy, dx_out = _random_grads(case, 7)
    got = op_grads(case, dy, dx_out)
    want = ref_grads(case, dy, dx_out)
    _check_grads(case, got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["sample", "chunk", "frame", "token", "repeat", "varlen"])
def test_grads_without_dx_out(layout, device):
    """Gated op, only y used downstream (x_out's gradient undefined): dh = dx of the norm."""
    case = make_case(layout, norm="rmsnorm", affine="weight", gate="tensor", device=device, seed=3).leaf_copies()
    dy, _ = _random_grads(case, 8)
    _check_grads(case, op_grads(case, dy, None), ref_grads(case, dy, None), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "wanted",
    [("x",), ("scale",), ("shift",), ("weight",), ("bias",), ("o",), ("gate",), ("x", "gate"), ("scale", "bias")],
)
def test_partial_requires_grad(wanted, device):
    """Only some inputs require grad: those gradients are still right, the others are not computed."""
    base = make_case("frame", norm="layernorm", affine="weight_bias", gate="tensor", device=device, seed=12)
    case = base.map_inputs(lambda t: t.detach())
    case = case.replace(**{n: case.inputs()[n].clone().requires_grad_() for n in wanted})
    dy, dx_out = _random_grads(case, 9)
    x_out, y = call_op(case)
    got = torch.autograd.grad([y, x_out], [case.inputs()[n] for n in wanted], [dy, dx_out])
    want = ref_grads(base, dy, dx_out)
    for n, g in zip(wanted, got):
        torch.testing.assert_close(g.double(), want[n], rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"d{n}: {m}")


def test_backward_through_tensor_backward_accumulates_into_leaves():
    """.backward() (not autograd.grad) populates .grad of every leaf, chunk-view table included."""
    gen = torch.Generator().manual_seed(2)
    e = (torch.randn(2, 6, 16, generator=gen) * 0.5).requires_grad_()
    x = torch.randn(2, 8, 16, generator=gen, requires_grad=True)
    shift, scale = e.chunk(6, dim=1)[:2]
    y = difforge.ops.adaln_modulate(x, scale, shift)
    (y * torch.linspace(-1, 1, 16)).sum().backward()

    e64 = e.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    sh64, sc64 = e64.chunk(6, dim=1)[:2]
    y64 = reference(Case(x=x64, scale=sc64, shift=sh64)).y
    (y64 * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(e.grad.double(), e64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    assert e.grad[:, 2:].abs().sum() == 0  # untouched chunks


# ---- gradient dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,mod_dtype,affine_dtype,o_dtype",
    [
        (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ],
    ids=["x32-mod16b-aff16-o16b", "xbf16-mod32", "xfp16-mixed", "all-bf16"],
)
@pytest.mark.parametrize("layout", ["global", "chunk", "frame", "varlen"])
def test_grad_dtypes_and_low_precision_accuracy(layout, dtype, mod_dtype, affine_dtype, o_dtype, device):
    """Gradients come back in each input's dtype and shape; low-precision accuracy FlashAttention-style."""
    case = make_case(
        layout, norm="layernorm", affine="weight_bias", gate="tensor", dtype=dtype, mod_dtype=mod_dtype,
        affine_dtype=affine_dtype, o_dtype=o_dtype, L=8, D=32, device=device, seed=21,
    ).leaf_copies()  # fmt: skip
    dy, dx_out = _random_grads(case, 10)
    got = op_grads(case, dy, dx_out)
    want = ref_grads(case, dy, dx_out)
    base = eager_grads(case, dy, dx_out)
    for name, g in got.items():
        inp = case.inputs()[name]
        assert g.dtype == inp.dtype and g.shape == inp.shape, (name, g.dtype, g.shape, inp.dtype, inp.shape)
        # rounding the result to the gradient's own dtype is unavoidable: one ulp of its largest magnitude
        slack = torch.finfo(g.dtype).eps * want[name].abs().max().item() + 1e-5
        if dtype == torch.float32 and g.dtype == torch.float32:
            torch.testing.assert_close(g.double(), want[name], rtol=1e-4, atol=1e-4)
        else:
            assert_close_fa(g, want[name], base[name], slack=slack, what=f"d{name} {case}")


# ---- larger row counts: multi-block two-pass reductions -------------------------------------------------------

REDUCTION_CASES = [
    # (layout, B, L, groups, R, seqlens): chosen so that segments are longer than, shorter than and not
    # multiples of the reduction block, with and without batch-repeat.
    ("sample", 2, 3000, None, 1, None),
    ("global", 3, 1100, None, 1, None),
    ("frame", 2, 1560, 3, 1, None),  # 520-row frames
    ("frame", 2, 600, 120, 1, None),  # 5-row frames, packed into blocks
    ("repeat_frame", 2, 150, 30, 4, None),  # 5-row frames, batch-repeat: partials summed across repeats
    ("repeat", 3, 700, None, 2, None),
    ("token", 2, 900, None, 1, None),
    ("varlen", 4, 0, None, 1, [1200, 0, 7, 2500]),
    ("varlen_global", 3, 0, None, 1, [333, 1, 2000]),
]


@pytest.mark.parametrize("layout,B,L,groups,R,seqlens", REDUCTION_CASES, ids=lambda v: str(v))
def test_grads_many_rows(layout, B, L, groups, R, seqlens, device):
    case = make_case(
        layout, norm="layernorm", affine="weight_bias", gate="tensor", B=B, L=L, D=16, R=R, groups=groups,
        seqlens=seqlens, device=device, seed=stable_seed("rows", layout, B, L),
    ).leaf_copies()  # fmt: skip
    dy, dx_out = _random_grads(case, 11)
    _check_grads(case, op_grads(case, dy, dx_out), ref_grads(case, dy, dx_out), rtol=1e-4, atol=3e-4)


# ---- determinism ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sample", "global", "frame", "repeat_frame", "varlen"])
def test_backward_is_bitwise_deterministic(layout, device):
    case = make_case(
        layout, norm="layernorm", affine="weight_bias", gate="tensor", B=2, L=1200, D=64, R=2, groups=4,
        seqlens=[700, 0, 1500] if "varlen" in layout else None, device=device, seed=31,
    ).leaf_copies()  # fmt: skip
    dy, dx_out = _random_grads(case, 12)
    first = op_grads(case, dy, dx_out)
    again = op_grads(case, dy, dx_out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op_grads(case, dy, dx_out)
    finally:
        torch.set_num_threads(threads)
    for name in first:
        assert torch.equal(first[name], again[name]), f"d{name} differs between two identical runs ({layout})"
        if device == "cpu":
            assert torch.equal(first[name], single[name]), f"d{name} depends on the thread count ({layout})"


# ---- spec §4.3 invariants of dx -----------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["none", "weight"])
@pytest.mark.parametrize("norm", NORMS)
def test_dx_orthogonality_invariants(norm, affine):
    """LN: sum_c dx_c = 0 and dx.xh = rstd (dxh.xh) eps/(var+eps); RMS: dx.x = rstd (dxh.x) eps/(ms+eps)."""
    eps = 0.05  # large enough that the eps term is visible
    case = make_case(
        "frame", norm=norm, affine=affine, dtype=torch.float64, mod_dtype=torch.float64,
        affine_dtype=torch.float64, eps=eps, x_scale=0.5, L=6, D=24, seed=8,
    ).leaf_copies()  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    dy = torch.randn(case.x.shape, generator=gen, dtype=torch.float64)
    _, y = call_op(case)
    (dx,) = torch.autograd.grad(y, [case.x], dy)

    x = case.x.detach()
    s = case.scale.detach().repeat_interleave(case.x.shape[1] // case.scale.shape[1], dim=1)
    gam = case.weight.detach() if case.weight is not None else torch.ones(x.shape[-1], dtype=torch.float64)
    dxh = dy * (1 + s) * gam
    if norm == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1)
        rstd = 1 / torch.sqrt(var + eps)
        xh = (x - mu) * rstd[..., None]
        torch.testing.assert_close(dx.sum(-1), torch.zeros_like(var), atol=1e-12, rtol=0)
        torch.testing.assert_close((dx * xh).sum(-1), rstd * (dxh * xh).sum(-1) * eps / (var + eps), atol=1e-12, rtol=1e-9)
    else:
        ms = (x * x).mean(-1)
        rstd = 1 / torch.sqrt(ms + eps)
        torch.testing.assert_close((dx * x).sum(-1), rstd * (dxh * x).sum(-1) * eps / (ms + eps), atol=1e-12, rtol=1e-9)
