"""`difforge-bench` end to end on CPU: `--list`, and a `--quick` norm run writing JSON, CSV and Markdown."""

from __future__ import annotations

import csv
import json

from bench_testlib import run_bench as _bench

OPS_AND_MODES = {
    ("adaln_modulate", "fwd"),
    ("adaln_modulate", "fwd+bwd"),
    ("gated_adaln_modulate", "fwd"),
    ("gated_adaln_modulate", "fwd+bwd"),
}
REPRODUCE = "difforge-bench norm --device cpu --shapes smoke"


def test_list_shows_the_norm_family_and_its_shapes():
    out = _bench("--list", "--device", "cpu", timeout=60).stdout
    assert "norm:" in out
    for shape in ("wan14b_720p", "d5120", "smoke"):
        assert shape in out


def test_quick_cpu_norm_run_writes_every_result_file(tmp_path):
    out = _bench("norm", "--device", "cpu", "--quick", "--out", str(tmp_path), timeout=120).stdout
    assert f"reproduce: {REPRODUCE}" in out

    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["metadata"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["date"]
    assert meta["peak_bandwidth_GBps"] > 0 and "measured" in meta["peak_source"]
    assert "--quick" in meta["command"]
    records = data["records"]
    assert {(r["op"], r["mode"]) for r in records} == OPS_AND_MODES
    for r in records:
        if r["impl"] in ("difforge", "eager"):
            assert r["status"] == "ok", r
            assert r["median_s"] > 0 and r["GBps"] > 0 and r["pct_peak"] > 0 and r["repeats"] >= 5
        if r["impl"] == "eager":
            assert r["speedup"] > 0
        if r["impl"] == "compile" and r["status"] != "ok":  # no C compiler: skipped with a reason
            assert r["note"]

    with (tmp_path / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {(r["op"], r["mode"]) for r in rows} == OPS_AND_MODES
    assert all(float(r["median_s"]) > 0 for r in rows if r["impl"] == "difforge")

    markdown = (tmp_path / "results.md").read_text()
    assert "gated_adaln_modulate" in markdown and "| adaln_modulate |" in markdown
    assert REPRODUCE in markdown
