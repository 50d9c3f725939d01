"""Tests for difforge.pipelines.checkpoint: round trips, verification on load, crash atomicity (injected
failures and SIGKILL), pruning, config checks, optimizer and RNG state."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from difforge.pipelines import checkpoint as ckpt_module
from difforge.pipelines.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _save_simple(run: Path, step: int, value: float, keep: int = 2) -> Path:
    """A checkpoint whose tensors all hold ``value``, so that a load can be checked against it."""
    return save_checkpoint(
        run,
        step=step,
        tensors={"model": {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}},
        meta={"value": value},
        keep=keep,
    )


def _assert_simple(ckpt, step: int, value: float) -> None:
    assert ckpt.step == step
    assert ckpt.meta == {"value": value}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((4, 3), value))
    assert torch.equal(ckpt.tensors["model"]["b"], torch.full((3,), value))


def _entries(run: Path) -> set[str]:
    return {entry.name for entry in run.iterdir()}


# ---- round trip and layout -----------------------------------------------------------------------------


def test_roundtrip_groups_dtypes_scalars_and_aliases(tmp_path):
    tied = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = tied.weight  # tied weights: two state_dict entries, one storage
    with torch.no_grad():
        tied.weight.copy_(torch.arange(15, dtype=torch.float32).reshape(5, 3))
    model = {"embed.weight": tied.weight, "head.weight": head.weight}
    assert model["embed.weight"].data_ptr() == model["head.weight"].data_ptr()
    buffer = torch.arange(10, dtype=torch.float32)
    tensors = {
        "model": {
            **model,
            "bf16": torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16),
            "first_half": buffer[:5],  # views of one buffer: shared storage as well
            "second_half": buffer[5:],
            "strided": buffer[::2],  # not contiguous
        },
        "ema": {"count": torch.tensor(7, dtype=torch.int64), "decay": torch.tensor(0.999)},
        "rng": {"ids": torch.tensor([2**40, -3, 0], dtype=torch.int64)},
        "empty": {},
    }
    meta = {"config": {"dim": 3, "patch": [1, 2, 2]}, "data": {"epoch": 2, "index": 1234}, "note": "é"}
    path = save_checkpoint(tmp_path / "run", step=12, tensors=tensors, meta=meta)

    assert path == tmp_path / "run" / "step-00000012"
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.path == path and ckpt.step == 12
    assert ckpt.meta == {"config": {"dim": 3, "patch": [1, 2, 2]}, "data": {"epoch": 2, "index": 1234}, "note": "é"}
    assert set(ckpt.tensors) == {"model", "ema", "rng", "empty"}
    got = ckpt.tensors["model"]
    expected_embed = torch.tensor([[0.0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]])
    assert torch.equal(got["embed.weight"], expected_embed) and torch.equal(got["head.weight"], expected_embed)
    assert got["bf16"].dtype == torch.bfloat16
    assert got["bf16"].float().tolist() == [[1.5, -2.0], [0.25, 3.0]]
    assert got["first_half"].tolist() == [0, 1, 2, 3, 4] and got["second_half"].tolist() == [5, 6, 7, 8, 9]
    assert got["strided"].tolist() == [0, 2, 4, 6, 8]
    ema = ckpt.tensors["ema"]
    assert ema["count"].dtype == torch.int64 and ema["count"].shape == () and ema["count"].item() == 7
    assert ema["decay"].shape == () and ema["decay"].item() == pytest.approx(0.999)
    assert ckpt.tensors["rng"]["ids"].tolist() == [2**40, -3, 0]
    assert ckpt.tensors["empty"] == {}
    # Loading the folder directly gives the same checkpoint.
    assert load_checkpoint(path).step == 12
    # The caller's tensors are untouched (the tie is still a tie).
    assert tied.weight.data_ptr() == head.weight.data_ptr()


def test_layout_manifest_and_latest(tmp_path):
    run = tmp_path / "run"
    _save_simple(run, 3, 1.0)
    folder = run / "step-00000003"
    assert _entries(run) == {"latest", "step-00000003"}
    assert (run / "latest").read_text() == "step-00000003\n"
    assert _entries(folder) == {"manifest.json", "meta.json", "model.safetensors"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "difforge.checkpoint" and manifest["version"] == 1 and manifest["step"] == 3
    assert set(manifest["files"]) == {"meta.json", "model.safetensors"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((folder / "meta.json").read_text()) == {"value": 1.0}
    assert latest_checkpoint(run) == folder


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        _save_simple(tmp_path, 1, 1.0, keep=0)
    with pytest.raises(ValueError, match="step"):
        _save_simple(tmp_path, -1, 1.0)
    with pytest.raises(ValueError, match="group names"):
        save_checkpoint(tmp_path, step=1, tensors={"../x": {}}, meta={})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, step=1, tensors={}, meta={"bad": object()})
    with pytest.raises(TypeError, match="'model' must map str -> Tensor"):
        save_checkpoint(tmp_path, step=1, tensors={"model": {"w": [1.0]}}, meta={})
    # Nothing reached the disk.
    assert list(tmp_path.iterdir()) == []


# ---- verification on load ------------------------------------------------------------------------------


def test_truncated_file_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1, 2.0)
    target = folder / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[:-7])
    message = f"{target} is truncated: expected {len(data)} bytes, found {len(data) - 7}"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert message in str(info.value)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(folder)


def test_flipped_byte_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1, 2.0)
    target = folder / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # same size, last byte of tensor data
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: sha256"):
        load_checkpoint(tmp_path)


def test_edited_meta_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1, 2.0)
    (folder / "meta.json").write_text('{"value": 3.0}')  # shorter: caught by the size check
    with pytest.raises(CheckpointError, match=r"meta\.json is truncated"):
        load_checkpoint(tmp_path)


def test_unparseable_safetensors_with_matching_manifest_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1, 2.0)
    garbage = b"\xff" * 64
    (folder / "model.safetensors").write_bytes(garbage)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": 64, "sha256": hashlib.sha256(garbage).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not readable safetensors"):
        load_checkpoint(tmp_path)


def test_missing_manifest_or_file_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1, 2.0)
    (folder / "model.safetensors").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(version=2), "format version 2"),
        (lambda m: m.update(format="other"), "not a difforge.checkpoint manifest"),
        (lambda m: m["files"].pop("meta.json"), "malformed"),
        (lambda m: m["files"].update({"../escape": {"bytes": 1, "sha256": ""}}), "bad file entry"),
    ],
)
def test_bad_manifest_is_refused(tmp_path, edit, match):
    folder = _save_simple(tmp_path, 1, 2.0)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


def test_manifest_not_json_is_refused(tmp_path):
    folder = _save_simple(tmp_path, 1, 2.0)
    (folder / "manifest.json").write_text('{"format": "difforge.chec')
    with pytest.raises(CheckpointError, match="not JSON"):
        load_checkpoint(tmp_path)


def test_latest_pointing_nowhere(tmp_path):
    _save_simple(tmp_path, 1, 2.0)
    (tmp_path / "latest").write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="step-00000099"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="step-00000099"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        latest_checkpoint(tmp_path)


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")


def test_without_latest_file_the_highest_complete_step_is_used(tmp_path):
    _save_simple(tmp_path, 1, 1.0, keep=5)
    _save_simple(tmp_path, 10, 10.0, keep=5)
    _save_simple(tmp_path, 2, 2.0, keep=5)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"  # `latest` names the last save
    (tmp_path / "latest").unlink()
    (tmp_path / "step-00000011").mkdir()  # no manifest: not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"


# ---- crash atomicity -----------------------------------------------------------------------------------


class _FailingReplace:
    """Stands in for os.replace and raises on call number ``fail_at`` (0-based)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls, self.real = fail_at, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise OSError(f"injected failure renaming {src} -> {dst}")
        self.real(src, dst)


