"""End to end: `pcbkit demo --quick` produces every report artifact; a rerun is served from cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcbkit.cli import cli

STATS = {"none", "ms", "cm", "cm-bayes"}


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    data, work, report = tmp_path / "data", tmp_path / "work", tmp_path / "report"
    args = ["demo", "--quick", "--data", str(data), "--work", str(work), "--report", str(report)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    for name in ("README.md", "results.csv", "results.json", "figure1_block.png", "overview.png",
                 "train_vs_val.png", "top_confused_pairs.csv"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    rows = json.loads((report / "results.json").read_text())
    for model in ("softmax", "pcb"):
        cross = [r for r in rows if r["model"] == model and r.get("protocol") == "cross-fitted"]
        sweep = [r for r in rows if r["model"] == model and r.get("protocol") == "sweep"]
        mine = [r for r in rows if r["model"] == model and not r.get("protocol")]
        # the matrix statistics out of fold; the knob sweeps of the study (SWEEPS) with val statistics
        assert sorted(r["stat"] for r in cross) == ["cm", "cm-bayes", "ms"]
        assert {(r["family"], r["knob"]) for r in sweep} == {
            ("cm-diagshrink", "lambda"), ("cm-tikhonov", "tau"), ("ibu", "k")}
        assert len(sweep) == 10 and all(r["source"] == "val" for r in [*cross, *sweep])
        assert {r["stat"] for r in mine} == STATS
        # none once, then ms / cm / cm-bayes with val-set and with train-set statistics
        assert sorted((r["stat"], r["source"]) for r in mine) == sorted(
            [("none", "-")] + [(s, src) for s in ("ms", "cm", "cm-bayes") for src in ("val", "train")]
        )
        for r in mine:
            for m in ("AP", "APr", "APc", "APf", "APb", "AP_fixed"):
                assert r[m] is not None and math.isfinite(r[m]), (model, r["stat"], m)
    text = (report / "README.md").read_text()
    assert "Table 1 layout" in text and "Table 4 layout" in text and "figure1_block.png" in text
    assert "cross-fitted val statistics" in text and "sweep_softmax_lambda.png" in text
    # every step is cached on a rerun
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    steps = [json.loads(p.read_text())["step"] for p in work.rglob(".step-*.json")]
    assert "train-softmax" in steps and "pcb/calibrate" in steps
    # the wall-time table marks cached steps
    assert "| cached (time of the run that made it) |" in (report / "README.md").read_text()
    # `pcbkit study` on the demo's softmax checkpoint, as for real data: same report layout;
    # --no-fixed-ap leaves AP_fixed undefined and writes no fixed results
    run = work / "runs" / "softmax"
    study = [
        "study", "--name", "s", "--config", str(run / "config.yaml"),
        "--checkpoint", str(run / "model_final.pth"),
        "--train-gt", str(data / "train.json"), "--val-gt", str(data / "val.json"),
        "--images", str(data / "images"),
        "--work", str(tmp_path / "study"), "--report", str(tmp_path / "study_report"),
        "--train-dump-images", "20", "--val-images", "12", "--device", "cpu", "--no-fixed-ap",
    ]  # fmt: skip
    res = CliRunner().invoke(cli, study)
    assert res.exit_code == 0, res.output
    srows = json.loads((tmp_path / "study_report" / "results.json").read_text())
    srows = [r for r in srows if r.get("protocol") != "sweep"]
    assert {r["stat"] for r in srows} == STATS and all(r["AP_fixed"] is None for r in srows)
    assert "Table 1 layout" in (tmp_path / "study_report" / "README.md").read_text()
    assert not list((tmp_path / "study").rglob("*-fixed.json"))
