"""difforge.ops.skiparse_attention against the dense-mask oracle of the spec (§3.1 "Dense-mask oracle", §2 for 1D):
softmax attention over the original N tokens where query i sees key i' iff M_tok / M_grp[i, i'] (skiparse_testlib
``ref_attention``, explicit masked softmax in float64).

* Forward and backward (grads of q, k, v) in float64 (1e-10), float32 (1e-5) and bfloat16 (the flash family's
  accuracy criterion: at most ~2x the error of the same composition evaluated eagerly in bfloat16), on grids
  without padding, with padded H / W, with empty sub-sequences (finite outputs and grads), P = 3, dims = 1, both
  modes, a custom scale, GQA and a fused-QKV (non-contiguous) input.
* P = 1 is dense attention: bitwise equal to difforge.ops.flash_attention (forward and grads).
* torch.compile(fullgraph=True, backend="aot_eager") of a block using skiparse_attention and the permutation ops
  matches eager and the oracle.
"""

from __future__ import annotations

import pytest
import torch

from skiparse_testlib import (
    MODES,
    assert_bitwise,
    assert_close_scaled,
    check_attention,
    random_tensor,
    ref_attention,
    run_with_grads,
    stable_seed,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}

# (grid, P, dims): label
CASES = {
    "4x4-P2-no_pad": ((2, 4, 4), 2, 2),
    "3x5-P2-padded": ((1, 3, 5), 2, 2),
    "1x6-P2-empty_subseq": ((2, 1, 6), 2, 2),
    "5x7-P3-padded": ((1, 5, 7), 3, 2),
    "2x9-P3-empty_subseq": ((2, 2, 9), 3, 2),
    "1d-N30-P2": ((2, 3, 5), 2, 1),
    "1d-N28-P3": ((1, 4, 7), 3, 1),
}


def _qkv(grid, dtype, seed, device, B=2, Hq=2, Hkv=None, D=8):
    N = grid[0] * grid[1] * grid[2]
    Hkv = Hq if Hkv is None else Hkv
    q = random_tensor((B, N, Hq, D), torch.float32, seed=seed) * 1.5
    k = random_tensor((B, N, Hkv, D), torch.float32, seed=seed + 1)
    v = random_tensor((B, N, Hkv, D), torch.float32, seed=seed + 2)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def check_against_oracle(q, k, v, *, grid, P, mode, dims, scale=None):
    layout = dict(grid=grid, sparse_ratio=P, mode=mode, dims=dims, scale=scale)
    check_attention(lambda a, b, c: ops.skiparse_attention(a, b, c, **layout), q, k, v, grid=grid, P=P, mode=mode,
                    dims=dims, scale=scale, tol=TOL)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_masked_sdpa(device, case, mode, dtype):
    grid, P, dims = CASES[case]
    q, k, v = _qkv(grid, dtype, stable_seed(case, mode), device)
    check_against_oracle(q, k, v, grid=grid, P=P, mode=mode, dims=dims)


@pytest.mark.parametrize("mode", MODES)
def test_scale_gqa_and_fused_qkv(device, mode):
    """A custom scale; fewer kv heads (GQA); q, k, v as strided views of one fused [B, N, 3, H, D] projection."""
    grid, P = (1, 3, 5), 2
    q, k, v = _qkv(grid, torch.float32, 5, device, Hq=4, Hkv=2)
    check_against_oracle(q, k, v, grid=grid, P=P, mode=mode, dims=2, scale=0.3)
    q, k, v = _qkv(grid, torch.float32, 6, device, Hq=2)
    fused = torch.stack([q, k, v], dim=2)  # [B, N, 3, H, D]
    qf, kf, vf = fused.unbind(dim=2)
    assert not qf.is_contiguous()
    layout = dict(grid=grid, sparse_ratio=P, mode=mode)
    assert_bitwise(ops.skiparse_attention(qf, kf, vf, **layout), ops.skiparse_attention(q, k, v, **layout), "fused")
    check_against_oracle(qf, kf, vf, grid=grid, P=P, mode=mode, dims=2)


@pytest.mark.parametrize("case", ["1x6-P2-empty_subseq", "2x9-P3-empty_subseq"])
def test_empty_subsequences_finite(device, case):
    """Sub-sequences without any valid token (spec §11): outputs and gradients are finite, never NaN."""
    grid, P, dims = CASES[case]
    for mode in MODES:
        assert 0 in ops.skiparse_seqlens(grid, P, mode, dims=dims).tolist(), (case, mode)
        q, k, v = (t.requires_grad_() for t in _qkv(grid, torch.float32, 3, device))
        out = ops.skiparse_attention(q, k, v, grid=grid, sparse_ratio=P, mode=mode, dims=dims)
        assert torch.isfinite(out).all()
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_p1_is_flash_attention_bitwise(device, dtype, dims):
    """Invariant 5: P = 1 (G = 1, no padding, identity maps) equals dense flash_attention bitwise, with grads."""
    grid = (2, 3, 5)
    q, k, v = _qkv(grid, dtype, 17, device)
    dout = random_tensor(q.shape, dtype, seed=18, device=device)
    want, want_grads = run_with_grads(lambda a, b, c: ops.flash_attention(a, b, c)[0], q, k, v, dout)
    for mode in MODES:
        layout = dict(grid=grid, sparse_ratio=1, mode=mode, dims=dims)
        got, got_grads = run_with_grads(lambda a, b, c: ops.skiparse_attention(a, b, c, **layout), q, k, v, dout)
        assert_bitwise(got, want, f"out {mode}")
        for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
            assert_bitwise(g, w, f"{name} {mode}")


# ---- torch.compile ---------------------------------------------------------------------------------------------

GRID, P_COMPILE = (2, 3, 5), 2


def _block(x, w_qkv):
    """Attention in token mode, then the output taken to the group layout and back (switch + restore)."""
    B, N, C = x.shape
    q, k, v = (x @ w_qkv).view(B, N, 3, 2, C // 2).unbind(dim=2)
    out = ops.skiparse_attention(q, k, v, grid=GRID, sparse_ratio=P_COMPILE, mode="token")
    xs = ops.skiparse_rearrange(out.reshape(B, N, C), GRID, P_COMPILE, "token")
    xs = ops.skiparse_switch(torch.tanh(xs), GRID, P_COMPILE, "token")
    return ops.skiparse_restore(xs, GRID, P_COMPILE, "group")


def _reference_block(x, w_qkv):
    B, N, C = x.shape
    q, k, v = (x @ w_qkv).view(B, N, 3, 2, C // 2).unbind(dim=2)
    return torch.tanh(ref_attention(q, k, v, GRID, P_COMPILE, "token").reshape(B, N, C))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=gen).to(device)
    w = (torch.randn(16, 48, generator=gen) / 4).to(device)
    dy = torch.randn(2, 30, 16, generator=gen).to(device)

    def run(fn, dtype=torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w)]
        y = fn(*leaves)
        return y.detach(), torch.autograd.grad(y, leaves, dy.to(dtype))

    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    y_c, g_c = run(compiled)
    y_e, g_e = run(_block)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    y_r, g_r = run(_reference_block, torch.float64)
    assert_close_scaled(y_c, y_r, 1e-5, "compiled vs oracle")
    for name, a, r in zip(("dx", "dw"), g_c, g_r):
        assert_close_scaled(a, r, 2e-5, f"compiled {name} vs oracle")
