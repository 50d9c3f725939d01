"""The RL driver (difforge.pipelines.rl): short runs of both modes raise the reward on the evaluation batch and
leave a loadable checkpoint, the accounting adds up, the comparison runs at equal compute, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from difforge.models import VideoDiT
from difforge.pipelines import checkpoint as ckpt
from difforge.pipelines.checkpoint import CheckpointError
from difforge.pipelines.rl import RLConfig, run_rl
from difforge.pipelines.rl_compare import compare
from difforge.pipelines.video_model import load_video_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A checkpoint in train_video's layout (model + EMA groups, config + model_config meta) of an untrained tiny
    DiT whose output head is random rather than zero (so NVFP4 and full precision differ)."""
    torch.manual_seed(0)
    model = VideoDiT("tiny")
    nn.init.normal_(model.head.weight, std=0.02)
    folder = tmp_path_factory.mktemp("base")
    ckpt.save_checkpoint(
        folder, step=10, tensors={"model": model.state_dict(), "ema": dict(model.named_parameters())},
        meta={"config": {"sizes": [[2, 8, 8]]}, "model_config": model.config.to_dict()},
    )  # fmt: skip
    return str(folder)


def _config(base: str, out, mode: str, **overrides) -> RLConfig:
    fields = dict(checkpoint=base, out=str(out), mode=mode, reward="brightness", iterations=4, prompts=2, group=4,
                  pool=8, top_k=2, bottom_k=2, steps=4, shape=(2, 8, 8), lr=3e-3, eval_prompts=2, eval_samples=2,
                  progress=False)  # fmt: skip
    return RLConfig(**{**fields, **overrides})


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["two-stage", "bf16"])
def test_a_short_run_raises_brightness_and_leaves_a_loadable_policy(base, tmp_path, mode):
    cfg = _config(base, tmp_path / mode, mode)
    result = run_rl(cfg)
    assert result.eval_reward_after > result.eval_reward_before + 0.05, result  # measured: +0.16 and +0.11
    records = _records(tmp_path / mode)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["eval_reward"] == result.eval_reward_before
    assert records[-1]["eval_reward"] == result.eval_reward_after
    trained = 2 * (4 if mode == "bf16" else 2 + 2)  # prompts x trajectories trained on per prompt
    explored = 0 if mode == "bf16" else 2 * 8
    assert [r["bf16_rollouts"] for r in records] == [trained * i for i in range(5)]
    assert [r["nvfp4_rollouts"] for r in records] == [explored * i for i in range(5)]
    assert records[-1]["equivalent_rollouts"] == pytest.approx(4 * (trained + cfg.nvfp4_cost * explored))
    assert result.wall_s == pytest.approx(result.explore_s + result.rollout_s + result.update_s)
    assert (result.explore_s > 0) == (mode == "two-stage")
    if mode == "two-stage":  # the NVFP4 pool's rewards of the chosen candidates are close to their regeneration's
        assert all(0 < r["nvfp4_reward_gap"] < 0.01 for r in records[1:])

    report = json.loads((tmp_path / mode / "report.json").read_text())
    assert report["eval_reward_after"] == result.eval_reward_after and report["config"]["mode"] == mode
    assert (tmp_path / mode / "reward.png").stat().st_size > 0
    tuned, original = load_video_model(tmp_path / mode), load_video_model(base, ema=False)
    assert tuned.step == 4 and tuned.config == original.config and tuned.sizes == ((2, 8, 8),)
    assert not torch.equal(tuned.model.head.bias, original.model.head.bias)  # the policy moved ...
    torch.testing.assert_close(tuned.model.patch_embedding.weight, original.model.patch_embedding.weight,
                               atol=0.05, rtol=0)  # fmt: skip  # ... but not far


def test_both_modes_share_the_evaluation_batch_and_kl_runs(base, tmp_path):
    bf16 = run_rl(_config(base, tmp_path / "kl", "bf16", iterations=1, kl=0.5, inner_epochs=2, train_fraction=0.5))
    two = run_rl(_config(base, tmp_path / "two", "two-stage", iterations=1))
    assert bf16.eval_reward_before == two.eval_reward_before
    record = _records(tmp_path / "kl")[-1]
    assert record["train_steps"] == 2 and record["kl"] > 0  # round(0.5 * 3) stochastic steps; the 2nd epoch moved


def test_compare_runs_both_modes_at_equal_compute(base, tmp_path):
    two, bf16 = _config(base, "unused", "two-stage", iterations=1), _config(base, "unused", "bf16")
    comparison = compare(two, bf16, tmp_path / "cmp")
    budget = 2 * (2 + 2 + 8 * two.nvfp4_cost)  # one two-stage iteration
    assert comparison.budget == pytest.approx(budget)
    assert comparison.results["two-stage"].iterations == 1
    assert comparison.results["bf16"].iterations == int(budget // (2 * 4))
    assert all(r.equivalent_rollouts <= budget + 1e-9 for r in comparison.results.values())
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| two-stage | 1 |" in table and "| bf16 |" in table and comparison.table in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    with pytest.raises(ValueError, match="must agree on steps"):
        compare(two, _config(base, "unused", "bf16", steps=5), tmp_path / "bad")


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(reward="sharpness"), "built-ins: brightness"), (dict(top_k=6, bottom_k=4), "pool must be >= top_k"),
     (dict(shape=(2, 8)), "shape must be three"), (dict(mode="ppo"), "mode must be"), (dict(steps=1), "steps"),
     (dict(noise_level=0.0), "noise_level"), (dict(mode="bf16", group=1), "group must be >= 2")],
)  # fmt: skip
def test_bad_configs_are_refused(base, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(base, tmp_path, overrides.pop("mode", "two-stage"), **overrides)


def test_a_missing_checkpoint_or_a_shape_the_model_cannot_take_fails_clearly(base, tmp_path):
    with pytest.raises(CheckpointError):
        run_rl(_config(str(tmp_path / "nowhere"), tmp_path / "out", "bf16"))
    with pytest.raises(ValueError, match=r"shape \(2, 7, 8\) does not fit the model"):
        run_rl(_config(base, tmp_path / "out", "bf16", shape=(2, 7, 8)))
