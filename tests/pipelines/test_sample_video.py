"""`difforge sample`: checkpoint loading, report, files, fidelity table and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from difforge.cli import main
from difforge.models import VideoDiT, video_dit_config
from difforge.pipelines import media
from difforge.pipelines.checkpoint import CheckpointError, save_checkpoint
from difforge.pipelines.sample_video import SampleConfig, run_sample
from difforge.pipelines.video_model import load_video_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = VideoDiT(video_dit_config("tiny", attention="hybrid", depth=4, full_blocks=0))
    nn.init.normal_(model.head.weight, std=0.3)
    out = tmp_path_factory.mktemp("run")
    ema = {name: p.detach() * 0.5 for name, p in model.named_parameters()}  # distinguishable from the raw weights
    save_checkpoint(out, step=3, tensors={"model": model.state_dict(), "ema": ema},
                    meta={"config": {"sizes": [[4, 8, 8]]}, "model_config": model.config.to_dict()})  # fmt: skip
    return out, model


def test_loader_restores_the_ema_or_raw_weights(run_dir):
    path, model = run_dir
    raw = load_video_model(path, ema=False).model
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(raw.named_parameters())[name], p, rtol=0, atol=0)
    averaged = load_video_model(path).model
    torch.testing.assert_close(averaged.head.weight, model.head.weight * 0.5)
    nvfp4 = load_video_model(path, weights="nvfp4").model
    assert type(nvfp4.blocks[0].ffn[0]).__name__ == "NVFP4Linear"


def test_chunkwise_report_and_files(run_dir, tmp_path):
    path, _ = run_dir
    cfg = SampleConfig(str(path), out=str(tmp_path), chunk=2, kv_bits=2, steps=2, num=2, frames=8, sampler="heun")
    report = run_sample(cfg)
    assert {p.name for p in tmp_path.iterdir()} == {"frames.png", "video.gif", "report.json", "frames_bf16_cache.png"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["nfe"] == report["nfe"] == 4 * (2 * 2) + 3
    assert 0 < saved["kv_cache"]["ratio"] < 1
    fidelity = saved["fidelity_vs_unquantized_cache"]
    for mode in ("none", "taylor2", "exact"):
        assert 0 < fidelity[mode]["ssim"] <= 1 and fidelity[mode]["psnr_db"] > 10
    from PIL import Image

    with Image.open(tmp_path / "video.gif") as gif:
        assert gif.n_frames == 8


def test_same_seed_same_video_other_seed_differs(run_dir, tmp_path):
    path, _ = run_dir
    videos = []
    for seed, sub in ((0, "a"), (0, "b"), (1, "c")):
        run_sample(SampleConfig(str(path), out=str(tmp_path / sub), steps=2, num=1, seed=seed))
        videos.append((tmp_path / sub / "frames.png").read_bytes())
    assert videos[0] == videos[1] and videos[0] != videos[2]


def test_psnr_and_ssim_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 1, 7, 7, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    mse = (a - b).square().flatten(1).mean(1).double()
    torch.testing.assert_close(media.psnr(a, b), 10 * torch.log10(4 / mse))
    # One 7x7 Gaussian window covers the whole frame: SSIM is one weighted-statistics formula.
    x = torch.arange(7, dtype=torch.float64) - 3
    w = torch.exp(-(x**2) / (2 * 1.5**2))
    w = (w[:, None] * w[None, :]) / (w.sum() ** 2)
    for i in range(2):
        p, q = a[i, 0, 0].double(), b[i, 0, 0].double()
        mp, mq = (w * p).sum(), (w * q).sum()
        vp, vq, cov = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
        c1, c2 = 0.02**2, 0.06**2
        expected = (2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2))
        torch.testing.assert_close(media.ssim(a, b)[i], expected)
    assert media.ssim(a, a).allclose(torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--chunk", "3", "--frames", "4"], "chunk \\(3\\) must divide frames"),
        (["--chunk", "2", "--kv-bits", "3"], "kv_bits must be one of"),
        (["--kv-bits", "2"], "give --chunk"),
        (["--chunk", "2", "--jensen", "cubic"], "jensen must be one of"),
        (["--weights", "fp8"], "weights must be one of"),
        (["--chunk", "2", "--frames", "4", "--size", "12x12"], "multiples of P\\^2"),
        (["--chunk", "2", "--kv-bits", "2", "--cache-frames", "2"], "cache_frames must be more than"),
    ],
)
def test_bad_input_gives_clear_errors(run_dir, tmp_path, capsys, args, message):
    path, _ = run_dir
    assert main(["sample", "--checkpoint", str(path), "--out", str(tmp_path), "--steps", "1", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    save_checkpoint(tmp_path / "other", step=1, tensors={"model": {"w": torch.zeros(2)}}, meta={"config": {}})
    with pytest.raises(CheckpointError, match="not a video DiT checkpoint"):
        load_video_model(tmp_path / "other")
    save_checkpoint(tmp_path / "mismatch", step=1, tensors={"model": {"w": torch.zeros(2)}},
                    meta={"config": {}, "model_config": video_dit_config("tiny").to_dict()})  # fmt: skip
    with pytest.raises(CheckpointError, match="do not match"):
        load_video_model(tmp_path / "mismatch")


def test_block_causal_model_samples_chunkwise_by_default(tmp_path):
    model = VideoDiT(video_dit_config("tiny", depth=2, full_blocks=0, attention="hybrid", causal_chunk=2))
    save_checkpoint(tmp_path / "run", step=1, tensors={"model": model.state_dict()},
                    meta={"config": {"sizes": [[4, 8, 8]]}, "model_config": model.config.to_dict()})  # fmt: skip
    report = run_sample(SampleConfig(str(tmp_path / "run"), out=str(tmp_path / "s"), steps=2, num=1, kv_bits=4))
    assert report["mode"] == "chunk-wise autoregressive (2 latent frames per chunk)"
    assert report["nfe"] == 2 * 2 + 1 and report["kv_cache"]["bits"] == 4


def test_nvfp4_weights_are_compared_with_full_precision(run_dir, tmp_path):
    path, _ = run_dir
    report = run_sample(SampleConfig(str(path), out=str(tmp_path), steps=2, num=2, weights="nvfp4"))
    row = report["nvfp4_vs_bf16_weights"]
    assert 15 < row["psnr_db"] < 80 and 0 < row["ssim"] < 1  # close, but NVFP4 is not lossless
    assert row["speedup"] == pytest.approx(row["bf16_wall_s"] / row["nvfp4_wall_s"])