@pytest.mark.parametrize("fail_at", [0, 1], ids=["folder-rename", "latest-rename"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    _save_simple(tmp_path, 1, 1.0)
    monkeypatch.setattr(ckpt_module.os, "replace", _FailingReplace(fail_at))
    with pytest.raises(OSError, match="injected"):
        _save_simple(tmp_path, 2, 2.0)
    monkeypatch.undo()

    _assert_simple(load_checkpoint(tmp_path), 1, 1.0)
    assert any(name.startswith(".tmp-") for name in _entries(tmp_path))  # the interrupted save's leftovers
    _save_simple(tmp_path, 2, 2.0)
    _assert_simple(load_checkpoint(tmp_path), 2, 2.0)
    assert _entries(tmp_path) == {"latest", "step-00000001", "step-00000002"}


@pytest.mark.parametrize("fail_at", [0, 1, 2], ids=["set-aside", "folder-rename", "latest-rename"])
def test_failed_resave_of_same_step_keeps_a_complete_checkpoint(tmp_path, monkeypatch, fail_at):
    _save_simple(tmp_path, 5, 1.0)
    monkeypatch.setattr(ckpt_module.os, "replace", _FailingReplace(fail_at))
    with pytest.raises(OSError, match="injected"):
        _save_simple(tmp_path, 5, 2.0)
    monkeypatch.undo()

    # The old copy until the new one is renamed into place, the new one after.
    _assert_simple(load_checkpoint(tmp_path), 5, 1.0 if fail_at < 2 else 2.0)
    _save_simple(tmp_path, 5, 3.0)
    _assert_simple(load_checkpoint(tmp_path), 5, 3.0)
    assert _entries(tmp_path) == {"latest", "step-00000005"}


def test_stale_temp_entries_are_ignored_and_cleaned(tmp_path):
    _save_simple(tmp_path, 1, 1.0)
    stale = tmp_path / ".tmp-step-00000002-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-latest-99999").write_text("step-00000002")
    _assert_simple(load_checkpoint(tmp_path), 1, 1.0)
    _save_simple(tmp_path, 3, 3.0)
    assert _entries(tmp_path) == {"latest", "step-00000001", "step-00000003"}


_CHILD = """
import sys, torch
from difforge.pipelines.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
run = sys.argv[1]
# Resume the way a training loop does: re-save the step it resumed from, then go on.
step = load_checkpoint(run).step if latest_checkpoint(run) is not None else 1
first = True
while True:
    for _ in range(2):  # every step twice, to exercise replacing an existing step under the kill too
        save_checkpoint(run, step=step, tensors={
            "model": {"w": torch.full((64, 64), float(step)), "n": torch.tensor(step)},
            "ema": {"w": torch.full((64,), float(step), dtype=torch.bfloat16)},
        }, meta={"step": step}, keep=2)
        if first:
            print("ready", flush=True)
            first = False
    step += 1
"""


def test_sigkill_during_saves_always_leaves_a_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    delays = random.Random(os.getpid())
    last_step = 0
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            line = child.stdout.readline()
            assert line == "ready\n", f"child did not start: {child.stderr.read() if child.poll() else ''}"
            delay = delays.uniform(0.05, 0.5)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        ckpt = load_checkpoint(run)
        step = ckpt.step
        context = f"round {round_}, killed {delay:.3f} s after the first save, entries {sorted(_entries(run))}"
        assert step >= max(last_step, 1), context
        assert ckpt.meta == {"step": step}, context
        assert torch.equal(ckpt.tensors["model"]["w"], torch.full((64, 64), float(step))), context
        assert ckpt.tensors["model"]["n"].item() == step, context
        assert torch.equal(ckpt.tensors["ema"]["w"], torch.full((64,), float(step), dtype=torch.bfloat16)), context
        last_step = step
    # One clean save clears whatever the kills left behind.
    save_checkpoint(run, step=last_step + 1, tensors={}, meta={"step": last_step + 1})
    assert not [name for name in _entries(run) if name.startswith(".")]
    assert load_checkpoint(run).step == last_step + 1


# ---- pruning and re-saving -----------------------------------------------------------------------------


def test_keep_prunes_oldest(tmp_path):
    for step in range(1, 6):
        _save_simple(tmp_path, step, float(step))
    assert _entries(tmp_path) == {"latest", "step-00000004", "step-00000005"}
    _save_simple(tmp_path, 6, 6.0, keep=1)
    assert _entries(tmp_path) == {"latest", "step-00000006"}
    for step in (7, 8):
        _save_simple(tmp_path, step, float(step), keep=3)
    assert _entries(tmp_path) == {"latest", "step-00000006", "step-00000007", "step-00000008"}
    _assert_simple(load_checkpoint(tmp_path / "step-00000007"), 7, 7.0)


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20):
        _save_simple(tmp_path, step, float(step))
    _save_simple(tmp_path, 15, 15.0)  # e.g. resumed from an earlier checkpoint
    assert _entries(tmp_path) == {"latest", "step-00000015", "step-00000020"}
    _assert_simple(load_checkpoint(tmp_path), 15, 15.0)


