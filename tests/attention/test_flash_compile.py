"""torch.compile(fullgraph=True) traces through difforge.ops.flash_attention (fake kernels + registered autograd):
the compiled function matches eager (forward and backward) and the fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from attention_testlib import Case, assert_close_ref, make_case, reference

difforge = pytest.importorskip("difforge")


def _block(x, wq, wkv, bias_q=None, bias_k=None, *, causal, Hq, Hkv, cu=None, max_len=None):
    """A small attention block: fused projections, attention (with its lse in the loss), output mixing."""
    D = wq.shape[1] // Hq
    lead = x.shape[:-1]
    q = (x @ wq).view(*lead, Hq, D)
    kv = (x @ wkv).view(*lead, 2, Hkv, D)
    k, v = kv.unbind(dim=-3)  # non-contiguous views of the fused kv projection
    out, lse = difforge.ops.flash_attention(
        q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
        logit_bias_q=bias_q, logit_bias_k=bias_k,
    )  # fmt: skip
    y = torch.tanh(out.reshape(*lead, Hq * D))
    return y, lse


def _reference_block(x, wq, wkv, bias_q=None, bias_k=None, *, causal, Hq, Hkv, cu=None, max_len=None):
    D = wq.shape[1] // Hq
    lead = x.shape[:-1]
    q = (x @ wq).view(*lead, Hq, D)
    k, v = (x @ wkv).view(*lead, 2, Hkv, D).unbind(dim=-3)
    out, lse = reference(Case(q=q, k=k, v=v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, bias_q=bias_q,
                              bias_k=bias_k))  # fmt: skip
    return torch.tanh(out.reshape(*lead, Hq * D)), lse


CONFIGS = {
    "batch_causal_gqa": dict(varlen=False, bias=False, causal=True, Hq=4, Hkv=2),
    "varlen_bias": dict(varlen=True, bias=True, causal=False, Hq=2, Hkv=2),
}


def _run(backend, config, device):
    torch._dynamo.reset()
    cfg = CONFIGS[config]
    Hq, Hkv, D, C = cfg["Hq"], cfg["Hkv"], 16, 24
    gen = torch.Generator().manual_seed(0)
    if cfg["varlen"]:
        cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=device)
        x = torch.randn(12, C, generator=gen).to(device)
        lead = (12,)
        max_len = 7
    else:
        cu, max_len = None, None
        x = torch.randn(2, 9, C, generator=gen).to(device)
        lead = (2, 9)
    wq = (torch.randn(C, Hq * D, generator=gen) / C**0.5).to(device)
    wkv = (torch.randn(C, 2 * Hkv * D, generator=gen) / C**0.5).to(device)
    bq = bk = None
    if cfg["bias"]:
        bq = torch.randn(*lead, Hq, 3, generator=gen).to(device)
        bk = torch.randn(*lead, Hkv, 3, generator=gen).to(device)
    kw = dict(causal=cfg["causal"], Hq=Hq, Hkv=Hkv, cu=cu, max_len=max_len)
    params = [t for t in (x, wq, wkv, bq, bk) if t is not None]

    def run(fn):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        args = leaves + [None] * (5 - len(leaves))
        y, lse = fn(*args, **kw)
        finite = torch.isfinite(lse)
        weights = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
        loss = (y * weights).sum() + torch.where(finite, lse, 0).sum()
        grads = torch.autograd.grad(loss, leaves)
        return y.detach(), lse.detach(), grads

    compiled = torch.compile(_block, fullgraph=True, backend=backend)
    y_c, lse_c, g_c = run(compiled)
    y_e, lse_e, g_e = run(_block)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_c, lse_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # and both against the fp64 oracle
    params64 = [p.detach().double().requires_grad_() for p in params]
    y_r, lse_r = _reference_block(*params64, *[None] * (5 - len(params64)), **kw)
    assert_close_ref(y_c, y_r, "compiled y", rtol=0, atol=2e-5)
    assert_close_ref(lse_c, lse_r, "compiled lse", rtol=0, atol=2e-5)
    finite = torch.isfinite(lse_r)
    loss_r = (y_r * torch.linspace(-1, 1, y_r.numel(), device=device, dtype=torch.float64).view_as(y_r)).sum()
    loss_r = loss_r + torch.where(finite, lse_r, 0).sum()
    g_r = torch.autograd.grad(loss_r, params64)
    for i, (a, r) in enumerate(zip(g_c, g_r)):
        assert_close_ref(a, r, f"compiled grad {i}", rtol=0, atol=5e-5)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_compile_fullgraph_aot_eager(device, config):
    _run("aot_eager", config, device)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compile_fullgraph_inductor(device, config):
    _run("inductor", config, device)


def test_compile_dynamic_shapes(device):
    """A second sequence length reuses (or recompiles) the graph without breaking it; results match the oracle."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def f(q, k, v):
        return difforge.ops.flash_attention(q, k, v, causal=True)

    for L in (7, 19):
        case = make_case(B=1, Lq=L, Lk=L + 3, Hq=2, D=16, causal=True, device=device, seed=L)
        out, lse = f(case.q, case.k, case.v)
        ref_out, ref_lse = reference(case)
        assert_close_ref(out, ref_out, f"out L={L}", rtol=0, atol=2e-5)
        assert_close_ref(lse, ref_lse, f"lse L={L}", rtol=0, atol=2e-5)
