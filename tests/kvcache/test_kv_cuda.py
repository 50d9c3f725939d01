"""CUDA kernels of the kvcache family against the CPU kernels (the reference the CUDA path is validated
against): the quantizer bit for bit, attention to fp32 accumulation-order tolerance. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import difforge  # noqa: F401  (loads the op library)
from difforge.ops import kv_dequantize, kv_quantize, quantized_kv_attention

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("meta_dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group_size", [("token", 32), ("token", 2), ("channel", 16)])
def test_quantize_matches_cpu_bitwise(dtype, meta_dtype, bits, axis, group_size):
    gen = torch.Generator().manual_seed(bits)
    x = (3 * torch.randn(2, 37, 3, 64, generator=gen)).to(dtype)
    cpu = kv_quantize(x, bits=bits, group_size=group_size, axis=axis, meta_dtype=meta_dtype)
    gpu = kv_quantize(x.cuda(), bits=bits, group_size=group_size, axis=axis, meta_dtype=meta_dtype)
    for name, a, b in zip(("codes", "step", "zero"), cpu, gpu):
        assert torch.equal(a, b.cpu()), name
    back_cpu = kv_dequantize(*cpu, bits=bits, group_size=group_size, axis=axis, dtype=dtype)
    back_gpu = kv_dequantize(*gpu, bits=bits, group_size=group_size, axis=axis, dtype=dtype)
    torch.testing.assert_close(back_gpu.cpu(), back_cpu, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("jensen", ["none", "taylor2", "taylor4", "exact"])
@pytest.mark.parametrize("sink", [False, True])
def test_attention_matches_cpu(dtype, jensen, sink):
    gen = torch.Generator().manual_seed(7)
    B, Lq, Hq, Hkv, D, Lc, Ls = 2, 45, 8, 2, 128, 700, 20

    def randn(L, H, std=1.0):
        return (std * torch.randn(B, L, H, D, generator=gen)).to(dtype)

    q, k_cur, v_cur = randn(Lq, Hq, std=3.0), randn(Lq, Hkv), randn(Lq, Hkv)
    k_q, v_q = kv_quantize(randn(Lc, Hkv), bits=2), kv_quantize(randn(Lc, Hkv), bits=2)
    extra = dict(k_sink=randn(Ls, Hkv), v_sink=randn(Ls, Hkv)) if sink else {}
    cpu = quantized_kv_attention(q, k_cur, v_cur, *k_q, *v_q, bits=2, jensen=jensen, **extra)
    cuda_extra = {k: v.cuda() for k, v in extra.items()}
    gpu = quantized_kv_attention(
        q.cuda(), k_cur.cuda(), v_cur.cuda(), *(t.cuda() for t in k_q), *(t.cuda() for t in v_q), bits=2,
        jensen=jensen, **cuda_extra,
    )  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=tol, rtol=tol)
