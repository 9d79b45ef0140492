"""Tests of pcb_analysis.report: the study tables and the reading set against the paper's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcb_analysis.reading import comparisons
from pcb_analysis.report import (
    PAPER_TABLE1,
    aggregate_seeds,
    effects_table,
    pct,
    reading,
    rows_to_csv,
    study_table,
    sweep_table,
    train_vs_val_table,
    write_study_report,
)
from pcb_analysis.study_stats import Effect, row_key


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
        "APr_cap": apr / 2,
        "APc_cap": apc - 0.02,
        "APf_cap": apf + 0.01,
        "cap": 12,
        "classes": 48,
        "AP_fixed": ap + 0.02,
    }


REGIME = {"cond2": 1900.0, "sigma_min": 5.7e-4, "diag_r": 0.04, "diag_c": 0.07, "diag_f": 0.14,
          "clipped": 0.46}
REGIME_TEXT = "cond 1.9e3 · σmin 5.7e-4 · diag r/c/f 0.04/0.07/0.14 · clip 46%"

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
    rows = [{**r, **REGIME} if r["stat"] == "cm" and r["source"] == "val" else r for r in ROWS]
    t1 = study_table(aggregate_seeds(rows), "val", ["softmax", "pcb"]).splitlines()
    assert t1[0] == ("| model | statistic | AP@300 | APr | APc | APf | APb | AP@12 | APr@12 | APc@12 "
                     "| APf@12 | AP_fixed | regime of the statistics |")
    # none, MS, CM for softmax (val statistics only), then pcb's none
    assert [r.split(" | ")[1] for r in t1[2:]] == ["none", "MS", "CM", "none"]
    assert t1[2] == ("| softmax | none | 20.0 | 5.0 | 20.0 | 30.0 | 21.0 | 19.0 | 2.5 | 18.0 | 31.0 | 22.0 "
                     "| - |")
    # the regime of the statistics file beside the row that used it
    assert t1[4] == (f"| softmax | CM | 24.0 | 20.0 | 24.0 | 28.0 | 25.0 | 23.0 | 10.0 | 22.0 | 29.0 | 26.0 "
                     f"| {REGIME_TEXT} |")
    t4 = train_vs_val_table(aggregate_seeds(rows), ["softmax"]).splitlines()
    assert t4[0].startswith(
        "| model | statistic | AP@300 none | AP@300 val-stat | AP@300 train-stat | AP@12 none"
    )
    assert t4[0].endswith("| val-stat regime | train-stat regime |")
    assert t4[3] == ("| softmax | cm | 20.0 | 24.0 | 20.5 | 19.0 | 23.0 | 19.5 | 22.0 | 26.0 | 22.5 "
                     f"| 5.0 | 20.0 | 5.5 | {REGIME_TEXT} | - |")
    csv = rows_to_csv(ROWS[:1]).splitlines()
    assert csv == [
        "model,source,stat,AP,APr,APc,APf,APb,AP_cap,APr_cap,APc_cap,APf_cap,AP_fixed",
        "softmax,-,none,0.200000,0.050000,0.200000,0.300000,0.210000,0.190000,0.025000,0.180000,0.310000,"
        "0.220000",
    ]


def test_tables_with_seeds_show_mean_and_std() -> None:
    seeds = [{**r, "seed": 0} for r in ROWS[:1]] + [{**ROWS[0], "seed": 1, "AP": 0.24, "APr": 0.07}]
    t1 = study_table(aggregate_seeds(seeds), "val", ["softmax"]).splitlines()
    # AP 0.20, 0.24: mean 22.0, sample std |0.24 - 0.20| / sqrt(2) = 2.83 points; APr 5.0, 7.0 -> 6.0 ± 1.4
    assert t1[2].startswith("| softmax | none | 22.0 ± 2.8 | 6.0 ± 1.4 | 20.0 ± 0.0 |")
    csv = rows_to_csv(seeds).splitlines()
    assert csv[0] == "seed,model,source,stat,AP,APr,APc,APf,APb,AP_cap,APr_cap,APc_cap,APf_cap,AP_fixed"
    assert csv[2].startswith("1,softmax,-,none,0.240000,0.070000,")
    proto = rows_to_csv([{**ROWS[1], "protocol": "cross-fitted"}]).splitlines()
    assert proto[0].startswith("protocol,model,") and proto[1].startswith("cross-fitted,softmax,val,ms,")


def effects_of(rows: list[dict], interval: float, seeds: tuple[float, ...] | None = None,
               metrics: tuple[str, ...] = ("AP", "APr", "APc", "APf", "APb")) -> dict:
    """Effects of every comparison: the rows' difference with an interval of +-`interval` around it."""
    agg = aggregate_seeds(rows)
    by = {row_key(r): r for r in agg}
    out = {}
    for b, a, _ in comparisons(agg, ["softmax", "pcb"]):
        out[(b, a)] = {m: Effect(by[b][m] - by[a][m], by[b][m] - by[a][m] - interval,
                                 by[b][m] - by[a][m] + interval,
                                 seeds if seeds is not None else (by[b][m] - by[a][m],))
                       for m in metrics}
    return out


