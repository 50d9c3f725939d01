"""difforge train: the loss falls, kill -9 + --resume equals an uninterrupted run, cut-short and foreign
checkpoints are refused, HiF8 training tracks fp32, SSP on 2 processes equals one process, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parallel.dist_testlib import launch

from difforge.pipelines.checkpoint import load_checkpoint
from difforge.pipelines.flow_matching import logit_normal_timesteps, noisy_latents
from difforge.pipelines.metrics import read_metrics
from difforge.pipelines.train_video import TrainConfig, train

# Small synthetic shapes (32-128 tokens after 1x2x2 patches) keep a CPU step around 0.2 s.
SIZES = ((2, 8, 8), (4, 8, 8), (4, 8, 16))
FAST = dict(sizes=SIZES, tokens_per_batch=256, bucket_p=1.5, num_samples=256, progress=False)
CLI_FAST = ["--num-samples", "256", "--tokens-per-batch", "256", "--bucket-p", "1.5", "--no-progress", "--sizes",
            ",".join("x".join(map(str, s)) for s in SIZES)]  # fmt: skip


def mean(values):
    return sum(values) / len(values)


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    return train(TrainConfig(steps=60, out=str(out), ckpt_every=1000, **FAST)), out


def test_loss_falls_well_below_its_initial_value(fp32_run):
    result, out = fp32_run
    curve = losses(out)
    assert len(curve) == 60 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 61))
    first, last = mean(curve[:10]), mean(curve[-10:])
    print(f"tiny flow-matching loss: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < 0.6 * first, (first, last)
    assert (out / "loss.png").stat().st_size > 1000
    state = load_checkpoint(out)
    assert state.step == 60 and set(state.tensors) == {"model", "ema", "optimizer", "rng"}


def test_hif8_training_tracks_fp32(fp32_run, tmp_path):
    _, fp32_out = fp32_run
    train(TrainConfig(steps=60, out=str(tmp_path), ckpt_every=1000, hif8=True, **FAST))
    fp32, hif8 = mean(losses(fp32_out)[-20:]), mean(losses(tmp_path)[-20:])
    print(f"last-20-step loss: fp32 {fp32:.4f}, HiF8 {hif8:.4f} ({100 * (hif8 / fp32 - 1):+.1f}%)")
    assert abs(hif8 / fp32 - 1) < 0.05
    # The runs differ: the HiF8 layers really quantized something.
    assert losses(fp32_out)[5:] != losses(tmp_path)[5:]


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    """One step of grad_accum = 2 logs the mean micro-batch loss and the norm of the mean gradient, recomputed
    here from the same initial weights, batches and noise."""
    from difforge.pipelines import train_video as tv

    cfg = TrainConfig(steps=1, grad_accum=2, out=str(tmp_path), ckpt_every=1, **FAST)
    train(cfg)
    logged = read_metrics(tmp_path / "metrics.jsonl")[0]
    model = tv.build_model(cfg)
    dataset = tv._dataset(cfg, model.config)
    sampler = tv._sampler(cfg, dataset, model.config.patch, cfg.bucket_p, tv._setup_processes(cfg))
    total = 0
    for micro, indices in enumerate(sampler.batches(0)[:2]):
        latents, context = tv._collate(dataset, indices, torch.device("cpu"))
        total = total + tv.flow_matching_loss(tv._TokenPredictor(model), model, latents, context,
                                              tv.micro_step_generator(cfg.seed, micro, 0), cfg) / 2  # fmt: skip
    total.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert logged["loss"] == pytest.approx(total.item(), rel=1e-6)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)


# ---- crash safety and resume (subprocesses running the CLI) ----


def cli(out, *extra, steps=12):
    return [sys.executable, "-m", "difforge", "train", "--steps", str(steps), "--out", str(out), "--ckpt-every", "4",
            *CLI_FAST, *extra]  # fmt: skip


def run_cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(cli(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_kill_9_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen(cli(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    try:
        while not any(r["step"] >= 6 for r in read_metrics(tmp_path / "metrics.jsonl")):  # past the step-4 save
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    killed_at = max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl"))
    assert killed_at < 12, "the run finished before it was killed"
    proc = run_cli(cli(tmp_path, "--resume"))
    assert proc.returncode == 0, proc.stderr
    want, got = load_checkpoint(uninterrupted), load_checkpoint(tmp_path)
    assert got.step == want.step == 12
    for group in ("model", "ema", "optimizer"):
        assert want.tensors[group].keys() == got.tensors[group].keys()
        for name, tensor in want.tensors[group].items():
            assert torch.equal(got.tensors[group][name], tensor), f"{group}.{name} differs after kill -9 + resume"
    # The metrics read as one run: every step once, the replayed steps with the same losses.
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 13))
    assert losses(tmp_path) == losses(uninterrupted)


def test_cut_short_checkpoint_is_refused(uninterrupted, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(run)], check=True)
    latest = run / (run / "latest").read_text().strip() / "model.safetensors"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    proc = run_cli(cli(run, "--resume", steps=16))
    assert proc.returncode == 2, proc.stderr
    assert "truncated" in proc.stderr and "model.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_of_another_config_is_refused(uninterrupted, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(run)], check=True)
    before = sorted(p.name for p in run.iterdir())
    proc = run_cli(cli(run, "--resume", "--attention", "hybrid", steps=16))
    assert proc.returncode == 2 and 'attention: checkpoint="full" expected="hybrid"' in proc.stderr, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == before, "a refused resume must not write anything"


# ---- SSP ----


@pytest.mark.distributed
def test_ssp_two_processes_equal_one_process_step():
    result = launch("pipelines.train_scenarios:ssp_step_main", 2, timeout=240)
    result.assert_clean_exit()
    for name in ("full_ulysses", "hybrid_ssp", "hybrid_ssp_per_frame_t"):
        for value in result.check(name):
            assert abs(value["loss"] - value["ref_loss"]) <= 1e-5 * abs(value["ref_loss"]), (name, value)
            assert value["grad_rel_err"] < 1e-4, (name, value)


def torchrun(out, *extra):
    return run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "difforge", "train", "--out", str(out), *CLI_FAST, *extra])  # fmt: skip


@pytest.mark.distributed
def test_torchrun_ssp_ddp_and_fsdp_match_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m difforge train --ssp 2 --attention hybrid --grad-accum 2` (DDP), and the same
    with --fsdp stopped after 2 steps and resumed: the losses and final weights of one process."""
    extra = ["--attention", "hybrid", "--full-blocks", "4", "--grad-accum", "2", "--steps", "3", "--ckpt-every", "2"]
    single = run_cli([*cli(tmp_path / "one"), *extra])
    assert single.returncode == 0, single.stderr
    ddp = torchrun(tmp_path / "ddp", "--ssp", "2", *extra)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    torch.testing.assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4, atol=0)
    first = torchrun(tmp_path / "fsdp", "--ssp", "2", "--fsdp", *extra[:-4], "--steps", "2", "--ckpt-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(tmp_path / "fsdp", "--ssp", "2", "--fsdp", "--resume", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), rtol=1e-4, atol=0)
    want, got = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "fsdp")
    assert got.step == 3
    for name, tensor in want.tensors["model"].items():
        torch.testing.assert_close(got.tensors["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


# ---- bad input ----


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "huge"], "unknown VideoDiT config 'huge'"),
        (["--ssp", "2"], "--ssp 2 must divide the number of processes 1"),
        (["--attention", "hybrid", "--sparse-ratio", "1"], "sparse_ratio must be >= 2"),
        (["--attention", "hybrid", "--full-blocks", "3"], "multiple of 4"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--bucket-p", "2.5"], "bucket_p must be in (1, 2]"),
        (["--data", "/nonexistent/shards"], "/nonexistent/shards"),
        (["--fsdp"], "--fsdp shards over processes"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, args, message):
    proc = run_cli([*cli(tmp_path / "run"), *args])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "latest").exists()


