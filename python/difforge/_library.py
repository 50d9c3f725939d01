"""Locates and loads the compiled op library (libdifforge_ops.so), which registers torch.ops.difforge.*."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import torch

import difforge

LIBRARY_NAME = "libdifforge_ops.so"
BUILD_INFO_NAME = "build_info.json"


def _installed_file(name: str) -> Path | None:
    # An editable install keeps the Python sources in the checkout but the built files in
    # site-packages; the distribution's RECORD knows where they went either way.
    for folder in difforge.__path__:
        candidate = Path(folder) / name
        if candidate.exists():
            return candidate
    try:
        files = importlib.metadata.files("difforge") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == name:
            path = Path(f.locate())
            if path.exists():
                return path
    return None


def load() -> Path:
    path = _installed_file(LIBRARY_NAME)
    if path is None:
        raise ImportError(
            f"difforge: {LIBRARY_NAME} not found; build the package first "
            "(`pip install --no-build-isolation -e .` or `make demo`)"
        )
    torch.ops.load_library(str(path))
    return path


def build_info() -> dict:
    path = _installed_file(BUILD_INFO_NAME)
    return json.loads(path.read_text()) if path is not None else {}
