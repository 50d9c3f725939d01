"""Quantized checkpoints in safetensors: containers stored as their code and scale tensors, described in metadata.

Layout of a file written by :func:`save_quantized`:

* a :class:`HiF8Tensor` named ``w`` is stored as tensors ``w.codes`` (uint8) and ``w.scale`` (float32, 0-dim);
* an :class:`NVFP4Tensor` as ``w.block_scales`` (float8_e4m3fn), ``w.packed`` (uint8) and, when two-level,
  ``w.per_tensor_scale`` (float32);
* a plain tensor under its own name;
* the safetensors metadata key ``"difforge.formats"`` holds a JSON string ``{"version": 1, "entries": {name:
  {"format": "hif8" | "nvfp4" | "tensor", "shape": [...], "dtype": "bfloat16", ...}}}`` in save order; the
  caller's metadata (string keys and values) sits beside it.

Files are written atomically (a temporary file in the same folder, fsync, ``os.replace``): a crash leaves the old
file or the new one, never a torn one. Loading checks every entry against the tensors it finds and raises
ValueError on a truncated file or inconsistent metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from difforge._durable import save_safetensors_atomic
from difforge.formats.tensors import FLOAT_DTYPES, HiF8Tensor, NVFP4Tensor, QuantizedTensor

METADATA_KEY = "difforge.formats"
VERSION = 1
_PARTS = {  # format -> (required suffixes, optional suffixes)
    "hif8": (("codes", "scale"), ()),
    "nvfp4": (("block_scales", "packed"), ("per_tensor_scale",)),
    "tensor": ((), ()),
}
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _flatten(name: str, value: QuantizedTensor | Tensor) -> tuple[dict, dict[str, Tensor]]:
    """(metadata entry, stored tensors) of one named value."""
    if isinstance(value, HiF8Tensor):
        entry = {"format": "hif8", "shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        return entry, {f"{name}.codes": value.codes, f"{name}.scale": value.scale.reshape(())}
    if isinstance(value, NVFP4Tensor):
        entry = {
            "format": "nvfp4",
            "shape": list(value.shape),
            "dtype": _dtype_name(value.dtype),
            "block_2d": value.block_2d,
        }
        parts = {f"{name}.block_scales": value.block_scales, f"{name}.packed": value.packed}
        if value.per_tensor_scale is not None:
            parts[f"{name}.per_tensor_scale"] = value.per_tensor_scale.reshape(())
        return entry, parts
    if isinstance(value, Tensor):
        return {"format": "tensor", "shape": list(value.shape), "dtype": _dtype_name(value.dtype)}, {name: value}
    raise TypeError(
        f"save_quantized: {name!r} must be a HiF8Tensor, NVFP4Tensor or Tensor, got {type(value).__name__}"
    )


def save_quantized(
    path: str | os.PathLike,
    tensors: Mapping[str, QuantizedTensor | Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` (names -> :class:`HiF8Tensor`, :class:`NVFP4Tensor` or plain Tensor) to a safetensors
    file at ``path``, atomically. ``metadata`` (string keys and values, read back with :func:`read_metadata`)
    is stored beside the format description; the key ``"difforge.formats"`` is reserved.

    Tensors on another device are copied to the CPU first. Raises ValueError on a name clash (e.g. a plain
    tensor named ``"w.codes"`` next to a container named ``"w"``).
    """
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_quantized: metadata keys and values must be str, got {key!r}: {value!r}")
    if METADATA_KEY in metadata:
        raise ValueError(f"save_quantized: the metadata key {METADATA_KEY!r} is reserved")
    entries, stored = {}, {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"save_quantized: names must be non-empty str, got {name!r}")
        entry, parts = _flatten(name, value)
        clash = sorted(set(parts) & set(stored))
        if clash:
            raise ValueError(f"save_quantized: {name!r} would store {clash}, already used by another entry")
        entries[name] = entry
        stored.update({key: t.detach().to("cpu").contiguous() for key, t in parts.items()})
    metadata[METADATA_KEY] = json.dumps({"version": VERSION, "entries": entries})

    save_safetensors_atomic(stored, path, metadata)


