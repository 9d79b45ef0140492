"""Learning curves read from metrics.jsonl (pcb_analysis.learning_curve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcb_analysis.errors import PcbkitError
from pcb_analysis.learning_curve import CurvePoint, curve_markdown, demo_section, read_curve


def _write(path: Path, records: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _eval(it: int, ap: float, apr: float | None = 0.01, apf: float = 0.5) -> dict[str, object]:
    return {"type": "eval", "iteration": it, "AP": ap, "APr": apr, "APc": 0.2, "APf": apf, "APb": 0.3}


def test_read_curve_keeps_eval_records_sorted_and_the_last_of_an_iteration(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.jsonl", [
        {"type": "train", "iteration": 9, "loss": 1.0},
        _eval(499, 0.10),
        {"type": "train", "iteration": 999, "loss": 0.5},
        _eval(999, 0.20, apr=None),
        _eval(499, 0.12),  # a resumed run re-evaluated iteration 499: the later record wins
    ])
    pts = read_curve(path)
    assert [p.iteration for p in pts] == [499, 999]
    assert pts[0].metrics["AP"] == 0.12 and pts[1].metrics["APr"] is None


def test_read_curve_missing_file_is_empty_and_bad_line_names_file(tmp_path: Path) -> None:
    assert read_curve(tmp_path / "absent.jsonl") == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_eval(1, 0.1)) + "\n{not json\n")
    with pytest.raises(PcbkitError, match=r"bad\.jsonl: line 2"):
        read_curve(bad)
    _write(bad, [{"type": "eval", "AP": 0.1}])
    with pytest.raises(PcbkitError, match="iteration"):
        read_curve(bad)


def test_curve_markdown_hand_checked() -> None:
    curves = {
        "softmax": [CurvePoint(499, {"AP": 0.1234, "APr": 0.01, "APf": 0.3})],
        "pcb": [CurvePoint(499, {"AP": 0.2, "APr": None, "APf": 0.4}),
                CurvePoint(1499, {"AP": 0.25, "APr": 0.05, "APf": 0.45})],
    }
    md = curve_markdown(curves, max_iter=1500).splitlines()
    assert md[0] == "| model | it 500 (0.33 of the run) | it 1500 (1.00 of the run) |"
    assert md[2] == "| softmax | 12.3 (1.0 / 30.0) |  |"
    assert md[3] == "| pcb | 20.0 (- / 40.0) | 25.0 (5.0 / 45.0) |"
    assert "No evaluation" in curve_markdown({"a": []})


def test_demo_section_appends_the_final_row_and_draws(tmp_path: Path) -> None:
    _write(tmp_path / "runs" / "softmax" / "metrics.jsonl", [_eval(499, 0.1), _eval(999, 0.2)])
    rows = [
        {"model": "softmax", "stat": "none", "AP": 0.3, "APr": 0.05, "APc": 0.2, "APf": 0.6, "APb": 0.3},
        {"model": "softmax", "stat": "cm", "AP": 0.9, "APr": 0.9, "APc": 0.9, "APf": 0.9, "APb": 0.9},
    ]
    fig = tmp_path / "report" / "learning_curve.png"
    fig.parent.mkdir()
    text = demo_section({"softmax": tmp_path / "runs" / "softmax"}, rows, 1500, fig)
    assert "| softmax | 10.0 (1.0 / 50.0) | 20.0 (1.0 / 50.0) | 30.0 (5.0 / 60.0) |" in text
    assert "![learning curves](learning_curve.png)" in text and fig.stat().st_size > 0
    # no mid-run evaluation and no final row: a table saying so, no figure
    empty = demo_section({"pcb": tmp_path / "runs" / "pcb"}, rows, 24, tmp_path / "none.png")
    assert "No evaluation" in empty and not (tmp_path / "none.png").exists()
