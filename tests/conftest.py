"""Shared pytest configuration for the whole difforge suite.

* Hypothesis profiles: ``ci`` (bounded, derandomized; picked when ``CI`` is set), ``dev`` (the default) and
  ``thorough``. ``HYPOTHESIS_PROFILE=<name>`` overrides the choice.
* Tests marked ``cuda`` are skipped when ``torch.cuda.is_available()`` is False; (device="cuda",
  dtype=torch.float64) parametrizations are deselected (float64 is a CPU-only path).
* ``device`` fixture: parametrizes a test over ``"cpu"`` and, when a GPU is present, ``"cuda"`` (that
  parameter carries the ``cuda`` marker, so ``pytest -m cuda`` selects exactly the GPU runs).
* The tests directory is put on ``sys.path`` so that shared helpers import the same way from every
  family folder: ``from opcheck import run_opcheck`` (see tests/opcheck.py).

The markers themselves (``cuda``, ``distributed``, ``slow``) are declared in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# ---- Hypothesis profiles -----------------------------------------------------------------------------
# Kernel calls on first use (thread pools, lazy library loading) are slow and shapes vary a lot between
# examples, so no deadline anywhere; the size of each example is bounded by the strategies instead.
_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile("dev", max_examples=50, deadline=None, print_blob=True, suppress_health_check=_SUPPRESSED)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True, suppress_health_check=_SUPPRESSED)


def _hypothesis_profile() -> str:
    explicit = os.environ.get("HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    if os.environ.get("CI"):
        return "ci"
    return "dev"


settings.load_profile(_hypothesis_profile())


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    return [f"torch {torch.__version__}; CUDA: {cuda}; hypothesis profile: {_hypothesis_profile()}"]


# ---- CUDA gating ---------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()


def _float64_on_cuda(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("device") == "cuda" and params.get("dtype") == torch.float64


def pytest_collection_modifyitems(config, items):
    # float64 is a CPU-only (gradcheck) path in every family: such combinations are not tests at all.
    dropped = [item for item in items if _float64_on_cuda(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _float64_on_cuda(item)]
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


DEVICES = [pytest.param("cpu", id="cpu")] + (
    [pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)] if HAS_CUDA else []
)


@pytest.fixture(params=DEVICES, scope="session")
def device(request) -> str:
    """"cpu", plus "cuda" (marked ``cuda``) when a GPU is available. Session-scoped so that Hypothesis
    tests may use it."""
    return request.param
