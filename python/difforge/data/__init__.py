"""Training data for difforge's models: synthetic video latents, user latents in safetensors shards, AdaptiveLoad
bucket samplers, and small corpora shipped inside installed packages (scikit-learn's digits as token sequences).

    from difforge.data import SyntheticVideoDataset, AdaptiveLoadSampler
    dataset = SyntheticVideoDataset(10_000)
    sampler = AdaptiveLoadSampler([dataset.tokens_of(i) for i in range(len(dataset))],
                                  [dataset.shape_of(i) for i in range(len(dataset))], m_mem=8192, p=1.4)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)

See :mod:`difforge.data.shards` for the on-disk format of user data and :mod:`difforge.data.digits` for the
digits corpus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difforge.data.buckets import (
        AdaptiveLoadSampler,
        EqualTokenSampler,
        bucket_batch_size,
        calibrate_p,
        imbalance_rate,
        plan_imbalance,
        step_time_model,
    )
    from difforge.data.digits import DigitsUnavailableError, digits_path, load_digits, split_digits
    from difforge.data.shards import ShardDataset, write_shards
    from difforge.data.synthetic import SyntheticVideoDataset, to_rgb

# Submodules load on first use: `python -m difforge.data.shards` would otherwise find its own module already
# imported by this package and run it twice (runpy's RuntimeWarning).
_EXPORTS = {
    "SyntheticVideoDataset": "synthetic",
    "to_rgb": "synthetic",
    "ShardDataset": "shards",
    "write_shards": "shards",
    "AdaptiveLoadSampler": "buckets",
    "EqualTokenSampler": "buckets",
    "bucket_batch_size": "buckets",
    "calibrate_p": "buckets",
    "imbalance_rate": "buckets",
    "plan_imbalance": "buckets",
    "step_time_model": "buckets",
    "DigitsUnavailableError": "digits",
    "digits_path": "digits",
    "load_digits": "digits",
    "split_digits": "digits",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
