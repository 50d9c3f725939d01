"""CUDA kernels agree with the CPU kernels (and, through the device-parametrized tests, with the oracle).

Everything here is marked ``cuda``: skipped without a GPU, selected by ``pytest -m cuda``.
"""

from __future__ import annotations

import pytest
import torch

from adaln_testlib import GATE_MODES, NORMS, call_op, make_case, op_grads, ref_grads, reference

pytestmark = pytest.mark.cuda
difforge = pytest.importorskip("difforge")

LAYOUTS = ["global", "sample", "chunk", "frame", "token", "repeat", "repeat_frame", "varlen", "varlen_global"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("gate", GATE_MODES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_cpu(layout, norm, gate, dtype):
    affine = "weight_bias" if norm == "layernorm" else "weight"
    cpu = make_case(layout, norm=norm, affine=affine, gate=gate, dtype=dtype, L=12, D=200, seed=1).leaf_copies()
    gpu = cpu.to("cuda").leaf_copies()
    gen = torch.Generator().manual_seed(2)
    dy = torch.randn(cpu.x.shape, generator=gen).to(dtype)
    dx_out = torch.randn(cpu.x.shape, generator=gen).to(dtype) if cpu.gated else None

    xo_c, y_c = call_op(cpu)
    xo_g, y_g = call_op(gpu)
    ulp = torch.finfo(dtype).eps
    # both round an fp32 result once: at most one output ulp apart (plus fp32 reassociation)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=ulp, atol=ulp)
    torch.testing.assert_close(y_g.cpu(), y_c, **tol)
    if cpu.gated:
        torch.testing.assert_close(xo_g.cpu(), xo_c, **tol)
    torch.testing.assert_close(y_g.double().cpu(), reference(cpu).y, rtol=1e-2, atol=3e-2)

    g_c = op_grads(cpu, dy, dx_out)
    g_g = op_grads(gpu, dy.cuda(), None if dx_out is None else dx_out.cuda())
    for k in g_c:
        assert g_g[k].shape == g_c[k].shape and g_g[k].dtype == g_c[k].dtype, k
        gt = dict(rtol=1e-4, atol=1e-4) if g_c[k].dtype == torch.float32 else dict(rtol=2 * ulp, atol=2 * ulp)
        scale = 1 + g_c[k].abs().max().item()
        torch.testing.assert_close(g_g[k].cpu().float(), g_c[k].float(), rtol=gt["rtol"], atol=gt["atol"] * scale, msg=k)


@pytest.mark.parametrize("D", [1, 255, 1536, 2240, 5120, 6144, 65536])
def test_cuda_large_and_odd_hidden_sizes(D):
    case = make_case("sample", norm="layernorm", affine="weight_bias", gate="tensor", B=2, L=3, D=D, seed=D)
    case = case.to("cuda").leaf_copies()
    x_out, y = call_op(case)
    ref = reference(case)
    torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5)
    dy = torch.randn(case.x.shape, device="cuda")
    got, want = op_grads(case, dy), ref_grads(case, dy)
    for k in got:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-4, msg=k)


def test_cuda_bitwise_deterministic_reductions_large():
    """Wan-like per-frame backward on the GPU: repeated runs give the same bits (no atomics)."""
    case = make_case("frame", norm="layernorm", affine="weight_bias", gate="tensor", B=2, L=1560 * 3, groups=3,
                     D=1536, dtype=torch.bfloat16, seed=5).to("cuda").leaf_copies()  # fmt: skip
    dy = torch.randn(case.x.shape, device="cuda", dtype=torch.bfloat16)
    first = op_grads(case, dy, dy)
    for _ in range(3):
        again = op_grads(case, dy, dy)
        for k in first:
            assert torch.equal(first[k], again[k]), k
