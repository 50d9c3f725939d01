"""The main job until the pipelines land: one DiT block's norm and attention path end to end, and one
chunk-wise autoregressive attention step over an INT2 KV cache.

A Wan-style block (a [B, 6, D] modulation table chunked into views) runs adaLN-modulate, self-attention
on q/k/v views of a fused projection, and the gated residual + second adaLN-modulate through the fused
ops, forward and backward; it is checked against the plain-PyTorch composition (SDPA for attention).
Then a 3-frame chunk attends to 12 cached frames stored at INT2: the attention mass the chunk gives
itself, without and with the Jensen correction, against the unquantized cache. Then the block's QKV
projection runs with HiF8 (training recipe) and NVFP4 (rollout) weights, and a hybrid full/Skiparse attention
stack (OSP-Next dual_end schedule) runs against the all-full stack. Then the tiny video DiT trains for
40 steps (hybrid Skiparse, HiF8, fused norms; outputs in ``<out>/train``). Finally the norm, attention, kvcache
and formats benchmark tables are printed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import difforge
from difforge.nn import AdaLNModulate, SkiparseAttention, SkiparseLayout, dual_end_schedule, rope_angles_3d

HEAD_DIM = 128


def _quantized_projection(x, w_qkv):
    """x @ w_qkv with HiF8 weights + activations and with NVFP4 weights: error and weight bytes vs bf16."""
    ops = difforge.ops
    w = w_qkv.t().contiguous().float()  # [N, K], the nn.Linear layout the quantized GEMMs take
    exact = x.float() @ w.t()
    codes, s = ops.hif8_quantize(w)
    hif8 = ops.hif8_linear(x.float(), codes, s)
    scales, packed = ops.nvfp4_quantize(w, pts := ops.nvfp4_per_tensor_scale(w))
    nvfp4 = ops.nvfp4_linear(x.bfloat16(), scales, packed, pts).float()
    print(f"\nquantized QKV projection ({w.shape[1]} -> {w.shape[0]}), relative RMS error vs fp32 weights:")
    for name, y, nbytes in (("hif8 (W8A8)", hif8, codes.numel()), ("nvfp4 (W4A16)", nvfp4, packed.numel() +
                                                                     scales.numel())):
        err = ((y - exact).square().mean() / exact.square().mean()).sqrt().item()
        print(f"  {name:<14} error {err:.2e}, weight {nbytes / (2 * w.numel()):.3f}x the bf16 bytes")


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


def _kv_cache_step(device: str, dtype: torch.dtype) -> None:
    B, H, tokens_per_frame = 1, 4, 256
    cached, chunk = 12 * tokens_per_frame, 3 * tokens_per_frame
    gen = torch.Generator().manual_seed(1)

    def randn(length, std=1.0):
        return (std * torch.randn(B, length, H, HEAD_DIM, generator=gen)).to(device, dtype)

    q, k_cur, k_cache = randn(chunk, std=2.0), randn(chunk), randn(cached)
    # Values mark the segment (1 in channel 0 for the chunk, 0 for the cache): out[..., 0] is the chunk's mass.
    v_cur = torch.zeros_like(k_cur)
    v_cur[..., 0] = 1
    v_cache = torch.zeros_like(k_cache)
    ref, _ = difforge.ops.flash_attention(q, torch.cat([k_cache, k_cur], 1), torch.cat([v_cache, v_cur], 1))
    ref_mass = ref[..., 0].float().mean().item()
    k_q, v_q = difforge.ops.kv_quantize(k_cache, bits=2), difforge.ops.kv_quantize(v_cache, bits=2)
    cache_bytes = sum(t.numel() * t.element_size() for t in (*k_q, *v_q))
    print(f"\nchunk-wise AR attention step: a {chunk}-token chunk over {cached} cached tokens at INT2 (g=32): "
          f"cache bytes {cache_bytes / (2 * k_cache.numel() * 2):.4f}x bf16")
    print(f"  mass the chunk gives itself: unquantized cache {ref_mass:.4f}")
    uncorrected = None
    for mode in ("none", "taylor2", "exact"):
        out = difforge.ops.quantized_kv_attention(q, k_cur, v_cur, *k_q, *v_q, bits=2, jensen=mode)
        mass = out[..., 0].float().mean().item()
        uncorrected = mass if uncorrected is None else uncorrected
        removed = 1 - (mass - ref_mass) / (uncorrected - ref_mass)
        note = "" if mode == "none" else f"  ({removed:.0%} of the shift removed)"
        print(f"  INT2 cache, jensen={mode:<8} {mass:.4f}{note}")


def _skiparse_stack(device: str, dtype: torch.dtype) -> None:
    """8 attention layers over a 4x18x32 latent grid: dual_end (F = 4, P = 2) against all-full, fwd + bwd."""
    import time

    grid, B, C, heads = (4, 18, 32), 1, 256, 4
    N = grid[0] * grid[1] * grid[2]
    torch.manual_seed(2)
    layers = [SkiparseAttention(C, heads).to(device, dtype) for _ in range(8)]
    angles = rope_angles_3d(grid, C // heads, device=device)
    x0 = torch.randn(B, N, C, device=device, dtype=dtype)

    def stack(schedule):
        layout, x = SkiparseLayout(grid, 2, batch=B), x0.clone().requires_grad_()
        for kind, layer in zip(schedule, layers):
            x = layout.to(x, kind)
            x = x + layer(x, layout, angles)
        layout.to(x, "full").float().square().mean().backward()

    schedules = {"full": ["full"] * 8, "dual_end": dual_end_schedule(8, 4)}
    seconds = {}
    for name, schedule in schedules.items():
        stack(schedule)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stack(schedule)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    letters = "".join(kind[0].upper() for kind in schedules["dual_end"])
    print(f"\nhybrid Skiparse attention stack, grid {grid} (N = {N}), 8 layers, P = 2, schedule {letters}:")
    print(f"  fwd+bwd all-full {seconds['full'] * 1e3:.1f} ms, dual_end {seconds['dual_end'] * 1e3:.1f} ms "
          f"({seconds['full'] / seconds['dual_end']:.2f}x)")


def _train_tiny(device: str, out: str) -> None:
    """The tiny video DiT, hybrid Skiparse + HiF8 + fused norms, trained briefly by flow matching."""
    from difforge.pipelines.train_video import TrainConfig, train

    cfg = TrainConfig(
        steps=40, out=f"{out}/train", attention="hybrid", hif8=True, sizes=((4, 8, 8), (4, 8, 16), (8, 16, 16)),
        tokens_per_batch=512, num_samples=256, device=device, progress=False, ckpt_every=40,
    )  # fmt: skip
    print(f"\ntraining the tiny video DiT ({cfg.steps} steps, hybrid Skiparse + HiF8, AdaptiveLoad buckets):")
    result = train(cfg)
    print(f"  loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s, "
          f"calibrated AdaptiveLoad p = {result.bucket_p:.2f}; checkpoint, metrics.jsonl, loss.png in {result.out}")


def run(device: str | None = None, out: str = "runs/demo") -> int:
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

    _kv_cache_step(device, dtype)
    _quantized_projection(x, w_qkv)
    _skiparse_stack(device, dtype)
    _train_tiny(device, out)

    print("\nbenchmarks (difforge-bench norm attention kvcache formats --quick):")
    from difforge_bench.cli import main as bench_main

    return bench_main(["norm", "attention", "kvcache", "formats", "--quick", "--device", device])
