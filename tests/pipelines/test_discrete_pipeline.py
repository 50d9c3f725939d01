"""Discrete diffusion on digits: the objectives and the NELBO scorer against brute-force enumeration with an exact
denoiser, a short training run (loss goes down, checkpoint loads, resume replays exactly), and the CLI end to end
(train, sample with two methods, bad input)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import torch

from difforge.cli import main
from difforge.models import DiscreteTransformer, DiscreteTransformerConfig
from difforge.pipelines import checkpoint as ckpt
from difforge.pipelines.discrete_sample import masked_nelbo
from difforge.pipelines.discrete_train import (
    DiscreteTrainConfig,
    evaluate,
    load_discrete_model,
    masked_diffusion_loss,
    stratified_times,
    train_discrete,
    uniform_denoiser_loss,
)

needs_digits = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (digits)")

TINY = dict(batch_size=16, dim=32, depth=1, heads=2, lr=5e-3, warmup=5, progress=False)
TINY_FLAGS = ["--batch-size", "8", "--dim", "32", "--depth", "1", "--heads", "2", "--no-progress"]


# ---- an exact denoiser of a small joint, by enumeration ----------------------------------------------------


class ExactMaskedDenoiser:
    """``log p(x0_i = y | unmasked tokens of x_t)`` of the joint ``probs`` over all N^L sequences, SUBS rows at
    unmasked positions; time-independent, as the exact absorbing denoiser is."""

    def __init__(self, probs: torch.Tensor, vocab_size: int, length: int) -> None:
        self.probs, self.N, self.L = probs, vocab_size, length
        self.states = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))

    def __call__(self, x_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        seen = x_t[:, None, :] != self.N  # [B, 1, L]
        consistent = ((self.states[None] == x_t[:, None, :]) | ~seen).all(-1)  # [B, states]
        weight = self.probs * consistent
        one_hot = torch.nn.functional.one_hot(self.states, self.N).double()  # [states, L, N]
        marginal = torch.einsum("bs,sln->bln", weight, one_hot)
        return (marginal / marginal.sum(-1, keepdim=True)).log()


def exact_truncated_nelbo(denoiser: ExactMaskedDenoiser, x0: torch.Tensor, t_min: float) -> float:
    """Sum over mask sets M (|M| = k >= 1) of c_M * integral_{t_min}^1 t^(k-1) (1-t)^(L-k) dt, with c_M the
    summed -log p(x0_i | x0 outside M) over i in M: the masked NELBO with P(M | t) = t^k (1-t)^(L-k) and
    weight 1/t, the integral expanded binomially."""
    N, L = denoiser.N, denoiser.L
    total = 0.0
    for mask in itertools.product([False, True], repeat=L):
        k = sum(mask)
        if k == 0:
            continue
        x_t = torch.where(torch.tensor(mask), N, x0)
        log_probs = denoiser(x_t[None], None)[0]
        cost = -sum(float(log_probs[i, x0[i]]) for i in range(L) if mask[i])
        integral = sum(math.comb(L - k, j) * (-1) ** j * (1 - t_min ** (k + j)) / (k + j) for j in range(L - k + 1))
        total += cost * integral
    return total


@pytest.fixture(scope="module")
def joint():
    g = torch.Generator().manual_seed(0)
    N, L = 3, 3
    probs = torch.rand(N**L, generator=g, dtype=torch.float64) ** 3
    return ExactMaskedDenoiser(probs / probs.sum(), N, L)


def test_exact_denoiser_nelbo_is_the_likelihood(joint):
    # The brute-force reference itself: with an exact denoiser the untruncated NELBO is -log p(x0).
    for index in (0, 5, 17):
        x0 = joint.states[index]
        assert exact_truncated_nelbo(joint, x0, 0.0) == pytest.approx(-math.log(joint.probs[index]), rel=1e-9)


def test_masked_nelbo_matches_brute_force(joint):
    index = int(joint.probs.argmax())  # a likely sequence: moderate losses, a tight Monte-Carlo check
    x0 = joint.states[index]
    t_min = 1e-2  # large enough that the truncation shows: the estimate must match the truncated integral
    exact = exact_truncated_nelbo(joint, x0, t_min)
    assert exact < -math.log(joint.probs[index]) - 1e-3
    single = masked_nelbo(joint, x0.repeat(20000, 1), vocab_size=3, draws=1, seed=1, t_min=t_min)
    stderr = float(single.std()) / math.sqrt(len(single))
    assert float(single.mean()) == pytest.approx(exact, abs=4.5 * stderr)
    stratified = masked_nelbo(joint, x0.repeat(256, 1), vocab_size=3, draws=64, seed=2, t_min=t_min)
    stratified_stderr = float(stratified.std()) / math.sqrt(len(stratified))
    assert float(stratified.mean()) == pytest.approx(exact, abs=4.5 * stratified_stderr)
    assert torch.equal(stratified, masked_nelbo(joint, x0.repeat(256, 1), vocab_size=3, draws=64, seed=2,
                                                t_min=t_min))  # fmt: skip


def test_masked_loss_against_a_loop(joint):
    g = torch.Generator().manual_seed(3)
    x0 = joint.states[torch.randint(27, (5,), generator=g)]
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    noise = torch.rand(5, 3, generator=g)
    loss = masked_diffusion_loss(joint, x0, t, noise, vocab_size=3)
    for b in range(5):
        masked = noise[b] < t[b]
        log_probs = joint(torch.where(masked, 3, x0[b])[None], None)[0]
        expected = sum(-float(log_probs[i, x0[b, i]]) for i in range(3) if masked[i]) / (float(t[b]) * 3)
        assert float(loss[b]) == pytest.approx(expected, rel=1e-9)


def test_uniform_loss_noises_and_scores_every_position():
    seen = {}

    def model(x_t, alpha):
        seen["x_t"], seen["alpha"] = x_t, alpha
        return torch.log_softmax(torch.arange(4.0) * x_t[..., None], -1)

    x0 = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]])
    t = torch.tensor([0.25, 0.75])
    noise = torch.tensor([[0.1, 0.8, 0.5, 0.7], [0.2, 0.3, 0.9, 0.1]])
    random_tokens = torch.tensor([[2, 2, 2, 2], [0, 1, 2, 3]])
    loss = uniform_denoiser_loss(model, x0, t, noise, random_tokens)
    assert seen["x_t"].tolist() == [[0, 2, 2, 3], [3, 1, 2, 1]]  # kept where noise < alpha = 1 - t
    assert seen["alpha"].tolist() == [0.75, 0.25]
    log_probs = torch.log_softmax(torch.arange(4.0) * seen["x_t"][..., None], -1)
    expected = -log_probs.gather(-1, x0[..., None]).squeeze(-1).mean(-1)
    torch.testing.assert_close(loss, expected)


def test_stratified_times_cover_the_interval():
    t = stratified_times(8, torch.Generator().manual_seed(0), 0.1)
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), 0.9 / 8))
    assert float(t.min()) >= 0.1 and float(t.max()) < 1.0


# ---- training ----------------------------------------------------------------------------------------------


@needs_digits
def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = DiscreteTrainConfig(steps=40, eval_every=20, ckpt_every=20, out=str(tmp_path), **TINY)
    result = train_discrete(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    held_out = [r["held_out_loss"] for r in records if "held_out_loss" in r]
    assert len(losses) == 40 and len(held_out) == 2
    # Untrained, the model predicts 1/17 everywhere: NELBO per token log 17 = 2.83 in expectation.
    assert sum(losses[:5]) / 5 > 2.5 and sum(losses[-5:]) / 5 < 2.3
    assert held_out[-1] < 2.3 and result.held_out_loss == held_out[-1]
    assert (tmp_path / "loss.png").stat().st_size > 0
    model, state = load_discrete_model(tmp_path)  # EMA weights, as the held-out loss was computed with
    assert state.step == 40 and model.config == cfg.model_config()
    from difforge.data import split_digits

    again = evaluate(model, split_digits(seed=cfg.split_seed)[1], "masked", seed=cfg.seed, t_min=cfg.t_min)
    assert again == pytest.approx(result.held_out_loss, rel=1e-6)


@needs_digits
@pytest.mark.parametrize("process", ["masked", "uniform"])
def test_resume_replays_the_uninterrupted_run(tmp_path, process):
    common = dict(process=process, ckpt_every=100, eval_every=100, **TINY)
    train_discrete(DiscreteTrainConfig(steps=6, out=str(tmp_path / "straight"), **common))
    train_discrete(DiscreteTrainConfig(steps=3, out=str(tmp_path / "resumed"), **common))
    train_discrete(DiscreteTrainConfig(steps=6, out=str(tmp_path / "resumed"), resume=True, **common))
    straight, resumed = ckpt.load_checkpoint(tmp_path / "straight"), ckpt.load_checkpoint(tmp_path / "resumed")
    assert resumed.step == 6
    for group in ("model", "ema", "optimizer"):
        for name, tensor in straight.tensors[group].items():
            assert torch.equal(tensor, resumed.tensors[group][name]), (group, name)
    with pytest.raises(ckpt.CheckpointError, match="another config"):
        train_discrete(DiscreteTrainConfig(steps=8, out=str(tmp_path / "resumed"), resume=True, **{**common,
                                                                                                  "lr": 1e-3}))
    with pytest.raises(ValueError, match="asks for no more"):
        train_discrete(DiscreteTrainConfig(steps=6, out=str(tmp_path / "resumed"), resume=True, **common))


def test_train_config_validation():
    for bad in (dict(process="absorbing"), dict(steps=0), dict(ema_decay=1.0), dict(t_min=0.0), dict(heads=3)):
        with pytest.raises(ValueError):
            DiscreteTrainConfig(**bad)


# ---- CLI ---------------------------------------------------------------------------------------------------


def _train(out, process, steps=5):
    return main(["discrete", "train", "--process", process, "--steps", str(steps), "--out", str(out), *TINY_FLAGS])


def _sample(checkpoint, out, *extra):
    return main(["discrete", "sample", "--checkpoint", str(checkpoint), "--steps", "4", "--num-samples", "6",
                 "--nll-draws", "2", "--no-progress", "--out", str(out), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("discrete")
    assert _train(root / "masked", "masked") == 0
    assert _train(root / "uniform", "uniform", steps=3) == 0
    return root


@needs_digits
def test_cli_train_and_sample_two_methods(trained, tmp_path, capsys):
    assert _sample(trained / "masked", tmp_path, "--method", "mdlm,first_hitting") == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["mdlm", "first_hitting"]
    for row in [report["reference"], *report["rows"]]:
        assert math.isfinite(row["nll_per_token"]) and row["nll_per_token"] > 0
        assert 0 < row["token_entropy"] <= math.log(17) and 0 < row["unique_2gram"] <= 1
        assert (tmp_path / row["png"]).stat().st_size > 0
    assert all(row["nfe"] >= 1 and row["wall_s"] > 0 for row in report["rows"])
    assert report["reference"]["method"] == "held-out data" and report["scorer"] == report["checkpoint"]
    assert "| held-out data |" in (tmp_path / "report.md").read_text() and "| mdlm | 4 |" in printed


@needs_digits
def test_cli_all_methods(trained, tmp_path):
    assert _sample(trained / "masked", tmp_path, "--method", "all") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["mdlm", "first_hitting", "remdm", "confidence"]


@needs_digits
def test_cli_uniform_model_with_a_masked_scorer(trained, tmp_path):
    assert _sample(trained / "uniform", tmp_path / "scored", "--method", "euler", "--scorer",
                   str(trained / "masked")) == 0  # fmt: skip
    report = json.loads((tmp_path / "scored" / "report.json").read_text())
    assert report["process"] == "uniform" and math.isfinite(report["rows"][0]["nll_per_token"])
    assert _sample(trained / "uniform", tmp_path / "unscored", "--method", "euler") == 0
    report = json.loads((tmp_path / "unscored" / "report.json").read_text())
    assert report["rows"][0]["nll_per_token"] is None and report["scorer"] is None


@needs_digits
def test_cli_bad_input(trained, tmp_path, capsys):
    ckpt.save_checkpoint(tmp_path / "video", step=1, tensors={"model": {"w": torch.zeros(1)}}, meta={"config": {}})
    other = DiscreteTransformerConfig(vocab_size=5, length=12, grid=(3, 4), dim=16, depth=1, heads=2)
    ckpt.save_checkpoint(tmp_path / "other", step=1, tensors={"model": DiscreteTransformer(other).state_dict()},
                         meta={"kind": "difforge.discrete", "config": {}, "model_config": other.to_dict()})
    cases = [
        ((trained / "masked", "--method", "no_such_method"), "no_such_method"),
        ((trained / "masked", "--method", "mdlm", "--scorer", str(trained / "uniform")), "needs a masked"),
        ((trained / "masked", "--method", "mdlm", "--scorer", str(tmp_path / "other")), "12 tokens over 5 levels"),
        ((tmp_path / "missing", "--method", "mdlm"), "does not exist"),
        ((tmp_path / "video", "--method", "mdlm"), "not a `difforge discrete train` checkpoint"),
    ]
    for (checkpoint, *flags), message in cases:
        rc = _sample(checkpoint, tmp_path / "out", *flags)
        err = capsys.readouterr().err
        assert rc == 2 and "difforge discrete sample: error:" in err and message in err, err
    with pytest.raises(SystemExit):
        main(["discrete", "sample", "--checkpoint", str(trained / "masked"), "--method", "mdlm", "--steps", "x"])