def test_resave_same_step_replaces_it(tmp_path):
    _save_simple(tmp_path, 3, 1.0)
    _save_simple(tmp_path, 4, 4.0)
    _save_simple(tmp_path, 3, 9.0)
    assert _entries(tmp_path) == {"latest", "step-00000003", "step-00000004"}
    _assert_simple(load_checkpoint(tmp_path), 3, 9.0)


# ---- expected config -----------------------------------------------------------------------------------


def test_expected_config(tmp_path):
    config = {"dim": 64, "depth": 2, "patch": [1, 2, 2], "attn": {"heads": 4, "window": 8}, "seed": 1}
    save_checkpoint(tmp_path, step=1, tensors={}, meta={"config": config})

    ckpt = load_checkpoint(tmp_path, expected={"dim": 64, "patch": (1, 2, 2), "attn": {"heads": 4}})
    assert ckpt.meta["config"] == config
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, expected={"dim": 128, "depth": 2, "lr": 0.0001, "attn": {"heads": 8}})
    message = str(info.value)
    assert "dim: checkpoint=64 expected=128" in message
    assert "lr: checkpoint=<missing> expected=0.0001" in message
    assert "attn.heads: checkpoint=4 expected=8" in message
    assert "depth" not in message and "window" not in message


def test_expected_config_without_config_in_meta(tmp_path):
    _save_simple(tmp_path, 1, 1.0)
    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(tmp_path, expected={"dim": 64})