def test_effects_table() -> None:
    eff = effects_of(ROWS, 0.01)
    t = effects_table(aggregate_seeds(ROWS), ["softmax", "pcb"], eff).splitlines()
    assert t[0] == "| model | comparison (b - a) | AP@300 | APr | APc | APf | APb |"
    labels = [line.split(" | ")[1] for line in t[2:]]
    assert labels == ["ms (val-stat) - none", "cm (val-stat) - none", "ms (train-stat) - none",
                      "cm (train-stat) - none", "cm - ms (val-stat)", "cm train-stat - cm val-stat",
                      "pcb - softmax (none)"]
    # cm (val) - none on AP: 0.24 - 0.20 = +4.0, interval +-1 point -> [+3.0, +5.0], an effect
    assert t[3].startswith("| softmax | cm (val-stat) - none | +4.0 [+3.0, +5.0] * |")
    # ms (train) - none on AP: 0, interval [-1, +1]: no mark
    assert "| softmax | ms (train-stat) - none | +0.0 [-1.0, +1.0] |" in t[4]


def test_effects_table_at_the_cap() -> None:
    eff = effects_of(ROWS, 0.01, metrics=("AP", "APr", "APc", "APf", "APb", "AP_cap", "APr_cap", "APf_cap"))
    t = effects_table(aggregate_seeds(ROWS), ["softmax", "pcb"], eff).splitlines()
    assert t[0] == ("| model | comparison (b - a) | AP@300 | APr | APc | APf | APb | AP@12 | APr@12 "
                    "| APf@12 |")
    # cm (val) - none at the cap: AP 0.23 - 0.19 = +4.0; APr 0.20 / 2 - 0.05 / 2 = +7.5;
    # APf 0.29 - 0.31 = -2.0
    assert t[3].endswith("| +4.0 [+3.0, +5.0] * | +7.5 [+6.5, +8.5] * | -2.0 [-3.0, -1.0] * |")


def test_reading_at_the_lvis_equivalent_cap() -> None:
    metrics = ("AP", "APr", "APc", "APf", "APb", "AP_cap", "APr_cap", "APf_cap")
    lines = reading(aggregate_seeds(ROWS), ["softmax", "pcb"], effects_of(ROWS, 0.001, metrics=metrics))
    # softmax none at the cap: APr 0.05 / 2 = 2.5, APf 0.30 + 0.01 = 31.0 -> a 28.5-point bias
    assert ("At the LVIS-equivalent cap of 12 detections per image (the budget comparable to the paper's): "
            "without calibration APr@12 is 2.5 against APf@12 31.0 (a 28.5-point frequency bias).") in lines
    # CM (val): APr@12 10.0 - 2.5 = +7.5, APf@12 29.0 - 31.0 = -2.0, AP@12 23.0 - 19.0 = +4.0
    cm = next(s for s in lines if s.startswith("At that cap, with the val-set statistics, CM"))
    assert ("CM changes APr@12 by +7.5 [+7.4, +7.6], APf@12 by -2.0 [-2.1, -1.9] and AP@12 by +4.0 "
            "[+3.9, +4.1] points (paper: +19.1, -2.9, +4.4); on APr: same direction as the paper") in cm
    # CM vs MS at the cap: 10.0 - 5.0 = +5.0
    assert ("At that cap, CM against MS on APr@12: +5.0 [+4.9, +5.1] points (paper: +9.4): same direction "
            "as the paper.") in lines
    # pcb vs softmax at the cap: AP@12 0.18 - 0.19 = -1.0, APr@12 0.04 - 0.025 = +1.5, APf@12 0.0
    pair = next(s for s in lines if s.startswith("**pcb** vs **softmax** at the LVIS-equivalent cap"))
    assert pair == ("**pcb** vs **softmax** at the LVIS-equivalent cap of 12: AP@12 -1.0 [-1.1, -0.9], "
                    "APr@12 +1.5 [+1.4, +1.6], APf@12 +0.0 [-0.1, +0.1] points; on AP: the opposite of the "
                    "paper, on APr: same direction as the paper.")
    # rows without the capped metrics, or at K ~ 1,230 where the cap is the standard 300: no sentence
    plain = [{k: v for k, v in r.items() if not k.endswith("_cap") or k == "AP_cap"} for r in ROWS]
    lvis = [{**r, "cap": 300} for r in ROWS]
    for rows, have in ((plain, metrics[:6]), (lvis, metrics)):
        text = reading(aggregate_seeds(rows), ["softmax", "pcb"], effects_of(rows, 0.001, metrics=have))
        assert not any(s.startswith("At ") or "LVIS-equivalent" in s for s in text)


