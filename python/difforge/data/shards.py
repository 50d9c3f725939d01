"""User video latents as safetensors shards: format "difforge video latents v1", writer, dataset and CLI.

Format "difforge video latents v1":

* a data set is a folder of ``*.safetensors`` files (shards), read in sorted filename order; other files (and
  the writer's ``.<name>.*.tmp`` temporaries) are ignored. The writer names them ``shard-00000.safetensors``,
  ``shard-00001.safetensors``, ...;
* a shard holding ``n >= 1`` samples has exactly the tensors ``latents.{k}`` and ``context.{k}`` for
  ``k = 0 .. n-1`` (decimal, no padding): ``latents.{k}`` is ``[C, T, H, W]`` (channels, latent frames, height,
  width) and ``context.{k}`` is ``[Lc, Dc]`` (condition tokens, embedding width), each float32, float16 or
  bfloat16, no dimension zero;
* its safetensors metadata holds ``{"format": "difforge-video-latents", "version": "1", "count": str(n)}``
  (other metadata keys are allowed and ignored);
* C and Dc are the same for every sample of the data set; T, H, W and Lc may vary per sample;
* sample indices are global: shard 0's samples first, then shard 1's, and so on.

Example: ``python -m difforge.data.shards --synthetic 1000 --out latents/ --samples-per-shard 256`` writes 1000
samples of :class:`~difforge.data.SyntheticVideoDataset` as 4 shards; ``ShardDataset("latents/")`` reads them.
"""

from __future__ import annotations

import argparse
import itertools
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset

from difforge._durable import fsync_dir, save_safetensors_atomic
from difforge.data.buckets import _patch_tokens

FORMAT = "difforge-video-latents"
VERSION = "1"
_NO_SAMPLE = object()
_STORED_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _shard_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.safetensors") if path.is_file())


