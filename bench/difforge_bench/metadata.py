"""What a result needs to be re-run and compared: device, versions, git revision, date, command line."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch

from difforge_bench.device import Peak, device_name


def _difforge_version() -> str | None:
    try:
        return importlib.metadata.version("difforge")
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    # The checkout this bench runs from; absent when installed from a wheel.
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def collect(device: str, peak: Peak, argv: list[str]) -> dict:
    return {
        "device": device,
        "device_name": device_name(device),
        "peak_bandwidth_GBps": round(peak.bandwidth_Bps / 1e9, 1) if peak.bandwidth_Bps else None,
        "peak_tflops_bf16": round(peak.flops / 1e12, 1) if peak.flops else None,
        "peak_source": peak.source,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "difforge": _difforge_version(),
        "git_revision": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["difforge-bench", *argv]),
        "python": platform.python_version(),
        "host_cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        # Huge-page backing of torch's CPU allocations: changes CPU timings of large outputs.
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
