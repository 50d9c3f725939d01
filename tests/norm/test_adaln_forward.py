"""Forward of the fused adaLN norm-modulate ops against the plain-PyTorch oracle (spec §1, §3, §4.1, §4.5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaln_testlib import (
    GATE_MODES,
    LAYOUTS,
    NORMS,
    Case,
    affine_modes,
    assert_close_fa,
    assert_within_ulps,
    call_op,
    call_raw,
    eager,
    make_case,
    reference,
    stable_seed,
)

difforge = pytest.importorskip("difforge")

FORWARD_CASES = [
    pytest.param(layout, norm, affine, gate, id=f"{layout}-{norm}-{affine}-{gate}")
    for layout in LAYOUTS
    for norm in NORMS
    for affine in affine_modes(norm)
    for gate in GATE_MODES
]


# ---- spec §3 worked vectors (independent numbers) ------------------------------------------------------

SPEC_X = [1.0, 2.0, 3.0, 4.0]
SPEC_S = [0.5, 0.0, -0.5, 1.0]
SPEC_T = [0.1, 0.2, 0.3, 0.4]
SPEC = {
    "layernorm": dict(
        mean=2.5,
        rstd=0.8944268,
        y=[-1.912461, -0.247213, 0.523607, 3.083282],
    ),
    "rmsnorm": dict(
        rstd=0.3651483,
        y=[0.647723, 0.930297, 0.847723, 3.321187],
    ),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mod_shape", ["global", "sample", "sample3"])
def test_spec_worked_example_forward(norm, mod_shape, device):
    x = torch.tensor([[SPEC_X]], device=device)
    s = torch.tensor(SPEC_S, device=device)
    t = torch.tensor(SPEC_T, device=device)
    if mod_shape == "sample":
        s, t = s[None], t[None]
    elif mod_shape == "sample3":
        s, t = s[None, None], t[None, None]
    y = difforge.ops.adaln_modulate(x, s, t, norm=norm, eps=1e-6)
    assert y.shape == (1, 1, 4) and y.dtype == torch.float32
    torch.testing.assert_close(y.flatten().cpu(), torch.tensor(SPEC[norm]["y"]), atol=2e-6, rtol=0)

    y_raw, mean, rstd = torch.ops.difforge.adaln_modulate(x, s, t, None, None, norm, 1e-6, 1, None, 0)
    torch.testing.assert_close(y_raw, y, atol=0, rtol=0)
    assert rstd.dtype == torch.float32 and rstd.shape == (1,)
    torch.testing.assert_close(rstd.cpu(), torch.tensor([SPEC[norm]["rstd"]]), atol=1e-6, rtol=0)
    if norm == "layernorm":
        assert mean.dtype == torch.float32 and mean.shape == (1,)
        torch.testing.assert_close(mean.cpu(), torch.tensor([SPEC[norm]["mean"]]), atol=1e-7, rtol=0)
    else:
        assert mean.numel() == 0


@pytest.mark.parametrize("norm", NORMS)
def test_spec_worked_example_gated_forward(norm, device):
    """Spec §3: choosing h = x - g * o must give the same y, and x_out = x."""
    x = torch.tensor([[SPEC_X]], dtype=torch.float64)
    g = torch.tensor([0.5, -2.0, 1.0, 0.25], dtype=torch.float64)
    o = torch.tensor([[[2.0, 0.5, -1.0, 4.0]]], dtype=torch.float64)
    h = x - g * o  # exact in binary floating point: [0, 3, 4, 3]
    s = torch.tensor(SPEC_S)
    t = torch.tensor(SPEC_T)
    x_out, y = difforge.ops.gated_adaln_modulate(
        h.float().to(device), o.float().to(device), g.float().to(device), s.to(device), t.to(device), norm=norm
    )
    torch.testing.assert_close(x_out.cpu(), x.float(), atol=0, rtol=0)
    torch.testing.assert_close(y.flatten().cpu(), torch.tensor(SPEC[norm]["y"]), atol=2e-6, rtol=0)


# ---- fp32 against the fp64 oracle, every layout x norm x affine x gate mode -----------------------------


@pytest.mark.parametrize("layout,norm,affine,gate", FORWARD_CASES)
def test_forward_fp32_matches_reference(layout, norm, affine, gate, device):
    case = make_case(layout, norm=norm, affine=affine, gate=gate, device=device, seed=stable_seed(layout, norm, affine, gate))
    x_out, y = call_op(case)
    ref = reference(case)
    assert y.shape == case.x.shape and y.dtype == case.x.dtype and y.device == case.x.device
    torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}\n{m}")
    if case.gated:
        assert x_out.shape == case.x.shape and x_out.dtype == case.x.dtype
        torch.testing.assert_close(x_out.double(), ref.x_out, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}\n{m}")
    else:
        assert x_out is None


@pytest.mark.parametrize("mod_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["global", "chunk", "frame", "varlen"])
def test_forward_fp32_x_low_precision_modulation(layout, mod_dtype, device):
    """Modulation / gate / affine tensors in bf16/fp16 with an fp32 x: their values are used exactly."""
    case = make_case(
        layout, norm="layernorm", affine="weight_bias", gate="tensor", mod_dtype=mod_dtype,
        affine_dtype=mod_dtype, device=device, seed=3,
    )  # fmt: skip
    x_out, y = call_op(case)
    ref = reference(case)
    assert y.dtype == torch.float32 and x_out.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_out.double(), ref.x_out, rtol=1e-6, atol=1e-6)


# ---- bf16 / fp16 ------------------------------------------------------------------------------------------

LOWP_LAYOUTS = ["none", "global", "sample", "chunk", "frame", "token", "repeat", "varlen"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mod_dtype", ["fp32", "same"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LOWP_LAYOUTS)
def test_forward_low_precision(layout, norm, mod_dtype, dtype, device):
    """bf16/fp16 x: y within one output ulp of the oracle (spec §4.1), and at most 2x eager's error."""
    md = torch.float32 if mod_dtype == "fp32" else dtype
    case = make_case(
        layout, norm=norm, affine="weight", dtype=dtype, mod_dtype=md, affine_dtype=md, L=8, D=64,
        device=device, seed=11,
    )  # fmt: skip
    _, y = call_op(case)
    assert y.dtype == dtype and y.shape == case.x.shape
    ref = reference(case)
    _, y_eager = eager(case)
    # fp32 arithmetic before the single rounding: a relative 1e-6 of the row's magnitude on top of the ulp.
    assert_within_ulps(y, ref.y, dtype, ulps=1.0, atol=1e-6 * (1 + ref.y.abs().max().item()), what=repr(case))
    assert_close_fa(y, ref.y, y_eager, slack=1e-3, what=repr(case))


