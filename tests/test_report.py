"""Tests of pcb_analysis.report: the study tables and the reading set against the paper's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcb_analysis.report import (
    PAPER_TABLE1,
    pct,
    reading,
    rows_to_csv,
    study_table,
    train_vs_val_table,
    verdict,
    write_study_report,
)


def row(model: str, source: str, stat: str, ap: float, apr: float, apc: float, apf: float) -> dict:
    return {
        "model": model,
        "source": source,
        "stat": stat,
        "AP": ap,
        "APr": apr,
        "APc": apc,
        "APf": apf,
        "APb": ap + 0.01,
        "AP_cap": ap - 0.01,
        "cap": 12,
        "classes": 48,
        "AP_fixed": ap + 0.02,
    }


ROWS = [
    row("softmax", "-", "none", 0.20, 0.05, 0.20, 0.30),
    row("softmax", "val", "ms", 0.22, 0.10, 0.22, 0.29),
    row("softmax", "val", "cm", 0.24, 0.20, 0.24, 0.28),
    row("softmax", "train", "ms", 0.20, 0.06, 0.20, 0.30),
    row("softmax", "train", "cm", 0.205, 0.055, 0.20, 0.30),
    row("pcb", "-", "none", 0.19, 0.08, 0.18, 0.30),
]


def test_pct_and_tables() -> None:
    assert pct(0.2345) == "23.4" and pct(-1.0) == "-" and pct(None) == "-" and pct(float("nan")) == "-"
    t1 = study_table(ROWS, "val", ["softmax", "pcb"]).splitlines()
    assert t1[0] == "| model | statistic | AP@300 | APr | APc | APf | APb | AP@12 | AP_fixed |"
    # none, MS, CM for softmax (val statistics only), then pcb's none
    assert [r.split(" | ")[1] for r in t1[2:]] == ["none", "MS", "CM", "none"]
    assert t1[2] == "| softmax | none | 20.0 | 5.0 | 20.0 | 30.0 | 21.0 | 19.0 | 22.0 |"
    t4 = train_vs_val_table(ROWS, ["softmax"]).splitlines()
    assert t4[0].startswith(
        "| model | statistic | AP@300 none | AP@300 val-stat | AP@300 train-stat | AP@12 none"
    )
    assert t4[3] == ("| softmax | cm | 20.0 | 24.0 | 20.5 | 19.0 | 23.0 | 19.5 | 22.0 | 26.0 | 22.5 "
                     "| 5.0 | 20.0 | 5.5 |")
    csv = rows_to_csv(ROWS[:1]).splitlines()
    assert csv == [
        "model,source,stat,AP,APr,APc,APf,APb,AP_cap,AP_fixed",
        "softmax,-,none,0.200000,0.050000,0.200000,0.300000,0.210000,0.190000,0.220000",
    ]


def test_verdict() -> None:
    assert verdict(None, 5.0) == "not measurable here"
    assert verdict(0.4, 5.0).startswith("no clear effect")
    assert verdict(-0.99, -5.0).startswith("no clear effect")
    assert verdict(2.0, 9.4) == "same direction as the paper"
    assert verdict(-2.0, -2.9) == "same direction as the paper"
    assert verdict(-3.0, 8.0) == "the opposite of the paper"


def test_reading_compares_with_the_paper() -> None:
    lines = reading(ROWS, ["softmax", "pcb"])
    text = "\n".join(lines)
    # softmax: bias 30 - 5 = 25 points; paper baseline 4.6 against 28.9
    assert (
        "APr is 5.0 against APf 30.0 (a 25.0-point frequency bias; the paper's baseline: 4.6 against 28.9)"
        in text
    )
    # val CM: APr +15.0, APf -2.0, AP +4.0; paper random sampler: +19.1, -2.9, +4.4
    assert (
        "CM changes APr by +15.0, APf by -2.0 and AP by +4.0 points "
        "(paper, random sampler: +19.1, -2.9, +4.4)" in text
    )
    assert "on APr: same direction as the paper, on AP: same direction as the paper." in text
    # CM vs MS on APr: 20 - 10 = +10.0; paper +9.4 / +8.0
    assert "CM against MS on APr: +10.0 points (paper: +9.4 random sampler, +8.0 RFS): same direction" in text
    # spread 25.0 -> 8.0; paper 28.9 - 4.6 = 24.3 -> 27.9 - 23.7 = 4.2 (random), 28.8 - 27.9 = 0.9 (RFS + CM)
    assert (
        "Spread of APr / APc / APf: 25.0 points without calibration, 8.0 with CM "
        "(paper: 24.3 -> 4.2 random sampler" in text
    )
    assert "0.9 for RFS + CM" in text
    # train CM: APr +0.5 < +15.0 with val: as in the paper
    assert "With the train-set matrix CM changes APr by +0.5 and AP by +0.5 points, against +15.0" in text
    assert text.count("as in the paper") == 1 and "not as in the paper" not in text
    # pcb vs softmax: AP -1.0, APr +3.0; paper Softmax + PCB: +3.2 AP, +8.0 APr
    pcb_line = next(s for s in lines if s.startswith("**pcb** vs"))
    assert "AP -1.0, APr +3.0, APc -2.0, APf +0.0 points" in pcb_line
    assert "(paper, Softmax + PCB vs Softmax on LVIS v0.5: +3.2, +8.0, +3.8, +0.6)" in pcb_line
    assert "on AP: the opposite of the paper, on APr: same direction as the paper" in pcb_line


def test_reading_says_when_the_train_matrix_helps_as_much() -> None:
    rows = [*ROWS[:3], row("softmax", "train", "cm", 0.25, 0.22, 0.24, 0.28)]
    assert any(s.endswith("not as in the paper.") for s in reading(rows, ["softmax"]))


def test_write_study_report(tmp_path: Path) -> None:
    path = write_study_report(
        tmp_path,
        ROWS,
        ["softmax", "pcb"],
        title="T",
        preamble="P",
        figures={"Fig": "f.png"},
        notes=["a note"],
        extra_sections=[("Extra", "body")],
    )
    text = path.read_text()
    assert text.startswith("# T\n\nP\n")
    for needle in (
        "## Table 1 layout",
        "## Table 4 layout",
        "![Fig](f.png)",
        "## Extra",
        "- a note",
        "## Reading",
        "AP@12 (round(300 K / 1230)) keeps that per-class budget",
        "48 classes that is 6.2 detections per class",
    ):
        assert needle in text
    # the paper's table is printed from PAPER_TABLE1
    assert f"| random | CM | {PAPER_TABLE1[2]['AP']:.1f} | {PAPER_TABLE1[2]['APr']:.1f} |" in text
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("stat", ["none", "ms", "cm"])
def test_paper_table1_rows_match_the_spec(stat: str) -> None:
    # docs/method.md §3 as printed: spot checks of the values the reading derives its comparisons from
    want = {"none": (21.9, 4.6, 28.9), "ms": (25.7, 14.3, 27.3), "cm": (26.3, 23.7, 26.0)}[stat]
    r = next(r for r in PAPER_TABLE1 if r["sampler"] == "random" and r["stat"] == stat)
    assert (r["AP"], r["APr"], r["APf"]) == want
