"""Timers: warm-up, then a repeat count scaled so each implementation takes about ``budget_s``.

CPU calls are timed one by one with ``time.perf_counter``. CUDA calls are timed with a pair of
CUDA events each, after writing a buffer larger than L2 so every repeat reads its inputs from HBM
(as in a real model step, where the previous layer evicted them), and one synchronize at the end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_CALLS = 3  # the first call compiles (torch.compile) or autotunes; the rest settle caches and pools
MIN_REPEATS = 5
MAX_REPEATS = 2000
FLUSH_FLOOR_BYTES = 256 << 20


@dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def quartiles_s(self) -> tuple[float, float]:
        if len(self.samples_s) < 2:
            return self.samples_s[0], self.samples_s[0]
        q1, _, q3 = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr_pct(self) -> float:
        """Interquartile range as a percentage of the median: the spread shown in tables."""
        q1, q3 = self.quartiles_s
        return 100.0 * (q3 - q1) / self.median_s


def _repeats_for(one_call_s: float, budget_s: float) -> int:
    return max(MIN_REPEATS, min(MAX_REPEATS, int(budget_s / max(one_call_s, 1e-9))))


def time_cpu(fn: Callable[[], object], budget_s: float) -> Timing:
    warmup = []
    for _ in range(WARMUP_CALLS):
        start = time.perf_counter()
        fn()
        warmup.append(time.perf_counter() - start)
    samples = []
    for _ in range(_repeats_for(min(warmup[1:]), budget_s)):  # the first call may include compilation
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))


class CudaTimer:
    """Times CUDA work with events; owns the L2-flush buffer (allocated once per run)."""

    def __init__(self, device: int | None = None) -> None:
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 0) or 0
        self.flush_bytes = max(2 * l2_bytes, FLUSH_FLOOR_BYTES)
        self._flush_buffer = torch.empty(self.flush_bytes // 4, dtype=torch.int32, device="cuda")

    def flush_l2(self) -> None:
        self._flush_buffer.zero_()

    def _timed_calls(self, fn: Callable[[], object], repeats: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            self.flush_l2()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]

    def time(self, fn: Callable[[], object], budget_s: float) -> Timing:
        for _ in range(WARMUP_CALLS):
            fn()
        torch.cuda.synchronize()
        estimate = statistics.median(self._timed_calls(fn, 3))
        return Timing(tuple(self._timed_calls(fn, _repeats_for(estimate, budget_s))))
