"""The main job until the pipelines land: one DiT block's norm and attention path end to end.

A Wan-style block (a [B, 6, D] modulation table chunked into views) runs adaLN-modulate, self-attention
on q/k/v views of a fused projection, and the gated residual + second adaLN-modulate through the fused
ops, forward and backward; it is checked against the plain-PyTorch composition (SDPA for attention),
and the norm and attention benchmark tables are printed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import difforge
from difforge.nn import AdaLNModulate

HEAD_DIM = 128


def _qkv(y, w_qkv):
    B, L, D = y.shape
    return (y @ w_qkv).view(B, L, 3, D // HEAD_DIM, HEAD_DIM).unbind(2)  # [B, L, H, Dh] strided views


def _reference(x, e, w_qkv, norm1, norm2):
    shift1, scale1, gate1, shift2, scale2, _ = e.chunk(6, dim=1)
    y1 = (F.layer_norm(x.float(), x.shape[-1:], eps=norm1.eps) * (1 + scale1) + shift1).to(x.dtype)
    q, k, v = (t.transpose(1, 2) for t in _qkv(y1, w_qkv))
    attn_out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    x = x + gate1 * attn_out
    y2 = (F.layer_norm(x.float(), x.shape[-1:], eps=norm2.eps) * (1 + scale2) + shift2).to(x.dtype)
    return x, y1, y2


def _fused(x, e, w_qkv, norm1, norm2):
    shift1, scale1, gate1, shift2, scale2, _ = e.chunk(6, dim=1)  # [B, 1, D] views, read in place
    y1 = norm1(x, scale1, shift1)
    attn_out, _ = difforge.ops.flash_attention(*_qkv(y1, w_qkv))
    x, y2 = norm2.forward_gated(x, attn_out.flatten(2), gate1, scale2, shift2)
    return x, y1, y2


def run(device: str | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, L, D = 2, 1024, 1536  # Wan2.1-1.3B width
    print(f"difforge {difforge.__version__} demo on {device} ({dtype}): DiT block norm + attention path, "
          f"B={B} L={L} D={D} heads={D // HEAD_DIM}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=gen).to(device, dtype)
    w_qkv = (torch.randn(D, 3 * D, generator=gen) / D**0.5).to(device, dtype)
    e = (0.1 * torch.randn(B, 6, D, generator=gen)).to(device)  # fp32 modulation, as in Wan
    norm1, norm2 = AdaLNModulate(D).to(device), AdaLNModulate(D).to(device)

    results = {}
    for name, fn in (("fused", _fused), ("reference", _reference)):
        leaves = [t.clone().requires_grad_() for t in (x, e, w_qkv)]
        outs = fn(*leaves, norm1, norm2)
        loss = sum((o.float() * (i + 1)).square().mean() for i, o in enumerate(outs))
        loss.backward()
        results[name] = (outs, [t.grad for t in leaves])
    (fo, fg), (ro, rg) = results["fused"], results["reference"]
    names = ["x_out", "y1", "y2", "grad x", "grad modulation", "grad w_qkv"]
    worst = 0.0
    for n, a, b in zip(names, [*fo, *fg], [*ro, *rg]):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
        print(f"  {n:<16} max relative error vs eager composition: {err:.2e}")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if worst > tolerance:
        print(f"demo FAILED: error {worst:.2e} above {tolerance:.0e}")
        return 1

    print("\nbenchmarks (difforge-bench norm attention --quick):")
    from difforge_bench.cli import main as bench_main

    return bench_main(["norm", "attention", "--quick", "--device", device])
