"""scikit-learn's handwritten digits as token sequences: 1797 images of 8x8 pixels with 17 grey levels (0..16),
flattened row by row into L = 64 tokens over a vocabulary of N = 17.

The corpus ships inside the scikit-learn wheel (``sklearn/datasets/data/digits.csv.gz``: one image per line, 64
pixel values then the label), so nothing is downloaded. The file is read directly with gzip and NumPy, without
importing scikit-learn (which would pull in SciPy and take seconds): only the installed package's folder is looked
up.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DIGITS_SIDE = 8
DIGITS_LENGTH = DIGITS_SIDE * DIGITS_SIDE
DIGITS_LEVELS = 17
DIGITS_COUNT = 1797
_RELATIVE_PATH = Path("datasets", "data", "digits.csv.gz")


class DigitsUnavailableError(ModuleNotFoundError):
    """scikit-learn (which ships the digits file) is not installed, or its copy lacks the file."""


def digits_path() -> Path:
    """Path of ``digits.csv.gz`` inside the installed scikit-learn.

    Raises:
        DigitsUnavailableError: scikit-learn is not installed or its data file is missing.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DigitsUnavailableError(
            "the digits corpus ships with scikit-learn, which is not installed: pip install scikit-learn",
            name="sklearn",
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _RELATIVE_PATH
        if path.is_file():
            return path
    raise DigitsUnavailableError(
        f"scikit-learn at {list(spec.submodule_search_locations)} has no {_RELATIVE_PATH.as_posix()}: "
        "reinstall it with pip install --force-reinstall scikit-learn",
        name="sklearn",
    )


def load_digits() -> tuple[Tensor, Tensor]:
    """All 1797 digits: ``(images, labels)``, images int64 ``[1797, 64]`` with values in ``0..16`` (row-major 8x8
    pixels, 0 = background), labels int64 ``[1797]`` in ``0..9``.

    Raises:
        DigitsUnavailableError: scikit-learn is not installed. ValueError: the file does not hold 1797 rows of
        65 integers in range.
    """
    path = digits_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != (DIGITS_COUNT, DIGITS_LENGTH + 1):
        raise ValueError(f"{path}: expected {DIGITS_COUNT} rows of {DIGITS_LENGTH + 1} values, got {table.shape}")
    images, labels = torch.from_numpy(table[:, :DIGITS_LENGTH]), torch.from_numpy(table[:, DIGITS_LENGTH])
    if images.min() < 0 or images.max() >= DIGITS_LEVELS or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must lie in 0..{DIGITS_LEVELS - 1} and labels in 0..9")
    return images.contiguous(), labels.contiguous()


def split_digits(*, seed: int = 0, held_out_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """The digits split into ``(train, held_out)`` image tensors by a permutation seeded with ``seed``: the same
    split for the same seed on every machine. ``held_out_fraction`` of the images (rounded, at least one) are held
    out."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"split_digits: held_out_fraction must be in (0, 1), got {held_out_fraction}")
    images, _ = load_digits()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(held_out_fraction * len(images)))
    return images[order[held:]], images[order[:held]]
