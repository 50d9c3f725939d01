"""Spawning harness of the multi-process tests (gloo on CPU).

``launch(scenario, world)`` starts ``world`` fresh Python processes (subprocesses, not fork: each imports torch
and difforge once) that join one gloo process group through a ``file://`` rendezvous and run the scenario
function ``module:function`` (a module of tests/parallel, e.g. ``dist_scenarios:world_main``) as
``fn(rank, world, checks)``. A scenario runs many named checks through ``checks(name, fn, *args)``; each check's
return value (JSON-serialisable) or traceback goes to ``<out>/rank<r>.json``. The parent waits with an outer
timeout, kills the processes it started if they overrun (so a test never hangs), and returns a
:class:`LaunchResult` whose :meth:`LaunchResult.check` asserts one check passed on every rank.

Why subprocesses rather than ``torch.multiprocessing.spawn``: spawn tears every process down as soon as one
exits non-zero, which is exactly what the dead-rank test must observe from the survivors.

Run as a script, this file is the worker: ``python dist_testlib.py SCENARIO RANK WORLD INIT_FILE OUT_DIR PG_TIMEOUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))


# ---- parent side ----


@dataclasses.dataclass
class LaunchResult:
    scenario: str
    world: int
    returncodes: list[int | None]  # None: killed by the outer timeout
    logs: list[str]  # stdout + stderr of every rank
    results: list[dict | None]  # per rank: {check name: {"ok": bool, "value"| "error": ...}}, None if not written
    wall_s: float
    timed_out: bool

    def describe(self, ranks=None) -> str:
        ranks = range(self.world) if ranks is None else ranks
        parts = [f"scenario {self.scenario} on {self.world} processes, {self.wall_s:.1f} s, timed_out={self.timed_out}"]
        for r in ranks:
            parts.append(f"--- rank {r}: exit code {self.returncodes[r]}\n{self.logs[r][-4000:]}")
        return "\n".join(parts)

    def rank_results(self, rank: int) -> dict:
        res = self.results[rank]
        assert res is not None, f"rank {rank} wrote no results\n{self.describe([rank])}"
        return res

    def check(self, name: str, ranks=None) -> list:
        """Asserts check ``name`` ran and passed on ``ranks`` (default: all); returns its value per rank."""
        ranks = range(self.world) if ranks is None else ranks
        values, failures = [], []
        for r in ranks:
            entry = self.rank_results(r).get(name)
            if entry is None:
                failures.append(f"rank {r}: check {name!r} did not run (checks: {sorted(self.rank_results(r))})")
            elif not entry["ok"]:
                failures.append(f"rank {r}: check {name!r} failed:\n{entry['error']}")
            else:
                values.append(entry["value"])
        assert not failures, "\n".join(failures)
        return values

    def assert_clean_exit(self, ranks=None) -> None:
        ranks = range(self.world) if ranks is None else ranks
        bad = [r for r in ranks if self.returncodes[r] != 0]
        assert not bad and not self.timed_out, self.describe(bad or None)


def launch(scenario: str, world: int, *, timeout: float = 150.0, pg_timeout: float = 20.0) -> LaunchResult:
    """Runs ``scenario`` on ``world`` gloo processes; never waits longer than ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="difforge-dist-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_HERE, os.path.dirname(_HERE), env.get("PYTHONPATH", "")])
        # 2-core CI machine, up to 4 ranks: one intra-op thread each, or they thrash.
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs, log_files = [], []
        start = time.monotonic()
        for rank in range(world):
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            cmd = [sys.executable, os.path.abspath(__file__), scenario, str(rank), str(world), init_file, tmp,
                   str(pg_timeout)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_HERE))
            log_files.append(log)
        timed_out = False
        for proc in procs:
            remaining = timeout - (time.monotonic() - start)
            try:
                proc.wait(timeout=max(remaining, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for proc in procs:  # only the processes started above, by their own handles
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        wall = time.monotonic() - start
        logs = []
        for log in log_files:
            log.seek(0)
            logs.append(log.read())
            log.close()
        results = []
        for rank in range(world):
            path = os.path.join(tmp, f"rank{rank}.json")
            results.append(json.load(open(path)) if os.path.exists(path) else None)
        codes = [None if (timed_out and p.returncode in (-9, None)) else p.returncode for p in procs]
        return LaunchResult(scenario, world, codes, logs, results, wall, timed_out)


# ---- worker side ----


class Checks:
    """Runs named checks and records their outcome; a failing check does not stop the scenario."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        try:
            value = fn(*args, **kwargs)
            self.results[name] = {"ok": True, "value": value}
        except Exception:  # recorded, asserted on in the parent
            self.results[name] = {"ok": False, "error": traceback.format_exc()}


def _write(out_dir: str, rank: int, checks: Checks) -> None:
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(checks.results, f, default=repr)
    os.replace(path + ".tmp", path)


def worker_main(argv: list[str]) -> None:
    scenario, rank, world, init_file, out_dir, pg_timeout = argv
    rank, world = int(rank), int(world)
    import datetime
    import importlib

    import torch
    import torch.distributed as dist

    import difforge  # noqa: F401  (loads the op library)

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=float(pg_timeout)),
    )  # fmt: skip
    module, function = scenario.split(":")
    fn = getattr(importlib.import_module(module), function)
    checks = Checks()
    # The scenario may write results itself and leave through os._exit (dead-rank tests).
    fn(rank, world, checks, lambda: _write(out_dir, rank, checks))
    _write(out_dir, rank, checks)
    sys.stdout.flush()
    # Skip process-group teardown: after a deliberately failed collective it can block; results are written.
    os._exit(0)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
