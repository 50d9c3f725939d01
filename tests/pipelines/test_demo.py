"""`difforge demo` end to end with a short training run: every part runs and lands in one folder."""

from __future__ import annotations

import json

import pytest

from difforge.demo import run


@pytest.mark.slow
def test_demo_writes_every_part(tmp_path):
    assert run(device="cpu", out=str(tmp_path), train_steps=4) == 0
    summary = (tmp_path / "summary.md").read_text()
    for section in ("## 1. Fused DiT block", "## 2. Training", "## 3. Chunk-wise autoregressive", "## 4. Two-stage RL",
                    "## 5. Discrete-diffusion samplers", "## 6. Benchmarks"):  # fmt: skip
        assert section in summary
    for path in ("train/loss.png", "sample/frames.png", "sample/video.gif", "sample/frames_bf16_cache.png",
                 "rl/reward.png", "discrete_eval/results.md", "bench/results.json"):  # fmt: skip
        assert (tmp_path / path).is_file(), path
    report = json.loads((tmp_path / "sample" / "report.json").read_text())
    assert report["kv_cache"]["bits"] == 2 and set(report["fidelity_vs_unquantized_cache"]) >= {"none", "taylor2"}
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {
        "block check", "train", "sample", "rl", "discrete eval", "bench"
    }