def test_shards_with_other_channels_are_refused(tmp_path):
    from difforge.data import SyntheticVideoDataset, write_shards

    write_shards(tmp_path / "shards", (SyntheticVideoDataset(4, channels=3)[i] for i in range(4)))
    proc = run_cli([*cli(tmp_path / "run"), "--data", str(tmp_path / "shards")])
    assert proc.returncode == 2 and "C = 3" in proc.stderr and "expects C = 4" in proc.stderr, proc.stderr


def test_ssp_not_dividing_a_shape_is_refused():
    from difforge.pipelines.train_video import _check_parallel_layout

    cfg = TrainConfig(ssp=2)
    with pytest.raises(ValueError, match=r"\(T, H, W\) = \(3, 2, 2\) gives 3 tokens"):
        _check_parallel_layout(cfg.model_config(), 2, {(4, 8, 8): 64, (3, 2, 2): 3})


def test_resume_past_the_last_step_is_refused(uninterrupted, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(run)], check=True)
    proc = run_cli(cli(run, "--resume", steps=8))
    assert proc.returncode == 2 and "is at step 12; --steps 8" in proc.stderr, proc.stderr


def test_ssp_larger_than_skiparse_groups_is_refused():
    from difforge.pipelines.train_video import _check_parallel_layout

    cfg = TrainConfig(attention="hybrid", sparse_ratio=2, ssp=8, model_overrides=dict(num_heads=8, dim=128))
    with pytest.raises(ValueError, match="--ssp 8 must divide the number of Skiparse sub-sequences P\\^2 = 4"):
        _check_parallel_layout(cfg.model_config(), 8)


# ---- the objective ----


def test_noisy_latents_and_velocity():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    t = torch.tensor([[0.1, 0.9], [0.5, 0.25]])  # per frame pair: frames (0, 1) and (2, 3)
    x_t, v = noisy_latents(x0, noise, t)
    for b in range(2):
        for frame in range(4):
            tf = t[b, frame // 2]
            torch.testing.assert_close(x_t[b, :, frame], (1 - tf) * x0[b, :, frame] + tf * noise[b, :, frame])
    torch.testing.assert_close(v, noise - x0)


def test_logit_normal_timesteps_distribution():
    g = torch.Generator().manual_seed(0)
    t = logit_normal_timesteps((200_000,), g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01  # sigmoid of a zero-median normal
    shifted = logit_normal_timesteps((200_000,), torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))


# ---- the throughput report ----


def test_profile_report(tmp_path):
    proc = run_cli([sys.executable, "-m", "difforge", "train", "--profile", "--profile-steps", "1", "--profile-shape",
                    "2x8x8", "--tokens-per-batch", "64", "--out", str(tmp_path)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["shape"] == [2, 2, 8, 8] and report["tokens_per_step"] == 64
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows)[0] == "plain PyTorch" and len(rows) == 7
    assert rows["plain PyTorch"]["options"] == dict(fused_norm=False, backend="sdpa", attention="full", hif8=False)
    assert rows["hybrid Skiparse"]["options"]["attention"] == "hybrid"
    assert rows["all difforge"]["options"] == dict(fused_norm=True, backend="difforge", attention="hybrid", hif8=True)
    plain = rows["plain PyTorch"]["tokens_per_s"]
    for row in rows.values():
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"])
        assert row["speedup_vs_plain"] == pytest.approx(row["tokens_per_s"] / plain)
    assert "| hybrid Skiparse |" in (tmp_path / "profile.md").read_text()
