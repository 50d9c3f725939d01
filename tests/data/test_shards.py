"""Safetensors shards ("difforge video latents v1"): round trips, atomic writes, the reader's validation of
hand-made bad shards, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import difforge._durable as durable
import difforge.data.shards as shards_module
from difforge.data import ShardDataset, SyntheticVideoDataset, write_shards

META = {"format": "difforge-video-latents", "version": "1"}


def make_samples(count: int, channels: int = 4, dc: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random samples of varying T, H, W and Lc (fixed C, Dc)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(count):
        t, h, w, lc = 1 + k % 3, 2 + k % 2, 3 + k % 4, 1 + k % 5
        samples.append(
            {
                "latents": torch.randn(channels, t, h, w, generator=generator),
                "context": torch.randn(lc, dc, generator=generator),
            }
        )
    return samples


def hand_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def good_tensors(count: int, channels: int = 4, dc: int = 6) -> dict[str, torch.Tensor]:
    tensors = {}
    for k in range(count):
        tensors[f"latents.{k}"] = torch.zeros(channels, 2, 2, 2)
        tensors[f"context.{k}"] = torch.zeros(3, dc)
    return tensors


# ---- writing and reading -------------------------------------------------------------------------------------------


def test_round_trip_across_shards(tmp_path):
    samples = make_samples(10)
    paths = write_shards(tmp_path, iter(samples), samples_per_shard=4)
    assert [p.name for p in paths] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert sorted(tmp_path.iterdir()) == paths  # no temporaries left behind
    for path, count in zip(paths, (4, 4, 2)):
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == META | {"count": str(count)}
            assert sorted(f.keys()) == sorted(f"{n}.{k}" for k in range(count) for n in ("latents", "context"))
    dataset = ShardDataset(tmp_path)
    assert len(dataset) == 10 and dataset.channels == 4 and dataset.context_dim == 6
    for i, sample in enumerate(samples):
        got = dataset[i]
        assert set(got) == {"latents", "context"}
        assert torch.equal(got["latents"], sample["latents"]) and torch.equal(got["context"], sample["context"])
        assert dataset.shape_of(i) == tuple(sample["latents"].shape[1:])
    # Sample 5 is the second sample of shard 1.
    with safe_open(paths[1], framework="pt") as f:
        assert torch.equal(f.get_tensor("latents.1"), samples[5]["latents"])


def test_half_precision_storage(tmp_path):
    samples = make_samples(3)
    write_shards(tmp_path, samples, dtype=torch.bfloat16)
    with safe_open(tmp_path / "shard-00000.safetensors", framework="pt") as f:
        assert f.get_slice("latents.0").get_dtype() == "BF16"
        assert f.get_slice("context.2").get_dtype() == "BF16"
    as_float = ShardDataset(tmp_path)
    as_half = ShardDataset(tmp_path, dtype=torch.float16)
    for i, sample in enumerate(samples):
        assert as_float[i]["latents"].dtype == torch.float32 and as_half[i]["context"].dtype == torch.float16
        torch.testing.assert_close(as_float[i]["latents"], sample["latents"].bfloat16().float(), rtol=0, atol=0)


def test_mixed_input_dtypes_kept(tmp_path):
    samples = make_samples(2)
    samples[1] = {"latents": samples[1]["latents"].half(), "context": samples[1]["context"], "caption": "ignored"}
    write_shards(tmp_path, samples)
    with safe_open(tmp_path / "shard-00000.safetensors", framework="pt") as f:
        assert [f.get_slice(k).get_dtype() for k in ("latents.0", "latents.1", "context.1")] == ["F32", "F16", "F32"]


def test_views_of_one_buffer(tmp_path):
    # Samples sliced from one preloaded tensor share storage, which safetensors alone would refuse.
    big = torch.randn(3, 4, 2, 3, 5)
    write_shards(tmp_path, [{"latents": big[i], "context": big[i, :, 0, 0].t()} for i in range(3)])
    dataset = ShardDataset(tmp_path)
    assert torch.equal(dataset[2]["latents"], big[2]) and torch.equal(dataset[1]["context"], big[1, :, 0, 0].t())


def test_synthetic_round_trip_and_tokens(tmp_path):
    synthetic = SyntheticVideoDataset(6, context_dim=8, seed=4)
    write_shards(tmp_path, (synthetic[i] for i in range(6)), samples_per_shard=5)
    dataset = ShardDataset(tmp_path)
    for i in range(6):
        assert torch.equal(dataset[i]["latents"], synthetic[i]["latents"])
        assert dataset.shape_of(i) == synthetic.shape_of(i)
        t, h, w = synthetic.shape_of(i)
        assert dataset.tokens_of(i) == t * (h // 2) * (w // 2)
        assert dataset.tokens_of(i, (2, 4, 4)) == (t // 2) * (h // 4) * (w // 4)
    with pytest.raises(ValueError, match="divisible"):
        dataset.tokens_of(0, (3, 2, 2))


def test_reader_uses_sorted_names_and_ignores_other_files(tmp_path):
    hand_shard(tmp_path / "b.safetensors", {"latents.0": torch.full((2, 1, 1, 1), 2.0), "context.0": torch.ones(1, 3)},
               META | {"count": "1"})
    hand_shard(tmp_path / "a.safetensors", {"latents.0": torch.full((2, 1, 1, 1), 1.0), "context.0": torch.ones(1, 3)},
               META | {"count": "1"})
    (tmp_path / "notes.txt").write_text("not a shard")
    (tmp_path / ".shard-00000.safetensors.0123.tmp").write_bytes(b"half-written")
    dataset = ShardDataset(tmp_path)
    assert [float(dataset[i]["latents"][0, 0, 0, 0]) for i in range(2)] == [1.0, 2.0]


def test_index_errors(tmp_path):
    write_shards(tmp_path, make_samples(3))
    dataset = ShardDataset(tmp_path)
    for index in (-1, 3):
        with pytest.raises(IndexError):
            dataset[index]
        with pytest.raises(IndexError):
            dataset.shape_of(index)


def test_construction_reads_headers_only(tmp_path, monkeypatch):
    write_shards(tmp_path, make_samples(5), samples_per_shard=2)
    real_open = shards_module.safe_open
    loads = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            loads.append(key)
            return self.handle.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(shards_module, "safe_open", Spy)
    dataset = ShardDataset(tmp_path)
    assert len(dataset) == 5 and loads == []
    dataset[3]
    assert sorted(loads) == ["context.1", "latents.1"]


# ---- the writer: validation, refusal, atomicity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"latents": torch.zeros(4, 2, 2)}, "'latents' must be a non-empty 4-D float"),
        ({"latents": torch.zeros(4, 2, 2, 2, dtype=torch.int32)}, "'latents' must be a non-empty 4-D float"),
        ({"latents": torch.zeros(4, 0, 2, 2)}, "non-empty"),
        ({"context": torch.zeros(6)}, "'context' must be a non-empty 2-D float"),
        ({"latents": torch.zeros(5, 2, 2, 2)}, "C = 5"),
        ({"context": torch.zeros(2, 7)}, "Dc = 7"),
        ({"latents": torch.zeros(4, 1, 1, 1, dtype=torch.float64)}, "float64"),
        ({"latents": None}, "'latents' must be a Tensor"),
    ],
)
def test_writer_rejects_bad_sample_before_writing_its_shard(tmp_path, bad, match):
    samples = make_samples(8)
    samples[5] = samples[5] | bad
    with pytest.raises(ValueError, match=f"sample 5: .*{match}"):
        write_shards(tmp_path, samples, samples_per_shard=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]


def test_writer_converts_float64_on_request(tmp_path):
    samples = [{"latents": torch.ones(2, 1, 1, 1, dtype=torch.float64), "context": torch.ones(1, 2)}]
    write_shards(tmp_path, samples, dtype=torch.float32)
    assert ShardDataset(tmp_path)[0]["latents"].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples_per_shard": 0}, "samples_per_shard"),
        ({"dtype": torch.int8}, "dtype"),
        ({"dtype": torch.float64}, "dtype"),
    ],
)
def test_writer_rejects_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_shards(tmp_path, make_samples(1), **kwargs)


def test_writer_rejects_no_samples_and_non_mappings(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        write_shards(tmp_path, [])
    with pytest.raises(ValueError, match="sample 0: must be a mapping"):
        write_shards(tmp_path, [torch.zeros(3)])


def test_writer_refuses_existing_shards_unless_overwrite(tmp_path):
    write_shards(tmp_path, make_samples(9), samples_per_shard=3)
    (tmp_path / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(tmp_path, make_samples(2))
    assert len(ShardDataset(tmp_path)) == 9
    write_shards(tmp_path, make_samples(2, seed=1), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "shard-00000.safetensors"]
    dataset = ShardDataset(tmp_path)
    assert len(dataset) == 2 and torch.equal(dataset[1]["latents"], make_samples(2, seed=1)[1]["latents"])


def test_writer_creates_the_folder(tmp_path):
    write_shards(tmp_path / "a" / "b", make_samples(1))
    assert len(ShardDataset(tmp_path / "a" / "b")) == 1


def test_crash_mid_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    real_save = durable.save_file
    calls = []

    def crash_on_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:  # a torn write, then the "crash"
                f.write(b"\x00" * 100)
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(durable, "save_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path, make_samples(6), samples_per_shard=3)
    assert Path(calls[1]).parent == tmp_path and not str(calls[1]).endswith(".safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]
    assert len(ShardDataset(tmp_path)) == 3


def test_shards_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(shards_module.os, "fsync", spy)
    write_shards(tmp_path, make_samples(2))
    assert str(tmp_path.resolve()) in synced  # the folder, after the rename
    assert any(name.endswith(".tmp") for name in map(str, synced))  # the file, before the rename


# ---- the reader: hand-made bad folders -------------------------------------------------------------------------------


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ShardDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no \*\.safetensors shards in"):
        ShardDataset(tmp_path)


def _bad_cases():
    good = good_tensors(2)
    meta = META | {"count": "2"}
    return {
        "no metadata": (good, None, "format/version is None/None"),
        "wrong format": (good, meta | {"format": "images"}, "format/version is 'images'"),
        "wrong version": (good, meta | {"version": "2"}, "'2'"),
        "count missing": (good, META, "count must be a positive integer"),
        "count not a number": (good, meta | {"count": "two"}, "count must be a positive integer, got 'two'"),
        "count too large": (good, meta | {"count": "3"}, "count is 3 but tensor 'latents.2' is missing"),
        "count too small": (good, meta | {"count": "1"}, r"count is 1 but the shard also holds \['context.1'"),
        "missing context": (
            {k: v for k, v in good.items() if k != "context.1"},
            meta,
            "'context.1' is missing",
        ),
        "latents 3-D": (good | {"latents.1": torch.zeros(4, 2, 2)}, meta, r"'latents.1' has shape \[4, 2, 2\]"),
        "context 1-D": (good | {"context.0": torch.zeros(6)}, meta, "'context.0' has shape"),
        "integer latents": (
            good | {"latents.0": torch.zeros(4, 2, 2, 2, dtype=torch.int64)},
            meta,
            "'latents.0' has dtype I64",
        ),
        "float64 context": (
            good | {"context.1": torch.zeros(3, 6, dtype=torch.float64)},
            meta,
            "'context.1' has dtype F64",
        ),
        "zero-size": (good | {"latents.1": torch.zeros(4, 0, 2, 2)}, meta, "'latents.1' has shape"),
        "channels differ": (good | {"latents.1": torch.zeros(5, 2, 2, 2)}, meta, "C = 5"),
        "context width differs": (good | {"context.1": torch.zeros(3, 7)}, meta, "Dc = 7"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_reader_rejects_bad_shard(tmp_path, case):
    tensors, metadata, match = _bad_cases()[case]
    write_shards(tmp_path, make_samples(2), samples_per_shard=2)  # a good shard-00000 first
    path = tmp_path / "shard-00001.safetensors"
    hand_shard(path, tensors, metadata)
    with pytest.raises(ValueError, match=match) as error:
        ShardDataset(tmp_path)
    assert str(path) in str(error.value)


def test_inconsistent_dims_across_shards(tmp_path):
    write_shards(tmp_path, make_samples(2, channels=4), samples_per_shard=2)
    hand_shard(tmp_path / "shard-00001.safetensors", good_tensors(1, channels=3), META | {"count": "1"})
    with pytest.raises(ValueError, match="shard-00001.safetensors: .*C = 3.*C = 4"):
        ShardDataset(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_names_the_file(tmp_path, damage):
    paths = write_shards(tmp_path, make_samples(4), samples_per_shard=2)
    data = paths[1].read_bytes()
    paths[1].write_bytes({"truncate": data[: len(data) - 17], "garbage": b"\x13" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match="shard-00001.safetensors: not a readable safetensors file"):
        ShardDataset(tmp_path)


def test_file_damaged_after_scan(tmp_path):
    paths = write_shards(tmp_path, make_samples(4), samples_per_shard=2)
    dataset = ShardDataset(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:40])
    assert dataset[1]["latents"].shape[0] == 4  # shard 0 still reads
    with pytest.raises(ValueError, match="shard-00001.safetensors: cannot read sample 2"):
        dataset[2]


def test_reader_rejects_non_float_dtype(tmp_path):
    write_shards(tmp_path, make_samples(1))
    with pytest.raises(ValueError, match="dtype"):
        ShardDataset(tmp_path, dtype=torch.int32)


# ---- CLI -------------------------------------------------------------------------------------------------------------


def test_cli_writes_synthetic_shards(tmp_path):
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "difforge.data.shards", "--synthetic", "5", "--out", str(out)]
    result = subprocess.run(
        command + ["--samples-per-shard", "2", "--seed", "3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 5 samples in 3 shards" in result.stdout
    assert "Warning" not in result.stderr
    dataset, synthetic = ShardDataset(out), SyntheticVideoDataset(5, seed=3)
    assert len(dataset) == 5
    for i in range(5):
        assert torch.equal(dataset[i]["latents"], synthetic[i]["latents"])
        assert torch.equal(dataset[i]["context"], synthetic[i]["context"])


def test_cli_main_in_process(tmp_path, capsys):
    assert shards_module.main(["--synthetic", "3", "--out", str(tmp_path)]) == 0
    assert "wrote 3 samples in 1 shards" in capsys.readouterr().out
    # Bad input is a usage error (exit status 2) with the reason, not a traceback.
    for argv, reason in (([], "overwrite"), (["--overwrite", "--samples-per-shard", "0"], "samples_per_shard")):
        with pytest.raises(SystemExit) as exit_info:
            shards_module.main(["--synthetic", "3", "--out", str(tmp_path)] + argv)
        assert exit_info.value.code == 2 and reason in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shards_module.main(["--synthetic", "0", "--out", str(tmp_path), "--overwrite"])
    assert "num_samples" in capsys.readouterr().err
