"""Result files: JSON (every record and sample + run metadata), long-format CSV, Markdown table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from difforge_bench.report import summary_table
from difforge_bench.runner import Record

JSON_NAME, CSV_NAME, MARKDOWN_NAME = "results.json", "results.csv", "results.md"
# Run metadata repeated on every CSV row, so CSVs from several machines concatenate into one table.
CSV_METADATA = ("device", "device_name", "torch", "cuda", "git_revision", "date")
CSV_MEASURES = (
    "impl status note median_s q1_s q3_s min_s max_s iqr_pct repeats "
    "bytes_moved flops GBps TFLOPs pct_peak speedup reproduce"
).split()


def write_json(folder: Path, metadata: dict, records: list[Record]) -> Path:
    path = folder / JSON_NAME
    path.write_text(json.dumps({"metadata": metadata, "records": [r.to_dict() for r in records]}, indent=1) + "\n")
    return path


def write_csv(folder: Path, metadata: dict, records: list[Record]) -> Path:
    config_keys = list(dict.fromkeys(k for r in records for k in r.config))
    path = folder / CSV_NAME
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_METADATA, "family", "op", "mode", *config_keys, "shape", "dims", *CSV_MEASURES])
        for r in records:
            row = r.to_dict()
            dims = " ".join(f"{k}={v}" for k, v in r.dims.items())
            writer.writerow(
                [metadata.get(k) for k in CSV_METADATA]
                + [r.family, r.op, r.mode, *(r.config.get(k, "") for k in config_keys), r.shape, dims]
                + [row[k] for k in CSV_MEASURES]
            )
    return path


def write_markdown(folder: Path, metadata: dict, records: list[Record]) -> Path:
    header, rows = summary_table(records)
    lines = [f"# difforge-bench: {metadata['device_name']}", ""]
    lines += [f"- {key}: `{value}`" for key, value in metadata.items()]
    legend = (
        "Baseline columns: median time (speedup = baseline / difforge). Throughput and % of peak "
        "use the case's byte or FLOP model; the peak is the `peak_*` entry above."
    )
    lines += ["", legend, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    skipped: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r.note:
            key = (r.impl, r.status, r.note)
            skipped[key] = skipped.get(key, 0) + 1
    if skipped:
        lines += ["", "## Not measured", ""]
        lines += [f"- {impl}: {status}, {note} ({n} cases)" for (impl, status, note), n in skipped.items()]
    commands = list(dict.fromkeys(r.reproduce for r in records))
    lines += ["", "## Reproduce", "", *(f"    {c}" for c in commands), ""]
    path = folder / MARKDOWN_NAME
    path.write_text("\n".join(lines))
    return path
