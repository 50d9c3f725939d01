"""Crash-safe file writes shared by every writer in difforge (quantized tensors, data shards, checkpoints):
write under a temporary name, fsync, rename over the target, fsync the folder. A crash, even ``kill -9``,
leaves either the old file or the complete new one, never a partial one under the real name."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes the entries of ``folder`` (creations, renames, removals) durable; a no-op where a folder cannot be
    opened (Windows, whose NTFS journals renames itself)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` (not atomically: for files inside a folder that is renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_safetensors_atomic(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """``safetensors.torch.save_file`` that never leaves a partial file at ``path``."""
    path = Path(path)
    # A fresh name in the same folder (so the rename is atomic), not mkstemp: its files are private (0600).
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(dict(tensors), tmp, metadata=None if metadata is None else dict(metadata))
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
