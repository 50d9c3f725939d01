"""Crash-safe training checkpoints in safetensors.

Layout of a run directory written by :func:`save_checkpoint`::

    run/
        latest                      # text: the folder name of the newest checkpoint, e.g. "step-00001200"
        step-00001000/
        step-00001200/
            manifest.json           # format, version, step, byte size and sha256 of every other file
            meta.json               # the caller's JSON metadata (config, data position, RNG meta, ...)
            model.safetensors       # one file per tensor group
            optimizer.safetensors
            ...

A checkpoint is written into a hidden ``.tmp-step-XXXXXXXX-<pid>`` folder, every file fsynced, then renamed
into place, and only then does ``latest`` (replaced atomically) point at it. A crash at any moment leaves
``latest`` naming a complete checkpoint: the previous one or the new one. Hidden ``.tmp-*`` entries are
leftovers of interrupted saves; loaders ignore them and the next successful save removes them, so a run
directory must have a single writer (rank 0).

Typical use in a training loop::

    opt_tensors, opt_meta = optimizer_state_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    save_checkpoint(run_dir, step=step, tensors={"model": model.state_dict(), "optimizer": opt_tensors,
                    "rng": rng_tensors}, meta={"config": config, "optimizer": opt_meta, "rng": rng_meta})

    if latest_checkpoint(run_dir) is not None:
        ckpt = load_checkpoint(run_dir, expected=config)
        model.load_state_dict(ckpt.tensors["model"])
        load_optimizer_state(optimizer, ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
        set_rng_state(ckpt.tensors["rng"], ckpt.meta["rng"])
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from difforge._durable import fsync_dir, write_durable

FORMAT = "difforge.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
_TMP_PREFIX = ".tmp-"
# A step folder being replaced by a re-save of the same step waits here until its successor is in place.
_ASIDE_PREFIX = ".tmp-old-"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match what the caller expects."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint: its folder, step, tensor groups and JSON metadata."""

    path: Path
    step: int
    tensors: dict[str, dict[str, Tensor]]
    meta: dict[str, Any]


# ---- durable file-system primitives --------------------------------------------------------------------


def _fsync_and_describe(path: Path) -> dict[str, Any]:
    """fsyncs a written file and returns its manifest entry (byte size and sha256 of what is on disk)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "r+b") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _discard(directory: Path, folder: Path) -> None:
    """Deletes a checkpoint folder; renamed to a hidden name first so that a crash mid-delete never leaves a
    half-deleted folder that still looks like a checkpoint."""
    trash = directory / f"{_TMP_PREFIX}del-{folder.name}-{os.getpid()}"
    os.replace(folder, trash)
    shutil.rmtree(trash)


# ---- saving --------------------------------------------------------------------------------------------


def _prepare_group(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, storage-disjoint copies of a group's tensors (what safetensors can store)."""
    prepared: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights, views of one buffer): clone all but the first.
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            tensor = tensor.clone()
        storages.add(pointer)
        prepared[name] = tensor
    return prepared


def _write_latest(directory: Path, name: str) -> None:
    tmp = directory / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}"
    write_durable(tmp, f"{name}\n".encode())
    os.replace(tmp, directory / LATEST)
    fsync_dir(directory)


def _complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-*`` folder with a manifest, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    meta: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Atomically writes checkpoint ``directory/step-{step:08d}/`` and points ``directory/latest`` at it.

    Args:
        directory: the run directory (created if missing).
        step: the training step, >= 0. Saving a step that already exists replaces it.
        tensors: groups of named tensors, e.g. ``{"model": model.state_dict(), "optimizer": ...}``; each
            group becomes ``<group>.safetensors``. Tensors are detached, copied to the CPU and made
            contiguous; tensors sharing storage (tied weights) are stored as separate copies.
        meta: JSON-serialisable metadata, stored as ``meta.json``; put the training config under ``"config"``
            so that :func:`load_checkpoint` can check it.
        keep: how many complete checkpoints to keep, the one just written included; older ones (by step)
            are deleted after the save succeeded.

    Returns:
        The folder of the new checkpoint.

    Raises:
        ValueError: a bad ``step``, ``keep`` or group name. TypeError: ``meta`` is not JSON-serialisable or a
        group holds something other than tensors. OSError from the file system: ``latest`` then names the
        previous checkpoint, or the new one if only the clean-up after the switch failed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be an int >= 1, got {keep!r}")
    # Validate everything first: a bad argument fails before anything touches the disk.
    for group, group_tensors in tensors.items():
        if not isinstance(group, str) or not _GROUP_NAME.fullmatch(group):
            raise ValueError(f"save_checkpoint: group names must match {_GROUP_NAME.pattern}, got {group!r}")
        for key, tensor in group_tensors.items():
            if not isinstance(key, str) or not isinstance(tensor, Tensor):
                raise TypeError(
                    f"save_checkpoint: group {group!r} must map str -> Tensor, got {key!r}: {type(tensor).__name__}"
                )
    meta_bytes = json.dumps(meta, indent=1).encode()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = directory / name
    tmp = directory / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():  # left by an earlier failed save of this process
        shutil.rmtree(tmp)
    tmp.mkdir()

    files = {}
    for group, group_tensors in tensors.items():
        filename = f"{group}.safetensors"
        save_file(_prepare_group(group_tensors), tmp / filename)
        files[filename] = _fsync_and_describe(tmp / filename)
    write_durable(tmp / META, meta_bytes)
    files[META] = _fsync_and_describe(tmp / META)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)

    aside = directory / f"{_ASIDE_PREFIX}{name}"
    if final.exists():
        if aside.exists():  # an older aside copy: stale, since `final` is there
            shutil.rmtree(aside)
        # Until `tmp` takes its place, `latest` may name a missing folder; latest_checkpoint() then uses `aside`.
        os.replace(final, aside)
        fsync_dir(directory)
    os.replace(tmp, final)
    fsync_dir(directory)
    _write_latest(directory, name)

    # The new checkpoint is durable and current: now clear leftovers (this save's aside copy included).
    for entry in list(directory.iterdir()):
        if entry.name.startswith(_TMP_PREFIX):
            _remove(entry)
    others = [folder for _, folder in _complete_checkpoints(directory) if folder != final]
    for folder in others[: max(len(others) - (keep - 1), 0)]:
        _discard(directory, folder)
    return final


