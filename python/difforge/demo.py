"""`difforge demo`: the main job end to end, on the GPU when there is one, in a few minutes on 2 CPU cores.

1. one Wan-style DiT block (adaLN-modulate, flash attention, gated residual) through the fused ops, forward and
   backward, checked against the plain-PyTorch composition;
2. the tiny video DiT trained briefly by flow matching (hybrid Skiparse attention, HiF8 linears, fused norms,
   block-causal over 2-frame chunks with diffusion-forcing per-frame times);
3. chunk-wise autoregressive sampling with an INT2 KV cache (Jensen-corrected) and with the unquantized cache;
4. a short two-stage RL round (NVFP4 exploration pool, BF16 training on the contrastive subset);
5. the discrete-diffusion samplers against an exact oracle (TV vs NFE);
6. `difforge-bench` on small shapes.

Everything lands in one folder (``--out``, default ``runs/demo``) with ``summary.md`` on top.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def _block_check(device: str, dtype: torch.dtype, notes: list[str]) -> bool:
    B, L, D = 2, 1024, 1536  # Wan2.1-1.3B width
    print(f"[1/6] one DiT block's norm + attention path, fused vs eager (B={B} L={L} D={D} heads={D // HEAD_DIM})")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=gen).to(device, dtype)
    w_qkv = (torch.randn(D, 3 * D, generator=gen) / D**0.5).to(device, dtype)
    e = (0.1 * torch.randn(B, 6, D, generator=gen)).to(device)  # fp32 modulation, as in Wan
    norm1, norm2 = AdaLNModulate(D).to(device), AdaLNModulate(D).to(device)
    results = {}
    for name, fn in (("fused", _fused), ("reference", _reference)):
        leaves = [t.clone().requires_grad_() for t in (x, e, w_qkv)]
        outs = fn(*leaves, norm1, norm2)
        sum((o.float() * (i + 1)).square().mean() for i, o in enumerate(outs)).backward()
        results[name] = [*outs, *(t.grad for t in leaves)]
    names = ["x_out", "y1", "y2", "grad x", "grad modulation", "grad w_qkv"]
    errors = {
        n: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        for n, a, b in zip(names, results["fused"], results["reference"])
    }
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    worst = max(errors.values())
    print(f"  worst max relative error {worst:.2e} (tolerance {tolerance:.0e})")
    notes += ["## 1. Fused DiT block vs eager PyTorch", "", "| tensor | max relative error |", "|---|---|"]
    notes += [f"| {n} | {err:.2e} |" for n, err in errors.items()] + [""]
    return worst <= tolerance


def _train(device: str, out: Path, steps: int, notes: list[str]) -> None:
    from difforge.pipelines.train_video import TrainConfig, train

    cfg = TrainConfig(
        steps=steps, out=str(out), attention="hybrid", hif8=True, per_frame_t=True, causal_chunk=2, sizes=((8, 8, 8),),
        lr=2e-3,
        bucketing="equal-token",
        tokens_per_batch=1024, num_samples=512, device=device, progress=False, ckpt_every=steps, log_every=10,
    )  # fmt: skip
    print(f"[2/6] training the tiny block-causal video DiT, {steps} steps (hybrid Skiparse + HiF8 + fused norms)")
    result = train(cfg)
    print(f"  loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s")
    notes += [
        "## 2. Training (tiny video DiT, flow matching)", "",
        f"{result.params:,} parameters, {steps} steps, hybrid Skiparse (dual_end) + HiF8 linears + fused norms, "
        "block-causal over 2-frame chunks with per-frame times (diffusion forcing): "
        f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s. "
        "Curve: `train/loss.png`.", "",
    ]  # fmt: skip


def _sample(device: str, run: Path, out: Path, notes: list[str]) -> None:
    from difforge.pipelines.sample_video import SampleConfig, run_sample

    print("[3/6] chunk-wise autoregressive sampling: INT2 KV cache (Jensen taylor2) vs the unquantized cache")
    cfg = SampleConfig(str(run), out=str(out), frames=8, size=(8, 8), chunk=2, kv_bits=2, jensen="taylor2",
                       steps=12, num=4, cfg=2.0, device=device)  # fmt: skip
    report = run_sample(cfg)
    kv, fidelity = report["kv_cache"], report["fidelity_vs_unquantized_cache"]
    print(f"  {report['nfe']} NFE, {report['wall_s']:.2f} s; INT2 cache {kv['ratio']:.3f}x the bf16 bytes")
    notes += [
        "## 3. Chunk-wise autoregressive sampling with a quantized KV cache", "",
        f"{report['shape'][0]} videos of {report['shape'][2]} latent frames, chunks of {cfg.chunk}, {cfg.steps} Euler "
        f"steps per chunk, guidance {cfg.cfg:g}: {report['nfe']} NFE, {report['wall_s']:.2f} s. INT2 cache (1 sink "
        f"+ 1 window frame unquantized): {kv['bytes']:,} B = {kv['ratio']:.3f}x bf16 ({kv['bf16_bytes']:,} B).", "",
        "| Jensen correction | PSNR vs unquantized cache (dB) | SSIM |", "|---|---|---|",
    ]  # fmt: skip
    for mode, row in fidelity.items():
        if isinstance(row, dict):
            print(f"  jensen={mode:<8} PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.4f}")
            notes.append(f"| {mode} | {row['psnr_db']:.2f} | {row['ssim']:.4f} |")
    notes += ["", "Frames: `sample/frames.png` (INT2), `sample/frames_bf16_cache.png`, `sample/video.gif`.", ""]


def _rl(device: str, run: Path, out: Path, notes: list[str]) -> None:
    from difforge.pipelines.rl import RLConfig, run_rl

    print("[4/6] two-stage RL: NVFP4 exploration pool -> contrastive subset -> BF16 regeneration + GRPO update")
    cfg = RLConfig(checkpoint=str(run), out=str(out), reward="brightness", mode="two-stage", iterations=4, prompts=2,
                   pool=8, top_k=2, bottom_k=2, steps=6, shape=(4, 8, 8), lr=1e-3, device=device, progress=False)
    r = run_rl(cfg)
    print(f"  evaluation reward {r.eval_reward_before:.4f} -> {r.eval_reward_after:.4f} in {r.wall_s:.1f} s")
    notes += [
        "## 4. Two-stage RL (NVFP4 explore, BF16 train)", "",
        f"Reward `{r.reward}` on the fixed evaluation batch (ODE): {r.eval_reward_before:.4f} -> "
        f"{r.eval_reward_after:.4f} after {r.iterations} iterations: {r.nvfp4_rollouts} NVFP4 rollouts explored "
        f"({r.explore_s:.1f} s), {r.bf16_rollouts} regenerated in full precision ({r.rollout_s:.1f} s), updates "
        f"{r.update_s:.1f} s. Curves: `rl/reward.png`; log: `rl/metrics.jsonl`.", "",
    ]  # fmt: skip


def _nested(markdown: Path) -> str:
    """A Markdown report with its headings two levels down, to sit under a section of the summary."""
    lines = markdown.read_text().strip().splitlines()
    return "\n".join("##" + line if line.startswith("#") else line for line in lines)


def _discrete(out: Path, notes: list[str]) -> None:
    from difforge.samplers.discrete.oracle.report import run_eval

    print("[5/6] discrete-diffusion samplers vs an exact Markov-chain oracle (TV vs NFE)")
    paths = run_eval("markov", ("uniform", "masked"), (2, 4, 8), samples=4000, max_monte_carlo_steps=8, out=str(out),
                     verbose=False)  # fmt: skip
    notes += ["## 5. Discrete-diffusion samplers on an exact oracle", "", _nested(Path(paths["results.md"])), ""]


def _bench(device: str, out: Path, notes: list[str]) -> int:
    from difforge_bench.cli import main as bench_main

    print("[6/6] difforge-bench on small shapes")
    rc = bench_main(["norm", "attention", "kvcache", "formats", "sampling", "--quick", "--device", device,
                     "--out", str(out)])  # fmt: skip
    table = out / "results.md"
    notes += ["## 6. Benchmarks (`difforge-bench --quick`)", ""]
    notes += [_nested(table) if table.exists() else "(no results.md written)", ""]
    return rc


def run(device: str | None = None, out: str = "runs/demo", train_steps: int = 400) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"difforge {difforge.__version__} demo on {device}; outputs in {folder}")
    notes = [f"# difforge {difforge.__version__} demo ({device}, torch {torch.__version__})", ""]
    seconds = {}

    def step(name, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        seconds[name] = round(time.perf_counter() - start, 1)
        return value

    if not step("block check", _block_check, device, dtype, notes):
        print("demo FAILED: the fused block does not match the eager composition")
        return 1
    step("train", _train, device, folder / "train", train_steps, notes)
    step("sample", _sample, device, folder / "train", folder / "sample", notes)
    step("rl", _rl, device, folder / "train", folder / "rl", notes)
    step("discrete eval", _discrete, folder / "discrete_eval", notes)
    rc = step("bench", _bench, device, folder / "bench", notes)
    notes += ["## Wall time per part (s)", "", "| part | s |", "|---|---|"]
    notes += [f"| {name} | {s} |" for name, s in seconds.items()]
    (folder / "summary.md").write_text("\n".join(notes) + "\n")
    (folder / "timings.json").write_text(json.dumps(seconds, indent=2))
    print(f"\ndemo done in {sum(seconds.values()):.0f} s: {folder / 'summary.md'} and the folders beside it")
    return rc
