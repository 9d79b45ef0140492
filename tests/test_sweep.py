"""Knob sweeps without a model: `--grid` parsing and validation, grid rows' names and parameters, and
the sweep plot's series (`pcb_analysis.plots.sweep`). The rows' calibrations through a dump are in
tests/test_calibrate_sweeps.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pcb_analysis.calibration import Calibrator
from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots.sweep import plot_sweep, sweep_series
from pcb_analysis.stats import ClassStats
from pcb_train.calibrate import CalibrateConfig, Grid, build_rows, grid_rows, parse_grid, parse_grids

K = 3


def test_parse_grids_maps_knobs_to_values() -> None:
    grids = parse_grids(["lambda=0, 0.25,0.5,0.5,1,", "k=0,1,10", "tau=0,0.01,1e3"])
    assert grids == (Grid("lambda", (0.0, 0.25, 0.5, 1.0)), Grid("k", (0.0, 1.0, 10.0)),
                     Grid("tau", (0.0, 0.01, 1000.0)))


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["lambda=,,"], "--grid lambda: no value given"),
        (["lambda="], "--grid lambda: no value given"),
        (["lambda=0,x"], "--grid lambda: 'x' is not a number"),
        (["lambda=1.5"], r"--grid lambda: values must be finite and in \[0, 1\] \(got 1.5\)"),
        (["tau=-1"], "--grid tau: values must be finite and >= 0"),
        (["eta=inf"], "--grid eta: values must be finite"),
        (["k=0.5"], "--grid k: values must be integers"),
        (["lambda 0,1"], "expected KNOB=v1,v2"),
        (["gamma=1"], "unknown knob 'gamma'"),
        (["lambda=0", "lambda=1"], "given twice"),
    ],
)
def test_parse_grids_one_line_errors(texts: list[str], message: str) -> None:
    with pytest.raises(PcbkitError, match=message) as err:
        parse_grids(texts)
    assert "\n" not in str(err.value)


def test_empty_gamma_and_tau_lists_are_errors() -> None:
    for option in ("--gamma", "--tau"):
        with pytest.raises(PcbkitError, match=f"{option}: no value given"):
            parse_grid(",,", option)
        with pytest.raises(PcbkitError, match=f"{option}: no value given"):
            parse_grid("", option)
    assert parse_grid(" 1 , 1 ,", "--tau") == (1.0,)


def test_grid_rows_names_slugs_and_parameters() -> None:
    grids = parse_grids(["lambda=0,0.5", "k=0,2", "eta=0.5", "tau=1e-05"])
    rows = grid_rows(["cm-diagshrink", "ibu", "ms-eq", "cm-tikhonov"], grids)
    assert [r.name for r in rows] == [
        "cm-diagshrink(lambda=0)", "cm-diagshrink(lambda=0.5)", "ibu(k=0)", "ibu(k=2)", "ms-eq(eta=0.5)",
        "cm-tikhonov(tau=1e-05)",
    ]
    assert [r.slug for r in rows] == [
        "cm-diagshrink-lambda0", "cm-diagshrink-lambda0.5", "ibu-k0", "ibu-k2", "ms-eq-eta0.5",
        "cm-tikhonov-tau1e-05",
    ]
    assert all(not set("(=/ ") & set(r.slug) for r in rows)
    assert dict(rows[1].build) == {"lam": 0.5}
    assert dict(rows[3].build) == {"k": 2, "start": "ms"} and isinstance(dict(rows[3].build)["k"], int)
    assert dict(rows[4].build) == {"eta": 0.5, "iterations": 10}
    uniform = grid_rows(["ibu"], parse_grids(["k=1"]), ibu_start="uniform", ms_eq_iterations=3)
    assert dict(uniform[0].build) == {"k": 1, "start": "uniform"}
    # the row prior: one row per selected parameter-free matrix statistic and value
    prior = grid_rows(["none", "cm", "ms"], parse_grids(["a=0,5"]))
    assert [r.name for r in prior] == ["cm(a=0)", "cm(a=5)", "ms(a=0)", "ms(a=5)"]
    assert dict(prior[1].build) == {"row_prior": 5.0}


@pytest.mark.parametrize(
    ("stats", "grids", "kw", "message"),
    [
        (["cm"], ["lambda=0,1"], {}, "--grid lambda: its estimator 'cm-diagshrink' is not selected"),
        (["cm-diagshrink", "ibu"], ["lambda=0,1"], {}, "--stat ibu: give its values with --grid k="),
        (["none"], ["a=1"], {}, "--grid a: the row prior needs a matrix statistic"),
        (["ibu"], ["k=0,1"], {"ibu_start": "uniform"}, "k = 0 from --ibu-start uniform"),
        (["ibu"], ["k=1"], {"ibu_start": "flat"}, "--ibu-start must be one of"),
        (["ms-eq"], ["eta=1"], {"ms_eq_iterations": 0}, "--ms-eq-iterations must be an integer >= 1"),
    ],
)
def test_sweeps_are_validated_when_configured(
    stats: list[str], grids: list[str], kw: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(PcbkitError, match=message):
        CalibrateConfig(stats=tmp_path / "s.npz", gt=tmp_path / "g.json", out=tmp_path / "o", dump=tmp_path,
                        stat=tuple(stats), grids=parse_grids(grids), **kw)


def hand_stats() -> ClassStats:
    """K = 3 sums with n = (2, 2, 1): M = [[.6, .225, .175], [.35, .5, .15], [.1, .1, .8]]."""
    s = torch.tensor([[1.2, 0.45, 0.35], [0.7, 1.0, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64)
    return ClassStats(S=s, n=torch.tensor([2, 2, 1]), H=torch.zeros(K, K, dtype=torch.int64),
                      instances=torch.tensor([2, 1, 0]))


def test_grid_rows_apply_the_estimator_with_the_knob_value() -> None:
    st = hand_stats()
    rows = build_rows(st, ["none", "ms", "cm", "cm-diagshrink", "cm-tikhonov", "ibu"],
                      grids=parse_grids(["lambda=0,0.5,1", "tau=0.1", "k=0,3", "a=2"]))
    by = {r.name: r for r in rows}
    assert list(by)[:3] == ["none", "ms", "cm"]  # parameter-free rows first, then the sweeps
    assert by["cm-diagshrink(lambda=0.5)"].family == "cm-diagshrink"
    assert (by["cm-diagshrink(lambda=0.5)"].knob, by["cm-diagshrink(lambda=0.5)"].param) == ("lambda", 0.5)
    assert (by["cm(a=2)"].family, by["cm(a=2)"].knob, by["cm(a=2)"].param) == ("cm", "a", 2.0)
    q = torch.softmax(torch.randn(20, K + 1, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64), dim=1)
    torch.testing.assert_close(by["cm-diagshrink(lambda=0.5)"].transform(q),
                               Calibrator.build("cm-diagshrink", st, lam=0.5)(q), rtol=0, atol=0)
    torch.testing.assert_close(by["cm-tikhonov(tau=0.1)"].transform(q),
                               Calibrator.build("cm-tikhonov", st, tau=0.1)(q), rtol=0, atol=0)
    torch.testing.assert_close(by["ibu(k=3)"].transform(q), Calibrator.build("ibu", st, k=3, start="ms")(q),
                               rtol=0, atol=0)
    torch.testing.assert_close(by["cm(a=2)"].transform(q), Calibrator.build("cm", st, row_prior=2.0)(q),
                               rtol=0, atol=0)
    # limiting cases, exactly: lambda = 1 is ms, lambda = 0 is cm, ibu k = 0 from ms is ms
    assert torch.equal(by["cm-diagshrink(lambda=1)"].transform(q), by["ms"].transform(q))
    assert torch.equal(by["cm-diagshrink(lambda=0)"].transform(q), by["cm"].transform(q))
    assert torch.equal(by["ibu(k=0)"].transform(q), by["ms"].transform(q))
    # from a uniform start one ibu step is cm-bayes (same map, other arithmetic: close, not equal)
    uniform = build_rows(st, ["cm-bayes", "ibu"], grids=parse_grids(["k=1"]), ibu_start="uniform")
    torch.testing.assert_close(uniform[1].transform(q), uniform[0].transform(q), rtol=1e-12, atol=1e-14)
    # the row prior needs instance counts
    st.instances = None
    with pytest.raises(PcbkitError, match="--grid a: the row prior needs ground-truth instance counts"):
        build_rows(st, ["cm"], grids=parse_grids(["a=2"]))


def test_ms_eq_grid_without_a_readable_dump_is_one_line_error() -> None:
    with pytest.raises(PcbkitError, match=r"--grid eta \(ms-eq\) fits a class weight"):
        build_rows(hand_stats(), ["ms-eq"], grids=parse_grids(["eta=1"]))


# --------------------------------------------------------------------------------------------
# the sweep plot


def _row(stat: str, family: str, knob: str | None, value: float | None, ap: float, apr: float | None,
         protocol: str = "in-sample") -> dict:
    return {"stat": stat, "family": family, "knob": knob, "value": value, "param": value,
            "protocol": protocol, "metrics": {"bbox": {"AP": ap, "APr": apr, "APf": ap / 2}}}


ROWS = [
    _row("none", "none", None, None, 0.30, 0.10),
    _row("ms", "ms", None, None, 0.32, 0.20),
    _row("cm", "cm", None, None, 0.25, None),
    _row("cm-diagshrink(lambda=1)", "cm-diagshrink", "lambda", 1.0, 0.32, 0.20),
    _row("cm-diagshrink(lambda=0)", "cm-diagshrink", "lambda", 0.0, 0.25, 0.15),
    _row("cm-diagshrink(lambda=0.5)", "cm-diagshrink", "lambda", 0.5, 0.31, 0.18),
    _row("norcal(1)", "norcal", "gamma", 1.0, 0.29, 0.12),
]


def test_sweep_series_sorts_by_value_and_reads_references() -> None:
    s = sweep_series(ROWS, "lambda")
    assert s.key == "bbox" and list(s.lines) == ["cm-diagshrink"]
    xs, ys = s.lines["cm-diagshrink"]
    assert xs == (0.0, 0.5, 1.0)
    assert ys["AP"] == (0.25, 0.31, 0.32) and ys["APr"] == (0.15, 0.18, 0.20)
    assert ys["APf"] == (0.125, 0.155, 0.16)
    assert s.references["none"] == {"AP": 0.30, "APr": 0.10, "APf": 0.15}
    assert math.isnan(s.references["cm"]["APr"])  # undefined metrics stay NaN
    assert sweep_series(ROWS, "gamma", marks=("ms", "absent")).references.keys() == {"ms"}
    tau = [*ROWS, _row("logit-adj(1)", "logit-adj", "tau", 1.0, 0.2, 0.1),
           _row("cm-tikhonov(tau=1)", "cm-tikhonov", "tau", 1.0, 0.3, 0.1)]
    assert list(sweep_series(tau, "tau").lines) == ["logit-adj", "cm-tikhonov"]
    assert list(sweep_series(tau, "tau", family="cm-tikhonov").lines) == ["cm-tikhonov"]
    with pytest.raises(PcbkitError, match="no row of knob 'tau'"):
        sweep_series(ROWS, "tau")
    with pytest.raises(PcbkitError, match="values repeated"):
        sweep_series([*ROWS, _row("x", "cm-diagshrink", "lambda", 0.5, 0.1, 0.1, "cross-fitted")], "lambda")
    mixed = [*ROWS, _row("x", "cm-diagshrink", "lambda", 0.5, 0.1, 0.1, "cross-fitted")]
    assert sweep_series(mixed, "lambda", protocol="cross-fitted").lines["cm-diagshrink"][0] == (0.5,)


def test_plot_sweep_writes_a_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot_sweep(ROWS, "lambda", tmp_path / "sweep.png")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PcbkitError, match="extension"):
        plot_sweep(ROWS, "lambda", tmp_path / "sweep.jpg")