@pytest.mark.parametrize("dtype,o_dtype", [
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),  # Wan: fp32 residual stream, bf16 branch output
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
], ids=["bf16-bf16", "fp16-fp16", "fp32-bf16", "bf16-fp32", "fp16-bf16"])  # fmt: skip
@pytest.mark.parametrize("gate", ["tensor", "none"])
@pytest.mark.parametrize("layout", ["sample", "frame", "repeat", "varlen_global"])
def test_gated_forward_mixed_dtypes(layout, gate, dtype, o_dtype, device):
    case = make_case(
        layout, norm="layernorm", affine="weight_bias", gate=gate, dtype=dtype, o_dtype=o_dtype, L=8, D=48,
        device=device, seed=5,
    )  # fmt: skip
    x_out, y = call_op(case)
    assert x_out.dtype == dtype and y.dtype == dtype
    ref = reference(case)
    x_out_eager, y_eager = eager(case)
    if dtype == torch.float32:
        torch.testing.assert_close(x_out.double(), ref.x_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5)
        return
    # x_out = h + g*o rounded once (fp32 arithmetic): within one ulp of the oracle's residual stream.
    assert_within_ulps(x_out, ref.x_out, dtype, ulps=1.0, atol=1e-6, what=f"x_out {case}")
    assert_close_fa(x_out, ref.x_out, x_out_eager, slack=1e-3, what=f"x_out {case}")
    assert_close_fa(y, ref.y, y_eager, slack=1e-2 if dtype == torch.bfloat16 else 2e-3, what=f"y {case}")


