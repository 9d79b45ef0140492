"""Knob sweeps through `pcbkit calibrate` (offline, from a dump of the tiny model; one in-model run).

The grid rows' results and metrics, their limiting cases against the parameter-free rows (results
files byte for byte), the knob fields of metrics.json / metrics.csv, ms-eq's fit on the statistics'
dump, one-line CLI errors.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import test_calibrate

from pcb_analysis.estimators import fit_ms_eq
from pcb_analysis.stats import ClassStats
from pcb_train.calibrate import CalibrateConfig, build_rows, calibrate_from_dump, calibrate_model, parse_grids

world = test_calibrate.world  # the module fixture: the tiny model, its val dump and statistics
N_IMAGES, model_args, model_cfg = test_calibrate.N_IMAGES, test_calibrate.model_args, test_calibrate.model_cfg


def offline(world: dict[str, Path], out: Path, stat: tuple[str, ...], grids: list[str], **kw) -> dict:
    cfg = CalibrateConfig(stats=world["stats"], gt=world["gt"], out=out, dump=world["dump"], stat=stat,
                          grids=parse_grids(grids), progress=False, **kw)
    return calibrate_from_dump(cfg).to_dict()


def test_limiting_grid_points_write_the_parameter_free_rows_results(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "res"
    report = offline(world, out, ("none", "ms", "cm", "cm-diagshrink", "ibu", "cm-tikhonov"),
                     ["lambda=0,0.5,1", "k=0,2", "tau=0,0.1"])
    by = {r["stat"]: r for r in report["rows"]}
    assert list(by) == ["none", "ms", "cm", "cm-diagshrink(lambda=0)", "cm-diagshrink(lambda=0.5)",
                        "cm-diagshrink(lambda=1)", "ibu(k=0)", "ibu(k=2)", "cm-tikhonov(tau=0)",
                        "cm-tikhonov(tau=0.1)"]

    def same(a: str, b: str) -> None:
        for key in ("results", "fixed_results"):
            assert (out / by[a][key]).read_bytes() == (out / by[b][key]).read_bytes(), (a, b, key)
        assert by[a]["metrics"] == by[b]["metrics"], (a, b)

    same("cm-diagshrink(lambda=1)", "ms")
    same("cm-diagshrink(lambda=0)", "cm")
    same("ibu(k=0)", "ms")
    same("cm-tikhonov(tau=0)", "cm")
    assert by["cm-diagshrink(lambda=0.5)"]["results"] == "val-cm-diagshrink-lambda0.5-offline.json"
    half = (out / "val-cm-diagshrink-lambda0.5-offline.json").read_bytes()
    assert half not in ((out / by["ms"]["results"]).read_bytes(), (out / by["cm"]["results"]).read_bytes())
    # knob fields: metrics.json rows and the CSV
    r = by["cm-diagshrink(lambda=0.5)"]
    fields = (r["family"], r["knob"], r["value"], r["param"], r["protocol"])
    assert fields == ("cm-diagshrink", "lambda", 0.5, 0.5, "in-sample")
    assert (by["ms"]["knob"], by["ms"]["value"], by["ibu(k=2)"]["knob"], by["ibu(k=2)"]["value"]) == (
        None, None, "k", 2.0)
    saved = json.loads((out / "metrics-offline.json").read_text())
    assert saved["rows"][4]["knob"] == "lambda" and saved["statistics"]["protocol"] == "in-sample"
    table = list(csv.DictReader(io.StringIO((out / "metrics-offline.csv").read_text())))
    assert [(t["stat"], t["family"], t["knob"], t["value"], t["protocol"]) for t in table[3:5]] == [
        ("cm-diagshrink(lambda=0)", "cm-diagshrink", "lambda", "0.0", "in-sample"),
        ("cm-diagshrink(lambda=0.5)", "cm-diagshrink", "lambda", "0.5", "in-sample"),
    ]
    assert table[0]["knob"] == "" and table[0]["value"] == ""


def test_ms_eq_grid_fits_on_the_statistics_dump(world: dict[str, Path], tmp_path: Path) -> None:
    """The eta rows use the weight `fit_ms_eq` fits on the dump the statistics were read from (no fit
    stored in the statistics file), for the --ms-eq-iterations given."""
    report = offline(world, tmp_path / "res", ("ms-eq",), ["eta=0.5,1"], ms_eq_iterations=2)
    assert [(r["stat"], r["family"], r["knob"], r["value"]) for r in report["rows"]] == [
        ("ms-eq(eta=0.5)", "ms-eq", "eta", 0.5), ("ms-eq(eta=1)", "ms-eq", "eta", 1.0)]
    st = ClassStats.load(world["stats"])
    assert "ms_eq" not in st.extra
    rows = build_rows(st, ["ms-eq"], grids=parse_grids(["eta=0.5"]), ms_eq_iterations=2)
    fitted = fit_ms_eq(world["dump"], ClassStats.load(world["stats"]), 2, 0.5)
    assert rows[0].transform.operand.tolist() == fitted.tolist()
    assert fitted.tolist() != [1.0] * len(fitted)  # the fit did move the weights


def test_grid_errors_are_one_line_exit_2(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = tmp_path / "out"
    cases = {
        "--grid lambda: no value given": ["--stat", "cm-diagshrink", "--grid", "lambda=,,"],
        "--tau: no value given": ["--tau", ",,"],
        "--gamma: no value given": ["--gamma", ",,"],
        "its estimator 'cm-diagshrink' is not selected": ["--stat", "cm", "--grid", "lambda=0,1"],
        "--grid tau: 'a' is not a number": ["--stat", "cm-tikhonov", "--grid", "tau=a"],
        "--grid lambda: values must be finite and in [0, 1]": [
            "--stat", "cm-diagshrink", "--grid", "lambda=2"],
        "--stat ibu: give its values with --grid k=": ["--stat", "ibu"],
        "k = 0 from --ibu-start uniform": ["--stat", "ibu", "--grid", "k=0,1", "--ibu-start", "uniform"],
    }
    for expected, extra in cases.items():
        code, _, err = run_pcbkit(model_args(world, out, *extra))
        assert code == 2, (expected, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("pcbkit: error:")]
        assert len(lines) == 1 and expected in lines[0], (expected, err)
        assert not out.exists(), expected


def test_in_model_sweep_shares_the_pass(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "res"
    cfg = model_cfg(world, out, stat=("ms", "cm-diagshrink"), grids=parse_grids(["lambda=1"]), fixed_ap=False)
    report = calibrate_model(cfg)
    by = {r["stat"]: r for r in report.rows}
    assert report.images == N_IMAGES
    shrunk = (out / by["cm-diagshrink(lambda=1)"]["results"]).read_bytes()
    assert (out / by["ms"]["results"]).read_bytes() == shrunk
    assert by["cm-diagshrink(lambda=1)"]["metrics"] == by["ms"]["metrics"]