def _open_error(path: str, error: Exception) -> ValueError:
    return ValueError(f"load_quantized: {path} is not a readable safetensors file (truncated or corrupt?): {error}")


def _split_metadata(path: str, metadata: dict[str, str]) -> tuple[dict[str, str], dict | None]:
    """(caller's metadata, parsed difforge description or None for a file written by something else)."""
    metadata = dict(metadata)
    raw = metadata.pop(METADATA_KEY, None)
    if raw is None:
        return metadata, None
    try:
        description = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"load_quantized: {path}: metadata {METADATA_KEY!r} is not valid JSON: {error}") from error
    if not isinstance(description, dict) or not isinstance(description.get("entries"), dict):
        raise ValueError(f"load_quantized: {path}: metadata {METADATA_KEY!r} has no 'entries' mapping")
    if description.get("version") != VERSION:
        raise ValueError(f"load_quantized: {path}: unsupported format version {description.get('version')!r}")
    for name, entry in description["entries"].items():
        if not isinstance(entry, dict) or entry.get("format") not in _PARTS:
            raise ValueError(f"load_quantized: {path}: entry {name!r}: bad description {entry!r}")
    return metadata, description


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The caller's metadata stored by :func:`save_quantized` (without difforge's format description)."""
    path = os.fspath(path)
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise _open_error(path, error) from error
    return _split_metadata(path, metadata)[0]


def _build(path: str, name: str, entry: dict, parts: dict[str, Tensor]) -> QuantizedTensor | Tensor:
    """The value of one entry from its stored tensors; ValueError naming the entry if they disagree."""

    def fail(problem: str) -> ValueError:
        return ValueError(f"load_quantized: {path}: entry {name!r}: {problem}")

    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise fail(f"bad shape {shape!r}")
    if entry["format"] == "tensor":
        value = parts[name]
        if _dtype_name(value.dtype) != entry.get("dtype"):
            raise fail(f"stored dtype {value.dtype} differs from the recorded {entry.get('dtype')!r}")
    else:
        dtype = _DTYPE_NAMES.get(entry.get("dtype"))
        if dtype is None:
            raise fail(f"bad dtype {entry.get('dtype')!r}")
        try:
            if entry["format"] == "hif8":
                value = HiF8Tensor(parts[f"{name}.codes"], parts[f"{name}.scale"], dtype)
            else:
                value = NVFP4Tensor(
                    parts[f"{name}.block_scales"],
                    parts[f"{name}.packed"],
                    parts.get(f"{name}.per_tensor_scale"),
                    dtype,
                    bool(entry.get("block_2d", False)),
                )
        except ValueError as error:
            raise fail(str(error)) from error
    if list(value.shape) != shape:
        raise fail(f"stored tensors have shape {list(value.shape)}, the metadata says {shape}")
    return value


def load_quantized(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, QuantizedTensor | Tensor]:
    """Reads a file written by :func:`save_quantized`: names -> :class:`HiF8Tensor`, :class:`NVFP4Tensor` or
    Tensor, in save order, on ``device``. A safetensors file without difforge's description loads as plain
    tensors.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated or not safetensors, or its description does not match the stored
            tensors (a missing or unexpected tensor, a shape, dtype or scale that disagrees).
    """
    path = os.fspath(path)
    try:
        with safe_open(path, "pt", device=str(torch.device(device))) as f:
            metadata = f.metadata() or {}
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise _open_error(path, error) from error
    _, description = _split_metadata(path, metadata)
    if description is None:
        return stored

    entries = description["entries"]
    expected = set()
    for name, entry in entries.items():
        required, optional = _PARTS[entry["format"]]
        keys = [f"{name}.{suffix}" for suffix in required] if required else [name]
        missing = [key for key in keys if key not in stored]
        if missing:
            raise ValueError(f"load_quantized: {path}: entry {name!r} is missing tensors {missing}")
        expected.update(keys, (f"{name}.{suffix}" for suffix in optional if f"{name}.{suffix}" in stored))
    unexpected = sorted(set(stored) - expected)
    if unexpected:
        raise ValueError(f"load_quantized: {path}: tensors {unexpected} belong to no entry of the description")
    return {name: _build(path, name, entry, stored) for name, entry in entries.items()}
