"""End to end: `pcbkit demo --quick --seeds 2` trains two seeds per model on one dataset, reports mean ±
std and paired bootstrap intervals; the first seed keeps the one-seed paths and caches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcbkit.cli import cli


@pytest.mark.slow
def test_demo_quick_two_seeds(tmp_path: Path) -> None:
    data, work, report = tmp_path / "data", tmp_path / "work", tmp_path / "report"
    base = ["demo", "--quick", "--data", str(data), "--work", str(work), "--report", str(report)]
    res = CliRunner().invoke(cli, [*base, "--seeds", "2", "--bootstrap", "40"])
    assert res.exit_code == 0, res.output
    # seed 0 in today's folders, seed 1 in work/seed-1; the training seed differs, the dataset does not
    ckpt0, ckpt1 = (w / "runs" / "softmax" / "model_final.pth" for w in (work, work / "seed-1"))
    assert ckpt0.is_file() and ckpt1.is_file() and ckpt0.read_bytes() != ckpt1.read_bytes()
    assert not (data / "seed-1").exists()
    with (report / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    # per seed and model: none + 3 val + 3 train statistics, 3 cross-fitted, 10 sweep rows
    assert sorted({r["seed"] for r in rows}) == ["0", "1"] and len(rows) == 2 * 2 * (7 + 3 + 10)
    boot = json.loads((work / "seed-1" / "bootstrap" / "pcb.json").read_text())
    assert boot["resamples"] == 40 and all(len(v["resamples"]["AP"]) == 40 for v in boot["files"].values())
    text = (report / "README.md").read_text()
    table1 = text.split("## Table 1 layout")[1].split("##")[0]
    assert " ± " in table1 and "cond " in table1 and "diag r/c/f" in table1
    assert "## Differences with 95% intervals" in text and "| softmax | cm (val-stat) - none | " in text
    assert "2 training seeds per model" in text and "n = 2" in text
    assert "every seed's difference has the sign of the mean" in text
    assert "softmax val (seed 1)" in text  # every seed's statistics in the regime table
    assert "seed1/softmax/bootstrap" in text  # the bootstrap's cost in the wall-time table
    # one seed again: every step cached, and the report's rows are seed 0's rows of the two-seed run
    res = CliRunner().invoke(cli, [*base, "--bootstrap", "40"])
    assert res.exit_code == 0, res.output
    with (report / "results.csv").open() as f:
        one = list(csv.DictReader(f))
    assert "seed" not in one[0]
    assert one == [{k: v for k, v in r.items() if k != "seed"} for r in rows if r["seed"] == "0"]
    walls = (report / "README.md").read_text().split("## Wall time per step")[1]
    assert "| ran |" not in walls
