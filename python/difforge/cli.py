"""`difforge` command line: `difforge info`, `difforge demo`, `difforge train`, `difforge sample`, `difforge rl`,
`difforge discrete train|sample|eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _registered_ops() -> list[str]:
    # torch.ops.difforge creates attributes lazily; the dispatcher knows every registered schema.
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("difforge::"))


def info(_args: argparse.Namespace) -> int:
    import difforge
    from difforge import _library

    build = _library.build_info()
    cuda_built = build.get("cuda_compiled", "OFF") in ("ON", "TRUE", "1")
    rows = [
        ("difforge", difforge.__version__),
        ("library", str(difforge.library_path)),
        ("torch", f"{torch.__version__} (built against {build.get('built_with_torch', '?')})"),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("CUDA kernels", f"compiled for {build.get('cuda_archs')}" if cuda_built else "not compiled"),
        ("GPU available", torch.cuda.get_device_name() if torch.cuda.is_available() else "no"),
        ("compilers", f"{build.get('cxx_compiler', '?')}; {build.get('cuda_compiler', '').strip() or 'no nvcc'}"),
        ("build type", build.get("build_type", "?")),
        ("threads", str(torch.get_num_threads())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("ops (torch.ops.difforge):")
    for op in _registered_ops():
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"difforge::{op}", k)]
        print(f"  {op:<28} {', '.join(keys)}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from difforge.demo import run

    return run(device=args.device, out=args.out)


def train(args: argparse.Namespace) -> int:
    from difforge.pipelines.train_video import TrainConfig, train as run_training
    from difforge.pipelines.train_profile import profile

    cfg = TrainConfig(
        model=args.config, steps=args.steps, out=args.out, resume=args.resume, attention=args.attention,
        sparse_ratio=args.sparse_ratio, full_blocks=args.full_blocks, causal_chunk=args.causal_chunk, hif8=args.hif8,
        ssp=args.ssp, seed=args.seed,
        lr=args.lr, grad_accum=args.grad_accum, data=args.data, num_samples=args.num_samples,
        tokens_per_batch=args.tokens_per_batch, bucketing=args.bucketing, bucket_p=args.bucket_p,
        per_frame_t=args.per_frame_t, cond_dropout=args.cond_dropout, fused_norm=not args.no_fused_norm,
        backend=args.backend,
        ckpt_every=args.ckpt_every, log_every=args.log_every, device=args.device, precision=args.precision,
        progress=not args.no_progress, ema_decay=args.ema_decay, warmup=args.warmup,
        fsdp=args.fsdp, **({"sizes": args.sizes} if args.sizes else {}),
    )  # fmt: skip
    if args.profile:
        profile(cfg, steps=args.profile_steps, shape=args.profile_shape[0] if args.profile_shape else None)
        return 0
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {result.steps} steps ({result.params:,} parameters): loss {result.first_loss:.4f} -> "
            f"{result.final_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s, AdaptiveLoad p = {result.bucket_p:.3f}, "
            f"rank imbalance {100 * result.imbalance:.1f}%\n"
            f"checkpoints, metrics.jsonl and loss.png in {result.out}"
        )
    return 0


def _latent_sizes(text: str) -> tuple[tuple[int, int, int], ...]:
    try:
        sizes = tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 3 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected T x H x W shapes like 4x16x16,8x32x32, got {text!r}")
    return sizes


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a video DiT (flow matching) on synthetic or sharded latents")
    p.add_argument("--config", default="tiny", help="model config: tiny, small, mid, wan-1.3b (default: tiny)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (total, including resumed ones)")
    p.add_argument("--out", default="runs/train", help="checkpoints, metrics.jsonl and loss.png go here")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--attention", choices=("full", "hybrid"), default="full", help="hybrid: dual_end Skiparse")
    p.add_argument("--sparse-ratio", type=int, default=2, help="Skiparse sparse ratio P (hybrid attention)")
    p.add_argument("--full-blocks", type=int, default=None, help="dense blocks of the dual_end schedule")
    p.add_argument("--causal-chunk", type=int, default=0,
                   help="block-causal attention over chunks of this many latent frames (chunk-wise AR models)")
    p.add_argument("--hif8", action="store_true", help="HiF8 linears (OSP-Next training recipe)")
    p.add_argument("--ssp", type=int, default=1, help="sequence-parallel degree S (divides the process count)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard over the processes instead of DDP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10, help="linear learning-rate warmup steps")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder of safetensors latent shards")
    p.add_argument("--num-samples", type=int, default=1024, help="synthetic dataset size")
    p.add_argument("--sizes", type=_latent_sizes, default=None,
                   help="synthetic latent shapes, e.g. 4x16x16,8x32x32 (T x H x W; default: four shapes up to 8x32x32)")
    p.add_argument("--tokens-per-batch", type=int, default=2048, help="AdaptiveLoad memory budget M_mem (tokens)")
    p.add_argument("--bucketing", choices=("adaptive", "equal-token"), default="adaptive")
    p.add_argument("--bucket-p", type=float, default=None, help="AdaptiveLoad exponent p (default: calibrated)")
    p.add_argument("--per-frame-t", action="store_true", help="an independent time per latent frame")
    p.add_argument("--cond-dropout", type=float, default=0.1,
                   help="probability of training on the null (zero) condition, for classifier-free guidance")
    p.add_argument("--no-fused-norm", action="store_true", help="eager PyTorch norms (the baseline)")
    p.add_argument("--backend", choices=("difforge", "sdpa"), default="difforge", help="attention kernels")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="instead of training, measure tokens/s with each feature toggled; writes a report to --out")
    p.add_argument("--profile-steps", type=int, default=6, help="timed steps per variant with --profile")
    p.add_argument("--profile-shape", type=_latent_sizes, default=None,
                   help="latent T x H x W to profile (default: the largest --sizes entry); Wan 720p: 21x90x160")
    p.set_defaults(func=train)


def discrete_train(args: argparse.Namespace) -> int:
    from difforge.pipelines.discrete_train import DiscreteTrainConfig, train_discrete

    cfg = DiscreteTrainConfig(
        process=args.process, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        ema_decay=args.ema_decay, seed=args.seed, dim=args.dim, depth=args.depth, heads=args.heads, ffn=args.ffn,
        out=args.out, resume=args.resume, device=args.device, progress=not args.no_progress,
        eval_every=args.eval_every, ckpt_every=args.ckpt_every,
    )  # fmt: skip
    result = train_discrete(cfg)
    print(
        f"trained a {cfg.process} model {result.steps} steps ({result.params:,} parameters) in {result.seconds:.0f} s: "
        f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}, held-out {result.held_out_loss:.4f}\n"
        f"checkpoints, metrics.jsonl and loss.png in {result.out}"
    )
    return 0


def _latent_size(text: str) -> tuple[int, int]:
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected a latent size H x W like 16x16, got {text!r}")
    return size


def sample(args: argparse.Namespace) -> int:
    from difforge.pipelines.sample_video import SampleConfig, run_sample

    cfg = SampleConfig(
        checkpoint=args.checkpoint, out=args.out, frames=args.frames, size=args.size, chunk=args.chunk,
        kv_bits=args.kv_bits, jensen=args.jensen, sink_frames=args.sink_frames, recent_frames=args.recent_frames,
        cache_frames=args.cache_frames,
        weights=args.weights, steps=args.steps, sampler=args.sampler, shift=args.shift, cfg=args.cfg, num=args.num,
        seed=args.seed, fidelity=not args.no_fidelity, device=args.device,
    )  # fmt: skip
    report = run_sample(cfg)
    line = f"{report['mode']}: {report['shape']} latents, {report['nfe']} NFE, {report['wall_s']:.2f} s"
    if "kv_cache" in report:
        kv = report["kv_cache"]
        line += f"; KV cache INT{kv['bits']}: {kv['bytes']:,} B = {kv['ratio']:.3f}x bf16" if kv["bits"] != 16 else ""
    print(line)
    for mode, row in report.get("fidelity_vs_unquantized_cache", {}).items():
        if isinstance(row, dict):
            print(f"  jensen={mode:<8} PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.4f} vs the unquantized cache")
    if "nvfp4_vs_bf16_weights" in report:
        row = report["nvfp4_vs_bf16_weights"]
        print(f"  NVFP4 weights vs BF16: PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.4f}, "
              f"{row['speedup']:.2f}x the speed")
    print(f"frames.png, video.gif and report.json in {report['out']}")
    return 0


def _add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample videos from a trained video DiT (full or chunk-wise AR with a KV cache)")
    p.add_argument("--checkpoint", required=True, help="a `difforge train` run folder or one step-* folder")
    p.add_argument("--out", default=None, help="output folder (default: RUN/samples)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the largest training clip's)")
    p.add_argument("--size", type=_latent_size, default=None, help="latent H x W, e.g. 16x16")
    p.add_argument("--chunk", type=int, default=None,
                   help="latent frames per autoregressive chunk (default: the model's causal chunk, else full)")
    p.add_argument("--kv-bits", type=int, default=16, help="KV cache bits: 2, 4, 8 or 16 (unquantized)")
    p.add_argument("--jensen", default="taylor2", help="Jensen correction: none, taylor2, taylor4, exact")
    p.add_argument("--sink-frames", type=int, default=1, help="unquantized first frames of the cache")
    p.add_argument("--recent-frames", type=int, default=1, help="unquantized most recent frames of the cache")
    p.add_argument("--cache-frames", type=int, default=None,
                   help="frames the cache holds, rolling beyond (default: all committed frames)")
    p.add_argument("--weights", default="bf16", help="bf16 or nvfp4 (NVFP4 linears, W4A16)")
    p.add_argument("--steps", type=int, default=16, help="ODE steps per chunk")
    p.add_argument("--sampler", default="euler", help="euler or heun")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift (> 1: more steps near noise)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--num", type=int, default=4, help="videos (one prompt each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fidelity", action="store_true", help="skip the unquantized-cache and Jensen comparison")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=sample, command="sample")


def rl(args: argparse.Namespace) -> int:
    import dataclasses

    from difforge.pipelines.rl import RLConfig, run_rl
    from difforge.pipelines.rl_compare import compare

    if len(args.shape) != 1:
        raise ValueError(f"--shape takes one latent shape T x H x W, got {len(args.shape)}")
    cfg = RLConfig(
        checkpoint=args.checkpoint, out=args.out, reward=args.reward, mode=args.mode, iterations=args.iterations,
        prompts=args.prompts, group=args.group, pool=args.pool, top_k=args.top_k, bottom_k=args.bottom_k,
        steps=args.steps, noise_level=args.noise_level, shape=args.shape[0], lr=args.lr, clip=args.clip, kl=args.kl,
        seed=args.seed, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    if args.compare:
        other = dataclasses.replace(cfg, mode="bf16" if cfg.mode == "two-stage" else "two-stage")
        two_stage, bf16 = (cfg, other) if cfg.mode == "two-stage" else (other, cfg)
        result = compare(two_stage, bf16, args.out)
        print(result.table)
        print(f"compare.md, compare.png and both runs in {result.out}")
        return 0
    r = run_rl(cfg)
    print(
        f"{r.mode} RL, reward {r.reward}: evaluation reward {r.eval_reward_before:.4f} -> {r.eval_reward_after:.4f} "
        f"in {r.iterations} iterations, {r.wall_s:.1f} s ({r.bf16_rollouts} BF16 + {r.nvfp4_rollouts} NVFP4 rollouts)\n"
        f"metrics.jsonl, reward.png, report.json and the tuned checkpoint in {r.out}"
    )
    return 0


def _add_rl_parser(sub) -> None:
    p = sub.add_parser("rl", help="GRPO fine-tuning of a video DiT: two-stage NVFP4 explore / BF16 train, or BF16")
    p.add_argument("--checkpoint", required=True, help="a `difforge train` run folder or one step-* folder")
    p.add_argument("--reward", default="brightness",
                   help="built-in reward (brightness, colour:<name>, motion:<direction>, prompt_motion) or "
                        "package.module:function taking (videos, conditions) -> [B]")  # fmt: skip
    p.add_argument("--mode", default="two-stage", help="two-stage (NVFP4 pool -> BF16 subset) or bf16")
    p.add_argument("--compare", action="store_true", help="run both modes at equal compute: compare.md + PNG")
    p.add_argument("--out", default="runs/rl", help="metrics, report, plots and the tuned checkpoint go here")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    p.add_argument("--group", type=int, default=8, help="bf16 mode: candidates per prompt")
    p.add_argument("--pool", type=int, default=32, help="two-stage: NVFP4 candidates per prompt")
    p.add_argument("--top-k", type=int, default=4, help="two-stage: best candidates regenerated in BF16")
    p.add_argument("--bottom-k", type=int, default=4, help="two-stage: worst candidates regenerated in BF16")
    p.add_argument("--steps", type=int, default=10, help="SDE sampling steps")
    p.add_argument("--noise-level", type=float, default=0.7, help="Flow-GRPO's SDE noise level a")
    p.add_argument("--shape", type=_latent_sizes, default=((4, 16, 16),), help="latent T x H x W of the samples")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=1e-3, help="PPO clip range")
    p.add_argument("--kl", type=float, default=0.0, help="KL weight to the starting policy (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=rl, command="rl")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value  # a plain string, e.g. a rule name


def _comma_list(kind: type):
    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(item) for item in text.split(",") if item)
        except ValueError:
            items = ()
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        return items

    return parse


def discrete_sample(args: argparse.Namespace) -> int:
    from difforge.pipelines.discrete_sample import DiscreteSampleConfig, report_markdown, sample_discrete

    cfg = DiscreteSampleConfig(
        checkpoint=args.checkpoint, methods=args.method, steps=args.steps, num_samples=args.num_samples,
        seed=args.seed, scorer=args.scorer, nll_draws=args.nll_draws, device=args.device, progress=not args.no_progress,
        out=args.out or os.path.join(args.checkpoint, "samples"), method_options=dict(args.option),
    )  # fmt: skip
    report = sample_discrete(cfg)
    print(report_markdown(report))
    print(f"report.json, report.md and sample grids in {cfg.out}")
    return 0


def discrete_eval(args: argparse.Namespace) -> int:
    from difforge.samplers.discrete.oracle.report import run_eval

    paths = run_eval(
        args.oracle, args.process, args.steps, vocab_size=args.vocab_size, length=args.length, samples=args.samples,
        max_monte_carlo_steps=args.max_monte_carlo_steps, schedule=args.schedule, seed=args.seed, out=args.out,
    )  # fmt: skip
    print(f"TV/KL vs NFE: {paths['results.md']}, {paths['results.json']}, {paths['tv_vs_nfe.png']}")
    return 0


def _add_discrete_eval_parser(actions) -> None:
    p = actions.add_parser("eval", help="TV and KL vs NFE of every sampler against an exact oracle distribution")
    p.add_argument("--oracle", default="markov", choices=("product", "markov", "markov_banded", "hmm", "grid", "potts"))
    p.add_argument("--process", type=_comma_list(str), default=("uniform", "masked"), help="uniform,masked")
    p.add_argument("--steps", type=_comma_list(int), default=(2, 4, 8, 16, 32), help="step counts, comma-separated")
    p.add_argument("--vocab-size", type=int, default=4, help="N of product / markov / hmm oracles")
    p.add_argument("--length", type=int, default=4, help="L of product / markov / hmm oracles (exact: N^L <= 4096)")
    p.add_argument("--samples", type=int, default=20000, help="draws per Monte-Carlo entry")
    p.add_argument("--max-monte-carlo-steps", type=int, default=32, help="skip Monte-Carlo entries above this")
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine", "loglinear", "geometric"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/discrete_eval")
    p.set_defaults(func=discrete_eval, command="discrete eval")


def _add_discrete_train_parser(actions) -> None:
    p = actions.add_parser("train", help="train a discrete-diffusion transformer on sklearn's 8x8 digits")
    p.add_argument("--process", choices=("masked", "uniform"), default="masked")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (total, including resumed ones)")
    p.add_argument("--out", default="runs/discrete", help="checkpoints, metrics.jsonl and loss.png go here")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup, then cosine decay)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema-decay", type=float, default=0.999, help="0: no EMA")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="MLP width (default: 4 * dim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=discrete_train, command="discrete train")


def _add_discrete_sample_parser(actions) -> None:
    p = actions.add_parser("sample", help="sample a trained discrete model and report NLL, entropy, diversity")
    p.add_argument("--checkpoint", required=True, help="a `difforge discrete train` run folder (or step-* folder)")
    p.add_argument("--method", type=_comma_list(str), required=True,
                   help="sampler(s), comma-separated, e.g. mdlm,remdm (masked) or euler,gadd (uniform); 'all'")
    p.add_argument("--steps", type=_comma_list(int), default=(64,), help="step count(s), comma-separated")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default=None,
                   help="masked checkpoint whose NELBO gives the NLL (default: --checkpoint if it is masked)")
    p.add_argument("--nll-draws", type=int, default=8, help="noise levels per sample in the NELBO estimate")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option (JSON value or string), repeatable, e.g. --option eta=0.02")
    p.add_argument("--out", default=None, help="report folder (default: CHECKPOINT/samples)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=discrete_sample, command="discrete sample")


def _add_discrete_parser(sub) -> None:
    p = sub.add_parser(
        "discrete", help="discrete diffusion: train and sample on sklearn's digits, eval samplers on exact oracles"
    )
    actions = p.add_subparsers(dest="action", required=True)
    _add_discrete_train_parser(actions)
    _add_discrete_sample_parser(actions)
    _add_discrete_eval_parser(actions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="difforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the build configuration and the registered ops").set_defaults(func=info)
    p = sub.add_parser("demo", help="run the main job end to end and print the bench table")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (training run, plots)")
    p.set_defaults(func=demo)
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_rl_parser(sub)
    _add_discrete_parser(sub)
    args = parser.parse_args(argv)
    from difforge.data.digits import DigitsUnavailableError
    from difforge.pipelines.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ValueError, CheckpointError, DigitsUnavailableError) as err:  # bad input: a clear message, not a traceback
        print(f"difforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