def _check_sample(index: int, sample: object, dtype: torch.dtype | None, dims: list[int] | None) -> dict[str, Tensor]:
    """The sample's (latents, context) ready to store; ``dims`` is [C, Dc] of the first sample (None for it)."""

    def fail(problem: str) -> ValueError:
        return ValueError(f"write_shards: sample {index}: {problem}")

    if not isinstance(sample, Mapping):
        raise fail(f"must be a mapping with 'latents' and 'context', got {type(sample).__name__}")
    stored = {}
    for name, ndim, layout in (("latents", 4, "[C, T, H, W]"), ("context", 2, "[Lc, Dc]")):
        tensor = sample.get(name)
        if not isinstance(tensor, Tensor):
            raise fail(f"{name!r} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != ndim or not tensor.is_floating_point() or 0 in tensor.shape:
            raise fail(f"{name!r} must be a non-empty {ndim}-D float tensor {layout}, got {tensor.dtype} "
                       f"{tuple(tensor.shape)}")
        target = dtype or tensor.dtype
        if target not in _STORED_DTYPES:
            raise fail(f"{name!r} has dtype {tensor.dtype}; the format stores float32, float16 or bfloat16 "
                       "(pass dtype= to convert)")
        # A private contiguous copy: safetensors refuses tensors that share storage (views of one buffer).
        stored[name] = tensor.detach().to("cpu", target, copy=True, memory_format=torch.contiguous_format)
    got = [stored["latents"].shape[0], stored["context"].shape[1]]
    if dims is not None and got != dims:
        raise fail(f"has C = {got[0]}, Dc = {got[1]}, but earlier samples have C = {dims[0]}, Dc = {dims[1]}")
    return stored


def write_shards(
    folder: str | os.PathLike,
    samples: Iterable[Mapping[str, Tensor]],
    *,
    samples_per_shard: int = 256,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes ``samples`` (mappings with ``latents`` ``[C, T, H, W]`` and ``context`` ``[Lc, Dc]`` float
    tensors; other keys are ignored) to ``folder`` as shards of the "difforge video latents v1" format.

    ``samples`` is consumed once, one shard at a time, so it may be a generator larger than memory. Each shard
    is validated completely before it is written and written atomically (temporary file, fsync, rename, fsync
    of the folder). ``dtype`` (float32, float16 or bfloat16) converts every tensor; by default each keeps its
    own dtype. Returns the written paths.

    Raises:
        FileExistsError: ``folder`` already holds ``*.safetensors`` files and ``overwrite`` is False (with
            ``overwrite=True`` they are removed before the first new shard is written).
        ValueError: no samples, ``samples_per_shard < 1``, a bad ``dtype``, or a bad sample (named by its index;
            shards before it stay written).
    """
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"write_shards: samples_per_shard must be an int >= 1, got {samples_per_shard!r}")
    if dtype is not None and dtype not in _STORED_DTYPES:
        raise ValueError(f"write_shards: dtype must be float32, float16, bfloat16 or None, got {dtype}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"write_shards: {folder} is not a folder")
    old = _shard_files(folder) if folder.exists() else []
    if old and not overwrite:
        raise FileExistsError(f"write_shards: {folder} already holds {len(old)} shards (pass overwrite=True)")
    iterator = iter(samples)
    first = next(iterator, _NO_SAMPLE)
    if first is _NO_SAMPLE:
        raise ValueError("write_shards: no samples to write")
    folder.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()
    if old:
        fsync_dir(folder)

    written: list[Path] = []
    dims: list[int] | None = None
    pending: list[dict[str, Tensor]] = []
    for index, sample in enumerate(itertools.chain([first], iterator)):
        pending.append(_check_sample(index, sample, dtype, dims))
        dims = [pending[-1]["latents"].shape[0], pending[-1]["context"].shape[1]]
        if len(pending) == samples_per_shard:
            written.append(_write_shard(folder / f"shard-{len(written):05d}.safetensors", pending))
            pending = []
    if pending:
        written.append(_write_shard(folder / f"shard-{len(written):05d}.safetensors", pending))
    return written


def _write_shard(path: Path, samples: list[dict[str, Tensor]]) -> Path:
    tensors = {f"{name}.{k}": sample[name] for k, sample in enumerate(samples) for name in ("latents", "context")}
    save_safetensors_atomic(tensors, path, {"format": FORMAT, "version": VERSION, "count": str(len(samples))})
    return path


class ShardDataset(Dataset):
    """Reads a "difforge video latents v1" folder (see the module docstring); ``dataset[i]`` is
    ``{"latents": [C, T, H, W], "context": [Lc, Dc]}`` in ``dtype``, loaded from disk on each access.

    Construction reads only the shard headers and checks everything that can be checked without the data:
    a ValueError names the shard file (and key) for a missing folder, no shards, missing or wrong format
    metadata, a count that disagrees with the tensors, a missing or extra tensor, wrong ranks, non-float
    dtypes, C or Dc differing between samples, a zero-size dimension, or a truncated or corrupt file.
    """

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"ShardDataset: dtype must be a floating torch.dtype, got {dtype!r}")
        self.folder = Path(folder)
        self.dtype = dtype
        if not self.folder.is_dir():
            raise ValueError(f"ShardDataset: folder {self.folder} does not exist or is not a folder")
        self.files = _shard_files(self.folder)
        if not self.files:
            raise ValueError(f"ShardDataset: no *.safetensors shards in {self.folder}")
        self._samples: list[tuple[int, int]] = []  # global index -> (shard, local index)
        self._shapes: list[tuple[int, int, int]] = []
        self._dims: tuple[int, int] | None = None  # (C, Dc)
        for shard, path in enumerate(self.files):
            self._scan(shard, path)

    def _scan(self, shard: int, path: Path) -> None:
        def fail(problem: str) -> ValueError:
            return ValueError(f"ShardDataset: {path}: {problem}")

        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                header = {key: handle.get_slice(key) for key in handle.keys()}
                header = {key: (s.get_dtype(), list(s.get_shape())) for key, s in header.items()}
        except (SafetensorError, OSError) as error:
            raise fail(f"not a readable safetensors file (truncated or corrupt?): {error}") from error
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise fail(
                f"metadata format/version is {metadata.get('format')!r}/{metadata.get('version')!r}, expected "
                f"{FORMAT!r}/{VERSION!r}"
            )
        count = metadata.get("count", "")
        if not count.isdecimal() or int(count) < 1:
            raise fail(f"metadata count must be a positive integer, got {count!r}")
        count = int(count)
        expected = [f"{name}.{k}" for k in range(count) for name in ("latents", "context")]
        missing = [key for key in expected if key not in header]
        if missing:
            raise fail(f"metadata count is {count} but tensor {missing[0]!r} is missing")
        extra = sorted(set(header) - set(expected))
        if extra:
            raise fail(f"metadata count is {count} but the shard also holds {extra[:3]}")
        for k in range(count):
            for name, ndim, layout in (("latents", 4, "[C, T, H, W]"), ("context", 2, "[Lc, Dc]")):
                key = f"{name}.{k}"
                stored, shape = header[key]
                if stored not in _STORED_DTYPES.values():
                    raise fail(f"{key!r} has dtype {stored}; expected F32, F16 or BF16")
                if len(shape) != ndim or 0 in shape:
                    raise fail(f"{key!r} has shape {shape}; expected a non-empty {ndim}-D {layout}")
            dims = (header[f"latents.{k}"][1][0], header[f"context.{k}"][1][1])
            if self._dims is None:
                self._dims = dims
            elif dims != self._dims:
                raise fail(
                    f"sample latents.{k}/context.{k} has C = {dims[0]}, Dc = {dims[1]}, but earlier samples have "
                    f"C = {self._dims[0]}, Dc = {self._dims[1]}"
                )
            self._samples.append((shard, k))
            self._shapes.append(tuple(header[f"latents.{k}"][1][1:]))

    def __len__(self) -> int:
        return len(self._samples)

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self._samples):
            raise IndexError(f"index {index} out of range for a dataset of {len(self._samples)} samples")
        return index

    @property
    def channels(self) -> int:
        """Latent channels C (the same for every sample)."""
        return self._dims[0]

    @property
    def context_dim(self) -> int:
        """Context embedding width Dc (the same for every sample)."""
        return self._dims[1]

    def shape_of(self, index: int) -> tuple[int, int, int]:
        """Latent (T, H, W) of sample ``index``, from the headers read at construction."""
        return self._shapes[self._check_index(index)]

    def tokens_of(self, index: int, patch: Sequence[int] = (1, 2, 2)) -> int:
        """Tokens of sample ``index`` after patchify: ``T//pt * H//ph * W//pw``; ValueError unless divisible."""
        return _patch_tokens(self.shape_of(index), patch)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        shard, k = self._samples[self._check_index(index)]
        path = self.files[shard]
        try:
            with safe_open(path, framework="pt") as handle:
                latents, context = handle.get_tensor(f"latents.{k}"), handle.get_tensor(f"context.{k}")
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"ShardDataset: {path}: cannot read sample {index} (file changed or corrupt since it was scanned?): "
                f"{error}"
            ) from error
        return {"latents": latents.to(self.dtype), "context": context.to(self.dtype)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m difforge.data.shards --synthetic N --out DIR``: writes N synthetic samples as shards."""
    from difforge.data.synthetic import SyntheticVideoDataset

    parser = argparse.ArgumentParser(
        prog="python -m difforge.data.shards",
        description="Write synthetic video latents as 'difforge video latents v1' safetensors shards.",
    )
    parser.add_argument("--synthetic", type=int, required=True, metavar="N", help="number of synthetic samples")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--samples-per-shard", type=int, default=256, metavar="K")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="SyntheticVideoDataset seed")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in DIR")
    args = parser.parse_args(argv)
    try:
        dataset = SyntheticVideoDataset(args.synthetic, seed=args.seed)
        paths = write_shards(
            args.out,
            (dataset[i] for i in range(len(dataset))),
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"wrote {len(dataset)} samples in {len(paths)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
