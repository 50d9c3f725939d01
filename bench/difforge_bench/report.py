"""Console output: one block per case while the run goes, and a one-row-per-case summary at the end.

The summary rows are shared with the Markdown writer, so the terminal and the file show the same table.
"""

from __future__ import annotations

from collections.abc import Sequence

from difforge_bench.registry import Case
from difforge_bench.runner import OK, OURS, Record


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _throughput(record: Record) -> str:
    if record.TFLOPs is not None:
        if record.TFLOPs < 1.0:  # CPUs: GFLOP/s keeps the digits that ",.1f" TFLOP/s would round to 0.0
            return _fmt(record.TFLOPs * 1e3, ",.1f", " GFLOP/s")
        return _fmt(record.TFLOPs, ",.1f", " TFLOP/s")
    return _fmt(record.GBps, ",.1f", " GB/s")


def _align(rows: Sequence[Sequence[str]], right_from: int) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i >= right_from else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def print_case(case: Case, records: list[Record]) -> None:
    moved = f"{case.bytes_moved / 1e6:,.1f} MB moved" if case.bytes_moved else ""
    moved += f"  {case.flops / 1e9:,.1f} GFLOP" if case.flops else ""
    print(f"\n{case.label()}  [{case.shape.describe()}]  {moved}")
    table = [["impl", "median", "IQR", "throughput", "% peak", "speedup"]]
    skipped = []
    for r in records:
        if r.status != OK:
            skipped.append(f"  {r.impl}: {r.status} ({r.note})")
            continue
        speedup = "-" if r.impl == OURS else _fmt(r.speedup, ".2f", "x")
        table.append(
            [
                r.impl,
                fmt_time(r.median_s),
                _fmt(r.iqr_pct, ".1f", "%"),
                _throughput(r),
                _fmt(r.pct_peak, ".1f", "%"),
                speedup,
            ]
        )
    if len(table) > 1:
        for line in _align(table, right_from=1):
            print("  " + line)
    for line in skipped:
        print(line)
    print(f"  reproduce: {records[0].reproduce}")


def summary_table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """One row per case: our time, throughput and % of peak, then each baseline's time and speedup."""
    baselines = list(dict.fromkeys(r.impl for r in records if r.impl != OURS))
    cases: dict[tuple, dict[str, Record]] = {}
    for r in records:
        key = (r.family, r.op, r.mode, *r.config.values(), r.shape)
        cases.setdefault(key, {})[r.impl] = r
    header = ["family", "op", "mode", "config", "shape", OURS, "throughput", "% peak", *baselines]
    rows = []
    for (family, op, mode, *config, shape), impls in cases.items():
        ours = impls.get(OURS)
        row = [family, op, mode, " ".join(config), shape]
        if ours is not None and ours.status == OK:
            row += [fmt_time(ours.median_s), _throughput(ours), _fmt(ours.pct_peak, ".1f", "%")]
        else:
            row += [ours.status if ours else "-", "-", "-"]
        for name in baselines:
            r = impls.get(name)
            if r is None or r.status != OK:
                row.append(r.status if r else "-")
            elif r.speedup is None:
                row.append(fmt_time(r.median_s))
            else:
                row.append(f"{fmt_time(r.median_s)} ({r.speedup:.2f}x)")
        rows.append(row)
    return header, rows


def print_summary(records: list[Record]) -> None:
    header, rows = summary_table(records)
    if not rows:
        return
    print("\nsummary (baseline columns: time and speedup = baseline / difforge)")
    for line in _align([header, *rows], right_from=5):
        print("  " + line)