# ---- optimizer and RNG state ---------------------------------------------------------------------------


def _make_optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True)


def _train(model: nn.Module, optimizer, x: Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        noise = torch.randn(x.shape)  # from the global generator: only repeats if the RNG was restored
        scale = 1.0 + random.random() + float(np.random.rand())
        loss = (model(x + noise) ** 2).mean() * scale
        loss.backward()
        optimizer.step()



@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_and_rng_resume_is_bitwise(tmp_path, kind):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    x = torch.randn(8, 4)
    model = nn.Linear(4, 3)
    optimizer = _make_optimizer(kind, model.parameters())
    _train(model, optimizer, x, 3)
    opt_tensors, opt_meta = optimizer_state_tensors(optimizer)
    if kind == "adamw":
        assert set(opt_tensors) == {f"state.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}
        assert opt_tensors["state.0.step"].shape == () and opt_tensors["state.0.step"].item() == 3
    else:
        assert set(opt_tensors) == {"state.0.momentum_buffer", "state.1.momentum_buffer"}
    rng_tensors, rng_meta = rng_state()
    save_checkpoint(
        tmp_path,
        step=3,
        tensors={"model": model.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors},
        meta={"optimizer": opt_meta, "rng": rng_meta},
    )
    _train(model, optimizer, x, 3)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}

    def resume(restore_optimizer: bool) -> dict[str, Tensor]:
        torch.manual_seed(123)  # a fresh process: other init, other RNG state
        random.seed(123)
        np.random.seed(123)
        fresh = nn.Linear(4, 3)
        fresh_optimizer = _make_optimizer(kind, fresh.parameters())
        ckpt = load_checkpoint(tmp_path)
        fresh.load_state_dict(ckpt.tensors["model"])
        if restore_optimizer:
            load_optimizer_state(fresh_optimizer, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
        set_rng_state(ckpt.tensors["rng"], ckpt.meta["rng"])
        _train(fresh, fresh_optimizer, x, 3)
        return {name: p.detach() for name, p in fresh.named_parameters()}

    resumed = resume(restore_optimizer=True)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    # Control: without the optimizer state the run diverges, so the equality above is not vacuous.
    diverged = resume(restore_optimizer=False)
    assert not torch.equal(diverged["weight"], reference["weight"])


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_state_into_other_model_is_refused(tmp_path, kind):
    model = nn.Linear(4, 3)
    optimizer = _make_optimizer(kind, model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    tensors, meta = optimizer_state_tensors(optimizer)
    save_checkpoint(tmp_path, step=1, tensors={"optimizer": tensors}, meta={"optimizer": meta})
    ckpt = load_checkpoint(tmp_path)

    wider = _make_optimizer(kind, nn.Linear(5, 3).parameters())
    with pytest.raises(CheckpointError, match="parameter shapes"):
        load_optimizer_state(wider, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
    no_bias = _make_optimizer(kind, nn.Linear(4, 3, bias=False).parameters())
    with pytest.raises(CheckpointError, match="parameter shapes"):
        load_optimizer_state(no_bias, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
    stray = {**ckpt.tensors["optimizer"], "state.7.exp_avg": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"state\.7\.exp_avg"):
        load_optimizer_state(_make_optimizer(kind, model.parameters()), stray, ckpt.meta["optimizer"])


def test_optimizer_metadata_is_json_and_betas_stay_tuples(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = _make_optimizer("adamw", model.parameters())
    tensors, meta = optimizer_state_tensors(optimizer)  # before any step: no state yet
    assert tensors == {}
    assert json.loads(json.dumps(meta))["param_groups"][0]["betas"] == [0.8, 0.95]
    assert meta["param_shapes"] == [[[2, 2], [2]]]
    save_checkpoint(tmp_path, step=0, tensors={"optimizer": tensors}, meta={"optimizer": meta})
    ckpt = load_checkpoint(tmp_path)
    fresh = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=0.5)
    load_optimizer_state(fresh, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
    assert fresh.param_groups[0]["lr"] == 1e-2 and fresh.param_groups[0]["betas"] == (0.8, 0.95)


def test_rng_state_repeats_draws(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    tensors, meta = rng_state()
    first = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    save_checkpoint(tmp_path, step=1, tensors={"rng": tensors}, meta={"rng": meta})

    torch.manual_seed(6)
    random.seed(6)
    np.random.seed(6)
    ckpt = load_checkpoint(tmp_path)
    assert not torch.equal(torch.rand(4), first[0])  # control: another state draws otherwise
    set_rng_state(ckpt.tensors["rng"], ckpt.meta["rng"])
    second = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert np.array_equal(first[2], second[2]) and first[3] == second[3]


def test_set_rng_state_refuses_incomplete_state():
    tensors, meta = rng_state()
    with pytest.raises(CheckpointError, match="python"):
        set_rng_state(tensors, {"numpy": meta["numpy"]})
    with pytest.raises(CheckpointError, match="torch.cpu"):
        set_rng_state({}, meta)
