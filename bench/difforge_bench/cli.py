"""`difforge-bench`: time difforge's ops against the baselines installed here, print tables, write results.

Usage: difforge-bench [family ...] [--device cpu|cuda] [--out DIR] [--quick] [--shapes NAME,...] [--list]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from difforge_bench import metadata, plot, report, writers
from difforge_bench.device import Peak, device_name, peak_for
from difforge_bench.registry import Family, Shape, all_families
from difforge_bench.runner import FAILED, OURS, UNAVAILABLE, Record, run_case
from difforge_bench.timing import CudaTimer, time_cpu

# Seconds of timed repeats per implementation and case (the repeat count is scaled to fit).
BUDGET_S = {("cpu", False): 1.0, ("cpu", True): 0.2, ("cuda", False): 0.5, ("cuda", True): 0.1}


def _parser(family_names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difforge-bench", description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", metavar="family", help=f"default: all ({', '.join(family_names)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write results.json/.csv/.md (+ speedup.png)")
    parser.add_argument("--quick", action="store_true", help="smallest shape set and short timings (smoke run)")
    parser.add_argument("--shapes", metavar="NAME,...", help="run these shapes (any device's); see --list")
    parser.add_argument("--list", action="store_true", help="list families, shapes and cases, then exit")
    return parser


def _reproduce(family: str, device: str, shape: Shape, quick: bool) -> str:
    words = ["difforge-bench", family, "--device", device, "--shapes", shape.name] + (["--quick"] if quick else [])
    return shlex.join(words)


def _print_list(families: list[Family], device: str) -> None:
    print(f"shapes marked * run by default on {device}, q with --quick; any shape runs with --shapes")
    for family in families:
        print(f"\n{family.name}: {family.summary}")
        for shape in family.shapes:
            mark = ("*" if device in shape.devices else " ") + ("q" if shape.quick else " ")
            print(f"  {mark} {shape.name:<20} {shape.describe()}")
            cases = family.cases(device, shape)
            axes = [[c.op for c in cases], [c.mode for c in cases]]
            axes += [[c.config[key] for c in cases] for key in cases[0].config] if cases else []
            product = " x ".join(", ".join(dict.fromkeys(axis)) for axis in axes)
            print(f"        {len(cases)} cases on {device}: {product}")


def _run(families: list[Family], device: str, quick: bool, shape_names: list[str] | None, peak: Peak) -> list[Record]:
    timer = CudaTimer().time if device == "cuda" else time_cpu
    records = []
    for family in families:
        for note in family.notes:
            print(f"{family.name}: {note}")
        for shape in family.select_shapes(device, quick, shape_names):
            reproduce = _reproduce(family.name, device, shape, quick)
            for case in family.cases(device, shape):
                case_records = run_case(family.name, case, device, timer, BUDGET_S[device, quick], peak, reproduce)
                report.print_case(case, case_records)
                records += case_records
    return records


def _write(folder: Path, meta: dict, records: list[Record]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write(folder, meta, records) for write in (writers.write_json, writers.write_csv, writers.write_markdown)]
    png = plot.write_png(folder, f"difforge-bench: {meta['device_name']}", records)
    paths.append(png or "speedup.png skipped (matplotlib not installed or no speedups)")
    print("\nwrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    registered = all_families()
    parser = _parser(list(registered))
    args = parser.parse_args(argv)

    unknown = [f for f in args.families if f not in registered]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; registered: {', '.join(registered)}")
    families = [registered[f] for f in (args.families or registered)]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape_names = [s for s in (args.shapes or "").split(",") if s] or None
    known_shapes = {s.name for f in families for s in f.shapes}
    if shape_names and not set(shape_names) <= known_shapes:
        missing = sorted(set(shape_names) - known_shapes)
        parser.error(f"unknown shape {', '.join(missing)}; known: {', '.join(sorted(known_shapes))}")
    if args.list:
        _print_list(families, device)
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")

    load_at_start = os.getloadavg()[0]
    peak = peak_for(device)
    print(f"difforge-bench on {device}: {device_name(device)}; torch {torch.__version__}")
    print(f"peak: {peak.describe()}")
    if device == "cpu" and load_at_start > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_at_start:.1f} on {os.cpu_count()} cores; other processes share the CPU "
            "and CPU timings will be noisy"
        )
    records = _run(families, device, args.quick, shape_names, peak)
    report.print_summary(records)

    ours = [r for r in records if r.impl == OURS]
    missing_ours = next((r for r in ours if r.status == UNAVAILABLE), None)
    if missing_ours:
        print(f"\nnote: difforge not importable ({missing_ours.note}); baselines only")
    if args.out:
        meta = {**metadata.collect(device, peak, argv), "load_average_at_start": round(load_at_start, 2)}
        _write(args.out, meta, records)
    return 1 if any(r.status == FAILED for r in ours) else 0