def test_reading_without_intervals_tests_nothing() -> None:
    text = "\n".join(reading(aggregate_seeds(ROWS), ["softmax", "pcb"]))
    assert "CM changes APr by +15.0, APf by -2.0 and AP by +4.0 points" in text
    assert "same direction" not in text and "opposite" not in text
    assert text.count("not tested (no bootstrap interval)") >= 5


def test_reading_no_detectable_effect_where_the_interval_includes_0() -> None:
    # every interval +-20 points: includes 0 for every difference of the rows
    text = "\n".join(reading(aggregate_seeds(ROWS), ["softmax", "pcb"], effects_of(ROWS, 0.2)))
    assert "same direction" not in text and "opposite" not in text
    assert "on APr: no detectable effect, on AP: no detectable effect." in text


def test_reading_seeds_disagreeing_is_no_effect() -> None:
    text = "\n".join(reading(aggregate_seeds(ROWS), ["softmax", "pcb"], effects_of(ROWS, 0.001, (0.1, -0.1))))
    assert "same direction" not in text and "opposite" not in text
    assert "no detectable effect (the seeds disagree in sign)" in text


def test_reading_compares_with_the_paper() -> None:
    lines = reading(aggregate_seeds(ROWS), ["softmax", "pcb"], effects_of(ROWS, 0.001))
    text = "\n".join(lines)
    # softmax: bias 30 - 5 = 25 points; paper baseline 4.6 against 28.9
    assert (
        "APr is 5.0 against APf 30.0 (a 25.0-point frequency bias; the paper's baseline: 4.6 against 28.9)"
        in text
    )
    # val CM: APr +15.0, APf -2.0, AP +4.0; paper random sampler: +19.1, -2.9, +4.4
    assert (
        "CM changes APr by +15.0 [+14.9, +15.1], APf by -2.0 [-2.1, -1.9] and AP by +4.0 [+3.9, +4.1] points "
        "(paper, random sampler: +19.1, -2.9, +4.4)" in text
    )
    assert "on APr: same direction as the paper, on AP: same direction as the paper." in text
    # CM vs MS on APr: 20 - 10 = +10.0; paper +9.4 / +8.0
    assert ("CM against MS on APr: +10.0 [+9.9, +10.1] points (paper: +9.4 random sampler, +8.0 RFS): "
            "same direction" in text)
    # spread 25.0 -> 8.0; paper 28.9 - 4.6 = 24.3 -> 27.9 - 23.7 = 4.2 (random), 28.8 - 27.9 = 0.9 (RFS + CM)
    assert (
        "Spread of APr / APc / APf (seed means): 25.0 points without calibration, 8.0 with CM "
        "(paper: 24.3 -> 4.2 random sampler" in text
    )
    assert "0.9 for RFS + CM" in text
    # train CM: APr +0.5; against val CM 5.5 - 20.0 = -14.5: negative, the paper's direction
    assert "With the train-set matrix CM changes APr by +0.5 [+0.4, +0.6] and AP by +0.5" in text
    assert "against CM with the val-set matrix, APr -14.5 [-14.6, -14.4]" in text
    train_line = next(s for s in lines if s.startswith("With the train-set matrix"))
    assert train_line.endswith("same direction as the paper.")
    # pcb vs softmax: AP -1.0, APr +3.0; paper Softmax + PCB: +3.2 AP, +8.0 APr
    pcb_line = next(s for s in lines if s.startswith("**pcb** vs"))
    assert "AP -1.0 [-1.1, -0.9], APr +3.0 [+2.9, +3.1], APc -2.0 [-2.1, -1.9], APf +0.0" in pcb_line
    assert "(paper, Softmax + PCB vs Softmax on LVIS v0.5: +3.2, +8.0, +3.8, +0.6)" in pcb_line
    assert "on AP: the opposite of the paper, on APr: same direction as the paper" in pcb_line


