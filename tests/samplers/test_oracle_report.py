"""The exact-oracle evaluation and its report: exact entries equal an independent propagation, Monte-Carlo
entries are marked as such, the equal-NFE comparison interpolates correctly, and the files are written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difforge.samplers.discrete.oracle import Product
from difforge.samplers.discrete.oracle.evaluate import Entry, Variant, evaluate
from difforge.samplers.discrete.oracle.report import equal_nfe_ratios, run_eval, tv_at


def test_an_exact_product_entry_matches_a_per_token_computation():
    """For a product law, MDLM in one step draws every token from its exact marginal: TV is 0."""
    pis = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    entries = evaluate(Product(pis), "masked", [1, 3], variants=(Variant("mdlm", "mdlm"),))
    assert [e.mode for e in entries] == ["exact", "exact"]
    assert [e.nfe for e in entries] == [1, 3]
    assert all(e.tv < 1e-6 and abs(e.kl) < 1e-6 for e in entries)


def test_monte_carlo_entries_are_marked_and_capped():
    pis = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    entries = evaluate(Product(pis), "masked", [2, 8], variants=(Variant("fhs", "first_hitting"),), samples=4000,
                       max_monte_carlo_steps=4)  # fmt: skip
    assert len(entries) == 1 and entries[0].mode.startswith("monte-carlo")
    assert entries[0].tv < 0.05  # first hitting is exact: only sampling noise


def test_tv_interpolates_in_log_log():
    curve = [(10, 0.1), (40, 0.025)]
    assert math.isclose(tv_at(curve, 20), 0.05, rel_tol=1e-12)  # slope -1 in log-log
    assert tv_at(curve, 5) is None and tv_at(curve, 80) is None


def test_equal_nfe_ratios():
    def entry(variant, nfe, tv):
        return Entry("uniform", variant, nfe, nfe, tv, 0.0, "exact", 0.0)

    entries = [entry("euler", 10, 0.1), entry("euler", 40, 0.025), entry("gadd", 20, 0.01), entry("gadd", 80, 0.001)]
    rows = equal_nfe_ratios(entries, "gadd", "euler")
    assert len(rows) == 1 and math.isclose(rows[0]["ratio"], 0.2, rel_tol=1e-12)


def test_run_eval_writes_the_report(tmp_path):
    paths = run_eval("product", ("uniform",), (2,), vocab_size=2, length=3, samples=500, out=str(tmp_path),
                     verbose=False)  # fmt: skip
    data = json.loads(open(paths["results.json"]).read())
    assert {e["variant"] for e in data["entries"]} >= {"euler", "gadd (1 site, exact)"}
    assert "| uniform | euler |" in open(paths["results.md"]).read()
    assert open(paths["tv_vs_nfe.png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path, capsys):
    from difforge.cli import main

    args = ["discrete", "eval", "--oracle", "product", "--vocab-size", "2", "--length", "2", "--steps", "2",
            "--process", "masked", "--samples", "200", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "results.md").exists()
    assert main(["discrete", "eval", "--process", "absorbing", "--out", str(tmp_path)]) == 2
    assert "unknown process" in capsys.readouterr().err