# ---- loading -------------------------------------------------------------------------------------------


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The folder of the newest checkpoint in run ``directory``, as named by its ``latest`` file.

    Without a ``latest`` file (a first save interrupted right before writing it), the complete ``step-*``
    folder with the highest step is returned. Returns None when the directory holds no checkpoint (or does
    not exist). Raises CheckpointError when ``latest`` is unreadable or names a folder that does not exist.
    """
    directory = Path(directory)
    pointer = directory / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        complete = _complete_checkpoints(directory)
        return complete[-1][1] if complete else None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{pointer} is unreadable: {error}") from error
    if not _STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{pointer} is corrupt: expected a folder name like step-00000100, found {name!r}")
    folder = directory / name
    if folder.is_dir():
        return folder
    # A re-save of this step was interrupted between its two renames: the replaced checkpoint is intact here.
    if (directory / f"{_ASIDE_PREFIX}{name}").is_dir():
        return directory / f"{_ASIDE_PREFIX}{name}"
    raise CheckpointError(f"{pointer} names {name}, but {folder} does not exist")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: {folder} is not a complete checkpoint") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable or not JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('version')!r}; this code reads {VERSION}")
    step, files = manifest.get("step"), manifest.get("files")
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(files, dict) or META not in files:
        raise CheckpointError(f"{path} is malformed: needs an int 'step' and 'files' listing {META}")
    for filename, entry in files.items():
        if Path(filename).name != filename or filename.startswith(".") or not isinstance(entry, dict):
            raise CheckpointError(f"{path} is malformed: bad file entry {filename!r}")
    return manifest


def _verify_file(path: Path, entry: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless the file at ``path`` has the manifest's byte size and sha256."""
    try:
        size = path.stat().st_size
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint file {path} is missing") from error
    expected_size = entry.get("bytes")
    if size != expected_size:
        problem = "is truncated" if isinstance(expected_size, int) and size < expected_size else "has a wrong size"
        raise CheckpointError(f"checkpoint file {path} {problem}: expected {expected_size} bytes, found {size}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != entry.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: sha256 {digest.hexdigest()} does not match the manifest's "
            f"{entry.get('sha256')}"
        )


def _config_mismatches(found: Any, expected: Any, prefix: str = "") -> list[str]:
    """``key: checkpoint=<v> expected=<v>`` for every key of ``expected`` that ``found`` lacks or differs in;
    nested dicts are compared key by key (dotted names)."""
    lines = []
    for key, want in expected.items():
        label = f"{prefix}{key}"
        if key not in found:
            lines.append(f"{label}: checkpoint=<missing> expected={json.dumps(want)}")
        elif isinstance(want, dict) and isinstance(found[key], dict):
            lines.extend(_config_mismatches(found[key], want, f"{label}."))
        elif found[key] != want:
            lines.append(f"{label}: checkpoint={json.dumps(found[key])} expected={json.dumps(want)}")
    return lines


