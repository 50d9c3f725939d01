"""The SSP vs Ulysses example runs end to end (``--spawn 2``, gloo) and reports the spec's byte ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


def test_example_spawn_two_ranks(tmp_path):
    out = tmp_path / "example.json"
    cmd = [sys.executable, "-m", "difforge.parallel.example", "--spawn", "2", "--grid", "2", "8", "8",
           "--heads", "4", "--head-dim", "16", "--batch", "2", "--steps", "2", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SSP / Ulysses" in proc.stdout and "[rank 1/2]" in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    # M = B*N'*C/S = 2*128*64/2 elements, fp32, (S-1)/S off-rank
    unit = 2 * 128 * 64 // 2 * 4 // 2
    assert r["spec_unit_bytes"] == unit
    assert r["ssp"]["forward_bytes"] == unit and r["ssp"]["backward_bytes"] == unit
    assert r["ulysses"]["forward_bytes"] == 4 * unit and r["ulysses"]["backward_bytes"] == 4 * unit
    assert r["ratio"]["forward_bytes"] == 0.25 and r["ratio"]["backward_bytes"] == 0.25
    assert [r["ssp"]["forward_calls"], r["ulysses"]["forward_calls"]] == [1, 4]
    assert len(r["ssp"]["step_s_per_rank"]) == 2 and all(t > 0 for t in r["ulysses"]["step_s_per_rank"])