def test_reading_says_when_the_train_matrix_helps_more() -> None:
    rows = [*ROWS[:3], row("softmax", "train", "cm", 0.25, 0.22, 0.24, 0.28)]
    lines = reading(aggregate_seeds(rows), ["softmax"], effects_of(rows, 0.001))
    assert next(s for s in lines if s.startswith("With the train-set")).endswith("the opposite of the paper.")


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
    assert "## Differences with 95% intervals" not in text  # no effects, no intervals text
    path = write_study_report(tmp_path, ROWS, ["softmax", "pcb"], title="T", preamble="P",
                              effects=effects_of(ROWS, 0.001), intervals="**Seeds.** text")
    text = path.read_text()
    assert "## Differences with 95% intervals" in text and "**Seeds.** text" in text
    # 7 comparisons x 5 metrics = 35 intervals; 7 of the AP differences etc. exclude 0 except the zero ones
    assert "of 35 intervals mark an effect ('*')" in text and "(1.8 expected here)" in text
    # the paper's table is printed from PAPER_TABLE1
    assert f"| random | CM | {PAPER_TABLE1[2]['AP']:.1f} | {PAPER_TABLE1[2]['APr']:.1f} |" in text
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("stat", ["none", "ms", "cm"])
def test_paper_table1_rows_match_the_spec(stat: str) -> None:
    # docs/method.md §3 as printed: spot checks of the values the reading derives its comparisons from
    want = {"none": (21.9, 4.6, 28.9), "ms": (25.7, 14.3, 27.3), "cm": (26.3, 23.7, 26.0)}[stat]
    r = next(r for r in PAPER_TABLE1 if r["sampler"] == "random" and r["stat"] == stat)
    assert (r["AP"], r["APr"], r["APf"]) == want


PROTOCOL_ROWS = [
    *ROWS,
    {**row("softmax", "val", "cm", 0.21, 0.07, 0.21, 0.29), "protocol": "cross-fitted"},
    {**row("softmax", "val", "cm-diagshrink(lambda=0.5)", 0.23, 0.15, 0.23, 0.285), "protocol": "sweep",
     "family": "cm-diagshrink", "knob": "lambda", "value": 0.5},
]


def test_protocol_rows_stay_in_their_own_tables() -> None:
    agg = aggregate_seeds(PROTOCOL_ROWS)
    in_sample = study_table(agg, "val", ["softmax"])
    cross = study_table(agg, "val", ["softmax"], protocol="cross-fitted")
    assert "| softmax | CM | 24.0 |" in in_sample and "| softmax | CM | 21.0 |" not in in_sample
    assert "lambda" not in in_sample
    assert "| softmax | CM | 21.0 |" in cross and "| softmax | MS |" not in cross  # no cross-fitted ms row
    assert "| softmax | none | 20.0 |" in cross
    assert "lambda" not in train_vs_val_table(agg, ["softmax"])
    sweep = sweep_table(agg, ["softmax"])
    assert "| softmax | cm-diagshrink(lambda=0.5) | 23.0 | 15.0 | 28.5 | 25.0 |" in sweep
    assert "| softmax | cm | 24.0 | 20.0 | 28.0 | 26.0 |" in sweep  # the in-sample end, not cross-fitted
    labels = [label for _, _, label in comparisons(agg, ["softmax"])]
    assert "cm (val-stat, cross-fitted) - none" in labels  # compared (bootstrapped)
    assert not any("lambda" in label for label in labels)  # sweeps are not


def test_report_has_cross_fitted_and_sweep_sections(tmp_path: Path) -> None:
    text = write_study_report(tmp_path, PROTOCOL_ROWS, ["softmax"], title="t", preamble="p").read_text()
    assert "## Table 1 layout: cross-fitted val statistics (out of sample)" in text
    assert "## Knob sweeps (val statistics, in sample)" in text
    assert "## Table 1 layout: train-set statistics (Table 4's protocol)" in text  # all three protocols
    plain = write_study_report(tmp_path / "plain", ROWS, ["softmax", "pcb"], title="t",
                               preamble="p").read_text()
    assert "cross-fitted" not in plain and "Knob sweeps" not in plain
