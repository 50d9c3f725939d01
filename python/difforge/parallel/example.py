"""One Skiparse attention block under SSP vs the same block under Ulysses: step time and bytes sent.

Usage (either launcher)::

    torchrun --nproc-per-node 4 -m difforge.parallel.example --grid 4 32 32 --sparse-ratio 2
    python -m difforge.parallel.example --spawn 4 --grid 4 32 32 --json ssp.json   # spawns gloo processes itself

Both blocks compute the same math on the same weights, forward and backward: a QKV projection, group-mode
Skiparse attention (heads x head_dim = C), an output projection.

* SSP: the activation lives in the sparse layout, local rows ``[G_loc * B, N'/G, C]`` in token mode; the block
  switches it to group mode (ONE all_to_all of the C-wide activation) and runs :func:`ssp_attention` on its
  rows with all heads (no further communication). Backward: one all_to_all.
* Ulysses: the activation is a sequence shard ``[B, N/S, C]``; :func:`ulysses_attention` exchanges q, k, v and
  the output (4 all_to_alls of C-wide tensors) and runs the same Skiparse attention on H/S heads of the whole
  sequence (``--ulysses-attention dense`` makes it plain dense attention instead). Backward: 4 all_to_alls.

Every rank prints its mean step time; rank 0 prints the table (per-rank times, bytes sent off-rank per block
from :func:`count_comm`, SSP/Ulysses ratios) and writes ``--json PATH``. Backend: gloo on CPU, NCCL (one GPU
per rank, ``LOCAL_RANK``) when CUDA is available; ``--backend`` overrides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from difforge.ops.skiparse import skiparse_groups, skiparse_seq_len
from difforge.parallel import comm
from difforge.parallel.comm import count_comm
from difforge.parallel.ssp import ssp_attention, ssp_switch
from difforge.parallel.ulysses import ulysses_attention

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m difforge.parallel.example",
        description="SSP vs Ulysses on one Skiparse attention block (forward + backward): time and bytes sent.",
    )
    p.add_argument("--grid", type=int, nargs=3, default=[4, 32, 32], metavar=("T", "H", "W"),
                   help="latent grid after patchify (default 4 32 32)")  # fmt: skip
    p.add_argument("--sparse-ratio", type=int, default=2, help="Skiparse P; the SSP size S must divide P^2")
    p.add_argument("--heads", type=int, default=8, help="attention heads (divisible by S for Ulysses)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (forward + backward each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="default: nccl when CUDA is available, else gloo")  # fmt: skip
    p.add_argument("--ulysses-attention", choices=["skiparse", "dense"], default="skiparse",
                   help="attention inside the Ulysses block (default: the same Skiparse attention as SSP)")  # fmt: skip
    p.add_argument("--spawn", type=int, default=0, metavar="N",
                   help="spawn N gloo processes here instead of running under torchrun")  # fmt: skip
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads per rank (default: cores / ranks, at least 1)")  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON (rank 0)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ---- the two blocks ----


class Blocks:
    """Weights and inputs of both blocks on one rank (same seed on every rank, so both see the same model)."""

    def __init__(self, args: argparse.Namespace, rank: int, size: int, device: torch.device) -> None:
        self.args, self.rank, self.size = args, rank, size
        self.grid, self.P = list(args.grid), args.sparse_ratio
        self.heads, self.dim = args.heads, args.head_dim
        dtype = _DTYPES[args.dtype]
        C = self.heads * self.dim
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

        self.w_qkv = rand(C, 3 * C, scale=C**-0.5)
        self.w_o = rand(C, C, scale=C**-0.5)
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.seq = skiparse_seq_len(self.grid, self.P, 2)
        self.rows = skiparse_groups(self.P, 2) // size * args.batch
        # Each rank's own inputs (their values do not matter for time or bytes).
        gen.manual_seed(1 + rank)
        self.x_sparse = rand(self.rows, self.seq, C).requires_grad_()  # local rows, token mode
        self.x_shard = rand(args.batch, tokens // size, C).requires_grad_()  # contiguous sequence shard

    def ssp_step(self) -> None:
        y = ssp_switch(self.x_sparse, self.grid, self.P, "token")  # the block's one all_to_all
        q, k, v = (y @ self.w_qkv).view(self.rows, self.seq, 3, self.heads, self.dim).unbind(2)
        o = ssp_attention(q, k, v, grid=self.grid, sparse_ratio=self.P, mode="group")
        out = o.reshape(self.rows, self.seq, -1) @ self.w_o
        out.float().square().mean().backward()

    def ulysses_step(self) -> None:
        B, n, _ = self.x_shard.shape
        q, k, v = (self.x_shard @ self.w_qkv).view(B, n, 3, self.heads, self.dim).unbind(2)
        sparse = self.args.ulysses_attention == "skiparse"
        extra = dict(grid=self.grid, sparse_ratio=self.P, mode="group") if sparse else {}
        o = ulysses_attention(q, k, v, **extra)
        out = o.reshape(B, n, -1) @ self.w_o
        out.float().square().mean().backward()


def _time_steps(step, args, device) -> tuple[list[float], comm.CommCounter]:
    times, counter = [], None
    for i in range(args.warmup + args.steps):
        comm.barrier(tag="example.barrier")
        start = time.perf_counter()
        if i == args.warmup:  # count one step: every step sends the same bytes
            with count_comm() as counter:
                step()
        else:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times, counter


def run(args: argparse.Namespace) -> dict | None:
    """Runs the comparison on the initialised default process group; returns the results on rank 0."""
    rank, size = comm.group_rank(), comm.group_size()
    device = torch.device("cpu")
    if dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    groups = skiparse_groups(args.sparse_ratio, 2)
    if groups % size or args.heads % size:
        raise SystemExit(
            f"difforge.parallel.example: S = {size} ranks must divide P^2 = {groups} (SSP) and heads = {args.heads} "
            "(Ulysses)"
        )
    tokens = args.grid[0] * args.grid[1] * args.grid[2]
    if tokens % size:
        raise SystemExit(f"difforge.parallel.example: N = T*H*W = {tokens} must be divisible by S = {size}")

    blocks = Blocks(args, rank, size, device)
    ssp_times, ssp_counter = _time_steps(blocks.ssp_step, args, device)
    uly_times, uly_counter = _time_steps(blocks.ulysses_step, args, device)
    ssp_mean, uly_mean = statistics.mean(ssp_times), statistics.mean(uly_times)
    print(f"[rank {rank}/{size}] SSP block {ssp_mean * 1e3:.2f} ms, Ulysses block {uly_mean * 1e3:.2f} ms "
          f"(mean of {args.steps} steps, forward + backward)", flush=True)  # fmt: skip

    stats = torch.tensor([ssp_mean, uly_mean], dtype=torch.float64, device=device)
    everyone = comm.all_gather(stats, tag="example.stats").cpu()  # [S, 2]
    if rank != 0:
        return None

    def volume(counter: comm.CommCounter) -> dict:
        return {
            "forward_bytes": counter.total_bytes("forward"), "backward_bytes": counter.total_bytes("backward"),
            "forward_calls": counter.total_calls("forward"), "backward_calls": counter.total_calls("backward"),
            "per_tag": counter.as_dict(),
        }  # fmt: skip

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    ssp_v, uly_v = volume(ssp_counter), volume(uly_counter)
    C = args.heads * args.head_dim
    result = {
        "world_size": size, "backend": dist.get_backend() if dist.is_initialized() else "none",
        "device": str(device), "dtype": args.dtype, "grid": args.grid, "sparse_ratio": args.sparse_ratio,
        "tokens": tokens, "tokens_padded": blocks.seq * groups, "heads": args.heads, "head_dim": args.head_dim,
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "threads_per_rank": torch.get_num_threads(),
        "ulysses_attention": args.ulysses_attention, "torch": torch.__version__,
        "ssp": {"step_s_per_rank": everyone[:, 0].tolist(), "step_s_mean": everyone[:, 0].mean().item(), **ssp_v},
        "ulysses": {"step_s_per_rank": everyone[:, 1].tolist(), "step_s_mean": everyone[:, 1].mean().item(), **uly_v},
        # Spec §7 unit: M * (S-1)/S bytes, M = B*N'*C/S elements of the exchanged (padded) activation.
        "spec_unit_bytes": args.batch * blocks.seq * groups * C // size * blocks.x_sparse.element_size()
        * (size - 1) // size,
    }  # fmt: skip
    result["ratio"] = {
        "time": ratio(result["ssp"]["step_s_mean"], result["ulysses"]["step_s_mean"]),
        "forward_bytes": ratio(ssp_v["forward_bytes"], uly_v["forward_bytes"]),
        "backward_bytes": ratio(ssp_v["backward_bytes"], uly_v["backward_bytes"]),
    }
    _print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


def _print_table(r: dict) -> None:
    def fmt_ratio(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(
        f"\nSkiparse block, S = {r['world_size']} ranks ({r['backend']}, {r['device']}, {r['dtype']}, "
        f"{r['threads_per_rank']} threads/rank): grid {'x'.join(map(str, r['grid']))} (N = {r['tokens']}, "
        f"N' = {r['tokens_padded']}), P = {r['sparse_ratio']}, heads {r['heads']} x {r['head_dim']}, "
        f"batch {r['batch']}, {r['steps']} steps"
    )
    header = f"{'':10s} {'mean step ms':>12s}  {'per rank ms':<32s} {'fwd bytes':>12s} {'bwd bytes':>12s}"
    print(f"{header} {'a2a fwd/bwd':>11s}")
    for name, key in (("SSP", "ssp"), ("Ulysses", "ulysses")):
        v = r[key]
        per_rank = " ".join(f"{t * 1e3:.1f}" for t in v["step_s_per_rank"])
        calls = f"{v['forward_calls']}/{v['backward_calls']}"
        print(f"{name:10s} {v['step_s_mean'] * 1e3:12.2f}  {per_rank:<32s} {v['forward_bytes']:12d} "
              f"{v['backward_bytes']:12d} {calls:>11s}")  # fmt: skip
    q = r["ratio"]
    print(f"SSP / Ulysses: time {fmt_ratio(q['time'])}, bytes forward {fmt_ratio(q['forward_bytes'])}, "
          f"backward {fmt_ratio(q['backward_bytes'])} (spec unit {r['spec_unit_bytes']} B)")  # fmt: skip


# ---- launchers ----


def _spawned(rank: int, world: int, init_method: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.spawn:
        if args.backend == "nccl":
            raise SystemExit("difforge.parallel.example: --spawn uses gloo; run NCCL under torchrun")
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory(prefix="difforge-example-") as tmp:
            init = "file://" + os.path.join(tmp, "rendezvous")
            mp.spawn(_spawned, args=(args.spawn, init, args), nprocs=args.spawn, join=True)
        return 0
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "difforge.parallel.example: run under torchrun (torchrun --nproc-per-node 4 -m difforge.parallel.example)"
            " or pass --spawn N"
        )
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=120))
    try:
        run(args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