# ---- mean / rstd (raw op) against torch.native_layer_norm --------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["sample", "token", "varlen"])
def test_mean_rstd_match_native_layer_norm(layout, norm, dtype, gated, device):
    case = make_case(layout, norm=norm, dtype=dtype, gate="tensor" if gated else "off", D=40, device=device, seed=2)
    x_out, y, mean, rstd = call_raw(case)
    normalized = x_out if gated else case.x  # the op's own x_out is checked against the oracle elsewhere
    rows = case.x.numel() // case.x.shape[-1]
    assert rstd.shape == (rows,) and rstd.dtype == torch.float32
    if norm == "layernorm":
        assert mean.shape == (rows,) and mean.dtype == torch.float32
        _, m_ref, r_ref = torch.native_layer_norm(normalized.float(), (case.x.shape[-1],), None, None, case.eps)
        torch.testing.assert_close(mean, m_ref.reshape(rows), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rstd, r_ref.reshape(rows), rtol=1e-5, atol=1e-6)
    else:
        assert mean.numel() == 0
        xd = normalized.double()
        r_ref = 1.0 / torch.sqrt((xd * xd).mean(-1) + case.eps)
        torch.testing.assert_close(rstd.double(), r_ref.reshape(rows), rtol=1e-5, atol=1e-7)
    # independent of the op's x_out: the oracle's statistics too
    ref = reference(case)
    torch.testing.assert_close(rstd.double(), ref.rstd, rtol=1e-4, atol=1e-6)
    if norm == "layernorm":
        torch.testing.assert_close(mean.double(), ref.mean, rtol=1e-4, atol=1e-5)


def test_raw_ops_match_public_wrappers():
    """The wrappers return exactly the raw ops' outputs (and the raw outputs agree with the oracle)."""
    case = make_case("frame", norm="layernorm", affine="weight", seed=4)
    _, y_pub = call_op(case)
    _, y_raw, _, _ = call_raw(case)
    torch.testing.assert_close(y_raw.double(), reference(case).y, rtol=1e-5, atol=1e-5)
    assert torch.equal(y_pub, y_raw)
    g = case.replace(gated=True, o=torch.randn_like(case.x), gate=None)
    xo_pub, y_pub = call_op(g)
    xo_raw, y_raw, _, _ = call_raw(g)
    torch.testing.assert_close(y_raw.double(), reference(g).y, rtol=1e-5, atol=1e-5)
    assert torch.equal(xo_pub, xo_raw) and torch.equal(y_pub, y_raw)


def test_outputs_do_not_alias_inputs():
    case = make_case("sample", gate="tensor")
    x_before, o_before = case.x.clone(), case.o.clone()
    x_out, y = call_op(case)
    assert torch.equal(case.x, x_before) and torch.equal(case.o, o_before), "inputs were modified"
    assert y.data_ptr() != case.x.data_ptr() and x_out.data_ptr() != case.x.data_ptr()


def test_non_contiguous_x_and_o():
    """x / o given as non-contiguous views (a transposed buffer) are read correctly."""
    base = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    x = base.transpose(1, 2)  # [2, 4, 8], stride(-1) != 1
    o = torch.randn(2, 8, 4).transpose(1, 2)
    assert not x.is_contiguous()
    case = Case(x=x, o=o, gate=torch.randn(2, 8), scale=torch.randn(2, 8) * 0.5, shift=torch.randn(2, 8), gated=True)
    x_out, y = call_op(case)
    ref = reference(case)
    torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_out.double(), ref.x_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [1e-5, 1e-2, 0.3])
def test_eps_is_inside_the_sqrt(norm, eps):
    case = make_case("sample", norm=norm, eps=eps, x_scale=0.2, seed=9)
    _, y = call_op(case)
    torch.testing.assert_close(y.double(), reference(case).y, rtol=1e-5, atol=1e-5)


def test_plain_norms_match_torch_functional():
    """Sanity of the oracle itself against torch (so that a wrong oracle cannot hide a wrong op)."""
    case = make_case("none", norm="layernorm", affine="weight_bias", seed=1)
    torch.testing.assert_close(
        reference(case).y.float(), F.layer_norm(case.x, (8,), case.weight, case.bias, case.eps), rtol=1e-5, atol=1e-6
    )
    case = make_case("none", norm="rmsnorm", affine="weight", seed=1)
    torch.testing.assert_close(
        reference(case).y.float(), F.rms_norm(case.x, (8,), case.weight, case.eps), rtol=1e-5, atol=1e-6
    )
