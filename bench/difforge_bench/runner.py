"""Run one case: time our op and every baseline on the same inputs, one Record per implementation."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from difforge_bench.device import Peak
from difforge_bench.registry import Case, Unavailable
from difforge_bench.timing import Timing

OURS = "difforge"
OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"

Timer = Callable[[Callable[[], object], float], Timing]


@dataclass
class Record:
    """One (family, op, mode, config, shape, impl) measurement: a row of the long-format CSV."""

    family: str
    op: str
    mode: str
    config: dict[str, str]
    shape: str
    dims: dict[str, int]
    impl: str
    status: str
    note: str = ""
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    iqr_pct: float | None = None
    repeats: int = 0
    bytes_moved: int | None = None
    flops: int | None = None
    GBps: float | None = None
    TFLOPs: float | None = None
    pct_peak: float | None = None
    speedup: float | None = None  # baseline time / our time; > 1 means we are faster
    reproduce: str = ""
    samples_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _measured(record: Record, timing: Timing, case: Case, peak: Peak) -> None:
    median = timing.median_s
    record.median_s = median
    record.q1_s, record.q3_s = timing.quartiles_s
    record.min_s, record.max_s = min(timing.samples_s), max(timing.samples_s)
    record.iqr_pct = timing.iqr_pct
    record.repeats = len(timing.samples_s)
    record.samples_s = list(timing.samples_s)
    if case.bytes_moved:
        record.GBps = case.bytes_moved / median / 1e9
        if peak.bandwidth_Bps:
            record.pct_peak = 100.0 * case.bytes_moved / median / peak.bandwidth_Bps
    if case.flops:
        record.TFLOPs = case.flops / median / 1e12
        if peak.flops:
            record.pct_peak = 100.0 * case.flops / median / peak.flops


def run_case(family: str, case: Case, device: str, timer: Timer, budget_s: float, peak: Peak, reproduce: str):
    base = {
        "family": family,
        "op": case.op,
        "mode": case.mode,
        "config": dict(case.config),
        "shape": case.shape.name,
        "dims": dict(case.shape.dims),
        "bytes_moved": case.bytes_moved,
        "flops": case.flops,
        "reproduce": reproduce,
    }
    inputs = case.make_inputs(device)
    records = []
    for impl_name, impl in {OURS: case.ours, **case.baselines}.items():
        record = Record(impl=impl_name, status=OK, **base)
        if isinstance(impl, Unavailable):
            record.status, record.note = UNAVAILABLE, impl.reason
        else:
            try:
                _measured(record, timer(impl(inputs), budget_s), case, peak)
            except ImportError as error:  # e.g. difforge not built yet: the baselines still run
                record.status, record.note = UNAVAILABLE, _one_line(error)
            except Exception as error:  # a baseline that cannot handle this case (compile, OOM) is skipped
                record.status, record.note = FAILED, _one_line(error)
        records.append(record)
    del inputs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    ours = records[0]
    if ours.median_s:
        for record in records[1:]:
            if record.median_s:
                record.speedup = record.median_s / ours.median_s
    return records