def load_checkpoint(
    path_or_directory: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    expected: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Loads and verifies a checkpoint: a ``step-*`` folder, or the latest one of a run directory.

    Every file listed in the manifest must be present with the recorded byte size and sha256, and every
    group must parse as safetensors; tensors are placed on ``map_location``. With ``expected``, each of its
    keys must be present in ``meta["config"]`` with an equal value (compared after a JSON round trip, so a
    tuple matches the list it was saved as; nested dicts key by key); other config keys are ignored.

    Raises:
        CheckpointError: no checkpoint, a missing/unreadable manifest or file, a truncated or corrupt file,
            or a config mismatch (the message lists ``key: checkpoint=<v> expected=<v>`` per key).
    """
    path = Path(path_or_directory)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a folder")
    if (path / MANIFEST).exists() or _STEP_DIR.fullmatch(path.name):
        folder = path
    else:
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}: no {LATEST} file and no complete step-* folder")
        folder = found

    manifest = _read_manifest(folder)
    for filename, entry in manifest["files"].items():
        _verify_file(folder / filename, entry)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / META} is not JSON: {error}") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / META} does not hold a JSON object")

    if expected is not None:
        config = meta.get("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / META} has no 'config' object to check the expected config against")
        # The checkpoint went through JSON; put `expected` through it too (tuples -> lists, int keys -> str).
        mismatches = _config_mismatches(config, json.loads(json.dumps(dict(expected))))
        if mismatches:
            raise CheckpointError(f"{folder} was saved with another config:\n  " + "\n  ".join(mismatches))

    device = str(torch.device(map_location))
    tensors = {}
    for filename in manifest["files"]:
        if filename.endswith(".safetensors"):
            try:
                tensors[filename.removesuffix(".safetensors")] = load_file(folder / filename, device=device)
            except Exception as error:  # safetensors raises several types for a malformed file
                raise CheckpointError(
                    f"checkpoint file {folder / filename} is not readable safetensors: {error}"
                ) from error
    return Checkpoint(path=folder, step=manifest["step"], tensors=tensors, meta=meta)


# ---- optimizer state -----------------------------------------------------------------------------------


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into a tensor group and JSON metadata for :func:`save_checkpoint`.

    Tensor state is named ``"state.{param_id}.{key}"`` (e.g. ``state.0.exp_avg``); tensor-valued
    hyperparameters ``"param_groups.{index}.{key}"``. The metadata holds the other state values, the param
    groups (hyperparameters and param ids) and every parameter's shape, so that loading into an optimizer
    over other parameters fails loudly.
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    other_state: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{param_id}.{key}"] = value
            else:
                other_state.setdefault(str(param_id), {})[key] = value
    groups = []
    for index, group in enumerate(state_dict["param_groups"]):
        plain = {}
        for key, value in group.items():
            if isinstance(value, Tensor):
                tensors[f"param_groups.{index}.{key}"] = value
            else:
                plain[key] = value
        groups.append(plain)
    shapes = [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups]
    return tensors, {"param_groups": groups, "state": other_state, "param_shapes": shapes}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Restores what :func:`optimizer_state_tensors` returned into ``optimizer`` (via ``load_state_dict``).

    Call it after creating any LR scheduler on the optimizer (the scheduler's constructor resets the lr).
    Raises CheckpointError if the optimizer's param groups, param counts or parameter shapes differ from the
    saved ones, or the tensors do not belong to the saved state.
    """
    try:
        saved_groups = [dict(group) for group in meta["param_groups"]]
        saved_shapes = meta["param_shapes"]
        state: dict[int, dict[str, Any]] = {int(param_id): dict(values) for param_id, values in meta["state"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"optimizer metadata is malformed: {error!r}") from error
    shapes = [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups]
    if shapes != saved_shapes:
        raise CheckpointError(
            f"optimizer state does not match this optimizer: saved parameter shapes per group {saved_shapes}, "
            f"optimizer has {shapes}"
        )
    current_groups = optimizer.state_dict()["param_groups"]
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        if saved.get("params") != current["params"]:
            raise CheckpointError(
                f"optimizer state does not match this optimizer: param group {index} has param ids "
                f"{saved.get('params')}, optimizer has {current['params']}"
            )
        for key, value in current.items():
            # JSON turned tuples (e.g. AdamW betas) into lists; give them back the optimizer's own type.
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])

    param_ids = {param_id for group in current_groups for param_id in group["params"]}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        index, _, key = rest.partition(".")
        if kind == "state" and index.isdigit() and int(index) in param_ids and key:
            state.setdefault(int(index), {})[key] = tensor
        elif kind == "param_groups" and index.isdigit() and int(index) < len(saved_groups) and key:
            saved_groups[int(index)][key] = tensor
        else:
            raise CheckpointError(f"optimizer tensor {name!r} does not belong to this optimizer's state")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved_groups})
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"optimizer state does not load into this optimizer: {error}") from error


# ---- random number generators --------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The global RNG states: torch's CPU generator (``"torch.cpu"``) and every CUDA device's
    (``"torch.cuda.{index}"``, when CUDA is available) as tensors; Python's ``random`` and NumPy's global
    generator as JSON metadata (``"python"``, ``"numpy"``)."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Restores the RNG states captured by :func:`rng_state`.

    Saved CUDA states are applied to the devices present (a checkpoint from a machine with more GPUs, or
    none, still resumes); raises CheckpointError when the CPU, Python or NumPy state is missing.
    """
    try:
        cpu = tensors["torch.cpu"]
        version, internal, gauss = meta["python"]
        name, keys, pos, has_gauss, cached = meta["numpy"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"RNG state is incomplete or malformed: {error!r}") from error
    torch.set_rng_state(cpu.to("cpu"))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"torch.cuda.{index}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch.cuda.{index}"].to("cpu"), index)
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
