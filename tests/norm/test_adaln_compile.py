"""torch.compile(fullgraph=True) traces through the norm ops (fake kernels + registered autograd)."""

from __future__ import annotations

import pytest
import torch

from adaln_testlib import Case, clone_strided, make_case, reference

difforge = pytest.importorskip("difforge")


def _block(h, o, e, w, b, *, norm, cu_seqlens=None):
    """A DiT-style step: gated residual + modulated norm, then a second modulated norm of its output."""
    # e: [B, 6, D] (-> [B, 1, D] views) or, for packed varlen, [B, 6D] (-> [B, D] views)
    shift, scale, gate, shift2, scale2, _ = e.chunk(6, dim=1)
    x_out, y = difforge.ops.gated_adaln_modulate(
        h, o, gate, scale, shift, weight=w, bias=b, norm=norm, cu_seqlens=cu_seqlens
    )
    y2 = difforge.ops.adaln_modulate(torch.tanh(y), scale2, shift2, norm=norm, cu_seqlens=cu_seqlens)
    return x_out, y2


def _reference_block(h, o, e, w, b, *, norm, cu_seqlens=None):
    shift, scale, gate, shift2, scale2, _ = e.chunk(6, dim=1)
    first = reference(Case(x=h, o=o, gate=gate, scale=scale, shift=shift, weight=w, bias=b, gated=True, norm=norm,
                           cu_seqlens=cu_seqlens), round_x_out=False)  # fmt: skip
    second = reference(Case(x=torch.tanh(first.y), scale=scale2, shift=shift2, norm=norm, cu_seqlens=cu_seqlens))
    return first.x_out, second.y


@pytest.mark.parametrize(
    "backend,norm,varlen",
    [("inductor", "layernorm", False), ("aot_eager", "rmsnorm", True)],
    ids=["inductor-layernorm-chunk", "aot_eager-rmsnorm-varlen"],
)
def test_compile_fullgraph_forward_and_backward(backend, norm, varlen):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    D = 16
    if varlen:
        cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
        h = torch.randn(8, D, generator=gen)
        o = torch.randn(8, D, generator=gen)
        e = torch.randn(3, 6 * D, generator=gen) * 0.5
    else:
        cu = None
        h = torch.randn(2, 6, D, generator=gen)
        o = torch.randn(2, 6, D, generator=gen)
        e = torch.randn(2, 6, D, generator=gen) * 0.5
    w = torch.randn(D, generator=gen) * 0.3 + 1
    b = torch.randn(D, generator=gen) * 0.3 if norm == "layernorm" else None
    inputs = [t for t in (h, o, e, w, b) if t is not None]
    dx_out = torch.randn(h.shape, generator=gen)
    dy = torch.randn(h.shape, generator=gen)

    def run(fn, dtype):
        leaves = [clone_strided(t, dtype=dtype).requires_grad_() for t in inputs]
        hh, oo, ee, ww = leaves[:4]
        bb = leaves[4] if b is not None else None
        x_out, y = fn(hh, oo, ee, ww, bb, norm=norm, cu_seqlens=cu)
        grads = torch.autograd.grad([x_out, y], leaves, [dx_out.to(dtype), dy.to(dtype)])
        return x_out.detach(), y.detach(), grads

    compiled = torch.compile(_block, fullgraph=True, backend=backend)
    c_xo, c_y, c_g = run(compiled, torch.float32)
    e_xo, e_y, e_g = run(_block, torch.float32)
    r_xo, r_y, r_g = run(_reference_block, torch.float64)

    torch.testing.assert_close(c_y, e_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_xo, e_xo, rtol=0, atol=0)
    torch.testing.assert_close(c_y.double(), r_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_xo.double(), r_xo, rtol=1e-6, atol=1e-6)
    for cg, eg, rg in zip(c_g, e_g, r_g):
        torch.testing.assert_close(cg, eg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cg.double(), rg, rtol=1e-4, atol=1e-4)


def test_compiled_module_no_graph_breaks():
    """The nn module compiles with fullgraph=True too (its parameters flow into the op)."""
    torch._dynamo.reset()
    module = difforge.nn.AdaLNModulate(32, norm="rmsnorm", elementwise_affine=True)
    case = make_case("frame", norm="rmsnorm", D=32, L=6, seed=3)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(case.x, case.scale, case.shift)
    torch.testing.assert_close(y.double(), reference(case.replace(weight=module.weight)).y, rtol=1e-5, atol=1e-5)
