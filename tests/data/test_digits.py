"""The digits corpus: read against an independent csv-module parse of the shipped file, the documented first row,
the seeded 90/10 split, and the error without scikit-learn."""

from __future__ import annotations

import csv
import gzip
import importlib.util

import pytest
import torch

from difforge.cli import main
from difforge.data import DigitsUnavailableError, digits_path, load_digits, split_digits

needs_digits = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@needs_digits
def test_matches_an_independent_parse_of_the_file(digits):
    images, labels = digits
    with gzip.open(digits_path(), "rt") as f:
        rows = [[int(v) for v in row] for row in csv.reader(f)]
    table = torch.tensor(rows)
    assert images.dtype == labels.dtype == torch.int64
    assert images.shape == (1797, 64) and labels.shape == (1797,)
    assert torch.equal(images, table[:, :64]) and torch.equal(labels, table[:, 64])


@needs_digits
def test_values_and_first_image(digits):
    images, labels = digits
    assert int(images.min()) == 0 and int(images.max()) == 16
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The top row of the first image (a zero), as in scikit-learn's documentation of the data set.
    assert images[0, :8].tolist() == [0, 0, 5, 13, 9, 1, 0, 0] and int(labels[0]) == 0


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    # Lexicographic row order, to compare multisets of images.
    for column in reversed(range(x.shape[1])):
        x = x[x[:, column].argsort(stable=True)]
    return x


@needs_digits
def test_split_is_seeded_disjoint_and_complete(digits):
    images, _ = digits
    train, held_out = split_digits(seed=3)
    assert train.shape == (1617, 64) and held_out.shape == (180, 64)
    again_train, again_held_out = split_digits(seed=3)
    assert torch.equal(train, again_train) and torch.equal(held_out, again_held_out)
    assert not torch.equal(held_out, split_digits(seed=4)[1])
    assert torch.equal(_sorted_rows(torch.cat([train, held_out])), _sorted_rows(images))
    assert split_digits(held_out_fraction=0.25)[1].shape == (449, 64)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_digits(held_out_fraction=1.0)


def test_missing_scikit_learn_says_what_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(DigitsUnavailableError, match="pip install scikit-learn") as error:
        load_digits()
    assert isinstance(error.value, ModuleNotFoundError)
    assert main(["discrete", "train", "--steps", "1", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "difforge discrete train: error:" in capsys.readouterr().err
